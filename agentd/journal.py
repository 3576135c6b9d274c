"""The agent's local journal: what it started, written to disk before a job is acknowledged.

An append-only file of JSON lines in ``data_dir`` (0600), each flushed and fsynced before the
agent acts on it. It is what lets the agent keep its two promises across a crash or
``kill -9``: no job runs twice (a redelivered job the journal knows is not started
again), and no job is lost (a job the journal saw start but not finish is reported
``abandoned`` after its leftover processes are killed).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from bus.paths import open_private, private_dir

logger = logging.getLogger(__name__)

JournalState = Literal["starting", "running", "ended", "finished"]
"""``ended``: the process is over and its outcome known here, not yet in the log."""

KEEP_FINISHED = 10_000
"""Finished jobs remembered after compaction: far more than a consumer could redeliver."""

_COMPACT_BYTES = 4 * 1024 * 1024


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
    """The journal file and, in memory, the latest entry of every job it holds."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.jobs: dict[str, JournalEntry] = {}
        private_dir(path.parent)
        torn = self._load()
        if self.path.exists() and self.path.stat().st_size > _COMPACT_BYTES:
            self.compact()
            torn = False  # compaction wrote whole lines only
        self._file = open_private(self.path, "a")
        if torn:
            # End the torn line, or the next entry would be glued to it and lost too.
            self._file.write("\n")
            self._file.flush()

    def _load(self) -> bool:
        """Read every entry; True when the file ends in a line without its newline."""
        if not self.path.exists():
            return False
        line = ""
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    entry = JournalEntry.model_validate_json(line)
                except ValidationError:
                    # A torn last line after a crash mid-write; an entry we never acted on.
                    logger.warning("%s:%d: unreadable journal line skipped", self.path, number)
                    continue
                self.jobs[entry.job_id] = entry
        return bool(line) and not line.endswith("\n")

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
        """Append an entry and make it durable before returning."""
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
        self._file.write(entry.model_dump_json(exclude_none=True) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.jobs[job_id] = entry
        return entry

    def knows(self, job_id: str) -> bool:
        """Whether this job was ever started (or finished) here."""
        return job_id in self.jobs

    def unfinished(self) -> list[JournalEntry]:
        """Jobs that started and whose outcome is not in the log: what a crash (or an
        outage at shutdown) left behind."""
        return [e for e in self.jobs.values() if e.state != "finished"]

    def compact(self) -> None:
        """Rewrite the file with every unfinished job and the newest finished ones."""
        finished = sorted(
            (e for e in self.jobs.values() if e.state == "finished"), key=lambda e: e.ts
        )[-KEEP_FINISHED:]
        keep = [*self.unfinished(), *finished]
        tmp = self.path.with_suffix(".tmp")
        with open_private(tmp, "w") as f:
            for entry in keep:
                f.write(entry.model_dump_json(exclude_none=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)  # atomic: the old file or the new one, never half
        self.jobs = {e.job_id: e for e in keep}
        if hasattr(self, "_file"):  # an open journal: append to the new file, not the old
            self._file.close()
            self._file = open_private(self.path, "a")

    def close(self) -> None:
        self._file.close()
