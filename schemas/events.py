"""Typed event data, one model per event type.

Events are named in the past tense for what happened (``job.finished``). Each model says
its ``TYPE`` and current schema ``VERSION``; the registry in :mod:`schemas.registry`
maps an envelope's ``type`` to its model, which makes the set of models a union
discriminated by ``type``. Any change to a model's fields bumps its ``VERSION`` and adds
an upcaster from the old shape, so old logs stay readable.

Data never carries secrets: a credential sealed for an agent travels outside the log.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.fields import (
    AgentId,
    EventId,
    Labels,
    PrincipalId,
    PublicKey,
    Text,
    TimestampNs,
    Token,
    UserName,
)
from schemas.jobs import JobRequest

JobStatus = Literal[
    "succeeded", "failed", "timed_out", "cancelled", "expired", "rejected", "abandoned"
]
"""How a job ended; every job that was submitted ends in exactly one of these."""

TERMINAL_STATUSES: frozenset[str] = frozenset(JobStatus.__args__)  # type: ignore[attr-defined]

Version = Annotated[str, Field(min_length=1, max_length=64)]
Count = Annotated[int, Field(ge=0)]

MAX_OUTPUT_TAIL = 64 * 1024
"""Characters of output a job's outcome carries (the agent's ``output_tail_bytes`` is at
most 64 KiB); the whole output is in the output stream."""
MAX_CONFIG_KEYS = 256
MAX_CANARIES = 1024
MAX_SETTING_CHARS = 1024


class EventData(BaseModel):
    """Base of every event's ``data``. Subclasses set ``TYPE`` and ``VERSION``."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")
    TYPE: ClassVar[str]
    VERSION: ClassVar[int] = 1


# --- jobs: fleet.evt.job.<agent>.<job_id>.<event> -------------------------------------


class JobSubmitted(EventData):
    """An operator (or the master on a headless user's behalf) asked an agent to run a job."""

    TYPE = "job.submitted"
    job_id: EventId
    agent: AgentId
    request: JobRequest
    submitted_by: PrincipalId


class JobCancelRequested(EventData):
    """Someone asked for a job to stop; the agent answers with ``job.finished``."""

    TYPE = "job.cancel_requested"
    job_id: EventId
    agent: AgentId
    requested_by: PrincipalId
    reason: Text | None = None


class JobStarted(EventData):
    """The agent started the job's process."""

    TYPE = "job.started"
    job_id: EventId
    agent: AgentId
    pid: Annotated[int, Field(ge=1)]
    run_as: UserName | None = None
    effective_user: UserName


class _JobOutcome(EventData):
    """What is known of how a job ended: shared by the outcome and a late report of one."""

    job_id: EventId
    agent: AgentId
    status: JobStatus
    exit_code: int | None = None
    signal: int | None = None
    duration_s: Annotated[float, Field(ge=0)] | None = None
    stdout_bytes: Count = 0
    stderr_bytes: Count = 0
    output_tail: Annotated[str, Field(max_length=MAX_OUTPUT_TAIL)] = ""
    """The end of the output, at most 64 KiB characters."""
    output_chunks: Count = 0
    """How many chunks the agent stored in the output stream: a reader has all the
    output once it holds this many."""
    truncated: bool = False
    reason: Text | None = None


class JobFinished(_JobOutcome):
    """The job ended; ``status`` says how. The only terminal job event.

    Published on ``fleet.evt.job.<agent>.<job>.finished`` only if that subject holds
    nothing yet (``Nats-Expected-Last-Subject-Sequence: 0``), so the server, not luck,
    decides which of competing outcomes (the agent's result, the master's ``abandoned``
    or ``expired``, a cancel without the agent) is the one.
    """

    TYPE = "job.finished"


class JobLateResult(_JobOutcome):
    """An outcome that lost: another ``job.finished`` was already recorded for the job.

    Not terminal. It keeps what the loser knew (an agent that ran the job after the
    master had abandoned it reports its exit here), shown beside the recorded outcome.
    """

    TYPE = "job.late_result"


# --- agents: fleet.evt.agent.<agent>.<event> ------------------------------------------


class AgentRegistered(EventData):
    """An agent identity was added to the master's registry."""

    TYPE = "agent.registered"
    agent: AgentId
    public_key: PublicKey
    labels: Labels = {}


class AgentDeregistered(EventData):
    """An agent identity was removed from the master's registry."""

    TYPE = "agent.deregistered"
    agent: AgentId


class AgentOnline(EventData):
    """The agent's presence appeared."""

    TYPE = "agent.online"
    agent: AgentId
    version: Version
    host: str = Field(max_length=255)
    labels: Labels = {}


class AgentOffline(EventData):
    """The agent's presence went away (clean shutdown or expired heartbeat)."""

    TYPE = "agent.offline"
    agent: AgentId
    reason: Text
    last_seen: TimestampNs | None = None


class AgentConfigChanged(EventData):
    """The agent's configuration changed. Names only: values may be secret."""

    TYPE = "agent.config_changed"
    agent: AgentId
    keys: Annotated[list[Token], Field(max_length=MAX_CONFIG_KEYS)]
    """At most 256 key names."""
    changed_by: PrincipalId


class AgentUnsupported(EventData):
    """The agent runs a version other than the target and may not update itself."""

    TYPE = "agent.unsupported"
    agent: AgentId
    version: Version
    target: Version
    reason: Text


# --- updates: fleet.evt.update.<version>[.<agent>].<event> ----------------------------


class UpdatePublished(EventData):
    """A signed bundle was stored in the object store."""

    TYPE = "update.published"
    version: Version
    object_name: str = Field(max_length=255)
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    size: Count
    release_key: PublicKey


class UpdateAnnounced(EventData):
    """A version became the fleet's target."""

    TYPE = "update.announced"
    version: Version
    canary: Count = 0
    max_failures: Count = 0
    canaries: Annotated[list[AgentId], Field(max_length=MAX_CANARIES)] = []
    """The agents that update first (at most 1024); the rest wait until these are healthy."""


class UpdateTokenAcquired(EventData):
    """An agent took a download slot."""

    TYPE = "update.token_acquired"
    version: Version
    agent: AgentId
    slot: Count


class UpdateTokenReleased(EventData):
    """An agent gave its download slot back."""

    TYPE = "update.token_released"
    version: Version
    agent: AgentId
    slot: Count


class UpdateApplied(EventData):
    """An agent switched to the new version and reported healthy."""

    TYPE = "update.applied"
    version: Version
    agent: AgentId
    previous: Version


class UpdateFailed(EventData):
    """An agent could not apply the version; it keeps the one it has."""

    TYPE = "update.failed"
    version: Version
    agent: AgentId
    stage: Literal["download", "verify", "install", "switch", "health"]
    reason: Text


class UpdateRolledBack(EventData):
    """The new version did not become healthy; the previous one was restored."""

    TYPE = "update.rolled_back"
    version: Version
    agent: AgentId
    restored: Version
    reason: Text


class UpdateRolloutHalted(EventData):
    """Failures exceeded the rollout's limit; no further agent starts updating."""

    TYPE = "update.rollout_halted"
    version: Version
    failures: Count
    max_failures: Count
    reason: Text


# --- settings: fleet.evt.settings.<event> ---------------------------------------------


class SettingsChanged(EventData):
    """A fleet-wide setting in KV ``fleet-config`` changed (pause, disable, stage …).

    The KV bucket is what agents act on; this event is the audit trail of who set what.
    """

    TYPE = "settings.changed"
    key: Annotated[str, Field(pattern=r"^[a-z_]+\.[a-z_]+$")]
    value: Annotated[str, Field(max_length=MAX_SETTING_CHARS)] | int | float | bool | None
    """At most 1024 characters when a string."""
    changed_by: PrincipalId
    version: Version | None = None
    """The release the change concerns, when it concerns one (stage, resume)."""


# --- audit: fleet.evt.audit.<event> ----------------------------------------------------


class AuditCheckpoint(EventData):
    """The master's running hash of the log so far, for tamper evidence.

    ``chain`` is the hash after the first ``count`` events of the log (checkpoints
    included), through stream sequence ``through_seq``; see :mod:`master.chain`.
    """

    TYPE = "audit.checkpoint"
    count: Count
    through_seq: Count
    last_id: EventId | None = None
    chain: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class AuthDenied(EventData):
    """A headless login failed. Says nothing about whether the user exists."""

    TYPE = "auth.denied"
    user: UserName
    reason: Text


JOB_EVENTS: tuple[type[EventData], ...] = (
    JobSubmitted,
    JobCancelRequested,
    JobStarted,
    JobFinished,
    JobLateResult,
)
AGENT_EVENTS: tuple[type[EventData], ...] = (
    AgentRegistered,
    AgentDeregistered,
    AgentOnline,
    AgentOffline,
    AgentConfigChanged,
    AgentUnsupported,
)
UPDATE_EVENTS: tuple[type[EventData], ...] = (
    UpdatePublished,
    UpdateAnnounced,
    UpdateTokenAcquired,
    UpdateTokenReleased,
    UpdateApplied,
    UpdateFailed,
    UpdateRolledBack,
    UpdateRolloutHalted,
)
AUDIT_EVENTS: tuple[type[EventData], ...] = (AuditCheckpoint, AuthDenied)
SETTINGS_EVENTS: tuple[type[EventData], ...] = (SettingsChanged,)
ALL_EVENTS: tuple[type[EventData], ...] = (
    JOB_EVENTS + AGENT_EVENTS + UPDATE_EVENTS + SETTINGS_EVENTS + AUDIT_EVENTS
)

AnyEventData = (
    JobSubmitted
    | JobCancelRequested
    | JobStarted
    | JobFinished
    | JobLateResult
    | AgentRegistered
    | AgentDeregistered
    | AgentOnline
    | AgentOffline
    | AgentConfigChanged
    | AgentUnsupported
    | UpdatePublished
    | UpdateAnnounced
    | UpdateTokenAcquired
    | UpdateTokenReleased
    | UpdateApplied
    | UpdateFailed
    | UpdateRolledBack
    | UpdateRolloutHalted
    | SettingsChanged
    | AuditCheckpoint
    | AuthDenied
)
"""Every known event's data, for exhaustive ``match`` statements."""


def event_name(event_type: str) -> str:
    """The last dotted part of a type (``job.finished`` → ``finished``): the subject's tail."""
    return event_type.rsplit(".", 1)[-1]
