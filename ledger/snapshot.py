"""Snapshots of a fold: the projection's state and the chain, as bytes and back.

A snapshot is the projection's state, the stream sequence it covers and the chain at
that point, so a master restarts by loading it and replaying only the tail. A snapshot
that does not decode, or is of a version newer than this code, is refused with
``ValueError``: the log can always rebuild everything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bus import BadMessageError
from bus.codec import pack, unpack
from ledger.chain import Chain
from ledger.projection import Projection

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
