"""The master's side of the headless challenge: nonces, proofs, throttling, submission.

Failed logins are throttled per (user, caller): the caller is the headless principal
the server authenticated (see :mod:`master.callers`), so one principal guessing another
user's password slows only itself down and never locks that user out.

A login the client has to repeat (its master died before answering; it logs in again
with the next one, with the same client nonce) submits its job once: the job id is
derived from the user, the client nonce and the job (:func:`login_job_id`), and the
submission must be the first on its subject.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from bus import Bus, Signer, SubjectTakenError, UsageError, sign_envelope
from bus.publish import DEFAULT_DEADLINE_S
from bus.scram import auth_message, job_digest, new_nonce, server_signature, verify_proof
from master.users import UserStore
from schemas import AuthDenied, JobSubmitted, make_envelope, new_id
from schemas.auth import AuthAccepted, AuthChallenge, AuthStart, AuthSubmit
from schemas.ids import id_time_ns

logger = logging.getLogger(__name__)

NONCE_TTL_S = 60.0
FAILURES_BEFORE_THROTTLE = 3
THROTTLE_FIRST_S = 1.0
THROTTLE_CAP_S = 300.0
_FAILURES_KEPT = 10_000  # invented user names must not grow the table without bound
_PENDING_KEPT = 10_000  # nor may a flood of auth-start requests grow the nonces
GENERIC_FAILURE = "authentication failed"


class AuthFailed(Exception):
    """A login failed; the message is all the client learns."""


def login_job_id(signer: Signer, user: str, client_nonce: str, digest: str) -> str:
    """The id of the job a login submits: the same for every login of ``user`` with
    this client nonce and job, when the nonce begins with a fleetbus id (as
    ``fleet-headless`` makes them: that id's time is the job id's); else a new id.
    Keyed by the master's key (which every standby shares), so no one else can work it
    out in advance and take it."""
    anchor = client_nonce[:26]
    try:
        id_time_ns(anchor)
    except ValueError:
        return new_id()
    return signer.stable_id(anchor, "login", user, client_nonce, digest)


class TargetUnsupportedError(UsageError):
    """The job's agent is ``unsupported`` (off the target version, may not update): the
    master sends it no job (the prime directive). Told only to an authenticated user."""


class Throttle:
    """Failed logins by key: after ``after`` failures in a row each further attempt waits
    ``first`` seconds, doubling per failure up to ``cap``. Pure: the caller gives the time."""

    def __init__(
        self,
        *,
        after: int = FAILURES_BEFORE_THROTTLE,
        first: float = THROTTLE_FIRST_S,
        cap: float = THROTTLE_CAP_S,
        kept: int = _FAILURES_KEPT,
    ) -> None:
        self.after, self.first, self.cap, self.kept = after, first, cap, kept
        self._failures: dict[tuple[str, str], tuple[int, float]] = {}

    def blocked(self, key: tuple[str, str], now: float) -> bool:
        count, until = self._failures.get(key, (0, 0.0))
        return count >= self.after and now < until

    def failed(self, key: tuple[str, str], now: float) -> int:
        """Record a failure; returns how many in a row."""
        if len(self._failures) >= self.kept:
            self._failures = {k: f for k, f in self._failures.items() if f[1] > now}
            while len(self._failures) >= self.kept:  # all still paused: the oldest goes
                self._failures.pop(next(iter(self._failures)))
        count = self._failures.get(key, (0, 0.0))[0] + 1
        pause = (
            0.0 if count < self.after else min(self.cap, self.first * 2.0 ** (count - self.after))
        )
        self._failures[key] = (count, now + pause)
        return count

    def succeeded(self, key: tuple[str, str]) -> None:
        self._failures.pop(key, None)


@dataclass
class _Pending:
    user: str
    client_nonce: str
    expires: float


class AuthService:
    """Checks proofs and submits the job on the user's behalf, signed by the master."""

    def __init__(
        self,
        bus: Bus,
        users: UserStore,
        signer: Signer,
        master_id: str,
        throttle: Throttle | None = None,
        fence: Callable[[], float] | None = None,
        unsupported: Callable[[str], str | None] = lambda agent: None,
    ) -> None:
        """``unsupported(agent)``: why that agent may get no job, or None if it may."""
        self.bus = bus
        self.fence = fence
        """Seconds left to publish in, or raises (the master lease); None: no fence."""
        self.unsupported = unsupported
        self.users = users
        self.signer = signer
        self.master_id = master_id
        self.throttle = throttle or Throttle()
        self._pending: dict[str, _Pending] = {}

    def salt(self, user: str) -> str:
        return self.users.salt_for(user)

    def start(self, request: AuthStart) -> AuthChallenge:
        now = time.monotonic()
        self._pending = {n: p for n, p in self._pending.items() if p.expires > now}
        while len(self._pending) >= _PENDING_KEPT:  # the oldest challenge goes first
            self._pending.pop(next(iter(self._pending)))
        nonce = request.client_nonce + new_nonce()
        self._pending[nonce] = _Pending(request.user, request.client_nonce, now + NONCE_TTL_S)
        return AuthChallenge(server_nonce=nonce, salt=self.users.salt_for(request.user))

    async def submit(self, request: AuthSubmit, caller: str | None = None) -> AuthAccepted:
        """Check the proof; publish the job; prove ourselves. ``caller`` is the principal
        the request came from (None: it did not say, and all such callers share a key).

        Raises:
            AuthFailed: anything wrong, with one message for every cause.
        """
        user = request.user
        key = (user, caller or "")
        pending = self._pending.pop(request.server_nonce, None)  # one use, success or not
        throttled = self.throttle.blocked(key, time.monotonic())
        record = self.users.get(user)
        digest = job_digest(request.agent, request.request.model_dump(mode="python"))
        message = auth_message(user, request.client_nonce, request.server_nonce, digest)
        ok = (
            pending is not None
            and pending.expires > time.monotonic()
            and pending.user == user
            and pending.client_nonce == request.client_nonce
            and record is not None
            and not throttled
            and verify_proof(record.stored_key, message, request.proof)
        )
        if not ok:
            why = "throttled after repeated failures" if throttled else "bad proof, nonce or user"
            await self._deny(key, why)
            raise AuthFailed(GENERIC_FAILURE)
        assert record is not None
        self.throttle.succeeded(key)
        unsupported = self.unsupported(request.agent)
        if unsupported is not None:
            logger.warning("! job of %s for unsupported agent %s refused", user, request.agent)
            raise TargetUnsupportedError(
                f"agent {request.agent} is unsupported ({unsupported}); the job was not submitted"
            )
        job_id = login_job_id(self.signer, user, request.client_nonce, digest)
        data = JobSubmitted(
            job_id=job_id, agent=request.agent, request=request.request, submitted_by=user
        )
        subject = self.bus.subjects.job_event(request.agent, job_id, "submitted")
        envelope = make_envelope(
            data,
            source=self.master_id,
            subject=subject,
            event_id=self.signer.stable_id(job_id, "submitted"),
        )
        try:
            await self.bus.publish_event(
                sign_envelope(envelope, self.signer),
                expected_last_subject_seq=0,
                deadline_s=self._left(),
            )
        except SubjectTakenError:
            # This login was submitted once already (the master before us, or us, did
            # not get to answer): it is the same job.
            logger.info("job %s of headless user %s was submitted before", job_id, user)
        else:
            logger.info("job %s submitted for headless user %s", job_id, user)
        return AuthAccepted(
            job_id=job_id, server_signature=server_signature(record.server_key, message)
        )

    async def _deny(self, key: tuple[str, str], why: str) -> None:
        user, caller = key
        count = self.throttle.failed(key, time.monotonic())
        logger.warning(
            "! login of %s from %s denied (%s, %d in a row)", user, caller or "?", why, count
        )
        # The event says a login failed, never whether the user exists.
        data = AuthDenied(user=user, reason=GENERIC_FAILURE)
        envelope = make_envelope(
            data, source=self.master_id, subject=self.bus.subjects.auth_event("denied")
        )
        await self.bus.publish_event(sign_envelope(envelope, self.signer), deadline_s=self._left())

    def _left(self) -> float:
        return self.fence() if self.fence is not None else DEFAULT_DEADLINE_S
