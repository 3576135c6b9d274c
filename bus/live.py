"""Hearing what is published on a few subjects, as it happens (core NATS).

What JetStream stores is also delivered to plain subscribers of its subject, so an agent
hears its jobs the moment they are submitted without a consumer of its own on the
server. Core NATS delivers at most once, and not while disconnected: a hint, never the
record. What is heard must be read back from the log (:func:`bus.log.last_message`) and
what was missed is found by catching up (:mod:`bus.catchup`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from bus.connection import Bus
from bus.errors import ConnectionFailedError

logger = logging.getLogger(__name__)

_CHECK_S = 2


class LiveSubscription:
    """The subjects of messages published on ``subjects``, in the order heard."""

    def __init__(self, bus: Bus, subjects: list[str]) -> None:
        self._bus = bus
        self.subjects = subjects
        self._heard: asyncio.Queue[str] = asyncio.Queue()
        self._subs: list[Subscription] = []

    async def open(self) -> None:
        """Subscribe, and make sure the server took the subscriptions.

        Raises:
            PermissionDeniedError: the server refused one of the subjects to us.
            ConnectionFailedError: the bus is away.
        """
        try:
            for subject in self.subjects:
                self._subs.append(await self._bus.nc.subscribe(subject, cb=self._on_msg))
            await self._bus.nc.flush(timeout=_CHECK_S)
        except (nats.errors.Error, OSError) as exc:
            await self.close()
            raise ConnectionFailedError(f"cannot subscribe to {self.subjects}: {exc}") from exc
        for subject in self.subjects:
            denial = self._bus.denial(subject)
            if denial is not None:
                await self.close()
                raise denial

    async def _on_msg(self, msg: Msg) -> None:
        self._heard.put_nowait(msg.subject)

    async def next(self) -> str:
        """The subject of the next message heard (waiting for one)."""
        return await self._heard.get()

    async def close(self) -> None:
        subs, self._subs = self._subs, []
        for sub in subs:
            with contextlib.suppress(nats.errors.Error, OSError):
                await sub.unsubscribe()
