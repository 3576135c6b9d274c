"""The configured agents, recorded in the log: the config's registry is the wish, the log
says what was granted (``agent.registered`` / ``agent.deregistered``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from schemas import AgentDeregistered, AgentRegistered

if TYPE_CHECKING:
    from master.controller import Master


async def register_configured(master: Master) -> None:
    """Record in the log every change between the config's registry and the log's."""
    subjects = master.subjects
    for agent_id, principal in master.config.agents.items():
        view = master.projection.agents.get(agent_id)
        if (
            view
            and view.configured
            and view.public_key == principal.public_key
            and view.labels == principal.labels
        ):
            continue
        data = AgentRegistered(
            agent=agent_id, public_key=principal.public_key, labels=principal.labels
        )
        await master.emit(data, subjects.agent_event(agent_id, "registered"))
    for agent_id, view in list(master.projection.agents.items()):
        if view.configured and agent_id not in master.config.agents:
            await master.emit(
                AgentDeregistered(agent=agent_id), subjects.agent_event(agent_id, "deregistered")
            )
