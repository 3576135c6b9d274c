"""Whether this agent may run a submitted job: a pure decision, no I/O.

:func:`admit` checks, in order, the request's signature, that it decodes to a job of a
version this agent knows, that the log stored it within the replay window of when it
was signed, that the trust file lets its signer ask for it (without a trust file nothing
runs), that it has not expired, and that the signer's grant allows the OS user it would
run as (:func:`agentd.trust.resolve_identity`). The answer is :class:`Admit`,
:class:`Refuse` (the job ends with that status and reason) or :class:`Malformed` (the
message is not a job of this agent at all and is dropped).

What needs the outside world (a cancel already in the log, the account, the sealed
password, PAM) is the runner's (:mod:`agentd.runner`, through
:func:`agentd.authorize.authorize_run_as`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Literal

from agentd.trust import Grant, Refused, TrustFile, refusal, resolve_identity
from bus import BadMessageError, SignatureError, verify_envelope
from bus.codec import decode_data
from schemas import Envelope, Event, JobSubmitted, ModuleCommand, UnknownEvent
from schemas.ids import id_time_ns


@dataclass(frozen=True)
class AdmitPolicy:
    """What the agent's configuration says about admitting jobs."""

    agent: str
    agent_user: str
    """The OS user the agent runs as."""
    run_as_mode: Literal["root", "self"]
    replay_window_s: float
    trust: TrustFile | None
    default_user: str | None = None
    """``default_run_as`` (root mode, a job naming no user); None when unset."""
    module_env: Mapping[str, Collection[str]] = field(default_factory=dict)
    """Per module, the environment variables a request may set for it."""


@dataclass(frozen=True)
class Admit:
    """Run it."""

    envelope: Envelope
    job: JobSubmitted
    grant: Grant
    """The signer's trust grant: the runner settles the job's OS user by it."""


@dataclass(frozen=True)
class Refuse:
    """End the job with ``status`` and ``reason`` without running it."""

    status: Literal["rejected", "expired"]
    reason: str


@dataclass(frozen=True)
class Malformed:
    """Not a job of this agent: drop the message and count it."""

    reason: str


Decision = Admit | Refuse | Malformed


def valid_job_id(job_id: str) -> bool:
    """Whether ``job_id`` is a well-formed event id (the time it was made is in it)."""
    try:
        id_time_ns(job_id)
    except ValueError:
        return False
    return True


def admit(
    envelope: Envelope,
    job_id: str,
    policy: AdmitPolicy,
    *,
    stored_ns: int | None,
    now_ns: int,
) -> Decision:
    """Decide about one ``job.submitted`` envelope published on this agent's subject.

    Args:
        envelope: the decoded envelope; its subject is the one it arrived on.
        job_id: the job id of that subject.
        policy: the agent's rules.
        stored_ns: when the log stored the message (None when unknown).
        now_ns: the time now, for the job's expiry.
    """
    if not valid_job_id(job_id):
        return Malformed(f"{job_id!r} is not a job id")
    if envelope.signed:
        try:
            verify_envelope(envelope, subject=envelope.subject)
        except SignatureError as exc:
            return Refuse("rejected", f"bad signature: {exc}")
    try:
        decoded = decode_data(envelope)
    except BadMessageError as exc:
        return Refuse("rejected", f"invalid job request: {exc}")
    if isinstance(decoded, UnknownEvent):
        return Refuse("rejected", decoded.describe())
    assert isinstance(decoded, Event)
    job = decoded.data
    if not isinstance(job, JobSubmitted):
        return Malformed(f"{envelope.type} on a job.submitted subject")
    if job.job_id != job_id or job.agent != policy.agent:
        return Malformed("job id or agent in the data do not match the subject")
    window = policy.replay_window_s
    if stored_ns is not None and abs(stored_ns - envelope.ts) > window * 1e9:
        lag = (stored_ns - envelope.ts) / 1e9
        return Refuse(
            "rejected",
            f"stored {lag:.0f}s after it was signed, outside the "
            f"{window:g}s validity window (a replayed request?)",
        )
    command = job.request.command
    module_env = (
        policy.module_env.get(command.module, ()) if isinstance(command, ModuleCommand) else ()
    )
    reason = refusal(policy.trust, envelope, job, module_env=module_env)
    if reason is not None:
        return Refuse("rejected", reason)
    expires_at = job.request.expires_at
    if expires_at is not None and now_ns > expires_at:
        waited = (now_ns - id_time_ns(job_id)) / 1e9
        return Refuse("expired", f"not started before its expiry (waited {waited:.0f}s)")
    # refusal() passed, so there is a trust file and a grant for this signed request.
    assert policy.trust is not None
    assert envelope.signer is not None
    grant = policy.trust.for_key(envelope.signer)
    assert grant is not None
    who = resolve_identity(
        grant,
        job.request,
        mode=policy.run_as_mode,
        agent_user=policy.agent_user,
        default_user=policy.default_user,
    )
    if isinstance(who, Refused):
        return Refuse("rejected", who.reason)
    return Admit(envelope, job, grant)
