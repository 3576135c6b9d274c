"""The agent's Prometheus metrics (off unless ``metrics_listen`` is set): its slots and
running jobs, its journal, its publish retries and reconnects, read when scraped."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from bus.metrics import Family, Registry
from bus.publish import STATS

if TYPE_CHECKING:
    from agentd.agent import Agent


def agent_registry(current: Callable[[], Agent | None]) -> Registry:
    """A registry answering for the agent ``current()`` returns (None while it starts)."""
    registry = Registry()

    async def collect() -> Iterable[Family]:
        agent = current()
        if agent is None:
            return [Family("fleet_agent_ready", "gauge", "1 while taking jobs").add(0)]
        labels = {"agent": agent.id}
        ctx = agent.ctx
        try:
            journal = ctx.config.journal_path.stat().st_size
        except OSError:
            journal = 0
        finished = Family("fleet_agent_jobs_finished_total", "counter", "jobs ended, by status")
        for status, count in sorted(ctx.counters.finished.items()):
            finished.add(count, status=status, **labels)
        return [
            Family("fleet_agent_jobs_running", "gauge", "jobs running now").add(
                len(ctx.jobs), **labels
            ),
            Family("fleet_agent_job_slots", "gauge", "jobs it may run at once (max_jobs)").add(
                ctx.config.max_jobs, **labels
            ),
            Family("fleet_agent_jobs_started_total", "counter", "jobs started").add(
                ctx.counters.started, **labels
            ),
            finished,
            Family("fleet_agent_journal_bytes", "gauge", "size of the job journal").add(
                journal, **labels
            ),
            Family(
                "fleet_agent_publish_retries_total",
                "counter",
                "event publishes repeated because no stream answered",
            ).add(STATS.retries, **labels),
            Family("fleet_bus_reconnects_total", "counter", "reconnects to NATS").add(
                ctx.bus.reconnects, **labels
            ),
            Family("fleet_bus_connected", "gauge", "1 while connected to NATS").add(
                1 if ctx.bus.connected else 0, **labels
            ),
            Family("fleet_agent_ready", "gauge", "1 while taking jobs").add(
                1 if agent.ready.is_set() else 0, **labels
            ),
            ctx.counters.steps.family(),
        ]

    registry.add("agent", collect)
    return registry


def agent_readiness(current: Callable[[], Agent | None]) -> str | None:
    """None when the agent is connected and taking jobs; otherwise why not."""
    agent = current()
    if agent is None:
        return "starting: waiting for NATS and the fleet's streams"
    if not agent.ctx.bus.connected:
        return "not connected to NATS"
    if not agent.ready.is_set():
        return "not taking jobs yet"
    return None
