"""The daemon around :class:`~agentd.runtime.AgentRuntime`: signals, pid file, daemonizing.

The pid file is locked (``flock``) for the daemon's whole life, so "is it running" is
answered by the lock, not by a pid that may have been recycled since a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import select
import signal
import sys
from pathlib import Path
from typing import IO

import nats.js.errors

from agentd import logbuffer
from agentd.config import AgentConfig, load_config
from agentd.identity import ensure_identity
from agentd.runtime import AgentRuntime
from bus import Bus, FleetError, UsageError, connect
from bus.command import LOG_FORMAT
from bus.errors import EXIT_TIMEOUT

logger = logging.getLogger(__name__)

EXIT_NOT_RUNNING = 3  # LSB: "program is not running"
_STREAM_WAIT_S = 5.0


class PidFile:
    """A pid file held under an exclusive lock while the daemon lives."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        """Take the lock and write our pid.

        Raises:
            UsageError: another daemon holds it.
        """
        self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        f = open(self.path, "a+", encoding="ascii")  # noqa: SIM115 - held until release
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            other = f.read().strip() or "?"
            f.close()
            raise UsageError(
                f"fleet-agentd is already running (pid {other}, {self.path})"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self._file.close()
            self._file = None


def running_pid(path: Path) -> int | None:
    """The pid of the daemon holding ``path``'s lock, or None if nobody holds it."""
    try:
        f = open(path, encoding="ascii")  # noqa: SIM115
    except FileNotFoundError:
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = f.read().strip()
            return int(text) if text.isdigit() else None
        return None  # we got the lock: nobody runs


def kill_daemon(path: Path, timeout: float) -> int:
    """SIGTERM the running daemon and wait until it has exited.

    Returns:
        0 when it stopped, 3 when none was running (LSB), 3 on timeout (exit code of a
        timeout in the contract) with a message.
    """
    pid = running_pid(path)
    if pid is None:
        print(f"fleet-agentd is not running ({path})", file=sys.stderr)
        return EXIT_NOT_RUNNING
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return 0
    with contextlib.closing(_FdCloser(pidfd)):
        os.kill(pid, signal.SIGTERM)
        # A pidfd becomes readable when the process exits: an event, not a polling loop.
        readable, _, _ = select.select([pidfd], [], [], timeout)
    if not readable:
        print(f"fleet-agentd (pid {pid}) did not stop within {timeout:g}s", file=sys.stderr)
        return EXIT_TIMEOUT
    print(f"fleet-agentd (pid {pid}) stopped", file=sys.stderr)
    return 0


class _FdCloser:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        os.close(self.fd)


def daemonize() -> int:
    """Detach: double fork, new session, stdio to /dev/null.

    Returns:
        In the daemon, the write end of a pipe to report readiness on (see
        :func:`report_ready`); the original process waits on it and exits.
    """
    read_end, write_end = os.pipe()
    if os.fork() > 0:
        os.close(write_end)
        # The parent exits once the daemon holds its pid file (or failed to).
        with os.fdopen(read_end, "rb") as r:
            status = r.read(1)
        os._exit(0 if status == b"0" else 1)
    os.close(read_end)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    os.umask(0o027)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    return write_end


def report_ready(fd: int | None, ok: bool) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.write(fd, b"0" if ok else b"1")
            os.close(fd)


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
    pidfile = PidFile(config.pid_path)
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
