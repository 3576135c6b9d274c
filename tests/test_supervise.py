"""The supervisor directly: real job processes, their output into a real server's stream."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import pytest
from agents import pid_alive

from agentd.output import JobOutput
from agentd.process import base_environment, spawn
from agentd.supervise import Outcome, StopRequest, supervise
from bus import Bus, Signer, generate_seed
from bus.log import read_log
from schemas import new_id

pytestmark = pytest.mark.timeout(60)


async def gone(pid: int, timeout: float = 30.0) -> bool:
    """Wait until ``pid`` has exited (a zombie counts); False if it is still running."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    loop = asyncio.get_running_loop()
    exited = asyncio.Event()
    loop.add_reader(fd, exited.set)
    try:
        await asyncio.wait_for(exited.wait(), timeout)
    except TimeoutError:
        return not pid_alive(pid)
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    return True


class Job:
    """One job: its process, its output, its stop request, and what it printed so far."""

    def __init__(self, bus: Bus, proc: asyncio.subprocess.Process, job_id: str) -> None:
        self.proc = proc
        self.job_id = job_id
        self.subject = bus.subjects.output("web-1", job_id)
        self.stop = StopRequest()
        self.printed = bytearray()
        self._lines: asyncio.Queue[str] = asyncio.Queue()
        outer = self

        class WatchedOutput(JobOutput):
            # Streams to the server as the agent does, and lets the test await a line.
            async def feed(self, name: str, data: bytes) -> None:
                outer.printed += data
                for line in data.decode(errors="replace").splitlines():
                    outer._lines.put_nowait(line)
                await super().feed(name, data)

        self.output = WatchedOutput(
            bus,
            self.subject,
            job_id,
            stream=bus.subjects.output_stream,
            max_bytes=1024 * 1024,
            tail_bytes=4096,
            signer=Signer(generate_seed()),
        )

    async def line(self) -> str:
        """The next line the job prints."""
        return await asyncio.wait_for(self._lines.get(), 30)

    async def supervise(self, timeout_s: float | None = None, grace_s: float = 5.0) -> Outcome:
        async with self.output:
            return await supervise(
                self.proc, self.output, timeout_s=timeout_s, stop=self.stop, grace_s=grace_s
            )


JobFactory = Callable[[str], AbstractAsyncContextManager[Job]]


@pytest.fixture
def job(bus: Bus) -> JobFactory:
    @asynccontextmanager
    async def start(script: str) -> AsyncIterator[Job]:
        job_id = new_id()
        proc = await spawn(["/bin/sh", "-c", script], env=base_environment({}, job_id), cwd=None)
        try:
            yield Job(bus, proc, job_id)
        finally:
            if proc.returncode is None:  # a failed test must not leave its job running
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await asyncio.wait_for(proc.wait(), 30)

    return start


async def test_a_job_that_succeeds_streams_its_output(bus: Bus, job: JobFactory) -> None:
    async with job("echo out; echo err >&2") as j:
        outcome = await j.supervise()
    assert outcome == Outcome("succeeded", 0, None)
    summary = j.output.summary()
    assert (summary.stdout_bytes, summary.stderr_bytes) == (4, 4)
    stored = await read_log(bus, bus.subjects.output_stream, j.subject)
    assert len(stored) == summary.chunks
    assert sorted(r.data for r in stored) == [b"err\n", b"out\n"]


async def test_an_exit_status_and_a_signal_are_failures_that_say_which(
    job: JobFactory,
) -> None:
    async with job("exit 3") as j:
        assert await j.supervise() == Outcome("failed", 3, None, "exit status 3")
    async with job("kill -KILL $$") as j:
        outcome = await j.supervise()
    assert (outcome.status, outcome.exit_code, outcome.signal) == ("failed", None, 9)
    assert outcome.reason == "killed by signal 9 SIGKILL"


async def test_a_timeout_stops_the_whole_group(job: JobFactory) -> None:
    async with job("sleep 300 & echo $!; wait") as j:
        running = asyncio.create_task(j.supervise(timeout_s=0.5))
        child = int(await j.line())
        outcome = await asyncio.wait_for(running, 30)
    assert outcome.status == "timed_out"
    assert outcome.reason == "timed out after 0.5s"
    assert await gone(child)


async def test_a_job_ignoring_sigterm_is_killed_after_the_grace(
    job: JobFactory,
) -> None:
    async with job("trap '' TERM; echo ready; while :; do sleep 1; done") as j:
        running = asyncio.create_task(j.supervise(grace_s=0.5))
        assert await j.line() == "ready"
        j.stop.set("cancel", "cancelled by alice")
        outcome = await asyncio.wait_for(running, 30)
    assert outcome == Outcome("cancelled", None, None, "cancelled by alice")
    assert j.proc.returncode == -signal.SIGKILL


async def test_a_cancel_ends_the_job_as_cancelled(job: JobFactory) -> None:
    async with job("echo ready; sleep 300") as j:
        running = asyncio.create_task(j.supervise())
        assert await j.line() == "ready"
        j.stop.set("cancel")
        outcome = await asyncio.wait_for(running, 30)
    assert outcome == Outcome("cancelled", None, None, "cancelled")
    assert j.proc.returncode == -signal.SIGTERM


async def test_the_first_stop_reason_wins(job: JobFactory) -> None:
    async with job("echo ready; sleep 300") as j:
        running = asyncio.create_task(j.supervise())
        assert await j.line() == "ready"
        j.stop.set("cancel", "operator said so")
        j.stop.set("abandon", "agent stopping")
        outcome = await asyncio.wait_for(running, 30)
    assert (outcome.status, outcome.reason) == ("cancelled", "operator said so")


async def test_an_abandoned_job_is_stopped(job: JobFactory) -> None:
    async with job("echo ready; sleep 300") as j:
        running = asyncio.create_task(j.supervise())
        assert await j.line() == "ready"
        j.stop.set("abandon", "agent stopping")
        outcome = await asyncio.wait_for(running, 30)
    assert outcome == Outcome("abandoned", None, None, "agent stopping")


async def test_a_cancelled_caller_still_leaves_no_process_behind(
    job: JobFactory,
) -> None:
    async with job("sleep 300 & echo $!; sleep 300") as j:
        running = asyncio.create_task(j.supervise())
        child = int(await j.line())
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        # Killed, not merely abandoned: both end without anyone else signalling them.
        assert await gone(j.proc.pid)
        assert await gone(child)
