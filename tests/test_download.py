"""``updater.download`` against a real nats-server object store."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os

import pytest
from natsserver import NatsServer

from bus import Bus
from bus.errors import BundleError, ConnectionFailedError
from updater.download import download, store_digest

# Larger than the object store's 128 KiB chunks, so the reader meets several.
BIG = os.urandom(300 * 1024 + 17)


async def store(bus: Bus, name: str, data: bytes) -> None:
    bundles = await bus.objects(bus.subjects.bundles_bucket)
    await bundles.put(name, data)


async def test_a_stored_object_comes_back_whole_and_checked(bus: Bus) -> None:
    await store(bus, "fleetbus-1.0.bundle", BIG)
    got = await download(bus, "fleetbus-1.0.bundle", hashlib.sha256(BIG).hexdigest())
    assert got == BIG


async def test_an_empty_object_is_an_empty_download(bus: Bus) -> None:
    await store(bus, "empty.bundle", b"")
    assert await download(bus, "empty.bundle", hashlib.sha256(b"").hexdigest()) == b""


async def test_a_rate_limit_still_returns_every_byte(bus: Bus) -> None:
    data = BIG[: 200 * 1024]
    await store(bus, "paced.bundle", data)
    sha = hashlib.sha256(data).hexdigest()
    # 4 MB/s: paced (it sleeps between chunks), without making the test slow.
    assert await download(bus, "paced.bundle", sha, rate_bytes_s=4_000_000) == data


async def test_a_missing_object_is_a_download_failure(bus: Bus) -> None:
    with pytest.raises(BundleError) as info:
        await download(bus, "fleetbus-9.9.bundle", "0" * 64)
    assert info.value.stage == "download"
    assert "fleetbus-9.9.bundle is not in the object store" in str(info.value)


async def test_an_object_that_is_not_the_announced_one_is_refused(bus: Bus) -> None:
    await store(bus, "swapped.bundle", BIG)
    announced = hashlib.sha256(b"what the release announced").hexdigest()
    with pytest.raises(BundleError) as info:
        await download(bus, "swapped.bundle", announced)
    assert info.value.stage == "download"
    assert "not the announced" in str(info.value)


async def test_a_server_that_is_gone_is_a_connection_failure(
    bus: Bus, nats_server: NatsServer
) -> None:
    await store(bus, "unreachable.bundle", BIG)
    nats_server.stop()
    async with asyncio.timeout(60):  # the bound catches a hang; it is not a speed test
        with pytest.raises(ConnectionFailedError):
            await download(
                bus,
                "unreachable.bundle",
                hashlib.sha256(BIG).hexdigest(),
                chunk_timeout_s=2.0,
            )


def test_store_digests_decode_padded_or_not() -> None:
    raw = hashlib.sha256(b"x").digest()
    text = base64.urlsafe_b64encode(raw).decode()
    assert store_digest(f"SHA-256={text}") == raw
    assert store_digest(f"SHA-256={text.rstrip('=')}") == raw
    assert store_digest("SHA-256=*not base64*") is None
