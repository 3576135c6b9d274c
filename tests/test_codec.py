"""The msgpack codec: round trips, limits, and a fuzz of the decoder. No server needed."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from samples import sample_data, sample_envelope

from bus import (
    BadMessageError,
    PayloadTooLargeError,
    decode_envelope,
    decode_event,
    decode_model,
    encode_envelope,
    encode_model,
)
from bus.codec import MAX_DEPTH, event_headers, pack, unpack
from schemas import Event, EventData, Presence, UnknownEvent


@pytest.mark.parametrize("data", sample_data(), ids=lambda d: d.TYPE)
def test_round_trip_of_every_event_type(data: EventData) -> None:
    env = sample_envelope(data)
    wire = encode_envelope(env)
    assert decode_envelope(wire) == env
    decoded = decode_event(wire)
    assert isinstance(decoded, Event)
    assert decoded.data == data
    assert decoded.envelope == env


def test_headers_carry_dedup_id_type_and_version() -> None:
    env = sample_envelope(sample_data()[0])
    assert event_headers(env) == {
        "Nats-Msg-Id": env.id,
        "Fleet-Type": "job.submitted",
        "Fleet-Version": "1",
    }


def test_size_limit_both_ways() -> None:
    env = sample_envelope(sample_data()[3])
    big = env.model_copy(update={"data": {**env.data, "output_tail": "x" * 2000}})
    with pytest.raises(PayloadTooLargeError) as info:
        encode_envelope(big, max_size=1000)
    assert info.value.size > 1000
    assert info.value.limit == 1000
    wire = encode_envelope(big)
    with pytest.raises(PayloadTooLargeError):
        decode_envelope(wire, max_size=1000)


@pytest.mark.parametrize(
    ("wire", "problem"),
    [
        (b"", "not valid msgpack"),
        (b"\xc1", "not valid msgpack"),
        (msgpack.packb([1, 2]), "must be a map"),
        (msgpack.packb({"id": 1}), "invalid envelope"),
        (msgpack.packb({1: "x"}), "not valid msgpack"),
        (msgpack.packb({"a": 1}) + b"\x00", "not valid msgpack"),
        (b"\x81\xa1a\xc4\xff", "not valid msgpack"),  # bin of 255 bytes, truncated
        (b"\xdd\xff\xff\xff\xff", "not valid msgpack"),  # array claiming 4G items
    ],
)
def test_malformed_input_is_a_bad_message(wire: bytes, problem: str) -> None:
    with pytest.raises(BadMessageError, match=problem):
        decode_event(wire)


def test_deep_nesting_is_refused_without_recursion() -> None:
    deep: Any = "x"
    for _ in range(MAX_DEPTH + 5):
        deep = [deep]
    with pytest.raises(BadMessageError, match="nested deeper"):
        unpack(msgpack.packb(deep))
    very_deep = b"\x91" * 100_000 + b"\xc0"  # 100k nested one-element arrays
    with pytest.raises(BadMessageError):
        unpack(very_deep)


@pytest.mark.parametrize("levels", [MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1, MAX_DEPTH + 2])
def test_the_depth_bound_is_exact_whatever_the_strings_hold(levels: int) -> None:
    # Bytes that look like map and array headers inside strings and binaries make the
    # quick count of containers overcount: the walk then decides, and decides the same.
    noise = bytes(range(0x80, 0xA0)) * 4
    value: Any = {"blob": noise, "text": noise.decode("latin-1")}
    for _ in range(levels - 1):
        value = [value]
    wire = msgpack.packb(value, use_bin_type=True)
    if levels <= MAX_DEPTH:
        assert unpack(wire) == value
    else:
        with pytest.raises(BadMessageError, match="nested deeper"):
            unpack(wire)
    # Without the noise, the count alone answers: the same verdict.
    plain: Any = {}
    for _ in range(levels - 1):
        plain = [plain]
    if levels <= MAX_DEPTH:
        assert unpack(msgpack.packb(plain)) == plain
    else:
        with pytest.raises(BadMessageError, match="nested deeper"):
            unpack(msgpack.packb(plain))


def test_wrong_field_types_are_bad_messages() -> None:
    env = sample_envelope(sample_data()[0]).model_dump()
    for field, wrong in [("v", "1"), ("ts", -1), ("sig", "x" * 64), ("subject", "a.*")]:
        with pytest.raises(BadMessageError, match=field):
            decode_envelope(pack({**env, field: wrong}))


def test_known_type_with_invalid_data_is_a_bad_message() -> None:
    env = sample_envelope(sample_data()[0]).model_dump()
    env["data"]["agent"] = "a.b"
    with pytest.raises(BadMessageError, match=r"job\.submitted"):
        decode_event(pack(env))


def test_unknown_types_and_newer_versions_decode_to_values() -> None:
    env = sample_envelope(sample_data()[0]).model_dump()
    unknown = decode_event(pack({**env, "type": "job.moved"}))
    newer = decode_event(pack({**env, "v": 2, "data": {"shape": "new"}}))
    assert isinstance(unknown, UnknownEvent)
    assert unknown.reason == "unknown_type"
    assert isinstance(newer, UnknownEvent)
    assert newer.reason == "newer_version"


def test_models_round_trip_and_validate() -> None:
    p = Presence(agent="a1", version="1", host="h", max_jobs=1, started_at=1, ts=2)
    assert decode_model(encode_model(p), Presence) == p
    with pytest.raises(BadMessageError, match="invalid Presence"):
        decode_model(pack({"agent": "a1"}), Presence)


# --- fuzz: every input yields a value or a typed error ------------------------------------

_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=30),
    st.binary(max_size=30),
)
_values = st.recursive(
    _leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(st.text(max_size=10), children, max_size=5),
    ),
    max_leaves=40,
)


def _decode_or_typed_error(wire: bytes) -> None:
    try:
        result = decode_event(wire)
    except BadMessageError:
        return
    assert isinstance(result, Event | UnknownEvent)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_fuzz_random_bytes(wire: bytes) -> None:
    _decode_or_typed_error(wire)


@settings(max_examples=300)
@given(st.sampled_from(sample_data()), st.data())
def test_fuzz_truncated_and_flipped_events(data: EventData, draw: st.DataObject) -> None:
    wire = encode_envelope(sample_envelope(data))
    cut = draw.draw(st.integers(0, len(wire)))
    _decode_or_typed_error(wire[:cut])
    pos = draw.draw(st.integers(0, len(wire) - 1))
    flipped = bytearray(wire)
    flipped[pos] ^= draw.draw(st.integers(1, 255))
    _decode_or_typed_error(bytes(flipped))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(_values)
def test_fuzz_nested_msgpack_values(value: Any) -> None:
    _decode_or_typed_error(msgpack.packb(value, use_bin_type=True))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sample_data()), st.text(min_size=1, max_size=8), _values)
def test_fuzz_wrong_types_in_known_events(data: EventData, key: str, value: Any) -> None:
    env = sample_envelope(data).model_dump()
    target = env["data"] if key[0] < "m" else env
    target[sorted(target)[len(key) % len(target)]] = value
    _decode_or_typed_error(msgpack.packb(env, use_bin_type=True))


@settings(max_examples=50)
@given(st.integers(min_value=1, max_value=64 * 1024 * 1024))
def test_fuzz_huge_declared_sizes(size: int) -> None:
    # Headers that claim huge strings, binaries, arrays and maps but carry no body.
    for header in (b"\xdb", b"\xc6", b"\xdd", b"\xdf"):
        _decode_or_typed_error(header + size.to_bytes(4, "big") + b"\x00" * 8)
