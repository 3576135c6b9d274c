"""Reading a whole slice of the log at once, as fast as the socket brings it: replays.

The consumer is the one a :class:`~bus.log.Tail` makes (named, filter pinned by the
create subject, acknowledging nothing, in memory), created through the bus; only its
deliveries come over a :class:`~bus.wire.WireConnection` of their own, so a replay is
not held to nats-py's per-message cost. Order is checked as a Tail checks it: the
consumer's delivery sequence must go up by one, or the read fails rather than skip.
The read ends at the newest message the stream's leader named once the consumer existed,
not when the consumer says nothing is pending: one made just after a leader changed can
say so for a moment, and a replay that believed it would come back silently short; and
a log written faster than it is read would never be "done".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator

from bus.connection import Bus
from bus.errors import ConnectionFailedError, FleetTimeoutError
from bus.log import (
    _HEARTBEAT_S,
    _READ_ALL_S,
    _STALLED,
    LogRecord,
    create_reader,
    last_message,
    not_a_delivery,
)
from bus.wire import WireConnection, header_map, header_value, status_of
from schemas.ids import new_id

logger = logging.getLogger(__name__)

_QUIET_S = 3 * _HEARTBEAT_S
"""Silence (no message, no heartbeat) after which the reader counts as lost."""


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
) -> AsyncGenerator[list[LogRecord], None]:
    """Every message of ``subject`` in ``stream`` from ``start_seq`` (0: the first) up to
    the newest stored when the read began, in order, in batches as they arrive.

    Raises:
        ConnectionFailedError: the stream does not exist, the bus is down, or delivery
            broke (a gap, a message that is no delivery, the server ended the reader).
        FleetTimeoutError: nothing heard for a while (the reader is lost), or the newest
            message was not delivered in :data:`_READ_ALL_S`.
        PermissionDeniedError: the caller may not read ``subject``.
    """
    conn = await WireConnection.open(bus, f"{bus.settings.name} reader")
    try:
        inbox = bus.nc.new_inbox()
        conn.subscribe(inbox)
        try:
            async with asyncio.timeout(bus.settings.request_timeout_s):
                await conn.flushed()  # listening before the consumer's first push
        except TimeoutError:
            raise FleetTimeoutError(f"reading {stream}: the server did not answer") from None
        name = f"bulk_{new_id()}"
        await create_reader(bus, stream, subject, name, inbox, start_seq=start_seq)
        # Asked after the consumer exists: a caller refused the reader hears that first,
        # and whatever the consumer serves includes this message.
        newest = await last_message(bus, stream, subject, direct=False)
        if newest is None or newest.seq < start_seq:
            return
        target, delivered, last = newest.seq, 0, 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _READ_ALL_S
        while True:
            try:
                async with asyncio.timeout(_QUIET_S):
                    deliveries = await conn.read()
            except TimeoutError:
                raise FleetTimeoutError(
                    f"reading {stream}: nothing heard for {_QUIET_S:.0f}s (the reader is lost)"
                ) from None
            records: list[LogRecord] = []
            for subject_b, reply, headers, data in deliveries:
                # A delivery is known by its reply subject (the server refuses a client's
                # message with a $JS.ACK reply), not by its headers: a stored message is
                # data whatever its headers say.
                position = _position(reply)
                if position is None:
                    answer, broken = not_a_delivery(
                        _text(subject_b),
                        None if data else status_of(headers),
                        _text(reply) or header_value(headers, _STALLED),
                    )
                    if broken is not None:
                        raise ConnectionFailedError(f"reading {stream}: {broken}")
                    if answer:
                        conn.publish(answer)
                    continue
                seq, dseq, stored_ns, _pending = position
                if dseq != delivered + 1:
                    raise ConnectionFailedError(
                        f"reading {stream}: delivery skipped from {delivered} to {dseq}"
                    )
                delivered, last = dseq, seq
                records.append(
                    LogRecord(seq, _text(subject_b), data, header_map(headers), stored_ns)
                )
                if seq >= target:
                    break
            await conn.drain()
            if records:
                deadline = loop.time() + _READ_ALL_S
                yield records
            if last >= target:
                return
            if loop.time() > deadline:
                # Nothing for a while short of the target: gone meanwhile (its age ran
                # out), or a reader that will not be served it.
                newest = await last_message(bus, stream, subject, direct=False)
                if newest is None or newest.seq <= last:
                    return
                raise FleetTimeoutError(
                    f"reading {subject} from {stream}: up to seq {last} of {target} "
                    f"in {_READ_ALL_S:g}s"
                )
    finally:
        conn.close()


def _text(raw: bytes) -> str:
    # Subjects are bytes on the wire; one that is not UTF-8 is shown, not fatal (the
    # envelope's own subject check then refuses the record).
    return raw.decode("utf-8", "replace")


async def read_all(bus: Bus, stream: str, subject: str, *, start_seq: int = 0) -> list[LogRecord]:
    """Every message :func:`read_bulk` reads, as one list."""
    out: list[LogRecord] = []
    async for batch in read_bulk(bus, stream, subject, start_seq=start_seq):
        out.extend(batch)
    return out
