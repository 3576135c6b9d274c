"""Running a coroutine as a program: uvloop when available, the stock loop otherwise.

The bus runs well on uvloop; spawning subprocesses does not (libuv forks where CPython
uses vfork: about 3 ms against under 1 ms per spawn on this machine class), so the agent
may choose the stock loop. Either way the choice is made here, once, by the entry point.

On the stock loop, children are watched through pidfds (Linux 5.3 and later): Python 3.11's
default watcher parks a thread on every child. From 3.12 pidfds are the default.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["loop_factory", "run", "watch_children_by_pidfd"]

T = TypeVar("T")


def loop_factory(use_uvloop: bool = True) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory when wanted and installed, else None (the stock loop)."""
    if not use_uvloop:
        return None
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def watch_children_by_pidfd(loop: asyncio.AbstractEventLoop) -> bool:
    """Have the stock loop ``loop`` watch its children through pidfds, without a thread
    per child; False where that is not needed (3.12+) or not possible (old kernels)."""
    if sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        return False
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:  # a kernel older than 5.3, or a sandbox refusing the call
        return False
    watcher = asyncio.PidfdChildWatcher()
    watcher.attach_loop(loop)
    asyncio.get_event_loop_policy().set_child_watcher(watcher)
    return True


def run(main: Coroutine[Any, Any, T], *, use_uvloop: bool = True) -> T:
    """Run ``main`` to completion in a new event loop and return its result."""
    factory = loop_factory(use_uvloop)
    policy = asyncio.get_event_loop_policy()
    before = getattr(policy, "_watcher", None)  # 3.11's policy keeps it here
    with asyncio.Runner(loop_factory=factory) as runner:
        watching = factory is None and watch_children_by_pidfd(runner.get_loop())
        try:
            return runner.run(main)
        finally:
            if watching:
                # The watcher belongs to this loop: a later loop in the same process must
                # not wait for children through a closed one.
                policy.get_child_watcher().close()
                policy._watcher = before  # type: ignore[attr-defined]
