"""The master's witness file: every checkpoint it publishes, kept outside the store.

Someone who can edit the server's disk can cut the log's tail, checkpoints and all, and
the log alone would not show it. The master appends each checkpoint it published to
``<data_dir>/witness`` (mode 0600, one ``O_APPEND`` write and an fsync per entry, so a
crash leaves at most a torn last line that readers ignore);
``fleet audit --verify --witness FILE`` compares the log with it. A standby appends
the checkpoints it folds (each once, by sequence), so whichever master is active later,
its witness is whole. The file is kept
short: past :data:`KEEP_MAX` entries it is rewritten with the newest :data:`KEEP`,
atomically (temporary file, fsync, rename).
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from bus import UsageError
from ledger.anchoring import WITNESS_FILE, WitnessEntry, read_witness
from schemas import AuditCheckpoint

logger = logging.getLogger(__name__)

KEEP = 100
KEEP_MAX = 1000


class Witness:
    """Appends checkpoints to the witness file in ``data_dir``."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / WITNESS_FILE
        self._entries: int | None = None
        self._lock = asyncio.Lock()  # appends in the order they were asked for
        self.last_seq = 0
        """The newest checkpoint's sequence in the file (0: none, or unreadable)."""
        try:
            entries = read_witness(self.path) if self.path.exists() else []
        except UsageError as exc:
            logger.error("! %s", exc)
            entries = []
        if entries:
            self.last_seq = max(e.seq for e in entries)

    def wants(self, seq: int) -> bool:
        """Whether the checkpoint stored at ``seq`` is newer than every one recorded."""
        return seq > self.last_seq

    async def record(self, checkpoint: AuditCheckpoint, seq: int) -> None:
        """Append one published checkpoint (stored at stream sequence ``seq``).

        A failure is logged, never raised: the log itself stays right, only its
        external witness falls behind (and an audit with it says so).
        """
        entry = WitnessEntry(
            count=checkpoint.count,
            chain=checkpoint.chain,
            through_seq=checkpoint.through_seq,
            seq=seq,
        )
        async with self._lock:
            if not self.wants(seq):
                return  # recorded already (published here, then folded)
            try:
                await asyncio.to_thread(self._append, entry)
            except OSError as exc:
                logger.error("! cannot write the witness file %s: %s", self.path, exc)
            else:
                self.last_seq = seq

    def _append(self, entry: WitnessEntry) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, entry.line())
            os.fsync(fd)
        finally:
            os.close(fd)
        if self._entries is None:
            self._entries = len(read_witness(self.path))
        else:
            self._entries += 1
        if self._entries > KEEP_MAX:
            self._compact()

    def _compact(self) -> None:
        kept = read_witness(self.path)[-KEEP:]
        tmp = self.path.with_name(f"{self.path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"".join(e.line() for e in kept))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        self._entries = len(kept)
