"""The entry points' event loop: children watched without a thread each."""

from __future__ import annotations

import asyncio
import sys
import threading

import pytest

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
