"""admit(): the agent's decision about a submitted job, without a server."""

from __future__ import annotations

import time
from typing import Any

import pytest

from agentd.admit import Admit, AdmitPolicy, Malformed, Refuse, admit
from agentd.trust import Grant, TrustFile
from bus import Signer, generate_seed, sign_envelope
from bus.subjects import Subjects
from schemas import ArgvCommand, Envelope, JobRequest, JobSubmitted, ModuleCommand, make_envelope
from schemas.ids import new_id

SUBJECTS = Subjects()
ALICE = Signer(generate_seed())
MALLORY = Signer(generate_seed())
TRUST = TrustFile(
    grant=[Grant(key=ALICE.public_key, name="alice", commands=True, users=["deploy"])]
)


def policy(**kw: Any) -> AdmitPolicy:
    fields: dict[str, Any] = {
        "agent": "web-1",
        "agent_user": "fleet",
        "run_as_mode": "self",
        "replay_window_s": 300.0,
        "trust": TRUST,
    }
    return AdmitPolicy(**{**fields, **kw})


def submitted(
    signer: Signer | None = ALICE, job_id: str | None = None, agent: str = "web-1", **request: Any
) -> tuple[Envelope, str]:
    job_id = job_id or new_id()
    request.setdefault("command", ArgvCommand(argv=["true"]))
    data = JobSubmitted(
        job_id=job_id, agent=agent, request=JobRequest(**request), submitted_by="tester"
    )
    subject = SUBJECTS.job_event("web-1", job_id, "submitted")
    envelope = make_envelope(data, source="tester", subject=subject)
    return (sign_envelope(envelope, signer) if signer else envelope), job_id


def decide(envelope: Envelope, job_id: str, pol: AdmitPolicy | None = None, **kw: Any) -> Any:
    now = time.time_ns()
    return admit(
        envelope,
        job_id,
        pol or policy(),
        stored_ns=kw.get("stored_ns", envelope.ts),
        now_ns=kw.get("now_ns", now),
    )


def test_a_granted_signed_job_is_admitted_as_the_agents_own_user() -> None:
    envelope, job_id = submitted()
    decision = decide(envelope, job_id)
    assert isinstance(decision, Admit)
    assert decision.job.job_id == job_id
    assert decision.grant.key == ALICE.public_key  # the runner settles the user by it


def test_a_forged_signature_is_refused() -> None:
    envelope, job_id = submitted()
    forged = envelope.model_copy(update={"data": {**envelope.data, "submitted_by": "root"}})
    decision = decide(forged, job_id)
    assert isinstance(decision, Refuse)
    assert decision.status == "rejected"
    assert decision.reason.startswith("bad signature")


@pytest.mark.parametrize(
    ("signer", "reason"),
    [(None, "not signed"), (MALLORY, "is not trusted")],
)
def test_unsigned_or_untrusted_requests_are_refused(signer: Signer | None, reason: str) -> None:
    envelope, job_id = submitted(signer)
    decision = decide(envelope, job_id)
    assert isinstance(decision, Refuse)
    assert reason in decision.reason


@pytest.mark.parametrize("signer", [None, ALICE])
def test_without_a_trust_file_nothing_is_admitted(signer: Signer | None) -> None:
    envelope, job_id = submitted(signer)
    decision = decide(envelope, job_id, policy(trust=None))
    assert isinstance(decision, Refuse)
    assert "no trust file" in decision.reason


def test_a_module_may_take_the_environment_it_declares() -> None:
    envelope, job_id = submitted(command=ModuleCommand(module="backup"), env={"LEVEL": "full"})
    grant = Grant(key=ALICE.public_key, name="alice", modules=["backup"])
    pol = policy(trust=TrustFile(grant=[grant]))
    refused = decide(envelope, job_id, pol)
    assert isinstance(refused, Refuse)
    assert "may not set the environment variable LEVEL" in refused.reason
    declared = policy(trust=TrustFile(grant=[grant]), module_env={"backup": ["LEVEL"]})
    assert isinstance(decide(envelope, job_id, declared), Admit)


def test_a_grant_limits_what_may_be_asked() -> None:
    envelope, job_id = submitted(command=ModuleCommand(module="backup"))
    modules_only = TrustFile(grant=[Grant(key=ALICE.public_key, name="alice", modules=["x"])])
    decision = decide(envelope, job_id, policy(trust=modules_only))
    assert isinstance(decision, Refuse)
    assert "may not run module backup" in decision.reason


def test_a_request_stored_long_after_it_was_signed_is_a_replay() -> None:
    envelope, job_id = submitted()
    late = envelope.ts + 301 * 10**9
    decision = decide(envelope, job_id, stored_ns=late)
    assert isinstance(decision, Refuse)
    assert "validity window" in decision.reason
    assert isinstance(decide(envelope, job_id, stored_ns=envelope.ts + 299 * 10**9), Admit)


def test_an_expired_job_is_refused_as_expired() -> None:
    envelope, job_id = submitted(expires_at=time.time_ns() - 1)
    decision = decide(envelope, job_id)
    assert isinstance(decision, Refuse)
    assert decision.status == "expired"
    assert "not started before its expiry" in decision.reason


def test_run_as_a_granted_user_is_admitted_in_root_mode_refused_in_self_mode() -> None:
    envelope, job_id = submitted(run_as="deploy")
    assert isinstance(decide(envelope, job_id, policy(run_as_mode="root")), Admit)
    in_self = decide(envelope, job_id, policy(run_as_mode="self"))
    assert isinstance(in_self, Refuse)
    assert "run_as_mode = self" in in_self.reason


def test_in_root_mode_a_job_naming_no_user_needs_a_default_user() -> None:
    envelope, job_id = submitted()
    refused = decide(envelope, job_id, policy(run_as_mode="root"))
    assert isinstance(refused, Refuse)
    assert "no default_run_as" in refused.reason
    assert isinstance(
        decide(envelope, job_id, policy(run_as_mode="root", default_user="nobody")), Admit
    )


def test_run_as_an_ungranted_user_without_a_password_is_refused() -> None:
    envelope, job_id = submitted(run_as="postgres")
    decision = decide(envelope, job_id, policy(run_as_mode="root"))
    assert isinstance(decision, Refuse)
    assert "may not run jobs as postgres" in decision.reason


def test_a_job_for_another_agent_or_id_is_malformed_not_run() -> None:
    envelope, job_id = submitted(agent="db-1")
    assert isinstance(decide(envelope, job_id), Malformed)
    envelope, _ = submitted()
    other = new_id()
    assert isinstance(decide(envelope, other), Malformed)
    assert isinstance(decide(envelope, "not-an-id"), Malformed)


def test_a_newer_version_is_refused_with_its_reason() -> None:
    envelope, job_id = submitted(None)
    newer = envelope.model_copy(update={"v": 99})
    decision = decide(newer, job_id, policy(trust=None))
    assert isinstance(decision, Refuse)
    assert "v99 is newer" in decision.reason
