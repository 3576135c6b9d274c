"""The daemon around :class:`~agentd.runtime.AgentRuntime`: signals, reload, restart."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from agentd import logbuffer
from agentd.config import AgentConfig, load_config
from agentd.identity import ensure_identity
from agentd.runtime import AgentRuntime
from agentd.trust import load_trust
from bus import FleetError, UsageError
from bus.command import LOG_FORMAT
from bus.daemon import (
    PidFile,
    connect_unless_stopped,
    daemonize,
    report_ready,
    wait_for_storage,
)
from bus.paths import private_dir
from updater.handoff import RESTART_EXIT, install_root_from_env, notify_ready
from updater.install import InstallRoot

logger = logging.getLogger(__name__)

PROGRAM = "fleet-agentd"


def configure_logging(config: AgentConfig, level: str | None, daemon: bool) -> None:
    """stderr in the foreground; a file under data_dir (or ``log_file``) as a daemon."""
    handlers: list[logging.Handler]
    log_file = config.log_file or (config.data_dir / "agentd.log" if daemon else None)
    if log_file is not None:
        if log_file.parent == config.data_dir:
            private_dir(config.data_dir)
        else:
            log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers = [logging.FileHandler(log_file)]
    else:
        handlers = [logging.StreamHandler(sys.stderr)]
    logging.basicConfig(
        level=level or config.log_level, format=LOG_FORMAT, handlers=handlers, force=True
    )
    logging.getLogger("nats").setLevel(logging.ERROR)
    logbuffer.install()


async def serve(config_path: Path | None, config: AgentConfig, level: str | None) -> bool:
    """Run the agent until SIGTERM/SIGINT. Returns True when a restart was requested."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    restart = False
    runtime: AgentRuntime | None = None

    def on_stop() -> None:
        stop.set()
        if runtime is not None:
            runtime.stop()

    def on_reload() -> None:
        try:
            new = load_config(config_path)
            if runtime is not None:
                runtime.reload(new)  # a bad trust file refuses the whole reload
        except FleetError as exc:
            logger.error("reload refused, keeping the running configuration: %s", exc)
            return
        logging.getLogger().setLevel(level or new.log_level)

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
        runtime = AgentRuntime(
            bus,
            config,
            signer,
            on_restart=on_restart,
            install_root=root,
            config_path=config_path,
            version=installed.version_of(installed.current_dir()) if installed else None,
        )
        if stop.is_set():
            return False
        notifier = asyncio.create_task(_notify_when_ready(runtime.ready), name="ready")
        try:
            await runtime.run()
        finally:
            notifier.cancel()
            await asyncio.gather(notifier, return_exceptions=True)
    return restart


async def _notify_when_ready(ready: asyncio.Event) -> None:
    """Tell the launcher (if one runs us) that this agent is healthy."""
    await ready.wait()
    if notify_ready():
        logger.info("reported healthy to the launcher")


def run_daemon(config_path: Path | None, level: str | None, detach: bool) -> int:
    """Everything ``fleet-agentd`` does when it runs the agent (foreground or ``-d``)."""
    config = load_config(config_path)
    if config.trust_file is not None:
        load_trust(config.trust_file)  # a bad trust file stops the start, on the terminal
    # config-set writes the file back, possibly after -d changed the directory to /.
    config_path = config_path.resolve() if config_path is not None else None
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
