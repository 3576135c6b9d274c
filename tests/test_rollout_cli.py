"""Issue 15 item 5, rollouts through the real ``fleet`` CLI against real agents: unsupported
agents skipped (and said so) in multi-target runs, their state in ``fleet agents``, a live
``update status --watch``, downgrades only when asked, ``--purge`` globs, ``update fetch``."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from agents import FLEET, AgentProcess, fleet_env, wait_presence
from natsserver import NatsServer
from test_operator_day import fleet
from updates import SOURCE

from bus import Bus, Signer

Agents = Callable[..., AgentProcess]
Operator = tuple[Path, Signer]

pytestmark = pytest.mark.timeout(240)


async def build(url: str, key: Path, tmp: Path, version: str, *more: str) -> Path:
    """A signed bundle of this source tree as ``version``, built by ``fleet update build``."""
    release = tmp / "release.nk"
    if not release.exists():
        made = await fleet(url, key, "keys", "gen", "release", "rel", "-o", str(release))
        assert made.returncode == 0, made.stderr
    out = tmp / f"built-{version}.bundle"
    done = await fleet(
        url, key, "update", "build", "--version", version, "--key", str(release),
        "--source", str(SOURCE), "-o", str(out), *more,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return out


def manifest(bundle: Path) -> dict[str, object]:
    with tarfile.open(bundle) as tar:
        member = tar.extractfile("manifest.json")
        assert member is not None
        doc: dict[str, object] = json.load(member)
        return doc


async def watcher(url: str, key: Path, *more: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        FLEET, "update", "status", "--watch", *more,
        env=fleet_env(url, key), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


async def test_build_purge_globs_and_fetch(
    nats_server: NatsServer, bus: Bus, operator: Operator, tmp_path: Path
) -> None:
    url, key = nats_server.url, operator[0]
    bundle = await build(url, key, tmp_path, "9.0.0", "--purge", "old-*.dat", "--purge", "c/[ab]?")
    assert manifest(bundle)["purge"] == ["c/[ab]?", "old-*.dat"]
    release = str(tmp_path / "release.nk")
    for bad in ("../etc/*", "/etc/passwd", "a/./b", "a b"):
        refused = await fleet(
            url, key, "update", "build", "--version", "9.0.1", "--key", release,
            "--source", str(SOURCE), "-o", str(tmp_path / "x.bundle"), "--purge", bad,
        )  # fmt: skip
        assert refused.returncode == 2, (bad, refused.stderr)
        assert f"--purge {bad!r}: a glob relative to the agent's data_dir" in refused.stderr
        assert "Traceback" not in refused.stderr
        assert not (tmp_path / "x.bundle").exists()

    missing = await fleet(url, key, "update", "fetch", "9.0.0", "-o", str(tmp_path / "f.bundle"))
    assert missing.returncode == 2
    assert "9.0.0 is not published" in missing.stderr
    published = await fleet(url, key, "update", "publish", str(bundle))
    assert published.returncode == 0, published.stderr
    out = tmp_path / "fetched.bundle"
    fetched = await fleet(url, key, "update", "fetch", "9.0.0", "-o", str(out), "--json")
    assert fetched.returncode == 0, fetched.stderr
    assert out.read_bytes() == bundle.read_bytes()
    assert json.loads(fetched.stdout)["version"] == "9.0.0"
    again = await fleet(url, key, "update", "fetch", "9.0.0", "-o", str(out))
    assert again.returncode == 2
    assert "exists already; --force replaces it" in again.stderr
    forced = await fleet(url, key, "update", "fetch", "9.0.0", "-o", str(out), "--force")
    assert forced.returncode == 0, forced.stderr


async def test_a_rollout_through_the_operators_eyes(
    nats_server: NatsServer, bus: Bus, agent_factory: Agents, operator: Operator, tmp_path: Path
) -> None:
    url, key = nats_server.url, operator[0]
    for version in ("8.0.0", "9.0.0"):
        bundle = await build(url, key, tmp_path, version)
        published = await fleet(url, key, "update", "publish", str(bundle))
        assert published.returncode == 0, published.stderr
    announced = await fleet(url, key, "update", "announce", "9.0.0")
    assert announced.returncode == 0, announced.stderr

    # --watch with nobody online yet: it waits; Ctrl-C ends it quietly.
    first = await watcher(url, key, "--json")
    assert first.stdout is not None
    line = json.loads(await asyncio.wait_for(first.stdout.readline(), 30))
    assert line["progress"]["online"] == 0
    first.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(first.communicate(), 30)
    assert first.returncode == 130
    assert b"Traceback" not in err

    # Live: it redraws as agents arrive, and ends (0) once each is on the target or
    # cannot take it.
    live = await watcher(url, key, "--json", "--wait", "120")
    assert live.stdout is not None
    assert json.loads(await asyncio.wait_for(live.stdout.readline(), 30))["progress"]["online"] == 0
    fresh = agent_factory("fresh", version="9.0.0")
    stale = agent_factory("stale", version="1.0.0")
    await fresh.started(bus)
    await stale.started(bus)
    out, err = await asyncio.wait_for(live.communicate(), 120)
    assert live.returncode == 0, err
    last = json.loads(out.splitlines()[-1])["progress"]
    assert last["online"] >= 1
    assert last["on_target"] + len(last["unsupported"]) == last["online"]
    await wait_presence(bus, "stale", lambda p: p.state == "unsupported")
    status = json.loads((await fleet(url, key, "update", "status", "--json")).stdout)
    assert status["progress"]["on_target"] == 1
    assert status["progress"]["unsupported"] == ["stale"]

    # `fleet agents` says which agent is unsupported, and why.
    agents = await fleet(url, key, "agents")
    row = next(r for r in agents.stdout.splitlines() if r.startswith("stale "))
    assert "unsupported" in row
    assert "↳ runs 1.0.0, target is 9.0.0" in agents.stdout
    doc = {
        a["id"]: a for a in json.loads((await fleet(url, key, "agents", "--json")).stdout)["agents"]
    }
    assert (doc["stale"]["state"], doc["fresh"]["state"]) == ("unsupported", "ready")

    # A run on both: the healthy agent gets the job, the other is skipped, exit 6.
    both = await fleet(url, key, "run", "-g", "*", "--", "echo", "hi")
    assert both.returncode == 6, both.stderr
    assert "skipping stale, unsupported" in both.stderr
    assert "fresh: hi" in both.stdout
    as_json = await fleet(url, key, "run", "-g", "*", "--json", "--", "true")
    assert as_json.returncode == 6
    doc = json.loads(as_json.stdout)
    assert [(j["agent"], j["status"]) for j in doc["jobs"]] == [("fresh", "succeeded")]
    assert [s["agent"] for s in doc["skipped"]] == ["stale"]
    queued = await fleet(url, key, "run", "-g", "*", "--async", "--", "true")
    assert queued.returncode == 6
    alone = await fleet(url, key, "run", "-a", "stale", "--", "true")
    assert alone.returncode == 2
    assert "refusing unsupported agents" in alone.stderr
    forced = await fleet(url, key, "run", "-g", "*", "--force", "--", "true")
    assert forced.returncode == 0, forced.stderr

    # Going back needs the flag.
    down = await fleet(url, key, "update", "announce", "8.0.0")
    assert down.returncode == 2
    assert "8.0.0 would be a downgrade: the current target is 9.0.0" in down.stderr
    assert "fresh (9.0.0)" in down.stderr
    allowed = await fleet(url, key, "update", "announce", "8.0.0", "--allow-downgrade")
    assert allowed.returncode == 0, allowed.stderr
