"""Catching up on one filtered slice of the log through a short-lived consumer.

The consumer is created through the filtered create subject
(``$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>``, see
:func:`bus.subjects.consumer_create_subject`) with one ``filter_subject``, so a server
permission on that subject pins its name and its filter: an agent can read only its own
subjects this way. It is read to the end with no-wait pulls, acknowledges nothing, and
is deleted when the read ends; ``inactive_threshold`` removes it should its reader die
first. Nothing of it stays on the server while its reader is idle, so a fleet costs the
server consumers only while agents are catching up, not one or two per agent for ever.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator
from typing import Any

import nats.errors
from nats.aio.msg import Msg

from bus.connection import Bus
from bus.errors import ConnectionFailedError, FleetError, FleetTimeoutError, UsageError
from bus.log import LogRecord
from bus.subjects import (
    consumer_create_subject,
    consumer_delete_subject,
    consumer_next_subject,
)
from bus.tasks import cancel_kept

logger = logging.getLogger(__name__)

_STATUS = "Status"
_ERR_STREAM_NOT_FOUND = 10059
_ERR_CONSUMER_EXISTS = (10013, 10148)  # name in use; in use with another configuration
_API_TIMEOUT_S = 5.0
BATCH = 256
INACTIVE_S = 30.0
"""How long the server keeps a catch-up consumer nobody reads (its reader died)."""


class CatchUp:
    """Reads ``filter_subject`` of ``stream`` from a sequence to the end, once.

    ``name`` is fixed per reader (an agent's permission names it), so one reader runs at
    a time; a consumer of that name left behind by a crash is replaced.
    """

    def __init__(self, bus: Bus, stream: str, name: str, filter_subject: str) -> None:
        self.bus = bus
        self.stream = stream
        self.name = name
        self.filter_subject = filter_subject

    @property
    def create_subject(self) -> str:
        return consumer_create_subject(
            self.stream, self.name, self.filter_subject, domain=self.bus.settings.js_domain
        )

    def _config(self, start_seq: int) -> dict[str, Any]:
        config: dict[str, Any] = {
            "name": self.name,
            "filter_subject": self.filter_subject,
            "deliver_policy": "all",
            "ack_policy": "none",
            "inactive_threshold": int(INACTIVE_S * 1e9),
            "mem_storage": True,
            "num_replicas": 1,
        }
        if start_seq > 1:
            config["deliver_policy"] = "by_start_sequence"
            config["opt_start_seq"] = start_seq
        return config

    async def read(
        self, start_seq: int, batch: int = BATCH
    ) -> AsyncGenerator[list[LogRecord], None]:
        """The stored messages from ``start_seq`` on, in order, in batches, until none is
        left; the consumer is deleted when the iteration ends (however it ends).

        Raises:
            PermissionDeniedError: the server refused the create subject to us.
            UsageError: the stream does not exist.
            FleetError: the server refused the consumer.
            FleetTimeoutError, ConnectionFailedError: no answer, or no connection.
        """
        inbox = self.bus.nc.new_inbox()
        queue: asyncio.Queue[Msg] = asyncio.Queue()
        try:
            sub = await self.bus.nc.subscribe(f"{inbox}.*", cb=queue.put)
        except (nats.errors.Error, OSError) as exc:
            raise ConnectionFailedError(f"cannot subscribe to {inbox}: {exc}") from exc
        try:
            await self._create(start_seq)
            pulls = 0
            while True:
                pulls += 1
                records, more = await self._pull(queue, f"{inbox}.{pulls}", batch)
                if records:
                    yield records
                if not more:
                    return
        finally:
            try:
                await sub.unsubscribe()
            except (nats.errors.Error, OSError) as exc:
                logger.debug("unsubscribe %s: %s", inbox, exc)
            await self._delete()

    async def _create(self, start_seq: int) -> None:
        config = self._config(start_seq)
        request = {"stream_name": self.stream, "config": config, "action": "create"}
        for attempt in (1, 2):
            reply = await self._api(self.create_subject, json.dumps(request).encode())
            error = reply.get("error")
            code = error.get("err_code") if error is not None else None
            # The same config finds a consumer left by a reader that died mid-read, with
            # its place moved on: never read from there.
            stale = error is None and (reply.get("delivered") or {}).get("consumer_seq", 0) > 0
            if error is None and not stale:
                return
            if code == _ERR_STREAM_NOT_FOUND:
                raise UsageError(f"stream {self.stream} does not exist; run `fleet ops init`")
            if (stale or code in _ERR_CONSUMER_EXISTS) and attempt == 1:
                logger.info("catch-up consumer %s left over; replacing it", self.name)
                await self._delete()
                continue
            assert error is not None
            raise FleetError(f"the server refused consumer {self.name}: {error.get('description')}")

    async def _delete(self) -> None:
        """Best effort: what is not deleted goes after ``INACTIVE_S`` by itself."""
        try:
            domain = self.bus.settings.js_domain
            await self._api(consumer_delete_subject(self.stream, self.name, domain=domain), b"")
        except FleetError as exc:
            logger.debug("deleting catch-up consumer %s: %s", self.name, exc)

    async def _pull(
        self, queue: asyncio.Queue[Msg], reply: str, batch: int
    ) -> tuple[list[LogRecord], bool]:
        """One no-wait pull: the records it brought, and whether more may follow."""
        request = {"batch": batch, "no_wait": True}
        try:
            await self.bus.nc.publish(
                consumer_next_subject(self.stream, self.name, domain=self.bus.settings.js_domain),
                json.dumps(request).encode(),
                reply=reply,
            )
        except (nats.errors.Error, OSError) as exc:
            raise ConnectionFailedError(f"pull from {self.name}: {exc}") from exc
        records: list[LogRecord] = []
        while len(records) < batch:
            try:
                async with asyncio.timeout(_API_TIMEOUT_S):
                    msg = await queue.get()
            except TimeoutError:
                raise FleetTimeoutError(f"no answer reading {self.filter_subject}") from None
            status = (msg.headers or {}).get(_STATUS)
            if status is None and msg.reply:
                meta = msg.metadata
                stored_ns = int(meta.timestamp.timestamp() * 1e9) if meta.timestamp else None
                headers = dict(msg.headers or {})
                seq = meta.sequence.stream
                records.append(LogRecord(seq, msg.subject, msg.data, headers, stored_ns))
                continue
            if msg.subject != reply:
                continue  # the end of an earlier pull
            if status in ("404", "408"):
                return records, False  # no messages (left): caught up
            raise ConnectionFailedError(
                f"reading {self.filter_subject}: the server said {status} "
                f"{(msg.headers or {}).get('Description', '')}"
            )
        return records, True

    async def _api(self, subject: str, payload: bytes) -> dict[str, Any]:
        try:
            with cancel_kept():
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
