"""Shapes of everything that crosses the bus: events, the envelope, jobs, presence.

This package imports only pydantic and the standard library; it knows nothing of NATS.
"""

from schemas.control import ControlReply, ControlRequest
from schemas.envelope import Envelope, Event, EventType, Subject, UnknownEvent, make_envelope
from schemas.events import (
    ALL_EVENTS,
    TERMINAL_STATUSES,
    AgentConfigChanged,
    AgentOffline,
    AgentOnline,
    AgentRegistered,
    AgentUnsupported,
    AnyEventData,
    EventData,
    JobCancelRequested,
    JobFinished,
    JobStarted,
    JobStatus,
    JobSubmitted,
    UpdateAnnounced,
    UpdateApplied,
    UpdateFailed,
    UpdatePublished,
    UpdateRolledBack,
    UpdateRolloutHalted,
    UpdateTokenAcquired,
    UpdateTokenReleased,
    event_name,
)
from schemas.ids import new_id
from schemas.jobs import ArgvCommand, Command, JobRequest, ModuleCommand, ScriptCommand
from schemas.presence import Presence
from schemas.registry import EventRegistry, InvalidEventError, Upcaster, default_registry

__all__ = [
    "ALL_EVENTS",
    "TERMINAL_STATUSES",
    "AgentConfigChanged",
    "AgentOffline",
    "AgentOnline",
    "AgentRegistered",
    "AgentUnsupported",
    "AnyEventData",
    "ArgvCommand",
    "Command",
    "ControlReply",
    "ControlRequest",
    "Envelope",
    "Event",
    "EventData",
    "EventRegistry",
    "EventType",
    "InvalidEventError",
    "JobCancelRequested",
    "JobFinished",
    "JobRequest",
    "JobStarted",
    "JobStatus",
    "JobSubmitted",
    "ModuleCommand",
    "Presence",
    "ScriptCommand",
    "Subject",
    "UnknownEvent",
    "Upcaster",
    "UpdateAnnounced",
    "UpdateApplied",
    "UpdateFailed",
    "UpdatePublished",
    "UpdateRolledBack",
    "UpdateRolloutHalted",
    "UpdateTokenAcquired",
    "UpdateTokenReleased",
    "default_registry",
    "event_name",
    "make_envelope",
    "new_id",
]
