"""Following the event log through the bus: in order, caught up, and through a restart."""

from __future__ import annotations

import asyncio

from natsserver import NatsServer

from bus import Bus
from bus.log import Batch, LogRecord, follow, last_message, last_seq


async def _publish(bus: Bus, n: int, first: int) -> None:
    for i in range(first, first + n):
        await bus.js.publish(f"fleet.evt.test.e{i}", str(i).encode(), stream="FLEET_EVENTS")


async def test_follow_reads_in_order_says_when_caught_up_and_survives_a_restart(
    nats_server: NatsServer, bus: Bus
) -> None:
    await _publish(bus, 3, 0)
    assert await last_seq(bus, bus.subjects.events_stream) == 3
    seen: list[LogRecord] = []
    caught_up = asyncio.Event()
    stop = asyncio.Event()

    async def read() -> None:
        batch: Batch
        async for batch in follow(
            bus, bus.subjects.events_stream, bus.subjects.all_events, wait_s=0.5, stop=stop
        ):
            seen.extend(batch.records)
            if batch.caught_up and len(seen) >= 3:
                caught_up.set()
            if len(seen) >= 5:
                return

    reader = asyncio.create_task(read())
    try:
        await asyncio.wait_for(caught_up.wait(), 15)
        assert [r.data for r in seen] == [b"0", b"1", b"2"]
        await asyncio.to_thread(nats_server.restart, kill=True)
        await bus.wait_reconnected(after=0, timeout=15)
        await _publish(bus, 2, 3)
        await asyncio.wait_for(reader, 30)
    finally:
        stop.set()
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    # Nothing skipped, nothing twice, in stream order.
    assert [r.data for r in seen] == [b"0", b"1", b"2", b"3", b"4"]
    assert [r.seq for r in seen] == [1, 2, 3, 4, 5]


async def test_last_message_of_a_subject(bus: Bus) -> None:
    assert await last_message(bus, bus.subjects.events_stream, "fleet.evt.test.none") is None
    await _publish(bus, 2, 0)
    await bus.js.publish("fleet.evt.test.e0", b"again", stream="FLEET_EVENTS")
    record = await last_message(bus, bus.subjects.events_stream, "fleet.evt.test.e0")
    assert record is not None
    assert (record.seq, record.data) == (3, b"again")
