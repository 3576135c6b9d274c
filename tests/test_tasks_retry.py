"""Task ownership, races and the one backoff: no task left behind, no cancel swallowed."""

from __future__ import annotations

import asyncio
import random

import pytest

from bus.retry import Backoff, retry
from bus.tasks import TaskOwner, cancel_kept, first_of, wait_any


async def test_first_of_returns_the_winner_and_cancels_and_awaits_the_rest() -> None:
    loser_cleaned = asyncio.Event()

    async def loser() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            loser_cleaned.set()

    async def winner() -> str:
        return "won"

    done = await first_of(loser(), winner())
    assert done is not None
    assert done.result() == "won"
    assert loser_cleaned.is_set()  # awaited, not just cancelled


async def test_first_of_times_out_with_none() -> None:
    assert await first_of(asyncio.Event().wait(), timeout=0.01) is None


async def test_first_of_does_not_swallow_the_callers_cancellation() -> None:
    started = asyncio.Event()

    async def racer() -> None:
        async def forever() -> None:
            started.set()
            await asyncio.Event().wait()

        await first_of(forever(), asyncio.Event().wait())

    task = asyncio.create_task(racer())
    async with asyncio.timeout(5):
        await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_wait_any_says_whether_an_event_came() -> None:
    a, b = asyncio.Event(), asyncio.Event()
    b.set()
    assert await wait_any(a, b, timeout=5)
    assert not await wait_any(a, timeout=0.01)


async def test_task_owner_cancels_and_awaits_everything_and_logs_failures(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ended: list[str] = []

    async def forever(name: str) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            ended.append(name)

    async def broken() -> None:
        raise RuntimeError("boom")

    async with TaskOwner("test") as tasks:
        tasks.spawn(forever("a"), "a")
        tasks.spawn(forever("b"), "b")
        failing = tasks.spawn(broken(), "broken")
        await asyncio.gather(failing, return_exceptions=True)
        await asyncio.sleep(0)  # let the done callback run
        assert tasks.running == 2
    assert sorted(ended) == ["a", "b"]
    assert "task test:broken failed" in caplog.text
    with pytest.raises(RuntimeError, match="after close"):
        tasks.spawn(forever("late"), "late")


def test_backoff_doubles_to_its_cap_and_jitters_below_it() -> None:
    plain = Backoff(1.0, 60.0, jitter=False)
    assert list(plain.delays(8)) == [1, 2, 4, 8, 16, 32, 60, 60]
    jittered = Backoff(0.25, 10.0, rng=random.Random(7))
    for attempt, delay in enumerate(jittered.delays(40)):
        assert 0 <= delay <= min(10.0, 0.25 * 2**attempt)


async def test_retry_retries_only_what_it_is_told_and_gives_up() -> None:
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ConnectionError("not yet")
        return "ok"

    fast = Backoff(0.001, 0.002)
    assert await retry(flaky, retry_on=(ConnectionError,), backoff=fast) == "ok"
    assert calls == 3

    async def always() -> None:
        raise ConnectionError("never")

    with pytest.raises(ConnectionError):
        await retry(always, retry_on=(ConnectionError,), backoff=fast, attempts=4)

    async def wrong() -> None:
        raise ValueError("not retried")

    with pytest.raises(ValueError, match="not retried"):
        await retry(wrong, retry_on=(ConnectionError,), backoff=fast)


async def test_a_cancel_that_wait_for_drops_is_raised_after_the_call() -> None:
    # nats-py waits for every reply with asyncio.wait_for; on 3.11 a reply landing in the
    # same loop pass as a cancel makes wait_for return it and drop the cancel.
    reply: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    returned = []

    async def request() -> None:
        with cancel_kept():
            returned.append(await asyncio.wait_for(reply, 5))
        returned.append("went on as if not cancelled")

    task = asyncio.create_task(request())
    await asyncio.sleep(0)  # until it waits for the reply
    reply.set_result(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert "went on as if not cancelled" not in returned


async def test_cancel_kept_leaves_a_call_that_was_not_cancelled_alone() -> None:
    async def request() -> int:
        with cancel_kept():
            return await asyncio.wait_for(asyncio.sleep(0, 7), 5)

    assert await request() == 7
