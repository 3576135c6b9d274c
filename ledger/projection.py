"""Folding the event log into the state of every job, agent and rollout. Pure: no I/O.

``Projection.apply`` takes events in log order and updates plain records (see
:mod:`ledger.views`), each event type through its own function in :mod:`ledger.apply`.
The master keeps one live; ``fleet jobs``, ``fleet job show`` and ``fleet replay`` build
one from the log themselves (through :mod:`ledger.driver`), so what they print and what
the master says can never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ledger.apply import APPLY
from ledger.views import AgentView, JobView, RolloutView
from schemas import Event, EventData, UnknownEvent


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
    """Events kept but not understood, by ``"<type> (<reason>)"`` or ``"undecodable"``."""

    def apply(self, seq: int, event: Event[EventData] | UnknownEvent) -> None:
        """Fold one event (``seq`` is its stream sequence)."""
        if isinstance(event, UnknownEvent):
            self.note(seq, f"{event.type} ({event.reason})")
            return
        self.seq = max(self.seq, seq)
        self.events += 1
        apply = APPLY.get(type(event.data))
        if apply is not None:
            apply(self, event.data, event.envelope.ts)

    def note(self, seq: int, why: str) -> None:
        """Count an event that is in the log but changes no record, under ``why``."""
        self.seq = max(self.seq, seq)
        self.events += 1
        self.unknown[why] = self.unknown.get(why, 0) + 1

    def apply_undecodable(self, seq: int) -> None:
        """Count an event that could not be decoded; it is listed, never fatal."""
        self.note(seq, "undecodable")

    def job(self, job_id: str, agent: str) -> JobView:
        """The job's record, created on first mention."""
        job = self.jobs.get(job_id)
        if job is None:
            job = self.jobs[job_id] = JobView(job_id=job_id, agent=agent)
        return job

    def agent(self, agent_id: str) -> AgentView:
        """The agent's record, created on first mention."""
        agent = self.agents.get(agent_id)
        if agent is None:
            agent = self.agents[agent_id] = AgentView(id=agent_id)
        return agent

    def rollout(self, version: str) -> RolloutView:
        """The version's rollout record, created on first mention."""
        rollout = self.rollouts.get(version)
        if rollout is None:
            rollout = self.rollouts[version] = RolloutView(version=version)
        return rollout

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
