"""A lease on a KV key: held by one holder at a time, expiring by itself if abandoned.

Taken with create-if-absent (``Nats-Expected-Last-Subject-Sequence``) and a per-message
TTL, renewed by rewriting the same revision, released by a delete of that revision. A
key whose last entry is a delete or the server's expiry marker counts as free (nats-py's
``create()`` does not recognise those markers, hence this module).
"""

from __future__ import annotations

import asyncio
import logging

import nats.errors
import nats.js.errors

from bus.connection import Bus
from bus.errors import ConnectionFailedError
from bus.subjects import Subjects
from bus.tasks import cancel_kept

logger = logging.getLogger(__name__)

_WRONG_LAST_SEQUENCE = (10071, 10164)
_FREE_OPERATIONS = ("DEL", "PURGE")


class Lease:
    """One named lease in a KV bucket (see :attr:`bus.subjects.Subjects.locks_bucket`)."""

    def __init__(self, bus: Bus, bucket: str, key: str, holder: str, ttl_s: float) -> None:
        self.bus = bus
        self.stream = Subjects.kv_stream(bucket)
        self.bucket = bucket
        self.key = key
        self.subject = Subjects.kv_key(bucket, key)
        self.holder = holder
        self.ttl_s = max(1.0, ttl_s)
        self.revision: int | None = None
        self.valid_until = 0.0
        """Event-loop time before which the lease is surely ours: the TTL counted from
        just before the write that took or renewed it (the server counts from when it
        stored that write, later)."""

    async def _free_revision(self) -> int | None:
        """The revision to replace if the key is free, None if someone holds it."""
        try:
            last = await self.bus.js.get_last_msg(self.stream, self.subject)
        except nats.js.errors.NotFoundError:
            return 0
        headers = last.headers or {}
        if headers.get("KV-Operation") in _FREE_OPERATIONS or "Nats-Marker-Reason" in headers:
            return int(last.seq or 0)
        return None

    async def _write(self, payload: bytes, expected: int, headers: dict[str, str]) -> int | None:
        hdrs = {"Nats-Expected-Last-Subject-Sequence": str(expected), **headers}
        try:
            with cancel_kept():
                ack = await self.bus.js.publish(self.subject, payload, headers=hdrs)
        except nats.js.errors.APIError as exc:
            if exc.err_code in _WRONG_LAST_SEQUENCE:
                return None  # someone else wrote first
            raise ConnectionFailedError(f"lease {self.key}: {exc.description}") from exc
        except (nats.errors.Error, OSError) as exc:
            raise ConnectionFailedError(f"lease {self.key}: {exc}") from exc
        return int(ack.seq)

    async def try_acquire(self) -> bool:
        """Take the lease if it is free; False if someone holds it."""
        expected = await self._free_revision()
        if expected is None:
            return False
        ttl = {"Nats-TTL": str(int(self.ttl_s))}
        sent = asyncio.get_running_loop().time()
        self.revision = await self._write(self.holder.encode(), expected, ttl)
        if self.revision is not None:
            self.valid_until = sent + int(self.ttl_s)
        return self.revision is not None

    async def holder_now(self) -> str | None:
        """Who holds the lease now (None: free)."""
        try:
            last = await self.bus.js.get_last_msg(self.stream, self.subject)
        except nats.js.errors.NotFoundError:
            return None
        except (nats.errors.Error, OSError) as exc:
            raise ConnectionFailedError(f"lease {self.key}: {exc}") from exc
        headers = last.headers or {}
        if headers.get("KV-Operation") in _FREE_OPERATIONS or "Nats-Marker-Reason" in headers:
            return None
        return bytes(last.data or b"").decode(errors="replace") or None

    async def acquire(self, wait_s: float) -> bool:
        """Take the lease, waiting up to ``wait_s`` for its holder to let go."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        kv = await self.bus.kv(self.bucket)
        while True:
            async with kv.watch(self.key) as changes:
                if await self.try_acquire():
                    return True
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return False
                try:
                    async with asyncio.timeout(remaining):
                        async for entry in changes:
                            if entry is not None and entry.deleted:
                                break
                except TimeoutError:
                    return await self.try_acquire()

    async def renew(self) -> bool:
        """Extend the lease; False if it was lost (expired and taken by another)."""
        if self.revision is None:
            return False
        ttl = {"Nats-TTL": str(int(self.ttl_s))}
        sent = asyncio.get_running_loop().time()
        self.revision = await self._write(self.holder.encode(), self.revision, ttl)
        if self.revision is not None:
            self.valid_until = sent + int(self.ttl_s)
        return self.revision is not None

    async def keep(self) -> None:
        """Renew every third of the TTL until cancelled, or until the lease is lost.

        A renewal the server cannot take (an outage) is logged and tried again at the
        next tick: the lease outlives a short outage, and expires by itself after a long one.
        """
        while True:
            await asyncio.sleep(self.ttl_s / 3)  # a timer, not a wait for an event
            try:
                if not await self.renew():
                    logger.error("lease %s was lost", self.key)
                    return
            except ConnectionFailedError as exc:
                logger.warning("renewing lease %s: %s", self.key, exc)

    async def release(self) -> None:
        self.valid_until = 0.0
        if self.revision is not None:
            await self._write(b"", self.revision, {"KV-Operation": "DEL"})
            self.revision = None


async def put_expiring(bus: Bus, bucket: str, key: str, value: bytes, ttl_s: float) -> None:
    """Write a KV key that the server deletes by itself ``ttl_s`` seconds later unless
    written again (a heartbeat).

    Raises:
        ConnectionFailedError: the server did not take the write.
    """
    headers = {"Nats-TTL": str(max(1, int(ttl_s)))}
    try:
        with cancel_kept():
            await bus.js.publish(Subjects.kv_key(bucket, key), value, headers=headers)
    except (nats.errors.Error, OSError) as exc:
        raise ConnectionFailedError(f"{bucket} {key}: {exc}") from exc
