"""The master end to end: projections vs replay, crash and restart, registry, audit."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from agents import (
    FLEET,
    MASTER,
    AgentProcess,
    MasterProcess,
    finished,
    fleet_env,
    job_events,
    job_request,
    submit,
    wait_event,
)
from natsserver import NatsServer

from bus import (
    Bus,
    ConnectSettings,
    Signer,
    StorageSettings,
    connect,
    generate_seed,
    provision,
    public_key_of,
    read_seed_file,
    sign_envelope,
)
from bus.log import read_log
from bus.request import control
from ledger.projection import Projection
from schemas import JobFinished, JobRequest, ModuleCommand, make_envelope, new_id

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]


@pytest.fixture
async def fast_bus(nats_server: NatsServer) -> AsyncIterator[Bus]:
    """A bus whose presence entries expire after 2 s, so crashes are noticed quickly."""
    async with await connect(ConnectSettings(servers=[nats_server.url])) as b:
        await provision(b.js, settings=StorageSettings(presence_ttl_s=2.0, marker_ttl_s=5.0))
        yield b


async def fleet(url: str, key: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    proc = await asyncio.create_subprocess_exec(
        FLEET, *args, env=fleet_env(url, key), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def agent_key(agent: AgentProcess) -> str:
    return public_key_of(read_seed_file(agent.data_dir / "agent.nk"))


async def state(bus: Bus) -> Projection:
    reply = await control(bus, bus.subjects.master_control("state"))
    return Projection.from_state(reply.data["state"])


async def test_master_equals_replay_and_survives_sigkill(
    nats_server: NatsServer,
    fast_bus: Bus,
    agent_factory: Callable[..., AgentProcess],
    master_factory: Callable[..., MasterProcess],
    operator: tuple[Path, Signer],
) -> None:
    bus, (key, signer) = fast_bus, operator
    web1 = await agent_factory("web-1", modules={"hi": {"argv": ["echo", "hi"]}}).started(bus)
    web2 = await agent_factory("web-2").started(bus)
    master = master_factory(
        snapshot_every=7,
        checkpoint_every=5,
        offline_grace_s=1.0,
        agents={"web-1": {"public_key": agent_key(web1), "labels": {"role": "web"}}},
        operators={"tester": {"public_key": signer.public_key}},
    ).start()
    await master.wait_ready(bus)

    # Jobs of every outcome.
    outcomes = {
        "succeeded": job_request(["true"]),
        "failed": job_request(["false"]),
        "timed_out": job_request(["sleep", "30"], timeout_s=0.5),
        "expired": job_request(["true"], expires_at=time.time_ns() - 1),
        "rejected": JobRequest(command=ModuleCommand(module="nope")),
    }
    jobs = {
        status: await submit(bus, signer, "web-1", request) for status, request in outcomes.items()
    }
    cancel_me = await submit(bus, signer, "web-1", job_request(["sleep", "30"]))
    await wait_event(bus, "web-1", cancel_me, "started")
    assert (await fleet(nats_server.url, key, "job", "cancel", cancel_me)).returncode == 0
    jobs["cancelled"] = cancel_me
    for status, job in jobs.items():
        assert (await finished(bus, "web-1", job)).status == status

    # An agent that crashes mid-job: the master notices and records the job abandoned.
    orphan = await submit(bus, signer, "web-2", job_request(["sleep", "60"]))
    await wait_event(bus, "web-2", orphan, "started")
    web2.kill()
    abandoned = await finished(bus, "web-2", orphan, timeout=60)
    assert abandoned.status == "abandoned"
    assert "offline for more than 1s" in (abandoned.reason or "")
    await web2.started(bus)  # it returns, sees the master's record, adds none
    await wait_event(
        bus, "web-2", (await submit(bus, signer, "web-2", job_request(["true"]))), "finished"
    )
    ends = [e for e in await job_events(bus, orphan) if e.type == "job.finished"]
    assert [e.source for e in ends] == ["master"]

    web1.stop()  # an agent leaving cleanly
    replayed = await fleet(nats_server.url, key, "replay", "--verify", "--json")
    assert replayed.returncode == 0, replayed.stderr.decode()
    doc = json.loads(replayed.stdout)
    by_id = {j["job_id"]: j["status"] for j in doc["jobs"]}
    assert {by_id[j] for j in jobs.values()} == set(outcomes) | {"cancelled"}
    agents = {a["id"]: a for a in doc["agents"]}
    assert agents["web-1"]["configured"] is True
    assert agents["web-1"]["online"] is False
    assert agents["web-2"]["configured"] is False
    assert agents["web-2"]["online"] is True
    assert b"equals the running master and its newest snapshot" in replayed.stderr
    # fleet jobs asks the master when it answers; it must agree with the log.
    listed = json.loads((await fleet(nats_server.url, key, "jobs", "--json", "-n", "0")).stdout)
    assert {j["job_id"]: j["status"] for j in listed["jobs"]} == by_id

    before = await state(bus)
    master.kill()  # SIGKILL: no final snapshot
    master.start()
    await master.wait_ready(bus)
    after = await state(bus)
    # The master may have checkpointed meanwhile; jobs and agents must be exactly as before.
    assert after.seq >= before.seq
    assert after.to_state()["jobs"] == before.to_state()["jobs"]
    assert after.to_state()["agents"] == before.to_state()["agents"]
    assert "loaded the snapshot at seq" in master.log()
    assert (await fleet(nats_server.url, key, "replay", "--verify")).returncode == 0


async def test_snapshots_that_disagree_or_do_not_decode(
    nats_server: NatsServer,
    fast_bus: Bus,
    agent_factory: Callable[..., AgentProcess],
    master_factory: Callable[..., MasterProcess],
    operator: tuple[Path, Signer],
) -> None:
    from ledger.snapshot import SNAPSHOT_OBJECT, encode_snapshot

    bus = fast_bus
    await agent_factory("web-1").started(bus)
    job = await submit(bus, operator[1], "web-1", job_request(["true"]))
    await finished(bus, "web-1", job)
    store = await bus.object_store(bus.subjects.snapshots_bucket)

    # A snapshot that says something the log does not: replay --verify shows where.
    replayed = json.loads((await fleet(nats_server.url, operator[0], "replay", "--json")).stdout)
    records = await read_log(bus, bus.subjects.events_stream, bus.subjects.all_events)
    from ledger.driver import fold_records

    lying, chain = fold_records(records)
    lying.jobs[job].status = "failed"
    await store.put(SNAPSHOT_OBJECT, encode_snapshot(lying, chain))
    result = await fleet(nats_server.url, operator[0], "replay", "--verify")
    assert result.returncode == 5
    assert f"state.jobs.{job}.status: 'succeeded' ≠ 'failed'".encode() in result.stderr
    assert replayed["seq"] == lying.seq

    # A snapshot that does not decode is ignored: the master replays everything.
    await store.put(SNAPSHOT_OBJECT, b"\xc1 not a snapshot")
    master = master_factory().start()
    await master.wait_ready(bus)
    assert "ignoring the snapshot" in master.log()
    assert (await state(bus)).jobs[job].status == "succeeded"


async def test_audit_verify_catches_forged_removed_and_truncated_events(
    nats_server: NatsServer,
    fast_bus: Bus,
    agent_factory: Callable[..., AgentProcess],
    master_factory: Callable[..., MasterProcess],
    operator: tuple[Path, Signer],
    server_factory: Callable[..., NatsServer],
) -> None:
    bus, (key, signer) = fast_bus, operator
    web1 = await agent_factory("web-1").started(bus)
    master = master_factory(
        checkpoint_every=3,
        agents={"web-1": {"public_key": agent_key(web1)}},
        operators={"tester": {"public_key": signer.public_key}},
    ).start()
    await master.wait_ready(bus)
    for _ in range(4):
        await finished(bus, "web-1", await submit(bus, signer, "web-1", job_request(["true"])))
    await wait_checkpoint(bus)
    trust = str(master.config_path)

    clean = await fleet(nats_server.url, key, "audit", "--verify", "--trust", trust)
    assert clean.returncode == 0, clean.stderr.decode()
    assert b"signatures trusted, hash chain intact" in clean.stderr
    listed = await fleet(nats_server.url, key, "audit", "--json", "--type", "job.finished")
    lines = [json.loads(line) for line in listed.stdout.splitlines()]
    assert len(lines) == 4
    assert {line["source"] for line in lines} == {"web-1"}

    # A copy of the log with one event removed: the checkpoint chain breaks.
    records = await read_log(bus, bus.subjects.events_stream, bus.subjects.all_events)
    copy = server_factory(name="copy")
    async with await connect(ConnectSettings(servers=[copy.url])) as other:
        await provision(other.js)
        for record in records[:2] + records[3:]:
            await other.js.publish(record.subject, record.data)
    broken = await fleet(copy.url, key, "audit", "--verify", "--trust", trust)
    assert broken.returncode == 5
    # Where the removed event sits relative to the checkpoints decides which check sees
    # it first (a count or a hash that differs); either way the chain is reported broken.
    assert b"checkpoint" in broken.stderr
    assert b" chain" in broken.stderr.splitlines()[-1]

    # A log cut short after its last checkpoint: the master's own record says so.
    kv_entry = await (await bus.key_value(bus.subjects.config_bucket)).get("audit.checkpoint")
    short = server_factory(name="short")
    async with await connect(ConnectSettings(servers=[short.url])) as other:
        await provision(other.js)
        for record in records[:3]:
            await other.js.publish(record.subject, record.data)
        await (await other.key_value(other.subjects.config_bucket)).put(
            "audit.checkpoint", kv_entry.value
        )
    cut = await fleet(short.url, key, "audit", "--verify", "--trust", trust)
    assert cut.returncode == 5
    assert b"cut short" in cut.stderr

    # A forged event straight into the stream: signed by a stranger, claiming to be web-1.
    mallory = Signer(generate_seed())
    job = new_id()
    forged = make_envelope(
        JobFinished(job_id=job, agent="web-1", status="succeeded"),
        source="web-1",
        subject=bus.subjects.job_event("web-1", job, "finished"),
    )
    await bus.publish_event(sign_envelope(forged, mallory))
    await bus.publish_event(forged.model_copy(update={"id": new_id()}))  # unsigned
    caught = await fleet(nats_server.url, key, "audit", "--verify", "--trust", trust)
    assert caught.returncode == 5
    assert b"not trusted" in caught.stderr
    assert b"is not signed" in caught.stderr
    bad = await fleet(
        nats_server.url, key, "audit", "--json", "--verify", "--trust", trust, "--job", job
    )
    assert [json.loads(x)["verified"] for x in bad.stdout.splitlines()] == [False, False]


async def wait_checkpoint(bus: Bus) -> None:
    sub = await bus.js.subscribe(bus.subjects.audit_event("checkpoint"), ordered_consumer=True)
    try:
        await sub.next_msg(timeout=30)
    finally:
        await sub.unsubscribe()


async def test_status_hash_and_reload(
    tmp_path: Path,
    fast_bus: Bus,
    agent_factory: Callable[..., AgentProcess],
    master_factory: Callable[..., MasterProcess],
) -> None:
    web1 = await agent_factory("web-1").started(fast_bus)
    await agent_factory("web-2").started(fast_bus)
    master = master_factory(
        hash_file=str(tmp_path / "master.hash"), agents={"db-1": {"public_key": agent_key(web1)}}
    )
    cfg = str(master.config_path)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [MASTER, *args, "-c", cfg], capture_output=True, text=True, timeout=60
        )

    first = cli("hash").stdout.strip()
    assert len(first) == 64
    assert cli("hash").stdout.strip() == first
    assert cli("stop").returncode == 3  # not running
    assert cli("start").returncode == 0
    try:
        await asyncio.wait_for(master.wait_ready(fast_bus), 30)
        assert (tmp_path / "master.hash").read_text().strip() == first
        status = json.loads(cli("status", "--json").stdout)
        assert status["master"]["running"] is True
        rows = {a["id"]: (a["configured"], a["connected"]) for a in status["agents"]}
        assert rows == {"db-1": (True, False), "web-1": (False, True), "web-2": (False, True)}

        master.settings["agents"] = {"web-1": {"public_key": agent_key(web1)}}
        master.write_config()
        second = cli("hash").stdout.strip()
        assert second != first
        assert cli("reload").returncode == 0
        registered = await wait_event_on(
            fast_bus, fast_bus.subjects.agent_event("web-1", "registered")
        )
        assert registered
        assert (tmp_path / "master.hash").read_text().strip() == second
        assert "web-1" in cli("status").stdout
    finally:
        assert cli("stop").returncode == 0
    stopped = cli("status", "--json")
    assert stopped.returncode == 3  # not running
    assert json.loads(stopped.stdout)["master"]["running"] is False


async def wait_event_on(bus: Bus, subject: str) -> bool:
    sub = await bus.js.subscribe(subject, ordered_consumer=True)
    try:
        await sub.next_msg(timeout=30)
    finally:
        await sub.unsubscribe()
    return True


def test_the_example_master_config_is_valid() -> None:
    from master.config import load_master_config

    config = load_master_config(Path(__file__).resolve().parent.parent / "ops" / "master.toml")
    assert config.offline_grace_s == 60.0
