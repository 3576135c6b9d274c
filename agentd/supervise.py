"""Supervising one running job: exit, timeout, cancel or abandon, whichever comes first."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass
from typing import Literal

from agentd.output import JobOutput
from agentd.process import signal_group, stop_group

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

    The job's whole process group is gone when this returns, however it returns (even
    when the caller is cancelled).
    """
    assert proc.stdout is not None
    assert proc.stderr is not None
    pumps = [
        asyncio.create_task(output.pump(proc.stdout, "stdout")),
        asyncio.create_task(output.pump(proc.stderr, "stderr")),
    ]
    exited = asyncio.create_task(proc.wait())
    stopped = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait(
            {exited, stopped}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
        if exited in done:
            outcome = _exit_outcome(exited.result())
        elif stopped in done:
            await stop_group(proc, grace_s)
            if stop.reason == "cancel":
                outcome = Outcome("cancelled", None, None, stop.detail or "cancelled")
            else:
                outcome = Outcome("abandoned", None, None, stop.detail or "agent stopping")
        else:
            await stop_group(proc, grace_s)
            outcome = Outcome("timed_out", None, None, f"timed out after {timeout_s:g}s")
        # The leader is gone; take the rest of its group with it, so the pipes close.
        signal_group(proc.pid, signal.SIGKILL)
        _, pending = await asyncio.wait(pumps, timeout=_PIPE_DRAIN_S)
        if pending:
            logger.warning("job pid %d: output pipes still open; stopped reading", proc.pid)
        return outcome
    finally:
        if proc.returncode is None:
            signal_group(proc.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        for task in (*pumps, exited, stopped):
            task.cancel()
        # Shielded so a cancelled caller still reaps everything it started.
        await asyncio.shield(asyncio.gather(*pumps, exited, stopped, return_exceptions=True))
