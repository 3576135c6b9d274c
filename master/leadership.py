"""Which master acts: the one holding the lease ``master.lease`` in KV ``<prefix>-locks``.

Every master folds the log; only the active one publishes, answers queries and logins,
and runs timers. The others are standbys with warm projections, waiting for the lease.
The lease is a KV entry with a per-message TTL (``lease_ttl_s``), renewed every third of
it. It fences: the active master counts the TTL from just *before* each write that took
or renewed it (the server counts from when it stored the write, later), and stops
publishing a margin before that count runs out, so it has stopped before the server can
expire the lease and a standby can take it. Each publish it makes is bounded by the same
deadline (:meth:`Leadership.check`).

Each master also says what it is in ``master.presence.<name>`` (same bucket, its own
TTL): active or standby, and how far it has folded the log.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import TYPE_CHECKING

from bus import BadMessageError, Bus, FleetError, decode_model, encode_model
from bus.command import fleetbus_version
from bus.errors import NotActiveError
from bus.lease import Lease, put_expiring
from bus.subjects import Subjects
from bus.tasks import first_of, wait_any
from schemas import MasterPresence
from schemas.presence import MasterRole

if TYPE_CHECKING:
    from master.controller import Master

logger = logging.getLogger(__name__)

_WATCH_S = 2.0
"""A standby re-reads the lease at least this often, should a change go unnoticed."""


class Leadership:
    """The master lease and this master's presence."""

    def __init__(self, master: Master) -> None:
        config = master.config
        self.master = master
        self.name = config.name
        self.ttl_s = float(config.lease_ttl_s)
        self.margin_s = max(1.0, self.ttl_s / 5)
        self.lease = Lease(
            master.bus,
            master.subjects.locks_bucket,
            Subjects.MASTER_LEASE_KEY,
            self.name,
            self.ttl_s,
        )
        self.active = False
        self.takeovers = 0
        """How many times this master became the active one."""
        self.started_at = time.time_ns()
        self._changed = asyncio.Event()

    @property
    def role(self) -> MasterRole:
        return "active" if self.active else "standby"

    def remaining(self) -> float:
        """Seconds this master may still publish (0 when it is not the active one)."""
        if not self.active:
            return 0.0
        left = self.lease.valid_until - self.margin_s - asyncio.get_running_loop().time()
        return max(0.0, left)

    def check(self) -> float:
        """The seconds left to publish in.

        Raises:
            NotActiveError: this master does not surely hold the lease now.
        """
        left = self.remaining()
        if left <= 0:
            raise NotActiveError(f"master {self.name} is not the active master")
        return left

    async def take(self, stop: asyncio.Event) -> bool:
        """Wait until this master holds the lease; False if ``stop`` came first."""
        attempt = 0
        while not stop.is_set():
            try:
                won = await first_of(stop.wait(), self.lease.acquire(_WATCH_S))
                if won is None or stop.is_set():
                    return False
                taken = bool(won.result())
            except FleetError as exc:
                attempt += 1
                refusal = self.master.bus.denial(self.lease.subject)
                if refusal is not None:
                    logger.error(
                        "! %s: this master may not take the master lease; regenerate the "
                        "server config (fleet ops server-config)",
                        refusal,
                    )
                else:
                    logger.warning("! cannot take the master lease: %s", exc)
                await wait_any(stop, timeout=min(_WATCH_S * attempt, self.ttl_s))
                continue
            if taken:
                self.active = True
                self.takeovers += 1
                self._changed.set()
                logger.warning("→ master %s is the active master", self.name)
                return True
        return False

    async def hold(self, stop: asyncio.Event) -> None:
        """Renew the lease until ``stop``; returns early when it was lost or could not be
        renewed in time (the caller must stop acting at once)."""
        while not await wait_any(stop, timeout=self.ttl_s / 3):
            left = self.remaining()
            if left <= 0:
                logger.error("! master lease not renewed in time: standing by")
                return
            try:
                async with asyncio.timeout(left):
                    renewed = await self.lease.renew()
            except (FleetError, TimeoutError) as exc:
                logger.warning("! renewing the master lease: %s", exc or "timed out")
                continue
            if not renewed:
                logger.error("! master lease lost to another master: standing by")
                return

    async def step_down(self) -> None:
        """Stop being the active master and free the lease if it is still ours."""
        was = self.active
        self.active = False
        self._changed.set()
        try:
            await self.lease.release()
        except FleetError as exc:
            logger.warning("! releasing the master lease: %s (it expires by itself)", exc)
        if was:
            logger.warning("← master %s stands by", self.name)

    def presence(self) -> MasterPresence:
        master = self.master
        return MasterPresence(
            name=self.name,
            role=self.role,
            seq=master.projection.seq,
            ready=master.ready.is_set(),
            version=fleetbus_version()[:64],
            host=socket.gethostname()[:255],
            pid=os.getpid(),
            config_hash=master.config.config_hash(),
            started_at=self.started_at,
            ts=time.time_ns(),
        )

    async def heartbeat(self, stop: asyncio.Event) -> None:
        """Write this master's presence every third of the TTL and at once when its
        role changes, until ``stop``; then delete it."""
        bus = self.master.bus
        bucket, key = bus.subjects.locks_bucket, Subjects.master_presence_key(self.name)
        while not stop.is_set():
            self._changed.clear()
            try:
                await put_expiring(bus, bucket, key, encode_model(self.presence()), self.ttl_s)
            except FleetError as exc:
                logger.warning("! master presence: %s", exc)
            await wait_any(stop, self._changed, timeout=self.ttl_s / 3)
        try:
            kv = await bus.kv(bucket)
            await kv.delete(key)
        except FleetError as exc:
            logger.warning("! clearing the master presence: %s", exc)


async def read_masters(bus: Bus) -> tuple[str | None, list[MasterPresence]]:
    """Who holds the master lease, and every master's presence (for ``status``).

    Raises:
        ConnectionFailedError: the bucket cannot be read.
    """
    bucket = bus.subjects.locks_bucket
    holder = await Lease(bus, bucket, Subjects.MASTER_LEASE_KEY, "", 1).holder_now()
    kv = await bus.kv(bucket)
    prefix = Subjects.master_presence_key("x")[:-1]
    masters = []
    for key in sorted(await kv.keys()):
        if not key.startswith(prefix):
            continue
        entry = await kv.get(key)
        if entry is None or not entry.value:
            continue
        try:
            masters.append(decode_model(entry.value, MasterPresence))
        except BadMessageError as exc:
            logger.warning("! %s: %s", key, exc)
    return holder, masters
