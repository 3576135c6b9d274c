"""Storing and loading the master's snapshot in object store ``fleet-snapshots``.

The bytes are :mod:`ledger.snapshot`'s; a snapshot that cannot be read or used is
ignored with a warning: the log can always rebuild everything.
"""

from __future__ import annotations

import logging

import nats.errors
import nats.js.errors

from bus import Bus, FleetError
from ledger.chain import Chain
from ledger.projection import Projection
from ledger.snapshot import SNAPSHOT_OBJECT, Snapshot, decode_snapshot, encode_snapshot

logger = logging.getLogger(__name__)


async def save_snapshot(bus: Bus, projection: Projection, chain: Chain) -> None:
    """Store the projection as the newest snapshot."""
    store = await bus.object_store(bus.subjects.snapshots_bucket)
    try:
        await store.put(SNAPSHOT_OBJECT, encode_snapshot(projection, chain))
    except (nats.errors.Error, OSError) as exc:
        raise FleetError(f"cannot store a snapshot: {exc}") from exc
    logger.info("snapshot at seq %d (%d events)", projection.seq, projection.events)


async def load_snapshot(bus: Bus) -> Snapshot | None:
    """The newest snapshot, or None when there is none or it cannot be used."""
    store = await bus.object_store(bus.subjects.snapshots_bucket)
    try:
        result = await store.get(SNAPSHOT_OBJECT)
    except nats.js.errors.ObjectNotFoundError:
        return None
    except (nats.errors.Error, OSError) as exc:
        logger.warning("cannot read the snapshot (%s); replaying the whole log", exc)
        return None
    try:
        return decode_snapshot(result.data or b"")
    except ValueError as exc:
        logger.warning("ignoring the snapshot: %s; replaying the whole log", exc)
        return None
