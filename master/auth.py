"""The master's side of the headless challenge: nonces, proofs, throttling, submission."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from bus import Bus, Signer, sign_envelope
from bus.scram import auth_message, job_digest, new_nonce, server_signature, verify_proof
from master.users import UserStore
from schemas import AuthDenied, JobSubmitted, make_envelope, new_id
from schemas.auth import AuthAccepted, AuthChallenge, AuthStart, AuthSubmit

logger = logging.getLogger(__name__)

NONCE_TTL_S = 60.0
FAILURES_BEFORE_THROTTLE = 3
THROTTLE_CAP_S = 300.0
_FAILURES_KEPT = 10_000  # invented user names must not grow the table without bound
_PENDING_KEPT = 10_000  # nor may a flood of auth-start requests grow the nonces
GENERIC_FAILURE = "authentication failed"


class AuthFailed(Exception):
    """A login failed; the message is all the client learns."""


@dataclass
class _Pending:
    user: str
    client_nonce: str
    expires: float


class AuthService:
    """Checks proofs and submits the job on the user's behalf, signed by the master."""

    def __init__(self, bus: Bus, users: UserStore, signer: Signer, master_id: str) -> None:
        self.bus = bus
        self.users = users
        self.signer = signer
        self.master_id = master_id
        self._pending: dict[str, _Pending] = {}
        self._failures: dict[str, tuple[int, float]] = {}

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

    async def submit(self, request: AuthSubmit) -> AuthAccepted:
        """Check the proof; publish the job; prove ourselves.

        Raises:
            AuthFailed: anything wrong, with one message for every cause.
        """
        user = request.user
        pending = self._pending.pop(request.server_nonce, None)  # one use, success or not
        throttled = self._throttled(user)
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
            await self._deny(user, why)
            raise AuthFailed(GENERIC_FAILURE)
        assert record is not None
        self._failures.pop(user, None)
        job_id = new_id()
        data = JobSubmitted(
            job_id=job_id, agent=request.agent, request=request.request, submitted_by=user
        )
        subject = self.bus.subjects.job_event(request.agent, job_id, "submitted")
        envelope = make_envelope(data, source=self.master_id, subject=subject)
        await self.bus.publish_event(sign_envelope(envelope, self.signer))
        logger.info("job %s submitted for headless user %s", job_id, user)
        return AuthAccepted(
            job_id=job_id, server_signature=server_signature(record.server_key, message)
        )

    def _throttled(self, user: str) -> bool:
        count, until = self._failures.get(user, (0, 0.0))
        return count >= FAILURES_BEFORE_THROTTLE and time.monotonic() < until

    async def _deny(self, user: str, why: str) -> None:
        if len(self._failures) >= _FAILURES_KEPT:
            now = time.monotonic()
            self._failures = {u: f for u, f in self._failures.items() if f[1] > now}
        count, _ = self._failures.get(user, (0, 0.0))
        count += 1
        pause = (
            0.0
            if count < FAILURES_BEFORE_THROTTLE
            else min(THROTTLE_CAP_S, 2.0 ** (count - FAILURES_BEFORE_THROTTLE))
        )
        self._failures[user] = (count, time.monotonic() + pause)
        logger.warning("! login of %s denied (%s, %d in a row)", user, why, count)
        # The event says a login failed, never whether the user exists.
        data = AuthDenied(user=user, reason=GENERIC_FAILURE)
        envelope = make_envelope(
            data, source=self.master_id, subject=self.bus.subjects.auth_event("denied")
        )
        await self.bus.publish_event(sign_envelope(envelope, self.signer))
