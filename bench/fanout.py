"""Fan-out: one ``true`` job to each of N agents hosted in this process.

fleetbus: N agent runtimes (the daemon's own :class:`agentd.agent.Agent`, one shared
connection, as ``tests/test_runtime_many.py`` hosts them); the client publishes one signed
``job.submitted`` per agent and waits for all N ``job.finished``. Baseline, same run, same
server: N raw nats-py subscriptions in one responder process, each spawning ``true`` per
request, and N concurrent requests. Prints both times and their ratio.

    python -m bench.fanout [--agents N]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from pathlib import Path

from agentd.agent import Agent
from agentd.config import AgentConfig
from agentd.identity import ensure_identity
from bench.harness import Finished, measure_and_print, submit
from bus import ConnectSettings, Signer, connect, generate_seed, provision

RESPONDER = """
import asyncio, sys, nats
async def main():
    nc = await nats.connect(sys.argv[1])
    tasks = set()
    async def run(msg):
        proc = await asyncio.create_subprocess_exec("true")
        await proc.wait()
        await msg.respond(str(proc.returncode).encode())
    async def handle(msg):
        task = asyncio.create_task(run(msg))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    for n in range(int(sys.argv[2])):
        await nc.subscribe(f"bench.fan.{n}", cb=handle)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


async def measure(url: str, work: Path, agents: int) -> dict[str, object]:
    signer = Signer(generate_seed())
    trust = work / "trust.toml"
    trust.write_text(f'[[grant]]\nkey = "{signer.public_key}"\ncommands = true\n')
    async with await connect(ConnectSettings(servers=[url])) as bus:
        await provision(bus.js)
        finished = Finished()
        await finished.subscribe(bus)
        runtimes = []
        for n in range(agents):
            config = AgentConfig(
                id=f"a{n:05d}", data_dir=work / f"a{n:05d}", heartbeat_s=30.0, trust_file=trust
            )
            runtimes.append(Agent(bus, config, ensure_identity(config)))
        responder = await asyncio.create_subprocess_exec(
            sys.executable, "-c", RESPONDER, url, str(agents), stdout=subprocess.PIPE
        )
        try:
            assert responder.stdout is not None
            await responder.stdout.readline()
            async with asyncio.TaskGroup() as tg:
                for runtime in runtimes:
                    tg.create_task(runtime.run())
                async with asyncio.timeout(60 + agents / 5):
                    await asyncio.gather(*(r.ready.wait() for r in runtimes))

                t0 = time.perf_counter()
                jobs = {await submit(bus, signer, r.id) for r in runtimes}
                done = await finished.count(jobs, 60 + agents / 5)
                fleet_s = time.perf_counter() - t0

                t0 = time.perf_counter()
                replies = await asyncio.gather(
                    *(bus.nc.request(f"bench.fan.{n}", b"", timeout=60) for n in range(agents))
                )
                base_s = time.perf_counter() - t0
                assert all(r.data == b"0" for r in replies)
                for runtime in runtimes:
                    runtime.stop()
        finally:
            responder.terminate()
            await responder.wait()
    return {
        "benchmark": "fanout",
        "agents": agents,
        "finished": done,
        "succeeded": sum(1 for j in jobs if finished.statuses.get(j) == "succeeded"),
        "fleetbus_s": round(fleet_s, 3),
        "baseline_s": round(base_s, 3),
        "ratio": round(fleet_s / base_s, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fanout", description=__doc__)
    parser.add_argument("--agents", type=int, default=100, help="agents hosted in-process")
    args = parser.parse_args(argv)
    return measure_and_print(lambda url, _pid, work: measure(url, work, args.agents))


if __name__ == "__main__":
    sys.exit(main())
