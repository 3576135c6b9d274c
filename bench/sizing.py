"""Sizing a fleet: events per job, bytes per event, and server memory per agent.

fleetbus: ``--agents`` real ``fleet-agentd`` processes run ``--jobs`` jobs (``echo``) in
all; the event log's growth gives events and bytes per job, the nats-server's resident
memory before and after the agents connect gives memory per agent (their connections,
two durable consumers each, presence). Baseline, same run, same server: as many raw
nats-py connections each with one durable pull consumer on the same stream, and the raw
bytes of the same jobs' payloads. Prints one JSON document with the ratios.

    python -m bench.sizing [--agents N] [--jobs N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

from nats.aio.msg import Msg
from nats.js import api

from bus import ConnectSettings, Signer, connect, generate_seed, provision, sign_envelope
from bus.embedded import running_server
from schemas import ArgvCommand, JobRequest, JobSubmitted, make_envelope, new_id


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def settle(pid: int) -> int:
    """RSS after the server has had a moment to finish what the clients asked."""
    await asyncio.sleep(2.0)  # a measurement's settling time, not synchronisation
    return rss_bytes(pid)


async def measure(url: str, pid: int, work: Path, agents: int, jobs: int) -> dict[str, object]:
    signer = Signer(generate_seed())
    trust = work / "trust.toml"
    trust.write_text(f'[[grant]]\nkey = "{signer.public_key}"\ncommands = true\n')
    async with await connect(ConnectSettings(servers=[url])) as bus:
        await provision(bus.js)
        before = await settle(pid)
        # Baseline: raw connections with one durable pull consumer each.
        raw = []
        for i in range(agents):
            nc = await connect(ConnectSettings(servers=[url]))
            await nc.js.add_consumer(
                "FLEET_EVENTS",
                api.ConsumerConfig(
                    durable_name=f"raw_{i}",
                    filter_subject=f"fleet.evt.job.raw-{i}.*.submitted",
                    ack_policy=api.AckPolicy.EXPLICIT,
                ),
            )
            raw.append(nc)
        with_raw = await settle(pid)
        procs = []
        finished: asyncio.Queue[str] = asyncio.Queue()

        async def on_finished(msg: Msg) -> None:
            await finished.put(msg.subject)

        await bus.nc.subscribe("fleet.evt.job.*.*.finished", cb=on_finished)
        for i in range(agents):
            config = work / f"agent-{i}.toml"
            config.write_text(
                f'id = "size-{i}"\nserver = "{url}"\ndata_dir = "{work / f"a{i}"}"\n'
                f'log_level = "WARNING"\ntrust_file = "{trust}"\n'
            )
            procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "agentd", "-c", str(config)
                )
            )
        try:
            request = JobRequest(command=ArgvCommand(argv=["echo", "sizing a fleet"]))
            first = (await bus.js.stream_info("FLEET_EVENTS")).state
            out_first = (await bus.js.stream_info("FLEET_OUTPUT")).state
            payload_bytes = 0
            for n in range(jobs):
                agent = f"size-{n % agents}"
                job = new_id()
                data = JobSubmitted(job_id=job, agent=agent, request=request, submitted_by="b")
                envelope = make_envelope(
                    data, source="b", subject=bus.subjects.job_event(agent, job, "submitted")
                )
                payload_bytes += len(envelope.model_dump_json())
                await bus.publish_event(sign_envelope(envelope, signer))
            for _ in range(jobs):
                await asyncio.wait_for(finished.get(), 120)
            with_agents = await settle(pid)
            last = (await bus.js.stream_info("FLEET_EVENTS")).state
            out_last = (await bus.js.stream_info("FLEET_OUTPUT")).state
        finally:
            for i, proc in enumerate(procs):
                if proc.returncode is None:
                    proc.terminate()
                elif proc.returncode:
                    print((work / f"agent-{i}.log").read_text()[-2000:], file=sys.stderr)
                await proc.wait()
            for nc in raw:
                await nc.close()
    # Agents' own events (online, heartbeats in presence, not the log) are in the count.
    events = last.messages - first.messages
    per_agent = (with_agents - with_raw) / agents
    per_raw = (with_raw - before) / agents
    return {
        "benchmark": "sizing",
        "agents": agents,
        "jobs": jobs,
        "events_per_job": round(events / jobs, 2),
        "bytes_per_event": round((last.bytes - first.bytes) / events),
        "output_bytes_per_job": round((out_last.bytes - out_first.bytes) / jobs),
        "baseline_json_bytes_per_submission": round(payload_bytes / jobs),
        "server_rss_per_agent_bytes": round(per_agent),
        "baseline_server_rss_per_raw_consumer_bytes": round(per_raw),
        "ratio_rss_per_agent": round(per_agent / per_raw, 2) if per_raw > 0 else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sizing", description=__doc__)
    parser.add_argument("--agents", type=int, default=10, help="real agent processes")
    parser.add_argument("--jobs", type=int, default=500, help="jobs in all")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, running_server(Path(tmp) / "nats") as server:
        result = asyncio.run(measure(server.url, server.pid, Path(tmp), args.agents, args.jobs))
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
