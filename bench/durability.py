"""The cost of ``sync_interval: always``: publish-with-ack latency with and without it.

Two embedded servers, one with JetStream's default (fsync every 2 minutes) and one
fsyncing before every acknowledgement, as every config fleetbus ships does. Raw nats-py
``js.publish`` of a typical event-sized payload to each, interleaved so load drift hits
both alike, and fleetbus's own signed ``publish_event`` to the synced server. Prints one
JSON document; ``ratio_*`` is synced over default.

    python -m bench.durability [--count N] [--payload BYTES]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from bench.stats import ratios, summary
from bus import ConnectSettings, Signer, connect, generate_seed, provision, sign_envelope
from bus.embedded import running_server
from bus.eventloop import run
from schemas import ArgvCommand, JobRequest, JobSubmitted, make_envelope, new_id


async def measure(default_url: str, synced_url: str, count: int, size: int) -> dict[str, object]:
    payload = b"x" * size
    signer = Signer(generate_seed())
    request = JobRequest(command=ArgvCommand(argv=["/bin/true"]))
    async with (
        await connect(ConnectSettings(servers=[default_url])) as plain,
        await connect(ConnectSettings(servers=[synced_url])) as synced,
    ):
        await provision(plain.js)
        await provision(synced.js)
        subject = "fleet.evt.job.bench.{}.submitted"
        for i in range(200):  # warm both
            await plain.js.publish(subject.format(f"w{i}"), payload)
            await synced.js.publish(subject.format(f"w{i}"), payload)
        unsynced_s, synced_s, ours_s = [], [], []
        for i in range(count):
            t0 = time.perf_counter()
            await plain.js.publish(subject.format(f"r{i}"), payload)
            t1 = time.perf_counter()
            await synced.js.publish(subject.format(f"r{i}"), payload)
            t2 = time.perf_counter()
            job = new_id()
            data = JobSubmitted(job_id=job, agent="bench", request=request, submitted_by="op")
            envelope = make_envelope(
                data, source="op", subject=synced.subjects.job_event("bench", job, "submitted")
            )
            signed = sign_envelope(envelope, signer)
            t3 = time.perf_counter()
            await synced.publish_event(signed)
            t4 = time.perf_counter()
            unsynced_s.append(t1 - t0)
            synced_s.append(t2 - t1)
            ours_s.append(t4 - t3)
    base, durable, ours = summary(unsynced_s), summary(synced_s), summary(ours_s)
    return {
        "benchmark": "durability",
        "count": count,
        "payload_bytes": size,
        "baseline_nats_py_js_publish_default_sync": base,
        "nats_py_js_publish_sync_always": durable,
        "fleetbus_publish_event_sync_always": ours,
        **ratios(durable, base),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.durability", description=__doc__)
    parser.add_argument("--count", type=int, default=2000, help="publishes per path")
    parser.add_argument("--payload", type=int, default=600, help="bytes per raw publish")
    args = parser.parse_args(argv)
    # Under the working directory, not /tmp: /tmp may be a tmpfs, where fsync costs nothing.
    with (
        tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp,
        running_server(Path(tmp) / "default", name="default", sync_always=False) as default,
        running_server(Path(tmp) / "synced", name="synced") as synced,
    ):
        result = run(measure(default.url, synced.url, args.count, args.payload))
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
