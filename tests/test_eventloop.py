"""The entry points' event loop: children watched without a thread each."""

from __future__ import annotations

import asyncio
import os
import sys
import threading

import pytest

from agentd import contain
from agentd.process import base_environment, spawn
from bus.eventloop import run


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="pidfds are 3.12's default watcher")
def test_the_stock_loop_watches_children_without_a_thread_each() -> None:
    async def main() -> tuple[int, list[int | None]]:
        env = base_environment({}, "job-x")
        procs = [await spawn(["sleep", "0.3"], env=env, cwd="/") for _ in range(8)]
        threads = threading.active_count()
        await asyncio.gather(*(p.wait() for p in procs))
        return threads, [p.returncode for p in procs]

    before = threading.active_count()
    threads, codes = run(main(), use_uvloop=False)
    assert codes == [0] * 8
    # 3.11's default watcher would add eight threads, one per running child.
    assert threads - before < 8, (before, threads)


def test_the_orphan_scan_leaves_a_leader_being_spawned_to_asyncio() -> None:
    # A child that has exited and is not yet adopted as a job's leader: what a fast job
    # (``true``) is while create_subprocess_exec has not returned.
    pid = os.posix_spawnp("true", ["true"], {"PATH": "/usr/bin:/bin"})
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # until it exits; not reaped
    later = contain._last_orphan_scan + 10 * contain._ORPHAN_SCAN_S

    async def scan_while_spawning() -> None:
        async with contain._spawn_lock():
            contain._reap_orphans_now_and_then(later)

    asyncio.run(scan_while_spawning())
    # Still there for its owner to collect: its exit status is not stolen.
    assert os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None
    contain._reap_orphans_now_and_then(later + 2 * contain._ORPHAN_SCAN_S)
    with pytest.raises(ChildProcessError):  # once no spawn is under way, reaped
        os.waitpid(pid, os.WNOHANG)
