"""The daemon around :class:`~agentd.agent.Agent`: signals, reload, restart, and the updater."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from agentd import logbuffer
from agentd.agent import Agent, agent_version, updater_options
from agentd.config import AgentConfig, load_config
from agentd.identity import ensure_identity
from agentd.presence import UpdateView
from agentd.record import Emitter
from bus import Bus, FleetError, Signer, UsageError
from bus.command import LOG_FORMAT
from bus.daemon import (
    PidFile,
    connect_unless_stopped,
    daemonize,
    report_ready,
    wait_for_storage,
)
from bus.tasks import TaskOwner
from updater.agent import Updater
from updater.handoff import RESTART_EXIT, install_root_from_env, notify_ready
from updater.install import InstallRoot

logger = logging.getLogger(__name__)

PROGRAM = "fleet-agentd"


def configure_logging(config: AgentConfig, level: str | None, daemon: bool) -> None:
    """stderr in the foreground; a file under data_dir (or ``log_file``) as a daemon."""
    handlers: list[logging.Handler]
    log_file = config.log_file or (config.data_dir / "agentd.log" if daemon else None)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers = [logging.FileHandler(log_file)]
    else:
        handlers = [logging.StreamHandler(sys.stderr)]
    logging.basicConfig(
        level=level or config.log_level, format=LOG_FORMAT, handlers=handlers, force=True
    )
    logging.getLogger("nats").setLevel(logging.ERROR)
    logbuffer.install()


def build_agent(
    bus: Bus,
    config: AgentConfig,
    signer: Signer,
    *,
    install_root: Path | None = None,
    version: str | None = None,
    on_restart: Callable[[], None] | None = None,
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
    )


async def serve(config_path: Path | None, config: AgentConfig, level: str | None) -> bool:
    """Run the agent until SIGTERM/SIGINT. Returns True when a restart was requested."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    restart = False
    agent: Agent | None = None

    def on_stop() -> None:
        stop.set()
        if agent is not None:
            agent.stop()

    def on_reload() -> None:
        try:
            new = load_config(config_path)
        except FleetError as exc:
            logger.error("reload refused, keeping the running configuration: %s", exc)
            return
        logging.getLogger().setLevel(level or new.log_level)
        if agent is not None:
            try:
                agent.reload(new)
            except FleetError as exc:
                logger.error("reload refused, keeping the running configuration: %s", exc)

    def on_restart() -> None:
        nonlocal restart
        restart = True
        on_stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop)
    loop.add_signal_handler(signal.SIGHUP, on_reload)

    signer = ensure_identity(config)
    bus = await connect_unless_stopped(config.connect_settings(), stop)
    if bus is None:
        return False
    async with bus:
        presence = bus.subjects.presence_bucket
        if not await wait_for_storage(bus, stop, lambda b: b.key_value(presence)):
            return False
        root = install_root_from_env()
        installed = InstallRoot(root) if root is not None else None
        version = installed.version_of(installed.current_dir()) if installed else None
        agent = build_agent(
            bus, config, signer, install_root=root, version=version, on_restart=on_restart
        )
        if stop.is_set():
            return False
        async with TaskOwner("agentd") as tasks:
            tasks.spawn(_notify_when_ready(agent.ready), "ready")
            await agent.run()
    return restart


async def _notify_when_ready(ready: asyncio.Event) -> None:
    """Tell the launcher (if one runs us) that this agent is healthy."""
    await ready.wait()
    if notify_ready():
        logger.info("reported healthy to the launcher")


def run_daemon(config_path: Path | None, level: str | None, detach: bool) -> int:
    """Everything ``fleet-agentd`` does when it runs the agent (foreground or ``-d``)."""
    config = load_config(config_path)
    ready_fd = daemonize() if detach else None
    configure_logging(config, level, detach)
    pidfile = PidFile(config.pid_path, PROGRAM)
    try:
        pidfile.acquire()
    except UsageError as exc:
        logger.error("%s", exc)
        report_ready(ready_fd, ok=False)
        return exc.exit_code
    report_ready(ready_fd, ok=True)
    try:
        # The stock loop: CPython spawns jobs with vfork, much faster than uvloop's fork.
        restart = asyncio.run(serve(config_path, config, level))
    except FleetError as exc:
        logger.error("%s", exc)
        return exc.exit_code
    finally:
        pidfile.release()
    if restart:
        if install_root_from_env() is not None:
            # The launcher restarts us, into whatever version `current` names now.
            logger.warning("exiting to be restarted by the launcher")
            return RESTART_EXIT
        logger.warning("restarting on request")
        argv = [a for a in sys.argv[1:] if a not in ("-d", "--daemon")]
        os.execv(sys.executable, [sys.executable, "-m", "agentd", *argv])  # noqa: S606 - re-exec ourselves
    return 0
