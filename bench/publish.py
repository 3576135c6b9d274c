"""Publish latency: fleetbus's event path against raw nats-py, in the same run.

fleetbus: build the envelope, sign it (ed25519), encode (msgpack), publish to
FLEET_EVENTS with a dedup id and wait for the ack. Baseline: nats-py ``js.publish`` of
bytes of the same size to the same stream, no signing, no id. Prints one JSON document.

    python -m bench.publish [--count N]
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
from bus.codec import encode_envelope
from bus.embedded import running_server
from bus.eventloop import run
from schemas import ArgvCommand, Envelope, JobRequest, JobSubmitted, make_envelope, new_id


async def measure(url: str, count: int) -> dict[str, object]:
    signer = Signer(generate_seed())
    request = JobRequest(command=ArgvCommand(argv=["/bin/true"]))
    async with await connect(ConnectSettings(servers=[url])) as bus:
        await provision(bus.js)

        def event() -> Envelope:
            job = new_id()
            data = JobSubmitted(job_id=job, agent="bench", request=request, submitted_by="op")
            subject = bus.subjects.job_event("bench", job, "submitted")
            return make_envelope(data, source="op", subject=subject)

        sample = encode_envelope(sign_envelope(event(), signer))
        for _ in range(200):  # warm both paths
            await bus.publish_event(sign_envelope(event(), signer))
            await bus.js.publish("fleet.evt.job.bench.warm.submitted", sample)

        raw, ours = [], []
        for i in range(count):
            # Interleaved, so drift in the machine's load hits both alike.
            t0 = time.perf_counter()
            await bus.js.publish(f"fleet.evt.job.bench.raw{i}.submitted", sample)
            t1 = time.perf_counter()
            await bus.publish_event(sign_envelope(event(), signer))
            t2 = time.perf_counter()
            raw.append(t1 - t0)
            ours.append(t2 - t1)
    base, fleet = summary(raw), summary(ours)
    return {
        "benchmark": "publish",
        "count": count,
        "payload_bytes": len(sample),
        "baseline_nats_py_js_publish": base,
        "fleetbus_publish_event": fleet,
        **ratios(fleet, base),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.publish", description=__doc__)
    parser.add_argument("--count", type=int, default=2000, help="publishes per path")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, running_server(Path(tmp)) as server:
        result = run(measure(server.url, args.count))
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
