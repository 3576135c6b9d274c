"""Subject tokens, subject builders and ids: pure code, no server."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bus import InvalidTokenError, Subjects, check_agent_id, check_token, version_token
from schemas import ids

BAD_TOKENS = [
    "",
    "a.b",
    "*",
    ">",
    "a*",
    "a>",
    "a b",
    " a",
    "a\t",
    "a\n",
    "-leading",
    "_leading",
    "x" * 65,
    "ünïcode",
    "a/b",
    "a\0b",
]


@pytest.mark.parametrize("token", BAD_TOKENS)
def test_unsafe_tokens_are_refused_with_a_reason(token: str) -> None:
    with pytest.raises(InvalidTokenError) as info:
        check_token(token, "agent id")
    assert "agent id" in str(info.value)


@pytest.mark.parametrize("token", ["a", "web-01", "DB_2", "0abc", "x" * 64])
def test_safe_tokens_pass(token: str) -> None:
    assert check_token(token) == token


def test_non_strings_are_refused() -> None:
    with pytest.raises(InvalidTokenError, match="must be a string"):
        check_token(7)


def test_reserved_agent_id() -> None:
    with pytest.raises(InvalidTokenError, match="reserved"):
        check_agent_id("master")


@pytest.mark.parametrize("bad", ["a.b", "*", ">", "", "a b"])
def test_every_builder_validates_every_token(bad: str) -> None:
    s = Subjects()
    builders = [
        lambda: s.job_event(bad, "J", "submitted"),
        lambda: s.job_event("a", bad, "submitted"),
        lambda: s.job_event("a", "J", bad),
        lambda: s.agent_event(bad, "online"),
        lambda: s.output(bad, "J"),
        lambda: s.output("a", bad),
        lambda: s.control(bad, "status"),
        lambda: s.control("a", bad),
        lambda: s.master_control(bad),
        lambda: s.agent_job_filters(bad),
        lambda: s.update_event("1.0", bad),
        lambda: s.update_event("1.0", "applied", agent=bad),
    ]
    for build in builders:
        with pytest.raises(InvalidTokenError):
            build()


def test_design_names_for_the_default_prefix() -> None:
    s = Subjects()
    assert s.events_stream == "FLEET_EVENTS"
    assert s.output_stream == "FLEET_OUTPUT"
    assert s.presence_bucket == "fleet-presence"
    assert s.job_event("web1", "J1", "submitted") == "fleet.evt.job.web1.J1.submitted"
    assert s.agent_job_filters("web1") == [
        "fleet.evt.job.web1.*.submitted",
        "fleet.evt.job.web1.*.cancel_requested",
    ]
    assert s.agent_event("web1", "online") == "fleet.evt.agent.web1.online"
    assert s.update_event("1.2.0", "announced") == "fleet.evt.update.1_2_0.announced"
    assert s.update_event("1.2.0", "applied", "web1") == "fleet.evt.update.1_2_0.web1.applied"
    assert s.output("web1", "J1") == "fleet.out.web1.J1"
    assert s.control("web1", "status") == "fleet.ctl.web1.status"
    assert s.master_control("agents") == "fleet.ctl.master.agents"
    assert s.parse_job_event("fleet.evt.job.web1.J1.finished") == ("web1", "J1", "finished")
    assert s.parse_job_event("fleet.evt.agent.web1.online") is None


def test_other_prefix_separates_fleets() -> None:
    s = Subjects("staging")
    assert s.events_stream == "STAGING_EVENTS"
    assert s.presence_bucket == "staging-presence"
    assert s.all_events == "staging.evt.>"
    with pytest.raises(InvalidTokenError):
        Subjects("a.b")


def test_version_tokens() -> None:
    assert version_token("1.2.0+local.3") == "1_2_0-local_3"
    with pytest.raises(InvalidTokenError):
        version_token("1.0 beta")


def test_ids_are_unique_ordered_tokens_with_their_time() -> None:
    made = [ids.new_id() for _ in range(2000)]
    assert made == sorted(made)
    assert len(set(made)) == len(made)
    assert all(ids.is_token(i) and len(i) == 26 for i in made)
    import time

    assert abs(ids.id_time_ns(made[-1]) - time.time_ns()) < 5_000_000_000
    with pytest.raises(ValueError, match="not a fleetbus id"):
        ids.id_time_ns("short")


@given(st.text(max_size=80))
def test_token_check_agrees_with_what_nats_can_route(value: str) -> None:
    ok = ids.is_token(value)
    if ok:
        assert value
        assert "." not in value
        assert "*" not in value
        assert ">" not in value
        assert not any(c.isspace() for c in value)
        assert len(value) <= ids.TOKEN_MAX_LEN
