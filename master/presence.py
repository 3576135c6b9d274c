"""Who is connected: the master watches KV ``fleet-presence``.

An agent's heartbeat is a key with a TTL. A key that expires (a purge) means the agent
went away without saying so: the master records it offline and, if it was running jobs,
records them ``abandoned`` once the agent has stayed away for ``offline_grace_s`` (a
grace timer, owned by the master, cancelled when a heartbeat returns). A delete is a
clean shutdown: the agent recorded itself offline and its jobs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, TypeVar

from bus import FleetError
from bus.tasks import first_of
from schemas import AgentOffline

if TYPE_CHECKING:
    from master.controller import Master

logger = logging.getLogger(__name__)

T = TypeVar("T")


async def until_stopped(master: Master, items: AsyncIterator[T]) -> AsyncIterator[T]:
    """``items`` until they end or the master stops acting, whichever comes first.

    The stop flag ends the loop even if a cancellation is lost inside the client
    library (on Python 3.11 its ``wait_for`` can swallow one).
    """
    while not master.off_duty.is_set():
        step = await first_of(anext(items), master.off_duty.wait())
        if step is None or master.off_duty.is_set():
            return
        try:
            yield step.result()
        except StopAsyncIteration:
            return


class GraceTimers:
    """One timer per agent that went away with jobs running."""

    def __init__(self, master: Master) -> None:
        self.master = master
        self._timers: dict[str, asyncio.Task[None]] = {}

    def start(self, agent_id: str) -> None:
        if agent_id not in self._timers:
            self._timers[agent_id] = self.master.tasks.spawn(
                self._abandon_after_grace(agent_id), f"grace {agent_id}"
            )

    def cancel_all(self) -> None:
        """This master no longer acts: the next active one runs its own timers (its
        sweep sees how long each agent has been away)."""
        for agent_id in list(self._timers):
            self.cancel(agent_id)

    def cancel(self, agent_id: str) -> None:
        """The agent is back: its jobs are its own again (the owner awaits the timer)."""
        timer = self._timers.pop(agent_id, None)
        if timer is not None:
            timer.cancel()

    async def _abandon_after_grace(self, agent_id: str) -> None:
        master = self.master
        await asyncio.sleep(master.config.offline_grace_s)  # the grace itself, not a poll
        self._timers.pop(agent_id, None)
        try:
            await master.outcomes.abandon(master.projection, agent_id)
        except FleetError as exc:
            logger.error("! cannot record %s's jobs abandoned: %s", agent_id, exc)


async def watch_presence(master: Master, timers: GraceTimers) -> None:
    """Follow presence until the master stops (or the bus fails the watch)."""
    kv = await master.bus.kv(master.subjects.presence_bucket)
    initial: set[str] = set()
    caught_up = False
    async with kv.watch() as updates:
        async for entry in until_stopped(master, updates):
            if entry is None:
                caught_up = True
                # Online in the log, but no heartbeat now: expired while we were away.
                for agent_id, view in list(master.projection.agents.items()):
                    if view.online and agent_id not in initial:
                        await went_away(
                            master, timers, agent_id, "heartbeat expired while the master was down"
                        )
                continue
            if not entry.deleted and entry.value:
                if not caught_up:
                    initial.add(entry.key)
                timers.cancel(entry.key)
            elif entry.purged:
                await went_away(master, timers, entry.key, "heartbeat expired")


async def went_away(master: Master, timers: GraceTimers, agent_id: str, reason: str) -> None:
    """Record an agent offline and start its grace timer if it was running jobs."""
    view = master.projection.agents.get(agent_id)
    if view is None or not view.online:
        return
    try:
        await master.emit(
            AgentOffline(agent=agent_id, reason=reason, last_seen=view.last_seen),
            master.subjects.agent_event(agent_id, "offline"),
        )
    except FleetError as exc:
        logger.error("! cannot record %s offline: %s", agent_id, exc)
    if view.running:
        timers.start(agent_id)
