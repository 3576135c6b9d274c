"""The master's Prometheus metrics, read from its fold when scraped.

Counters of things that happened (jobs submitted and finished, logins denied) and the
job duration histogram are kept from the folded events: the first record folded
seeds the job counters from the projection (a snapshot's history included), each
later one adds to them; denials count from the master's start. Everything else
(agents, rollouts, fold lag, stream usage, snapshot and checkpoint age) is read from
the projection, the bus and the durability clock at scrape time, so it is never stale.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from bus.errors import FleetError
from bus.metrics import Counter, Family, Histogram, Registry
from bus.streaminfo import stream_usage
from schemas import AuthDenied, Event, JobFinished, JobSubmitted

if TYPE_CHECKING:
    from ledger.driver import Entry
    from master.controller import Master

ROLLOUT_STATES = ("token", "downloaded", "applied", "failed", "rolled_back")


class MasterMetrics:
    """Collects the master's families; :meth:`attach` plugs it into a running master."""

    def __init__(self, master: Master) -> None:
        self.master = master
        self.submitted = Counter("fleet_jobs_submitted_total", "jobs submitted, by agent")
        self.finished = Counter(
            "fleet_jobs_finished_total", "jobs that reached a terminal status, by status and agent"
        )
        self.duration = Histogram(
            "fleet_job_duration_seconds", "how long finished jobs ran, start to end"
        )
        self.denials = Counter(
            "fleet_auth_denials_total", "logins and requests refused, as recorded in the log"
        )
        self._seeded = False

    def attach(self, registry: Registry) -> None:
        """Count every record the master folds from now on, and answer scrapes."""
        self.master.on_folded(self.folded)
        registry.add("master", self.collect)

    # --- from the fold ----------------------------------------------------------------

    def seed(self) -> None:
        """Start the counters from what the projection holds now (once)."""
        self._seeded = True
        for job in self.master.projection.jobs.values():
            if job.submitted_at is not None:
                self.submitted.inc(agent=job.agent)
            if job.finished:
                self.finished.inc(status=job.status, agent=job.agent)
                if job.duration_s is not None:
                    self.duration.observe(job.duration_s)

    def folded(self, entry: Entry) -> None:
        """One record folded (called in log order, after the projection applied it)."""
        if not self._seeded:
            self.seed()  # includes this record
            return
        event = entry.event
        if entry.envelope is None or not isinstance(event, Event):
            return
        data = event.data
        if isinstance(data, JobSubmitted):
            self.submitted.inc(agent=data.agent)
        elif isinstance(data, JobFinished):
            self.finished.inc(status=data.status, agent=data.agent)
            duration = data.duration_s
            job = self.master.projection.jobs.get(data.job_id)
            if duration is None and job is not None:
                duration = job.duration_s  # e.g. abandoned: the fold's own account
            if duration is not None:
                self.duration.observe(duration)
        elif isinstance(data, AuthDenied):
            self.denials.inc()

    # --- at scrape time ---------------------------------------------------------------

    async def collect(self) -> Iterable[Family]:
        if not self._seeded:
            self.seed()
        master = self.master
        p = master.projection
        families = [
            self.submitted.family(),
            self.finished.family(),
            self.duration.family(),
            self.denials.family(),
            *self._agents(),
            *self._rollouts(),
        ]
        running = sum(len(a.running) for a in p.agents.values())
        families.append(
            Family("fleet_jobs_running", "gauge", "jobs started, not ended").add(running)
        )
        families.append(
            Family("fleet_master_ready", "gauge", "1 once caught up with the log").add(
                1 if master.ready.is_set() else 0
            )
        )
        families.append(
            Family(
                "fleet_master_active", "gauge", "1 while this master holds the master lease"
            ).add(1 if master.leadership.active else 0)
        )
        families.append(
            Family(
                "fleet_master_takeovers_total", "counter", "times this master became the active one"
            ).add(master.leadership.takeovers)
        )
        families.append(
            Family("fleet_master_events_folded_total", "counter", "events folded").add(p.events)
        )
        families.append(
            Family("fleet_master_folded_seq", "gauge", "stream sequence folded through").add(p.seq)
        )
        families.append(
            Family(
                "fleet_master_unverified_events_total",
                "counter",
                "live events whose signature did not verify",
            ).add(master.unverified)
        )
        families.append(
            Family(
                "fleet_master_undecodable_events_total", "counter", "records that are no event"
            ).add(master.driver.undecodable)
        )
        families.extend(self._durability())
        families.extend(await self._streams())
        families.append(
            Family("fleet_bus_connected", "gauge", "1 while connected to NATS").add(
                1 if master.bus.connected else 0
            )
        )
        families.append(
            Family("fleet_bus_reconnects_total", "counter", "reconnects to NATS").add(
                master.bus.reconnects
            )
        )
        return families

    def _agents(self) -> list[Family]:
        p, config = self.master.projection, self.master.config
        agents = p.agents.values()
        return [
            Family("fleet_agents_configured", "gauge", "agents in the master's registry").add(
                len(config.agents)
            ),
            Family("fleet_agents_known", "gauge", "agents the log mentions").add(len(p.agents)),
            Family("fleet_agents_online", "gauge", "agents online, as the log says").add(
                sum(1 for a in agents if a.online)
            ),
            Family(
                "fleet_agents_unsupported",
                "gauge",
                "agents on a version other than the target that may not update",
            ).add(sum(1 for a in agents if a.unsupported)),
        ]

    def _rollouts(self) -> list[Family]:
        p = self.master.projection
        progress = Family(
            "fleet_rollout_agents", "gauge", "agents of a version's rollout, by state"
        )
        failures = Family("fleet_rollout_failures_total", "counter", "failed updates, by version")
        halted = Family("fleet_rollout_halted", "gauge", "1 when the version's rollout is halted")
        target = Family("fleet_rollout_target", "gauge", "1 for the version announced last")
        for version, rollout in sorted(p.rollouts.items()):
            counts = dict.fromkeys(ROLLOUT_STATES, 0)
            for state in rollout.agents.values():
                counts[state] = counts.get(state, 0) + 1
            for state, count in counts.items():
                progress.add(count, version=version, state=state)
            failures.add(rollout.failures, version=version)
            halted.add(1 if rollout.halted else 0, version=version)
            target.add(1 if p.target == version else 0, version=version)
        return [progress, failures, halted, target]

    def _durability(self) -> list[Family]:
        durability = self.master.durability
        now = time.time()
        return [
            Family(
                "fleet_master_snapshot_age_seconds",
                "gauge",
                "since the last snapshot was stored (or the master started)",
            ).add(max(0.0, now - durability.last_snapshot_at)),
            Family(
                "fleet_master_checkpoint_age_seconds",
                "gauge",
                "since the last checkpoint was published (or the master started)",
            ).add(max(0.0, now - durability.last_checkpoint_at)),
            Family(
                "fleet_master_events_since_checkpoint",
                "gauge",
                "events folded that no checkpoint covers yet",
            ).add(durability.since_checkpoint),
        ]

    async def _streams(self) -> list[Family]:
        master = self.master
        subjects = master.subjects
        messages = Family("fleet_stream_messages", "gauge", "messages stored, by stream")
        size = Family("fleet_stream_bytes", "gauge", "bytes stored, by stream")
        max_messages = Family("fleet_stream_max_messages", "gauge", "message limit (0: none)")
        max_bytes = Family("fleet_stream_max_bytes", "gauge", "byte limit (0: none)")
        families = [messages, size, max_messages, max_bytes]
        for stream in (subjects.events_stream, subjects.output_stream):
            try:
                usage = await stream_usage(master.bus, stream)
            except FleetError:
                continue  # the bus is down: /readyz and fleet_bus_connected say so
            messages.add(usage.messages, stream=stream)
            size.add(usage.bytes, stream=stream)
            max_messages.add(usage.max_messages, stream=stream)
            max_bytes.add(usage.max_bytes, stream=stream)
            if stream == subjects.events_stream:
                families.append(
                    Family("fleet_events_stream_last_seq", "gauge", "newest event's sequence").add(
                        usage.last_seq
                    )
                )
                families.append(
                    Family(
                        "fleet_master_fold_lag_events",
                        "gauge",
                        "events stored but not yet folded",
                    ).add(max(0, usage.last_seq - master.projection.seq))
                )
        return families
