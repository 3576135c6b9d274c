"""The records the fold keeps: one job, one agent, one rollout, as the log tells them.

Plain dataclasses, so a snapshot is their fields and a reply is their ``to_json``.
"""

from __future__ import annotations

import datetime
import shlex
from dataclasses import asdict, dataclass, field
from typing import Any

from schemas import TERMINAL_STATUSES, ArgvCommand, Command, ModuleCommand


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
    late_results: list[dict[str, Any]] = field(default_factory=list)
    """Outcomes that lost to the recorded one (``job.late_result``), shown beside it:
    ``{"status", "exit_code", "reason", "at"}``, the first :data:`LATE_RESULTS_KEPT`."""

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


LATE_RESULTS_KEPT = 4
"""How many late results a :class:`JobView` keeps; the rest are only counted as events."""

TRANSITIONS_KEPT = 20
"""How many online/offline changes an :class:`AgentView` remembers."""


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

    def transition(self, ts: int, *, online: bool) -> None:
        """Go online or offline at ``ts``; only changes (and the first state) are remembered."""
        if self.online != online or not self.transitions:
            self.transitions = [*self.transitions, (ts, online)][-TRANSITIONS_KEPT:]
        self.online = online

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
