"""Recording what the agent does as signed events: the one ``finished`` of each job.

Every event goes out on the subject its type and data name; a job's outcome is published
first and journaled after, so a crash between the two leaves it unfinished in the journal,
which reports it after the restart (see :mod:`agentd.journal`).
"""

from __future__ import annotations

import logging
from typing import Any

from agentd.context import AgentContext
from bus import Bus, FleetError, Signer, sign_envelope
from schemas import EventData, JobFinished, event_name, make_envelope

logger = logging.getLogger(__name__)

_FINISH_ATTEMPTS = 10


class Emitter:
    """Publishes one agent's events, signed with its key."""

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

    async def emit(self, data: EventData) -> None:
        """Sign and publish one event.

        Raises:
            FleetError: the log did not take it (see :meth:`bus.Bus.publish_event`).
        """
        envelope = make_envelope(data, source=self._agent, subject=self.subject_of(data))
        await self._bus.publish_event(sign_envelope(envelope, self._signer))


class Recorder:
    """Records the agent's events, and each job's one outcome in the log and the journal."""

    def __init__(self, ctx: AgentContext, emitter: Emitter) -> None:
        self._ctx = ctx
        self.emitter = emitter

    async def emit(self, data: EventData) -> None:
        """See :meth:`Emitter.emit`."""
        await self.emitter.emit(data)

    async def finish(self, job_id: str, status: str, **fields: Any) -> None:
        """Publish the job's one ``finished`` event, then journal it."""
        data = JobFinished(job_id=job_id, agent=self._ctx.id, status=status, **fields)  # type: ignore[arg-type]
        for attempt in range(_FINISH_ATTEMPTS):
            try:
                await self.emit(data)
                break
            except FleetError as exc:
                logger.error(
                    "! could not record job %s %s (attempt %d): %s",
                    job_id,
                    status,
                    attempt + 1,
                    exc,
                )
        else:
            # Left unfinished in the journal: reported as abandoned after a restart.
            return
        self._ctx.journal.record(job_id, "finished", status=status)
        counters = self._ctx.counters
        counters.finished[status] = counters.finished.get(status, 0) + 1
        if status == "rejected":
            logger.warning("! job %s rejected: %s", job_id, fields.get("reason"))
