"""Folding the event log into the state of every job and agent. Pure: no I/O.

``Projection.apply`` takes events in log order and updates plain records. The master
keeps one live; ``fleet jobs``, ``fleet job show`` and ``fleet replay`` build one from
the log themselves, so what they print and what the master says can never disagree.

The first terminal event of a job wins: a second ``job.finished`` (an agent that crashed
between publishing and journaling it publishes again) never changes a recorded outcome.
"""

from __future__ import annotations

import datetime
import shlex
from dataclasses import asdict, dataclass, field
from typing import Any

from schemas import (
    TERMINAL_STATUSES,
    AgentDeregistered,
    AgentOffline,
    AgentOnline,
    AgentRegistered,
    AgentUnsupported,
    ArgvCommand,
    Command,
    Event,
    EventData,
    JobCancelRequested,
    JobFinished,
    JobStarted,
    JobSubmitted,
    ModuleCommand,
    SettingsChanged,
    UnknownEvent,
    UpdateAnnounced,
    UpdateApplied,
    UpdateFailed,
    UpdatePublished,
    UpdateRolledBack,
    UpdateRolloutHalted,
    UpdateTokenAcquired,
    UpdateTokenReleased,
)


def iso(ts_ns: int | None) -> str | None:
    """An event time as RFC 3339 UTC with milliseconds, as the JSON output shows it."""
    if ts_ns is None:
        return None
    moment = datetime.datetime.fromtimestamp(ts_ns / 1e9, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def describe_command(command: Command) -> str:
    """A one-line human description of what a job runs."""
    if isinstance(command, ArgvCommand):
        return shlex.join(command.argv)
    if isinstance(command, ModuleCommand):
        return f"module {command.module} {shlex.join(command.args)}".rstrip()
    first = command.script.strip().splitlines()[0] if command.script.strip() else ""
    return f"script: {first[:60]}"


@dataclass
class JobView:
    """One job as the log tells it."""

    job_id: str
    agent: str
    status: str = "submitted"
    exit_code: int | None = None
    signal: int | None = None
    submitted_by: str | None = None
    run_as: str | None = None
    effective_user: str | None = None
    command: str | None = None
    submitted_at: int | None = None
    started_at: int | None = None
    finished_at: int | None = None
    duration_s: float | None = None
    reason: str | None = None
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    truncated: bool = False
    output_tail: str = ""
    output_chunks: int = 0
    cancel_requested_by: str | None = None

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_STATUSES

    def to_json(self, *, tail: bool = False) -> dict[str, Any]:
        """The contract's JSON shape of ``fleet job show --json``."""
        doc = asdict(self)
        for key in ("submitted_at", "started_at", "finished_at"):
            doc[key] = iso(doc[key])
        if not tail:
            doc.pop("output_tail")
        return doc


@dataclass
class AgentView:
    """One agent as the log tells it (presence adds what is live)."""

    id: str
    online: bool = False
    version: str | None = None
    host: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    last_seen: int | None = None
    public_key: str | None = None
    configured: bool = False
    unsupported: str | None = None
    """Why the agent runs a version other than the target and may not update, if so."""
    running: list[str] = field(default_factory=list)
    transitions: list[tuple[int, bool]] = field(default_factory=list)
    """The last online/offline changes, ``(ts, online)``, newest last."""

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "online": self.online,
            "configured": self.configured,
            "version": self.version,
            "labels": self.labels,
            "last_seen": iso(self.last_seen),
            "running": sorted(self.running),
            "unsupported": self.unsupported,
        }


_TRANSITIONS_KEPT = 20


@dataclass
class RolloutView:
    """One release version's way through the fleet."""

    version: str
    sha256: str | None = None
    published_at: int | None = None
    announced_at: int | None = None
    canary: int = 0
    max_failures: int = 0
    canaries: list[str] = field(default_factory=list)
    agents: dict[str, str] = field(default_factory=dict)
    """Agent id → ``token``, ``downloaded``, ``applied``, ``failed`` or ``rolled_back``."""
    failures: int = 0
    failures_before_resume: int = 0
    """Failures counted before the last ``resume``; the halt limit applies to the rest."""
    halted: str | None = None

    @property
    def failures_since_resume(self) -> int:
        return self.failures - self.failures_before_resume

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["published_at"], doc["announced_at"] = iso(self.published_at), iso(self.announced_at)
        return doc


@dataclass
class Projection:
    """Jobs, agents and rollouts, folded from events in log order."""

    jobs: dict[str, JobView] = field(default_factory=dict)
    agents: dict[str, AgentView] = field(default_factory=dict)
    rollouts: dict[str, RolloutView] = field(default_factory=dict)
    target: str | None = None
    """The version last announced."""
    seq: int = 0
    events: int = 0
    unknown: dict[str, int] = field(default_factory=dict)

    def apply(self, seq: int, event: Event[EventData] | UnknownEvent) -> None:
        """Fold one event (``seq`` is its stream sequence)."""
        self.seq = max(self.seq, seq)
        self.events += 1
        if isinstance(event, UnknownEvent):
            key = f"{event.type} ({event.reason})"
            self.unknown[key] = self.unknown.get(key, 0) + 1
            return
        data, ts = event.data, event.envelope.ts
        if isinstance(data, JobSubmitted):
            job = self._job(data.job_id, data.agent)
            job.submitted_by = data.submitted_by
            job.run_as = data.request.run_as
            job.command = describe_command(data.request.command)
            job.submitted_at = ts
        elif isinstance(data, JobStarted):
            job = self._job(data.job_id, data.agent)
            if not job.finished:
                job.status = "running"
                job.started_at = ts
                job.effective_user = data.effective_user
                self._agent(data.agent).running.append(data.job_id)
        elif isinstance(data, JobCancelRequested):
            self._job(data.job_id, data.agent).cancel_requested_by = data.requested_by
        elif isinstance(data, JobFinished):
            job = self._job(data.job_id, data.agent)
            if job.finished:
                return
            job.status = data.status
            job.exit_code, job.signal = data.exit_code, data.signal
            job.finished_at = ts
            job.duration_s, job.reason = data.duration_s, data.reason
            job.stdout_bytes, job.stderr_bytes = data.stdout_bytes, data.stderr_bytes
            job.truncated, job.output_tail = data.truncated, data.output_tail
            job.output_chunks = data.output_chunks
            running = self._agent(data.agent).running
            if data.job_id in running:
                running.remove(data.job_id)
        elif isinstance(data, AgentOnline):
            agent = self._agent(data.agent)
            self._transition(agent, ts, online=True)
            agent.version, agent.host = data.version, data.host
            agent.labels, agent.last_seen = dict(data.labels), ts
            agent.unsupported = None
        elif isinstance(data, AgentOffline):
            agent = self._agent(data.agent)
            self._transition(agent, ts, online=False)
            agent.last_seen = data.last_seen or ts
        elif isinstance(data, AgentRegistered):
            agent = self._agent(data.agent)
            agent.public_key, agent.labels = data.public_key, dict(data.labels)
            agent.configured = True
        elif isinstance(data, AgentDeregistered):
            self._agent(data.agent).configured = False
        elif isinstance(data, UpdatePublished):
            rollout = self._rollout(data.version)
            rollout.sha256, rollout.published_at = data.sha256, ts
        elif isinstance(data, UpdateAnnounced):
            # A new announcement is a new attempt: earlier failures no longer count.
            rollout = self._rollout(data.version)
            rollout.announced_at, rollout.canary = ts, data.canary
            rollout.max_failures, rollout.halted = data.max_failures, None
            rollout.canaries = list(data.canaries)
            rollout.failures = rollout.failures_before_resume = 0
            rollout.agents = {a: s for a, s in rollout.agents.items() if s == "applied"}
            self.target = data.version
        elif isinstance(data, UpdateTokenAcquired):
            self._rollout(data.version).agents[data.agent] = "token"
        elif isinstance(data, UpdateTokenReleased):
            agents = self._rollout(data.version).agents
            if agents.get(data.agent) == "token":
                agents[data.agent] = "downloaded"
        elif isinstance(data, UpdateApplied):
            self._rollout(data.version).agents[data.agent] = "applied"
            agent = self._agent(data.agent)
            agent.version, agent.unsupported = data.version, None
        elif isinstance(data, AgentUnsupported):
            self._agent(data.agent).unsupported = data.reason
        elif isinstance(data, SettingsChanged):
            if data.key == "update.paused" and data.value is False and data.version:
                rollout = self._rollout(data.version)
                rollout.failures_before_resume, rollout.halted = rollout.failures, None
        elif isinstance(data, UpdateFailed | UpdateRolledBack):
            rollout = self._rollout(data.version)
            rollout.agents[data.agent] = (
                "failed" if isinstance(data, UpdateFailed) else "rolled_back"
            )
            rollout.failures += 1
        elif isinstance(data, UpdateRolloutHalted):
            self._rollout(data.version).halted = data.reason

    def apply_undecodable(self, seq: int) -> None:
        """Count an event that could not be decoded; it is listed, never fatal."""
        self.seq = max(self.seq, seq)
        self.events += 1
        self.unknown["undecodable"] = self.unknown.get("undecodable", 0) + 1

    def _job(self, job_id: str, agent: str) -> JobView:
        job = self.jobs.get(job_id)
        if job is None:
            job = self.jobs[job_id] = JobView(job_id=job_id, agent=agent)
        return job

    def _agent(self, agent_id: str) -> AgentView:
        agent = self.agents.get(agent_id)
        if agent is None:
            agent = self.agents[agent_id] = AgentView(id=agent_id)
        return agent

    def _rollout(self, version: str) -> RolloutView:
        rollout = self.rollouts.get(version)
        if rollout is None:
            rollout = self.rollouts[version] = RolloutView(version=version)
        return rollout

    @staticmethod
    def _transition(agent: AgentView, ts: int, *, online: bool) -> None:
        if agent.online != online or not agent.transitions:
            agent.transitions = [*agent.transitions, (ts, online)][-_TRANSITIONS_KEPT:]
        agent.online = online

    # --- snapshots and comparison ------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        """Plain data (maps, lists, scalars) that :meth:`from_state` turns back into this.

        The records are live views, not copies: encode or compare them, never mutate.
        """
        # vars(), not asdict(): a shallow view is enough to encode, and asdict's deep copy
        # of every record made snapshots of large logs several times slower.
        return {
            "jobs": {k: vars(v) for k, v in self.jobs.items()},
            "agents": {k: vars(v) for k, v in self.agents.items()},
            "rollouts": {k: vars(v) for k, v in self.rollouts.items()},
            "target": self.target,
            "seq": self.seq,
            "events": self.events,
            "unknown": dict(self.unknown),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Projection:
        """Rebuild from :meth:`to_state`'s data.

        Raises:
            ValueError: the data does not have that shape (a corrupt or foreign snapshot).
        """
        try:
            agents = {}
            for key, value in state["agents"].items():
                value = dict(value)
                value["transitions"] = [(int(t), bool(o)) for t, o in value.get("transitions", [])]
                agents[key] = AgentView(**value)
            return cls(
                jobs={k: JobView(**v) for k, v in state["jobs"].items()},
                agents=agents,
                rollouts={k: RolloutView(**v) for k, v in state["rollouts"].items()},
                target=state.get("target"),
                seq=int(state["seq"]),
                events=int(state["events"]),
                unknown={str(k): int(v) for k, v in state["unknown"].items()},
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a projection state: {exc}") from None


def differences(a: Projection, b: Projection, limit: int = 40) -> list[str]:
    """Readable lines saying where two projections differ (empty when equal)."""
    out: list[str] = []

    def walk(path: str, x: Any, y: Any) -> None:
        if len(out) >= limit:
            return
        if isinstance(x, dict) and isinstance(y, dict):
            for key in sorted(set(x) | set(y), key=str):
                if key not in x:
                    out.append(f"{path}.{key}: only in the second ({_short(y[key])})")
                elif key not in y:
                    out.append(f"{path}.{key}: only in the first ({_short(x[key])})")
                else:
                    walk(f"{path}.{key}", x[key], y[key])
        elif x != y:
            out.append(f"{path}: {_short(x)} ≠ {_short(y)}")

    walk("state", a.to_state(), b.to_state())
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "…"
