"""Who may say what: the authorisation table, exhaustively, without a server."""

from __future__ import annotations

from typing import Any

import pytest
from samples import AGENT, JOB, sample_data, subject_for

from bus import Signer, Subjects, generate_seed
from ledger.policy import MASTER_OUTCOMES, Principals, Verdict, authorise
from schemas import (
    TERMINAL_STATUSES,
    EventData,
    JobFinished,
    JobLateResult,
    JobStarted,
)

KEYS = {
    name: Signer(generate_seed()).public_key
    for name in ("master", AGENT, "db-01", "alice", "batch", "stranger")
}
ROLES = {
    "master": "master",
    AGENT: "agent",
    "db-01": "other agent",
    "alice": "operator",
    "batch": "headless",
}


def principals(**kw: Any) -> Principals:
    return Principals(
        master_keys=frozenset({KEYS["master"]}),
        agents={AGENT: KEYS[AGENT], "db-01": KEYS["db-01"]},
        operators={"alice": KEYS["alice"]},
        headless={"batch": KEYS["batch"]},
        **kw,
    )


def kind(verdict: Verdict) -> str | None:
    return verdict.problem.kind if verdict.problem is not None else None


def check(
    data: EventData | dict[str, Any],
    speaker: str,
    *,
    subject: str | None = None,
    source: str | None = None,
    signer: str | None = None,
    registry: Principals | None = None,
    type: str | None = None,
) -> Verdict:
    if isinstance(data, EventData):
        type, subject = data.TYPE, subject or subject_for(data)
        data = data.model_dump(mode="python")
    assert type is not None
    assert subject is not None
    return authorise(
        type=type,
        subject=subject,
        source=source or speaker,
        signer=signer or KEYS[speaker],
        data=data,
        principals=registry or principals(),
    )


# Who may publish each event type (the "by" fields name the speaker, as an honest one would).
ALLOWED = {
    "job.submitted": {"master", "operator", "headless"},
    "job.cancel_requested": {"master", "operator", "headless"},
    "job.started": {"agent"},
    "job.finished": {"agent"},  # the sample's status is "failed": not the master's to say
    "job.late_result": {"agent", "master"},
    "agent.registered": {"master"},
    "agent.deregistered": {"master"},
    "agent.online": {"agent"},
    "agent.offline": {"agent", "master"},
    "agent.config_changed": {"agent"},
    "agent.unsupported": {"agent"},
    "update.published": {"operator"},
    "update.announced": {"operator"},
    "update.token_acquired": {"agent"},
    "update.token_released": {"agent"},
    "update.applied": {"agent"},
    "update.failed": {"agent"},
    "update.rolled_back": {"agent"},
    "update.rollout_halted": {"master"},
    "settings.changed": {"master", "operator"},
    "audit.checkpoint": {"master"},
    "auth.denied": {"master"},
}


def test_the_table_covers_every_event_type() -> None:
    assert {d.TYPE for d in sample_data()} == set(ALLOWED)


@pytest.mark.parametrize("data", sample_data(), ids=lambda d: d.TYPE)
@pytest.mark.parametrize("speaker", list(ROLES))
def test_who_may_publish_what(data: EventData, speaker: str) -> None:
    for by in ("submitted_by", "requested_by", "changed_by"):
        if by in type(data).model_fields:
            data = data.model_copy(update={by: speaker})
    verdict = check(data, speaker)
    assert verdict.allowed == (ROLES[speaker] in ALLOWED[data.TYPE]), verdict.problem
    if not verdict.allowed:
        assert kind(verdict) == "not allowed"


@pytest.mark.parametrize("status", sorted(TERMINAL_STATUSES))
def test_the_master_owns_only_its_outcomes(status: str) -> None:
    data = JobFinished(job_id=JOB, agent=AGENT, status=status)  # type: ignore[arg-type]
    assert check(data, "master").allowed == (status in MASTER_OUTCOMES)
    assert check(data, AGENT).allowed
    late = JobLateResult(job_id=JOB, agent=AGENT, status=status)  # type: ignore[arg-type]
    assert check(late, "master").allowed
    assert check(late, AGENT).allowed
    assert not check(late, "db-01").allowed


def test_an_agent_cannot_report_for_another_agent() -> None:
    theirs = JobFinished(job_id=JOB, agent="db-01", status="succeeded")
    s = Subjects()
    # On its own subject, naming the other agent in the data: the subject gives it away.
    on_own = check(theirs, AGENT, subject=s.job_event(AGENT, JOB, "finished"))
    assert kind(on_own) == "subject"
    assert "agent 'db-01'" in str(on_own.problem)
    # On the other agent's subject, in its own name: not its job.
    as_self = check(theirs, AGENT)
    assert kind(as_self) == "not allowed"
    # On the other agent's subject, claiming to be it: its key says otherwise.
    as_them = check(theirs, AGENT, source="db-01")
    assert kind(as_them) == "impersonation"
    assert f"agent {AGENT}" in str(as_them.problem)
    # Even where the other agent is not registered at all.
    open_registry = Principals(agents={AGENT: KEYS[AGENT]})
    assert not check(theirs, AGENT, registry=open_registry).allowed
    assert not check(
        theirs, AGENT, subject=s.job_event(AGENT, JOB, "finished"), registry=open_registry
    ).allowed


@pytest.mark.parametrize(
    ("subject", "why"),
    [
        ("fleet.evt.job.web-01.01JB3Z0000000000000000000B.started", "job_id"),
        ("fleet.evt.job.web-01.01JB3Z0000000000000000000A.finished", "names another event"),
        ("fleet.evt.agent.web-01.started", "outside"),
        ("other.evt.job.web-01.01JB3Z0000000000000000000A.started", "outside"),
        ("fleet.evt.job.web-01.01JB3Z0000000000000000000A.x.started", "shape"),
    ],
)
def test_subject_tokens_must_equal_the_data(subject: str, why: str) -> None:
    data = JobStarted(job_id=JOB, agent=AGENT, pid=1, effective_user="root")
    verdict = check(data, AGENT, subject=subject)
    assert kind(verdict) == "subject"
    assert why in str(verdict.problem)


def test_update_subjects_carry_the_version() -> None:
    applied = next(d for d in sample_data() if d.TYPE == "update.applied")
    wrong = Subjects().update_event("0.3.0", "applied", AGENT)
    assert kind(check(applied, AGENT, subject=wrong)) == "subject"
    assert check(applied, AGENT).allowed


def test_submissions_and_settings_speak_in_the_signers_name() -> None:
    submitted, cancel = sample_data()[0], sample_data()[1]
    for data in (submitted, cancel):  # both say "alice"
        assert check(data, "alice").allowed
        verdict = check(data, "batch")
        assert kind(verdict) == "impersonation"
    # The master submits for headless users who proved their password: any name.
    assert check(submitted, "master").allowed
    settings = next(d for d in sample_data() if d.TYPE == "settings.changed")
    assert check(settings, "alice").allowed
    assert kind(check(settings.model_copy(update={"changed_by": "bob"}), "alice")) == (
        "impersonation"
    )


def test_keys_and_names() -> None:
    started = JobStarted(job_id=JOB, agent=AGENT, pid=1, effective_user="root")
    # A registered key claiming another principal's name.
    assert kind(check(started, "alice", source=AGENT)) == "impersonation"
    # A stranger claiming a registered name.
    stranger = check(started, AGENT, signer=KEYS["stranger"])
    assert kind(stranger) == "impersonation"
    # A strict registry refuses every unregistered key.
    strict = check(started, AGENT, signer=KEYS["stranger"], registry=principals(strict=True))
    assert kind(strict) == "unknown signer"
    unknown_agent = JobStarted(job_id=JOB, agent="new-1", pid=1, effective_user="root")
    refused = check(
        unknown_agent, "new-1", signer=KEYS["stranger"], registry=principals(strict=True)
    )
    assert kind(refused) == "unknown signer"


def test_an_unregistered_agent_is_known_by_its_first_key() -> None:
    registry = principals()
    first = JobStarted(job_id=JOB, agent="new-1", pid=1, effective_user="root")
    verdict = check(first, "new-1", signer=KEYS["stranger"], registry=registry)
    assert verdict.allowed
    assert verdict.learns == ("new-1", KEYS["stranger"])
    registry.learn_agent(*verdict.learns)
    # From then on only that key speaks as new-1, and that key only as new-1.
    other = Signer(generate_seed()).public_key
    assert kind(check(first, "new-1", signer=other, registry=registry)) == "impersonation"
    mine = JobStarted(job_id=JOB, agent="new-2", pid=1, effective_user="root")
    assert not check(mine, "new-2", signer=KEYS["stranger"], registry=registry).allowed
    # A learned agent may not submit jobs as if it were an operator.
    submitted = sample_data()[0].model_copy(update={"submitted_by": "new-1"})
    assert kind(check(submitted, "new-1", signer=KEYS["stranger"], registry=registry)) == (
        "not allowed"
    )
    # Only an agent's own words introduce its key, not a submission naming it.
    named = sample_data()[0].model_copy(update={"agent": "new-3", "submitted_by": "new-3"})
    stranger = Signer(generate_seed()).public_key
    verdict = check(named, "new-3", subject=subject_for(named), signer=stranger, registry=registry)
    assert verdict.allowed
    assert verdict.learns is None
    # A configured key wins over a learned one.
    registry.learn_agent(AGENT, other)
    assert check(first.model_copy(update={"agent": AGENT}), AGENT, registry=registry).allowed


def test_unknown_types_must_be_on_the_subject_their_data_names() -> None:
    data = {"agent": "db-01", "job_id": JOB}
    subject = Subjects().job_event("db-01", JOB, "teleported")
    assert check(data, "db-01", type="job.teleported", subject=subject).allowed
    elsewhere = Subjects().job_event(AGENT, JOB, "teleported")
    assert kind(check(data, AGENT, type="job.teleported", subject=elsewhere)) == "subject"
