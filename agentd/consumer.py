"""Taking this agent's jobs and cancels from the log.

The log is the queue. Two durable consumers read this agent's subjects: submissions,
fetched only while a slot is free (``max_jobs``), and cancel requests, fetched always,
so a cancel reaches a running job even when every slot is busy. Each submission is
decided by :func:`agentd.admit.admit`; an admitted job runs in its own task.
"""

from __future__ import annotations

import asyncio
import logging
import time

from agentd.admit import Admit, AdmitPolicy, Malformed, Refuse, admit
from agentd.context import AgentContext, RunningJob
from agentd.record import Recorder
from agentd.runner import JobRunner
from bus import (
    BadMessageError,
    FleetError,
    SignatureError,
    decode_envelope,
    verify_envelope,
)
from bus.codec import decode_data
from bus.consumer import ConsumerSpec, Delivery, DurableConsumer
from bus.logformat import ids_context
from bus.retry import Backoff
from bus.tasks import first_of, wait_any
from schemas import Envelope, Event, EventData, JobCancelRequested, JobSubmitted

logger = logging.getLogger(__name__)

_FETCH_WAIT_S = 20.0
_ACK_WAIT_S = 60.0
_ERROR_BACKOFF = Backoff(initial=0.5, cap=10.0)
_REQUEUE = Backoff(initial=1.0, cap=60.0)
_CANCEL_BATCH = 16


class JobConsumer:
    """Feeds one agent's runner from its two durable consumers."""

    def __init__(self, ctx: AgentContext, recorder: Recorder, runner: JobRunner) -> None:
        self._ctx = ctx
        self._recorder = recorder
        self._runner = runner
        subjects = ctx.bus.subjects
        self.consumers = {
            kind: DurableConsumer(
                ctx.bus,
                ConsumerSpec(subjects.events_stream, *subjects.agent_consumer(ctx.id, kind)),
            )
            for kind in ("jobs", "cancels")
        }

    @property
    def recreated(self) -> int:
        """How many times a consumer of this agent was found deleted and made again."""
        return sum(c.recreated for c in self.consumers.values())

    def policy(self) -> AdmitPolicy:
        config = self._ctx.config
        return AdmitPolicy(
            agent=self._ctx.id,
            agent_user=self._ctx.user,
            run_as_mode=config.run_as_mode,
            replay_window_s=config.replay_window_s,
            trust=self._ctx.trust,
            default_user=config.default_run_as or None,
            module_env={name: spec.env for name, spec in config.modules.items()},
        )

    async def bind(self) -> None:
        """Create (or find) the two durable consumers.

        Raises:
            FleetError: the server refused or did not answer.
        """
        for consumer in self.consumers.values():
            await consumer.ensure()

    async def unbind(self) -> None:
        for consumer in self.consumers.values():
            await consumer.close()

    async def _fetch(self, kind: str, batch: int) -> list[Delivery]:
        """Fetch up to ``batch`` messages; an empty list when stopping."""
        fetch = self.consumers[kind].fetch(batch, _FETCH_WAIT_S)
        first = await first_of(fetch, self._ctx.stopping.wait())
        result = first.result() if first is not None else None
        return result if isinstance(result, list) else []

    async def consume_jobs(self, jobs: asyncio.TaskGroup) -> None:
        """Take submissions while a slot is free, until the agent stops; each admitted
        job runs as a task of ``jobs``."""
        ctx = self._ctx
        failures = 0
        while not ctx.stopping.is_set():
            while len(ctx.jobs) >= ctx.config.max_jobs and not ctx.stopping.is_set():
                ctx.slot_free.clear()
                await ctx.slot_free.wait()
            if ctx.stopping.is_set():
                return
            try:
                for msg in await self._fetch("jobs", ctx.config.max_jobs - len(ctx.jobs)):
                    await self._accept(msg, jobs)
                failures = 0
            except FleetError as exc:
                # The bus is down or busy; the consumer keeps our place. Try again soon.
                await self._pause("jobs", exc, failures)
                failures += 1

    async def consume_cancels(self) -> None:
        """Take cancel requests until the agent stops."""
        failures = 0
        while not self._ctx.stopping.is_set():
            try:
                for msg in await self._fetch("cancels", _CANCEL_BATCH):
                    await self._cancel(msg)
                failures = 0
            except FleetError as exc:
                await self._pause("cancels", exc, failures)
                failures += 1

    async def _pause(self, kind: str, exc: FleetError, failures: int) -> None:
        delay = _ERROR_BACKOFF.delay(failures)
        logger.warning("fetching %s: %s; again in %.1fs", kind, exc or repr(exc), delay)
        await wait_any(self._ctx.stopping, timeout=delay)

    async def _envelope(
        self, msg: Delivery, expected: type[EventData]
    ) -> tuple[str, Envelope] | None:
        """``(job_id, envelope)`` of a message on this agent's job subjects, or None when
        it is not an event of the expected type on its own subject (then it was dropped)."""
        parsed = self._ctx.bus.subjects.parse_job_event(msg.subject)
        job_id = parsed[1] if parsed else "?"
        try:
            envelope = decode_envelope(msg.data, self._ctx.bus.settings.max_msg_size)
            if envelope.subject != msg.subject:
                raise BadMessageError(f"envelope subject {envelope.subject} is not {msg.subject}")
            if envelope.type != expected.TYPE:
                raise BadMessageError(f"{envelope.type} on a {expected.TYPE} subject")
        except BadMessageError as exc:
            await self._malformed(msg, str(exc))
            return None
        return job_id, envelope

    async def _malformed(self, msg: Delivery, reason: str) -> None:
        self._ctx.counters.malformed += 1
        logger.error(
            "! malformed message on %s (stream seq %d): %s; dropped",
            msg.subject,
            msg.stream_seq,
            reason,
        )
        await msg.term()

    async def _accept(self, msg: Delivery, jobs: asyncio.TaskGroup) -> None:
        ctx = self._ctx
        found = await self._envelope(msg, JobSubmitted)
        if found is None:
            return
        job_id, envelope = found
        preparing = ctx.jobs.get(job_id)
        if preparing is not None and not ctx.journal.knows(job_id):
            # Redelivered while its first delivery is still being checked (the server
            # lost that delivery's state, or its ack wait ran out): the runner settles
            # this one. Acking it here would drop the job if the runner then leaves it
            # queued, since its nak would name a delivery the server no longer waits on.
            logger.info("job %s redelivered while it is being prepared here", job_id)
            preparing.delivery = msg
            return
        if ctx.journal.knows(job_id):  # started here: the journal owns it
            ctx.counters.duplicates_skipped += 1
            logger.warning(
                "! job %s was already taken here (a replay?); not running it again", job_id
            )
            await msg.ack()
            return
        decision = admit(
            envelope, job_id, self.policy(), stored_ns=msg.stored_ns, now_ns=time.time_ns()
        )
        if isinstance(decision, Malformed):
            await self._malformed(msg, decision.reason)
            return
        if isinstance(decision, Refuse):
            if await self._recorder.finish(job_id, decision.status, reason=decision.reason):
                await msg.ack()
            else:  # not recorded (the agent is stopping in an outage): decide it again later
                await msg.nak(_REQUEUE.delay(msg.delivered - 1))
            return
        assert isinstance(decision, Admit)
        running = RunningJob(job_id, msg)
        ctx.jobs[job_id] = running
        running.task = jobs.create_task(
            self._runner.run(decision, running),
            name=f"job {job_id}",
            context=ids_context(job=job_id, event=str(envelope.id)),  # on its JSON log lines
        )

    async def _cancel(self, msg: Delivery) -> None:
        ctx = self._ctx
        found = await self._envelope(msg, JobCancelRequested)
        if found is None:
            return
        job_id, envelope = found
        if envelope.signed:
            try:
                verify_envelope(envelope, subject=msg.subject)
            except SignatureError as exc:
                await self._malformed(msg, str(exc))
                return
        try:
            decoded = decode_data(envelope)
        except BadMessageError as exc:
            await self._malformed(msg, str(exc))
            return
        data = decoded.data if isinstance(decoded, Event) else None
        if isinstance(data, JobCancelRequested) and (data.job_id != job_id or data.agent != ctx.id):
            await self._malformed(msg, "job id or agent in the data do not match the subject")
            return
        running = ctx.jobs.get(job_id)
        signer = envelope.signer
        if ctx.trust is not None and (signer is None or ctx.trust.for_key(signer) is None):
            logger.warning("! cancel of job %s ignored: not signed by a trusted key", job_id)
            await msg.ack()
            return
        if running is not None and isinstance(data, JobCancelRequested):
            detail = f"cancelled by {data.requested_by}" + (
                f": {data.reason}" if data.reason else ""
            )
            logger.info("cancel job %s (%s)", job_id, detail)
            running.stop.set("cancel", detail)
        # A cancel for a job not running here: finished already, or not fetched yet (the
        # submission path looks for it before starting).
        await msg.ack()
