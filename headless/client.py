"""Submitting one job without a person present, and waiting for it as asked."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from bus import (
    AuthError,
    Bus,
    ConnectionFailedError,
    FleetError,
    FleetTimeoutError,
    UsageError,
    sign_envelope,
)
from bus.request import control
from bus.retry import Backoff
from bus.scram import auth_message, check_server_signature, client_proof, job_digest, new_nonce
from headless.secret import create_hash_file, read_hash, read_nkey
from schemas import JobRequest, JobSubmitted, make_envelope, new_id
from schemas.auth import AuthAccepted, AuthChallenge

logger = logging.getLogger(__name__)

AuthType = Literal["challenge", "nkey"]


@dataclass(frozen=True)
class Submission:
    user: str
    agent: str
    request: JobRequest
    auth: AuthType
    secret: Path
    master_wait_s: float = 30.0
    """How long to keep logging in again while no master answers (a failover)."""


def _show(level: int, what: str, doc: dict[str, Any]) -> None:
    if logger.isEnabledFor(level):
        logger.log(level, "%s %s", what, json.dumps(doc, default=lambda b: f"<{len(b)} bytes>"))


async def submit(bus: Bus, job: Submission) -> str:
    """Submit the job; returns its id once the event log holds it.

    Raises:
        AuthError, SecretFileError: the secret or the login failed (exit 2).
        FleetTimeoutError, ConnectionFailedError: the master or the bus did not answer.
    """
    if job.auth == "nkey":
        return await _submit_signed(bus, job)
    return await _submit_challenge(bus, job)


async def _submit_signed(bus: Bus, job: Submission) -> str:
    signer = read_nkey(job.secret)
    await _refuse_unsupported(bus, job)
    job_id = new_id()
    data = JobSubmitted(job_id=job_id, agent=job.agent, request=job.request, submitted_by=job.user)
    subject = bus.subjects.job_event(job.agent, job_id, "submitted")
    envelope = sign_envelope(make_envelope(data, source=job.user, subject=subject), signer)
    _show(logging.DEBUG, "→ publish", {"subject": subject, "job_id": job_id})
    await bus.publish_event(envelope)
    return job_id


async def _refuse_unsupported(bus: Bus, job: Submission) -> None:
    """No job for an unsupported agent (the prime directive), as far as the master knows.

    Signed submissions need no master: when none answers, the job goes (said at INFO).

    Raises:
        UsageError: the master says the agent is unsupported.
    """
    try:
        state = await _master(bus, job.user, "agent-state", {"agent": job.agent}, attempts=1)
    except FleetError as exc:
        # No master, an older one, or a server config without the op: cannot tell.
        logger.info("cannot ask whether %s is supported (%s); submitting", job.agent, exc)
        return
    if state.get("unsupported"):
        raise UsageError(
            f"agent {job.agent} is unsupported ({state['unsupported']}); the job was not submitted"
        )


async def _master(
    bus: Bus, user: str, op: str, args: dict[str, Any], attempts: int = 2
) -> dict[str, Any]:
    """Ask the master as ``user``: the server lets each headless principal name only
    itself as the caller (``<prefix>.ctl.master.<op>.<user>``)."""
    _show(logging.DEBUG, f"→ {op}", {k: v for k, v in args.items() if k != "proof"})
    subject = bus.subjects.master_control_by(op, user)
    try:
        reply = await control(bus, subject, args, timeout=10, attempts=attempts)
    except FleetTimeoutError as exc:
        # Nobody answering is the service being unreachable (1), not a job timeout (3).
        raise ConnectionFailedError(f"no master answers ({exc}); is fleet-master running?") from exc
    except FleetError as exc:
        if "authentication failed" in str(exc) or "bad request" in str(exc):
            raise AuthError(str(exc)) from None
        if "is unsupported (" in str(exc):
            raise UsageError(str(exc)) from None  # the prime directive: no job for it
        raise
    _show(logging.DEBUG - 1, f"← {op}", reply.data)
    return reply.data


async def _submit_challenge(bus: Bus, job: Submission) -> str:
    if job.secret.exists():
        salted = read_hash(job.secret)
    else:

        async def salt_of() -> str:
            return str(
                (
                    await _master(
                        bus, job.user, "auth-salt", {"user": job.user, "client_nonce": new_nonce()}
                    )
                )["salt"]
            )

        salted = await create_hash_file(job.secret, salt_of)
        logger.info("created %s (mode 0400)", job.secret)
    # One nonce for every try: the master derives the job's id from it (and the job), so
    # a login repeated after its master died submits the job once (see master.auth).
    client_nonce = new_id() + new_nonce()
    loop = asyncio.get_running_loop()
    give_up_at = loop.time() + job.master_wait_s
    while True:
        try:
            return await login(bus, job, salted, client_nonce)
        except ConnectionFailedError as exc:
            if loop.time() >= give_up_at:
                raise
            logger.info("%s; logging in again", exc)
        except FleetError as exc:
            if _NOT_ACTIVE not in str(exc) or loop.time() >= give_up_at:
                raise
            logger.info("%s; logging in again", exc)
            await asyncio.sleep(1.0)  # a pause between tries, not a wait for an event


_NOT_ACTIVE = "is not the active master"


async def login(bus: Bus, job: Submission, salted: bytes, client_nonce: str) -> str:
    """One challenge and its answer, which submits the job; returns the job's id.

    Logging in again with the same ``client_nonce`` (one that begins with a fleetbus id)
    and job gives the same id, and the master submits the job only once.

    Raises:
        AuthError: the login failed.
        ConnectionFailedError: no master answered.
    """
    challenge = AuthChallenge.model_validate(
        await _master(bus, job.user, "auth-start", {"user": job.user, "client_nonce": client_nonce})
    )
    request = job.request.model_dump(mode="python")
    message = auth_message(
        job.user, client_nonce, challenge.server_nonce, job_digest(job.agent, request)
    )
    accepted = AuthAccepted.model_validate(
        await _master(
            bus,
            job.user,
            "auth-submit",
            {
                "user": job.user,
                "client_nonce": client_nonce,
                "server_nonce": challenge.server_nonce,
                "proof": client_proof(salted, message),
                "agent": job.agent,
                "request": request,
            },
            # Not asked again with the same challenge: a master that took over from the
            # one that sent it does not know it. The whole login is repeated instead.
            attempts=1,
        )
    )
    if not check_server_signature(salted, message, accepted.server_signature):
        raise AuthError("the master could not prove it knows this user: not trusting its answer")
    return accepted.job_id


@dataclass(frozen=True)
class Outcome:
    """How a job ended, as the master tells its submitter."""

    status: str
    exit_code: int | None
    reason: str | None = None


_NOT_YET = "no job "  # the master has not folded the submission yet, or it is not ours
_POLL = Backoff(initial=0.2, cap=2.0, jitter=False)


async def wait_finished(
    bus: Bus, user: str, job_id: str, timeout: float | None, master_wait_s: float = 30.0
) -> Outcome | None:
    """The job's end, or None if ``timeout`` ran out first (the job goes on).

    Asks the master, which answers only the job's submitter: a headless user reads
    nothing of the log itself.

    Raises:
        ConnectionFailedError: no master answers for ``master_wait_s`` seconds.
        FleetError: the master refused the request.
    """
    loop = asyncio.get_running_loop()
    silent_since: float | None = None
    try:
        async with asyncio.timeout(timeout):
            attempt = 0
            while True:
                try:
                    doc = await _master(bus, user, "job-output", {"job_id": job_id}, attempts=3)
                    silent_since = None
                except ConnectionFailedError:
                    # No master answers: one may be taking over from another.
                    silent_since = silent_since or loop.time()
                    if loop.time() - silent_since >= master_wait_s:
                        raise
                    doc = {}
                except FleetError as exc:
                    if not str(exc).startswith(_NOT_YET):
                        raise
                    doc = {}
                if doc.get("finished"):
                    return Outcome(str(doc["status"]), doc.get("exit_code"), doc.get("reason"))
                # The master knows the job's end only once it has folded it: ask again.
                await asyncio.sleep(_POLL.delay(attempt))
                attempt += 1
    except TimeoutError:
        return None
