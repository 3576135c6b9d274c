"""The job cgroups (v2) the agent creates under its own: find, fill, kill, empty.

Only where a cgroup v2 hierarchy is mounted and the agent may write its own cgroup (root,
or a delegated subtree: the systemd unit says ``Delegate=yes``); else every function
here reports failure and :mod:`agentd.contain` falls back to the job tag.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from pathlib import Path

logger = logging.getLogger(__name__)

PREFIX = "fleet-job-"
"""Job cgroups are named ``fleet-job-<job id>``."""

_PROC = Path("/proc")
_home: tuple[Path | None] | None = None


def own_cgroup_dir() -> Path | None:
    """The agent's own cgroup v2 directory, or None without a cgroup v2 hierarchy.

    Read once: later the agent may be inside a job's cgroup for a moment (see
    :func:`agentd.contain.spawning`).
    """
    global _home
    if _home is None:
        _home = (_read_own(),)
    return _home[0]


def move(pid: int, cgroup: Path) -> bool:
    """Move a process into a cgroup; False (logged) where that is not allowed."""
    try:
        (cgroup / "cgroup.procs").write_text(str(pid))
    except OSError as exc:
        # E.g. a parent cgroup with controllers enabled (the no-internal-process rule).
        logger.debug("cannot move pid %d into %s: %s", pid, cgroup, exc)
        return False
    return True


def _read_own() -> Path | None:
    try:
        lines = (_PROC / "self" / "cgroup").read_text().splitlines()
        mounts = (_PROC / "self" / "mountinfo").read_text().splitlines()
    except OSError:
        return None
    rel = next((line[3:] for line in lines if line.startswith("0::")), None)
    if rel is None:
        return None
    for mount in mounts:
        fields, _, rest = mount.partition(" - ")
        if rest.split()[:1] == ["cgroup2"]:
            return Path(fields.split()[4]) / rel.lstrip("/")
    return None


def kill_cgroup(path: Path) -> list[int]:
    """SIGKILL everything in a cgroup; returns the pids it held."""
    try:
        procs = [int(p) for p in (path / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []
    if not procs:
        return []
    try:
        (path / "cgroup.kill").write_text("1")  # Linux 5.14+: atomic, no fork race
    except OSError:
        for pid in procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    return procs


def populated(cgroup: Path | None) -> bool:
    """Whether a live process is still in the cgroup."""
    if cgroup is None:
        return False
    try:
        return "populated 1" in (cgroup / "cgroup.events").read_text()
    except OSError:
        return False
