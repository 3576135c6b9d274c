"""Structured lifetimes: every background task has an owner, and races end cleanly.

:class:`TaskOwner` is what a daemon part keeps its long-lived tasks in: it names them,
logs any that fail (nothing dies silently), and on close cancels and *awaits* them all.
:func:`first_of` is the one way to race awaitables ("whichever comes first"): the losers
are cancelled and awaited before it returns, and a cancellation of the caller itself is
never swallowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Coroutine, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def cancel_kept() -> Iterator[None]:
    """Around a call into nats-py: a cancellation that arrived during it is raised.

    On Python 3.11, ``asyncio.wait_for`` returns the result and drops the cancellation
    when the awaited reply lands in the same loop pass as the cancel; nats-py waits for
    every request and acknowledgement that way. A task cancelled there would go on as if
    nothing happened (seen: a job's output publisher that then waited forever).
    """
    task = asyncio.current_task()
    before = task.cancelling() if task is not None else 0
    yield
    if task is not None and task.cancelling() > before:
        raise asyncio.CancelledError


async def first_of(
    *awaitables: Awaitable[Any], timeout: float | None = None
) -> asyncio.Future[Any] | None:
    """Run ``awaitables`` together until the first finishes; cancel and await the rest.

    Returns:
        The finished future (call ``.result()`` to get its value or raise its error), or
        None when ``timeout`` seconds passed first. When several finish together, the
        earliest in argument order is returned.
    """
    futures = [asyncio.ensure_future(a) for a in awaitables]
    try:
        done, _ = await asyncio.wait(futures, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        # Runs on the caller's own cancellation too, which then propagates unchanged.
        for future in futures:
            if not future.done():
                future.cancel()
        await asyncio.gather(*futures, return_exceptions=True)
    for future in futures:
        if future in done:
            return future
    return None


async def wait_any(*events: asyncio.Event, timeout: float | None = None) -> bool:
    """Wait until one of ``events`` is set; False if ``timeout`` seconds passed first.

    Loops that must end on shutdown wait on their stop flag this way rather than rely on
    cancellation alone: on Python 3.11 a cancellation that lands as a nats-py request
    completes can be swallowed by ``asyncio.wait_for``.
    """
    return await first_of(*(event.wait() for event in events), timeout=timeout) is not None


class TaskOwner:
    """Owns a set of named background tasks: spawned here, cancelled and awaited on close.

    Use as ``async with TaskOwner("master") as tasks: tasks.spawn(...)``. A task that
    fails is logged with its traceback when it ends; ``close`` never raises for a task.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def spawn(self, coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        """Start ``coro`` as a task owned here."""
        if self._closed:
            coro.close()
            raise RuntimeError(f"{self.name}: cannot start {name} after close")
        task = asyncio.create_task(coro, name=f"{self.name}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._ended)
        return task

    def _ended(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("task %s failed", task.get_name(), exc_info=task.exception())

    @property
    def running(self) -> int:
        """How many owned tasks have not ended."""
        return len(self._tasks)

    async def close(self) -> None:
        """Cancel every owned task and wait until all have ended."""
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        # Shielded so that a second cancellation of the closer cannot leave tasks behind.
        await asyncio.shield(asyncio.gather(*tasks, return_exceptions=True))

    async def __aenter__(self) -> TaskOwner:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
