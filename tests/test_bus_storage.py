"""The bus's KV and object-store handles: fleetbus types and errors only."""

from __future__ import annotations

import asyncio
import hashlib

import pytest
from natsserver import NatsServer

from bus import Bus, ConnectionFailedError, FleetTimeoutError
from bus.errors import KeyExistsError, RevisionMismatchError


async def test_kv_reads_writes_and_conditional_writes(bus: Bus) -> None:
    kv = await bus.kv(bus.subjects.config_bucket)
    assert await kv.get("nothing.here") is None
    first = await kv.create("test.key", b"one")
    with pytest.raises(KeyExistsError):
        await kv.create("test.key", b"two")
    second = await kv.update("test.key", b"two", last=first)
    with pytest.raises(RevisionMismatchError):
        await kv.update("test.key", b"three", last=first)
    entry = await kv.get("test.key")
    assert entry is not None
    assert (entry.value, entry.revision) == (b"two", second)
    assert "test.key" in await kv.keys()
    await kv.delete("test.key")
    assert await kv.get("test.key") is None
    assert "test.key" not in await kv.keys()


async def test_kv_watch_sees_current_values_then_changes(bus: Bus) -> None:
    kv = await bus.kv(bus.subjects.presence_bucket)
    assert await kv.keys() == []  # an empty bucket lists no keys, not an error
    await kv.put("web-1", b"up")
    async with kv.watch() as changes:
        seen = [await anext(changes), await anext(changes)]
        assert seen[0] is not None
        assert (seen[0].key, seen[0].value) == ("web-1", b"up")
        assert seen[1] is None  # caught up
        await kv.delete("web-1")
        async with asyncio.timeout(10):
            gone = await anext(changes)
        assert gone is not None
        assert gone.key == "web-1"
        assert gone.deleted


async def test_objects_round_trip_and_read_in_chunks(bus: Bus) -> None:
    store = await bus.objects(bus.subjects.bundles_bucket)
    assert await store.info("missing") is None
    assert await store.get("missing") is None
    data = bytes(range(256)) * 2048  # 512 KiB: several chunks
    info = await store.put("blob", data, description="test")
    assert info.size == len(data)
    assert await store.get("blob") == data
    got = await store.info("blob")
    assert got is not None
    assert got.nuid == info.nuid
    read = b"".join([c async for c in store.chunks(got, chunk_timeout_s=5)])
    assert hashlib.sha256(read).digest() == hashlib.sha256(data).digest()
    assert [i.name for i in await store.list()] == ["blob"]
    await store.delete("blob")
    assert await store.info("blob") is None


async def test_storage_errors_are_fleetbus_errors_when_the_server_is_gone(
    nats_server: NatsServer, bus: Bus
) -> None:
    kv = await bus.kv(bus.subjects.config_bucket)
    await asyncio.to_thread(nats_server.stop)
    # While reconnecting nats-py buffers the request: a timeout, not a lost connection.
    with pytest.raises((ConnectionFailedError, FleetTimeoutError)):
        await kv.put("k", b"v")
