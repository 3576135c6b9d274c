"""Job processes: started in their own process group, stopped as a group.

Each job is the leader of a new session, so the job and everything it forks share one
process group, and a timeout or cancel reaches them all (SIGTERM to the group, SIGKILL
after a grace). Nothing is run through a shell unless the job is a script that names
its interpreter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Mapping
from pathlib import Path

from agentd.contain import JOB_TAG, spawning
from agentd.jobenv import build_environment

logger = logging.getLogger(__name__)

_PROC = Path("/proc")


def start_ticks(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot, or None if it is gone."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after it.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])  # field 22 of the whole line


def group_members(pgid: int) -> list[int]:
    """Every live process whose process group is ``pgid``."""
    members = []
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to a process group; False if the group no longer exists."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        logger.error("not allowed to signal process group %d", pgid)
        return False
    return True


async def stop_group(
    proc: asyncio.subprocess.Process, grace_s: float, *, sig: int = signal.SIGTERM
) -> None:
    """SIGTERM the job's group, SIGKILL it after ``grace_s``, and reap the leader."""
    pgid = proc.pid
    signal_group(pgid, sig)
    try:
        async with asyncio.timeout(grace_s):
            await proc.wait()
    except TimeoutError:
        pass
    # Whatever is left of the group (the leader, or children that ignored SIGTERM).
    signal_group(pgid, signal.SIGKILL)
    await proc.wait()


def kill_leftovers(pgid: int, leader_start_ticks: int | None) -> int:
    """After a crash: SIGKILL what remains of a job's process group.

    The group id is the job's original pid. If a process with that pid runs but started
    at another time, the pid was recycled and the group is not ours: nothing is killed.

    Returns:
        How many processes were signalled.
    """
    ticks = start_ticks(pgid)
    if ticks is not None and leader_start_ticks is not None and ticks != leader_start_ticks:
        logger.warning("pid %d was recycled since the job ran; not killing it", pgid)
        return 0
    members = group_members(pgid)
    if members:
        signal_group(pgid, signal.SIGKILL)
    return len(members)


async def spawn(
    argv: list[str],
    *,
    env: Mapping[str, str],
    cwd: str | None,
    as_user: tuple[int, int, list[int]] | None = None,
) -> asyncio.subprocess.Process:
    """Start a job process in a new session, with pipes for stdout and stderr.

    ``as_user`` is ``(uid, gid, groups)``: the child sets its supplementary groups, then
    its gid, then its uid (the order CPython applies ``extra_groups``, ``group``,
    ``user``), so it keeps nothing of root; a sane umask and no inherited descriptors.

    Raises:
        OSError: the program cannot be started (not found, not executable, bad cwd).
    """
    drop: dict[str, object] = {}
    if as_user is not None:
        uid, gid, groups = as_user
        drop = {"user": uid, "group": gid, "extra_groups": groups, "umask": 0o022}
    async with spawning(env.get(JOB_TAG)) as scope:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=cwd,
            env=dict(env),
            start_new_session=True,
            close_fds=True,
            **drop,  # type: ignore[arg-type]
        )
        if scope is not None:
            scope.adopt(proc.pid)
    return proc


def base_environment(extra: Mapping[str, str], job_id: str) -> dict[str, str]:
    """A clean environment for a job: the agent's own secrets never leak into it, and
    the request cannot replace the basics (see :mod:`agentd.jobenv`)."""
    basics = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "HOME": os.environ.get("HOME", "/"),
        "USER": _user_name(),
        "LOGNAME": _user_name(),
        "SHELL": "/bin/sh",
    }
    return build_environment(basics, extra, job_id)


def _user_name() -> str:
    import pwd

    with contextlib.suppress(KeyError):
        return pwd.getpwuid(os.geteuid()).pw_name
    return str(os.geteuid())
