"""What the parts of one agent share: identity, configuration, journal and running jobs.

The agent (:mod:`agentd.agent`) owns one :class:`AgentContext` and hands it to its
consumer, runner, presence and control parts; a reload replaces ``config`` and ``trust``
here, so every part sees the new values at its next step. ``seals`` remembers the sealed
run-as passwords already used, so each is good once even across restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from agentd.config import AgentConfig
from agentd.journal import Journal
from agentd.offer import Offer
from agentd.seals import UsedSeals
from agentd.supervise import StopRequest
from agentd.trust import TrustFile, load_trust
from bus import Bus, Signer
from bus.metrics import Histogram


@dataclass
class RunningJob:
    """A job this agent has taken and not yet finished.

    ``delivery`` is its message as the log stored it: the runner settles it (taken,
    ended) or leaves it queued. The same job heard again meanwhile (live and on catching
    up) is known by its id and not offered twice, so only this offer is ever settled.
    """

    job_id: str
    delivery: Offer
    stop: StopRequest = field(default_factory=StopRequest)
    task: asyncio.Task[None] | None = None


STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0)
"""Seconds: the steps around a job's process take milliseconds when all is well."""


@dataclass
class Counters:
    """What this agent has done since it started, for ``status``."""

    started: int = 0
    finished: dict[str, int] = field(default_factory=dict)
    malformed: int = 0
    duplicates_skipped: int = 0
    late_results: int = 0
    steps: Histogram = field(
        default_factory=lambda: Histogram(
            "fleet_agent_job_step_seconds",
            "wall time of each step on a job's path: before_start (the log asked for an "
            "outcome or cancel), journal (the fsync before the spawn), spawn, run (until "
            "the process and its output ended), started and finished (recording them)",
            STEP_BUCKETS,
        )
    )
    """Where a job's time goes, for metrics and ``bench.roundtrip``."""

    @contextlib.contextmanager
    def timed(self, step: str, agent: str) -> Iterator[None]:
        """Count the wall time of the block as ``step`` (also when it raises)."""
        begun = time.perf_counter()
        try:
            yield
        finally:
            self.steps.observe(time.perf_counter() - begun, step=step, agent=agent)

    def as_dict(self) -> dict[str, object]:
        return {
            "started": self.started,
            "finished": dict(self.finished),
            "malformed": self.malformed,
            "duplicates_skipped": self.duplicates_skipped,
            "late_results": self.late_results,
        }


def effective_user() -> str:
    """The name of the user the agent (and so, in ``self`` mode, every job) runs as."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def trust_of(config: AgentConfig) -> TrustFile | None:
    """The trust file the configuration names, loaded; None when it names none.

    Raises:
        UsageError: the file is missing or invalid.
    """
    return load_trust(config.trust_file) if config.trust_file else None


@dataclass
class AgentContext:
    """The shared state of one agent. Mutated only by the agent's own event loop."""

    bus: Bus
    signer: Signer
    config: AgentConfig
    journal: Journal
    seals: UsedSeals
    trust: TrustFile | None = None
    user: str = field(default_factory=effective_user)
    counters: Counters = field(default_factory=Counters)
    jobs: dict[str, RunningJob] = field(default_factory=dict)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    slot_free: asyncio.Event = field(default_factory=asyncio.Event)
    hub_returned: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the hub answers again after the agent's requests to it failed: jobs sent
    meanwhile were not heard live (a leaf link down is invisible to our own connection)."""

    @property
    def id(self) -> str:
        return self.config.id
