"""Is the log whole: gaps, unanchored events, the witness file and the gate, without a server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from samples import AGENT, JOB, sample_data, subject_for

from bus import Signer, UsageError, generate_seed, sign_envelope
from bus.codec import encode_envelope
from bus.log import LogRecord
from ledger.anchoring import Anchoring, WitnessEntry, read_witness
from ledger.chain import Chain
from ledger.driver import RecordDriver
from ledger.gate import guard
from ledger.policy import Principals
from master import witness as witness_module
from master.witness import Witness
from schemas import AuditCheckpoint, EventData, JobFinished, JobStarted, make_envelope

CHAIN = "ab" * 32


def entry(count: int, seq: int) -> WitnessEntry:
    return WitnessEntry(count=count, chain=CHAIN, through_seq=seq - 1, seq=seq)


def test_gaps_and_unanchored_events_are_counted() -> None:
    anchoring = Anchoring()
    for seq, checkpoint in [(1, False), (2, True), (3, False), (6, False), (7, False)]:
        anchoring.saw(seq, seq, bytes(32), checkpoint=checkpoint)
    anchoring.end()
    assert anchoring.problems == [("gap", "stream sequence 4–5 missing before seq 6")]
    assert anchoring.unanchored == 3


def test_the_witness_catches_a_cut_or_a_rewrite() -> None:
    whole = Anchoring(entry(count=3, seq=4))
    for seq in range(1, 6):
        whole.saw(seq, seq, bytes.fromhex(CHAIN) if seq == 3 else bytes(32), checkpoint=seq == 4)
    whole.end()
    assert whole.problems == []

    cut = Anchoring(entry(count=3, seq=4))
    for seq in range(1, 4):
        cut.saw(seq, seq, bytes.fromhex(CHAIN) if seq == 3 else bytes(32), checkpoint=False)
    cut.end()
    assert [kind for kind, _ in cut.problems] == ["truncated"]

    rewritten = Anchoring(entry(count=3, seq=4))
    for seq in range(1, 5):
        rewritten.saw(seq, seq, bytes(32), checkpoint=seq == 4)
    rewritten.end()
    assert [kind for kind, _ in rewritten.problems] == ["witness"]


def test_the_witness_file_is_private_appended_and_kept_short(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(witness_module, "KEEP_MAX", 5)
    monkeypatch.setattr(witness_module, "KEEP", 2)
    witness = Witness(tmp_path / "data")
    for n in range(1, 8):
        checkpoint = AuditCheckpoint(count=n, through_seq=n, chain=CHAIN)
        asyncio.run(witness.record(checkpoint, seq=n + 1))
    entries = read_witness(witness.path)
    assert 2 <= len(entries) <= 5
    assert entries[-1] == entry(count=7, seq=8).model_copy(update={"through_seq": 7})
    assert witness.path.stat().st_mode & 0o777 == 0o600
    # A crash mid-append leaves a torn last line: the entries before it stand.
    with witness.path.open("ab") as f:
        f.write(b'{"count": 9, "ch')
    assert read_witness(witness.path) == entries
    witness.path.write_bytes(b"garbage\n" + entries[-1].line())
    with pytest.raises(UsageError, match="not a witness entry"):
        read_witness(witness.path)


def records(signer: Signer, *events: tuple[EventData, str]) -> list[LogRecord]:
    out = []
    for seq, (data, source) in enumerate(events, 1):
        envelope = sign_envelope(
            make_envelope(data, source=source, subject=subject_for(data)), signer
        )
        out.append(LogRecord(seq, envelope.subject, encode_envelope(envelope), {}))
    return out


def test_the_gate_refuses_what_does_not_fit_the_log() -> None:
    submitted, started = sample_data()[0], sample_data()[2]
    agent, operator = Signer(generate_seed()), Signer(generate_seed())
    principals = Principals(
        agents={AGENT: agent.public_key}, operators={"alice": operator.public_key}
    )
    driver = RecordDriver(chain=Chain())
    guard(driver, principals)
    done = JobFinished(job_id=JOB, agent=AGENT, status="succeeded")
    again = JobFinished(job_id=JOB, agent=AGENT, status="failed")
    stray = JobStarted(job_id="01JB3Z0000000000000000000B", agent=AGENT, pid=1, effective_user="x")
    other = Signer(generate_seed())
    theirs = JobStarted(job_id=JOB, agent="db-01", pid=1, effective_user="x")  # not its job
    update = next(d for d in sample_data() if d.TYPE == "update.applied")  # never published
    feed = [
        *records(agent, (started, AGENT)),  # before its job was submitted
        *records(operator, (submitted, "alice")),
        *records(agent, (started, AGENT), (done, AGENT), (again, AGENT), (stray, AGENT)),
        *records(other, (theirs, "db-01")),
        *records(agent, (update, AGENT)),
    ]
    for seq, record in enumerate(feed, 1):
        driver.feed(LogRecord(seq, record.subject, record.data, {}))
    assert driver.counts == {
        "unknown job": 2,
        "second outcome": 1,
        "not allowed": 1,
        "unknown release": 1,
    }
    assert "db-01" not in driver.projection.agents
    assert driver.projection.jobs[JOB].status == "succeeded"
    assert set(driver.projection.jobs) == {JOB}
