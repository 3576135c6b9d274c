"""Following many jobs with one reader: a run's consumers do not grow with its jobs."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

from agents import job_request, permissive_grant, submit

from agentd.agent import Agent
from agentd.config import AgentConfig
from agentd.identity import ensure_identity
from bus import Bus, Signer
from fleet.follow import JobsReader, OutputPrinter


async def _consumers(bus: Bus, stream: str) -> int:
    info = await bus.js.stream_info(stream)
    return int(info.state.consumer_count)


async def test_one_reader_follows_every_job_of_a_run(
    bus: Bus, tmp_path: Path, operator: tuple[Path, Signer]
) -> None:
    s = bus.subjects
    before = (await _consumers(bus, s.events_stream), await _consumers(bus, s.output_stream))
    out = io.BytesIO()
    printer = OutputPrinter(prefix=True, stdout=out, stderr=io.BytesIO())
    reader = await JobsReader.for_new_jobs(bus, printer)
    agents = [f"m{n}" for n in range(6)]
    try:
        # Submitted while their agents are away: queued, and followed all the same.
        watches = {}
        for agent in agents:
            job_id = await submit(bus, operator[1], agent, job_request(["echo", agent]))
            watches[agent] = reader.watch(agent, job_id)
        # A job of the same agents nobody follows here: read past, not folded.
        stranger = await submit(bus, operator[1], agents[0], job_request(["echo", "not ours"]))
        after = (await _consumers(bus, s.events_stream), await _consumers(bus, s.output_stream))
        assert after == (before[0] + 1, before[1] + 1)  # not 2 per job

        trust = tmp_path / "trust.toml"
        trust.write_text(permissive_grant(operator[1].public_key))
        runtimes = []
        for agent in agents:
            config = AgentConfig(id=agent, data_dir=tmp_path / agent, trust_file=trust)
            runtimes.append(Agent(bus, config, ensure_identity(config)))
        async with asyncio.TaskGroup() as tg:
            for runtime in runtimes:
                tg.create_task(runtime.run())
            async with asyncio.timeout(60):
                await asyncio.gather(*(w.done.wait() for w in watches.values()))
            for runtime in runtimes:
                runtime.stop()
    finally:
        await reader.close()
    for agent, watch in watches.items():
        assert watch.view is not None
        assert watch.view.status == "succeeded"
        assert f"{agent}: {agent}\n".encode() in out.getvalue()
        assert stranger not in watch.projection.jobs
    assert b"not ours" not in out.getvalue()
