"""Job round trip: submit ``true`` to an agent and wait for its result.

fleetbus: a real ``fleet-agentd`` process; the client publishes a signed
``job.submitted`` to the event log and waits for ``job.finished`` (journal, signed
events, JetStream acks and output stream included). Baseline, same run, same server:
a raw nats-py responder process that spawns ``true`` per request and replies. Prints
one JSON document with p50/p99 and the ratio, and where the agent's time went: the mean
of each step of the measured jobs, from the agent's own metrics
(``fleet_agent_job_step_seconds``).

    python -m bench.roundtrip [--count N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from nats.aio.msg import Msg

from bench.stats import ratios, summary
from bus import (
    ConnectSettings,
    Signer,
    connect,
    decode_event,
    generate_seed,
    provision,
    sign_envelope,
)
from bus.embedded import free_port, running_server
from bus.metrics import parse
from schemas import ArgvCommand, JobRequest, JobSubmitted, make_envelope, new_id

RESPONDER = """
import asyncio, sys, nats
async def main():
    nc = await nats.connect(sys.argv[1])
    async def handle(msg):
        proc = await asyncio.create_subprocess_exec("true")
        await proc.wait()
        await msg.respond(str(proc.returncode).encode())
    await nc.subscribe("bench.run", cb=handle)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


async def measure(url: str, work: Path, count: int) -> dict[str, object]:
    settings = ConnectSettings(servers=[url])
    signer = Signer(generate_seed())
    trust = work / "trust.toml"  # an agent runs nothing without one
    trust.write_text(f'[[grant]]\nkey = "{signer.public_key}"\ncommands = true\n')
    config = work / "agentd.toml"
    metrics = f"127.0.0.1:{free_port()}"
    config.write_text(
        f'id = "bench"\nserver = "{url}"\ndata_dir = "{work / "agent"}"\nlog_level = "WARNING"\n'
        f'trust_file = "{trust}"\nmetrics_listen = "{metrics}"\n'
    )
    async with await connect(settings) as bus:
        await provision(bus.js)
        agent = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agentd", "-c", str(config)
        )
        responder = await asyncio.create_subprocess_exec(
            sys.executable, "-c", RESPONDER, url, stdout=subprocess.PIPE
        )
        try:
            assert responder.stdout is not None
            await responder.stdout.readline()
            waiting: dict[str, asyncio.Future[str]] = {}

            async def on_finished(msg: Msg) -> None:
                event = decode_event(msg.data)
                future = waiting.pop(event.data.job_id, None)  # type: ignore[union-attr]
                if future is not None:
                    future.set_result(event.data.status)  # type: ignore[union-attr]

            await bus.nc.subscribe("fleet.evt.job.bench.*.finished", cb=on_finished)
            request = JobRequest(command=ArgvCommand(argv=["true"]))

            async def fleet_job() -> None:
                job = new_id()
                future = waiting[job] = asyncio.get_running_loop().create_future()
                data = JobSubmitted(
                    job_id=job, agent="bench", request=request, submitted_by="bench"
                )
                subject = bus.subjects.job_event("bench", job, "submitted")
                await bus.publish_event(
                    sign_envelope(make_envelope(data, source="bench", subject=subject), signer)
                )
                assert await asyncio.wait_for(future, 30) == "succeeded"

            async def raw_job() -> None:
                reply = await bus.nc.request("bench.run", b"", timeout=10)
                assert reply.data == b"0"

            await asyncio.wait_for(fleet_job(), 60)  # the agent is up once one job returns
            for _ in range(50):
                await fleet_job()
                await raw_job()
            raw, ours = [], []
            before = await asyncio.to_thread(_steps, metrics)
            for _ in range(count):
                t0 = time.perf_counter()
                await raw_job()
                t1 = time.perf_counter()
                await fleet_job()
                t2 = time.perf_counter()
                raw.append(t1 - t0)
                ours.append(t2 - t1)
            after = await asyncio.to_thread(_steps, metrics)
        finally:
            for proc in (agent, responder):
                proc.terminate()
                await proc.wait()
    base, fleet = summary(raw), summary(ours)
    return {
        "benchmark": "roundtrip",
        "job": "true",
        "count": count,
        "baseline_nats_py_request_reply_plus_subprocess": base,
        "fleetbus_job_roundtrip": fleet,
        **ratios(fleet, base),
        "agent_steps_mean_ms": {
            step: round((total - before.get(step, (0.0, 0))[0]) / n * 1000, 3)
            for step, (total, count_after) in sorted(after.items())
            if (n := count_after - before.get(step, (0.0, 0))[1]) > 0
        },
        # Every latency, for the histogram `python -m bench all` draws.
        "samples_ms": {
            "fleetbus": [round(s * 1000, 3) for s in ours],
            "baseline": [round(s * 1000, 3) for s in raw],
        },
    }


def _steps(listen: str) -> dict[str, tuple[float, int]]:
    """Seconds spent and jobs counted per step, from the agent's metrics."""
    with urllib.request.urlopen(f"http://{listen}/metrics", timeout=10) as reply:
        parsed = parse(reply.read().decode())
    name = "fleet_agent_job_step_seconds"
    return {
        dict(key)["step"]: (total, int(parsed[f"{name}_count"][key]))
        for key, total in parsed.get(f"{name}_sum", {}).items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.roundtrip", description=__doc__)
    parser.add_argument("--count", type=int, default=500, help="jobs per path")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, running_server(Path(tmp) / "nats") as server:
        result = asyncio.run(measure(server.url, Path(tmp), args.count))
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
