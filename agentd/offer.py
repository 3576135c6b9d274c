"""One job or cancel of this agent's, as the log stored it, and how the agent settles it.

What a durable consumer's delivery was before (ack, nak, term) is the agent's own now:
settling an offer lets the catch-up cursor (:mod:`agentd.cursor`) pass it; leaving it
queued (``nak``) offers it again after a pause, from the agent's own timer. The journal
stays the truth about what was taken.
"""

from __future__ import annotations

from collections.abc import Callable

from bus.log import LogRecord


class Offer:
    """A stored message on one of this agent's subjects. Settle it with exactly one of
    :meth:`ack`, :meth:`nak` or :meth:`term`."""

    def __init__(
        self,
        record: LogRecord,
        *,
        on_settled: Callable[[Offer], None],
        on_requeue: Callable[[Offer, float], None],
    ) -> None:
        self.subject = record.subject
        self.data = record.data
        self.stream_seq = record.seq
        self.stored_ns = record.stored_ns
        self.delivered = 1
        """How many times it was offered (a job left queued is offered again)."""
        self._on_settled = on_settled
        self._on_requeue = on_requeue
        self.settled = False

    def _settle(self) -> None:
        if not self.settled:
            self.settled = True
            self._on_settled(self)

    async def ack(self) -> None:
        """Done with it: taken, finished or refused; never offer it again."""
        self._settle()

    async def term(self) -> None:
        """It cannot be processed (malformed): never offer it again."""
        self._settle()

    async def nak(self, delay_s: float = 0.0) -> None:
        """Not now: offer it again after ``delay_s`` seconds."""
        if not self.settled:
            self.delivered += 1
            self._on_requeue(self, delay_s)
