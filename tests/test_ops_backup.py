"""Backup and restore with two real servers: a deployment with a master and an agent
running jobs is exported, imported into a second, empty one, and the copy verifies and
replays the same; damaged files and non-empty targets are refused."""

from __future__ import annotations

import asyncio
import hashlib
import json
import stat
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from agents import FLEET, AgentProcess, MasterProcess, finished, fleet_env, job_request, submit
from natsserver import NatsServer

from bus import Bus, ConnectSettings, Signer, StorageSettings, connect, provision, public_key_of
from bus.backup import subject_matches
from bus.backup_file import verify
from bus.keys import read_seed_file

pytestmark = pytest.mark.timeout(240)


async def fleet(url: str, key: Path, *args: str) -> subprocess.CompletedProcess[str]:
    proc = await asyncio.create_subprocess_exec(
        FLEET, *args, env=fleet_env(url, key), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return subprocess.CompletedProcess(args, proc.returncode, out.decode(), err.decode())


async def wait_checkpoint(bus: Bus) -> None:
    sub = await bus.js.subscribe(bus.subjects.audit_event("checkpoint"), ordered_consumer=True)
    try:
        await sub.next_msg(timeout=30)
    finally:
        await sub.unsubscribe()


@pytest.fixture
async def fast_bus(nats_server: NatsServer) -> AsyncIterator[Bus]:
    async with await connect(ConnectSettings(servers=[nats_server.url])) as b:
        await provision(b.js, settings=StorageSettings(presence_ttl_s=2.0, marker_ttl_s=5.0))
        yield b


async def run_jobs(
    bus: Bus,
    signer: Signer,
    agent_factory: Callable[..., AgentProcess],
    master_factory: Callable[..., MasterProcess],
) -> MasterProcess:
    web1 = await agent_factory("web-1", modules={"hi": {"argv": ["echo", "hi"]}}).started(bus)
    master = master_factory(
        checkpoint_every=3,
        agents={"web-1": {"public_key": public_key_of(read_seed_file(web1.data_dir / "agent.nk"))}},
        operators={"tester": {"public_key": signer.public_key}},
    ).start()
    await master.wait_ready(bus)
    for _ in range(4):
        job = await submit(bus, signer, "web-1", job_request(["echo", "hi"]))
        await finished(bus, "web-1", job)
    await wait_checkpoint(bus)
    return master


async def test_export_import_into_an_empty_deployment_verifies_and_replays_the_same(
    tmp_path: Path,
    nats_server: NatsServer,
    fast_bus: Bus,
    agent_factory: Callable[..., AgentProcess],
    master_factory: Callable[..., MasterProcess],
    operator: tuple[Path, Signer],
    server_factory: Callable[..., NatsServer],
) -> None:
    key, signer = operator
    master = await run_jobs(fast_bus, signer, agent_factory, master_factory)
    trust = str(master.config_path)
    master.stop()  # a consistent point: nothing writes while the backup is taken
    url = nats_server.url
    original = await fleet(url, key, "replay", "--json")
    assert original.returncode == 0, original.stderr

    bundle = bytes(range(256)) * 2000  # several chunks
    store = await fast_bus.object_store("fleet-bundles")
    await store.put("fleetbus-9.9.9.bundle", bundle)
    backup = tmp_path / "fleet.export"
    exported = await fleet(
        url, key, "ops", "export", str(backup), "--outputs", "--bundles", "--json"
    )
    assert exported.returncode == 0, exported.stderr
    summary = json.loads(exported.stdout)
    events = (await fast_bus.js.stream_info("FLEET_EVENTS")).state
    assert summary["counts"]["FLEET_EVENTS"] == events.messages
    assert summary["counts"]["FLEET_OUTPUT"] > 0
    _, counts, digest = verify(backup)  # independent of any server
    assert counts == summary["counts"]
    assert digest == summary["sha256"]
    assert (await fleet(url, key, "ops", "export", str(backup))).returncode == 2  # no overwrite

    copy = server_factory(name="copy")
    assert (await fleet(copy.url, key, "ops", "init")).returncode == 0
    restored = await fleet(copy.url, key, "ops", "import", str(backup), "--json")
    assert restored.returncode == 0, restored.stderr
    report = json.loads(restored.stdout)
    assert report["restored"]["FLEET_EVENTS"] == events.messages
    assert all(report["sequences_kept"].values())

    verified = await fleet(copy.url, key, "audit", "--verify", "--trust", trust)
    assert verified.returncode == 0, verified.stderr
    assert "hash chain intact" in verified.stderr
    replayed = await fleet(copy.url, key, "replay", "--json")
    assert json.loads(replayed.stdout) == json.loads(original.stdout)
    async with await connect(ConnectSettings(servers=[copy.url])) as other:
        restored_bundle = await (await other.object_store("fleet-bundles")).get(
            "fleetbus-9.9.9.bundle"
        )
        output = (await other.js.stream_info("FLEET_OUTPUT")).state.messages
    assert restored_bundle.data == bundle
    assert output == summary["counts"]["FLEET_OUTPUT"]

    # Into a deployment that is no longer empty: refused, nothing added.
    again = await fleet(copy.url, key, "ops", "import", str(backup))
    assert again.returncode == 2
    assert "not empty" in again.stderr
    async with await connect(ConnectSettings(servers=[copy.url])) as other:
        assert (await other.js.stream_info("FLEET_EVENTS")).state.messages == events.messages
    # Forced, it adds only what is missing: here nothing.
    forced = await fleet(copy.url, key, "ops", "import", str(backup), "--force", "--json")
    assert forced.returncode == 0, forced.stderr
    assert json.loads(forced.stdout)["restored"]["FLEET_EVENTS"] == 0


async def test_incremental_export_continues_a_restored_log(
    tmp_path: Path,
    nats_server: NatsServer,
    bus: Bus,
    operator: tuple[Path, Signer],
    server_factory: Callable[..., NatsServer],
) -> None:
    key, signer = operator
    url = nats_server.url
    for _ in range(3):
        await submit(bus, signer, "web-1", job_request(["true"]))
    full = tmp_path / "full.export"
    assert (await fleet(url, key, "ops", "export", str(full))).returncode == 0
    for _ in range(2):
        await submit(bus, signer, "web-1", job_request(["true"]))
    since = tmp_path / "since.export"
    assert (await fleet(url, key, "ops", "export", str(since), "--since", "4")).returncode == 0
    assert verify(since)[1]["FLEET_EVENTS"] == 2
    assert verify(since)[0].first_seqs["FLEET_EVENTS"] == 4

    copy = server_factory(name="copy")
    assert (await fleet(copy.url, key, "ops", "init")).returncode == 0
    assert (await fleet(copy.url, key, "ops", "import", str(full))).returncode == 0
    more = await fleet(copy.url, key, "ops", "import", str(since), "--force", "--json")
    assert more.returncode == 0, more.stderr
    assert json.loads(more.stdout)["sequences_kept"]["FLEET_EVENTS"] is True
    original = await fleet(url, key, "replay", "--json")
    assert json.loads((await fleet(copy.url, key, "replay", "--json")).stdout) == json.loads(
        original.stdout
    )

    # An incremental export alone restores into an empty log at its own sequences.
    alone = server_factory(name="alone")
    assert (await fleet(alone.url, key, "ops", "init")).returncode == 0
    assert (await fleet(alone.url, key, "ops", "import", str(since))).returncode == 0
    async with await connect(ConnectSettings(servers=[alone.url])) as other:
        state = (await other.js.stream_info("FLEET_EVENTS")).state
    assert (state.first_seq, state.last_seq) == (4, 5)


async def test_damaged_files_are_refused_before_anything_is_restored(
    tmp_path: Path,
    nats_server: NatsServer,
    bus: Bus,
    operator: tuple[Path, Signer],
    server_factory: Callable[..., NatsServer],
) -> None:
    key, signer = operator
    for _ in range(3):
        await submit(bus, signer, "web-1", job_request(["true"]))
    good = tmp_path / "good.export"
    assert (await fleet(nats_server.url, key, "ops", "export", str(good))).returncode == 0
    lines = good.read_bytes().splitlines(keepends=True)
    damaged = {
        "truncated": b"".join(lines[:-1]),
        "edited": b"".join(lines).replace(b'"seq":2', b'"seq":9'),
        "dropped": b"".join(lines[:2] + lines[3:]),
        "not json": b"".join(lines[:2]) + b"garbage\n" + b"".join(lines[2:]),
    }
    copy = server_factory(name="copy")
    assert (await fleet(copy.url, key, "ops", "init")).returncode == 0
    for name, data in damaged.items():
        path = tmp_path / f"{name}.export"
        path.write_bytes(data)
        check = await fleet(copy.url, key, "ops", "import", str(path), "--check")
        assert check.returncode == 2, name
        assert "not a valid fleetbus export" in check.stderr, name
        result = await fleet(copy.url, key, "ops", "import", str(path))
        assert result.returncode == 2, name
    async with await connect(ConnectSettings(servers=[copy.url])) as other:
        assert (await other.js.stream_info("FLEET_EVENTS")).state.messages == 0
    assert (await fleet(copy.url, key, "ops", "import", str(good), "--check")).returncode == 0


def rewrite(path: Path, edit: Callable[[list[dict[str, object]]], None]) -> None:
    """Edit an export's lines and give it a valid trailer again (as an attacker can)."""
    lines = [json.loads(line) for line in path.read_text().splitlines()[:-1]]
    edit(lines)
    raw = b"".join(
        json.dumps(v, separators=(",", ":"), sort_keys=True).encode() + b"\n" for v in lines
    )
    counts: dict[str, int] = {}
    for v in lines[1:]:
        counts[str(v["stream"])] = counts.get(str(v["stream"]), 0) + 1
    for stream in lines[0]["streams"]:  # type: ignore[union-attr]
        counts.setdefault(stream, 0)
    trailer = {"end": True, "counts": counts, "sha256": hashlib.sha256(raw).hexdigest()}
    path.write_bytes(raw + json.dumps(trailer).encode() + b"\n")


async def test_an_export_is_readable_by_its_owner_only(
    tmp_path: Path, nats_server: NatsServer, bus: Bus, operator: tuple[Path, Signer]
) -> None:
    key, signer = operator
    await submit(bus, signer, "web-1", job_request(["echo", "secret-ish argv"]))
    path = tmp_path / "fleet.export"
    assert (await fleet(nats_server.url, key, "ops", "export", str(path))).returncode == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_a_crafted_export_cannot_write_to_other_streams(
    tmp_path: Path,
    nats_server: NatsServer,
    bus: Bus,
    operator: tuple[Path, Signer],
    server_factory: Callable[..., NatsServer],
) -> None:
    """A file that names a stream outside what an export holds (another fleet's log, the
    presence bucket) or puts a subject of one stream into another is refused whole."""
    key, signer = operator
    await submit(bus, signer, "web-1", job_request(["true"]))
    good = tmp_path / "good.export"
    assert (await fleet(nats_server.url, key, "ops", "export", str(good))).returncode == 0
    copy = server_factory(name="copy")
    assert (await fleet(copy.url, key, "ops", "init")).returncode == 0

    def other_stream(lines: list[dict[str, object]]) -> None:
        lines[0]["streams"] = {"KV_fleet-presence": {"first_seq": 1}}  # type: ignore[index]
        for v in lines[1:]:
            v["stream"] = "KV_fleet-presence"
            v["subject"] = "$KV.fleet-presence.web-1"

    def wrong_subject(lines: list[dict[str, object]]) -> None:
        lines[1]["subject"] = "fleet.out.web-1.x.1"

    for name, edit in (("other stream", other_stream), ("wrong subject", wrong_subject)):
        path = tmp_path / f"{name}.export"
        path.write_bytes(good.read_bytes())
        rewrite(path, edit)
        result = await fleet(copy.url, key, "ops", "import", str(path))
        assert result.returncode == 2, (name, result.stderr)
        async with await connect(ConnectSettings(servers=[copy.url])) as other:
            for stream in ("FLEET_EVENTS", "KV_fleet-presence", "FLEET_OUTPUT"):
                assert (await other.js.stream_info(stream)).state.messages == 0, name


def test_subject_matching_follows_nats_wildcards() -> None:
    assert subject_matches("fleet.evt.job.a.b.submitted", "fleet.evt.>")
    assert subject_matches("$O.b.C.x", "$O.b.C.>")
    assert subject_matches("a.b", "a.*")
    assert not subject_matches("a.b.c", "a.*")
    assert not subject_matches("fleet.evt", "fleet.evt.>")
    assert not subject_matches("fleet.out.a", "fleet.evt.>")
