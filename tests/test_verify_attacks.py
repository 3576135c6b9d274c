"""Attacks on the log's truth, against real nats-server, agent and master processes.

Who may say what (a forged outcome), two outcomes for one job, events that would grow
the master's memory, a tail cut from the store on disk, and a headless user's own
signature: each is refused by the master's fold and reported by ``fleet audit --verify``
and ``fleet replay --verify`` (exit 5). Each runs twice (the ``deployment`` fixture): on
the open test server and under the permissions ``fleet ops server-config`` generates,
every principal connected as itself. Where those permissions refuse an attack first (an
agent publishing on another agent's subject), the denial is asserted there, and the
master's and the audit's own refusal stays tested on the open server.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from agents import FLEET, finished, job_request, submit, wait_event
from deployment import Deployment, run_cli
from natsserver import NatsServer

from bus import Bus, PermissionDeniedError, Signer, sign_envelope
from bus.request import control
from ledger.anchoring import read_witness
from ledger.policy import MASTER_OUTCOMES
from schemas import Envelope, JobFinished, JobLateResult, JobSubmitted, make_envelope, new_id
from schemas.ids import _encode as encode_id
from schemas.ids import id_time_ns

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

HEADLESS = str(Path(sys.executable).parent / "fleet-headless")


async def fleet(d: Deployment, *args: str) -> subprocess.CompletedProcess[str]:
    """``fleet ARGS`` as the operator ``tester``."""
    return await run_cli(FLEET, *args, env=d.env("tester"))


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


async def started(d: Deployment, **master: Any) -> None:
    """Agent web-1 (web-2 is registered, never started: its jobs wait for it) and the
    master, ready."""
    await d.agent("web-1").started(d.bus)
    await d.master(**master).start().wait_ready(d.bus)


async def test_an_agent_cannot_forge_another_agents_outcome(deployment: Deployment) -> None:
    d = deployment
    await started(d)
    job = await submit(await d.as_("tester"), d["tester"].signer, "web-2", job_request(["true"]))
    lie = JobFinished(job_id=job, agent="web-2", status="succeeded", exit_code=0)
    s, mallory, web1 = d.bus.subjects, d["web-1"].signer, await d.as_("web-1")
    forgeries = [
        # On its own subject (what its server permissions allow), naming web-2's job.
        make_envelope(lie, source="web-1", subject=s.job_event("web-1", job, "finished")),
        # On web-2's subject, in its own name and in web-2's.
        make_envelope(lie, source="web-1", subject=s.job_event("web-2", job, "finished")),
        make_envelope(lie, source="web-2", subject=s.job_event("web-2", job, "finished")),
    ]
    last = await publish(web1, forgeries[0], mallory)
    for forged in forgeries[1:]:
        if d.generated:  # the server refuses it another agent's subjects
            with pytest.raises(PermissionDeniedError, match=f"publishing to '{forged.subject}'"):
                await publish(web1, forged, mallory)
        else:
            last = await publish(web1, forged, mallory)

    status = await folded_through(d.bus, last)
    assert (await job_state(d.bus, job))["status"] == "submitted"  # not folded
    refusals = {"subject": 1} if d.generated else {"subject": 1, "not allowed": 1}
    if not d.generated:
        refusals["impersonation"] = 1
    assert status["refused"] == refusals
    assert "not folded" in d.masters[0].log()

    trust = str(d.masters[0].config_path)
    audit = await fleet(d, "audit", "--verify", "--trust", trust)
    assert audit.returncode == 5, audit.stderr
    summary = "1 subject" if d.generated else "1 impersonation, 1 not allowed, 1 subject"
    assert summary in audit.stderr
    assert "says agent 'web-2' in its data" in audit.stderr
    replay = await fleet(d, "replay", "--verify", "--trust", trust)
    assert replay.returncode == 5, replay.stderr
    assert f"{sum(refusals.values())} events do not count and were not folded" in replay.stderr
    shown = await fleet(d, "replay", "--json", "--trust", trust)
    jobs = {j["job_id"]: j["status"] for j in json.loads(shown.stdout)["jobs"]}
    assert jobs[job] == "submitted"


async def test_a_second_outcome_fails_verification_and_a_late_result_stands_beside(
    deployment: Deployment,
) -> None:
    d = deployment
    await started(d)
    job = await submit(await d.as_("tester"), d["tester"].signer, "web-1", job_request(["true"]))
    assert (await finished(d.bus, "web-1", job)).status == "succeeded"
    trust = str(d.masters[0].config_path)
    clean = await fleet(d, "audit", "--verify", "--trust", trust)
    assert clean.returncode == 0, clean.stderr

    # What a master that lost the race should record: a late result, beside the outcome.
    master, master_key = await d.as_("master"), d["master"].signer
    subject = d.bus.subjects.job_event("web-1", job, "late_result")
    late = JobLateResult(job_id=job, agent="web-1", status="abandoned", reason="agent gone")
    await publish(master, make_envelope(late, source="master", subject=subject), master_key)
    replay = await fleet(d, "replay", "--verify", "--json", "--trust", trust)
    assert replay.returncode == 0, replay.stderr
    (shown,) = [j for j in json.loads(replay.stdout)["jobs"] if j["job_id"] == job]
    assert shown["status"] == "succeeded"
    assert [r["status"] for r in shown["late_results"]] == ["abandoned"]
    show = await fleet(d, "job", "show", job)
    assert "status:       succeeded" in show.stdout
    assert "late result:  abandoned (agent gone)" in show.stdout

    # What it must not: a second job.finished for the same job.
    second = JobFinished(job_id=job, agent="web-1", status="abandoned", reason="agent gone")
    subject = d.bus.subjects.job_event("web-1", job, "finished")
    seq = await publish(master, make_envelope(second, source="master", subject=subject), master_key)
    status = await folded_through(d.bus, seq)
    assert status["refused"] == {"second outcome": 1}
    assert (await job_state(d.bus, job))["status"] == "succeeded"
    audit = await fleet(d, "audit", "--verify", "--trust", trust)
    assert audit.returncode == 5
    assert "already ended succeeded; a second job.finished says abandoned" in audit.stderr
    replay = await fleet(d, "replay", "--verify", "--trust", trust)
    assert replay.returncode == 5
    assert "1 second outcome" in replay.stderr


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


# The agent publishes only on its own subjects, which its permissions allow: the master's
# bound is all there is, the same under either server, so it runs under the generated one.
@pytest.mark.parametrize("deployment", ["generated"], indirect=True)
async def test_invented_jobs_with_huge_outputs_do_not_grow_the_master(
    deployment: Deployment,
) -> None:
    d = deployment
    await started(d)
    master, bus, mallory = d.masters[0], await d.as_("web-1"), d["web-1"].signer
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
    status = await folded_through(d.bus, last, timeout=120)
    assert status["refused"] == {"undecodable": 75, "unknown job": 75}
    state = (await control(d.bus, d.bus.subjects.master_control("jobs"))).data
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


# The cut is made on the server's disk, beyond any permission: the audit alone catches
# it, the same under either server, so it runs under the generated one.
@pytest.mark.parametrize("deployment", ["generated"], indirect=True)
async def test_a_tail_cut_or_a_gap_on_disk_is_caught(deployment: Deployment) -> None:
    d = deployment
    await started(d, checkpoint_every=4)
    web1, master, server = d.agents[0], d.masters[0], d.server
    assert server is not None
    tester = await d.as_("tester")
    for _ in range(4):
        job = await submit(tester, d["tester"].signer, "web-1", job_request(["true"]))
        await finished(d.bus, "web-1", job)
    witness = master.dir / "data" / "witness"
    async with asyncio.timeout(30):
        while True:  # a file has no event to await: look again until it holds two
            if witness.exists() and len(read_witness(witness)) >= 2:
                break
            await asyncio.sleep(0.1)
    assert witness.stat().st_mode & 0o777 == 0o600
    web1.stop()
    master.stop()
    # A job submitted with no master left to checkpoint it: the log's tail is unanchored
    # whatever the master's last checkpoint happened to cover.
    await submit(tester, d["tester"].signer, "web-1", job_request(["true"]))
    last = read_witness(witness)[-1]
    trust = str(master.config_path)
    args = ("audit", "--verify", "--trust", trust, "--witness", str(witness))
    whole = await fleet(d, *args)
    assert whole.returncode == 0, whole.stderr
    assert "unanchored" in whole.stderr

    # Cut the log on disk just before the last checkpoint the master published.
    server.stop()
    edit_block(server, keep=last.seq - 1)
    server.start()
    cut = await fleet(d, *args)
    assert cut.returncode == 5, cut.stderr
    assert f"the witness holds a checkpoint of {last.count} events" in cut.stderr
    assert "cut short" in cut.stderr

    # One event removed from the middle: a gap in the stream's sequence.
    server.stop()
    edit_block(server, keep=2, drop_one=True)
    server.start()
    gap = await fleet(d, "audit", "--verify", "--trust", trust)
    assert gap.returncode == 5, gap.stderr
    assert "stream sequence 3 missing before seq 4" in gap.stderr


async def test_a_headless_users_own_signature_is_a_known_principal(
    deployment: Deployment,
) -> None:
    d = deployment
    await d.agent("web-1").started(d.bus)
    run = await run_cli(
        HEADLESS, "-s", d.url, "-a", "nkey", "-u", "batch", "-p", str(d["batch"].key_file),
        # Fire and forget: waiting would ask the master, and only the signed submission
        # matters here.
        "--agent", "web-1", "-c", "echo signed",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    registry = d.master(headless={})  # never started: its config is the audit's registry
    without = await fleet(d, "audit", "--verify", "--trust", str(registry.config_path))
    assert without.returncode == 5
    assert "unknown signer" in without.stderr
    registry.settings["headless"] = {"batch": {"public_key": d["batch"].public_key}}
    registry.write_config()
    trusted = await fleet(d, "audit", "--verify", "--trust", str(registry.config_path))
    assert trusted.returncode == 0, trusted.stderr


def guessed_id(job: str, *parts: str) -> str:
    """An event id derived from what anyone may know (the job's id and the event's name),
    the way a retried event's id once was."""
    ms = id_time_ns(job) // 1_000_000
    digest = hashlib.sha256("\x1f".join((job, *parts)).encode()).digest()
    return encode_id((ms << 80) | int.from_bytes(digest[:10], "big"))


async def test_a_submitter_cannot_squat_the_ids_of_its_jobs_events(deployment: Deployment) -> None:
    # The stream drops a message whose Nats-Msg-Id it saw in the last two minutes, on any
    # subject. A submitter knows its job's id before the job runs: if the agent's started
    # and finished (and the master's outcomes) had ids anyone could derive from it, a
    # message carrying them, on a subject the submitter may publish, would make the log
    # drop the agent's events as repeats, and the job would never have run, as far as
    # the log tells.
    d = deployment
    trusted = [d[n].public_key for n in ("tester", "mallory")]
    await d.agent("web-1", trusted=trusted).started(d.bus)
    mallory, job, s = await d.as_("mallory"), new_id(), d.bus.subjects
    guesses = [guessed_id(job, name) for name in ("started", "finished")]
    guesses += [guessed_id(job, "finished", "master", st) for st in MASTER_OUTCOMES]
    for guess in guesses:
        decoy = new_id()
        data = JobSubmitted(
            job_id=decoy, agent="web-2", request=job_request(["true"]), submitted_by="mallory"
        )
        subject = s.job_event("web-2", decoy, "submitted")
        envelope = make_envelope(data, source="mallory", subject=subject, event_id=guess)
        stored = await mallory.publish_event(sign_envelope(envelope, d["mallory"].signer))
        assert not stored.duplicate
    data = JobSubmitted(
        job_id=job, agent="web-1", request=job_request(["echo", "ran"]), submitted_by="mallory"
    )
    subject = s.job_event("web-1", job, "submitted")
    envelope = make_envelope(data, source="mallory", subject=subject)
    await mallory.publish_event(sign_envelope(envelope, d["mallory"].signer))
    started = await wait_event(d.bus, "web-1", job, "started", timeout=20)
    assert started.id not in guesses
    done = await finished(d.bus, "web-1", job, timeout=20)
    assert (done.status, done.output_tail) == ("succeeded", "ran\n")


async def test_another_agent_cannot_squat_a_jobs_output_chunks(deployment: Deployment) -> None:
    # The output stream drops repeats by message id too. Another agent (publishing only
    # its own output, as its permissions allow), told a job's id by its submitter before
    # the job runs, sends chunks with the ids web-1 would give that job's output.
    d = deployment
    await d.agent("web-1").started(d.bus)
    job, s, web2 = new_id(), d.bus.subjects, await d.as_("web-2")
    for seq in range(1, 4):
        stored = await web2.publish_stored(
            s.output("web-2", job), b"decoy\n", msg_id=f"{job}-{seq}", stream=s.output_stream
        )
        assert not stored.duplicate
    request = job_request(["echo", "ran"])
    await submit(await d.as_("tester"), d["tester"].signer, "web-1", request, job_id=job)
    assert (await finished(d.bus, "web-1", job)).status == "succeeded"
    logs = await fleet(d, "job", "logs", job)
    assert (logs.returncode, logs.stdout) == (0, "ran\n"), logs.stderr
