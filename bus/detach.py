"""Detaching a daemon and finding it again: the locked pid file, the double fork, stop.

The pid file is locked (``flock``) for the daemon's whole life, so "is it running" is
answered by the lock, not by a pid that may have been recycled since a crash.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import sys
from pathlib import Path
from typing import IO

from bus.errors import EXIT_TIMEOUT, UsageError

EXIT_NOT_RUNNING = 3  # LSB: "program is not running"


class PidFile:
    """A pid file held under an exclusive lock while the daemon lives."""

    def __init__(self, path: Path, program: str) -> None:
        self.path = path
        self.program = program
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
                f"{self.program} is already running (pid {other}, {self.path})"
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


def kill_daemon(path: Path, timeout: float, program: str) -> int:
    """SIGTERM the running daemon and wait until it has exited.

    Returns:
        0 when it stopped, 3 when none was running (LSB), 3 on timeout (exit code of a
        timeout in the contract) with a message.
    """
    pid = running_pid(path)
    if pid is None:
        print(f"{program} is not running ({path})", file=sys.stderr)
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
        print(f"{program} (pid {pid}) did not stop within {timeout:g}s", file=sys.stderr)
        return EXIT_TIMEOUT
    print(f"{program} (pid {pid}) stopped", file=sys.stderr)
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
        # The parent exits once the daemon holds its pid file (or failed to). It still
        # has the terminal: a failure is said there, not only in a log nobody watches.
        with os.fdopen(read_end, "rb") as r:
            status = r.read()
        if status == b"0":
            os._exit(0)
        code, _, why = status.decode("utf-8", "replace").partition(":")
        sys.stderr.write(f"{why or 'the daemon failed to start; see its log'}\n")
        sys.stderr.flush()
        os._exit(int(code) if code.isdigit() and code != "0" else 1)
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


def report_ready(fd: int | None, ok: bool, why: str = "", code: int = 1) -> None:
    """Tell the process that detached us (see :func:`daemonize`) we started, or why not
    (``why``, and the exit code it should end with)."""
    if fd is not None:
        with contextlib.suppress(OSError):
            os.write(fd, b"0" if ok else f"{code}:{why}".encode())
            os.close(fd)
