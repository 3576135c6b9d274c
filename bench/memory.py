"""Memory: an idle agent, the same agent after many jobs, each extra hosted identity,
and nats-server with N idle agents.

fleetbus: a real ``fleet-agentd`` process, its RSS and PSS (``/proc/PID/smaps_rollup``)
once ready and again after ``--jobs`` ``true`` jobs (flat is the goal: the journal keeps a
bounded window); the RSS this process gains per extra agent identity it hosts; the
nats-server's RSS before and after N hosted agents come online. Baseline, same run: a raw
nats-py process connected with one subscription, idle. Not measured here: the master with
100,000 jobs projected (see bench/README.md).

    python -m bench.memory [--jobs N] [--agents N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
from pathlib import Path

from agentd.agent import Agent
from agentd.config import AgentConfig
from agentd.identity import ensure_identity
from bench.harness import Finished, agent_process, measure_and_print, submit, write_agent_config
from bus import ConnectSettings, Signer, connect, generate_seed, provision

IDLE = """
import asyncio, sys, nats
async def main():
    nc = await nats.connect(sys.argv[1])
    async def ignore(msg):
        pass
    await nc.subscribe("bench.idle", cb=ignore)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def memory_kib(pid: int) -> dict[str, int]:
    """RSS and PSS of ``pid`` in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("Rss", "Pss"):
            fields[name.lower() + "_kib"] = int(rest.split()[0])
    return fields


async def measure(
    url: str, server_pid: int, work: Path, jobs: int, agents: int
) -> dict[str, object]:
    signer = Signer(generate_seed())
    config = write_agent_config(work, url, signer, "bench", 16)
    async with await connect(ConnectSettings(servers=[url])) as bus:
        await provision(bus.js)
        finished = Finished()
        await finished.subscribe(bus)
        idle = await asyncio.create_subprocess_exec(
            sys.executable, "-c", IDLE, url, stdout=subprocess.PIPE
        )
        try:
            assert idle.stdout is not None
            await idle.stdout.readline()
            baseline = memory_kib(idle.pid)
        finally:
            idle.terminate()
            await idle.wait()

        async with agent_process(config) as agent:
            await finished.count({await submit(bus, signer, "bench")}, 60)
            ready = memory_kib(agent.pid)
            ids = set()
            for _ in range(jobs):
                ids.add(await submit(bus, signer, "bench"))
            done = await finished.count(ids, 60 + jobs / 5)
            after = memory_kib(agent.pid)

        server_before = memory_kib(server_pid)
        own_before = memory_kib(os.getpid())
        trust = work / "trust.toml"
        runtimes = []
        for n in range(agents):
            hosted = AgentConfig(
                id=f"h{n:05d}", data_dir=work / f"h{n:05d}", heartbeat_s=30.0, trust_file=trust
            )
            runtimes.append(Agent(bus, hosted, ensure_identity(hosted)))
        async with asyncio.TaskGroup() as tg:
            for runtime in runtimes:
                tg.create_task(runtime.run())
            async with asyncio.timeout(60 + agents / 5):
                await asyncio.gather(*(r.ready.wait() for r in runtimes))
            own_after = memory_kib(os.getpid())
            server_after = memory_kib(server_pid)
            for runtime in runtimes:
                runtime.stop()
    per_identity = (own_after["rss_kib"] - own_before["rss_kib"]) / max(agents, 1)
    return {
        "benchmark": "memory",
        "baseline_nats_py_idle": baseline,
        "agent_idle": ready,
        "agent_after_jobs": after,
        "jobs": jobs,
        "jobs_finished": done,
        "agent_growth_bytes_per_job": round((after["rss_kib"] - ready["rss_kib"]) * 1024 / jobs, 1)
        if jobs
        else 0.0,
        "hosted_agents": agents,
        "rss_kib_per_hosted_identity": round(per_identity, 1),
        "nats_server_before_agents": server_before,
        "nats_server_with_agents": server_after,
        "ratio": round(ready["rss_kib"] / baseline["rss_kib"], 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__)
    parser.add_argument("--jobs", type=int, default=2000, help="jobs run by the agent")
    parser.add_argument("--agents", type=int, default=100, help="idle agents hosted")
    args = parser.parse_args(argv)
    return measure_and_print(lambda url, pid, work: measure(url, pid, work, args.jobs, args.agents))


if __name__ == "__main__":
    sys.exit(main())
