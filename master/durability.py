"""What the master keeps besides its memory: snapshots and signed checkpoints.

A snapshot every ``snapshot_every`` events or ``snapshot_interval_s`` seconds lets a
restart replay only the tail; a checkpoint every ``checkpoint_every`` events or
``checkpoint_interval_s`` seconds records the chain (``audit.checkpoint`` in the log,
and the newest in KV ``fleet-config`` and in the witness file outside the store, so an
audit can tell a log that was cut short; see :mod:`master.witness`).
Both run as tasks owned by the master, never two of a kind at once, and only in the
active master (see :mod:`master.leadership`). A standby counts what the active one
leaves unanchored, from the checkpoints it folds, and keeps those in its own witness
file too, so that after a takeover it checkpoints what is due and its witness is whole.
A checkpoint is published only if the last one on its subject is the last one this
master knows of: two masters never both anchor the same events.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from bus import FleetError, SubjectTakenError
from bus.codec import pack
from bus.log import last_message
from bus.tasks import wait_any
from ledger.chain import CHECKPOINT_KEY
from ledger.snapshot import save_snapshot
from master.witness import Witness
from schemas import AuditCheckpoint, Event

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
        self.last_snapshot_at = self.last_checkpoint_at = time.time()
        """Wall-clock times of the last stored snapshot and checkpoint (or of the start),
        for metrics."""
        self.witness = Witness(master.config.data_dir)
        self.last_checkpoint_seq: int | None = None
        """Where the newest checkpoint this master knows of is stored (None: not looked)."""

    def folded(self, entry: Entry) -> None:
        """One more event folded (called by the fold, in log order)."""
        self.since_snapshot += 1
        if entry.record.subject != self.master.subjects.audit_event("checkpoint"):
            # A checkpoint anchors itself; counting it would checkpoint an idle log forever.
            self.since_checkpoint += 1
        elif entry.applied and isinstance(entry.event, Event):
            self._anchored(entry.record.seq, entry.event.data)
        master, config = self.master, self.master.config
        if not master.acting:
            return
        # Counters reset here, not in the tasks: events folded before a task runs must
        # not start a second one.
        if self.since_checkpoint >= config.checkpoint_every:
            self.since_checkpoint = 0
            master.tasks.spawn(self.checkpoint(), "checkpoint")
        if self.since_snapshot >= config.snapshot_every:
            self.since_snapshot = 0
            master.tasks.spawn(self.snapshot(), "snapshot")

    def _anchored(self, seq: int, data: object) -> None:
        """A checkpoint (this master's or another's) was folded."""
        if not isinstance(data, AuditCheckpoint):
            return
        self.last_checkpoint_seq = max(self.last_checkpoint_seq or 0, seq)
        # What came after what it covers is still unanchored (this master may have
        # folded more before the checkpoint got into the log).
        self.since_checkpoint = min(self.since_checkpoint, max(0, seq - 1 - data.through_seq))
        self._last_checkpoint = time.monotonic()
        self.last_checkpoint_at = time.time()
        if self.witness.wants(seq):
            try:
                self.master.tasks.spawn(self.witness.record(data, seq), "witness")
            except RuntimeError:
                logger.warning("not recording checkpoint %d in the witness: stopping", seq)

    async def snapshot(self) -> None:
        """Store a snapshot of the projection now."""
        self.since_snapshot = 0
        self._last_snapshot = time.monotonic()
        try:
            await save_snapshot(self.master.bus, self.master.projection, self.master.chain)
        except FleetError as exc:
            logger.error("! snapshot failed: %s", exc)
        else:
            self.last_snapshot_at = time.time()

    async def checkpoint(self) -> None:
        """Publish a signed checkpoint of the chain now, and keep it outside the log."""
        master = self.master
        self.since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        data = AuditCheckpoint(
            count=master.chain.count, through_seq=master.projection.seq, chain=master.chain.hex
        )
        subject = master.subjects.audit_event("checkpoint")
        try:
            if self.last_checkpoint_seq is None:
                last = await last_message(master.bus, master.subjects.events_stream, subject)
                self.last_checkpoint_seq = last.seq if last is not None else 0
            stored = await master.emit(
                data, subject, expected_last_subject_seq=self.last_checkpoint_seq
            )
            self.last_checkpoint_seq = max(self.last_checkpoint_seq, stored.seq)
            await self.witness.record(data, stored.seq)
            kv = await master.bus.kv(master.subjects.config_bucket)
            await kv.put(CHECKPOINT_KEY, pack(data.model_dump()))
        except SubjectTakenError as exc:
            # Another master checkpointed meanwhile: its checkpoint, once folded, says
            # what is still unanchored.
            logger.info("not checkpointing: another checkpoint is at seq %d", exc.seq)
        except FleetError as exc:
            logger.error("! checkpoint failed: %s", exc)
        else:
            self.last_checkpoint_at = time.time()

    async def tick(self) -> None:
        """Snapshot and checkpoint on time when events came but not enough to count."""
        config = self.master.config
        period = min(config.snapshot_interval_s, config.checkpoint_interval_s)
        # Ends on the stop flag, not only on cancellation (see bus.tasks.wait_any).
        while not await wait_any(self.master.off_duty, timeout=period):
            now = time.monotonic()
            if (
                self.since_checkpoint
                and now - self._last_checkpoint >= config.checkpoint_interval_s
            ):
                await self.checkpoint()
            if self.since_snapshot and now - self._last_snapshot >= config.snapshot_interval_s:
                await self.snapshot()
