"""The running hash of the event log: tamper evidence beyond signatures.

``h₀`` is 32 zero bytes; for the n-th event of the log (checkpoints included),
``hₙ = sha256(hₙ₋₁ ‖ sha256(raw bytes of the event))``. It covers what was stored, in
order, and nothing about where: a faithful copy of the stream verifies, a copy missing,
altering or reordering one event does not. The master publishes ``audit.checkpoint``
events carrying ``(count, chain)``; ``fleet audit --verify`` recomputes and compares.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

CHECKPOINT_KEY = "audit.checkpoint"
"""Key in KV ``fleet-config`` where the master keeps its newest checkpoint outside the log,
so ``fleet audit`` can tell a log that was cut short."""

_GENESIS = bytes(32)
_REMEMBERED = 100_000


class Chain:
    """The chain's current value, and recent values by count for checking checkpoints."""

    def __init__(self, count: int = 0, value: bytes = _GENESIS) -> None:
        self.count = count
        self.value = value
        self._history: OrderedDict[int, bytes] = OrderedDict({count: value})

    def add(self, raw: bytes) -> bytes:
        """Extend the chain by one stored event's bytes; returns the new value."""
        self.value = hashlib.sha256(self.value + hashlib.sha256(raw).digest()).digest()
        self.count += 1
        self._history[self.count] = self.value
        if len(self._history) > _REMEMBERED:
            self._history.popitem(last=False)
        return self.value

    @property
    def hex(self) -> str:
        return self.value.hex()

    def at(self, count: int) -> bytes | None:
        """The value after ``count`` events, if still remembered."""
        return self._history.get(count)
