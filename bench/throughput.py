"""Throughput: N ``true`` jobs through one real agent running ``max_jobs`` at once.

fleetbus: a real ``fleet-agentd`` process with ``max_jobs`` slots; the client publishes N
signed ``job.submitted`` and waits for every ``job.finished``. Baseline, same run, same
server: a raw nats-py responder that spawns ``true`` per request, ``max_jobs`` at once, fed
by as many concurrent requesters. Prints jobs per second on each side and their ratio
(fleetbus's rate over the baseline's: 1.0 is as fast as raw).

    python -m bench.throughput [--jobs N] [--max-jobs M]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from pathlib import Path

from bench.harness import Finished, agent_process, measure_and_print, submit, write_agent_config
from bus import ConnectSettings, Signer, connect, generate_seed, provision

RESPONDER = """
import asyncio, sys, nats
async def main():
    nc = await nats.connect(sys.argv[1])
    slots = asyncio.Semaphore(int(sys.argv[2]))
    tasks = set()
    async def run(msg):
        async with slots:
            proc = await asyncio.create_subprocess_exec("true")
            await proc.wait()
        await msg.respond(str(proc.returncode).encode())
    async def handle(msg):
        task = asyncio.create_task(run(msg))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await nc.subscribe("bench.run", cb=handle)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


async def measure(url: str, work: Path, jobs: int, max_jobs: int) -> dict[str, object]:
    signer = Signer(generate_seed())
    config = write_agent_config(work, url, signer, "bench", max_jobs)
    async with await connect(ConnectSettings(servers=[url])) as bus:
        await provision(bus.js)
        finished = Finished()
        await finished.subscribe(bus, "bench")
        responder = await asyncio.create_subprocess_exec(
            sys.executable, "-c", RESPONDER, url, str(max_jobs), stdout=subprocess.PIPE
        )
        try:
            assert responder.stdout is not None
            await responder.stdout.readline()
            async with agent_process(config):
                warm = await submit(bus, signer, "bench")
                await finished.count({warm}, 60)  # the agent is up once one job returns

                t0 = time.perf_counter()
                ids: set[str] = set()
                for _ in range(jobs):
                    ids.add(await submit(bus, signer, "bench"))
                done = await finished.count(ids, 30 + jobs / 10)
                fleet_s = time.perf_counter() - t0

                remaining = jobs

                async def requester() -> None:
                    nonlocal remaining
                    while remaining > 0:
                        remaining -= 1
                        reply = await bus.nc.request("bench.run", b"", timeout=30)
                        assert reply.data == b"0"

                t0 = time.perf_counter()
                await asyncio.gather(*(requester() for _ in range(max_jobs)))
                base_s = time.perf_counter() - t0
        finally:
            responder.terminate()
            await responder.wait()
    failed = sum(1 for j in ids if finished.statuses.get(j) != "succeeded")
    fleet_rate, base_rate = done / fleet_s, jobs / base_s
    return {
        "benchmark": "throughput",
        "jobs": jobs,
        "max_jobs": max_jobs,
        "finished": done,
        "not_succeeded": failed,
        "fleetbus_s": round(fleet_s, 3),
        "baseline_s": round(base_s, 3),
        "fleetbus_jobs_per_s": round(fleet_rate, 1),
        "baseline_jobs_per_s": round(base_rate, 1),
        "ratio": round(fleet_rate / base_rate, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__)
    parser.add_argument("--jobs", type=int, default=2000, help="jobs on each path")
    parser.add_argument("--max-jobs", type=int, default=16, help="jobs run at once")
    args = parser.parse_args(argv)
    return measure_and_print(lambda url, _pid, work: measure(url, work, args.jobs, args.max_jobs))


if __name__ == "__main__":
    sys.exit(main())
