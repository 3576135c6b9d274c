"""This agent's presence: a heartbeat in KV ``fleet-presence``, and its withdrawal.

The heartbeat goes out every ``heartbeat_s``, and at once when the update state shown in
it changes (see :class:`UpdateView`).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time

from agentd.context import AgentContext
from bus import FleetError, encode_model
from bus.tasks import wait_any
from schemas import Presence
from schemas.presence import AgentState

logger = logging.getLogger(__name__)


class UpdateView:
    """What the updater says about this agent, shown in its presence."""

    def __init__(self) -> None:
        self.state: AgentState = "ready"
        self.text: str | None = None
        self.changed = asyncio.Event()

    def show(self, state: AgentState, text: str | None) -> None:
        """The updater's ``show`` callback: a change triggers a heartbeat at once."""
        if (state, text) != (self.state, self.text):
            self.state, self.text = state, text
            self.changed.set()


class PresenceReporter:
    """Keeps this agent's presence key alive until told it is idle."""

    def __init__(self, ctx: AgentContext, update: UpdateView, version: str) -> None:
        self._ctx = ctx
        self._update = update
        self.version = version
        self.host = socket.gethostname()
        self.started_at = time.time_ns()
        self.idle = asyncio.Event()
        self.hub_lost = False
        """Whether the last heartbeat failed (the hub, or the link to it, is down)."""

    def presence(self) -> Presence:
        ctx = self._ctx
        return Presence(
            agent=ctx.id,
            version=self.version,
            host=self.host,
            labels=ctx.config.labels,
            state="draining" if ctx.stopping.is_set() else self._update.state,
            running=sorted(ctx.jobs),
            max_jobs=ctx.config.max_jobs,
            public_key=ctx.signer.public_key,
            started_at=self.started_at,
            ts=time.time_ns(),
            update=self._update.text,
        )

    async def heartbeat(self) -> None:
        """Beat until :attr:`idle` is set (the agent has drained its jobs)."""
        kv = await self._ctx.bus.kv(self._ctx.bus.subjects.presence_bucket)
        while not self.idle.is_set():
            try:
                await kv.put(self._ctx.id, encode_model(self.presence()))
            except FleetError as exc:
                self._lost(exc)
            else:
                self._reached()
            # Next beat after heartbeat_s, or at once when the update state changed.
            self._update.changed.clear()
            await wait_any(self.idle, self._update.changed, timeout=self._ctx.config.heartbeat_s)

    def _lost(self, exc: FleetError) -> None:
        if self.hub_lost:
            logger.debug("heartbeat: %s", exc)
            return
        self.hub_lost = True
        # Our connection may be up (to a leaf server) while its link to the hub is down:
        # jobs sent meanwhile are stored but not heard, so say so and catch up later.
        logger.warning("heartbeat: %s; the hub is unreachable", exc)

    def _reached(self) -> None:
        if not self.hub_lost:
            return
        self.hub_lost = False
        logger.warning("the hub was unreachable: catching up")
        self._ctx.hub_returned.set()
        self._ctx.slot_free.set()  # wakes the intake

    async def withdraw(self) -> None:
        """Delete the presence key (the master then sees the agent gone at once).

        Raises:
            FleetError: the bucket could not be reached.
        """
        kv = await self._ctx.bus.kv(self._ctx.bus.subjects.presence_bucket)
        await kv.delete(self._ctx.id)
