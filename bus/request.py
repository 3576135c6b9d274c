"""Control requests with the operation model's retries: 1 s, 2 s, 4 s … capped at 60 s.

A request that gets no answer is retried after a growing pause, because the agent may
be restarting or the server electing a leader; a request the server refuses for lack of
permission is not retried, and says so instead of timing out.
"""

from __future__ import annotations

import asyncio
import logging

import nats.errors

from bus.codec import decode_model, encode_model
from bus.connection import Bus
from bus.errors import ConnectionFailedError, FleetError, FleetTimeoutError
from bus.retry import CONTROL_BACKOFF_CAP_S, Backoff
from bus.signing import Signer, sign_control
from schemas import ControlReply, ControlRequest

logger = logging.getLogger(__name__)

BACKOFF_CAP_S = CONTROL_BACKOFF_CAP_S

OP_TIMEOUTS_S: dict[str, float] = {
    "status": 5.0,
    "config-get": 5.0,
    "config-set": 10.0,
    "log": 10.0,
    "restart": 30.0,
}
"""How long each operation may take to answer; an op not listed gets 5 s."""


def retry_delays(attempts: int, first: float = 1.0, cap: float = BACKOFF_CAP_S) -> list[float]:
    """The pauses between ``attempts`` tries: 1, 2, 4 … seconds, never above ``cap``."""
    return list(Backoff(first, cap, jitter=False).delays(max(0, attempts - 1)))


async def control(
    bus: Bus,
    subject: str,
    args: dict[str, object] | None = None,
    *,
    timeout: float | None = None,
    attempts: int = 3,
    signer: Signer | None = None,
) -> ControlReply:
    """Send a control request and return the reply, retrying unanswered attempts.

    ``timeout`` bounds each attempt; by default the operation's own (``OP_TIMEOUTS_S``,
    by the subject's last token). Agents answer only requests signed by a key their
    trust file grants the operation: pass ``signer`` (each attempt is signed afresh).

    Raises:
        FleetTimeoutError: no answer after every attempt.
        PermissionDeniedError: the server refused the subject to this principal.
        BadMessageError: the answer is not a control reply.
        FleetError: the other side answered with an error.
    """
    if timeout is None:
        timeout = OP_TIMEOUTS_S.get(subject.rsplit(".", 1)[-1], 5.0)
    unsigned = ControlRequest(args=dict(args or {}))
    delays = retry_delays(attempts)
    for attempt in range(attempts):
        signed = sign_control(unsigned, subject, signer) if signer is not None else unsigned
        payload = encode_model(signed)
        request = asyncio.create_task(bus.nc.request(subject, payload, timeout=timeout))
        # A refusal arrives only through the error callback; race it against the reply.
        denied = asyncio.create_task(bus.wait_denied(subject, timeout + 1.0))
        try:
            await asyncio.wait({request, denied}, return_when=asyncio.FIRST_COMPLETED)
            if not request.done() and denied.exception() is None:
                raise denied.result()
            msg = await request
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
            if attempt + 1 == attempts:
                raise FleetTimeoutError(
                    f"no answer on {subject} after {attempts} attempts"
                ) from exc
            logger.info("↻ %s: %s; again in %gs", subject, type(exc).__name__, delays[attempt])
            await asyncio.sleep(delays[attempt])
            continue
        except nats.errors.ConnectionClosedError as exc:
            raise ConnectionFailedError(f"cannot send to {subject}: connection closed") from exc
        finally:
            for task in (request, denied):
                task.cancel()
            await asyncio.gather(request, denied, return_exceptions=True)
        reply = decode_model(msg.data, ControlReply)
        if not reply.ok:
            raise FleetError(reply.error or f"{subject} failed")
        return reply
    raise AssertionError("unreachable")
