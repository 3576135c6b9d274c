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
    AgentOffline,
    AgentOnline,
    AgentRegistered,
    ArgvCommand,
    Command,
    Event,
    EventData,
    JobCancelRequested,
    JobFinished,
    JobStarted,
    JobSubmitted,
    ModuleCommand,
    UnknownEvent,
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
    running: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "online": self.online,
            "version": self.version,
            "labels": self.labels,
            "last_seen": iso(self.last_seen),
            "running": sorted(self.running),
        }


@dataclass
class Projection:
    """Jobs and agents, folded from events in log order."""

    jobs: dict[str, JobView] = field(default_factory=dict)
    agents: dict[str, AgentView] = field(default_factory=dict)
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
            agent.online, agent.version, agent.host = True, data.version, data.host
            agent.labels, agent.last_seen = dict(data.labels), ts
        elif isinstance(data, AgentOffline):
            agent = self._agent(data.agent)
            agent.online = False
            agent.last_seen = data.last_seen or ts
        elif isinstance(data, AgentRegistered):
            agent = self._agent(data.agent)
            agent.public_key, agent.labels = data.public_key, dict(data.labels)

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
