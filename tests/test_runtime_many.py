"""Many agents in one event loop, through the same runtime the daemon uses."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from agents import finished, job_request, permissive_grant, submit

from agentd.agent import Agent
from agentd.config import AgentConfig
from agentd.identity import ensure_identity
from bus import Bus, Signer


@pytest.mark.slow
async def test_forty_agents_share_one_loop_and_one_connection(
    bus: Bus, tmp_path: Path, operator: tuple[Path, Signer]
) -> None:
    runtimes = []
    trust = tmp_path / "trust.toml"
    trust.write_text(permissive_grant(operator[1].public_key))
    for n in range(40):
        config = AgentConfig(
            id=f"a{n:02d}", data_dir=tmp_path / f"a{n:02d}", heartbeat_s=5.0, trust_file=trust
        )
        runtimes.append(Agent(bus, config, ensure_identity(config)))
    async with asyncio.TaskGroup() as tg:
        for runtime in runtimes:
            tg.create_task(runtime.run())
        async with asyncio.timeout(30):
            await asyncio.gather(*(r.ready.wait() for r in runtimes))
        jobs = {
            r.id: await submit(bus, operator[1], r.id, job_request(["echo", r.id]))
            for r in runtimes
        }
        results = await asyncio.gather(*(finished(bus, a, j) for a, j in jobs.items()))
        assert [r.status for r in results] == ["succeeded"] * 40
        assert [r.output_tail for r in results] == [f"{a}\n" for a in jobs]
        # Each has its own journal, identity and presence.
        assert len({r.signer.public_key for r in runtimes}) == 40
        kv = await bus.key_value(bus.subjects.presence_bucket)
        assert sorted(await kv.keys()) == sorted(jobs)
        for runtime in runtimes:
            runtime.stop()
    assert all((tmp_path / a / "journal.jsonl").exists() for a in jobs)
