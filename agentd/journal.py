"""The agent's local journal: what it started, written to disk before a job is acknowledged.

An append-only file of JSON lines in ``data_dir`` (0600). It is what lets the agent keep
its two promises across a crash or ``kill -9``: no job runs twice (a redelivered job the
journal knows is not started again), and no job is lost (a job the journal saw start but
not finish is reported ``abandoned`` after its leftover processes are killed).

Every entry is written to the file the moment it is recorded (one ``write``, no user-space
buffer), so it survives the agent being killed: the kernel holds it. Only a power loss or
kernel crash can take what is not yet fsynced, so fsync is done where the promises need it
and nowhere else, by :meth:`Journal.durable`: in a worker thread, off the event loop, one
fsync covering every entry written before it (group commit: jobs starting together share
it). The one entry awaited durable is ``starting``, before the spawn: were it lost with the
machine while the job's effects were not, the unacknowledged job would run again. The
others need no fsync of their own, and why is written where they are recorded
(:mod:`agentd.runner`, :mod:`agentd.record`).

Memory and disk stay bounded: unfinished jobs are kept whole, finished ones only as
``job_id → status`` for the newest :data:`KEEP_FINISHED`; the file is compacted to that
when it holds a few times more lines than it needs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from bus.paths import open_private, private_dir

logger = logging.getLogger(__name__)

JournalState = Literal["starting", "running", "ended", "finished"]
"""``ended``: the process is over and its outcome known here, not yet in the log."""

KEEP_FINISHED = 10_000
"""Finished jobs remembered: far more than a consumer could redeliver (and the log is asked
for a recorded outcome before any job starts, see :mod:`agentd.beforestart`)."""

_COMPACT_BYTES = 4 * 1024 * 1024
"""A journal larger than this when opened is compacted at once."""

_COMPACT_FACTOR = 4
"""Compact an open journal once it holds this many times the lines it needs (a job
writes up to four), so each compaction is paid for by thousands of appends."""


class JournalEntry(BaseModel):
    """One step of one job."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    job_id: str
    state: JournalState
    pid: int | None = None
    start_ticks: int | None = None
    """The process's start time in clock ticks since boot (``/proc/PID/stat`` field 22),
    so a recycled pid is not mistaken for the job's process."""
    status: str | None = None
    exit_code: int | None = None
    reason: str | None = None
    ts: int = 0


class Journal:
    """The journal file and, in memory, what exactly-once needs of it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._open: dict[str, JournalEntry] = {}
        self._finished: dict[str, str] = {}  # job_id → status, oldest first
        self._lines = 0  # lines in the file, torn ones included
        self._written = 0  # entries written since opened
        self._synced = 0  # of those, how many an fsync covered
        self._lock = threading.Lock()  # the file descriptor: fsync, compaction, close
        private_dir(path.parent)
        torn = self._load()
        if self.path.exists() and self.path.stat().st_size > _COMPACT_BYTES:
            self._rewrite()
            torn = False  # compaction wrote whole lines only
        self._fd = self._open_fd()
        if torn:
            # End the torn line, or the next entry would be glued to it and lost too.
            os.write(self._fd, b"\n")

    @property
    def jobs(self) -> dict[str, JournalEntry]:
        """A snapshot of the latest entry of every job held (finished ones rebuilt from
        their status), for inspection; the journal itself keeps less."""
        finished = {
            job_id: JournalEntry(job_id=job_id, state="finished", status=status)
            for job_id, status in self._finished.items()
        }
        return {**finished, **self._open}

    def _open_fd(self) -> int:
        file = open_private(self.path, "a")
        fd = os.dup(file.fileno())
        file.close()
        return fd

    def _load(self) -> bool:
        """Read every entry; True when the file ends in a line without its newline."""
        if not self.path.exists():
            return False
        line = ""
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                self._lines = number
                if not line.strip():
                    continue
                try:
                    entry = JournalEntry.model_validate_json(line)
                except ValidationError:
                    # A torn last line after a crash mid-write; an entry we never acted on.
                    logger.warning("%s:%d: unreadable journal line skipped", self.path, number)
                    continue
                self._hold(entry)
        return bool(line) and not line.endswith("\n")

    def _hold(self, entry: JournalEntry) -> None:
        """Keep in memory what the entry changes, forgetting the oldest finished jobs."""
        job_id = entry.job_id
        if entry.state != "finished":
            self._finished.pop(job_id, None)
            self._open[job_id] = entry
            return
        self._open.pop(job_id, None)
        self._finished.pop(job_id, None)  # re-inserted as the newest
        self._finished[job_id] = entry.status or ""
        while len(self._finished) > KEEP_FINISHED:
            del self._finished[next(iter(self._finished))]

    def record(
        self,
        job_id: str,
        state: JournalState,
        *,
        pid: int | None = None,
        start_ticks: int | None = None,
        status: str | None = None,
        exit_code: int | None = None,
        reason: str | None = None,
    ) -> JournalEntry:
        """Write an entry to the file (it survives the agent's death from here on; await
        :meth:`durable` for it to survive the machine's)."""
        entry = JournalEntry(
            job_id=job_id,
            state=state,
            pid=pid,
            start_ticks=start_ticks,
            status=status,
            exit_code=exit_code,
            reason=reason,
            ts=time.time_ns(),
        )
        line = (entry.model_dump_json(exclude_none=True) + "\n").encode()
        # No lock: compaction and close, the only ones to swap the descriptor, run on
        # this thread too. O_APPEND and one write: a line is whole or torn, never mixed.
        os.write(self._fd, line)
        self._written += 1
        self._lines += 1
        self._hold(entry)
        if self._lines > _COMPACT_FACTOR * (KEEP_FINISHED + len(self._open)) + 64:
            self.compact()
        return entry

    async def durable(self) -> None:
        """Return once every entry recorded so far is on disk.

        The fsync runs in a worker thread; callers waiting together share one.
        """
        target = self._written
        if self._synced < target:
            await asyncio.to_thread(self._sync, target)

    def _sync(self, target: int) -> None:
        with self._lock:
            if self._synced >= target:
                return  # another caller's fsync covered ours
            upto = self._written  # all written before the fsync starts: covered by it
            os.fsync(self._fd)
            self._synced = max(self._synced, upto)

    def knows(self, job_id: str) -> bool:
        """Whether this job was started (or finished) here, as far as the journal recalls:
        every unfinished job and the newest :data:`KEEP_FINISHED` finished ones."""
        return job_id in self._open or job_id in self._finished

    def unfinished(self) -> list[JournalEntry]:
        """Jobs that started and whose outcome is not in the log: what a crash (or an
        outage at shutdown) left behind."""
        return list(self._open.values())

    def held(self) -> tuple[int, int]:
        """How many unfinished and finished jobs are held in memory."""
        return len(self._open), len(self._finished)

    def compact(self) -> None:
        """Rewrite the file with every unfinished job and the newest finished ones."""
        with self._lock:
            self._rewrite()
            os.close(self._fd)  # append to the new file, not the old
            self._fd = self._open_fd()
            self._synced = self._written  # the rewrite was fsynced whole

    def _rewrite(self) -> None:
        finished = list(self._finished.items())[-KEEP_FINISHED:]
        self._finished = dict(finished)
        lines = [e.model_dump_json(exclude_none=True) for e in self._open.values()]
        lines += [
            JournalEntry(job_id=job_id, state="finished", status=status).model_dump_json(
                exclude_none=True
            )
            for job_id, status in finished
        ]
        tmp = self.path.with_suffix(".tmp")
        with open_private(tmp, "w") as f:
            f.writelines(line + "\n" for line in lines)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)  # atomic: the old file or the new one, never half
        _fsync_dir(self.path.parent)  # and the rename itself durable
        self._lines = len(lines)

    def close(self) -> None:
        """Make everything durable and close the file."""
        with self._lock:
            if self._fd < 0:
                return
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
            self._synced = self._written


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
