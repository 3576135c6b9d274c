"""Running a coroutine as a program: uvloop when available, the stock loop otherwise.

The bus runs well on uvloop; spawning subprocesses does not (libuv forks where CPython
uses vfork: about 3 ms against under 1 ms per spawn on this machine class), so the agent
may choose the stock loop. Either way the choice is made here, once, by the entry point.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

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


def run(main: Coroutine[Any, Any, T], *, use_uvloop: bool = True) -> T:
    """Run ``main`` to completion in a new event loop and return its result."""
    with asyncio.Runner(loop_factory=loop_factory(use_uvloop)) as runner:
        return runner.run(main)


async def wait_any(*events: asyncio.Event, timeout: float | None = None) -> None:
    """Wait until one of ``events`` is set, or ``timeout`` seconds pass (None: no limit).

    Loops that must end on shutdown wait on their stop flag this way rather than rely on
    cancellation alone: on Python 3.11 a cancellation that lands as a nats-py request
    completes can be swallowed by ``asyncio.wait_for``.
    """
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waits:
            task.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
