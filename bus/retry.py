"""The one backoff: exponential, capped, with full jitter where many clients retry at once.

Every retry loop in fleetbus (reconnects, publishes, control requests, downloads, lease
renewals) takes its pauses from a :class:`Backoff`, so the contract's "1 s, 2 s, 4 s …
capped at 60 s" is written once. Full jitter (uniform in ``[0, d]``) keeps a fleet that
lost the same server from returning in lock step; a single caller with nobody to collide
with (an operator's command) may ask for the plain sequence.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")

logger = logging.getLogger(__name__)

CONTROL_BACKOFF_CAP_S = 60.0
"""The contract's cap for control requests and other operator-visible retries."""


@dataclass(frozen=True)
class Backoff:
    """Pauses between tries: ``initial · 2^attempt``, never above ``cap``.

    Attributes:
        initial: the first pause, in seconds.
        cap: the longest pause.
        jitter: draw each pause uniformly from ``[0, pause]`` (full jitter).
    """

    initial: float = 1.0
    cap: float = CONTROL_BACKOFF_CAP_S
    jitter: bool = True
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def ceiling(self, attempt: int) -> float:
        """The pause after try number ``attempt`` (0-based) before jitter."""
        return min(self.cap, math.ldexp(self.initial, min(max(attempt, 0), 30)))

    def delay(self, attempt: int) -> float:
        """The pause after try number ``attempt`` (0-based)."""
        ceiling = self.ceiling(attempt)
        return self.rng.uniform(0, ceiling) if self.jitter else ceiling

    def delays(self, count: int | None = None) -> Iterator[float]:
        """The first ``count`` pauses (all of them, forever, when None)."""
        attempt = 0
        while count is None or attempt < count:
            yield self.delay(attempt)
            attempt += 1


async def retry(
    operation: Callable[[], Awaitable[T]],
    *,
    retry_on: tuple[type[BaseException], ...],
    backoff: Backoff,
    attempts: int | None = None,
    deadline_s: float | None = None,
    what: str = "operation",
) -> T:
    """Call ``operation`` until it succeeds, pausing per ``backoff`` after each failure.

    Only exceptions in ``retry_on`` are retried; anything else propagates at once. The
    last failure propagates when ``attempts`` tries are used or the next pause would pass
    ``deadline_s`` (measured from the first call).
    """
    loop = asyncio.get_running_loop()
    give_up_at = None if deadline_s is None else loop.time() + deadline_s
    attempt = 0
    while True:
        try:
            return await operation()
        except retry_on as exc:
            delay = backoff.delay(attempt)
            attempt += 1
            out_of_tries = attempts is not None and attempt >= attempts
            out_of_time = give_up_at is not None and loop.time() + delay >= give_up_at
            if out_of_tries or out_of_time:
                raise
            logger.info("↻ %s: %s; again in %.2fs", what, exc or type(exc).__name__, delay)
            await asyncio.sleep(delay)  # a pause between tries, not a wait for an event
