"""Replay speed and the master's restart-to-ready time, beside a raw nats-py read.

Stores N events (default 1,000,000: jobs submitted, started, finished, signed) in an
embedded server's event log, then measures, in the same run:

* baselines: raw nats-py reading every message of the stream, nothing decoded, through
  a pull consumer's ``fetch`` and through nats-py's ordered push consumer;
* fleetbus's read alone: :func:`bus.bulkread.read_bulk`, what ``fleet replay`` and
  ``fleet audit`` read the log with;
* fleetbus replay: that read plus decoding, validating and folding every event
  (``ledger.driver.fold_records``; signatures are verified once, on ingest and by
  ``audit --verify``/``replay --verify``, not in this figure);
* the master's restart-to-ready time from its newest snapshot.

    python -m bench.replay [--events N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

from nats.aio.msg import Msg
from nats.js import api

from bus import Bus, ConnectSettings, Signer, connect, generate_seed, provision, sign_envelope
from bus.bulkread import read_all, read_bulk
from bus.codec import HEADER_MSG_ID, encode_envelope
from bus.embedded import running_server
from ledger.chain import Chain
from ledger.driver import RecordDriver
from ledger.snapshot import save_snapshot
from master.config import MasterConfig
from master.controller import Master
from schemas import (
    ArgvCommand,
    JobFinished,
    JobRequest,
    JobStarted,
    JobSubmitted,
    make_envelope,
    new_id,
)

_WINDOW = 2000


async def fill(bus: Bus, count: int) -> None:
    signer = Signer(generate_seed())
    request = JobRequest(command=ArgvCommand(argv=["true"]))
    pending: list[asyncio.Future[api.PubAck]] = []
    made = 0
    while made < count:
        job, agent = new_id(), f"a{made % 50}"
        for data in (
            JobSubmitted(job_id=job, agent=agent, request=request, submitted_by="bench"),
            JobStarted(job_id=job, agent=agent, pid=4242, effective_user="bench"),
            JobFinished(job_id=job, agent=agent, status="succeeded", exit_code=0, duration_s=0.01),
        ):
            if made == count:
                break
            name = data.TYPE.rsplit(".", 1)[1]
            env = make_envelope(
                data, source="bench", subject=bus.subjects.job_event(agent, job, name)
            )
            raw = encode_envelope(sign_envelope(env, signer))
            pending.append(
                await bus.js.publish_async(env.subject, raw, headers={HEADER_MSG_ID: env.id})
            )
            made += 1
            if len(pending) >= _WINDOW:
                await asyncio.gather(*pending)
                pending.clear()
    await asyncio.gather(*pending)


async def measure(url: str, work: Path, count: int) -> dict[str, object]:
    async with await connect(ConnectSettings(servers=[url], request_timeout_s=30)) as bus:
        await provision(bus.js)
        t0 = time.perf_counter()
        await fill(bus, count)
        fill_s = time.perf_counter() - t0

        # Baselines: raw nats-py, nothing decoded: a pull consumer, then an ordered push one.
        t0 = time.perf_counter()
        sub = await bus.js.pull_subscribe(
            bus.subjects.all_events,
            stream=bus.subjects.events_stream,
            config=api.ConsumerConfig(ack_policy=api.AckPolicy.NONE, mem_storage=True),
        )
        got = 0
        while got < count:
            got += len(await sub.fetch(batch=1000, timeout=5))
        await sub.unsubscribe()
        raw_s = time.perf_counter() - t0
        push_s = await _ordered_push(bus, count)

        # fleetbus: the read alone, then read and fold as one pass.
        t0 = time.perf_counter()
        read = await read_all(bus, bus.subjects.events_stream, bus.subjects.all_events)
        read_s = time.perf_counter() - t0
        assert len(read) == count
        del read
        t0 = time.perf_counter()
        chain = Chain()
        driver = RecordDriver(chain=chain)
        fold_s = 0.0
        async for batch in read_bulk(bus, bus.subjects.events_stream, bus.subjects.all_events):
            t1 = time.perf_counter()
            driver.feed_all(batch)
            fold_s += time.perf_counter() - t1
        replay_s = time.perf_counter() - t0
        projection = driver.projection
        assert projection.events == count

        # The master restarting from a snapshot of everything.
        await save_snapshot(bus, projection, chain)
        config = MasterConfig(data_dir=work / "master")
        runtime = Master(bus, config, Signer(generate_seed()))
        t0 = time.perf_counter()
        task = asyncio.create_task(runtime.run())
        await runtime.ready.wait()
        ready_s = time.perf_counter() - t0
        runtime.stop()
        await task
    return {
        "benchmark": "replay",
        "events": count,
        "fill_events_per_s": round(count / fill_s),
        "baseline_nats_py_read_events_per_s": round(count / raw_s),
        "baseline_nats_py_ordered_push_events_per_s": round(count / push_s),
        "fleetbus_read_events_per_s": round(count / read_s),
        "fleetbus_replay_events_per_s": round(count / replay_s),
        "fleetbus_fold_only_events_per_s": round(count / fold_s),
        "ratio_read_time": round(read_s / raw_s, 3),
        "ratio_read_time_to_ordered_push": round(read_s / push_s, 3),
        "ratio_replay_time": round(replay_s / raw_s, 2),
        "master_restart_to_ready_with_snapshot_s": round(ready_s, 3),
        "chain_events": chain.count,
    }


async def _ordered_push(bus: Bus, count: int) -> float:
    """Seconds for nats-py's own ordered push consumer to bring every message."""
    got = 0
    done = asyncio.Event()

    async def take(msg: Msg) -> None:
        nonlocal got
        got += 1
        if got >= count:
            done.set()

    t0 = time.perf_counter()
    sub = await bus.js.subscribe(
        bus.subjects.all_events,
        cb=take,
        ordered_consumer=True,
        pending_msgs_limit=-1,
        pending_bytes_limit=-1,
    )
    await asyncio.wait_for(done.wait(), timeout=600)
    elapsed = time.perf_counter() - t0
    await sub.unsubscribe()
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replay", description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    # Stored without an fsync per write: only reading is measured, and a synced fill of a
    # million events would take most of half an hour.
    with (
        tempfile.TemporaryDirectory() as tmp,
        running_server(Path(tmp) / "nats", sync_always=False) as server,
    ):
        result = asyncio.run(measure(server.url, Path(tmp), args.events))
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
