"""Supervising one running job: exit, timeout, cancel or abandon, whichever comes first.

However it ends, nothing it started outlives it (see :mod:`agentd.contain`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from dataclasses import dataclass
from typing import Literal

from agentd.contain import leader_reaped, scope_of
from agentd.output import JobOutput
from agentd.process import signal_group

logger = logging.getLogger(__name__)

StopReason = Literal["cancel", "abandon"]

# After the job's leader exits, how long its pipes may stay open (a straggler that
# escaped the group, e.g. by calling setsid) before the agent stops reading them.
_PIPE_DRAIN_S = 5.0


@dataclass(frozen=True)
class Outcome:
    """How a job's process ended."""

    status: Literal["succeeded", "failed", "timed_out", "cancelled", "abandoned"]
    exit_code: int | None
    signal: int | None
    reason: str | None = None


class StopRequest:
    """A request to stop a running job, set by cancel or by shutdown."""

    def __init__(self) -> None:
        self.reason: StopReason | None = None
        self.detail: str | None = None
        self._event = asyncio.Event()

    def set(self, reason: StopReason, detail: str | None = None) -> None:
        if self.reason is None:  # the first reason wins: a cancel stays a cancel
            self.reason, self.detail = reason, detail
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()


def _exit_outcome(returncode: int) -> Outcome:
    if returncode == 0:
        return Outcome("succeeded", 0, None)
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else ""
        return Outcome(
            "failed", None, -returncode, f"killed by signal {-returncode} {name}".strip()
        )
    return Outcome("failed", returncode, None, f"exit status {returncode}")


async def supervise(
    proc: asyncio.subprocess.Process,
    output: JobOutput,
    *,
    timeout_s: float | None,
    stop: StopRequest,
    grace_s: float,
) -> Outcome:
    """Stream the job's output and wait for it to end, enforcing timeout and stop requests.

    Every process of the job (its group, and anything that detached from it) is gone
    when this returns, however it returns (even when the caller is cancelled).
    """
    assert proc.stdout is not None
    assert proc.stderr is not None
    pumps = [
        asyncio.create_task(output.pump(proc.stdout, "stdout")),
        asyncio.create_task(output.pump(proc.stderr, "stderr")),
    ]
    # Not proc.wait(): asyncio's waits for the pipes to close too, which a detached child
    # holding them would delay forever.
    exited = asyncio.create_task(_leader_exit(proc))
    stopped = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait(
            {exited, stopped}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
        if exited not in done:
            await _stop(proc, exited, grace_s)
        # The leader is gone; take the rest of the job with it (its group, and what left
        # the group: setsid children, daemons), so the pipes close.
        signal_group(proc.pid, signal.SIGKILL)
        await _end_scope(proc.pid)
        _, pending = await asyncio.wait(pumps, timeout=_PIPE_DRAIN_S)
        if pending:
            logger.warning("job pid %d: output pipes still open; stopped reading", proc.pid)
        returncode = await _returncode(proc)  # reaped, whichever way it ended
        if exited in done:
            outcome = _exit_outcome(returncode)
        elif stopped in done:
            if stop.reason == "cancel":
                outcome = Outcome("cancelled", None, None, stop.detail or "cancelled")
            else:
                outcome = Outcome("abandoned", None, None, stop.detail or "agent stopping")
        else:
            outcome = Outcome("timed_out", None, None, f"timed out after {timeout_s:g}s")
        return outcome
    finally:
        if proc.returncode is None:
            signal_group(proc.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        for task in (*pumps, exited, stopped):
            task.cancel()
        # Shielded so a cancelled caller still reaps everything it started.
        await asyncio.shield(
            asyncio.gather(*pumps, exited, stopped, _end_scope(proc.pid), return_exceptions=True)
        )
        if proc.returncode is not None:
            leader_reaped(proc.pid)


async def _stop(
    proc: asyncio.subprocess.Process, exited: asyncio.Task[None], grace_s: float
) -> None:
    """SIGTERM the job's group, SIGKILL it after ``grace_s``; until the leader is gone."""
    signal_group(proc.pid, signal.SIGTERM)
    await asyncio.wait({exited}, timeout=grace_s)
    signal_group(proc.pid, signal.SIGKILL)
    await exited


async def _leader_exit(proc: asyncio.subprocess.Process) -> None:
    """Until the job's leader process has exited (pipes may still be open)."""
    if proc.returncode is not None:
        return
    try:
        fd = os.pidfd_open(proc.pid)
    except ProcessLookupError:
        return  # already reaped
    except OSError:
        await proc.wait()  # no pidfd (Linux < 5.3): detached children can delay this
        return
    loop = asyncio.get_running_loop()
    gone = loop.create_future()

    def readable() -> None:
        if not gone.done():
            gone.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await gone
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def _returncode(proc: asyncio.subprocess.Process) -> int:
    """The leader's exit status, which the child watcher reports soon after its exit."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(_PIPE_DRAIN_S):
            return await proc.wait()
    # proc.wait() also waits for pipes some unknown holder keeps open; the status itself
    # is set as soon as the watcher reaps the leader.
    for _ in range(1000):
        if proc.returncode is not None:
            return proc.returncode
        await asyncio.sleep(0.01)
    raise RuntimeError(f"job pid {proc.pid} exited but was never reaped")


async def _end_scope(pid: int) -> None:
    scope = scope_of(pid)
    if scope is not None:
        await scope.end()
