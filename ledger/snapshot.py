"""Snapshots of a fold: the projection's state and the chain, as bytes and in the store.

A snapshot is the projection's state, the stream sequence it covers and the chain at
that point, so a master restarts by loading it and replaying only the tail; ``fleet
replay --verify`` compares it with its own fold. It is kept as one object in the object
store ``fleet-snapshots``. A snapshot that cannot be read, does not decode, or is of a
version newer than this code is ignored with a warning: the log can always rebuild
everything.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bus import BadMessageError, Bus, FleetError
from bus.codec import pack, unpack
from ledger.chain import Chain
from ledger.projection import Projection

logger = logging.getLogger(__name__)

SNAPSHOT_OBJECT = "projection"
"""The object's name in the snapshots bucket."""
SNAPSHOT_VERSION = 1
_MAX_SNAPSHOT = 2**31

UPCASTERS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}
"""``UPCASTERS[n]`` turns a version-n snapshot into version n+1 (none needed yet)."""


@dataclass
class Snapshot:
    """A fold at a point of the log."""

    projection: Projection
    chain: Chain

    @property
    def seq(self) -> int:
        return self.projection.seq


def encode_snapshot(projection: Projection, chain: Chain) -> bytes:
    """The bytes of a snapshot of ``projection`` and ``chain``."""
    return pack(
        {
            "v": SNAPSHOT_VERSION,
            "state": projection.to_state(),
            "chain_count": chain.count,
            "chain": chain.value,
        },
        max_size=_MAX_SNAPSHOT,
    )


def decode_snapshot(data: bytes) -> Snapshot:
    """Decode, upcasting older versions.

    Raises:
        ValueError: not a snapshot, or a newer version than this code knows.
    """
    try:
        doc = unpack(data, max_size=_MAX_SNAPSHOT, check_depth=False)
    except BadMessageError as exc:
        raise ValueError(str(exc)) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("v"), int):
        raise ValueError("not a snapshot")
    if doc["v"] > SNAPSHOT_VERSION:
        raise ValueError(f"snapshot v{doc['v']} is newer than this master (v{SNAPSHOT_VERSION})")
    for version in range(doc["v"], SNAPSHOT_VERSION):
        doc = UPCASTERS[version](doc)
    chain_value = doc.get("chain")
    if not isinstance(chain_value, bytes) or len(chain_value) != 32:
        raise ValueError("snapshot has no chain value")
    projection = Projection.from_state(doc["state"])
    return Snapshot(projection, Chain(int(doc["chain_count"]), chain_value))


async def save_snapshot(bus: Bus, projection: Projection, chain: Chain) -> None:
    """Store the projection as the newest snapshot.

    Raises:
        FleetError: the store refused or could not be reached.
    """
    data = encode_snapshot(projection, chain)  # now, before the fold moves on
    store = await bus.objects(bus.subjects.snapshots_bucket)
    await store.put(SNAPSHOT_OBJECT, data)
    logger.info("snapshot at seq %d (%d events)", projection.seq, projection.events)


async def load_snapshot(bus: Bus) -> Snapshot | None:
    """The newest snapshot, or None when there is none or it cannot be used."""
    try:
        store = await bus.objects(bus.subjects.snapshots_bucket)
        data = await store.get(SNAPSHOT_OBJECT)
    except FleetError as exc:
        logger.warning("cannot read the snapshot (%s); replaying the whole log", exc)
        return None
    if data is None:
        return None
    try:
        return decode_snapshot(data)
    except ValueError as exc:
        logger.warning("ignoring the snapshot: %s; replaying the whole log", exc)
        return None
