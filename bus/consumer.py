"""A durable pull consumer that holds its filter and survives being deleted.

Created through the filtered create subject (``$JS.API.CONSUMER.CREATE.<stream>.<name>.
<filter>``, see :func:`bus.subjects.consumer_create_subject`) with one
``filter_subject``, so a server permission on that subject pins what the consumer may
read: its owner cannot widen it.

Fetching is a pull request with idle heartbeats, read from our own inbox, so that
"nothing to do" (no message, heartbeats arrive) is told apart from "the consumer is
gone" (the server says ``409 Consumer Deleted``, or nothing at all answers). A consumer
found gone is created again, from where its reader had got to, and the log says so.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from bus.connection import Bus
from bus.errors import ConnectionFailedError, FleetError, FleetTimeoutError, UsageError
from bus.subjects import consumer_create_subject, consumer_info_subject, consumer_next_subject

logger = logging.getLogger(__name__)

_STATUS = "Status"
_DESCRIPTION = "Description"
_ERR_CONSUMER_NOT_FOUND = 10014
_ERR_CONSUMER_EXISTS = 10148  # exists with another configuration
_ERR_STREAM_NOT_FOUND = 10059
_API_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class ConsumerSpec:
    """What a durable consumer is: its stream, name, single filter and ack rules."""

    stream: str
    name: str
    filter_subject: str
    ack_wait_s: float = 60.0
    max_ack_pending: int = 1000

    def config(self, start_seq: int | None = None) -> dict[str, Any]:
        config: dict[str, Any] = {
            "durable_name": self.name,
            "name": self.name,
            "filter_subject": self.filter_subject,
            "deliver_policy": "all",
            "ack_policy": "explicit",
            "ack_wait": int(self.ack_wait_s * 1e9),
            "max_deliver": -1,
            "max_ack_pending": self.max_ack_pending,
        }
        if start_seq:
            config["deliver_policy"] = "by_start_sequence"
            config["opt_start_seq"] = start_seq
        return config


class Delivery:
    """One message a durable consumer delivered. Settle it with exactly one of
    :meth:`ack`, :meth:`nak` or :meth:`term`; a lost connection while settling is
    logged, not raised (the server redelivers after ``ack_wait``)."""

    def __init__(self, msg: Msg, owner: DurableConsumer) -> None:
        self._msg = msg
        self._owner = owner
        meta = msg.metadata
        self.subject: str = msg.subject
        self.data: bytes = msg.data
        self.stream_seq: int = meta.sequence.stream
        self.delivered: int = meta.num_delivered or 1
        self.stored_ns: int | None = (
            int(meta.timestamp.timestamp() * 1e9) if meta.timestamp else None
        )

    async def _settle(self, what: str, payload: bytes, settled: bool = True) -> None:
        if settled:
            self._owner._settled(self.stream_seq)
        try:
            await self._owner.bus.nc.publish(self._msg.reply, payload)
        except (nats.errors.Error, OSError) as exc:
            logger.debug("%s of stream seq %d: %s", what, self.stream_seq, exc)

    async def ack(self) -> None:
        """Done with it: never deliver it again."""
        await self._settle("ack", b"+ACK")

    async def nak(self, delay_s: float = 0.0) -> None:
        """Not now: deliver it again after ``delay_s`` seconds."""
        payload = b"-NAK"
        if delay_s > 0:
            payload += b" " + json.dumps({"delay": int(delay_s * 1e9)}).encode()
        await self._settle("nak", payload, settled=False)

    async def term(self) -> None:
        """Never deliver it again: it cannot be processed."""
        await self._settle("term", b"+TERM")


class DurableConsumer:
    """One durable pull consumer. :meth:`ensure` it, then :meth:`fetch` in a loop."""

    def __init__(self, bus: Bus, spec: ConsumerSpec, *, heartbeat_s: float = 5.0) -> None:
        self.bus = bus
        self.spec = spec
        self.heartbeat_s = heartbeat_s
        self.recreated = 0
        """How many times it was found deleted and created again."""
        self._inbox = bus.nc.new_inbox()
        self._queue: asyncio.Queue[Msg] = asyncio.Queue()
        self._sub: Subscription | None = None
        self._pulls = 0
        self._held: list[Msg] = []
        self._last_delivered = 0
        self._unsettled: set[int] = set()

    @property
    def create_subject(self) -> str:
        return consumer_create_subject(self.spec.stream, self.spec.name, self.spec.filter_subject)

    async def ensure(self, start_seq: int | None = None) -> None:
        """Create the consumer, or find it as it is.

        Raises:
            PermissionDeniedError: the server refused the create subject to us.
            UsageError: the stream does not exist.
            FleetError: the server refused the consumer.
            FleetTimeoutError, ConnectionFailedError: no answer, or no connection.
        """
        request = {
            "stream_name": self.spec.stream,
            "config": self.spec.config(start_seq),
            "action": "create",
        }
        reply = await self._api(self.create_subject, json.dumps(request).encode())
        error = reply.get("error")
        if error is not None:
            code = error.get("err_code")
            if code == _ERR_CONSUMER_EXISTS:
                # Made earlier with other settings (by an older version): it is ours, use it.
                logger.info("consumer %s exists with other settings; using it", self.spec.name)
            elif code == _ERR_STREAM_NOT_FOUND:
                raise UsageError(
                    f"stream {self.spec.stream} does not exist; run `fleet ops init` first"
                )
            else:
                raise FleetError(
                    f"the server refused consumer {self.spec.name}: {error.get('description')}"
                )
        if self._sub is None:
            try:
                self._sub = await self.bus.nc.subscribe(f"{self._inbox}.*", cb=self._queue.put)
            except (nats.errors.Error, OSError) as exc:
                raise ConnectionFailedError(f"cannot subscribe to {self._inbox}: {exc}") from exc

    async def exists(self) -> bool:
        """Whether the server still has this consumer.

        Raises:
            FleetTimeoutError, ConnectionFailedError: the server did not say.
        """
        reply = await self._api(consumer_info_subject(self.spec.stream, self.spec.name), b"")
        error = reply.get("error")
        if error is None:
            return True
        if error.get("err_code") == _ERR_CONSUMER_NOT_FOUND:
            return False
        raise ConnectionFailedError(f"consumer {self.spec.name}: {error.get('description')}")

    async def _api(self, subject: str, payload: bytes) -> dict[str, Any]:
        try:
            msg = await self.bus.nc.request(subject, payload, timeout=_API_TIMEOUT_S)
        except nats.errors.TimeoutError:
            denial = self.bus.denial(subject)
            if denial is not None:
                raise denial from None
            raise FleetTimeoutError(f"no answer from the JetStream API on {subject}") from None
        except nats.errors.NoRespondersError:
            raise ConnectionFailedError("JetStream is not available on this server") from None
        except (nats.errors.Error, OSError) as exc:
            raise ConnectionFailedError(f"{subject}: {exc}") from exc
        try:
            reply: dict[str, Any] = json.loads(msg.data)
        except ValueError as exc:
            raise ConnectionFailedError(f"unreadable answer on {subject}") from exc
        return reply

    def _settled(self, seq: int) -> None:
        self._unsettled.discard(seq)

    def _resume_seq(self) -> int | None:
        """Where a recreated consumer starts: the oldest message not yet settled, else
        the one after the last delivered; None (from the start) if none was delivered."""
        if self._unsettled:
            return min(self._unsettled)
        return self._last_delivered + 1 if self._last_delivered else None

    async def recreate(self) -> None:
        """Create the consumer again after it was deleted, and say so.

        Raises:
            FleetError: as :meth:`ensure`.
        """
        start = self._resume_seq()
        await self.ensure(start)
        self.recreated += 1
        logger.warning(
            "! consumer %s of %s was deleted; created it again (from stream seq %s)",
            self.spec.name,
            self.spec.stream,
            start or "1",
        )

    async def fetch(self, batch: int, wait_s: float = 20.0) -> list[Delivery]:
        """Up to ``batch`` messages, waiting up to ``wait_s`` for the first; [] if none.

        What is there is taken at once (a no-wait pull); only when nothing is, one
        message is waited for (a lingering pull with idle heartbeats). A consumer found
        deleted is created again (see :meth:`recreate`).

        Raises:
            FleetTimeoutError, ConnectionFailedError: the server is away; try later.
        """
        assert self._sub is not None, "ensure() first"
        msgs = self._take_held(batch)
        if not msgs:
            gone = await self._pull(msgs, {"batch": batch, "no_wait": True}, _API_TIMEOUT_S)
            if not msgs and not gone:
                heartbeat = min(self.heartbeat_s, wait_s / 4)
                request = {
                    "batch": 1,
                    "expires": int(wait_s * 1e9),
                    "idle_heartbeat": int(heartbeat * 1e9),
                }
                gone = await self._pull(msgs, request, 2 * heartbeat + 1.0)
            if gone and not msgs and not await self.exists():
                await self.recreate()
        return [self._delivered(m) for m in msgs]

    def _take_held(self, batch: int) -> list[Msg]:
        while not self._queue.empty():
            msg = self._queue.get_nowait()
            if _is_delivery(msg):
                self._held.append(msg)  # a late delivery to an earlier pull: still ours
        taken, self._held = self._held[:batch], self._held[batch:]
        return taken

    async def _pull(self, msgs: list[Msg], request: dict[str, Any], silence_s: float) -> bool:
        """Send one pull request and read its answers into ``msgs``.

        Returns True when the consumer seems gone: the server said it was deleted,
        nothing serves it, or nothing at all (not even a heartbeat) came for
        ``silence_s`` seconds.
        """
        self._pulls += 1
        reply = f"{self._inbox}.{self._pulls}"
        try:
            await self.bus.nc.publish(
                consumer_next_subject(self.spec.stream, self.spec.name),
                json.dumps(request).encode(),
                reply=reply,
            )
        except (nats.errors.Error, OSError) as exc:
            raise ConnectionFailedError(f"pull from {self.spec.name}: {exc}") from exc
        while len(msgs) < request["batch"]:
            try:
                async with asyncio.timeout(silence_s):
                    msg = await self._queue.get()
            except TimeoutError:
                return not msgs
            if _is_delivery(msg):
                msgs.append(msg)
                continue
            if msg.subject != reply:
                continue  # the end of an earlier pull
            headers = msg.headers or {}
            status = headers.get(_STATUS, "")
            if status == "100":
                continue  # idle heartbeat: the consumer is there
            if status == "409" and "deleted" in headers.get(_DESCRIPTION, "").lower():
                return True
            # 503: no responders, nothing serves this consumer. 404 no messages,
            # 408 request expired, other 409s: this pull is over.
            return status == "503"
        return False

    def _delivered(self, msg: Msg) -> Delivery:
        delivery = Delivery(msg, self)
        self._last_delivered = max(self._last_delivered, delivery.stream_seq)
        self._unsettled.add(delivery.stream_seq)
        return delivery

    async def close(self) -> None:
        """Stop receiving (the consumer stays on the server)."""
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except (nats.errors.Error, OSError) as exc:
                logger.debug("unsubscribe %s: %s", self._inbox, exc)
            self._sub = None


def _is_delivery(msg: Msg) -> bool:
    """A stored message (acknowledgeable), not a status from the server."""
    return bool(msg.reply) and msg.reply.startswith("$JS.ACK.")
