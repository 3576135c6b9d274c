"""Answering requests: a subscription read as a stream of :class:`Request` in a task.

A service reads its requests in a loop it owns (``async for request in requests``) and
answers each with :meth:`Requests.respond`, so its handling runs in the service's own
task, not in a nats-py callback, and only fleetbus errors come out.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import nats.errors
from nats.aio.subscription import Subscription

from bus.connection import Bus
from bus.errors import ConnectionFailedError, FleetError

_NATS_ERRORS = (nats.errors.Error, OSError)


@dataclass(frozen=True, slots=True)
class Request:
    """One request: where it was sent, its body, and where the answer goes ("" for none)."""

    subject: str
    data: bytes
    reply: str

    @property
    def op(self) -> str:
        """The subject's last token (``fleet.ctl.master.<op>``)."""
        return self.subject.rsplit(".", 1)[-1]


class Requests:
    """The requests sent to one subject (wildcards allowed), in arrival order."""

    def __init__(self, bus: Bus, subject: str, sub: Subscription) -> None:
        self._bus = bus
        self.subject = subject
        self._sub = sub

    @classmethod
    async def open(cls, bus: Bus, subject: str) -> Requests:
        """Subscribe to ``subject``.

        Raises:
            ConnectionFailedError: the bus is down.
        """
        try:
            sub = await bus.nc.subscribe(subject)
        except _NATS_ERRORS as exc:
            raise ConnectionFailedError(f"cannot serve {subject}: {exc}") from exc
        return cls(bus, subject, sub)

    async def __aiter__(self) -> AsyncIterator[Request]:
        try:
            async for msg in self._sub.messages:
                yield Request(msg.subject, msg.data, msg.reply or "")
        except _NATS_ERRORS as exc:
            raise ConnectionFailedError(f"serving {self.subject}: {exc}") from exc

    async def respond(self, request: Request, data: bytes) -> None:
        """Answer ``request`` (nothing happens if it asked for no answer).

        Raises:
            FleetError: the answer could not be sent.
        """
        if not request.reply:
            return
        try:
            await self._bus.nc.publish(request.reply, data)
        except _NATS_ERRORS as exc:
            raise FleetError(f"cannot answer on {request.subject}: {exc}") from exc

    async def close(self) -> None:
        """Stop receiving; the iteration ends."""
        with contextlib.suppress(*_NATS_ERRORS):
            await self._sub.unsubscribe()

    async def __aenter__(self) -> Requests:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
