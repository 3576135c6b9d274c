"""Following jobs live: their events and their output, in order, to a known end.

Each job gets two ordered consumers from the start of its subjects, subscribed before
the job is submitted, so nothing can slip past. The end is exact, not a quiet period:
the job's ``finished`` event says how many output chunks the agent stored, and the
follower is done once it has the event and that many chunks.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any, BinaryIO

import nats.errors
from nats.aio.msg import Msg
from nats.js import api

from bus import BadMessageError, Bus, ConnectionFailedError, FleetError, decode_envelope
from bus.codec import HEADER_OUTPUT_STREAM, decode_data
from bus.log import LogRecord, Tail
from master.projection import JobView, Projection

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
    """Follows one job until it has finished and all its output has arrived."""

    def __init__(self, bus: Bus, agent: str, job_id: str, printer: OutputPrinter | None) -> None:
        self.bus = bus
        self.agent = agent
        self.job_id = job_id
        self.printer = printer
        self.projection = Projection()
        self.done = asyncio.Event()
        self.started = asyncio.Event()
        self._chunks = 0
        self._subs: list[Any] = []
        self._reader: asyncio.Task[None] | None = None

    @property
    def view(self) -> JobView | None:
        return self.projection.jobs.get(self.job_id)

    async def start(self) -> JobFollower:
        """Subscribe (before the job is submitted, for a new job)."""
        s = self.bus.subjects
        try:
            # A pull reader: it creates its consumer through the subject that names the
            # consumer and its filter, the only form operators may use on the event log.
            tail = await Tail.open(self.bus, s.events_stream, s.job_events(self.agent, self.job_id))
            self._reader = asyncio.create_task(self._read_events(tail), name="job events")
            if self.printer is not None:
                self._subs.append(
                    await self.bus.js.subscribe(
                        s.output(self.agent, self.job_id),
                        stream=s.output_stream,
                        cb=self._on_output,
                        ordered_consumer=True,
                        deliver_policy=api.DeliverPolicy.ALL,
                    )
                )
        except (nats.errors.Error, OSError) as exc:
            raise ConnectionFailedError(f"cannot follow job {self.job_id}: {exc}") from exc
        return self

    async def _read_events(self, tail: Tail) -> None:
        try:
            async with tail:
                while True:
                    for record in await tail.fetch(timeout=1.0):
                        self._on_event(record)
        except FleetError as exc:
            # Say so and stop waiting, rather than wait for events that cannot come.
            logger.warning("job %s: lost its events: %s", self.job_id, exc)
            self.done.set()

    def _on_event(self, record: LogRecord) -> None:
        try:
            event = decode_data(decode_envelope(record.data))
        except BadMessageError as exc:
            logger.warning("job %s: undecodable event: %s", self.job_id, exc)
            return
        self.projection.apply(record.seq, event)
        view = self.view
        if view is not None and view.status != "submitted":
            self.started.set()
        self._check_done()

    async def _on_output(self, msg: Msg) -> None:
        self._chunks += 1
        stream = (msg.headers or {}).get(HEADER_OUTPUT_STREAM, "stdout")
        assert self.printer is not None
        self.printer.write(self.agent, "stderr" if stream == "marker" else stream, msg.data)
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
        if self._reader is not None:
            reader, self._reader = self._reader, None
            reader.cancel()
            await asyncio.wait([reader])  # the caller's own cancellation still propagates
            if not reader.cancelled() and reader.exception() is not None:
                logger.warning(
                    "job %s: reading its events failed: %s", self.job_id, reader.exception()
                )
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except (nats.errors.Error, OSError) as exc:
                logger.debug("unsubscribe: %s", exc)
        self._subs.clear()
