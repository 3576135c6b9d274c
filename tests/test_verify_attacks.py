"""Attacks on the log's truth, against real nats-server, agent and master processes.

Who may say what (a forged outcome), two outcomes for one job, events that would grow
the master's memory, a tail cut from the store on disk, and a headless user's own
signature: each is refused by the master's fold and reported by ``fleet audit --verify``
and ``fleet replay --verify`` (exit 5).
"""

from __future__ import annotations

import asyncio
import json
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from agents import (
    FLEET,
    AgentProcess,
    MasterProcess,
    finished,
    fleet_env,
    job_request,
    submit,
)
from natsserver import NatsServer

from bus import (
    Bus,
    Signer,
    generate_seed,
    public_key_of,
    read_seed_file,
    sign_envelope,
    write_seed_file,
)
from bus.request import control
from ledger.anchoring import read_witness
from schemas import Envelope, JobFinished, JobLateResult, make_envelope, new_id

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

HEADLESS = str(Path(sys.executable).parent / "fleet-headless")


def agent_signer(agent: AgentProcess) -> Signer:
    return Signer(read_seed_file(agent.data_dir / "agent.nk"))


async def fleet(url: str, key: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [FLEET, *args],
        env=fleet_env(url, key),
        capture_output=True,
        text=True,
        timeout=120,
    )


async def master_status(bus: Bus) -> dict[str, Any]:
    return (await control(bus, bus.subjects.master_control("status"))).data


async def folded_through(bus: Bus, seq: int, timeout: float = 30.0) -> dict[str, Any]:
    """The master's status once it has folded (or refused) the log through ``seq``."""
    async with asyncio.timeout(timeout):
        while True:
            status = await master_status(bus)
            if status["seq"] >= seq:
                return status
            await asyncio.sleep(0.1)  # the master is still folding: ask again


async def job_state(bus: Bus, job: str) -> dict[str, Any]:
    return (await control(bus, bus.subjects.master_control("job"), {"job_id": job})).data


async def publish(bus: Bus, envelope: Envelope, signer: Signer) -> int:
    return (await bus.publish_event(sign_envelope(envelope, signer))).seq


async def test_an_agent_cannot_forge_another_agents_outcome(
    nats_server: NatsServer,
    bus: Bus,
    agent_factory: Callable[..., AgentProcess],
    master_factory: Callable[..., MasterProcess],
    operator: tuple[Path, Signer],
) -> None:
    key, tester = operator
    web1 = await agent_factory("web-1").started(bus)
    mallory = agent_signer(web1)
    web2 = Signer(generate_seed())  # registered, never started: its jobs wait for it
    master = master_factory(
        agents={
            "web-1": {"public_key": mallory.public_key},
            "web-2": {"public_key": web2.public_key},
        },
        operators={"tester": {"public_key": tester.public_key}},
    ).start()
    await master.wait_ready(bus)
    job = await submit(bus, tester, "web-2", job_request(["true"]))
    lie = JobFinished(job_id=job, agent="web-2", status="succeeded", exit_code=0)
    s = bus.subjects
    forgeries = [
        # On its own subject (what its server permissions allow), naming web-2's job.
        make_envelope(lie, source="web-1", subject=s.job_event("web-1", job, "finished")),
        # On web-2's subject, in its own name and in web-2's.
        make_envelope(lie, source="web-1", subject=s.job_event("web-2", job, "finished")),
        make_envelope(lie, source="web-2", subject=s.job_event("web-2", job, "finished")),
    ]
    last = 0
    for forged in forgeries:
        last = await publish(bus, forged, mallory)

    status = await folded_through(bus, last)
    assert (await job_state(bus, job))["status"] == "submitted"  # not folded
    assert status["refused"] == {"subject": 1, "not allowed": 1, "impersonation": 1}
    assert "not folded" in master.log()

    trust = str(master.config_path)
    audit = await fleet(nats_server.url, key, "audit", "--verify", "--trust", trust)
    assert audit.returncode == 5, audit.stderr
    assert "1 impersonation, 1 not allowed, 1 subject" in audit.stderr
    assert "says agent 'web-2' in its data" in audit.stderr
    replay = await fleet(nats_server.url, key, "replay", "--verify", "--trust", trust)
    assert replay.returncode == 5, replay.stderr
    assert "3 events do not count and were not folded" in replay.stderr
    shown = await fleet(nats_server.url, key, "replay", "--json", "--trust", trust)
    jobs = {j["job_id"]: j["status"] for j in json.loads(shown.stdout)["jobs"]}
    assert jobs[job] == "submitted"


async def test_a_second_outcome_fails_verification_and_a_late_result_stands_beside(
    nats_server: NatsServer,
    bus: Bus,
    agent_factory: Callable[..., AgentProcess],
    master_factory: Callable[..., MasterProcess],
    operator: tuple[Path, Signer],
) -> None:
    key, tester = operator
    web1 = await agent_factory("web-1").started(bus)
    master = master_factory(
        agents={"web-1": {"public_key": agent_signer(web1).public_key}},
        operators={"tester": {"public_key": tester.public_key}},
    ).start()
    await master.wait_ready(bus)
    job = await submit(bus, tester, "web-1", job_request(["true"]))
    assert (await finished(bus, "web-1", job)).status == "succeeded"
    trust = str(master.config_path)
    clean = await fleet(nats_server.url, key, "audit", "--verify", "--trust", trust)
    assert clean.returncode == 0, clean.stderr

    # What a master that lost the race should record: a late result, beside the outcome.
    master_key = Signer(read_seed_file(master.dir / "data" / "master.nk"))
    subject = bus.subjects.job_event("web-1", job, "late_result")
    late = JobLateResult(job_id=job, agent="web-1", status="abandoned", reason="agent gone")
    await publish(bus, make_envelope(late, source="master", subject=subject), master_key)
    replay = await fleet(nats_server.url, key, "replay", "--verify", "--json", "--trust", trust)
    assert replay.returncode == 0, replay.stderr
    (shown,) = [j for j in json.loads(replay.stdout)["jobs"] if j["job_id"] == job]
    assert shown["status"] == "succeeded"
    assert [r["status"] for r in shown["late_results"]] == ["abandoned"]
    show = await fleet(nats_server.url, key, "job", "show", job)
    assert "status:       succeeded" in show.stdout
    assert "late result:  abandoned (agent gone)" in show.stdout

    # What it must not: a second job.finished for the same job.
    second = JobFinished(job_id=job, agent="web-1", status="abandoned", reason="agent gone")
    subject = bus.subjects.job_event("web-1", job, "finished")
    seq = await publish(bus, make_envelope(second, source="master", subject=subject), master_key)
    status = await folded_through(bus, seq)
    assert status["refused"] == {"second outcome": 1}
    assert (await job_state(bus, job))["status"] == "succeeded"
    audit = await fleet(nats_server.url, key, "audit", "--verify", "--trust", trust)
    assert audit.returncode == 5
    assert "already ended succeeded; a second job.finished says abandoned" in audit.stderr
    replay = await fleet(nats_server.url, key, "replay", "--verify", "--trust", trust)
    assert replay.returncode == 5
    assert "1 second outcome" in replay.stderr


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


async def test_invented_jobs_with_huge_outputs_do_not_grow_the_master(
    bus: Bus,
    agent_factory: Callable[..., AgentProcess],
    master_factory: Callable[..., MasterProcess],
) -> None:
    web1 = await agent_factory("web-1").started(bus)
    mallory = agent_signer(web1)
    master = master_factory(agents={"web-1": {"public_key": mallory.public_key}}).start()
    await master.wait_ready(bus)
    assert master.proc is not None
    before = rss_kib(master.proc.pid)

    def forged(job: str, tail_chars: int) -> Envelope:
        # Built by hand: the schema would refuse to build a megabyte tail at all.
        return Envelope(
            id=new_id(),
            type=JobFinished.TYPE,
            v=JobFinished.VERSION,
            ts=time.time_ns(),
            source="web-1",
            subject=bus.subjects.job_event("web-1", job, "finished"),
            data={
                "job_id": job,
                "agent": "web-1",
                "status": "succeeded",
                "output_tail": "x" * tail_chars,
            },
        )

    last = 0
    for i in range(150):
        # A megabyte: beyond the schema's limit. 60 KiB: within it, for a job never submitted.
        last = await publish(bus, forged(new_id(), 1_000_000 if i % 2 else 60_000), mallory)
    status = await folded_through(bus, last, timeout=120)
    assert status["refused"] == {"undecodable": 75, "unknown job": 75}
    state = (await control(bus, bus.subjects.master_control("jobs"))).data
    assert state["jobs"] == []
    grown_mib = (rss_kib(master.proc.pid) - before) / 1024
    print(f"master RSS grew by {grown_mib:.1f} MiB")
    assert grown_mib < 20, f"the master grew by {grown_mib:.1f} MiB"


def edit_block(server: NatsServer, keep: int, *, drop_one: bool = False) -> None:
    """Edit the event stream's (only) block on disk, the server stopped: keep its first
    ``keep`` messages and cut the rest, or drop the one after them. The file store's
    records start with their length; the index is rebuilt on start."""
    msgs = server.store_dir / "js" / "jetstream" / "$G" / "streams" / "FLEET_EVENTS" / "msgs"
    (block,) = msgs.glob("*.blk")
    raw, offset = block.read_bytes(), 0

    def length(at: int) -> int:
        return int(struct.unpack_from("<I", raw, at)[0] & ~(1 << 31))

    for _ in range(keep):
        offset += length(offset)
    end = offset + length(offset) if drop_one else len(raw)
    block.write_bytes(raw[:offset] + raw[end:])
    (msgs / "index.db").unlink(missing_ok=True)


async def test_a_tail_cut_or_a_gap_on_disk_is_caught(
    nats_server: NatsServer,
    bus: Bus,
    agent_factory: Callable[..., AgentProcess],
    master_factory: Callable[..., MasterProcess],
    operator: tuple[Path, Signer],
) -> None:
    key, tester = operator
    web1 = await agent_factory("web-1").started(bus)
    master = master_factory(
        checkpoint_every=4,
        agents={"web-1": {"public_key": agent_signer(web1).public_key}},
        operators={"tester": {"public_key": tester.public_key}},
    ).start()
    await master.wait_ready(bus)
    for _ in range(4):
        await finished(bus, "web-1", await submit(bus, tester, "web-1", job_request(["true"])))
    witness = master.dir / "data" / "witness"
    async with asyncio.timeout(30):
        while True:  # a file has no event to await: look again until it holds two
            if witness.exists() and len(read_witness(witness)) >= 2:
                break
            await asyncio.sleep(0.1)
    assert witness.stat().st_mode & 0o777 == 0o600
    web1.stop()
    master.stop()
    last = read_witness(witness)[-1]
    trust = str(master.config_path)
    args = ("audit", "--verify", "--trust", trust, "--witness", str(witness))
    whole = await fleet(nats_server.url, key, *args)
    assert whole.returncode == 0, whole.stderr
    assert "unanchored" in whole.stderr  # the agent's and master's goodbyes came after

    # Cut the log on disk just before the last checkpoint the master published.
    nats_server.stop()
    edit_block(nats_server, keep=last.seq - 1)
    nats_server.start()
    cut = await fleet(nats_server.url, key, *args)
    assert cut.returncode == 5, cut.stderr
    assert f"the witness holds a checkpoint of {last.count} events" in cut.stderr
    assert "cut short" in cut.stderr

    # One event removed from the middle: a gap in the stream's sequence.
    nats_server.stop()
    edit_block(nats_server, keep=2, drop_one=True)
    nats_server.start()
    gap = await fleet(nats_server.url, key, "audit", "--verify", "--trust", trust)
    assert gap.returncode == 5, gap.stderr
    assert "stream sequence 3 missing before seq 4" in gap.stderr


async def test_a_headless_users_own_signature_is_a_known_principal(
    tmp_path: Path,
    nats_server: NatsServer,
    bus: Bus,
    agent_factory: Callable[..., AgentProcess],
    operator: tuple[Path, Signer],
) -> None:
    web1 = await agent_factory("web-1").started(bus)
    seed = tmp_path / "batch.nk"
    write_seed_file(seed, generate_seed())
    run = await asyncio.create_subprocess_exec(
        HEADLESS,
        "-s",
        nats_server.url,
        "-a",
        "nkey",
        "-u",
        "batch",
        "-p",
        str(seed),
        "--agent",
        "web-1",
        # Fire and forget: waiting would ask the master, and only the signed submission
        # matters here.
        "-c",
        "echo signed",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(run.communicate(), 120)
    assert run.returncode == 0, err
    registry = MasterProcess(
        tmp_path, nats_server.url, agents={"web-1": {"public_key": agent_signer(web1).public_key}}
    )
    without = await fleet(
        nats_server.url, operator[0], "audit", "--verify", "--trust", str(registry.config_path)
    )
    assert without.returncode == 5
    assert "unknown signer" in without.stderr
    registry.settings["headless"] = {"batch": {"public_key": public_key_of(read_seed_file(seed))}}
    registry.write_config()
    trusted = await fleet(
        nats_server.url, operator[0], "audit", "--verify", "--trust", str(registry.config_path)
    )
    assert trusted.returncode == 0, trusted.stderr
