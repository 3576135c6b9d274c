"""Control requests with the operation model's retries: 1 s, 2 s, 4 s … capped at 60 s.

A request that gets no answer is retried after a growing pause, because the agent may
be restarting or the server electing a leader; a request the server refuses for lack of
permission is not retried, and says so instead of timing out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets

import nats.errors
from nats.aio.msg import Msg

from bus.codec import decode_model, encode_model
from bus.connection import Bus
from bus.errors import AuthError, ConnectionFailedError, FleetError, FleetTimeoutError
from bus.retry import CONTROL_BACKOFF_CAP_S, Backoff
from bus.signing import Signer, sign_control
from bus.subjects import CONTROL_REPLIES
from schemas import ControlReply, ControlRequest

logger = logging.getLogger(__name__)

BACKOFF_CAP_S = CONTROL_BACKOFF_CAP_S

OP_TIMEOUTS_S: dict[str, float] = {
    "status": 10.0,
    "config-get": 10.0,
    "config-set": 20.0,
    "log": 10.0,
    "restart": 30.0,
}
"""How long each agent operation may take, retries included (the contract's table)."""

_STATUS, _NO_RESPONDERS = "Status", "503"

DEFAULT_TIMEOUT_S = 10.0
"""The budget of an operation not in :data:`OP_TIMEOUTS_S` (the master's)."""


def op_timeout(subject: str) -> float:
    """The budget of the operation a control subject names (its last token)."""
    return OP_TIMEOUTS_S.get(subject.rsplit(".", 1)[-1], DEFAULT_TIMEOUT_S)


def retry_delays(attempts: int, first: float = 1.0, cap: float = BACKOFF_CAP_S) -> list[float]:
    """The pauses between ``attempts`` tries: 1, 2, 4 … seconds, never above ``cap``."""
    return list(Backoff(first, cap, jitter=False).delays(max(0, attempts - 1)))


async def control(
    bus: Bus,
    subject: str,
    args: dict[str, object] | None = None,
    *,
    timeout: float | None = None,
    deadline: float | None = None,
    attempts: int | None = None,
    signer: Signer | None = None,
) -> ControlReply:
    """Send a control request and return the reply, retrying unanswered attempts.

    An unanswered attempt (no responder: the agent is restarting or not connected yet;
    or no reply in time) is tried again after 1 s, 2 s, 4 s … (at most 60 s) for as long
    as the operation's budget lasts. Agents answer only requests signed by a key their
    trust file grants the operation: pass ``signer`` (each attempt is signed afresh).

    Args:
        deadline: how long the whole operation may take, retries included. By default
            the operation's own (:func:`op_timeout`), unless ``attempts`` is given: then
            only ``attempts`` bounds it.
        timeout: how long each attempt waits for its answer; by default what is left of
            the deadline (the operation's budget when there is none).
        attempts: try at most this many times.

    Raises:
        FleetTimeoutError: no answer within the deadline or the attempts.
        PermissionDeniedError: the server refused the subject to this principal.
        AuthError: the agent refused the request (``<op> refused: …``).
        BadMessageError: the answer is not a control reply.
        FleetError: the other side answered with another error.
    """
    loop = asyncio.get_running_loop()
    op = subject.rsplit(".", 1)[-1]
    if deadline is None and attempts is None:
        deadline = op_timeout(subject)
    started = loop.time()
    give_up_at = None if deadline is None else started + deadline
    backoff = Backoff(1.0, BACKOFF_CAP_S, jitter=False)  # one caller: nobody to collide with
    unsigned = ControlRequest(args=dict(args or {}))
    tries = 0
    while True:
        left = None if give_up_at is None else max(give_up_at - loop.time(), 0.001)
        wait = (
            timeout if timeout is not None else (left if left is not None else op_timeout(subject))
        )
        if left is not None:
            wait = min(wait, left)
        signed = sign_control(unsigned, subject, signer) if signer is not None else unsigned
        tries += 1
        try:
            msg = await _attempt(bus, subject, encode_model(signed), wait)
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
            pause = backoff.delay(tries - 1)
            out_of_tries = attempts is not None and tries >= attempts
            out_of_time = give_up_at is not None and loop.time() + pause >= give_up_at
            if out_of_tries or out_of_time:
                why = (
                    "no responder" if isinstance(exc, nats.errors.NoRespondersError) else "silence"
                )
                raise FleetTimeoutError(
                    f"no answer on {subject} after {tries} attempts in "
                    f"{loop.time() - started:.1f}s (last: {why})"
                ) from exc
            logger.info("↻ %s: %s; again in %gs", subject, type(exc).__name__, pause)
            await asyncio.sleep(pause)  # a pause between tries, not a wait for an event
            continue
        reply = decode_model(msg.data, ControlReply)
        if reply.ok:
            return reply
        error = reply.error or f"{subject} failed"
        # An agent's refusal always begins so (agentd.controlauth): an authorisation error.
        if error.startswith(f"{op} refused:"):
            raise AuthError(error)
        raise FleetError(error)


def _reply_subject(bus: Bus, subject: str) -> str:
    # ``<inbox>.ctl.<target>.<unique>``: naming whom it asked lets a server hold who may
    # answer (a site's leaf link answers for its own agents only; see fleet.leafsite).
    parts = subject.split(".")
    target = parts[2] if len(parts) > 3 and parts[1] == "ctl" else "any"
    inbox = bus.settings.inbox_prefix or "_INBOX"
    return f"{inbox}.{CONTROL_REPLIES}.{target}.{secrets.token_hex(8)}"


async def _ask(bus: Bus, subject: str, payload: bytes, wait: float) -> Msg:
    reply = _reply_subject(bus, subject)
    sub = await bus.nc.subscribe(reply, max_msgs=1)
    try:
        await bus.nc.publish(subject, payload, reply=reply)
        msg = await sub.next_msg(timeout=wait)
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
    if msg.headers and msg.headers.get(_STATUS) == _NO_RESPONDERS:
        raise nats.errors.NoRespondersError
    return msg


async def _attempt(bus: Bus, subject: str, payload: bytes, wait: float) -> Msg:
    """One request; a server refusal of the subject is raised instead of waiting it out."""
    request = asyncio.create_task(_ask(bus, subject, payload, wait))
    # A refusal arrives only through the error callback; race it against the reply.
    denied = asyncio.create_task(bus.wait_denied(subject, wait + 1.0))
    try:
        await asyncio.wait({request, denied}, return_when=asyncio.FIRST_COMPLETED)
        if not request.done() and denied.exception() is None:
            raise denied.result()
        return await request
    except nats.errors.ConnectionClosedError as exc:
        raise ConnectionFailedError(f"cannot send to {subject}: connection closed") from exc
    finally:
        for task in (request, denied):
            task.cancel()
        await asyncio.gather(request, denied, return_exceptions=True)
