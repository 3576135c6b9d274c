"""A SCRAM-shaped proof of a password (RFC 5802, with SHA-256 as in RFC 7677).

The salted password is the user's bcrypt hash (``$2b$12$…``, salt and cost included),
so the client never needs the password once it keeps that hash in its secret file. The
master stores only ``StoredKey = H(ClientKey)`` and ``ServerKey``: whoever reads the
master's user store still cannot compute a proof.

The message authenticated binds the user, both nonces and the digest of the exact job
being submitted, so a captured exchange can be neither replayed (the server nonce is
used once) nor reused for another job. Every comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from bus.codec import pack

NONCE_BYTES = 24


def _hmac(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha256).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def derive_keys(salted_password: bytes) -> tuple[bytes, bytes]:
    """``(StoredKey, ServerKey)``: what the server keeps for a user."""
    client_key = _hmac(salted_password, b"Client Key")
    return hashlib.sha256(client_key).digest(), _hmac(salted_password, b"Server Key")


def new_nonce() -> str:
    return secrets.token_urlsafe(NONCE_BYTES)


def job_digest(agent: str, request: dict[str, object]) -> str:
    """sha256 of the canonical bytes of where and what: the job the proof is for."""
    return hashlib.sha256(pack(_canonical({"agent": agent, "request": request}))).hexdigest()


def _canonical(value: object) -> object:
    if isinstance(value, dict):
        return {k: _canonical(value[k]) for k in sorted(value)}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


def auth_message(user: str, client_nonce: str, server_nonce: str, digest: str) -> bytes:
    return f"n={user},r={client_nonce},s={server_nonce},j={digest}".encode()


def client_proof(salted_password: bytes, message: bytes) -> bytes:
    """What the client sends: ``ClientKey XOR HMAC(StoredKey, AuthMessage)``."""
    client_key = _hmac(salted_password, b"Client Key")
    stored_key = hashlib.sha256(client_key).digest()
    return _xor(client_key, _hmac(stored_key, message))


def verify_proof(stored_key: bytes, message: bytes, proof: bytes) -> bool:
    """Whether ``proof`` shows knowledge of the salted password (constant-time)."""
    if len(proof) != len(stored_key):
        return False
    client_key = _xor(proof, _hmac(stored_key, message))
    return hmac.compare_digest(hashlib.sha256(client_key).digest(), stored_key)


def server_signature(server_key: bytes, message: bytes) -> bytes:
    """What the server sends back to prove it holds the user's ServerKey."""
    return _hmac(server_key, message)


def check_server_signature(salted_password: bytes, message: bytes, signature: bytes) -> bool:
    """The client's check of the server's signature (constant-time)."""
    expected = _hmac(_hmac(salted_password, b"Server Key"), message)
    return hmac.compare_digest(expected, signature)
