"""Recording what the agent does as signed events, each job's outcome exactly once.

An event a retry can repeat (a job's ``started``, ``finished`` or ``late_result``) is
built once, with an id derived from the job and the agent's key
(:meth:`bus.Signer.stable_id`: no one else can publish it first), and that same
envelope is published on every try, so the stream's duplicate window drops repeats. A
job's ``finished`` is stored only as the first message on its subject: when the master
got there first (``abandoned``, ``expired``, a cancel without the agent), the server
refuses ours, and what the agent knew is recorded as a non-terminal ``job.late_result``.

The outcome is published first and journaled after, so a crash between the two leaves
the job unfinished in the journal, which reports it after the restart.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from agentd.context import AgentContext
from bus import Bus, FleetError, Signer, sign_envelope
from bus.errors import ConnectionFailedError, FleetTimeoutError, SubjectTakenError
from bus.retry import Backoff
from bus.tasks import first_of, wait_any
from schemas import Envelope, EventData, JobFinished, JobLateResult, event_name, make_envelope

logger = logging.getLogger(__name__)

_TRANSIENT = (FleetTimeoutError, ConnectionFailedError)
_BACKOFF = Backoff(initial=1.0, cap=30.0)
_STOPPING_TRY_S = 5.0


class Emitter:
    """Builds and publishes one agent's events, signed with its key."""

    def __init__(self, bus: Bus, signer: Signer, agent: str) -> None:
        self._bus = bus
        self._signer = signer
        self._agent = agent

    def subject_of(self, data: EventData) -> str:
        """The subject an event of this agent's goes on."""
        subjects, agent = self._bus.subjects, self._agent
        name = event_name(data.TYPE)
        if data.TYPE.startswith("job."):
            return subjects.job_event(agent, data.job_id, name)  # type: ignore[attr-defined]
        if data.TYPE.startswith("update."):
            return subjects.update_event(data.version, name, agent=agent)  # type: ignore[attr-defined]
        return subjects.agent_event(agent, name)

    def stable_id(self, job_id: str, name: str) -> str:
        """The id the job's event ``name`` has on every try: only this agent's key
        yields it (see :meth:`bus.Signer.stable_id`)."""
        return self._signer.stable_id(job_id, name)

    def envelope(self, data: EventData, event_id: str | None = None) -> Envelope:
        """The signed envelope of ``data`` (with a fixed id for one a retry may repeat)."""
        envelope = make_envelope(
            data, source=self._agent, subject=self.subject_of(data), event_id=event_id
        )
        return sign_envelope(envelope, self._signer)

    async def publish(self, envelope: Envelope, *, first: bool = False) -> None:
        """Publish a built envelope; ``first``: only as the first on its subject.

        Raises:
            SubjectTakenError: ``first`` and the subject already holds another message.
            FleetError: the log did not take it (see :meth:`bus.Bus.publish_event`).
        """
        await self._bus.publish_event(envelope, expected_last_subject_seq=0 if first else None)

    async def emit(self, data: EventData) -> None:
        """Sign and publish one event that no retry repeats.

        Raises:
            FleetError: the log did not take it.
        """
        await self.publish(self.envelope(data))


class Recorder:
    """Records the agent's events, and each job's one outcome in the log and the journal."""

    def __init__(self, ctx: AgentContext, emitter: Emitter) -> None:
        self._ctx = ctx
        self.emitter = emitter

    async def emit(self, data: EventData) -> None:
        """See :meth:`Emitter.emit`."""
        await self.emitter.emit(data)

    async def publish_job_event(self, data: EventData, name: str, *, first: bool = False) -> bool:
        """Publish a job event under its stable id, trying again through outages.

        Returns False when it could not be recorded: a refusal that no retry can fix, or
        the agent is stopping and the bus is still away.

        Raises:
            SubjectTakenError: ``first`` and another message holds the subject.
        """
        job_id: str = data.job_id  # type: ignore[attr-defined]
        envelope = self.emitter.envelope(data, self.emitter.stable_id(job_id, name))  # once
        attempt = 0
        while True:
            try:
                if await self._publish_once(envelope, first):
                    return True
                continue  # cut short by the stop: once more, bounded
            except SubjectTakenError:
                raise
            except (*_TRANSIENT, TimeoutError) as exc:
                delay = _BACKOFF.delay(attempt)
                attempt += 1
                logger.warning(
                    "↻ job %s: recording %s failed (try %d): %s; again in %.1fs",
                    job_id,
                    data.TYPE,
                    attempt,
                    exc,
                    delay,
                )
                if self._ctx.stopping.is_set():
                    return False
                await wait_any(self._ctx.stopping, timeout=delay)
            except FleetError as exc:
                logger.error("! job %s: %s refused: %s", job_id, data.TYPE, exc)
                return False

    async def _publish_once(self, envelope: Envelope, first: bool) -> bool:
        """One try; False if the agent began to stop meanwhile (the try was cut short).

        Once the agent is stopping, a try is bounded: the journal keeps what the log
        could not take, and the next start records it.
        """
        stopping = self._ctx.stopping
        if stopping.is_set():
            async with asyncio.timeout(_STOPPING_TRY_S):
                await self.emitter.publish(envelope, first=first)
            return True
        publishing = asyncio.ensure_future(self.emitter.publish(envelope, first=first))
        await first_of(publishing, stopping.wait())
        if publishing.cancelled():
            return False
        publishing.result()
        return True

    async def finish(self, job_id: str, status: str, *, ran: bool = False, **fields: Any) -> bool:
        """Record the job's outcome: its one ``finished``, then the journal.

        Args:
            job_id: the job.
            status: how it ended.
            ran: its process ran (a lost race is then worth a ``late_result``).
            fields: the rest of :class:`~schemas.JobFinished`.

        Returns:
            False when it could not be recorded; the job stays unfinished in the journal.
        """
        ctx = self._ctx
        data = JobFinished(job_id=job_id, agent=ctx.id, status=status, **fields)  # type: ignore[arg-type]
        try:
            if not await self.publish_job_event(data, "finished", first=True):
                return False
        except SubjectTakenError as exc:
            if not await self._lost(data, exc, ran):
                return False
        else:
            counters = ctx.counters
            counters.finished[status] = counters.finished.get(status, 0) + 1
            if status == "rejected":
                logger.warning("! job %s rejected: %s", job_id, fields.get("reason"))
        # Not awaited durable: lost with the machine, it leaves the job unfinished in
        # the journal and the restart publishes the same outcome again, which the log
        # takes as the duplicate it is (or, past the duplicate window, as a late result).
        ctx.journal.record(job_id, "finished", status=status)
        return True

    async def _lost(self, data: JobFinished, taken: SubjectTakenError, ran: bool) -> bool:
        """Our outcome lost to one recorded first (stream seq ``taken.seq``)."""
        if not ran:
            logger.info(
                "job %s already has its outcome in the log (seq %d); %s not recorded",
                data.job_id,
                taken.seq,
                data.status,
            )
            return True
        logger.warning(
            "! job %s: its outcome was recorded first by another (seq %d); "
            "recording ours (%s) as a late result",
            data.job_id,
            taken.seq,
            data.status,
        )
        late = JobLateResult(**data.model_dump())
        try:
            recorded = await self.publish_job_event(late, "late_result")
        except SubjectTakenError:  # pragma: no cover - not published with first=True
            recorded = False
        if recorded:
            self._ctx.counters.late_results += 1
        return recorded
