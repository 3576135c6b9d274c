"""What each event type does to the projection: one apply function per type.

:data:`APPLY` maps an event's data class to its function; :meth:`Projection.apply
<ledger.projection.Projection.apply>` looks the type up there. An event type with no
entry is counted and otherwise changes nothing, so adding a type to the schemas never
breaks the fold, and adding its meaning is one registered function.

The first terminal event of a job wins: a second ``job.finished`` (an agent that crashed
between publishing and journaling it publishes again) never changes a recorded outcome.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ledger.views import LATE_RESULTS_KEPT, describe_command
from schemas import (
    AgentDeregistered,
    AgentOffline,
    AgentOnline,
    AgentRegistered,
    AgentUnsupported,
    EventData,
    JobCancelRequested,
    JobFinished,
    JobLateResult,
    JobStarted,
    JobSubmitted,
    SettingsChanged,
    UpdateAnnounced,
    UpdateApplied,
    UpdateFailed,
    UpdatePublished,
    UpdateRolledBack,
    UpdateRolloutHalted,
    UpdateTokenAcquired,
    UpdateTokenReleased,
)

if TYPE_CHECKING:
    from ledger.projection import Projection

D = TypeVar("D", bound=EventData)
Applier = Callable[["Projection", Any, int], None]
"""``apply(projection, data, ts)``: fold one event's data, ``ts`` its envelope time."""

APPLY: dict[type[EventData], Applier] = {}


def applies(*types: type[D]) -> Callable[[Callable[[Projection, D, int], None]], Applier]:
    """Register the decorated function as the meaning of events of ``types``."""

    def register(function: Callable[[Projection, D, int], None]) -> Applier:
        for kind in types:
            if kind in APPLY:
                raise ValueError(f"{kind.TYPE} already has an apply function")
            APPLY[kind] = function
        return function

    return register


# --- jobs ----------------------------------------------------------------------------------


@applies(JobSubmitted)
def job_submitted(p: Projection, data: JobSubmitted, ts: int) -> None:
    job = p.job(data.job_id, data.agent)
    job.submitted_by = data.submitted_by
    job.run_as = data.request.run_as
    job.command = describe_command(data.request.command)
    job.submitted_at = ts


@applies(JobStarted)
def job_started(p: Projection, data: JobStarted, ts: int) -> None:
    job = p.job(data.job_id, data.agent)
    if not job.finished:
        job.status = "running"
        job.started_at = ts
        job.effective_user = data.effective_user
        running = p.agent(data.agent).running
        if data.job_id not in running:  # a repeated start must not grow the list
            running.append(data.job_id)


@applies(JobCancelRequested)
def job_cancel_requested(p: Projection, data: JobCancelRequested, ts: int) -> None:
    p.job(data.job_id, data.agent).cancel_requested_by = data.requested_by


@applies(JobLateResult)
def job_late_result(p: Projection, data: JobLateResult, ts: int) -> None:
    # Never the outcome: what a loser of the race for the job's end knew, beside it.
    job = p.job(data.job_id, data.agent)
    if len(job.late_results) < LATE_RESULTS_KEPT:
        job.late_results.append(
            {
                "status": data.status,
                "exit_code": data.exit_code,
                "reason": data.reason,
                "at": ts,
            }
        )


@applies(JobFinished)
def job_finished(p: Projection, data: JobFinished, ts: int) -> None:
    job = p.job(data.job_id, data.agent)
    if job.finished:
        return
    job.status = data.status
    job.exit_code, job.signal = data.exit_code, data.signal
    job.finished_at = ts
    job.duration_s, job.reason = data.duration_s, data.reason
    job.stdout_bytes, job.stderr_bytes = data.stdout_bytes, data.stderr_bytes
    job.truncated, job.output_tail = data.truncated, data.output_tail
    job.output_chunks = data.output_chunks
    running = p.agent(data.agent).running
    if data.job_id in running:
        running.remove(data.job_id)


# --- agents --------------------------------------------------------------------------------


@applies(AgentOnline)
def agent_online(p: Projection, data: AgentOnline, ts: int) -> None:
    agent = p.agent(data.agent)
    agent.transition(ts, online=True)
    agent.version, agent.host = data.version, data.host
    agent.labels, agent.last_seen = dict(data.labels), ts
    agent.unsupported = None


@applies(AgentOffline)
def agent_offline(p: Projection, data: AgentOffline, ts: int) -> None:
    agent = p.agent(data.agent)
    agent.transition(ts, online=False)
    agent.last_seen = data.last_seen or ts


@applies(AgentRegistered)
def agent_registered(p: Projection, data: AgentRegistered, ts: int) -> None:
    agent = p.agent(data.agent)
    agent.public_key, agent.labels = data.public_key, dict(data.labels)
    agent.configured = True


@applies(AgentDeregistered)
def agent_deregistered(p: Projection, data: AgentDeregistered, ts: int) -> None:
    p.agent(data.agent).configured = False


@applies(AgentUnsupported)
def agent_unsupported(p: Projection, data: AgentUnsupported, ts: int) -> None:
    p.agent(data.agent).unsupported = data.reason


# --- updates and rollouts ------------------------------------------------------------------


@applies(UpdatePublished)
def update_published(p: Projection, data: UpdatePublished, ts: int) -> None:
    rollout = p.rollout(data.version)
    rollout.sha256, rollout.published_at = data.sha256, ts


@applies(UpdateAnnounced)
def update_announced(p: Projection, data: UpdateAnnounced, ts: int) -> None:
    # A new announcement is a new attempt: earlier failures no longer count.
    rollout = p.rollout(data.version)
    rollout.announced_at, rollout.canary = ts, data.canary
    rollout.max_failures, rollout.halted = data.max_failures, None
    rollout.canaries = list(data.canaries)
    rollout.failures = rollout.failures_before_resume = 0
    rollout.agents = {a: s for a, s in rollout.agents.items() if s == "applied"}
    p.target = data.version


@applies(UpdateTokenAcquired)
def update_token_acquired(p: Projection, data: UpdateTokenAcquired, ts: int) -> None:
    p.rollout(data.version).agents[data.agent] = "token"


@applies(UpdateTokenReleased)
def update_token_released(p: Projection, data: UpdateTokenReleased, ts: int) -> None:
    agents = p.rollout(data.version).agents
    if agents.get(data.agent) == "token":
        agents[data.agent] = "downloaded"


@applies(UpdateApplied)
def update_applied(p: Projection, data: UpdateApplied, ts: int) -> None:
    p.rollout(data.version).agents[data.agent] = "applied"
    agent = p.agent(data.agent)
    agent.version, agent.unsupported = data.version, None


@applies(UpdateFailed)
def update_failed(p: Projection, data: UpdateFailed, ts: int) -> None:
    rollout = p.rollout(data.version)
    rollout.agents[data.agent] = "failed"
    rollout.failures += 1


@applies(UpdateRolledBack)
def update_rolled_back(p: Projection, data: UpdateRolledBack, ts: int) -> None:
    rollout = p.rollout(data.version)
    rollout.agents[data.agent] = "rolled_back"
    rollout.failures += 1


@applies(UpdateRolloutHalted)
def update_rollout_halted(p: Projection, data: UpdateRolloutHalted, ts: int) -> None:
    p.rollout(data.version).halted = data.reason


@applies(SettingsChanged)
def settings_changed(p: Projection, data: SettingsChanged, ts: int) -> None:
    # Resuming a halted rollout starts its failure count afresh.
    if data.key == "update.paused" and data.value is False and data.version:
        rollout = p.rollout(data.version)
        rollout.failures_before_resume, rollout.halted = rollout.failures, None
