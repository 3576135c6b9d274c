"""Taking this agent's jobs and cancels from the log, with nothing of ours on the server
while we are idle.

The log is the queue. Live, the agent subscribes (core NATS) to its own ``submitted`` and
``cancel_requested`` subjects: what JetStream stores there reaches plain subscribers
too. Each live message is only a hint: the stored message is read back by subject
(a direct get), so what runs is what the log holds, with its sequence and time.

At start, after every reconnect, when the hub answers again after our heartbeat to it
failed (a site's leaf link was down: our own connection saw nothing), when the local
queue overflowed, and every few minutes as a safety net, the agent catches up
(:class:`bus.catchup.CatchUp`): a short-lived consumer, pinned by the server's
permissions to the agent's own job subjects, reads from the cursor
(:mod:`agentd.cursor`, the lowest sequence not settled here) to the end, and is deleted.
The live subscription is made before the first catch-up, so nothing falls in between;
what both bring is told apart by its stream sequence (held here, settled, or below what
a catch-up covered), and a job by its id.

Jobs wait in a bounded local queue, lowest sequence first, until a slot is free
(``max_jobs``); when it is full, what does not fit is dropped from memory and the next
catch-up, from the lowest sequence not taken, brings it back. Each submission is
decided by :mod:`agentd.dispatch`; an admitted job runs in its own task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from agentd.context import AgentContext
from agentd.cursor import Cursor
from agentd.dispatch import Dispatcher
from agentd.offer import Offer
from agentd.record import Recorder
from agentd.runner import JobRunner
from bus import FleetError
from bus.catchup import CatchUp
from bus.live import LiveSubscription
from bus.log import LogRecord, last_message, last_seq
from bus.retry import Backoff
from bus.tasks import first_of, wait_any

logger = logging.getLogger(__name__)

_ERROR_BACKOFF = Backoff(initial=0.5, cap=10.0)
_STORED_WAIT = (0.01, 0.05, 0.25, 1.0)
"""Pauses while a live message is not yet readable back from the log: a plain
subscriber may hear it just before the stream has stored it."""
REFRESH_S = 300.0
"""A catch-up this often after live jobs: the cursor moves on, and a live message lost
on the way (core NATS delivers at most once) is found."""
QUEUE_MIN = 1024


class JobIntake:
    """Feeds one agent's runner: live messages, catch-ups, a bounded queue."""

    def __init__(self, ctx: AgentContext, recorder: Recorder, runner: JobRunner) -> None:
        self._ctx = ctx
        self._dispatch = Dispatcher(ctx, recorder, runner)
        s = ctx.bus.subjects
        self._catchup = CatchUp(ctx.bus, s.events_stream, *s.agent_catchup(ctx.id))
        self._live = LiveSubscription(ctx.bus, s.agent_job_filters(ctx.id))
        self.cursor = Cursor(ctx.config.cursor_path)
        self._covered = self.cursor.seq - 1
        """Every message of ours up to here has been read by a catch-up (or settled)."""
        # Messages by stream sequence: queued, left queued until a time, held (not settled),
        # and settled past the cursor (so a catch-up does not offer them again).
        self._queue: dict[int, Offer] = {}
        self._later: dict[int, tuple[float, Offer]] = {}
        self._open: dict[int, Offer] = {}
        self._done: set[int] = set()
        self._catch_up_due = True
        self._last_catch_up = 0.0
        self._live_since = 0  # live jobs since the last catch-up
        self._reconnects = ctx.bus.reconnects
        self._anchor: tuple[int, str] | None = None  # the newest message read from the log
        self._check_log = True  # whether the log may have lost its tail since we read it
        self.catch_ups = 0
        """How many catch-ups ran (for ``status``)."""
        self.caught_up = asyncio.Event()
        """Set at the end of every catch-up that read to the end."""

    @property
    def _queue_max(self) -> int:
        return max(QUEUE_MIN, 4 * self._ctx.config.max_jobs)

    async def bind(self) -> None:
        """Subscribe live (before any catch-up, so nothing falls in between).

        Raises:
            FleetError: the bus is away.
        """
        await self._live.open()

    async def unbind(self) -> None:
        await self._live.close()

    # --- settling -----------------------------------------------------------------------

    def _offer(self, record: LogRecord) -> Offer:
        if self._anchor is None or record.seq > self._anchor[0]:
            self._anchor = (record.seq, record.subject)
        offer = Offer(record, on_settled=self._settled, on_requeue=self._requeue)
        self._open[offer.stream_seq] = offer
        return offer

    def _settled(self, offer: Offer) -> None:
        self._open.pop(offer.stream_seq, None)
        if offer.stream_seq > self._covered:
            self._done.add(offer.stream_seq)
        self._save_cursor()

    def _requeue(self, offer: Offer, delay_s: float) -> None:
        self._later[offer.stream_seq] = (time.monotonic() + delay_s, offer)
        self._ctx.slot_free.set()

    def _known(self, seq: int) -> bool:
        """Whether this message is held here or was settled already."""
        return seq in self._open or seq in self._done or seq <= self._covered

    def _covered_to(self, seq: int) -> None:
        """Every message of ours up to ``seq`` has been read by a catch-up."""
        self._covered = max(self._covered, seq)
        self._done = {s for s in self._done if s > self._covered}
        self._save_cursor()

    def _save_cursor(self) -> None:
        held = [seq for seq in self._open if seq <= self._covered]
        self.cursor.save(min(held) if held else self._covered + 1)

    def _job_id(self, subject: str) -> str:
        parsed = self._ctx.bus.subjects.parse_job_event(subject)
        return parsed[1] if parsed else "?"

    def _enqueue(self, offer: Offer) -> bool:
        """Queue a job; False (and the offer forgotten) when the queue is full."""
        if len(self._queue) >= self._queue_max:
            self._open.pop(offer.stream_seq, None)
            self._catch_up_due = True  # once there is room: from the lowest not taken
            return False
        self._queue[offer.stream_seq] = offer
        self._ctx.slot_free.set()
        return True

    # --- the loops ----------------------------------------------------------------------

    async def consume_jobs(self, jobs: asyncio.TaskGroup) -> None:
        """Catch up when due, start queued jobs while a slot is free, until the agent
        stops; each admitted job runs as a task of ``jobs``."""
        ctx = self._ctx
        failures = 0
        while not ctx.stopping.is_set():
            if self._bus_reconnected():
                logger.info("reconnected: catching up on jobs sent meanwhile")
                self._catch_up_due = True
                self._check_log = True
            if ctx.hub_returned.is_set():
                ctx.hub_returned.clear()
                self._catch_up_due = True
            # At a site (behind a leaf node) live messages are lost while the link to the
            # hub is down, which no heartbeat may see if it is short: refresh regardless.
            refresh = self._live_since or ctx.config.jetstream_domain is not None
            if refresh and time.monotonic() - self._last_catch_up > REFRESH_S:
                self._catch_up_due = True
            if self._catch_up_due and len(self._queue) <= self._queue_max // 2:
                try:
                    await self._catch_up(jobs)
                    failures = 0
                except FleetError as exc:
                    delay = _ERROR_BACKOFF.delay(failures)
                    failures += 1
                    logger.warning("catching up: %s; again in %.1fs", exc or repr(exc), delay)
                    await wait_any(ctx.stopping, timeout=delay)
                    continue
            self._release_due()
            while self._queue and len(ctx.jobs) < ctx.config.max_jobs:
                await self._dispatch.accept(self._queue.pop(min(self._queue)), jobs)
            ctx.slot_free.clear()
            if ctx.stopping.is_set():
                return
            await first_of(
                ctx.slot_free.wait(),
                ctx.bus.wait_reconnected(self._reconnects, 2 * REFRESH_S),
                timeout=self._next_wake(),
            )

    def _bus_reconnected(self) -> bool:
        if self._ctx.bus.reconnects == self._reconnects:
            return False
        self._reconnects = self._ctx.bus.reconnects
        return True

    def _next_wake(self) -> float:
        waits = [REFRESH_S]
        if self._later:
            waits.append(min(due for due, _ in self._later.values()) - time.monotonic())
        return max(0.0, min(waits))

    def _release_due(self) -> None:
        """Jobs left queued whose pause is over go back in the queue."""
        now = time.monotonic()
        for seq, (due, offer) in list(self._later.items()):
            if due <= now:
                del self._later[seq]
                self._queue[seq] = offer  # held already: not bounded again

    async def consume_live(self) -> None:
        """Take live messages until the agent stops: cancels act at once, submissions
        are read back from the log and queued."""
        ctx = self._ctx
        while not ctx.stopping.is_set():
            got = await first_of(self._live.next(), ctx.stopping.wait())
            subject = got.result() if got is not None else None
            if not isinstance(subject, str):
                continue
            parsed = ctx.bus.subjects.parse_job_event(subject)
            if parsed is None or parsed[0] != ctx.id:
                continue
            _, job_id, event = parsed
            logger.debug("heard %s of job %s", event, job_id)
            if event == "submitted" and len(self._queue) >= self._queue_max:
                self._catch_up_due = True  # no room: the catch-up brings it in its turn
                continue
            record = await self._stored(subject, job_id)
            if record is None:
                continue
            if self._known(record.seq):
                # A publisher's retry of a message stored once, or a second message on
                # the subject stored before this read (the last one is all a read by
                # subject sees): a catch-up tells which, and takes any it finds.
                self._catch_up_due = True
                ctx.slot_free.set()
                continue
            offer = self._offer(record)
            if event == "submitted":
                self._live_since += 1
                self._enqueue(offer)
            else:
                await self._dispatch.cancel(offer)

    async def _stored(self, subject: str, job_id: str) -> LogRecord | None:
        """The message the log holds on ``subject``; None when it cannot be read now
        (the next catch-up brings it)."""
        stream = self._ctx.bus.subjects.events_stream
        for pause in (*_STORED_WAIT, None):
            try:
                record = await last_message(self._ctx.bus, stream, subject)
            except FleetError as exc:
                logger.warning("job %s left queued: cannot read it from the log: %s", job_id, exc)
                self._catch_up_due = True
                self._ctx.slot_free.set()
                return None
            if record is not None:
                return record
            if pause is not None:
                await asyncio.sleep(pause)  # not stored yet: it will be in a moment
        # Heard but not stored (the stream refused it): not a job of the log, unless it
        # is only very late; the catch-up will tell.
        logger.warning("! %s was heard but is not in the log; not taken", subject)
        self._catch_up_due = True
        return None

    async def _catch_up(self, jobs: asyncio.TaskGroup) -> None:
        """Read our subjects from the cursor to the end (or until the queue is full)."""
        if self._check_log:
            await self._check_tail()
            self._check_log = False
        # Below it all is settled or held here (queued, waiting, running): never lost.
        start = self._covered + 1
        self._catch_up_due = False
        taken, last = 0, self._covered
        reading = self._catchup.read(start)
        async with contextlib.aclosing(reading):
            async for batch in reading:
                for record in batch:
                    if not await self._take(record):
                        self._covered_to(record.seq - 1)
                        return
                    last = record.seq
                    taken += 1
        self.catch_ups += 1
        self.caught_up.set()
        self._last_catch_up = time.monotonic()
        self._live_since = 0
        self._covered_to(last)
        if taken:
            logger.debug("caught up from seq %d: %d events of our jobs", start, taken)

    async def _check_tail(self) -> None:
        """Start from the beginning again if the log lost messages we had read: a server
        killed before it synced its store comes back without its newest messages, and
        hands their sequences to new ones, which a cursor past them would skip.

        Raises:
            FleetError: the log could not be asked.
        """
        bus = self._ctx.bus
        stream = bus.subjects.events_stream
        lost = await last_seq(bus, stream) < self._covered
        if not lost and self._anchor is not None:
            seq, subject = self._anchor
            record = await last_message(bus, stream, subject)
            lost = record is None or record.seq < seq
        if lost:
            logger.warning(
                "! the log no longer holds what this agent read up to seq %d (a server "
                "restart lost its newest messages?); catching up from its start",
                self._covered,
            )
            self._covered = 0
            self._done.clear()
            self._anchor = None
            self._save_cursor()

    async def _take(self, record: LogRecord) -> bool:
        """One record of a catch-up; False when the queue is full."""
        parsed = self._ctx.bus.subjects.parse_job_event(record.subject)
        if parsed is None or parsed[0] != self._ctx.id or self._known(record.seq):
            return True
        _, _, event = parsed
        if event == "cancel_requested":
            await self._dispatch.cancel(self._offer(record))
        elif event == "submitted":
            # Even one the journal knows: the dispatcher settles a second submission of a
            # taken job as a duplicate (counted and said once, as when heard live).
            return self._enqueue(self._offer(record))
        return True
