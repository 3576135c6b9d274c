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
import contextlib
import hashlib
import time

import nats.errors
import nats.js.errors

from bus.connection import Bus
from bus.errors import BundleError, ConnectionFailedError

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
        store = await bus.object_store(bucket)
        info = await store.get_info(name)
    except nats.js.errors.ObjectNotFoundError:
        raise BundleError(f"{name} is not in the object store {bucket}", "download") from None
    except (nats.errors.Error, OSError) as exc:
        raise ConnectionFailedError(f"object info of {name}: {exc}") from exc
    size = info.size or 0
    digest = hashlib.sha256()
    parts: list[bytes] = []
    received = 0
    begun = time.monotonic()
    if size:
        try:
            sub = await bus.js.subscribe(
                f"$O.{bucket}.C.{info.nuid}", stream=f"OBJ_{bucket}", ordered_consumer=True
            )
        except (nats.errors.Error, OSError) as exc:
            raise ConnectionFailedError(f"downloading {name}: {exc}") from exc
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=chunk_timeout_s)
                except (nats.errors.Error, OSError) as exc:
                    raise ConnectionFailedError(
                        f"downloading {name}: stalled at {received} of {size} bytes ({exc!r})"
                    ) from exc
                parts.append(msg.data)
                digest.update(msg.data)
                received += len(msg.data)
                if msg.metadata.num_pending == 0:
                    break
                if rate_bytes_s > 0:
                    ahead = received / rate_bytes_s - (time.monotonic() - begun)
                    if ahead > 0:
                        await asyncio.sleep(ahead)  # pacing to a rate, not a wait for an event
        finally:
            with contextlib.suppress(nats.errors.Error, OSError):
                await sub.unsubscribe()
    if received != size:
        raise ConnectionFailedError(f"downloading {name}: got {received} of {size} bytes")
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
