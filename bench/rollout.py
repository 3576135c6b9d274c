"""Rollout: 50 lightweight agents update to a new version with a 10 MiB bundle, 5 tokens.

fleetbus: 50 agent runtimes in this process (the code ``fleet-agentd`` runs), each with its
own install root, identity and journal; a small in-process stand-in for the launcher
restarts each into the installed version. Measured: from the announcement to the last
``update.applied`` (slots, download, signature and digest checks, install, switch,
restart, health), and the peak of concurrent download tokens the event log shows.
Baseline, same run, same server: raw nats-py ``ObjectStore.get`` of the same object 50
times, at most 5 at once. Prints one JSON document.

    python -m bench.rollout [--agents 50] [--mib 10] [--tokens 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from nats.js.api import ObjectMeta

from agentd.agent import Agent
from agentd.config import AgentConfig
from agentd.identity import ensure_identity
from agentd.startup import build_agent
from bus import Bus, ConnectSettings, Signer, connect, decode_event, generate_seed, provision
from bus.log import read_log
from bus.subjects import version_token
from schemas import Event, UpdateApplied, UpdateTokenAcquired, UpdateTokenReleased, new_id
from schemas.update import ReleaseTarget
from updater.bundle import build_bundle, sha256_hex
from updater.install import InstallRoot
from updater.settings import write_setting
from updater.wheel import build_wheel

FROM, TO = "1.0.0", "2.0.0"
SOURCE = Path(__file__).resolve().parents[1]


def padding_wheel(directory: Path, size: int) -> Path:
    """A wheel of ``size`` incompressible bytes in its data scheme (downloaded and
    verified like code, not unpacked into the agent's site directory)."""
    path = directory / "fleetbus_padding-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("fleetbus_padding-1.0.data/data/padding.bin", os.urandom(size))
        zf.writestr(
            "fleetbus_padding-1.0.dist-info/METADATA",
            "Metadata-Version: 2.1\nName: fleetbus-padding\nVersion: 1.0\n",
        )
    return path


async def baseline(bus: Bus, name: str, count: int, concurrency: int) -> float:
    store = await bus.object_store(bus.subjects.bundles_bucket)
    gate = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with gate:
            await store.get(name)

    begun = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(count)))
    return time.perf_counter() - begun


class LightAgent:
    """One agent runtime and the launcher's part: restart into ``current`` when asked."""

    def __init__(self, bus: Bus, work: Path, n: int, release_key: str) -> None:
        self.bus = bus
        self.root = work / f"a{n:02d}" / "install"
        self.config = AgentConfig(
            id=f"a{n:02d}",
            data_dir=work / f"a{n:02d}" / "data",
            heartbeat_s=5.0,
            shutdown_grace_s=1.0,
            log_level="WARNING",
            release_keys=[release_key],
        )
        self.signer = ensure_identity(self.config)
        self.ready = asyncio.Event()
        self.stopping = asyncio.Event()
        self.runtime: Agent | None = None

    async def run(self) -> None:
        installed = InstallRoot(self.root)
        while not self.stopping.is_set():
            restart = asyncio.Event()
            version = installed.version_of(installed.current_dir()) or FROM
            self.runtime = build_agent(
                self.bus,
                self.config,
                self.signer,
                on_restart=restart.set,
                install_root=self.root,
                version=version,
            )
            task = asyncio.create_task(self.runtime.run())
            ready = asyncio.create_task(self.runtime.ready.wait())
            await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
            if self.runtime.ready.is_set():
                installed.clear_pending()  # healthy: what the launcher does
                self.ready.set()
            stop = asyncio.create_task(self.stopping.wait())
            asked = asyncio.create_task(restart.wait())
            await asyncio.wait({stop, asked}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            asked.cancel()
            self.runtime.stop()
            await task

    def stop(self) -> None:
        self.stopping.set()


async def measure(url: str, work: Path, agents: int, mib: int, tokens: int) -> dict[str, Any]:
    release = Signer(generate_seed())
    wheels = [
        build_wheel(SOURCE, TO, work / "wheels"),
        padding_wheel(work / "wheels", mib * 1024 * 1024),
    ]
    data = build_bundle(TO, wheels, release, build="bench")
    name = f"fleetbus-{TO}.bundle"
    async with await connect(ConnectSettings(servers=[url], name="bench")) as bus:
        await provision(bus.js)
        store = await bus.object_store(bus.subjects.bundles_bucket)
        await store.put(name, data, meta=ObjectMeta(name=name))
        base_s = await baseline(bus, name, agents, tokens)

        fleet = [LightAgent(bus, work, n, release.public_key) for n in range(agents)]
        operator = Signer(generate_seed())
        for key, value in (("update.max_concurrent", tokens), ("update.retry_after_s", 0.2)):
            await write_setting(bus, key, value, signer=operator, source="bench")
        applied: set[str] = set()
        done = asyncio.Event()

        async def on_applied(msg: Any) -> None:
            event = decode_event(msg.data)
            if isinstance(event, Event) and isinstance(event.data, UpdateApplied):
                applied.add(event.data.agent)
                if len(applied) == agents:
                    done.set()

        sub = await bus.nc.subscribe(
            f"{bus.subjects.prefix}.evt.update.{version_token(TO)}.*.applied", cb=on_applied
        )
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(a.run()) for a in fleet]
            await asyncio.gather(*(a.ready.wait() for a in fleet))
            target = ReleaseTarget(
                version=TO,
                object_name=name,
                sha256=sha256_hex(data),
                size=len(data),
                announcement=new_id(),
                announced_by="bench",
            )
            kv = await bus.key_value(bus.subjects.config_bucket)
            begun = time.perf_counter()
            await kv.put("release.target", target.model_dump_json().encode())
            async with asyncio.timeout(600):
                await done.wait()
            rollout_s = time.perf_counter() - begun
            for agent in fleet:
                agent.stop()
            await asyncio.gather(*tasks)
        await sub.unsubscribe()
        peak, acquired = await token_peak(bus)
    return {
        "agents": agents,
        "bundle_bytes": len(data),
        "tokens": tokens,
        "baseline_nats_py_object_get_s": round(base_s, 3),
        "fleetbus_rollout_s": round(rollout_s, 3),
        "ratio": round(rollout_s / base_s, 2),
        "per_agent_s": round(rollout_s / agents, 3),
        "peak_concurrent_downloads": peak,
        "tokens_acquired": acquired,
    }


async def token_peak(bus: Bus) -> tuple[int, int]:
    """The most tokens held at once, and how many were taken, as the log tells it."""
    subject = f"{bus.subjects.prefix}.evt.update.>"
    holding: set[str] = set()
    peak = acquired = 0
    for record in await read_log(bus, bus.subjects.events_stream, subject):
        event = decode_event(record.data)
        if not isinstance(event, Event):
            continue
        if isinstance(event.data, UpdateTokenAcquired):
            holding.add(event.data.agent)
            acquired += 1
            peak = max(peak, len(holding))
        elif isinstance(event.data, UpdateTokenReleased):
            holding.discard(event.data.agent)
    return peak, acquired


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rollout", description=__doc__)
    parser.add_argument("--agents", type=int, default=50, help="agents to update")
    parser.add_argument("--mib", type=int, default=10, help="bundle size in MiB")
    parser.add_argument("--tokens", type=int, default=5, help="update.max_concurrent")
    args = parser.parse_args(argv)
    from bus.embedded import running_server

    with tempfile.TemporaryDirectory() as tmp, running_server(Path(tmp) / "nats") as server:
        result = asyncio.run(measure(server.url, Path(tmp), args.agents, args.mib, args.tokens))
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
