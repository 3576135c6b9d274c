"""Models, versions and upcasting: pure code, no server."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
from pydantic import ValidationError
from samples import sample_data, sample_envelope

from schemas import (
    ALL_EVENTS,
    Event,
    EventData,
    EventRegistry,
    InvalidEventError,
    JobRequest,
    Presence,
    ScriptCommand,
    UnknownEvent,
    default_registry,
    make_envelope,
)


def test_samples_cover_every_registered_type() -> None:
    assert sorted(d.TYPE for d in sample_data()) == default_registry.known_types()
    assert len(ALL_EVENTS) == len(default_registry.known_types())


@pytest.mark.parametrize("data", sample_data(), ids=lambda d: d.TYPE)
def test_every_type_decodes_to_its_model(data: EventData) -> None:
    decoded = default_registry.decode(sample_envelope(data))
    assert isinstance(decoded, Event)
    assert decoded.data == data
    assert type(decoded.data) is type(data)


def test_unknown_type_is_kept_not_raised() -> None:
    env = sample_envelope(sample_data()[0]).model_copy(update={"type": "job.teleported"})
    decoded = default_registry.decode(env)
    assert isinstance(decoded, UnknownEvent)
    assert decoded.reason == "unknown_type"
    assert decoded.envelope is env
    assert "job.teleported" in decoded.describe()


def test_newer_version_is_kept_not_raised() -> None:
    env = sample_envelope(sample_data()[0]).model_copy(update={"v": 99, "data": {"new": 1}})
    decoded = default_registry.decode(env)
    assert isinstance(decoded, UnknownEvent)
    assert decoded.reason == "newer_version"
    assert decoded.known_version == 1
    assert "v99" in decoded.describe()


def test_known_type_with_bad_data_is_a_typed_error() -> None:
    env = sample_envelope(sample_data()[0]).model_copy(update={"data": {"job_id": 5}})
    with pytest.raises(InvalidEventError, match=r"job\.submitted v1"):
        default_registry.decode(env)


class _NoteV3(EventData):
    """A test type on its third version: v1 had `text`, v2 renamed it `body`, v3 added
    `lines`."""

    TYPE: ClassVar[str] = "test.noted"
    VERSION: ClassVar[int] = 3
    body: str
    lines: int


def _v1_to_v2(d: dict[str, Any]) -> dict[str, Any]:
    return {"body": d["text"]}


def _v2_to_v3(d: dict[str, Any]) -> dict[str, Any]:
    return {**d, "lines": d["body"].count("\n") + 1}


def test_old_versions_are_upcast_step_by_step() -> None:
    registry = EventRegistry()
    registry.register(_NoteV3, {1: _v1_to_v2, 2: _v2_to_v3})
    current = make_envelope(_NoteV3(body="x", lines=1), source="t", subject="t.x")
    v1 = current.model_copy(update={"v": 1, "data": {"text": "a\nb"}})
    v2 = current.model_copy(update={"v": 2, "data": {"body": "a"}})
    one, two = registry.decode(v1), registry.decode(v2)
    assert isinstance(one, Event)
    assert isinstance(two, Event)
    assert one.data == _NoteV3(body="a\nb", lines=2)
    assert two.data == _NoteV3(body="a", lines=1)


def test_an_upcaster_that_fails_is_a_typed_error() -> None:
    registry = EventRegistry()
    registry.register(_NoteV3, {1: _v1_to_v2, 2: _v2_to_v3})
    env = make_envelope(_NoteV3(body="x", lines=1), source="t", subject="t.x")
    with pytest.raises(InvalidEventError, match="cannot upcast"):
        registry.decode(env.model_copy(update={"v": 1, "data": {"wrong": 1}}))


def test_registering_without_every_upcaster_is_refused() -> None:
    registry = EventRegistry()
    with pytest.raises(ValueError, match="lacks upcasters"):
        registry.register(_NoteV3, {1: _v1_to_v2})
    registry.register(_NoteV3, {1: _v1_to_v2, 2: _v2_to_v3})
    with pytest.raises(ValueError, match="twice"):
        registry.register(_NoteV3, {1: _v1_to_v2, 2: _v2_to_v3})


def test_job_request_command_kinds() -> None:
    req = JobRequest.model_validate(
        {"command": {"kind": "script", "script": "echo hi"}, "timeout_s": 5}
    )
    assert isinstance(req.command, ScriptCommand)
    assert req.command.interpreter == ["/bin/sh"]
    module = JobRequest.model_validate({"command": {"kind": "module", "module": "backup"}})
    assert module.command.kind == "module"


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        ({"command": {"kind": "argv", "argv": []}}, "argv"),
        ({"command": {"kind": "argv", "argv": ["a\0b"]}}, "NUL"),
        ({"command": {"kind": "shell", "argv": ["x"]}}, "command"),
        ({"command": {"kind": "module", "module": "a.b"}}, "module"),
        ({"command": {"kind": "argv", "argv": ["x"]}, "env": {"A=B": "1"}}, "env"),
        ({"command": {"kind": "argv", "argv": ["x"]}, "run_as": "root; rm"}, "run_as"),
        ({"command": {"kind": "argv", "argv": ["x"]}, "timeout_s": 0}, "timeout_s"),
        ({"command": {"kind": "argv", "argv": ["x"]}, "surprise": 1}, "surprise"),
        ({"command": {"kind": "argv", "argv": "x"}}, "argv"),
    ],
)
def test_bad_job_requests_name_the_problem(payload: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValidationError) as info:
        JobRequest.model_validate(payload)
    assert problem in str(info.value)


def test_presence_model() -> None:
    p = Presence(
        agent="web-01",
        version="0.1.0",
        host="h",
        max_jobs=4,
        started_at=1,
        ts=2,
        running=["01JB3Z0000000000000000000A"],
    )
    assert p.state == "ready"
    with pytest.raises(ValidationError):
        Presence.model_validate({**p.model_dump(), "agent": "a.b"})
