"""Streaming a job's output to ``FLEET_OUTPUT`` while it runs, within bounds.

Readers feed chunks into a small queue; one publisher per job sends them in order, each
acknowledged by the stream and deduplicated by ``<job>-<seq>``. A full queue blocks the
readers, which stops draining the pipes, which blocks the job's writes: a job printing
faster than the bus can take is slowed down, not buffered in the agent's memory. Past
``max_bytes`` the stream gets a marker and the rest is only counted; the last
``tail_bytes`` are always kept for the ``finished`` event.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from bus import Bus, FleetError, Signer
from bus.codec import HEADER_OUTPUT_SEQ, HEADER_OUTPUT_STREAM

logger = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 1024
_QUEUE_CHUNKS = 8


@dataclass(frozen=True)
class OutputSummary:
    """What a job printed, for its ``finished`` event."""

    stdout_bytes: int
    stderr_bytes: int
    tail: str
    truncated: bool
    chunks: int
    lost_chunks: int


class JobOutput:
    """One job's output stream. Use ``async with``; feed with :meth:`pump`."""

    def __init__(
        self,
        bus: Bus,
        subject: str,
        job_id: str,
        *,
        stream: str,
        max_bytes: int,
        tail_bytes: int,
        signer: Signer,
    ) -> None:
        """``signer``: the agent's key, which alone yields the chunks' message ids (the
        stream drops a repeated id whoever sent the first, so no one may know them)."""
        self._bus = bus
        self._signer = signer
        self._subject = subject
        self._job_id = job_id
        self._stream = stream
        self._max_bytes = max_bytes
        self._tail_bytes = tail_bytes
        self._queue: asyncio.Queue[tuple[str, bytes] | None] = asyncio.Queue(_QUEUE_CHUNKS)
        self._counts = {"stdout": 0, "stderr": 0}
        self._streamed = 0
        self._tail = bytearray()
        self._truncated = False
        self._seq = 0
        self._lost = 0
        self._publisher: asyncio.Task[None] | None = None

    async def __aenter__(self) -> JobOutput:
        self._publisher = asyncio.create_task(self._publish_all(), name=f"output {self._job_id}")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        assert self._publisher is not None
        if exc_type is not None:
            # Not waiting for the queue to drain through a bus that may be away.
            self._publisher.cancel()
            await asyncio.gather(self._publisher, return_exceptions=True)
            return
        if self._truncated:
            note = f"[output truncated: {self.total - self._streamed} more bytes not streamed]\n"
            await self._queue.put(("marker", note.encode()))
        await self._queue.put(None)
        await self._publisher

    @property
    def total(self) -> int:
        return self._counts["stdout"] + self._counts["stderr"]

    async def pump(self, reader: asyncio.StreamReader, name: str) -> None:
        """Copy one pipe into the stream until EOF."""
        while chunk := await reader.read(CHUNK_BYTES):
            await self.feed(name, chunk)

    async def feed(self, name: str, data: bytes) -> None:
        """Take bytes read from ``stdout`` or ``stderr``."""
        self._counts[name] += len(data)
        if self._tail_bytes:
            self._tail += data
            del self._tail[: -self._tail_bytes]
        room = self._max_bytes - self._streamed
        if room <= 0:
            self._truncated = True
            return
        if len(data) > room:
            data = data[:room]
            self._truncated = True
        self._streamed += len(data)
        await self._queue.put((name, data))

    async def _publish_all(self) -> None:
        while (item := await self._queue.get()) is not None:
            name, data = item
            self._seq += 1
            try:
                await self._bus.publish_stored(
                    self._subject,
                    data,
                    msg_id=self._signer.stable_id(self._job_id, "output", str(self._seq)),
                    headers={HEADER_OUTPUT_STREAM: name, HEADER_OUTPUT_SEQ: str(self._seq)},
                    stream=self._stream,
                )
            except FleetError as exc:
                # The job keeps running; its finished event says output was lost.
                self._lost += 1
                logger.error("output chunk %d of job %s lost: %s", self._seq, self._job_id, exc)

    def summary(self) -> OutputSummary:
        return OutputSummary(
            stdout_bytes=self._counts["stdout"],
            stderr_bytes=self._counts["stderr"],
            tail=self._tail.decode("utf-8", errors="replace"),
            truncated=self._truncated,
            chunks=self._seq - self._lost,
            lost_chunks=self._lost,
        )
