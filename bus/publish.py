"""Publishing to JetStream so that nothing is lost and nothing is stored twice.

Every event is published with ``Nats-Msg-Id`` set to its event id. When an
acknowledgement does not arrive (a slow server, a reconnect, a leader election), the
same bytes are published again with the same id: the stream's duplicate window turns a
retry of something already stored into a no-op (``duplicate=True`` in the ack), so a
retry can never store an event twice.

An event that must be the only one on its subject (a job's terminal outcome) is
published with ``Nats-Expected-Last-Subject-Sequence``: the server stores it only if
nothing is there yet. A retry of our own stored attempt then meets the same refusal as a
competitor's message would, so the refusal is resolved by reading the subject's last
message: our id means it was ours (a duplicate), another id means we lost
(:class:`~bus.errors.SubjectTakenError`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext

from bus.codec import DEFAULT_MAX_SIZE, HEADER_MSG_ID, encode_envelope, event_headers
from bus.errors import (
    BadMessageError,
    ConnectionFailedError,
    FleetError,
    PermissionDeniedError,
    PublishTimeoutError,
    StoreFullError,
    SubjectTakenError,
)
from bus.retry import Backoff
from bus.tasks import cancel_kept
from schemas import Envelope

logger = logging.getLogger(__name__)

DEFAULT_DEADLINE_S = 30.0
"""How long a publish keeps retrying in all: longer than a JetStream leader election."""
_ERR_WRONG_STREAM = 10060  # expected stream does not match
_ERR_TOO_LARGE = 10054  # message size exceeds maximum allowed
_ERR_WRONG_LAST_SEQUENCE = 10071
HEADER_EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
# JetStream's refusals for lack of storage: insufficient resources, storage resources
# exceeded (over max_file_store or the account's limit), and a failed store.
_ERR_STORE_FULL = (10023, 10047, 10077)
# A full disk is not refused, it is unanswered: nats-server 2.15 logs "no space left on
# device" and sends no acknowledgement, while its API keeps answering. That many silent
# publishes in a row, each with the stream answering an info request, say "full".
_SILENT_STORE_ATTEMPTS = 3
_SILENT_STORE_REASON = (
    "it answers requests but acknowledges no write (a full disk: its log says "
    "'no space left on device'; after freeing space, restart nats-server)"
)
_PROBE_TIMEOUT_S = 1.0


@dataclass(slots=True)
class PublishStats:
    """Counts for this process's metrics."""

    retries: int = 0
    """Publish attempts repeated because no stream answered (a reconnect, an election)."""


STATS = PublishStats()


@dataclass(frozen=True, slots=True)
class PublishResult:
    """Where the message was stored; ``duplicate`` when an earlier attempt had stored it."""

    stream: str
    seq: int
    duplicate: bool


async def publish_with_retry(
    js: JetStreamContext,
    subject: str,
    payload: bytes,
    *,
    msg_id: str,
    headers: dict[str, str] | None = None,
    stream: str | None = None,
    timeout: float = 2.0,
    deadline_s: float = DEFAULT_DEADLINE_S,
    attempts: int | None = None,
    backoff_initial_s: float = 0.1,
    backoff_max_s: float = 2.0,
    denied: Callable[[str], PermissionDeniedError | None] | None = None,
    expected_last_subject_seq: int | None = None,
) -> PublishResult:
    """Publish and wait for the stream's acknowledgement, retrying with the same id.

    Args:
        js: the JetStream context.
        subject: where to publish.
        payload: the encoded message.
        msg_id: the deduplication id (``Nats-Msg-Id``); must be the same on every retry.
        headers: further headers.
        stream: the stream it must land in (``Nats-Expected-Stream``).
        timeout: how long to wait for each acknowledgement.
        deadline_s: how long to keep trying in all.
        attempts: an optional cap on the number of tries.
        denied: looks up a refusal of ``subject`` by the server (see
            :meth:`bus.connection.Bus.denial`): the server reports those only through
            the error callback, so without it a forbidden publish looks like a timeout.
        expected_last_subject_seq: store only if the subject's last message has this
            sequence (0: the subject is empty); needs ``stream``.

    Raises:
        SubjectTakenError: ``expected_last_subject_seq`` did not hold and the subject's
            last message is not an earlier attempt of ours.
        StoreFullError: the server refused for lack of storage, or stays silent on
            writes while answering everything else (a full disk).
        PermissionDeniedError: the server refused this subject to this principal.
        PublishTimeoutError: no acknowledgement before the deadline (or the cap).
        ConnectionFailedError: the connection is closed for good.
        BadMessageError: the server refused the message itself (too large, wrong stream).
    """
    hdrs = dict(headers or {})
    hdrs[HEADER_MSG_ID] = msg_id
    if expected_last_subject_seq is not None:
        if stream is None:
            raise ValueError("expected_last_subject_seq needs the stream's name")
        hdrs[HEADER_EXPECTED_LAST_SUBJECT_SEQ] = str(expected_last_subject_seq)
    backoff = Backoff(backoff_initial_s, backoff_max_s)
    loop = asyncio.get_running_loop()
    give_up_at = loop.time() + deadline_s
    attempt = silent = 0
    while True:
        attempt += 1
        try:
            with cancel_kept():
                ack = await js.publish(
                    subject, payload, timeout=timeout, stream=stream, headers=hdrs
                )
        except (nats.errors.TimeoutError, nats.js.errors.NoStreamResponseError) as exc:
            refusal = denied(subject) if denied is not None else None
            if refusal is not None:
                raise refusal from exc
            # No stream answered: a reconnect or an election in progress. Same id again.
            # Unless the server answers everything but stores: then its store is full. A
            # "no responders" (no stream takes the subject) is not that silence.
            held = isinstance(exc, nats.errors.TimeoutError) and bool(stream)
            silent = silent + 1 if held and stream and await _answers(js, stream) else 0
            if silent >= _SILENT_STORE_ATTEMPTS:
                raise StoreFullError(subject, _SILENT_STORE_REASON, certain=False) from exc
            delay = backoff.delay(attempt)
            if attempt == attempts or loop.time() + delay >= give_up_at:
                raise PublishTimeoutError(subject, msg_id, attempt) from exc
            STATS.retries += 1
            logger.warning(
                "↻ publish %s (msg id %s) attempt %d: %s; retrying in %.2fs",
                subject,
                msg_id,
                attempt,
                type(exc).__name__,
                delay,
            )
            await asyncio.sleep(delay)
            continue
        except nats.errors.ConnectionClosedError as exc:
            raise ConnectionFailedError(f"cannot publish to {subject}: connection closed") from exc
        except nats.js.errors.APIError as exc:
            if exc.err_code == _ERR_WRONG_LAST_SEQUENCE and stream is not None:
                return await _resolve_taken(js, stream, subject, msg_id, exc)
            if exc.err_code in _ERR_STORE_FULL:
                raise StoreFullError(subject, exc.description or "no space") from exc
            if exc.err_code in (_ERR_WRONG_STREAM, _ERR_TOO_LARGE):
                raise BadMessageError(f"server refused {subject}: {exc.description}") from exc
            raise FleetError(f"server refused {subject}: {exc.description}") from exc
        return PublishResult(stream=ack.stream, seq=ack.seq, duplicate=bool(ack.duplicate))


async def _answers(js: JetStreamContext, stream: str) -> bool:
    """Whether the server answers a JetStream API request about ``stream`` promptly."""
    try:
        async with asyncio.timeout(_PROBE_TIMEOUT_S):
            await js.stream_info(stream)
    except (TimeoutError, nats.errors.Error, OSError):
        return False
    return True


async def _resolve_taken(
    js: JetStreamContext, stream: str, subject: str, msg_id: str, refusal: Exception
) -> PublishResult:
    """Tell our own earlier stored attempt from a competitor's message on ``subject``."""
    try:
        last = await js.get_last_msg(stream, subject, direct=True)
    except (nats.errors.Error, OSError) as exc:
        raise ConnectionFailedError(f"cannot read the last message on {subject}: {exc}") from exc
    seq = int(last.seq or 0)
    if (last.headers or {}).get(HEADER_MSG_ID) == msg_id:
        return PublishResult(stream=stream, seq=seq, duplicate=True)
    raise SubjectTakenError(subject, seq) from refusal


async def publish_event(
    js: JetStreamContext,
    envelope: Envelope,
    *,
    stream: str | None = None,
    timeout: float = 2.0,
    deadline_s: float = DEFAULT_DEADLINE_S,
    attempts: int | None = None,
    max_size: int = DEFAULT_MAX_SIZE,
    denied: Callable[[str], PermissionDeniedError | None] | None = None,
    expected_last_subject_seq: int | None = None,
) -> PublishResult:
    """Encode an envelope and publish it on its own subject, deduplicated by its id.

    Raises:
        SubjectTakenError: as :func:`publish_with_retry`.
        PayloadTooLargeError: the event is too large; nothing was sent.
        PublishTimeoutError, ConnectionFailedError, BadMessageError: as
            :func:`publish_with_retry`.
    """
    payload = encode_envelope(envelope, max_size)
    return await publish_with_retry(
        js,
        envelope.subject,
        payload,
        msg_id=envelope.id,
        headers=event_headers(envelope),
        stream=stream,
        timeout=timeout,
        deadline_s=deadline_s,
        attempts=attempts,
        denied=denied,
        expected_last_subject_seq=expected_last_subject_seq,
    )
