"""The one record driver: what every reader of the log does with each stored record.

Pure tests first (records built in memory), then one against a real server showing that
``fleet replay``, ``fleet audit``, ``fleet jobs``/``job show`` and a job follower all
count a log with an undecodable and an unknown event the same way.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path

import pytest
from agents import FLEET, fleet_env, job_request, submit
from natsserver import NatsServer

from bus import Bus, Signer, Subjects, encode_envelope, generate_seed, sign_envelope
from bus.log import LogRecord
from fleet.common import job_projection
from fleet.follow import JobFollower
from ledger.apply import APPLY, applies
from ledger.chain import Chain
from ledger.driver import UNDECODABLE, Entry, Problem, RecordDriver, decode_record
from ledger.verify import CheckpointCheck, signature_check
from schemas import (
    AuditCheckpoint,
    Envelope,
    EventData,
    JobFinished,
    JobSubmitted,
    UnknownEvent,
    make_envelope,
    new_id,
)

SUBJECTS = Subjects()
SIGNER = Signer(generate_seed())
JOB = new_id()
AGENT = "web-1"


def record(seq: int, envelope: Envelope, subject: str | None = None) -> LogRecord:
    return LogRecord(seq, subject or envelope.subject, encode_envelope(envelope), {})


def signed(data: EventData, subject: str) -> Envelope:
    return sign_envelope(make_envelope(data, source="tester", subject=subject), SIGNER)


def unknown_type(subject: str, job_id: str = JOB) -> Envelope:
    """A well-formed, signed event of a type this code does not know (a newer producer)."""
    envelope = Envelope(
        id=new_id(),
        type="job.teleported",
        v=1,
        ts=time.time_ns(),
        source="tester",
        subject=subject,
        data={"job_id": job_id, "agent": AGENT},
    )
    return sign_envelope(envelope, SIGNER)


def sample_log() -> list[LogRecord]:
    submitted = JobSubmitted(
        job_id=JOB, agent=AGENT, request=job_request(["true"]), submitted_by="tester"
    )
    finished = JobFinished(job_id=JOB, agent=AGENT, status="succeeded", exit_code=0)
    return [
        record(1, signed(submitted, SUBJECTS.job_event(AGENT, JOB, "submitted"))),
        LogRecord(2, SUBJECTS.job_event(AGENT, JOB, "submitted"), b"\xc1 not msgpack", {}),
        record(3, unknown_type(SUBJECTS.job_event(AGENT, JOB, "teleported"))),
        record(4, signed(finished, SUBJECTS.job_event(AGENT, JOB, "finished"))),
    ]


def test_undecodable_records_are_counted_reported_and_chained() -> None:
    found: list[Problem] = []
    driver = RecordDriver(chain=Chain(), on_problem=found.append)
    entries = [driver.feed(r) for r in sample_log()]
    assert driver.undecodable == 1
    assert [p.seq for p in found] == [2]
    assert found[0].kind == UNDECODABLE
    assert entries[1].envelope is None
    assert entries[1].event is None
    assert not entries[1].applied
    projection = driver.projection
    assert projection.events == 4  # every stored record is counted, none dropped
    assert projection.seq == 4
    assert projection.unknown["undecodable"] == 1
    assert driver.chain is not None
    assert driver.chain.count == 4
    assert projection.jobs[JOB].status == "succeeded"


def test_unknown_event_types_are_kept_and_reported() -> None:
    driver = RecordDriver()
    entries = [driver.feed(r) for r in sample_log()]
    teleported = entries[2]
    assert teleported.unknown
    assert isinstance(teleported.event, UnknownEvent)
    assert teleported.event.envelope.data == {"job_id": JOB, "agent": AGENT}
    assert driver.projection.unknown == {"job.teleported (unknown_type)": 1, "undecodable": 1}
    assert "job.teleported" not in driver.counts  # not a problem, only not understood


def test_a_valid_envelope_with_invalid_data_is_undecodable_but_readable() -> None:
    envelope = signed(
        JobFinished(job_id=JOB, agent=AGENT, status="succeeded"),
        SUBJECTS.job_event(AGENT, JOB, "finished"),
    )
    broken = envelope.model_copy(update={"data": {"job_id": JOB}})
    entry = decode_record(record(1, broken))
    assert entry.envelope is not None  # audit can still list who said it
    assert entry.event is None
    assert [p.kind for p in entry.problems] == [UNDECODABLE]


def test_checks_report_and_refuse_when_asked() -> None:
    def no_teleports(entry: Entry) -> Problem | None:
        assert entry.envelope is not None
        if entry.envelope.type == "job.teleported":
            return Problem(entry.seq, "policy", "nobody may teleport")
        return None

    lenient = RecordDriver(checks=[no_teleports])
    strict = RecordDriver(checks=[no_teleports], refuse=True)
    for r in sample_log():
        lenient.feed(r)
        entry = strict.feed(r)
        if r.seq == 3:
            assert entry.verified is False
            assert not entry.applied
        if r.seq == 4:
            assert entry.verified is True
    assert lenient.counts == strict.counts == {"undecodable": 1, "policy": 1}
    assert "job.teleported (unknown_type)" in lenient.projection.unknown
    assert strict.projection.unknown == {"undecodable": 1, "refused (policy)": 1}
    assert strict.projection.events == lenient.projection.events == 4


def test_checks_can_be_switched_off_for_catch_up() -> None:
    driver = RecordDriver(checks=[signature_check({})])  # trusts nobody
    driver.checking = False
    assert driver.feed(sample_log()[0]).verified is None
    driver.checking = True
    entry = driver.feed(sample_log()[3])
    assert entry.verified is False
    assert driver.counts == {"unknown signer": 1}


def test_signature_and_checkpoint_checks() -> None:
    log = sample_log()
    chain = Chain()
    driver = RecordDriver(
        chain=chain,
        checks=[signature_check({SIGNER.public_key: "tester"}), CheckpointCheck(chain)],
    )
    driver.feed_all(log)
    good = AuditCheckpoint(count=4, through_seq=4, chain=chain.hex)
    assert driver.feed(record(5, signed(good, SUBJECTS.audit_event("checkpoint")))).verified
    bad = AuditCheckpoint(count=5, through_seq=5, chain="00" * 32)
    entry = driver.feed(record(6, signed(bad, SUBJECTS.audit_event("checkpoint"))))
    assert [p.kind for p in entry.problems] == ["chain"]
    moved = record(7, signed(good, SUBJECTS.audit_event("checkpoint")), "fleet.evt.audit.other")
    assert [p.kind for p in driver.feed(moved).problems] == ["forged"]


def test_each_event_type_has_at_most_one_apply_function() -> None:
    with pytest.raises(ValueError, match="already has"):
        applies(JobFinished)(lambda p, data, ts: None)
    assert all(issubclass(kind, EventData) for kind in APPLY)


async def test_replay_audit_jobs_and_follow_count_alike(
    nats_server: NatsServer, bus: Bus, operator: tuple[Path, Signer]
) -> None:
    """All readers go through the one driver, so they agree on a log with a bad record."""
    key, signer = operator
    job = await submit(bus, signer, AGENT, job_request(["true"]))
    await bus.js.publish(bus.subjects.job_event(AGENT, job, "submitted"), b"\xc1 not msgpack")
    stranger = unknown_type(bus.subjects.job_event(AGENT, job, "teleported"), job)
    await bus.js.publish(stranger.subject, encode_envelope(sign_envelope(stranger, signer)))
    finished = JobFinished(job_id=job, agent=AGENT, status="succeeded", exit_code=0)
    subject = bus.subjects.job_event(AGENT, job, "finished")
    await bus.publish_event(
        sign_envelope(make_envelope(finished, source=AGENT, subject=subject), signer)
    )
    env = fleet_env(nats_server.url, key)

    def fleet(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [FLEET, *args], capture_output=True, text=True, env=env, timeout=60, check=False
        )

    replay, audit, verify = await asyncio.gather(
        asyncio.to_thread(fleet, "replay", "--json"),
        asyncio.to_thread(fleet, "audit", "--json"),
        asyncio.to_thread(fleet, "audit", "--verify"),
    )
    replayed = json.loads(replay.stdout)
    assert replayed["events"] == 4
    assert replayed["unknown"] == {"undecodable": 1, "job.teleported (unknown_type)": 1}
    listed = [json.loads(line) for line in audit.stdout.splitlines()]
    assert len(listed) == 4
    assert sum("undecodable" in doc for doc in listed) == 1
    assert verify.returncode == 5
    assert "1 undecodable" in verify.stderr

    shown = await job_projection(bus, job)  # what `fleet job show` and `fleet jobs` fold
    assert shown.events == 4
    assert shown.unknown == replayed["unknown"]

    follower = await JobFollower(bus, AGENT, job, printer=None).start()
    try:
        # The log is read in order, so once the job has ended every record is folded.
        await asyncio.wait_for(follower.done.wait(), 30)
    finally:
        await follower.close()
    assert follower.projection.events == 4
    assert follower.undecodable == 1
    assert follower.projection.unknown == replayed["unknown"]
