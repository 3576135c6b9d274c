"""The outcomes the master records for jobs whose agent cannot: abandoned, expired, cancelled.

Each is a ``job.finished`` on the job's ``.finished`` subject, published only if that
subject is still empty (``expected_last_subject_seq=0``): when the agent's own result (or
any earlier outcome) got there first, the server refuses ours and the master records
nothing terminal, so a job never has two outcomes. Its ids are stable (derived from the
job, the master and the status), so a retry after an outage or a restart is recognised
as the same event.

- ``abandoned``: the job ran on an agent that has been offline for ``offline_grace_s``.
- ``expired``: the job is still queued past its ``expires_at``; at once if its agent is
  offline, else after a further ``offline_grace_s`` (an online agent checks expiry
  itself before it starts a job, and may be starting it this very moment).
- ``cancelled``: a cancel was requested for a job still queued; at once if its agent is
  offline, else after ``offline_grace_s`` (an online agent with a free slot handles the
  cancel itself, and a busy one does not look at its queue until a slot frees).

The agent, when it fetches such a job later, finds the outcome on the subject and does
not run it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from bus import (
    BadMessageError,
    Bus,
    FleetError,
    Signer,
    SubjectTakenError,
    decode_envelope,
    sign_envelope,
)
from bus.codec import decode_data
from bus.log import last_message
from bus.publish import DEFAULT_DEADLINE_S
from schemas import (
    Event,
    JobCancelRequested,
    JobFinished,
    JobStarted,
    JobSubmitted,
    UnknownEvent,
    make_envelope,
)

if TYPE_CHECKING:
    from ledger.driver import Entry
    from ledger.projection import Projection
    from master.controller import Master

logger = logging.getLogger(__name__)

MasterStatus = Literal["abandoned", "expired", "cancelled"]
_SWEEP_S = 1.0  # how often queued jobs are checked against their expiry and cancels


@dataclass
class _Queued:
    agent: str
    expires_at: int | None = None
    cancel_requested_at: int | None = None
    cancelled_by: str | None = None


class Outcomes:
    """Decides and records the master's job outcomes.

    Args:
        bus: the connection.
        signer: the master's key.
        source: the master's principal id.
        grace_s: how long an agent may be away before its jobs are its no longer
            (``offline_grace_s``).
    """

    def __init__(
        self,
        bus: Bus,
        signer: Signer,
        source: str,
        grace_s: float,
        fence: Callable[[], float] | None = None,
    ) -> None:
        self.bus = bus
        self.fence = fence
        """Seconds left to publish in, or raises :class:`~bus.errors.NotActiveError`
        (the master lease); None: no fence."""
        self.signer = signer
        self.source = source
        self.grace_s = grace_s
        self._queued: dict[str, _Queued] = {}
        self._decided: set[str] = set()
        self._caught_up = False
        self.recorded: dict[str, int] = {}
        """How many outcomes of each status this master recorded (for its log and tests)."""

    @classmethod
    def for_master(cls, master: Master) -> Outcomes:
        """Outcomes wired into a master: it sees every folded event, and sweeps once a
        second while the master serves (the first sweep learns what a snapshot hid)."""
        outcomes = cls(
            master.bus,
            master.signer,
            master.config.id,
            master.config.offline_grace_s,
            fence=master.leadership.check,
        )
        master.on_folded(outcomes.folded)
        master.every(
            _SWEEP_S, lambda: outcomes.sweep(master.projection, time.time_ns()), "outcomes"
        )
        return outcomes

    # --- what the log says ------------------------------------------------------------------

    def folded(self, entry: Entry) -> None:
        """A master fold listener: :meth:`observe` every decoded event."""
        if entry.event is not None:
            self.observe(entry.event)

    def observe(self, event: Event[Any] | UnknownEvent) -> None:
        """Note what a folded event means for queued jobs (called for every event)."""
        if isinstance(event, UnknownEvent):
            return
        data = event.data
        if isinstance(data, JobSubmitted):
            self._queued[data.job_id] = _Queued(data.agent, data.request.expires_at)
        elif isinstance(data, JobStarted | JobFinished):
            self._queued.pop(data.job_id, None)
        elif isinstance(data, JobCancelRequested) and data.job_id in self._queued:
            queued = self._queued[data.job_id]
            if queued.cancel_requested_at is None:
                queued.cancel_requested_at = event.envelope.ts
                queued.cancelled_by = data.requested_by

    async def catch_up(self, projection: Projection) -> None:
        """After loading a snapshot: learn the expiry of jobs queued before it."""
        for job in list(projection.jobs.values()):
            if job.status != "submitted" or job.job_id in self._queued:
                continue
            subject = self.bus.subjects.job_event(job.agent, job.job_id, "submitted")
            try:
                record = await last_message(self.bus, self.bus.subjects.events_stream, subject)
                event = decode_data(decode_envelope(record.data)) if record else None
            except (FleetError, BadMessageError) as exc:
                logger.warning("! cannot read job %s's submission: %s", job.job_id, exc)
                continue
            if isinstance(event, Event) and isinstance(event.data, JobSubmitted):
                queued = _Queued(job.agent, event.data.request.expires_at)
                if job.cancel_requested_by is not None:
                    queued.cancel_requested_at = time.time_ns()
                    queued.cancelled_by = job.cancel_requested_by
                self._queued[job.job_id] = queued

    # --- deciding ----------------------------------------------------------------------------

    async def sweep(self, projection: Projection, now_ns: int) -> None:
        """Record what is due: ``abandoned``, ``expired``, ``cancelled``."""
        if not self._caught_up:
            await self.catch_up(projection)
            self._caught_up = True
        grace_ns = int(self.grace_s * 1e9)
        for view in list(projection.agents.values()):
            # Also what a grace timer would have done, had the master not restarted.
            offline_since = next((ts for ts, on in reversed(view.transitions) if not on), None)
            gone = not view.online and offline_since is not None
            if view.running and gone and now_ns >= (offline_since or 0) + grace_ns:
                await self.abandon(projection, view.id)
        for job_id, queued in list(self._queued.items()):
            job = projection.jobs.get(job_id)
            if job is None or job.status != "submitted":
                self._queued.pop(job_id, None)
                continue
            agent = projection.agents.get(queued.agent)
            online = agent is not None and agent.online
            margin = grace_ns if online else 0
            if queued.cancel_requested_at is not None and (
                now_ns >= queued.cancel_requested_at + margin
            ):
                where = "its agent is online but has not started it" if online else "offline"
                await self.record(
                    queued.agent,
                    job_id,
                    "cancelled",
                    f"cancelled by {queued.cancelled_by} before it started ({where})",
                )
            elif queued.expires_at is not None and now_ns >= queued.expires_at + margin:
                waited = (now_ns - (job.submitted_at or now_ns)) / 1e9
                where = "was not started by its agent" if online else "its agent is offline"
                await self.record(
                    queued.agent,
                    job_id,
                    "expired",
                    f"not started before its expiry ({where}; waited {waited:.0f}s)",
                )

    async def abandon(self, projection: Projection, agent_id: str) -> None:
        """Record ``abandoned`` for every job still running on an agent gone past the grace."""
        view = projection.agents.get(agent_id)
        if view is None or view.online:
            return
        for job_id in list(view.running):
            job = projection.jobs.get(job_id)
            if job is None or job.finished:
                continue
            reason = f"agent {agent_id} offline for more than {self.grace_s:g}s"
            await self.record(agent_id, job_id, "abandoned", reason)

    async def record(self, agent: str, job_id: str, status: MasterStatus, reason: str) -> bool:
        """Publish the job's outcome if it has none yet.

        Returns:
            True when this is the job's outcome; False when another was recorded first
            (or this master already decided the job).

        Raises:
            FleetError: the outcome could not be published (the next sweep tries again,
                with the same id).
        """
        if job_id in self._decided:
            return False
        subject = self.bus.subjects.job_event(agent, job_id, "finished")
        data = JobFinished(job_id=job_id, agent=agent, status=status, reason=reason)
        envelope = make_envelope(
            data,
            source=self.source,
            subject=subject,
            event_id=self.signer.stable_id(job_id, "finished", self.source, status),
        )
        left = self.fence() if self.fence is not None else DEFAULT_DEADLINE_S
        try:
            await self.bus.publish_event(
                sign_envelope(envelope, self.signer), expected_last_subject_seq=0, deadline_s=left
            )
        except SubjectTakenError as exc:
            logger.info("job %s already has an outcome (seq %d); not %s", job_id, exc.seq, status)
            self._settle(job_id)
            return False
        logger.warning("job %s %s: %s", job_id, status, reason)
        self._settle(job_id)
        self.recorded[status] = self.recorded.get(status, 0) + 1
        return True

    def _settle(self, job_id: str) -> None:
        self._decided.add(job_id)
        self._queued.pop(job_id, None)
