"""What the agent adds to the daemon shell (:mod:`bus.daemon_shell`): the updater it
builds and hands to the agent (:class:`~agentd.agent.Agent`), the launcher, the in-memory
log buffer, restart on request, the stock event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from agentd import logbuffer
from agentd.agent import Agent, agent_version, updater_options
from agentd.config import AgentConfig, load_config
from agentd.identity import ensure_identity
from agentd.metrics import agent_readiness, agent_registry
from agentd.presence import UpdateView
from agentd.record import Emitter
from agentd.trust import load_trust
from bus import FleetError, Signer, daemon_shell
from bus.connection import Bus
from bus.daemon_shell import DaemonSettings, configure_daemon_logging, serve
from bus.logformat import set_log_ids
from bus.observe import serve_observability
from bus.paths import private_dir
from bus.reloadreport import write_reload_report
from updater.agent import Updater
from updater.handoff import RESTART_EXIT, install_root_from_env, notify_ready
from updater.install import InstallRoot

logger = logging.getLogger(__name__)

PROGRAM = "fleet-agentd"


def _settings(config: AgentConfig, level: str | None) -> DaemonSettings:
    return DaemonSettings(
        program=PROGRAM,
        pid_path=config.pid_path,
        log_level=level or config.log_level,
        log_file=config.log_file,
        default_log_file=config.data_dir / "agentd.log",
        log_format=config.log_format,
        # The stock loop: CPython spawns jobs with vfork, much faster than uvloop's fork.
        use_uvloop=False,
    )


def build_agent(
    bus: Bus,
    config: AgentConfig,
    signer: Signer,
    *,
    install_root: Path | None = None,
    version: str | None = None,
    on_restart: Callable[[], None] | None = None,
    config_path: Path | None = None,
) -> Agent:
    """An agent with its updater: built here and handed in, so the agent core does not
    depend on how (or whether) it updates itself."""
    view = UpdateView()
    updater = Updater(
        bus,
        config.id,
        updater_options(config, agent_version(config, version), install_root),
        emit=Emitter(bus, signer, config.id).emit,
        show=view.show,
        restart=on_restart,
    )
    return Agent(
        bus,
        config,
        signer,
        updater=updater,
        update_view=view,
        on_restart=on_restart,
        version=version,
        config_path=config_path,
    )


async def serve_agent(config_path: Path | None, config: AgentConfig, level: str | None) -> bool:
    """Run the agent until SIGTERM/SIGINT. Returns True when a restart was requested."""
    restart = False
    signer = ensure_identity(config)
    agent: Agent | None = None

    def on_restart() -> None:
        nonlocal restart
        restart = True
        if agent is not None:
            agent.stop()

    async def build(bus: Bus) -> Agent:
        nonlocal agent
        root = install_root_from_env()
        installed = InstallRoot(root) if root is not None else None
        version = installed.version_of(installed.current_dir()) if installed else None
        agent = build_agent(
            bus,
            config,
            signer,
            install_root=root,
            version=version,
            on_restart=on_restart,
            config_path=config_path,
        )
        return agent

    def reload(running: Agent) -> None:
        try:
            new = load_config(config_path)
            running.reload(new)
        except FleetError as exc:
            logger.error("reload refused, keeping the running configuration: %s", exc)
            write_reload_report(config.pid_path, False, f"refused: {exc}")
            return
        logging.getLogger().setLevel(level or new.log_level)
        write_reload_report(config.pid_path, True, "reloaded")

    async def presence(bus: Bus) -> object:
        return await bus.kv(bus.subjects.presence_bucket)

    async with observed(config, lambda: agent):
        await serve(
            config.connect_settings(),
            build,
            storage=presence,
            reload=reload,
            when_ready=_report_healthy,
        )
    return restart


@contextlib.asynccontextmanager
async def observed(config: AgentConfig, agent: Callable[[], Agent | None]) -> AsyncIterator[None]:
    """``/metrics``, ``/healthz`` and ``/readyz`` while the block runs, if configured."""
    if not config.metrics_listen:
        yield
        return
    stop = asyncio.Event()
    task = asyncio.create_task(
        serve_observability(
            config.metrics_listen, agent_registry(agent), lambda: agent_readiness(agent), stop
        ),
        name="metrics",
    )
    try:
        yield
    finally:
        stop.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _report_healthy() -> None:
    """Tell the launcher (if one runs us) that this agent is healthy."""
    if notify_ready():
        logger.info("reported healthy to the launcher")


def run_daemon(
    config_path: Path | None, level: str | None, detach: bool, *, detached: bool = False
) -> int:
    """Everything ``fleet-agentd`` does when it runs the agent (foreground or ``-d``).

    ``detached``: this process is already a daemon (re-executed by a control ``restart``
    of a ``-d`` agent): no fork again, but it logs as a daemon does, to its log file.
    """
    config = load_config(config_path)
    if config.trust_file is not None:
        load_trust(config.trust_file)  # a bad trust file stops the start, on the terminal
    # config-set writes the file back, possibly after -d changed the directory to /.
    config_path = config_path.resolve() if config_path is not None else None
    settings = _settings(config, level)
    set_log_ids(agent=config.id)  # on every JSON log line

    def configure_logging(detaching: bool) -> None:
        private_dir(config.data_dir)  # narrowed even when an older version made it 0755
        configure_daemon_logging(settings, detached=detaching or detached)
        logbuffer.install()

    code, restart = daemon_shell.run_daemon(
        settings,
        lambda: serve_agent(config_path, config, level),
        detach=detach,
        configure_logging=configure_logging,
    )
    if code != 0 or not restart:
        return code
    if install_root_from_env() is not None:
        # The launcher restarts us, into whatever version `current` names now.
        logger.warning("exiting to be restarted by the launcher")
        return RESTART_EXIT
    logger.warning("restarting on request")
    os.execv(sys.executable, restart_argv(config_path, level, detached=detach or detached))  # noqa: S606 - re-exec ourselves


def restart_argv(config_path: Path | None, level: str | None, *, detached: bool) -> list[str]:
    """The command line that runs this agent again in this process.

    Built from what the agent runs with, not copied from ``sys.argv``: the config path
    absolute (a daemon's working directory is ``/``) and, for a daemon, ``--detached``
    instead of ``-d``: it stays in the background and keeps logging to its log file
    rather than to the ``/dev/null`` its standard streams point at.
    """
    argv = [sys.executable, "-m", "agentd"]
    if config_path is not None:
        argv += ["-c", str(config_path)]
    if level is not None:
        argv += ["-l", level]
    return argv + (["--detached"] if detached else [])
