"""Live updates for the status page: what the fold changed, as server-sent events.

The fold calls :meth:`Live.folded` with every record; the records it changed (a job, an
agent, a rollout) are collected and, at most every :data:`FLUSH_S` seconds, sent to every
open page as one event each, the newest state only. So a burst of 10,000 heartbeats
costs one message per agent that changed, never a table reload. A page that cannot keep
up (its queue is full) is told to ``reset``: it reloads the page it shows, once.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from bus.tasks import wait_any
from master.web.pages import agent_row, job_row, rollout_row, summary
from schemas import Event

if TYPE_CHECKING:
    from ledger.driver import Entry
    from ledger.projection import Projection

logger = logging.getLogger(__name__)

FLUSH_S = 0.25
KEEPALIVE_S = 15.0
QUEUE_LIMIT = 256
"""Batches a page may be behind before it is told to reset."""

Batch = list[tuple[str, dict[str, Any]]]


class Live:
    """Collects what changed and fans it out to subscribers."""

    def __init__(self, projection: Callable[[], Projection], summary_args: Callable[[], Any]):
        self._projection = projection
        self._summary_args = summary_args
        self._jobs: set[str] = set()
        self._agents: set[str] = set()
        self._rollouts: set[str] = set()
        self._subscribers: set[asyncio.Queue[Batch | None]] = set()
        self.changed = asyncio.Event()

    def folded(self, entry: Entry) -> None:
        """Note what one folded record changed (from the fold; quick, no I/O)."""
        event = entry.event
        if not self._subscribers or not isinstance(event, Event):
            return
        data = event.data
        job_id = getattr(data, "job_id", None)
        agent = getattr(data, "agent", None)
        if isinstance(job_id, str):
            self._jobs.add(job_id)
        if isinstance(agent, str):
            self._agents.add(agent)
        if event.envelope.type.startswith("update."):
            version = getattr(data, "version", None)
            if isinstance(version, str):
                self._rollouts.add(version)
        self.changed.set()

    def batch(self) -> Batch:
        """What changed since the last batch, as (event name, document) pairs."""
        p = self._projection()
        out: Batch = []
        for job_id in sorted(self._jobs):
            job = p.jobs.get(job_id)
            if job is not None:
                out.append(("job", job_row(job)))
        for agent_id in sorted(self._agents):
            agent = p.agents.get(agent_id)
            if agent is not None:
                out.append(("agent", agent_row(p, agent)))
        for version in sorted(self._rollouts):
            rollout = p.rollouts.get(version)
            if rollout is not None:
                out.append(("rollout", rollout_row(p, rollout)))
        if out:
            ready, configured = self._summary_args()
            out.append(("summary", summary(p, ready=ready, configured=configured)))
        self._jobs.clear()
        self._agents.clear()
        self._rollouts.clear()
        self.changed.clear()
        return out

    async def pump(self, stop: asyncio.Event) -> None:
        """Send batches to subscribers until ``stop`` (an owned task of the master)."""
        while not stop.is_set():
            if not await wait_any(self.changed, stop, timeout=KEEPALIVE_S):
                continue
            if await wait_any(stop, timeout=FLUSH_S):
                break  # coalesce: changes keep coming for a moment
            batch = self.batch()
            if not batch:
                continue
            for queue in list(self._subscribers):
                if queue.full():
                    self._drop(queue)
                else:
                    queue.put_nowait(batch)
        for queue in list(self._subscribers):
            self._drop(queue)

    def _drop(self, queue: asyncio.Queue[Batch | None]) -> None:
        """Tell a page that fell behind (or the stopping master) to start over."""
        self._subscribers.discard(queue)
        while not queue.empty():
            queue.get_nowait()
        queue.put_nowait(None)

    async def stream(self) -> AsyncIterator[bytes]:
        """One page's server-sent events until it goes away or falls behind."""
        queue: asyncio.Queue[Batch | None] = asyncio.Queue(QUEUE_LIMIT)
        self._subscribers.add(queue)
        try:
            yield b"retry: 2000\n\n"
            while True:
                try:
                    async with asyncio.timeout(KEEPALIVE_S):
                        batch = await queue.get()
                except TimeoutError:
                    yield b": keepalive\n\n"
                    continue
                if batch is None:
                    yield b"event: reset\ndata: {}\n\n"
                    return
                yield b"".join(_sse(name, doc) for name, doc in batch)
        finally:
            self._subscribers.discard(queue)


def _sse(name: str, doc: dict[str, Any]) -> bytes:
    # json.dumps escapes newlines, so one data line per event is always enough.
    return f"event: {name}\ndata: {json.dumps(doc, separators=(',', ':'))}\n\n".encode()
