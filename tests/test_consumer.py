"""bus.consumer: durable consumers made through the filtered create subject, and their
recreation after a delete. Against a real server."""

from __future__ import annotations

import asyncio
import json

import pytest

from bus import Bus
from bus.consumer import ConsumerSpec, DurableConsumer

pytestmark = pytest.mark.timeout(60)


def spec(bus: Bus, agent: str = "web-1") -> ConsumerSpec:
    return ConsumerSpec(bus.subjects.events_stream, *bus.subjects.agent_consumer(agent, "jobs"))


async def test_the_create_subject_pins_the_filter(bus: Bus) -> None:
    mine = spec(bus)
    consumer = DurableConsumer(bus, mine)
    await consumer.ensure()
    assert consumer.create_subject == bus.subjects.agent_consumer_create("web-1", "jobs")
    # The attack of issue 11: the same consumer, on the subject a permission allows,
    # asking for every agent's events. The server refuses it because the filter in the
    # request is not the one in the subject.
    wider = {
        "stream_name": mine.stream,
        "config": {**mine.config(), "filter_subject": bus.subjects.all_events},
        "action": "update",
    }
    reply = await bus.nc.request(consumer.create_subject, json.dumps(wider).encode(), timeout=5)
    error = json.loads(reply.data).get("error")
    assert error is not None, "the server took a wider filter on a pinned subject"
    info = await bus.js.consumer_info(mine.stream, mine.name)
    assert info.config.filter_subject == mine.filter_subject
    await consumer.close()


async def test_a_deleted_consumer_is_created_again_and_keeps_its_place(
    bus: Bus, caplog: pytest.LogCaptureFixture
) -> None:
    mine = spec(bus)
    consumer = DurableConsumer(bus, mine, heartbeat_s=0.5)
    await consumer.ensure()
    subject = bus.subjects.job_event("web-1", "01JD0000000000000000000000", "submitted")
    await bus.js.publish(subject, b"one")
    [first] = await consumer.fetch(4, wait_s=2.0)
    assert first.data == b"one"
    await first.ack()

    # Deleted while a pull waits (the server says so), then again between pulls.
    pulling = asyncio.create_task(consumer.fetch(1, wait_s=10.0))
    async with asyncio.timeout(10):  # until the server holds the pull
        while True:
            if (await bus.js.consumer_info(mine.stream, mine.name)).num_waiting:
                break
            await asyncio.sleep(0.01)  # the server has no event for it: ask again
    assert await bus.js.delete_consumer(mine.stream, mine.name)
    assert await pulling == []
    assert consumer.recreated == 1
    assert await consumer.exists()
    await bus.js.publish(subject, b"two")
    got = await consumer.fetch(4, wait_s=5.0)
    assert [d.data for d in got] == [b"two"], "recreated from where it was, not from the start"
    await got[0].ack()

    assert await bus.js.delete_consumer(mine.stream, mine.name)
    await bus.js.publish(subject, b"three")
    got = []
    async with asyncio.timeout(30):
        while not got:
            got = await consumer.fetch(4, wait_s=2.0)
    assert [d.data for d in got] == [b"three"]
    assert consumer.recreated == 2
    assert "was deleted; created it again" in caplog.text
    await consumer.close()


async def test_a_recreated_consumer_is_taken_as_it_is_after_a_restart(bus: Bus) -> None:
    mine = spec(bus)
    first = DurableConsumer(bus, mine)
    await first.ensure()
    subject = bus.subjects.job_event("web-1", "01JD0000000000000000000000", "submitted")
    await bus.js.publish(subject, b"one")
    [one] = await first.fetch(1, wait_s=2.0)
    await one.ack()
    assert await bus.js.delete_consumer(mine.stream, mine.name)
    await first.recreate()  # starts after "one"
    await first.close()

    again = DurableConsumer(bus, mine)  # the next start of the agent: other settings exist
    await again.ensure()
    await bus.js.publish(subject, b"two")
    got = await again.fetch(4, wait_s=5.0)
    assert [d.data for d in got] == [b"two"]
    await again.close()
