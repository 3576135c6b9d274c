"""Reading a whole slice of the log at once, as fast as the socket brings it: replays.

The consumer is the one a :class:`~bus.log.Tail` makes (named, filter pinned by the
create subject, acknowledging nothing, in memory), created through the bus; only its
deliveries come over a :class:`~bus.wire.WireConnection` of their own, so a replay is
not held to nats-py's per-message cost. Order is checked as a Tail checks it: the
consumer's delivery sequence must go up by one, or the read fails rather than skip.
"Done" is known from the messages themselves: each says how many followed it when it
was sent, and the read ends at the first that says none did, once it has reached the
newest message the stream's leader named when the read began: a consumer made just after
a leader changed can say nothing is pending for a moment, and a replay that believed it
would come back silently short.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from bus.connection import Bus
from bus.errors import ConnectionFailedError, FleetTimeoutError
from bus.log import _FLOW_CONTROL, _HEARTBEAT_S, LogRecord, create_reader, last_message
from bus.wire import WireConnection, header_map, header_value, status_of
from schemas.ids import new_id

logger = logging.getLogger(__name__)

_QUIET_S = 3 * _HEARTBEAT_S
"""Silence (no message, no heartbeat) after which the reader counts as lost."""
_STALLED = "Nats-Consumer-Stalled"


def _position(reply: bytes) -> tuple[int, int, int, int] | None:
    """Stream sequence, delivery sequence, stored time (ns) and pending count, from a
    JetStream delivery's reply subject (its 9-token form, and the 11- or 12-token one
    with a domain and account), or None if it is not one."""
    tokens = reply.split(b".")
    if tokens[:2] != [b"$JS", b"ACK"] or len(tokens) not in (9, 11, 12):
        return None
    at = 5 if len(tokens) == 9 else 7
    try:
        return int(tokens[at]), int(tokens[at + 1]), int(tokens[at + 2]), int(tokens[at + 3])
    except ValueError:
        return None


async def read_bulk(
    bus: Bus, stream: str, subject: str, *, start_seq: int = 0
) -> AsyncIterator[list[LogRecord]]:
    """Every message of ``subject`` in ``stream`` from ``start_seq`` (0: the first) up to
    the newest when the read reaches it, in order, in batches as they arrive.

    Raises:
        ConnectionFailedError: the stream does not exist, the bus is down, or delivery
            broke (a gap, a message that is no delivery, the server ended the reader).
        FleetTimeoutError: nothing heard for a while (the reader is lost).
        PermissionDeniedError: the caller may not read ``subject``.
    """
    conn = await WireConnection.open(bus, f"{bus.settings.name} reader")
    try:
        inbox = bus.nc.new_inbox()
        conn.subscribe(inbox)
        await conn.flushed()  # listening before the consumer's first push
        name = f"bulk_{new_id()}"
        await create_reader(bus, stream, subject, name, inbox, start_seq=start_seq)
        # Asked after the consumer exists: a caller refused the reader hears that first.
        newest = await last_message(bus, stream, subject, direct=False)
        if newest is None or newest.seq < start_seq:
            return
        delivered = 0
        while True:
            try:
                async with asyncio.timeout(_QUIET_S):
                    deliveries = await conn.read()
            except TimeoutError:
                raise FleetTimeoutError(
                    f"reading {stream}: nothing heard for {_QUIET_S:.0f}s (the reader is lost)"
                ) from None
            records: list[LogRecord] = []
            done = False
            for subject_b, reply, headers, data in deliveries:
                # A delivery is known by its reply subject (the server refuses a client's
                # message with a $JS.ACK reply), not by its headers: a stored message is
                # data whatever its headers say.
                position = _position(reply)
                if position is None:
                    if not data and status_of(headers) is not None:
                        _answer_status(conn, reply, headers, stream)
                        continue
                    # Anyone allowed to publish to the inbox could slip in a message:
                    # reading on would count it as part of the log.
                    raise ConnectionFailedError(
                        f"reading {stream}: a message on {subject_b.decode()!r} that is not "
                        "a delivery of the reader"
                    )
                seq, dseq, stored_ns, pending = position
                if dseq != delivered + 1:
                    raise ConnectionFailedError(
                        f"reading {stream}: delivery skipped from {delivered} to {dseq}"
                    )
                delivered = dseq
                records.append(
                    LogRecord(seq, subject_b.decode(), data, header_map(headers), stored_ns)
                )
                if pending == 0 and seq >= newest.seq:
                    done = True
                    break
            await conn.drain()
            if records:
                yield records
            if done:
                return
    finally:
        conn.close()


def _answer_status(conn: WireConnection, reply: bytes, headers: bytes, stream: str) -> None:
    """A heartbeat or a flow-control request is answered; any other status ends the read."""
    status = status_of(headers)
    if status != "100":
        raise ConnectionFailedError(
            f"reading {stream}: the server ended the reader (status {status})"
        )
    # A flow-control request is answered on its reply; a heartbeat that says the server
    # stalled waiting for such an answer, on the subject it names.
    answer = reply.decode() or header_value(headers, _STALLED)
    if not answer:
        return
    if not answer.startswith(_FLOW_CONTROL):
        # Not the server's: a message slipped into the inbox would have the reader publish
        # wherever its user may (an event subject, a control subject).
        raise ConnectionFailedError(
            f"reading {stream}: a flow-control request to answer on {answer!r}, not the server's"
        )
    conn.publish(answer)


async def read_all(bus: Bus, stream: str, subject: str, *, start_seq: int = 0) -> list[LogRecord]:
    """Every message :func:`read_bulk` reads, as one list."""
    out: list[LogRecord] = []
    async for batch in read_bulk(bus, stream, subject, start_seq=start_seq):
        out.extend(batch)
    return out
