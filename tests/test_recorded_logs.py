"""Every recorded log of an older schema version still replays with today's code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bus import Bus, decode_envelope, verify_envelope
from bus.codec import decode_data, unpack
from bus.log import read_log
from ledger.chain import Chain
from ledger.driver import fold_records
from ledger.projection import Projection

FIXTURES = sorted((Path(__file__).parent / "fixtures").glob("log-v*"))


def test_there_is_a_recorded_log() -> None:
    assert FIXTURES


@pytest.mark.parametrize("directory", FIXTURES, ids=lambda p: p.name)
def test_recorded_log_replays(directory: Path) -> None:
    expected = json.loads((directory / "expected.json").read_text())
    events = unpack((directory / "events.msgpack").read_bytes(), max_size=2**30)
    projection, chain = Projection(), Chain()
    for seq, (subject, raw) in enumerate(events, 1):
        envelope = decode_envelope(raw)
        assert verify_envelope(envelope, {expected["signer"]}, subject=subject)
        projection.apply(seq, decode_data(envelope))  # upcast on read when old
        chain.add(raw)
    assert projection.unknown == {}
    assert projection.events == expected["events"]
    assert {j.job_id: j.status for j in projection.jobs.values()} == expected["jobs"]
    assert sorted(projection.agents) == expected["agents"]
    assert sorted(projection.rollouts) == expected["rollouts"]
    assert chain.hex == expected["chain"]


@pytest.mark.parametrize("directory", FIXTURES, ids=lambda p: p.name)
async def test_recorded_log_replays_from_a_real_stream(bus: Bus, directory: Path) -> None:
    expected = json.loads((directory / "expected.json").read_text())
    for subject, raw in unpack((directory / "events.msgpack").read_bytes(), max_size=2**30):
        await bus.js.publish(subject, raw)
    records = await read_log(bus, bus.subjects.events_stream, bus.subjects.all_events)
    projection, chain = fold_records(records)
    assert projection.events == expected["events"]
    assert chain.hex == expected["chain"]
