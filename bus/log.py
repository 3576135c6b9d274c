"""Reading the log: one filtered slice of a stream, from its start, in order.

A :class:`Tail` is an ephemeral ordered consumer that acknowledges nothing and vanishes
on its own when its reader goes away. The server pushes under flow control and the
reader takes each message off the connection as it comes, so large events (up to the
server's max_payload each) are read whole: a pull of 1,024 one-megabyte events at once
got the reader cut off as a slow consumer ("unexpected EOF") and lost events. An ordered
consumer also notices a gap in delivery and resumes after the last message it had.
"Caught up" is known from the consumer's count of pending messages, not guessed from a
quiet period, so reading a slice that is empty costs one round trip, not a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import api

from bus.connection import Bus
from bus.errors import ConnectionFailedError, FleetTimeoutError
from bus.retry import Backoff
from bus.subjects import consumer_create_subject
from bus.tasks import wait_any
from schemas.ids import new_id

logger = logging.getLogger(__name__)

_READ_ALL_S = 30.0
"""How long :func:`read_log` may take to reach the newest message it was told of."""

_BATCH = 1024
_HEARTBEAT_S = 5.0
_BUFFER_BYTES = 64 * 1024 * 1024
"""The client library's own buffer, before a message reaches :meth:`Tail.fetch`'s."""
_READ_AHEAD_BYTES = 8 * 1024 * 1024
"""What a reader takes ahead of what it has fetched before it holds the server back."""
_INACTIVE_S = 10.0
"""How long the server keeps a reader's consumer once nobody listens."""
_QUIET_S = 3 * _HEARTBEAT_S
"""Silence (no message, no heartbeat) after which a reader counts as lost."""
_STATUS, _STALLED = "Status", "Nats-Consumer-Stalled"
_DELIVERY = "$JS.ACK."
"""How a delivery's reply subject starts (it says where in the log the message is). Only
the server sends one: it refuses a client's message with such a reply."""
_FLOW_CONTROL = "$JS.FC."
"""Where the server asks flow-control answers to go (and nowhere else)."""


def not_a_delivery(
    subject: str, status: str | None, answer: str | None
) -> tuple[str | None, str | None]:
    """What a reader does with a message that is no delivery of its consumer, given its
    status header and where it asks to be answered: ``(subject to answer on, None)`` for
    a flow-control request or a heartbeat that says the server stalled, ``(None, None)``
    for a plain heartbeat, else ``(None, why the read breaks)``. A message someone else
    slipped into the inbox would be believed if it were counted as the log, or answered
    wherever it says (any subject its reader may publish to)."""
    if status == "100":
        if answer and not answer.startswith(_FLOW_CONTROL):
            return None, f"a flow-control request to answer on {answer!r}, not the server's"
        return answer, None
    if status:
        return None, f"the server ended the reader (status {status})"
    return None, f"a message on {subject!r} that is not a delivery of the reader"


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One stored message."""

    seq: int
    subject: str
    data: bytes
    headers: dict[str, str]
    stored_ns: int | None = None
    """When the log stored it, where the reader was told."""


async def create_reader(
    bus: Bus, stream: str, subject: str, name: str, inbox: str, *, start_seq: int = 0
) -> None:
    """Create a reader's consumer: pushed to ``inbox`` (already listened on), acknowledging
    nothing, in memory, gone once nobody listens for :data:`_INACTIVE_S`.

    Raises:
        ConnectionFailedError: the stream does not exist or the bus is down.
        PermissionDeniedError: the server refused the create subject.
        FleetTimeoutError: the server did not answer.
    """
    config = api.ConsumerConfig(
        name=name,
        filter_subject=subject,
        deliver_subject=inbox,
        ack_policy=api.AckPolicy.NONE,
        deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE if start_seq else api.DeliverPolicy.ALL,
        opt_start_seq=start_seq or None,
        flow_control=True,
        idle_heartbeat=_HEARTBEAT_S,
        inactive_threshold=_INACTIVE_S,
        mem_storage=True,
        num_replicas=1,
    )
    try:
        await bus.js.add_consumer(stream, config=config)
    except nats.js.errors.NotFoundError:
        raise ConnectionFailedError(
            f"stream {stream} does not exist; run `fleet ops init`"
        ) from None
    except nats.errors.TimeoutError as exc:
        refusal = bus.denial(
            consumer_create_subject(stream, name, subject, domain=bus.settings.js_domain)
        )
        if refusal is not None:
            raise refusal from exc
        raise FleetTimeoutError(f"no answer creating a reader on {stream}") from exc
    except (nats.errors.Error, OSError) as exc:
        raise ConnectionFailedError(f"cannot read {stream}: {exc}") from exc


class Tail:
    """Follows the messages of ``subject`` in ``stream`` from the first (or ``start_seq``).

    The consumer is created through the named, filtered create subject
    (``$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>``): the only form a reader's
    permissions allow, because the unnamed form takes the consumer's name from the request
    body and would let any reader rewrite an agent's durable consumer. nats-py's ordered
    consumer uses the unnamed form, so ordering, heartbeats and flow control are kept
    here: a gap in the consumer's delivery sequence, or a reader that goes quiet (no
    message and no heartbeat), breaks the tail, and :func:`follow` opens a new one after
    the last message it had.
    """

    def __init__(self, bus: Bus, stream: str, subject: str) -> None:
        self._bus = bus
        self.stream = stream
        self.subject = subject
        self.name = f"tail_{new_id()}"
        self._sub: Subscription | None = None
        self.last_seq = 0
        self._behind: int | None = None  # messages after the last one read, as it said
        self._delivered = 0  # the consumer's delivery sequence of the last message taken
        self._broken: str | None = None
        self._arrived: deque[Msg] = deque()
        self._buffered = 0  # bytes in _arrived
        self._more = asyncio.Event()
        self._room = asyncio.Event()
        self._heard = asyncio.get_running_loop().time()
        self._reconnects = bus.reconnects

    @classmethod
    async def open(cls, bus: Bus, stream: str, subject: str, *, start_seq: int = 0) -> Tail:
        """Create the consumer.

        Raises:
            ConnectionFailedError: the stream does not exist or the bus is down.
            FleetTimeoutError: the server did not answer.
        """
        tail = cls(bus, stream, subject)
        try:
            inbox = bus.nc.new_inbox()
            # Subscribed before the consumer exists, so its first push has somewhere to go.
            tail._sub = await bus.nc.subscribe(
                inbox, cb=tail._on_msg, pending_bytes_limit=_BUFFER_BYTES
            )
            await create_reader(bus, stream, subject, tail.name, inbox, start_seq=start_seq)
        except BaseException as exc:
            await tail.close()
            if isinstance(exc, (nats.errors.Error, OSError)):
                raise ConnectionFailedError(f"cannot read {stream}: {exc}") from exc
            raise
        return tail

    async def _on_msg(self, msg: Msg) -> None:
        if self._sub is None:
            return
        self._heard = asyncio.get_running_loop().time()
        if not (msg.reply or "").startswith(_DELIVERY):
            await self._on_other(msg)
            return
        while self._buffered > _READ_AHEAD_BYTES and self._sub is not None:
            self._room.clear()
            await self._room.wait()
        self._arrived.append(msg)
        self._buffered += len(msg.data)
        self._more.set()

    async def _on_other(self, msg: Msg) -> None:
        """What is not a delivery: the server's status messages, or a message someone
        else slipped into the inbox (see :func:`not_a_delivery`)."""
        headers = msg.headers or {}
        answer, broken = not_a_delivery(
            msg.subject, headers.get(_STATUS), msg.reply or headers.get(_STALLED)
        )
        if broken is not None:
            self._broken = broken
            self._more.set()
        elif answer:
            # Answered in order, after the messages before it were taken: a reader slower
            # than the server holds it back this way.
            with contextlib.suppress(nats.errors.Error, OSError):
                await self._bus.nc.publish(answer, b"")

    async def fetch(self, batch: int = _BATCH, timeout: float = 1.0) -> list[LogRecord]:
        """The next messages (at most ``batch``), waiting up to ``timeout`` for the first;
        [] if none came.

        Raises:
            ConnectionFailedError: the reader broke (a gap in delivery, the consumer lost
                with the server, a closed connection); open a new one after
                :attr:`last_seq`.
        """
        assert self._sub is not None
        if not self._arrived:
            await self._check()
            self._more.clear()
            try:
                async with asyncio.timeout(timeout):
                    await self._more.wait()
            except TimeoutError:
                await self._check()
                return []
        records: list[LogRecord] = []
        while self._arrived and len(records) < batch:
            msg = self._arrived.popleft()
            self._buffered -= len(msg.data)
            self._room.set()
            meta = msg.metadata
            if meta.sequence.consumer != self._delivered + 1:
                self._arrived.clear()
                self._broken = (
                    f"delivery skipped from {self._delivered} to {meta.sequence.consumer}"
                )
                break
            self._delivered = meta.sequence.consumer
            self.last_seq = meta.sequence.stream
            self._behind = meta.num_pending
            records.append(LogRecord(self.last_seq, msg.subject, msg.data, dict(msg.headers or {})))
        if not records and self._broken:
            await self._check()
        return records

    async def _check(self) -> None:
        """Raise if this reader can no longer deliver what follows."""
        if self._broken:
            raise ConnectionFailedError(f"reading {self.stream}: {self._broken}")
        if self._bus.nc.is_closed:
            raise ConnectionFailedError(f"reading {self.stream}: the connection is closed")
        quiet = asyncio.get_running_loop().time() - self._heard
        if quiet > _QUIET_S:
            raise ConnectionFailedError(
                f"reading {self.stream}: nothing heard for {quiet:.0f}s (the reader is lost)"
            )
        if self._bus.reconnects != self._reconnects:
            # A restarted server forgets a memory consumer: ask rather than wait it out.
            self._reconnects = self._bus.reconnects
            await self.pending()

    async def pending(self) -> int:
        """Messages stored but not yet read."""
        assert self._sub is not None
        try:
            info = await self._bus.js.consumer_info(self.stream, self.name)
        except nats.js.errors.NotFoundError:
            raise ConnectionFailedError(f"reading {self.stream}: the reader is gone") from None
        except nats.errors.TimeoutError as exc:
            raise FleetTimeoutError(f"reading {self.stream}: no answer") from exc
        except (nats.errors.Error, OSError) as exc:
            raise ConnectionFailedError(f"reading {self.stream}: {exc}") from exc
        return int(info.num_pending or 0) + self._sub.pending_msgs + len(self._arrived)

    async def read_available(self) -> list[LogRecord]:
        """Everything stored now that has not been read yet."""
        out: list[LogRecord] = []
        # Each message says how many follow it; only when that is unknown ask the server.
        while (self._behind if self._behind is not None else await self.pending()) > 0:
            batch = await self.fetch(timeout=2.0)
            if not batch:
                self._behind = None
            out.extend(batch)
        self._behind = None  # later reads must look again: the log may have grown
        return out

    async def caught_up(self) -> bool:
        """Whether everything stored before the last message read has been read.

        Each message says how many followed it when it was sent; before the first, the
        server is asked.
        """
        behind = self._behind if self._behind is not None else await self.pending()
        return behind == 0

    async def close(self) -> None:
        """Stop reading. The consumer goes away by itself once nobody listens (operators
        may not delete consumers)."""
        if self._sub is not None:
            sub, self._sub = self._sub, None
            self._room.set()  # a delivery waiting for room ends
            with contextlib.suppress(nats.errors.Error, OSError):
                await sub.unsubscribe()

    async def __aenter__(self) -> Tail:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def read_log(
    bus: Bus, stream: str, subject: str, *, timeout: float = _READ_ALL_S
) -> list[LogRecord]:
    """Every message of ``subject`` stored in ``stream`` now, in order.

    The newest message on ``subject`` is looked up first and the read goes on until it
    has arrived: a reader made just after a stream leader changed can report nothing
    pending for a moment, and a short answer here would be a silently short log.

    Raises:
        FleetTimeoutError: the messages up to the newest could not be read in ``timeout``.
        ConnectionFailedError: the stream does not exist or the bus is down.
    """
    # From the leader: the newest it holds is what the reader below will be served.
    newest = await last_message(bus, stream, subject, direct=False)
    if newest is None:
        return []
    async with await Tail.open(bus, stream, subject) as tail:
        out = await tail.read_available()
        try:
            async with asyncio.timeout(timeout):
                while not out or out[-1].seq < newest.seq:
                    out.extend(await tail.fetch(timeout=2.0))
        except TimeoutError:
            got = out[-1].seq if out else 0
            raise FleetTimeoutError(
                f"reading {subject} from {stream}: up to seq {got} of {newest.seq} in {timeout:g}s"
            ) from None
    return out


async def last_message(
    bus: Bus, stream: str, subject: str, *, timeout: float = 5.0, direct: bool = True
) -> LogRecord | None:
    """The last message stored on ``subject`` (a direct get, any replica answers; else
    from the stream leader), or None if there is none.

    Raises:
        FleetTimeoutError: no answer in ``timeout`` seconds (a server outage, an election).
        ConnectionFailedError: the stream does not exist or the connection is gone.
    """
    try:
        async with asyncio.timeout(timeout):
            raw = await bus.js.get_last_msg(stream, subject, direct=direct)
    except nats.js.errors.NotFoundError:
        return None
    except (TimeoutError, nats.errors.TimeoutError) as exc:
        raise FleetTimeoutError(f"no answer reading the last of {subject}") from exc
    except (nats.errors.Error, OSError) as exc:
        raise ConnectionFailedError(f"reading the last of {subject}: {exc}") from exc
    stored_ns = int(raw.time.timestamp() * 1e9) if raw.time else None
    return LogRecord(
        int(raw.seq or 0),
        raw.subject or subject,
        raw.data or b"",
        dict(raw.headers or {}),
        stored_ns,
    )


async def last_seq(bus: Bus, stream: str) -> int:
    """The sequence of the newest message in ``stream`` (0 when it is empty).

    Raises:
        ConnectionFailedError: the stream does not exist or the bus is down.
        FleetTimeoutError: the server did not answer.
    """
    try:
        info = await bus.js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        raise ConnectionFailedError(
            f"stream {stream} does not exist; run `fleet ops init`"
        ) from None
    except nats.errors.TimeoutError as exc:
        raise FleetTimeoutError(f"no answer about {stream}") from exc
    except (nats.errors.Error, OSError) as exc:
        raise ConnectionFailedError(f"cannot read {stream}: {exc}") from exc
    return int(info.state.last_seq)


@dataclass(frozen=True, slots=True)
class Batch:
    """What :func:`follow` read at once: records in order (maybe none), and whether the
    reader has caught up with what was stored when it last asked."""

    records: list[LogRecord]
    caught_up: bool


_FOLLOW_BACKOFF = Backoff(initial=0.5, cap=10.0)


async def follow(
    bus: Bus,
    stream: str,
    subject: str,
    *,
    start_seq: int = 0,
    wait_s: float = 1.0,
    stop: asyncio.Event | None = None,
    batch: int = _BATCH,
    opened: Tail | None = None,
) -> AsyncIterator[Batch]:
    """Every message of ``subject`` in ``stream`` from ``start_seq`` (0: the first) on, in
    order, for as long as the caller iterates (or until ``stop`` is set).

    A batch comes as soon as messages do, and an empty one after ``wait_s`` without any,
    so the caller can look at its own flags. A reader lost with the connection (a
    server restart, a timeout) is opened again after a growing pause, from the message
    after the last one yielded: nothing is skipped and nothing repeated. ``opened`` is a
    reader the caller opened already (to be sure nothing stored after that moment is
    missed); it is used first, and closed with the iteration.
    """
    next_seq, attempt, tail = start_seq, 0, opened
    while stop is None or not stop.is_set():
        try:
            if tail is None:
                tail = await Tail.open(bus, stream, subject, start_seq=next_seq)
            async with tail:
                attempt = 0
                if await tail.caught_up():
                    yield Batch([], True)  # nothing stored past the start: say so now
                while stop is None or not stop.is_set():
                    records = await tail.fetch(batch=batch, timeout=wait_s)
                    if records:
                        next_seq = records[-1].seq + 1
                    yield Batch(records, await tail.caught_up())
        except (ConnectionFailedError, FleetTimeoutError) as exc:
            if stop is not None and stop.is_set():
                return  # a read cut short by stopping is no failure
            delay = _FOLLOW_BACKOFF.delay(attempt)
            attempt += 1
            logger.warning(
                "! reading %s from seq %d: %s; again in %.1fs", subject, next_seq, exc, delay
            )
            if stop is not None:
                await wait_any(stop, timeout=delay)
            else:
                await asyncio.sleep(delay)  # a pause before trying again, not a poll
        tail = None
