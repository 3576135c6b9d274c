"""What the benchmarks share: a provisioned server, agents to run jobs, jobs to await."""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from nats.aio.msg import Msg

from bus import Bus, Signer, decode_event, sign_envelope
from bus.embedded import running_server
from bus.eventloop import run
from schemas import ArgvCommand, JobRequest, JobSubmitted, make_envelope, new_id

TRUE = JobRequest(command=ArgvCommand(argv=["true"]))


def write_agent_config(work: Path, url: str, signer: Signer, agent: str, max_jobs: int) -> Path:
    """An agent config (and a trust file granting ``signer`` commands) under ``work``."""
    trust = work / "trust.toml"  # an agent runs nothing without one
    trust.write_text(f'[[grant]]\nkey = "{signer.public_key}"\ncommands = true\n')
    config = work / f"{agent}.toml"
    config.write_text(
        f'id = "{agent}"\nserver = "{url}"\ndata_dir = "{work / agent}"\n'
        f'log_level = "WARNING"\ntrust_file = "{trust}"\nmax_jobs = {max_jobs}\n'
    )
    return config


@asynccontextmanager
async def agent_process(config: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """A real ``fleet-agentd`` process, terminated and reaped on the way out."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "agentd", "-c", str(config))
    try:
        yield proc
    finally:
        proc.terminate()
        await proc.wait()


class Finished:
    """Every ``job.finished`` of the agents matching ``agent`` (a subject token or ``*``),
    counted as it comes: one core subscription, no consumer."""

    def __init__(self) -> None:
        self.statuses: dict[str, str] = {}
        self._waiting: dict[str, asyncio.Future[str]] = {}
        self.changed = asyncio.Event()

    async def subscribe(self, bus: Bus, agent: str = "*") -> None:
        await bus.nc.subscribe(f"{bus.subjects.prefix}.evt.job.{agent}.*.finished", cb=self._on)

    async def _on(self, msg: Msg) -> None:
        event = decode_event(msg.data)
        job_id: str = event.data.job_id  # type: ignore[union-attr]
        status: str = event.data.status  # type: ignore[union-attr]
        self.statuses[job_id] = status
        future = self._waiting.pop(job_id, None)
        if future is not None and not future.done():
            future.set_result(status)
        self.changed.set()

    def future(self, job_id: str) -> asyncio.Future[str]:
        future = self._waiting[job_id] = asyncio.get_running_loop().create_future()
        return future

    async def count(self, jobs: set[str], timeout: float) -> int:
        """Wait until every job in ``jobs`` finished (or ``timeout``); how many did."""
        async with asyncio.timeout(timeout):
            while not jobs <= self.statuses.keys():
                self.changed.clear()
                await self.changed.wait()
        return len(jobs & self.statuses.keys())


async def submit(bus: Bus, signer: Signer, agent: str, request: JobRequest = TRUE) -> str:
    """Publish one signed ``job.submitted``; its job id."""
    job = new_id()
    data = JobSubmitted(job_id=job, agent=agent, request=request, submitted_by="bench")
    subject = bus.subjects.job_event(agent, job, "submitted")
    await bus.publish_event(
        sign_envelope(make_envelope(data, source="bench", subject=subject), signer)
    )
    return job


Measure = Callable[[str, int, Path], Coroutine[Any, Any, dict[str, object]]]
"""A benchmark's body: given the server's URL, its pid and a scratch directory."""


def measure_and_print(measure: Measure) -> int:
    """Run ``measure`` against a fresh embedded server, on the stock loop as the agent
    daemon runs, and print its JSON; the exit code."""
    with tempfile.TemporaryDirectory() as tmp, running_server(Path(tmp) / "nats") as server:
        result = run(measure(server.url, server.pid, Path(tmp)), use_uvloop=False)
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0
