"""Scale: N simulated agents online at once, one job fanned out to all of them, followed.

fleetbus: ``--procs`` ``fleet-agentd --simulate`` processes (the daemon's own code path,
each identity with its own key, journal and connection) against a freshly provisioned
embedded server with no limit changed by hand. Measured: the time until every agent is
present (its presence key, what ``fleet run -g`` lists); then the whole
``fleet run -g 'sim*' --json -- true`` process, which reads presence, submits N signed
jobs and follows them all to their end with one reader (``fleetbus_s``); and within it
the fan-out as the server saw it, from the first ``job.submitted`` to the last
``job.finished`` (``fleetbus_fanout_s``). Baseline, same run, same server, before the
agents start (so the server holds one fleet's connections at a time): N raw nats-py
connections in as many processes, each subscribed to its own subject and spawning
``true`` per request, and N concurrent requests. Reported too: the nats-server's RSS
(now and at its peak) and the RSS of the processes hosting the agents.

The agents beat their presence every ``--heartbeat-s`` (the agent's default, 5 s: at
10,000 agents, 2,000 synced KV writes a second before any job runs). It must stay under
the presence bucket's TTL (15 s), or agents drop out of ``fleet run -g``'s view between
beats.

    python -m bench.scale [--agents N] [--procs P] [--heartbeat-s S]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.harness import measure_and_print
from bench.scale_hosts import baseline, raise_nofile, rss_mib, split, stop_all
from bus import Bus, ConnectSettings, Signer, connect, generate_seed, provision, write_seed_file
from schemas import event_name

FLEET = str(Path(sys.executable).parent / "fleet")


class Window:
    """When the first ``job.submitted`` was heard and the last ``job.finished``, and of
    how many jobs (core subscriptions, no consumer): the fan-out as the server saw it,
    without ``fleet run``'s start-up and presence read. Jobs are counted by subject: a
    publish retried after a lost acknowledgement is stored once but heard twice."""

    def __init__(self) -> None:
        self.submitted: set[str] = set()
        self.finished: set[str] = set()
        self.first_submitted = self.last_submitted = self.last_finished = 0.0

    async def subscribe(self, bus: Any) -> None:
        jobs = f"{bus.subjects.prefix}.evt.job.*.*"
        await bus.nc.subscribe(f"{jobs}.{event_name('job.submitted')}", cb=self._on_submitted)
        await bus.nc.subscribe(f"{jobs}.{event_name('job.finished')}", cb=self._on_finished)

    async def _on_submitted(self, msg: Any) -> None:
        now = time.perf_counter()
        if not self.submitted:
            self.first_submitted = now
        if msg.subject not in self.submitted:
            self.last_submitted = now
            self.submitted.add(msg.subject)

    async def _on_finished(self, msg: Any) -> None:
        if msg.subject not in self.finished:
            self.last_finished = time.perf_counter()
            self.finished.add(msg.subject)


async def _present(bus: Bus, count: int) -> None:
    """Return once ``count`` agents have a live presence key (what ``fleet run -g``
    lists), watching the bucket: one short-lived watcher, no polling."""
    kv = await bus.kv(bus.subjects.presence_bucket)
    present: set[str] = set()
    async with kv.watch() as updates:
        async for entry in updates:
            if entry is None:
                continue  # caught up with what was there: keep watching
            if entry.deleted:
                present.discard(entry.key)
            else:
                present.add(entry.key)
            if len(present) >= count:
                return


async def wait_online(
    bus: Bus, count: int, hosts: list[asyncio.subprocess.Process], timeout: float
) -> None:
    """Until ``count`` agents are present; an agent process exiting first is an error."""
    present = asyncio.create_task(_present(bus, count))
    exits = [asyncio.create_task(p.wait()) for p in hosts]
    try:
        async with asyncio.timeout(timeout):
            await asyncio.wait([present, *exits], return_when=asyncio.FIRST_COMPLETED)
        if not present.done():
            raise RuntimeError("an agent process exited before every agent was online")
        present.result()
    finally:
        for task in (present, *exits):
            task.cancel()
        await asyncio.gather(present, *exits, return_exceptions=True)


def _agent_config(work: Path, url: str, n: int, trust: Path, heartbeat_s: float) -> Path:
    config = work / f"sim{n}.toml"
    config.write_text(
        f'id = "sim{n}"\nserver = "{url}"\ndata_dir = "{work / f"sim{n}"}"\n'
        f'log_level = "WARNING"\ntrust_file = "{trust}"\nheartbeat_s = {heartbeat_s}\n'
    )
    return config


async def measure(
    url: str, server_pid: int, work: Path, agents: int, procs: int, heartbeat_s: float
) -> dict[str, object]:
    nofile = raise_nofile()
    timeout = 120 + agents / 20
    base = await baseline(url, agents, procs, timeout)
    key = work / "operator.nk"
    write_seed_file(key, generate_seed())
    trust = work / "trust.toml"
    trust.write_text(f'[[grant]]\nkey = "{Signer.from_file(key).public_key}"\ncommands = true\n')
    env = {**os.environ, "FLEET_SERVER": url, "FLEET_NKEY": str(key), "FLEET_USER": "bench"}
    async with await connect(ConnectSettings(servers=[url])) as bus:
        await provision(bus.js)
        window = Window()
        await window.subscribe(bus)
        hosts: list[asyncio.subprocess.Process] = []
        logs = work / "agents.log"
        with logs.open("wb") as log:
            try:
                t0 = time.perf_counter()
                for n, count in enumerate(split(agents, procs)):
                    config = _agent_config(work, url, n, trust, heartbeat_s)
                    hosts.append(
                        await asyncio.create_subprocess_exec(
                            sys.executable,
                            "-m",
                            "agentd",
                            "-c",
                            str(config),
                            "--simulate",
                            str(count),
                            stdout=log,
                            stderr=log,
                        )
                    )
                await wait_online(bus, agents, hosts, timeout)
                online_s = time.perf_counter() - t0
                server_online = rss_mib(server_pid)

                t0 = time.perf_counter()
                run = await asyncio.create_subprocess_exec(
                    FLEET,
                    "run",
                    "-g",
                    "sim*",
                    "--json",
                    "--wait",
                    str(int(timeout)),
                    "--",
                    "true",
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                )
                out, err = await run.communicate()
                fleet_s = time.perf_counter() - t0
                if run.returncode not in (0, 4):
                    raise RuntimeError(f"fleet run exited {run.returncode}: {err[-2000:]!r}")
                outcomes = json.loads(out)["jobs"]
                await asyncio.sleep(0)
                server_after = rss_mib(server_pid)
                host_rss = [rss_mib(p.pid) for p in hosts]
            except BaseException:
                sys.stderr.write(logs.read_text(errors="replace")[-4000:])
                raise
            finally:
                await stop_all(hosts, 60 + agents / 100)
    return {
        "benchmark": "scale",
        "agents": agents,
        "procs": procs,
        "heartbeat_s": heartbeat_s,
        "online_s": round(online_s, 3),
        "targeted": len(outcomes),
        "finished": len(window.finished),
        "followed": sum(1 for o in outcomes if o["status"] not in ("queued", "running")),
        "succeeded": sum(1 for o in outcomes if o["status"] == "succeeded"),
        "fleetbus_s": round(fleet_s, 3),
        "fleetbus_fanout_s": round(window.last_finished - window.first_submitted, 3),
        # fleet run submits one job after another, each acknowledged: how long that took.
        "fleetbus_submit_s": round(window.last_submitted - window.first_submitted, 3),
        "baseline_s": base["fanout_s"],
        "ratio": round(fleet_s / base["fanout_s"], 3),
        "baseline_online_s": base["online_s"],
        "ratio_fanout": round(
            (window.last_finished - window.first_submitted) / base["fanout_s"], 3
        ),
        "ratio_online": round(online_s / base["online_s"], 3),
        "nats_server_rss_mib": server_after["rss_mib"],
        "nats_server_peak_rss_mib": server_after["peak_rss_mib"],
        "nats_server_rss_mib_all_online": server_online["rss_mib"],
        "host_rss_mib": round(sum(h["rss_mib"] for h in host_rss), 1),
        "host_rss_mib_per_agent": round(sum(h["rss_mib"] for h in host_rss) / agents, 3),
        "baseline_host_rss_mib": base["host_rss_mib"],
        "rlimit_nofile": nofile,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    parser.add_argument("--agents", type=int, default=1000, help="simulated agents")
    parser.add_argument("--procs", type=int, default=4, help="processes hosting them")
    parser.add_argument(
        "--heartbeat-s", type=float, default=5.0, help="the agents' heartbeat_s (under 15)"
    )
    args = parser.parse_args(argv)
    raise_nofile()  # before the server starts: it inherits the limit
    return measure_and_print(
        lambda url, pid, work: measure(url, pid, work, args.agents, args.procs, args.heartbeat_s)
    )


if __name__ == "__main__":
    sys.exit(main())
