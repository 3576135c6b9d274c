"""Which model each event type decodes to, and how old versions are brought up to date.

Decoding never raises for what a newer producer could legitimately write: an unknown type
or a newer version becomes an :class:`~schemas.envelope.UnknownEvent`. It raises
:class:`InvalidEventError` only for data that claims a known type and version but does
not fit it, which is a broken or hostile producer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from schemas.envelope import Envelope, Event, UnknownEvent
from schemas.events import ALL_EVENTS, EventData

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
"""Turns version N's data into version N+1's."""


class InvalidEventError(ValueError):
    """An event of a known type and version whose data does not fit its model."""

    def __init__(self, event_type: str, version: int, detail: str) -> None:
        self.event_type = event_type
        self.version = version
        self.detail = detail
        super().__init__(f"invalid {event_type} v{version}: {detail}")


def summarize_validation_error(exc: ValidationError, limit: int = 3) -> str:
    """A one-line summary of a pydantic error: where and what, for the first few problems."""
    parts = []
    for err in exc.errors()[:limit]:
        where = ".".join(str(p) for p in err["loc"]) or "value"
        parts.append(f"{where}: {err['msg']}")
    more = exc.error_count() - limit
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


@dataclass(frozen=True)
class _Entry:
    model: type[EventData]
    upcasters: Mapping[int, Upcaster] = field(default_factory=dict)


class EventRegistry:
    """Maps event types to models and their upcasters."""

    def __init__(self, models: Iterable[type[EventData]] = ()) -> None:
        self._entries: dict[str, _Entry] = {}
        for model in models:
            self.register(model)

    def register(
        self, model: type[EventData], upcasters: Mapping[int, Upcaster] | None = None
    ) -> None:
        """Add a type. ``upcasters[n]`` turns version n into n+1; all of 1..VERSION-1 needed.

        Raises:
            ValueError: the type is registered already, or an upcaster is missing.
        """
        if model.TYPE in self._entries:
            raise ValueError(f"event type {model.TYPE!r} is registered twice")
        steps = dict(upcasters or {})
        missing = [n for n in range(1, model.VERSION) if n not in steps]
        if missing:
            raise ValueError(f"{model.TYPE} v{model.VERSION} lacks upcasters from v{missing}")
        self._entries[model.TYPE] = _Entry(model, steps)

    def known_types(self) -> list[str]:
        """Every registered type, sorted."""
        return sorted(self._entries)

    def model_for(self, event_type: str) -> type[EventData] | None:
        entry = self._entries.get(event_type)
        return entry.model if entry else None

    def decode(self, envelope: Envelope) -> Event[EventData] | UnknownEvent:
        """Type the envelope's data, upcasting older versions.

        Raises:
            InvalidEventError: a known type and version whose data does not validate,
                or an upcaster that failed on it.
        """
        entry = self._entries.get(envelope.type)
        if entry is None:
            return UnknownEvent(envelope, "unknown_type")
        current = entry.model.VERSION
        if envelope.v > current:
            return UnknownEvent(envelope, "newer_version", known_version=current)
        data: dict[str, Any] = envelope.data
        if envelope.v < current:
            data = dict(data)  # upcasters may change it; the envelope keeps what was signed
            try:
                for version in range(envelope.v, current):
                    data = entry.upcasters[version](data)
            except Exception as exc:  # an upcaster meeting data it cannot read
                raise InvalidEventError(
                    envelope.type, envelope.v, f"cannot upcast to v{current}: {exc}"
                ) from exc
        try:
            typed = entry.model.model_validate(data)
        except ValidationError as exc:
            raise InvalidEventError(
                envelope.type, envelope.v, summarize_validation_error(exc)
            ) from None
        return Event(envelope, typed)


default_registry = EventRegistry(ALL_EVENTS)
"""Every event type fleetbus knows, at its current version."""
