"""One agent identity's jobs, presence and control, in one event loop.

The daemon (:mod:`agentd.startup`) is a thin shell around :class:`Agent`; tests and
benchmarks host many agents in one process through the same code, each with its own
identity, subscriptions, presence key and journal. The agent owns its parts and their
tasks: the intake (:mod:`agentd.intake`) feeds admitted jobs to the runner
(:mod:`agentd.runner`); presence (:mod:`agentd.presence`) and control
(:mod:`agentd.control`) run beside them, and the updater the daemon hands in.

Every job that reaches the agent ends in exactly one ``job.finished`` with a named
status, including the ones it refuses.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agentd.config import AgentConfig
from agentd.configfile import set_config_keys
from agentd.context import AgentContext, trust_of
from agentd.control import ControlServer
from agentd.intake import JobIntake
from agentd.journal import Journal
from agentd.presence import PresenceReporter, UpdateView
from agentd.record import Emitter, Recorder
from agentd.runner import JobRunner
from agentd.seals import UsedSeals
from bus import Bus, FleetError, Signer, StorageSettings, UsageError
from bus.command import fleetbus_version
from bus.errors import ConnectionFailedError, FleetTimeoutError
from bus.retry import Backoff
from bus.serve import Service, serve
from bus.tasks import wait_any
from schemas import AgentConfigChanged, AgentOffline, AgentOnline
from updater.agent import Updater, UpdaterOptions

logger = logging.getLogger(__name__)

_UPDATER_PAUSE_S = 30.0
_BIND_BACKOFF = Backoff(initial=0.5, cap=30.0)


def updater_options(config: AgentConfig, version: str, root: Path | None) -> UpdaterOptions:
    """What the agent's configuration says about updating itself."""
    return UpdaterOptions(
        version=version,
        stamped=config.version is not None,
        auto_update=config.auto_update,
        release_keys=frozenset(config.release_keys),
        data_dir=config.data_dir,
        root=root,
        rate_bytes_s=config.update_rate_bytes_s,
        keep=(
            config.key_path,
            config.journal_path,
            config.seals_path,
            config.cursor_path,
            config.pid_path,
            *([config.trust_file] if config.trust_file else []),
        ),
    )


def agent_version(config: AgentConfig, installed: str | None) -> str:
    """The version this agent reports: stamped by config, else installed, else running."""
    return config.version or installed or fleetbus_version()


class Agent:
    """One agent. ``await run()`` until :meth:`stop`; ``ready`` is set once it consumes."""

    def __init__(
        self,
        bus: Bus,
        config: AgentConfig,
        signer: Signer,
        *,
        updater: Updater | None = None,
        update_view: UpdateView | None = None,
        on_restart: Callable[[], None] | None = None,
        version: str | None = None,
        config_path: Path | None = None,
    ) -> None:
        if config.run_as_mode == "root" and os.geteuid() != 0:
            raise UsageError("run_as_mode = root needs the agent to run as root")
        self.ctx = AgentContext(
            bus=bus,
            signer=signer,
            config=config,
            journal=Journal(config.journal_path),
            seals=UsedSeals(config.seals_path),
        )
        self.ctx.trust = trust_of(config)
        if self.ctx.trust is None:
            logger.warning(
                "no trust_file: this agent runs no job and answers no control request "
                "until one is set"
            )
        self._config_path = config_path
        self.signer = signer
        self.ready = asyncio.Event()
        self.updater = updater
        self._installed_version = version
        self.recorder = Recorder(self.ctx, Emitter(bus, signer, config.id))
        self.runner = JobRunner(self.ctx, self.recorder)
        self.intake = JobIntake(self.ctx, self.recorder, self.runner)
        self.update_view = update_view or UpdateView()
        self.presence = PresenceReporter(self.ctx, self.update_view, agent_version(config, version))
        self.control = ControlServer(
            self.ctx, status=self.status, reconfigure=self._reconfigure, restart=on_restart
        )

    @property
    def id(self) -> str:
        return self.ctx.id

    @property
    def config(self) -> AgentConfig:
        return self.ctx.config

    @property
    def version(self) -> str:
        return self.presence.version

    # --- lifecycle ------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop taking jobs; running ones get ``shutdown_grace_s`` before being abandoned.

        Safe to call from a signal handler.
        """
        self.ctx.stopping.set()
        self.ctx.slot_free.set()

    def reload(self, config: AgentConfig) -> None:
        """Apply a new configuration. Identity, server and storage need a restart.

        Raises:
            UsageError: the new trust file is missing or invalid (nothing changed).
        """
        old = self.ctx.config
        fixed = ("id", "server", "data_dir", "nkey_file", "prefix")
        ignored = [k for k in fixed if getattr(config, k) != getattr(old, k)]
        if ignored:
            logger.warning("reload: %s change only on restart", ", ".join(ignored))
            config = config.model_copy(update={k: getattr(old, k) for k in ignored})
        self.ctx.trust = trust_of(config)
        self.ctx.config = config
        self.presence.version = agent_version(config, self._installed_version)
        if self.updater is not None:
            root = self.updater.options.root
            self.updater.options = updater_options(config, self.presence.version, root)
            self.updater.nudge()
        self.ctx.slot_free.set()  # max_jobs may have grown
        logger.info("configuration reloaded")

    async def _reconfigure(self, config: AgentConfig, keys: list[str]) -> None:
        if self._config_path is None:
            raise ValueError("this agent has no config file to keep the change in; not changed")
        # The file first: a change that would not survive a restart is not made at all.
        dumped = config.model_dump(mode="json")
        set_config_keys(self._config_path, {k: dumped[k] for k in keys})
        self.reload(config)
        logging.getLogger().setLevel(config.log_level)
        await self.recorder.emit(AgentConfigChanged(agent=self.id, keys=keys, changed_by="control"))

    async def run(self) -> None:
        """Serve until :meth:`stop`, then drain, withdraw presence and return."""
        ctx = self.ctx
        await self.runner.recover()
        await self._bind()
        control = await serve(ctx.bus, ctx.bus.subjects.control_all(self.id), self.control.handle)
        p = self.presence
        await self.recorder.emit(
            AgentOnline(agent=self.id, version=p.version, host=p.host, labels=ctx.config.labels)
        )
        logger.info(
            "→ agent %s ready (version %s, max_jobs %d)", self.id, p.version, ctx.config.max_jobs
        )
        ttl = StorageSettings().presence_ttl_s
        if ctx.config.heartbeat_s > ttl / 2:
            # Its presence entry would expire between beats: `fleet run -g` and the master
            # would see it come and go.
            logger.warning(
                "heartbeat_s = %g is more than half the presence entries' lifetime (%g s): "
                "this agent will look offline between heartbeats; use at most %g",
                ctx.config.heartbeat_s,
                ttl,
                ttl / 2,
            )
        try:
            async with asyncio.TaskGroup() as tg:
                heartbeat = tg.create_task(p.heartbeat(), name="heartbeat")
                async with asyncio.TaskGroup() as jobs:
                    consumers = [
                        tg.create_task(self.intake.consume_jobs(jobs), name="jobs"),
                        tg.create_task(self.intake.consume_live(), name="live"),
                    ]
                    if self.updater is not None:
                        consumers.append(tg.create_task(self._run_updater(), name="updater"))
                    self.ready.set()
                    await ctx.stopping.wait()
                    if self.updater is not None:
                        self.updater.stop()
                    for task in consumers:
                        task.cancel()
                    await asyncio.gather(*consumers, return_exceptions=True)
                    await self._drain_jobs()
                p.idle.set()
                await heartbeat
        finally:
            await self._withdraw(control)
        logger.info("← agent %s stopped", self.id)

    async def _bind(self) -> None:
        """Subscribe to this agent's job subjects, waiting out a server that is not ready.

        Raises:
            FleetError: a refusal no wait can fix (permission, no stream).
        """
        for attempt in itertools.count():
            try:
                await self.intake.bind()
                return
            except (FleetTimeoutError, ConnectionFailedError) as exc:
                delay = _BIND_BACKOFF.delay(attempt)
                logger.warning("cannot subscribe to our jobs: %s; again in %.1fs", exc, delay)
                if await wait_any(self.ctx.stopping, timeout=delay):
                    raise
        raise AssertionError("unreachable")

    async def _run_updater(self) -> None:
        """The updater, kept from taking the agent down with it: a bug there stops
        updates for a while, never jobs."""
        assert self.updater is not None
        while not self.ctx.stopping.is_set():
            try:
                await self.updater.run()
                return
            except Exception:
                logger.exception("! the updater failed; updates resume in 30s")
                self.update_view.show("ready", "the updater failed; see the agent's log")
            await wait_any(self.ctx.stopping, timeout=_UPDATER_PAUSE_S)

    async def _withdraw(self, control: Service) -> None:
        await self.intake.unbind()
        await control.stop()
        try:
            await self.presence.withdraw()
            await self.recorder.emit(
                AgentOffline(agent=self.id, reason="agent shut down", last_seen=time.time_ns())
            )
        except FleetError as exc:
            logger.warning("could not withdraw presence: %s", exc)
        self.ctx.journal.close()

    async def _drain_jobs(self) -> None:
        running = [j.task for j in self.ctx.jobs.values() if j.task is not None]
        if not running:
            return
        grace = self.ctx.config.shutdown_grace_s
        logger.info("waiting up to %gs for %d running jobs", grace, len(running))
        _, pending = await asyncio.wait(running, timeout=grace)
        for job in list(self.ctx.jobs.values()):
            job.stop.set("abandon", "the agent shut down before the job finished")
        if pending:
            await asyncio.wait(pending)

    # --- status -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What ``status`` answers: presence plus counters."""
        return {
            **self.presence.presence().model_dump(),
            "user": self.ctx.user,
            "run_as_mode": self.ctx.config.run_as_mode,
            "counters": {
                **self.ctx.counters.as_dict(),
                "catch_ups": self.intake.catch_ups,
            },
        }
