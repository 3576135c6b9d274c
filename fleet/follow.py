"""Following jobs live: their events and their output, in order, to a known end.

A :class:`JobsReader` follows any number of jobs with one reader of the event log and one
of the output stream (:func:`bus.log.follow`), not two per job: a ``fleet run`` over
1,000 agents holds two consumers on the server, not 2,000. For new jobs the readers start
at the end of each stream as it is before the first job is submitted, so nothing a job
does can slip past; records of jobs nobody watches are skipped. A :class:`JobFollower`
follows one job (new or old) from the start of its own subjects.

The end is exact, not a quiet period: the job's ``finished`` event says how many output
chunks the agent stored, and a job is done once it has the event and that many chunks.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from typing import BinaryIO

from bus import Bus, ConnectionFailedError, FleetError
from bus.codec import HEADER_OUTPUT_STREAM
from bus.log import LogRecord, Tail, follow, last_seq
from bus.tasks import TaskOwner
from ledger.driver import Problem, RecordDriver
from ledger.projection import Projection
from ledger.views import JobView

logger = logging.getLogger(__name__)


class OutputPrinter:
    """Writes job output as it arrives: raw bytes for one job, prefixed lines for several."""

    def __init__(
        self, *, prefix: bool, stdout: BinaryIO | None = None, stderr: BinaryIO | None = None
    ) -> None:
        self.prefix = prefix
        self._out = stdout or sys.stdout.buffer
        self._err = stderr or sys.stderr.buffer
        self._partial: dict[tuple[str, str], bytes] = {}

    def write(self, agent: str, stream: str, data: bytes) -> None:
        target = self._out if stream == "stdout" else self._err
        if not self.prefix:
            target.write(data)
            target.flush()
            return
        # Whole lines only, so lines of several agents never interleave mid-line.
        buffered = self._partial.pop((agent, stream), b"") + data
        *lines, rest = buffered.split(b"\n")
        for line in lines:
            target.write(agent.encode() + b": " + line + b"\n")
        if rest:
            self._partial[(agent, stream)] = rest
        target.flush()

    def close(self, agent: str) -> None:
        for stream in ("stdout", "stderr"):
            rest = self._partial.pop((agent, stream), None)
            if rest:
                self.write(agent, stream, b"\n")
                self._partial.pop((agent, stream), None)


class JobWatch:
    """What is known of one followed job; fed by a :class:`JobsReader`."""

    def __init__(self, agent: str, job_id: str, printer: OutputPrinter | None) -> None:
        self.agent = agent
        self.job_id = job_id
        self.printer = printer
        self.driver = RecordDriver(on_problem=self._on_problem)
        self.done = asyncio.Event()
        self.started = asyncio.Event()
        self._chunks = 0

    @property
    def projection(self) -> Projection:
        return self.driver.projection

    @property
    def undecodable(self) -> int:
        """The job's events that could not be decoded (counted and logged, never dropped)."""
        return self.driver.undecodable

    @property
    def view(self) -> JobView | None:
        return self.projection.jobs.get(self.job_id)

    def on_event(self, record: LogRecord) -> None:
        self.driver.feed(record)
        view = self.view
        if view is not None and view.status != "submitted":
            self.started.set()
        self._check_done()

    def _on_problem(self, problem: Problem) -> None:
        logger.warning("job %s: event at %s", self.job_id, problem)

    def on_output(self, record: LogRecord) -> None:
        self._chunks += 1
        if self.printer is None:
            return
        stream = record.headers.get(HEADER_OUTPUT_STREAM, "stdout")
        self.printer.write(self.agent, "stderr" if stream == "marker" else stream, record.data)
        self._check_done()

    def _check_done(self) -> None:
        view = self.view
        if view is None or not view.finished:
            return
        if self.printer is None or self._chunks >= view.output_chunks:
            if self.printer is not None:
                self.printer.close(self.agent)
            self.done.set()


class JobsReader:
    """One reader of job events (and, when printing, one of output) for many jobs.

    Its readers run in tasks it owns; :meth:`close` cancels and awaits them.
    """

    def __init__(self, bus: Bus, printer: OutputPrinter | None) -> None:
        self.bus = bus
        self.printer = printer
        self._watches: dict[str, JobWatch] = {}
        self._tasks = TaskOwner("follow")
        self._closing = asyncio.Event()

    @classmethod
    async def for_new_jobs(cls, bus: Bus, printer: OutputPrinter | None) -> JobsReader:
        """A reader of every job event (and output) stored from now on: open it before
        submitting, then :meth:`watch` each job.

        Raises:
            ConnectionFailedError: the streams cannot be read.
        """
        s = bus.subjects
        reader = cls(bus, printer)
        try:
            events_from = await last_seq(bus, s.events_stream) + 1
            output_from = await last_seq(bus, s.output_stream) + 1 if printer else 0
        except FleetError as exc:
            raise ConnectionFailedError(f"cannot follow jobs: {exc}") from exc
        return await reader._open(s.job_events(), events_from, s.all_output, output_from)

    async def _open(
        self, events: str, events_from: int, output: str, output_from: int
    ) -> JobsReader:
        s = self.bus.subjects
        # Opened here, not in their tasks, so nothing stored after this returns slips past.
        try:
            tail = await Tail.open(self.bus, s.events_stream, events, start_seq=events_from)
            self._tasks.spawn(self._read(tail, events_from, self._on_event), "events")
            if self.printer is not None:
                tail = await Tail.open(self.bus, s.output_stream, output, start_seq=output_from)
                self._tasks.spawn(self._read(tail, output_from, self._on_output), "output")
        except FleetError as exc:
            await self.close()
            raise ConnectionFailedError(f"cannot follow jobs: {exc}") from exc
        return self

    def watch(self, agent: str, job_id: str, watch: JobWatch | None = None) -> JobWatch:
        """Start keeping what the reader sees of one job."""
        watch = watch or JobWatch(agent, job_id, self.printer)
        self._watches[job_id] = watch
        return watch

    def forget(self, job_id: str) -> None:
        """Stop keeping a job's records (its watch keeps what it has)."""
        self._watches.pop(job_id, None)

    async def _read(self, tail: Tail, start: int, handle: Callable[[LogRecord], None]) -> None:
        reading = follow(
            self.bus, tail.stream, tail.subject, start_seq=start, opened=tail, stop=self._closing
        )
        async for batch in reading:
            for record in batch.records:
                handle(record)

    def _watch_of(self, agent: str, job_id: str) -> JobWatch | None:
        watch = self._watches.get(job_id)
        return watch if watch is not None and watch.agent == agent else None

    def _on_event(self, record: LogRecord) -> None:
        parsed = self.bus.subjects.parse_job_event(record.subject)
        watch = self._watch_of(parsed[0], parsed[1]) if parsed else None
        if watch is not None:
            watch.on_event(record)

    def _on_output(self, record: LogRecord) -> None:
        parsed = self.bus.subjects.parse_output(record.subject)
        watch = self._watch_of(*parsed) if parsed else None
        if watch is not None:
            watch.on_output(record)

    async def close(self) -> None:
        """Stop reading (cancels and awaits the readers)."""
        # The flag ends the readers even if the client library swallows a cancellation.
        self._closing.set()
        await self._tasks.close()


class JobFollower(JobWatch):
    """Follows one job, new or old, from the start of its own subjects, until it has
    finished and all its output has arrived."""

    def __init__(self, bus: Bus, agent: str, job_id: str, printer: OutputPrinter | None) -> None:
        super().__init__(agent, job_id, printer)
        self.bus = bus
        self._reader = JobsReader(bus, printer)

    async def start(self) -> JobFollower:
        """Start reading (before the job is submitted, for a new job).

        Raises:
            ConnectionFailedError: the streams cannot be read.
        """
        s = self.bus.subjects
        self._reader.watch(self.agent, self.job_id, self)
        events = s.job_events(self.agent, self.job_id)
        await self._reader._open(events, 0, s.output(self.agent, self.job_id), 0)
        return self

    async def close(self) -> None:
        """Stop reading (cancels and awaits the readers)."""
        await self._reader.close()
