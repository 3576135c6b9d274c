"""Bytes ↔ models: the only module that calls msgpack.

Every decode either returns a value or raises :class:`~bus.errors.BadMessageError`
(or its :class:`~bus.errors.PayloadTooLargeError`); no msgpack, unicode, recursion or
pydantic exception escapes, whatever the input.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgpack
from pydantic import BaseModel, ValidationError

from bus.errors import BadMessageError, PayloadTooLargeError
from schemas import Envelope, Event, EventRegistry, InvalidEventError, UnknownEvent
from schemas.events import EventData
from schemas.registry import default_registry, summarize_validation_error

DEFAULT_MAX_SIZE = 1024 * 1024
"""1 MiB: nats-server's default ``max_payload``. Larger messages are refused both ways."""

MAX_DEPTH = 32
"""How deeply maps and arrays may nest. Real messages need fewer than 10 levels; the
limit keeps hostile input from exhausting the stack of anything that walks it."""

# Domain separation: these bytes can never be mistaken for another protocol's signed data.
_CANONICAL_TAG = "fleetbus.event/1"
_CONTROL_TAG = "fleetbus.control/1"

HEADER_TYPE = "Fleet-Type"
HEADER_VERSION = "Fleet-Version"
HEADER_MSG_ID = "Nats-Msg-Id"

# Job output chunks on ``<prefix>.out.<agent>.<job>``: the payload is the raw bytes.
HEADER_OUTPUT_STREAM = "Fleet-Stream"
"""``stdout``, ``stderr``, or ``marker`` (a note from the agent, such as truncation)."""
HEADER_OUTPUT_SEQ = "Fleet-Seq"
"""1, 2, 3 … per job, in the order the agent read the bytes."""

M = TypeVar("M", bound=BaseModel)


def pack(value: Any, max_size: int = DEFAULT_MAX_SIZE) -> bytes:
    """Encode a plain value (maps, lists, str, bytes, numbers, bool, None).

    Raises:
        PayloadTooLargeError: the encoding is over ``max_size``.
        BadMessageError: the value holds something msgpack cannot encode.
    """
    try:
        data: bytes = msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise BadMessageError(f"cannot encode: {exc}") from None
    if len(data) > max_size:
        raise PayloadTooLargeError(len(data), max_size)
    return data


def unpack(data: bytes, max_size: int = DEFAULT_MAX_SIZE, *, check_depth: bool = True) -> Any:
    """Decode one msgpack value, refusing oversized, truncated or trailing input.

    ``check_depth=False`` skips the walk that bounds nesting, for large documents of a
    known flat shape (snapshots), where it would cost more than the decoding itself.

    Raises:
        PayloadTooLargeError: ``data`` is over ``max_size``.
        BadMessageError: anything else wrong with it.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise BadMessageError(f"expected bytes, got {type(data).__name__}")
    if len(data) > max_size:
        raise PayloadTooLargeError(len(data), max_size)
    try:
        # unpackb bounds every declared length by len(data), so a header claiming a
        # huge string or array cannot make it allocate more than the input's size.
        value = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises a zoo: ValueError, StackError, TypeError...
        raise BadMessageError(f"not valid msgpack: {type(exc).__name__}: {exc}") from None
    if check_depth and len(bytes(data).translate(None, _NOT_CONTAINER_HEADERS)) > MAX_DEPTH:
        _check_depth(value)
    return value


# Every map or array is encoded with one header byte from these ranges (fixmap, fixarray,
# array16/32, map16/32), so fewer such bytes than MAX_DEPTH anywhere in the input (in
# strings too: it only overcounts) means fewer levels: counted in one C pass, where the
# walk below costs more than decoding a typical event.
_CONTAINER_HEADERS = bytes([*range(0x80, 0xA0), *range(0xDC, 0xE0)])
_NOT_CONTAINER_HEADERS = bytes(b for b in range(256) if b not in _CONTAINER_HEADERS)


def _check_depth(value: Any) -> None:
    # Iterative on purpose: a recursive walk is exactly what deep input would break.
    # Level by level and containers only: an event is mostly scalars, and this runs on
    # every event a replay folds.
    level = [value] if isinstance(value, dict | list) else []
    depth = 0
    while level:
        if depth >= MAX_DEPTH:
            raise BadMessageError(f"nested deeper than {MAX_DEPTH} levels")
        deeper: list[Any] = []
        for item in level:
            children = item.values() if isinstance(item, dict) else item
            deeper.extend([child for child in children if isinstance(child, dict | list)])
        level = deeper
        depth += 1


def _canonical(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _canonical(value[k]) for k in sorted(value)}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


def canonical_bytes(envelope: Envelope) -> bytes:
    """The bytes a signature covers: every envelope field but ``sig``, map keys sorted.

    Uses ``envelope.data`` exactly as received, so a reader verifies what the producer
    signed even if its own models would reshape the data.
    """
    fields = [
        _CANONICAL_TAG,
        envelope.id,
        envelope.type,
        envelope.v,
        envelope.ts,
        envelope.source,
        envelope.subject,
        _canonical(envelope.data),
        envelope.signer,
    ]
    return pack(fields, max_size=2**31)


def canonical_control_bytes(
    request_id: str | None, ts: int | None, subject: str | None, signer: str | None, args: Any
) -> bytes:
    """The bytes a control request's signature covers (see :func:`bus.signing.sign_control`)."""
    return pack([_CONTROL_TAG, request_id, ts, subject, signer, _canonical(args)], max_size=2**31)


def encode_envelope(envelope: Envelope, max_size: int = DEFAULT_MAX_SIZE) -> bytes:
    """Encode an envelope for the wire.

    Raises:
        PayloadTooLargeError: the event is over ``max_size``.
    """
    return pack(envelope.model_dump(mode="python"), max_size)


def decode_envelope(data: bytes, max_size: int = DEFAULT_MAX_SIZE) -> Envelope:
    """Decode the envelope of an event without interpreting its data.

    Raises:
        BadMessageError: the bytes are not a valid envelope.
    """
    value = unpack(data, max_size)
    if not isinstance(value, dict):
        raise BadMessageError(f"an event must be a map, not {type(value).__name__}")
    try:
        return Envelope.model_validate(value)
    except ValidationError as exc:
        raise BadMessageError(f"invalid envelope: {summarize_validation_error(exc)}") from None


def decode_event(
    data: bytes,
    registry: EventRegistry = default_registry,
    max_size: int = DEFAULT_MAX_SIZE,
) -> Event[EventData] | UnknownEvent:
    """Decode bytes to a typed event, or to an :class:`UnknownEvent` for types or versions
    this code does not know. Signatures are not checked here (see :mod:`bus.signing`).

    Raises:
        BadMessageError: the bytes are not an event, or a known type's data is invalid.
    """
    return decode_data(decode_envelope(data, max_size), registry)


def decode_data(
    envelope: Envelope, registry: EventRegistry = default_registry
) -> Event[EventData] | UnknownEvent:
    """Type an already decoded envelope's data (see :meth:`EventRegistry.decode`).

    Raises:
        BadMessageError: a known type and version whose data is invalid.
    """
    try:
        return registry.decode(envelope)
    except InvalidEventError as exc:
        raise BadMessageError(str(exc)) from None


def event_headers(envelope: Envelope) -> dict[str, str]:
    """Headers for publishing an event: dedup id, type and version for cheap filtering."""
    return {
        HEADER_MSG_ID: envelope.id,
        HEADER_TYPE: envelope.type,
        HEADER_VERSION: str(envelope.v),
    }


def encode_model(model: BaseModel, max_size: int = DEFAULT_MAX_SIZE) -> bytes:
    """Encode any model (presence, requests, replies) as a msgpack map."""
    return pack(model.model_dump(mode="python"), max_size)


def decode_model(data: bytes, model: type[M], max_size: int = DEFAULT_MAX_SIZE) -> M:
    """Decode bytes into ``model``.

    Raises:
        BadMessageError: not msgpack, or not a valid ``model``.
    """
    value = unpack(data, max_size)
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise BadMessageError(
            f"invalid {model.__name__}: {summarize_validation_error(exc)}"
        ) from None
