"""Authorising a job's OS user: the trust grant decides, PAM checks a password.

:func:`authorize_run_as` is the one place a job's user is settled. The decision itself is
the pure :func:`agentd.trust.resolve_identity`; this adds what needs the machine: the
account lookup, opening the job-bound sealed password, remembering it as used, and PAM
(``auth`` then ``account``, off the event loop, for every job that carries a password).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from agentd.runas import Identity, PamServiceMissing, lookup, pam_allows
from agentd.seals import UsedSeals
from agentd.trust import Grant, Refused, RunAsMode, resolve_identity
from bus import SealBinding, SignatureError, Signer
from bus.signing import MAX_SEAL_LIFETIME_NS, seal_digest, seal_expiry
from schemas import JobSubmitted

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunAsPolicy:
    """What the agent's configuration and identity say about run-as."""

    agent_id: str
    agent_user: str
    mode: RunAsMode
    default_user: str | None
    """``default_run_as``; None when unset (jobs naming no user are refused in root mode)."""
    pam_service: str


@dataclass(frozen=True)
class Authorized:
    """Run the job as ``identity``; None: as the agent's own user, no switch."""

    identity: Identity | None


async def authorize_run_as(
    grant: Grant,
    job: JobSubmitted,
    policy: RunAsPolicy,
    signer: Signer,
    seals: UsedSeals,
) -> Authorized | Refused:
    """Who the job runs as, or why it must not run. ``grant`` is its signer's grant.

    A refusal says only "authentication failed" when the account does not exist or the
    password is wrong, so a caller never learns which.
    """
    decision = resolve_identity(
        grant,
        job.request,
        mode=policy.mode,
        agent_user=policy.agent_user,
        default_user=policy.default_user,
    )
    if isinstance(decision, Refused):
        return decision
    identity = lookup(decision.user) if decision.switch or decision.password else None
    if decision.password:
        reason = await _check_password(job, decision.user, identity, policy, signer, seals)
        if reason is not None:
            logger.warning("! job %s: running as %s refused: %s", job.job_id, decision.user, reason)
            return Refused(reason)
    if not decision.switch:
        return Authorized(None)
    if identity is None:
        return Refused(f"no user {decision.user} here")
    how = "after PAM" if decision.password else "by an nkey grant"
    logger.info("job %s runs as %s %s", job.job_id, decision.user, how)
    return Authorized(identity)


async def _check_password(
    job: JobSubmitted,
    user: str,
    identity: Identity | None,
    policy: RunAsPolicy,
    signer: Signer,
    seals: UsedSeals,
) -> str | None:
    """PAM on the job's sealed password; the refusal, or None.

    The seal must be for this job, this agent and this submitter, unexpired, and unused:
    it is remembered (on disk) before PAM sees it, so it is good once.
    """
    credential = job.request.credential
    assert credential is not None
    try:
        binding = SealBinding(job.job_id, policy.agent_id, job.submitted_by, 0)
        password = signer.open_sealed(credential, binding)
    except SignatureError as exc:
        return str(exc)
    expires_at = seal_expiry(credential)
    if expires_at > time.time_ns() + MAX_SEAL_LIFETIME_NS:
        return "the sealed credential expires too far in the future"
    if not seals.claim(seal_digest(credential), expires_at):
        return "the sealed credential was used before (a replay?)"
    # An empty password never reaches PAM (nullok would let it in).
    if identity is None or not password:
        return "authentication failed"
    try:
        if await asyncio.to_thread(pam_allows, policy.pam_service, user, password):
            return None
    except PamServiceMissing as exc:
        logger.error("! %s", exc)
        return str(exc)
    return "authentication failed"
