"""bus.catchup: an agent's short-lived catch-up consumer, made through the filtered create
subject, read to the end and gone afterwards. Against a real server."""

from __future__ import annotations

import json

import pytest
from agents import job_request, submit

from bus import Bus, Signer, generate_seed
from bus.catchup import CatchUp

pytestmark = pytest.mark.timeout(60)


def catchup(bus: Bus, agent: str = "web-1") -> CatchUp:
    return CatchUp(bus, bus.subjects.events_stream, *bus.subjects.agent_catchup(agent))


async def _consumers(bus: Bus) -> list[str]:
    return [c.name for c in await bus.js.consumers_info(bus.subjects.events_stream)]


async def test_the_create_subject_pins_the_filter(bus: Bus) -> None:
    mine = catchup(bus)
    assert mine.create_subject == bus.subjects.agent_catchup_create("web-1")
    # The attack of issue 11, on the catch-up: the agent's own consumer name, on the
    # subject its permission allows, asking for every agent's events. The server refuses
    # it because the filter in the request is not the one in the subject.
    wider = {
        "stream_name": mine.stream,
        "config": {**mine._config(1), "filter_subject": bus.subjects.all_events},
        "action": "create",
    }
    reply = await bus.nc.request(mine.create_subject, json.dumps(wider).encode(), timeout=5)
    error = json.loads(reply.data).get("error")
    assert error is not None, "the server took a wider filter on a pinned subject"
    assert mine.name not in await _consumers(bus)


async def test_a_catch_up_reads_its_own_subjects_to_the_end_and_leaves_nothing(bus: Bus) -> None:
    signer = Signer(generate_seed())
    mine = [await submit(bus, signer, "web-1", job_request(["true"])) for _ in range(5)]
    theirs = await submit(bus, signer, "web-2", job_request(["true"]))
    reader = catchup(bus)
    records = [r async for batch in reader.read(1, batch=2) for r in batch]
    assert [bus.subjects.parse_job_event(r.subject) for r in records] == [
        ("web-1", job, "submitted") for job in mine
    ]
    assert all(r.stored_ns for r in records)
    assert theirs not in {r.subject for r in records}
    assert reader.name not in await _consumers(bus)  # deleted when the read ended

    # From a sequence: only what follows it.
    later = [r async for batch in reader.read(records[3].seq) for r in batch]
    assert [r.seq for r in later] == [records[3].seq, records[4].seq]


async def test_a_consumer_left_by_a_reader_that_died_is_replaced(bus: Bus) -> None:
    signer = Signer(generate_seed())
    jobs = [await submit(bus, signer, "web-1", job_request(["true"])) for _ in range(3)]
    reader = catchup(bus)
    reading = reader.read(1, batch=1)
    first = await anext(reading)  # the reader dies here: the consumer stays, moved on
    assert len(first) == 1
    assert reader.name in await _consumers(bus)
    # (Its generator is never closed, as in a crash.)
    again = [r async for batch in catchup(bus).read(1) for r in batch]
    assert [bus.subjects.parse_job_event(r.subject)[1] for r in again] == jobs  # type: ignore[index]
    assert reader.name not in await _consumers(bus)
    await reading.aclose()
