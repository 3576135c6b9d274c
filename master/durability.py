"""What the master keeps besides its memory: snapshots and signed checkpoints.

A snapshot every ``snapshot_every`` events or ``snapshot_interval_s`` seconds lets a
restart replay only the tail; a checkpoint every ``checkpoint_every`` events or
``checkpoint_interval_s`` seconds records the chain (``audit.checkpoint`` in the log,
and the newest in KV ``fleet-config`` and in the witness file outside the store, so an
audit can tell a log that was cut short; see :mod:`master.witness`).
Both run as tasks owned by the master, never two of a kind at once.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from bus import FleetError
from bus.codec import pack
from bus.tasks import wait_any
from ledger.chain import CHECKPOINT_KEY
from ledger.snapshot import save_snapshot
from master.witness import Witness
from schemas import AuditCheckpoint

if TYPE_CHECKING:
    from ledger.driver import Entry
    from master.controller import Master

logger = logging.getLogger(__name__)


class Durability:
    """Counts folded events and starts snapshots and checkpoints when they are due."""

    def __init__(self, master: Master) -> None:
        self.master = master
        self.since_snapshot = 0
        self.since_checkpoint = 0
        self._last_snapshot = self._last_checkpoint = time.monotonic()
        self.witness = Witness(master.config.data_dir)

    def folded(self, entry: Entry) -> None:
        """One more event folded (called by the fold, in log order)."""
        self.since_snapshot += 1
        if entry.record.subject != self.master.subjects.audit_event("checkpoint"):
            # A checkpoint anchors itself; counting it would checkpoint an idle log forever.
            self.since_checkpoint += 1
        master, config = self.master, self.master.config
        if not master.ready.is_set() or master.stopping.is_set():
            return
        # Counters reset here, not in the tasks: events folded before a task runs must
        # not start a second one.
        if self.since_checkpoint >= config.checkpoint_every:
            self.since_checkpoint = 0
            master.tasks.spawn(self.checkpoint(), "checkpoint")
        if self.since_snapshot >= config.snapshot_every:
            self.since_snapshot = 0
            master.tasks.spawn(self.snapshot(), "snapshot")

    async def snapshot(self) -> None:
        """Store a snapshot of the projection now."""
        self.since_snapshot = 0
        self._last_snapshot = time.monotonic()
        try:
            await save_snapshot(self.master.bus, self.master.projection, self.master.chain)
        except FleetError as exc:
            logger.error("! snapshot failed: %s", exc)

    async def checkpoint(self) -> None:
        """Publish a signed checkpoint of the chain now, and keep it outside the log."""
        master = self.master
        self.since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        data = AuditCheckpoint(
            count=master.chain.count, through_seq=master.projection.seq, chain=master.chain.hex
        )
        try:
            stored = await master.emit(data, master.subjects.audit_event("checkpoint"))
            await self.witness.record(data, stored.seq)
            kv = await master.bus.kv(master.subjects.config_bucket)
            await kv.put(CHECKPOINT_KEY, pack(data.model_dump()))
        except FleetError as exc:
            logger.error("! checkpoint failed: %s", exc)

    async def tick(self) -> None:
        """Snapshot and checkpoint on time when events came but not enough to count."""
        config = self.master.config
        period = min(config.snapshot_interval_s, config.checkpoint_interval_s)
        # Ends on the stop flag, not only on cancellation (see bus.tasks.wait_any).
        while not await wait_any(self.master.stopping, timeout=period):
            now = time.monotonic()
            if (
                self.since_checkpoint
                and now - self._last_checkpoint >= config.checkpoint_interval_s
            ):
                await self.checkpoint()
            if self.since_snapshot and now - self._last_snapshot >= config.snapshot_interval_s:
                await self.snapshot()
