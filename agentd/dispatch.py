"""What one message of this agent's means: a job admitted and started, refused, or
dropped as malformed; a cancel acted on. Decided by :func:`agentd.admit.admit` and the
trust file; every message is settled (:class:`agentd.offer.Offer`) or left queued.
"""

from __future__ import annotations

import asyncio
import logging
import time

from agentd.admit import Admit, AdmitPolicy, Malformed, Refuse, admit
from agentd.context import AgentContext, RunningJob
from agentd.offer import Offer
from agentd.record import Recorder
from agentd.runner import JobRunner
from bus import BadMessageError, SignatureError, decode_envelope, verify_envelope
from bus.codec import decode_data
from bus.logformat import ids_context
from bus.retry import Backoff
from schemas import Envelope, Event, EventData, JobCancelRequested, JobSubmitted

logger = logging.getLogger(__name__)

_REQUEUE = Backoff(initial=1.0, cap=60.0)


class Dispatcher:
    """Decides the jobs and cancels the intake (:mod:`agentd.intake`) hands it."""

    def __init__(self, ctx: AgentContext, recorder: Recorder, runner: JobRunner) -> None:
        self._ctx = ctx
        self._recorder = recorder
        self._runner = runner

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

    async def _envelope(self, msg: Offer, expected: type[EventData]) -> tuple[str, Envelope] | None:
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

    async def _malformed(self, msg: Offer, reason: str) -> None:
        self._ctx.counters.malformed += 1
        logger.error(
            "! malformed message on %s (stream seq %d): %s; dropped",
            msg.subject,
            msg.stream_seq,
            reason,
        )
        await msg.term()

    async def accept(self, msg: Offer, jobs: asyncio.TaskGroup) -> None:
        """Admit a submission and start it as a task of ``jobs``, or end it here."""
        ctx = self._ctx
        found = await self._envelope(msg, JobSubmitted)
        if found is None:
            return
        job_id, envelope = found
        if job_id in ctx.jobs:
            # A second message of a job whose first is being prepared or run here: that
            # one decides (and is left queued itself if it cannot be decided now).
            logger.info("job %s offered again while it is being prepared here", job_id)
            await msg.ack()
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

    async def cancel(self, msg: Offer) -> None:
        """Stop the job a trusted cancel names, if it runs here."""
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
        # A cancel for a job not running here: finished already, or not started yet (the
        # runner looks for it before starting).
        await msg.ack()
