"""The event envelope: the signed, versioned wrapper every event travels in.

``Envelope`` is the wire shape: what is encoded, what the signature covers (everything
but ``sig``), what `fleet audit` prints. ``data`` stays a plain mapping here, exactly as
received, so a signature can be checked over the bytes the producer signed before any
model reshapes them. :mod:`schemas.registry` turns it into a typed :class:`Event`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from schemas.events import EventData
from schemas.fields import EventId, PrincipalId, PublicKey, TimestampNs
from schemas.ids import new_id

EventType = Annotated[str, Field(max_length=64, pattern=r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")]
"""``<domain>.<name>``: lower case, dotted, e.g. ``job.finished``."""

Subject = Annotated[str, Field(max_length=255, pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")]
"""A concrete NATS subject (no wildcards) built by :mod:`bus.subjects`."""

SIGNATURE_LEN = 64  # ed25519


class Envelope(BaseModel):
    """One event as it is stored in ``FLEET_EVENTS``.

    ``subject`` is the subject the event is published on; it is signed with the rest, so
    an event signed for agent A cannot be replayed onto agent B's subjects.
    """

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")
    id: EventId
    type: EventType
    v: int = Field(ge=1, le=2**31)
    ts: TimestampNs
    source: PrincipalId
    subject: Subject
    data: dict[str, Any]
    signer: PublicKey | None = None
    sig: Annotated[bytes, Field(min_length=SIGNATURE_LEN, max_length=SIGNATURE_LEN)] | None = None

    @property
    def signed(self) -> bool:
        """True when the envelope carries a signer and a signature (not that they verify)."""
        return self.signer is not None and self.sig is not None


D = TypeVar("D", bound=EventData)


@dataclass(frozen=True, slots=True)
class Event(Generic[D]):
    """A decoded event of a known type, its data upcast to the current version."""

    envelope: Envelope
    data: D

    @property
    def id(self) -> str:
        return self.envelope.id

    @property
    def type(self) -> str:
        return self.envelope.type

    @property
    def ts(self) -> int:
        return self.envelope.ts

    @property
    def source(self) -> str:
        return self.envelope.source


UnknownReason = Literal["unknown_type", "newer_version"]


@dataclass(frozen=True, slots=True)
class UnknownEvent:
    """An event this code cannot interpret, kept whole so it can be listed and counted.

    It is never an error: a newer producer may legitimately write types or versions an
    older reader does not know.
    """

    envelope: Envelope
    reason: UnknownReason
    known_version: int | None = None

    @property
    def id(self) -> str:
        return self.envelope.id

    @property
    def type(self) -> str:
        return self.envelope.type

    def describe(self) -> str:
        if self.reason == "newer_version":
            return (
                f"{self.envelope.type} v{self.envelope.v} is newer than this reader "
                f"(knows up to v{self.known_version})"
            )
        return f"unknown event type {self.envelope.type!r} (v{self.envelope.v})"


def make_envelope(
    data: EventData,
    *,
    source: str,
    subject: str,
    event_id: str | None = None,
    ts: int | None = None,
) -> Envelope:
    """Wrap ``data`` in a new unsigned envelope of its type's current version.

    Args:
        data: the typed event data.
        source: the principal producing the event.
        subject: the subject it will be published on (see :mod:`bus.subjects`).
        event_id: a fixed id (for retries and tests); a new one by default.
        ts: a fixed timestamp in ns; now by default.
    """
    return Envelope(
        id=event_id or new_id(),
        type=data.TYPE,
        v=data.VERSION,
        ts=ts if ts is not None else time.time_ns(),
        source=source,
        subject=subject,
        data=data.model_dump(mode="python"),
    )
