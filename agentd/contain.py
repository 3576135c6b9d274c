"""Every process a job starts ends with the job.

A process group is not enough: a job's child may call ``setsid`` or double-fork into a
daemon and leave the group. Three nets catch it, each covering the others' gaps:

- a cgroup v2 per job (``fleet-job-<id>`` under the agent's own cgroup), where the agent
  may create one: the job's leader is born inside it (see :func:`spawning`), so all it
  starts is inside too, and ``cgroup.kill`` ends everything, however it detached;
- the agent is a child subreaper (``PR_SET_CHILD_SUBREAPER``), so a detached descendant
  is reparented to the agent, not to init, and the agent can reap what it kills;
- the job tag ``FLEET_JOB_ID=<id>`` in every job's environment
  (:func:`agentd.process.base_environment`): without a cgroup, every process still
  carrying it at the job's end is killed; and after the agent itself was killed, the
  restarted agent kills what is left of its unfinished jobs by cgroup and by tag
  (:func:`kill_job_leftovers`).

The cost, measured on a loaded 2-core machine: about 6 ms per job with a cgroup (most of
it moving the agent in and out of the job's cgroup around the fork), a /proc scan (a few
ms) per job without one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import weakref
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

from agentd.cgroup import PREFIX, kill_cgroup, move, own_cgroup_dir, populated

logger = logging.getLogger(__name__)

JOB_TAG = "FLEET_JOB_ID"
"""The environment variable that marks every process of a job (set at spawn)."""

_PROC = Path("/proc")
_PR_SET_CHILD_SUBREAPER = 36
_SETTLE_S = 5.0  # how long killed processes get to disappear before we give up waiting

_scopes: dict[int, JobScope] = {}
_subreaper = False
_spawn_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)
"""One per event loop: an asyncio.Lock belongs to the loop that first waits on it, and a
process may run more than one loop over its life (tests, a restart in place)."""


def _spawn_lock() -> asyncio.Lock:
    loop = asyncio.get_running_loop()
    lock = _spawn_locks.get(loop)
    if lock is None:
        lock = _spawn_locks[loop] = asyncio.Lock()
    return lock


def _spawning_now() -> bool:
    return any(lock.locked() for lock in list(_spawn_locks.values()))


_leaders: set[int] = set()  # job leaders whose exit status asyncio has yet to collect
_ORPHAN_SCAN_S = 30.0
_last_orphan_scan = -_ORPHAN_SCAN_S


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux). Idempotent."""
    global _subreaper
    if not _subreaper:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            _subreaper = libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
        except (OSError, AttributeError):
            _subreaper = False
        if not _subreaper:
            logger.warning("cannot become a child subreaper: detached job processes go to init")
    return _subreaper


class JobScope:
    """Everything one job started: its cgroup (if any) and its tag.

    Args:
        job_id: the job, as in its ``FLEET_JOB_ID``.
        cgroup_parent: where to create the job's cgroup; None for no cgroup (the
            subreaper and the tag still apply).
    """

    def __init__(self, job_id: str, cgroup_parent: Path | None) -> None:
        self.job_id = job_id
        self.leader: int | None = None
        self.cgroup: Path | None = None
        become_subreaper()
        if cgroup_parent is not None:
            path = cgroup_parent / f"{PREFIX}{job_id}"
            try:
                path.mkdir(exist_ok=True)
                self.cgroup = path
            except OSError as exc:
                logger.debug("no cgroup for job %s: %s", job_id, exc)

    def adopt(self, pid: int) -> None:
        """Take the job's leader in.

        Not moved into the cgroup: a scope that still has one got it by the agent standing
        in it at the fork (:func:`spawning`), so the leader was born there. Moving it again
        cost a cgroup write per job on the event loop and, for a leader that had already
        exited (``true``), failed and dropped the cgroup, leaving the job's end to a scan
        of every process's environment.
        """
        self.leader = pid
        _scopes[pid] = self
        _leaders.add(pid)

    async def end(self) -> int:
        """Kill every process of the job that is left, reap them, remove the cgroup.

        With a cgroup, its members are the job: the leader was born inside it, so only
        a process that moved itself out (root, deliberately) could be elsewhere. Without
        one, every process is searched for the job's tag.

        Returns:
            How many processes were killed (besides the leader's group).
        """
        _scopes.pop(self.leader or -1, None)
        spare = {self.leader} if self.leader else set()
        if self.cgroup is not None:
            pids = [p for p in kill_cgroup(self.cgroup) if p not in spare]
        else:
            pids = kill_tagged(self.job_id, spare=spare)
        await _settle(self.cgroup, pids)
        self._remove_cgroup()
        if pids:
            logger.warning("job %s: killed %d processes left behind", self.job_id, len(pids))
        return len(pids)

    def _remove_cgroup(self) -> None:
        if self.cgroup is not None:
            with contextlib.suppress(OSError):
                self.cgroup.rmdir()
            self.cgroup = None


@contextlib.asynccontextmanager
async def spawning(job_id: str | None) -> AsyncIterator[JobScope | None]:
    """Around starting a job's leader: the leader is born inside the job's cgroup.

    The agent steps into the job's cgroup for the moment of the fork and back out, so
    the leader never runs outside it (moving it afterwards would race its first forks).
    Spawns are serialised meanwhile, so no other job's leader is born in this cgroup.
    The caller passes the new leader's pid to :meth:`JobScope.adopt`.
    """
    if job_id is None:
        yield None
        return
    async with _spawn_lock():
        home = own_cgroup_dir()
        scope = JobScope(job_id, home)
        entered = scope.cgroup is not None and move(os.getpid(), scope.cgroup)
        if scope.cgroup is not None and not entered:
            scope._remove_cgroup()
        try:
            yield scope
        finally:
            if entered and home is not None and not move(os.getpid(), home):
                logger.error("the agent could not leave job %s's cgroup", job_id)
            if scope.leader is None:
                scope._remove_cgroup()  # the job never started


def scope_of(pid: int) -> JobScope | None:
    """The scope of the job whose leader is ``pid``, if it was contained."""
    return _scopes.get(pid)


def kill_tagged(job_id: str, *, spare: set[int] | None = None) -> list[int]:
    """SIGKILL every live process whose environment carries this job's tag.

    Repeats until none is found (a process may fork while its siblings are killed).

    Returns:
        The pids signalled.
    """
    marker = f"\0{JOB_TAG}={job_id}\0".encode()
    signalled: list[int] = []
    for _ in range(10):
        found = [
            pid
            for pid in _tagged(marker)
            if pid not in signalled and pid != os.getpid() and pid not in (spare or set())
        ]
        if not found:
            break
        for pid in found:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        signalled += found
    return signalled


def kill_job_leftovers(job_id: str) -> int:
    """After a restart: kill what is left of a job the agent no longer supervises.

    Returns:
        How many processes were signalled (its cgroup's and those carrying its tag).
    """
    parent = own_cgroup_dir()
    cgroup = parent / f"{PREFIX}{job_id}" if parent is not None else None
    killed = len(kill_cgroup(cgroup)) if cgroup is not None else 0
    killed += len(kill_tagged(job_id))
    if cgroup is not None:
        with contextlib.suppress(OSError):
            cgroup.rmdir()  # may still be busy with the dying; removed on the next restart
    return killed


def remove_stale_cgroups(ours: Iterable[str]) -> None:
    """After a restart's recovery: remove the cgroups of jobs in ``ours`` (the ones this
    agent's journal knows) that no running job owns.

    Only ours: agents that share a cgroup (several on one host outside systemd, or
    hosted together by ``--simulate``) see each other's job cgroups beside their own,
    and a restarting agent must not kill its neighbours' jobs.
    """
    parent = own_cgroup_dir()
    if parent is None or not parent.is_dir():
        return
    running = {s.job_id for s in _scopes.values()}
    for job_id in set(ours) - running:
        path = parent / f"{PREFIX}{job_id}"
        if path.is_dir():
            kill_cgroup(path)
            with contextlib.suppress(OSError):
                path.rmdir()


def _tagged(marker: bytes) -> list[int]:
    pids = []
    for entry in os.scandir(_PROC):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                environ = f.read()
        except OSError:
            continue  # gone, a kernel thread, or not ours to read
        if marker in b"\0" + environ:
            pids.append(int(entry.name))
    return pids


async def _settle(cgroup: Path | None, pids: list[int]) -> None:
    """Wait until the killed processes are gone, reaping those reparented to us."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + _SETTLE_S
    waiting = set(pids)
    while loop.time() < give_up:
        for pid in list(waiting):
            if _reap_or_gone(pid):
                waiting.discard(pid)
        if not waiting and not populated(cgroup):
            _reap_orphans_now_and_then(loop.time())
            return
        await asyncio.sleep(0.01)  # SIGKILL takes effect asynchronously; poll briefly
    logger.error("processes %s of a job did not go away after SIGKILL", sorted(waiting))


def _reap_or_gone(pid: int) -> bool:
    if pid in _leaders:
        return not _alive(pid)  # a leader is reaped by asyncio's child watcher
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return not _alive(pid)  # not our child: gone once it is not running
    return done == pid


def _reap_orphans_now_and_then(now: float) -> None:
    """Reap zombies reparented to us that exited on their own (at most every 30 s).

    A detached child that ends before its job does is reparented to the agent (the
    subreaper) and waits as a zombie; scanning /proc for those costs milliseconds, so it
    is done now and then, not per job. Job leaders are left to asyncio's watcher.
    """
    global _last_orphan_scan
    if now - _last_orphan_scan < _ORPHAN_SCAN_S or _spawning_now():
        # Not while a leader is being born: it is not among the leaders until adopted,
        # and if it has already exited, reaping it here would steal its exit status
        # from asyncio's watcher (which then reports 255, a "failed" job).
        return
    _last_orphan_scan = now
    me = str(os.getpid())
    for entry in os.scandir(_PROC):
        if not entry.name.isdigit() or int(entry.name) in _leaders:
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None and fields[0] == "Z" and fields[1] == me:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(int(entry.name), os.WNOHANG)


def leader_reaped(pid: int) -> None:
    """The job leader ``pid`` has been waited for by its owner: no longer protected."""
    _leaders.discard(pid)


def _stat_fields(pid: int) -> list[str] | None:
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()


def _alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


__all__ = [
    "JOB_TAG",
    "JobScope",
    "become_subreaper",
    "kill_job_leftovers",
    "kill_tagged",
    "leader_reaped",
    "own_cgroup_dir",
    "remove_stale_cgroups",
    "scope_of",
    "spawning",
]
