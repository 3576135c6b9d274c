"""Bringing an existing stream to the configuration the design now asks for.

``fleet ops init --migrate`` changes what the server lets it change (limits, discard
policy, consumer limit, replicas in a cluster) and reports what it refuses (the storage
type, replicas on a single server), field by field with the server's reason. The log of
record gets one more rule: a limit that would remove events stored now (a smaller size,
a shorter age than its oldest event) is refused here before the server is asked,
because the server would enforce it at once by deleting the oldest events.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext, api

from bus.errors import FleetError

_NS = 1e9


@dataclass(frozen=True, slots=True)
class FieldChange:
    """One field of one stream: what it was, what was wanted, and why it was not done."""

    stream: str
    field: str
    old: Any
    new: Any
    reason: str = ""
    """Empty when changed; the refusal otherwise."""

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        out = {"stream": self.stream, "field": self.field, "old": self.old, "new": self.new}
        if self.reason:
            out["reason"] = self.reason
        return out


@dataclass(frozen=True, slots=True)
class Migration:
    """What :func:`migrate_stream` changed and what it could not."""

    changed: list[FieldChange]
    refused: list[FieldChange]


async def oldest_age_s(js: JetStreamContext, info: api.StreamInfo) -> float | None:
    """Age in seconds of the oldest message of the stream (None when it is empty)."""
    if not info.state.messages or not info.state.first_seq:
        return None
    try:
        msg = await js.get_msg(info.config.name or "", info.state.first_seq)
    except nats.js.errors.NotFoundError:
        return None
    stamp = msg.time
    if stamp is None:
        return None
    return max(0.0, time.time() - float(stamp.timestamp()))


def _would_drop(field: str, new: Any, info: api.StreamInfo, oldest_s: float | None) -> str:
    """Why ``field = new`` would remove stored messages now ("" when it would not)."""
    state = info.state
    if field == "max_bytes" and 0 < new < state.bytes:
        return f"the log holds {state.bytes} bytes: a limit of {new} would delete events"
    if field == "max_msgs" and 0 < new < state.messages:
        return f"the log holds {state.messages} events: a limit of {new} would delete some"
    if field == "max_age" and new and oldest_s is not None and new / _NS < oldest_s:
        return (
            f"its oldest event is {oldest_s / 86_400:.1f} days old: a max age of "
            f"{new / _NS / 86_400:g} days would delete it (export it first)"
        )
    if field == "discard" and new == api.DiscardPolicy.OLD.value:
        return "the log of record never drops old events to make room"
    return ""


def _apply(config: api.StreamConfig, fields: dict[str, Any]) -> api.StreamConfig:
    return replace(config, **fields)


async def _try_update(js: JetStreamContext, config: api.StreamConfig) -> str:
    """Ask the server to take ``config``: "" when it did, its refusal otherwise."""
    try:
        await js.update_stream(config)
    except nats.js.errors.APIError as exc:
        return exc.description or f"refused (code {exc.err_code})"
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
        raise FleetError(f"no answer updating {config.name}: {type(exc).__name__}") from exc
    return ""


async def migrate_stream(
    js: JetStreamContext,
    info: api.StreamInfo,
    wanted: dict[str, Any],
    diffs: list[tuple[str, Any, Any]],
    *,
    record: bool,
) -> Migration:
    """Change the fields of ``diffs`` on the stream of ``info`` to their ``wanted`` values.

    All at once first; when the server refuses that, one field at a time, so that every
    field it accepts is changed and every one it refuses is reported with its reason.

    Args:
        js: the JetStream context.
        info: the stream as it is.
        wanted: the designed configuration's fields (values as sent to the server).
        diffs: ``(field, existing, wanted)`` as :func:`bus.streams.differences` gives.
        record: the log of record: limits that would delete stored events are refused.
    """
    name = info.config.name or ""
    oldest = await oldest_age_s(js, info) if record else None
    refused: list[FieldChange] = []
    todo: list[tuple[str, Any, Any]] = []
    for field, old, new in diffs:
        reason = _would_drop(field, new, info, oldest) if record else ""
        if reason:
            refused.append(FieldChange(name, field, old, new, reason))
        else:
            todo.append((field, old, new))
    if not todo:
        return Migration([], refused)
    config = info.config
    if not await _try_update(js, _apply(config, {f: wanted[f] for f, _, _ in todo})):
        return Migration([FieldChange(name, f, o, n) for f, o, n in todo], refused)
    changed: list[FieldChange] = []
    for field, old, new in todo:
        attempt = _apply(config, {field: wanted[field]})
        reason = await _try_update(js, attempt)
        if reason:
            refused.append(FieldChange(name, field, old, new, reason))
        else:
            config = attempt
            changed.append(FieldChange(name, field, old, new))
    return Migration(changed, refused)
