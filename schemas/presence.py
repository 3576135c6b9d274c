"""Presence: what an agent says about itself in KV ``fleet-presence`` every few seconds."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.fields import AgentId, EventId, Labels, PublicKey, TimestampNs

PRESENCE_VERSION = 1

AgentState = Literal["ready", "draining", "updating", "unsupported"]


class Presence(BaseModel):
    """One agent's heartbeat. The KV entry's TTL, not this model, decides when it is gone."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")
    v: int = PRESENCE_VERSION
    agent: AgentId
    version: str = Field(max_length=64)
    host: str = Field(max_length=255)
    labels: Labels = {}
    state: AgentState = "ready"
    running: Annotated[list[EventId], Field(max_length=4096)] = []
    max_jobs: int = Field(ge=1)
    public_key: PublicKey | None = None
    """The agent's nkey: what operators seal run-as passwords to."""
    started_at: TimestampNs
    ts: TimestampNs
    update: str | None = Field(default=None, max_length=512)
    """What stands between this agent and the fleet's target version, if anything."""


MasterRole = Literal["active", "standby"]


class MasterPresence(BaseModel):
    """One master's heartbeat in KV ``<prefix>-locks`` (``master.presence.<name>``): which
    master it is, whether it is the active one, and how far it has folded the log."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")
    v: int = PRESENCE_VERSION
    name: str = Field(max_length=64)
    role: MasterRole
    seq: int = Field(ge=0)
    """The last log sequence it has folded."""
    ready: bool
    """Caught up with the log (a standby that is ready can take over at once)."""
    version: str = Field(max_length=64)
    host: str = Field(max_length=255)
    pid: int = Field(ge=0)
    config_hash: str = Field(max_length=64)
    started_at: TimestampNs
    ts: TimestampNs
