"""The master's headless login directly: challenge and response, one-use nonces, throttling.

Real bcrypt, a real user store, and a real server that receives the submitted job and
the ``auth.denied`` events; no master process.
"""

from __future__ import annotations

from pathlib import Path

import bcrypt
import pytest

from bus import Bus, Signer, decode_envelope, generate_seed, verify_envelope
from bus.log import read_log
from bus.scram import (
    auth_message,
    check_server_signature,
    client_proof,
    job_digest,
    new_nonce,
)
from master.auth import GENERIC_FAILURE, AuthFailed, AuthService
from master.users import UserStore, make_record
from schemas import ArgvCommand, JobRequest
from schemas.auth import AuthAccepted, AuthStart, AuthSubmit

PASSWORD = "correct horse battery staple"
REQUEST = JobRequest(command=ArgvCommand(argv=["backup", "--all"]))


@pytest.fixture
def users(tmp_path: Path) -> UserStore:
    store = UserStore(tmp_path / "users.json")
    store.put("batch", make_record(PASSWORD))
    store.put("other", make_record(PASSWORD))
    return store


@pytest.fixture
def master_key() -> Signer:
    return Signer(generate_seed())


@pytest.fixture
def auth(bus: Bus, users: UserStore, master_key: Signer) -> AuthService:
    return AuthService(bus, users, master_key, "master")


def salted(users: UserStore, user: str, password: str = PASSWORD) -> bytes:
    """What the client's secret file holds: the bcrypt hash under the master's salt."""
    return bcrypt.hashpw(password.encode(), users.salt_for(user).encode())


def answer(
    auth: AuthService,
    user: str,
    hashed: bytes,
    *,
    agent: str = "web-1",
    request: JobRequest = REQUEST,
    proven_request: JobRequest | None = None,
) -> AuthSubmit:
    """Run ``auth-start`` and build the client's ``auth-submit`` for ``request``.

    ``proven_request`` is what the proof covers, when it differs from what is sent.
    """
    client_nonce = new_nonce()
    challenge = auth.start(AuthStart(user=user, client_nonce=client_nonce))
    digest = job_digest(agent, (proven_request or request).model_dump(mode="python"))
    message = auth_message(user, client_nonce, challenge.server_nonce, digest)
    return AuthSubmit(
        user=user,
        client_nonce=client_nonce,
        server_nonce=challenge.server_nonce,
        proof=client_proof(hashed, message),
        agent=agent,
        request=request,
    )


async def denied_events(bus: Bus) -> int:
    return len(await read_log(bus, bus.subjects.events_stream, bus.subjects.auth_event("denied")))


async def test_the_right_proof_submits_the_job_signed_by_the_master(
    bus: Bus, auth: AuthService, users: UserStore, master_key: Signer
) -> None:
    hashed = salted(users, "batch")
    submit = answer(auth, "batch", hashed)
    accepted = await auth.submit(submit)
    assert isinstance(accepted, AuthAccepted)
    # The client can check that it talked to the master that holds its ServerKey.
    digest = job_digest("web-1", REQUEST.model_dump(mode="python"))
    message = auth_message("batch", submit.client_nonce, submit.server_nonce, digest)
    assert check_server_signature(hashed, message, accepted.server_signature)

    subject = bus.subjects.job_event("web-1", accepted.job_id, "submitted")
    [record] = await read_log(bus, bus.subjects.events_stream, subject)
    envelope = decode_envelope(record.data)
    verify_envelope(envelope, {master_key.public_key}, subject=record.subject)
    assert envelope.source == "master"
    assert envelope.data["submitted_by"] == "batch"
    assert JobRequest.model_validate(envelope.data["request"]) == REQUEST
    assert await denied_events(bus) == 0


async def test_a_wrong_password_and_an_unknown_user_fail_alike(
    bus: Bus, auth: AuthService, users: UserStore
) -> None:
    with pytest.raises(AuthFailed) as wrong:
        await auth.submit(answer(auth, "batch", salted(users, "batch", "guess")))
    with pytest.raises(AuthFailed) as nobody:
        await auth.submit(answer(auth, "nobody", salted(users, "nobody")))
    assert str(wrong.value) == str(nobody.value) == GENERIC_FAILURE
    # An unknown user gets a salt too, the same each time: asking reveals nothing.
    assert users.salt_for("nobody") == users.salt_for("nobody")
    records = await read_log(bus, bus.subjects.events_stream, bus.subjects.auth_event("denied"))
    reasons = {decode_envelope(r.data).data["reason"] for r in records}
    assert reasons == {GENERIC_FAILURE}
    assert len(records) == 2


async def test_a_server_nonce_is_good_for_one_submission(
    bus: Bus, auth: AuthService, users: UserStore
) -> None:
    submit = answer(auth, "batch", salted(users, "batch"))
    await auth.submit(submit)
    with pytest.raises(AuthFailed):
        await auth.submit(submit)  # a captured exchange, replayed
    assert await denied_events(bus) == 1


async def test_a_proof_is_bound_to_the_job_it_was_made_for(
    auth: AuthService, users: UserStore
) -> None:
    hashed = salted(users, "batch")
    other_job = JobRequest(command=ArgvCommand(argv=["rm", "-rf", "/srv"]))
    with pytest.raises(AuthFailed):
        await auth.submit(answer(auth, "batch", hashed, request=other_job, proven_request=REQUEST))
    with pytest.raises(AuthFailed):
        await auth.submit(
            AuthSubmit.model_validate(
                {**answer(auth, "batch", hashed).model_dump(), "agent": "db-1"}
            )
        )


async def test_a_nonce_is_bound_to_the_user_who_asked_for_it(
    auth: AuthService, users: UserStore
) -> None:
    batch = answer(auth, "batch", salted(users, "batch"))
    # Another user's valid proof, presented with batch's nonce.
    stolen = answer(auth, "other", salted(users, "other"))
    digest = job_digest("web-1", REQUEST.model_dump(mode="python"))
    message = auth_message("other", batch.client_nonce, batch.server_nonce, digest)
    with pytest.raises(AuthFailed):
        await auth.submit(
            AuthSubmit.model_validate(
                {
                    **stolen.model_dump(),
                    "client_nonce": batch.client_nonce,
                    "server_nonce": batch.server_nonce,
                    "proof": client_proof(salted(users, "other"), message),
                }
            )
        )


async def test_repeated_failures_throttle_the_user_even_with_the_right_password(
    bus: Bus, auth: AuthService, users: UserStore
) -> None:
    right, wrong = salted(users, "batch"), salted(users, "batch", "guess")
    # The pause doubles with each failure past the third; seven leave 16 s, far longer
    # than the next two calls take on any machine.
    for _ in range(7):
        with pytest.raises(AuthFailed):
            await auth.submit(answer(auth, "batch", wrong))
    with pytest.raises(AuthFailed) as throttled:
        await auth.submit(answer(auth, "batch", right))
    assert str(throttled.value) == GENERIC_FAILURE  # nothing tells a guesser it was right
    # Another user is not locked out by batch's failures.
    await auth.submit(answer(auth, "other", salted(users, "other")))
    assert await denied_events(bus) == 8


async def test_a_success_resets_the_count_of_failures(auth: AuthService, users: UserStore) -> None:
    right, wrong = salted(users, "batch"), salted(users, "batch", "guess")
    for _ in range(2):
        for _ in range(2):
            with pytest.raises(AuthFailed):
                await auth.submit(answer(auth, "batch", wrong))
        # Two failures, then success: never three in a row, so never throttled.
        await auth.submit(answer(auth, "batch", right))
