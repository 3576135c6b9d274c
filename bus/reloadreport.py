"""What a daemon made of its last SIGHUP, for the command that sent it.

A signal carries no answer, so ``fleet-master reload`` used to report success even when
the daemon refused the new file. The daemon now writes its verdict beside its pid file
(``<pid file>.reload``, one JSON object, replaced atomically), and the command waits for
a verdict newer than its signal.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

_POLL_S = 0.05


@dataclass(frozen=True)
class ReloadReport:
    """One verdict: accepted or refused, and why."""

    pid: int
    ok: bool
    message: str
    ts_ns: int


def report_path(pid_path: Path) -> Path:
    return pid_path.with_name(pid_path.name + ".reload")


def write_reload_report(pid_path: Path, ok: bool, message: str) -> None:
    """Record this process's verdict on the reload it was just asked for."""
    path = report_path(pid_path)
    tmp = path.with_name(path.name + ".tmp")
    body = {"pid": os.getpid(), "ok": ok, "message": message, "ts_ns": time.time_ns()}
    try:
        tmp.write_text(json.dumps(body) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass  # the reload itself stands; only the sender's confirmation is lost


def read_reload_report(pid_path: Path) -> ReloadReport | None:
    try:
        body = json.loads(report_path(pid_path).read_text(encoding="utf-8"))
        return ReloadReport(
            int(body["pid"]), bool(body["ok"]), str(body["message"]), int(body["ts_ns"])
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def request_reload(pid_path: Path, pid: int, timeout: float = 10.0) -> ReloadReport | None:
    """Send SIGHUP to ``pid`` and wait for its verdict; None if none came in ``timeout``."""
    sent = time.time_ns()
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        report = read_reload_report(pid_path)
        if report is not None and report.pid == pid and report.ts_ns >= sent:
            return report
        time.sleep(_POLL_S)  # a file written by another process: nothing to await
    return None
