"""Following jobs live: their events and their output, in order, to a known end.

Each job gets two readers from the start of its subjects (:func:`bus.log.follow`), opened
before the job is submitted, so nothing can slip past. The end is exact, not a quiet
period: the job's ``finished`` event says how many output chunks the agent stored, and
the follower is done once it has the event and that many chunks.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from typing import BinaryIO

from bus import Bus, ConnectionFailedError, FleetError
from bus.codec import HEADER_OUTPUT_STREAM
from bus.log import LogRecord, Tail, follow
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


class JobFollower:
    """Follows one job until it has finished and all its output has arrived.

    Its readers run in tasks it owns; :meth:`close` cancels and awaits them.
    """

    def __init__(self, bus: Bus, agent: str, job_id: str, printer: OutputPrinter | None) -> None:
        self.bus = bus
        self.agent = agent
        self.job_id = job_id
        self.printer = printer
        self.driver = RecordDriver(on_problem=self._on_problem)
        self.done = asyncio.Event()
        self.started = asyncio.Event()
        self._chunks = 0
        self._tasks = TaskOwner(f"follow {job_id}")
        self._closing = asyncio.Event()

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

    async def start(self) -> JobFollower:
        """Start reading (before the job is submitted, for a new job).

        Raises:
            ConnectionFailedError: the streams cannot be read.
        """
        s = self.bus.subjects
        # The readers are opened here, not in their tasks, so that nothing stored after
        # this returns can slip past.
        try:
            events = await Tail.open(
                self.bus, s.events_stream, s.job_events(self.agent, self.job_id)
            )
            self._tasks.spawn(self._read(events, self._on_event), "events")
            if self.printer is not None:
                output = await Tail.open(
                    self.bus, s.output_stream, s.output(self.agent, self.job_id)
                )
                self._tasks.spawn(self._read(output, self._on_output), "output")
        except FleetError as exc:
            await self._tasks.close()
            raise ConnectionFailedError(f"cannot follow job {self.job_id}: {exc}") from exc
        return self

    async def _read(self, tail: Tail, handle: Callable[[LogRecord], None]) -> None:
        reading = follow(self.bus, tail.stream, tail.subject, opened=tail, stop=self._closing)
        async for batch in reading:
            for record in batch.records:
                handle(record)

    def _on_event(self, record: LogRecord) -> None:
        self.driver.feed(record)
        view = self.view
        if view is not None and view.status != "submitted":
            self.started.set()
        self._check_done()

    def _on_problem(self, problem: Problem) -> None:
        logger.warning("job %s: event at %s", self.job_id, problem)

    def _on_output(self, record: LogRecord) -> None:
        self._chunks += 1
        stream = record.headers.get(HEADER_OUTPUT_STREAM, "stdout")
        assert self.printer is not None
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

    async def close(self) -> None:
        """Stop reading (cancels and awaits the readers)."""
        # The flag ends the readers even if the client library swallows a cancellation.
        self._closing.set()
        await self._tasks.close()
