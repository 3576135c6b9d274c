"""The daemon around :class:`~agentd.runtime.AgentRuntime`: signals, reload, restart."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

import nats.js.errors

from agentd import logbuffer
from agentd.config import AgentConfig, load_config
from agentd.identity import ensure_identity
from agentd.runtime import AgentRuntime
from bus import Bus, FleetError, UsageError, connect
from bus.command import LOG_FORMAT
from bus.daemon import PidFile, daemonize, report_ready

logger = logging.getLogger(__name__)

PROGRAM = "fleet-agentd"
_STREAM_WAIT_S = 5.0


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


async def _wait_for_streams(bus: Bus, stop: asyncio.Event) -> bool:
    """Wait until the fleet's streams exist (``fleet ops init``); False if told to stop."""
    warned = False
    while not stop.is_set():
        try:
            await bus.js.stream_info(bus.subjects.events_stream)
            await bus.key_value(bus.subjects.presence_bucket)
            return True
        except (nats.js.errors.NotFoundError, FleetError) as exc:
            if not warned:
                logger.error(
                    "the fleet's streams are missing (%s); run `fleet ops init`. Waiting.", exc
                )
                warned = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_STREAM_WAIT_S):
                await stop.wait()
    return False


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
        except FleetError as exc:
            logger.error("reload refused, keeping the running configuration: %s", exc)
            return
        logging.getLogger().setLevel(level or new.log_level)
        if runtime is not None:
            runtime.reload(new)

    def on_restart() -> None:
        nonlocal restart
        restart = True
        on_stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop)
    loop.add_signal_handler(signal.SIGHUP, on_reload)

    signer = ensure_identity(config)
    connecting = asyncio.create_task(connect(config.connect_settings(), wait_for_server=True))
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({connecting, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not connecting.done():
        connecting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await connecting
        return False
    async with connecting.result() as bus:
        if not await _wait_for_streams(bus, stop):
            return False
        runtime = AgentRuntime(bus, config, signer, on_restart=on_restart)
        if stop.is_set():
            return False
        await runtime.run()
    return restart


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
        logger.warning("restarting on request")
        argv = [a for a in sys.argv[1:] if a not in ("-d", "--daemon")]
        os.execv(sys.executable, [sys.executable, "-m", "agentd", *argv])  # noqa: S606 - re-exec ourselves
    return 0
