"""Fetching a bundle from the object store, chunk by chunk, with a deadline per chunk.

nats-py's ``ObjectStore.get`` waits forever when the server goes away mid-transfer and
cannot limit its rate. This reader gives up after ``chunk_timeout_s`` without a chunk
(the caller retries from the start), optionally paces itself to ``rate_bytes_s`` so an
update never saturates a site's link, and returns only a complete object whose size and
SHA-256 match both the store's record and the announcement: a partial download is never
returned.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time

from bus.connection import Bus
from bus.errors import BundleError, ConnectionFailedError, FleetError

_DIGEST_PREFIX = "SHA-256="


async def download(
    bus: Bus,
    name: str,
    expected_sha256: str,
    *,
    rate_bytes_s: int = 0,
    chunk_timeout_s: float = 10.0,
) -> bytes:
    """The object ``name`` of the bundles bucket, checked against ``expected_sha256``.

    Raises:
        ConnectionFailedError: the server went away or stalled; try again later.
        BundleError: (stage ``download``) the object is missing, or complete but not the
            announced one.
    """
    bucket = bus.subjects.bundles_bucket
    try:
        store = await bus.objects(bucket)
        info = await store.info(name)
    except FleetError as exc:
        raise ConnectionFailedError(f"object info of {name}: {exc}") from exc
    if info is None:
        raise BundleError(f"{name} is not in the object store {bucket}", "download")
    digest = hashlib.sha256()
    parts: list[bytes] = []
    received = 0
    begun = time.monotonic()
    try:
        async for chunk in store.chunks(info, chunk_timeout_s=chunk_timeout_s):
            parts.append(chunk)
            digest.update(chunk)
            received += len(chunk)
            if rate_bytes_s > 0:
                ahead = received / rate_bytes_s - (time.monotonic() - begun)
                if ahead > 0:
                    await asyncio.sleep(ahead)  # pacing to a rate, not a wait for an event
    except FleetError as exc:
        raise ConnectionFailedError(f"downloading {name}: {exc}") from exc
    if received != info.size:
        raise ConnectionFailedError(f"downloading {name}: got {received} of {info.size} bytes")
    if info.digest and store_digest(info.digest) != digest.digest():
        raise BundleError(f"{name} does not match the object store's digest", "download")
    if digest.hexdigest() != expected_sha256:
        raise BundleError(
            f"{name} has SHA-256 {digest.hexdigest()[:16]}…, not the announced "
            f"{expected_sha256[:16]}…",
            "download",
        )
    return b"".join(parts)


def store_digest(text: str) -> bytes | None:
    """The bytes of an object store digest (``SHA-256=<base64url>``, padded or not)."""
    value = text.split("=", 1)[1] if text.upper().startswith(_DIGEST_PREFIX) else text
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except ValueError:
        return None
