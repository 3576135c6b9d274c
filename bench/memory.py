"""Memory: an idle agent, the same agent after many jobs, each extra hosted identity,
and nats-server with N idle agents.

fleetbus: a real ``fleet-agentd`` process, its RSS and PSS (``/proc/PID/smaps_rollup``)
once ready and again after ``--jobs`` ``true`` jobs (flat is the goal: the journal keeps a
bounded window); the RSS this process gains per extra agent identity it hosts; the
nats-server's RSS before and after N hosted agents come online. Baseline, same run: a raw
nats-py process connected with one subscription, idle.

And a real ``fleet-master`` process once it has folded ``--master-jobs`` jobs (each
submitted, started and finished, signed), read from the log at start: its RSS and PSS
once ``/readyz`` says ready. Those events are stored by a second embedded server with
JetStream's default sync (filling a synced store at some 900 events/s would take minutes
and changes nothing the master holds).

    python -m bench.memory [--jobs N] [--agents N] [--master-jobs N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from agentd.agent import Agent
from agentd.config import AgentConfig
from agentd.identity import ensure_identity
from bench.harness import Finished, agent_process, measure_and_print, submit, write_agent_config
from bench.replay import fill
from bus import ConnectSettings, Signer, connect, generate_seed, provision
from bus.embedded import free_port, running_server

FLEET_MASTER = str(Path(sys.executable).parent / "fleet-master")

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


def _metrics(url: str) -> dict[str, float]:
    """The unlabelled samples of a ``/metrics`` page; empty while it does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=5) as page:  # noqa: S310 - our own loopback
            text = page.read().decode()
    except OSError:
        return {}
    samples = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if line and not line.startswith("#") and "{" not in name:
            samples[name] = float(value)
    return samples


def _ready_master(url: str, data_dir: Path, timeout: float) -> tuple[float, dict[str, int], int]:
    """Start a real ``fleet-master``, wait for ``/readyz``'s figure to say ready, and stop
    it: seconds to ready, its RSS/PSS then, events it had folded."""
    data_dir.mkdir(parents=True)
    port = free_port()
    config = data_dir / "master.toml"
    config.write_text(
        f'server = "{url}"\ndata_dir = "{data_dir}"\n'
        f'log_level = "WARNING"\nmetrics_listen = "127.0.0.1:{port}"\n'
    )
    metrics = f"http://127.0.0.1:{port}/metrics"
    master = subprocess.Popen([FLEET_MASTER, "run", "-c", str(config)], stderr=subprocess.DEVNULL)
    try:
        t0 = time.perf_counter()
        deadline = time.monotonic() + timeout
        samples: dict[str, float] = {}
        while samples.get("fleet_master_ready") != 1:
            if master.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the master did not get ready (exit {master.returncode})")
            time.sleep(0.2)  # polling another process's /metrics: nothing to await
            samples = _metrics(metrics)
        ready_s = time.perf_counter() - t0
        rss = memory_kib(master.pid)
    finally:
        master.terminate()
        master.wait(30)
    return ready_s, rss, int(samples.get("fleet_master_events_folded_total", 0))


def master_memory(jobs: int) -> dict[str, object]:
    """A real ``fleet-master`` with an empty log, then another once it has folded ``jobs``
    jobs (3 events each) at start: RSS and PSS in KiB, and what the second folded."""
    with (
        tempfile.TemporaryDirectory() as tmp,
        running_server(Path(tmp) / "nats", sync_always=False) as server,
    ):
        work = Path(tmp)

        async def store(count: int) -> float:
            settings = ConnectSettings(servers=[server.url], request_timeout_s=30)
            async with await connect(settings) as bus:
                await provision(bus.js)
                t0 = time.perf_counter()
                await fill(bus, count)
                return time.perf_counter() - t0

        asyncio.run(store(0))
        _, empty, _ = _ready_master(server.url, work / "empty", 120)
        fill_s = asyncio.run(store(3 * jobs))
        ready_s, rss, folded = _ready_master(server.url, work / "full", 120 + jobs / 100)
    growth = (rss["rss_kib"] - empty["rss_kib"]) * 1024
    return {
        "master_jobs": jobs,
        "master_events_folded": folded,
        "master_fill_events_per_s": round(3 * jobs / fill_s) if jobs else 0,
        "master_ready_s": round(ready_s, 2),
        "master_empty_log": empty,
        "master_with_jobs": rss,
        "master_bytes_per_job": round(growth / jobs, 1) if jobs else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__)
    parser.add_argument("--jobs", type=int, default=2000, help="jobs run by the agent")
    parser.add_argument("--agents", type=int, default=100, help="idle agents hosted")
    parser.add_argument(
        "--master-jobs", type=int, default=100_000, help="jobs the measured master folds"
    )
    args = parser.parse_args(argv)
    # The master first, on its own server: its figure is what this bench adds to the JSON.
    master = master_memory(args.master_jobs)

    async def both(url: str, pid: int, work: Path) -> dict[str, object]:
        return {**await measure(url, pid, work, args.jobs, args.agents), **master}

    return measure_and_print(both)


if __name__ == "__main__":
    sys.exit(main())
