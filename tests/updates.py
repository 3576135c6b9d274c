"""Release bundles and launcher-run agents for the self-update tests."""

from __future__ import annotations

import asyncio
import io
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agents import FLEET, AgentProcess, first_event
from nats.js.api import ObjectMeta

from bus import Bus, Signer, decode_event, generate_seed, write_seed_file
from bus.log import read_log
from schemas import Event
from updater.bundle import build_bundle, open_bundle
from updater.install import InstallRoot
from updater.wheel import build_wheel

SOURCE = Path(__file__).resolve().parents[1]
PACKAGES = ("bus", "schemas", "agentd", "master", "updater", "headless", "fleet")


@dataclass
class Release:
    """A release key and bundles built with it, by version."""

    dir: Path
    signer: Signer
    key_file: Path
    bundles: dict[str, Path]

    @property
    def public_key(self) -> str:
        return self.signer.public_key

    def bundle(self, version: str, source: Path = SOURCE, *, signed: bool = True) -> Path:
        wheel = build_wheel(source, version, self.dir / f"wheels-{version}")
        data = build_bundle(version, [wheel], self.signer if signed else None, build="test")
        path = self.dir / f"fleetbus-{version}.bundle"
        path.write_bytes(data)
        self.bundles[version] = path
        return path

    def broken_source(self, name: str, main: str) -> Path:
        """A copy of the source tree whose ``python -m agentd`` runs ``main`` instead."""
        tree = self.dir / name
        if not tree.exists():
            tree.mkdir()
            shutil.copy(SOURCE / "pyproject.toml", tree)
            for package in PACKAGES:
                shutil.copytree(
                    SOURCE / package, tree / package, ignore=shutil.ignore_patterns("__pycache__")
                )
            (tree / "agentd" / "__main__.py").write_text(main)
        return tree


def make_release(base: Path) -> Release:
    base.mkdir(parents=True, exist_ok=True)
    key = base / "release.nk"
    write_seed_file(key, generate_seed())
    return Release(base, Signer.from_file(key), key, {})


def tamper(bundle: Path, out: Path) -> Path:
    """The bundle with one byte of its wheel changed; manifest and signature kept."""
    buf = io.BytesIO()
    with tarfile.open(bundle) as src, tarfile.open(fileobj=buf, mode="w") as dst:
        for info in src.getmembers():
            data = src.extractfile(info).read()  # type: ignore[union-attr]
            if info.name.endswith(".whl"):
                data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
            dst.addfile(info, io.BytesIO(data))
    out.write_bytes(buf.getvalue())
    return out


class LaunchedAgent(AgentProcess):
    """``fleet-agentd-launcher`` running an agent installed from a bundle in its own root."""

    def __init__(
        self, base: Path, url: str, agent_id: str, health_timeout: float = 30.0, **config: Any
    ) -> None:
        super().__init__(base, url, agent_id, **config)
        self.root = self.dir / "install"
        self.health_timeout = health_timeout

    def install(self, bundle: Path, release_key: str) -> LaunchedAgent:
        root = InstallRoot(self.root)
        root.switch(root.install(open_bundle(bundle.read_bytes(), {release_key})))
        return self

    def start(self) -> LaunchedAgent:
        self.started_ns = time.time_ns()
        self._spawn(
            [
                sys.executable,
                "-m",
                "updater.launcher",
                "--root",
                str(self.root),
                "--health-timeout",
                str(self.health_timeout),
                "--",
                "-c",
                str(self.config_path),
            ]
        )
        return self


async def update_events(bus: Bus) -> list[Event[Any]]:
    """Every update event, in log order."""
    subject = f"{bus.subjects.prefix}.evt.update.>"
    out = []
    for record in await read_log(bus, bus.subjects.events_stream, subject):
        event = decode_event(record.data)
        assert isinstance(event, Event)
        out.append(event)
    return out


async def wait_update_event(
    bus: Bus, version: str, agent: str | None, name: str, timeout: float = 60.0
) -> Event[Any]:
    """The first ``update.<name>`` of ``agent`` (None: of the rollout) for ``version``."""
    if agent is None:
        return await first_event(bus, bus.subjects.update_event(version, name), timeout)
    return await first_event(bus, bus.subjects.update_event(version, name, agent=agent), timeout)


async def put_raw_bundle(bus: Bus, version: str, bundle: Path) -> None:
    """Store a bundle bypassing ``fleet update publish``'s checks (what an attacker with
    write access to the object store could do)."""
    store = await bus.object_store(bus.subjects.bundles_bucket)
    name = f"fleetbus-{version}.bundle"
    data = await asyncio.to_thread(bundle.read_bytes)
    await store.put(name, data, meta=ObjectMeta(name=name))


def fleet(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the ``fleet`` CLI."""
    result = subprocess.run(
        [FLEET, *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"fleet {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
    return result
