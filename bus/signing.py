"""Signing and verifying envelopes with nkeys (ed25519).

The producer puts its public key in ``signer`` and signs :func:`bus.codec.canonical_bytes`,
which covers every field but ``sig``, including the subject. A reader verifies the
signature against the key in the envelope and then decides separately whether it trusts
that key (``trusted``): a valid signature by a stranger proves nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import nacl.bindings
import nacl.exceptions
import nacl.public
import nkeys

from bus.codec import canonical_bytes, canonical_control_bytes, pack
from bus.errors import SignatureError, UsageError
from bus.keys import public_key_of, read_seed_file, verify_key_for
from schemas import ControlRequest, Envelope
from schemas.ids import new_id, stable_id

_STABLE_ID_CONTEXT = b"fleetbus stable event ids v1"


class Signer:
    """Holds one principal's seed and signs with it. Its repr never shows the seed."""

    __slots__ = ("_id_key", "_kp", "public_key")

    def __init__(self, seed: bytes) -> None:
        self.public_key: str = public_key_of(seed)
        self._kp = nkeys.from_seed(bytearray(seed))
        # ed25519 signatures are deterministic: the same for this key every time, and
        # unknown to anyone without the seed.
        self._id_key = hashlib.sha256(self.sign(_STABLE_ID_CONTEXT)).digest()

    @classmethod
    def from_file(cls, path: Path) -> Signer:
        """Load from a seed file (see :func:`bus.keys.read_seed_file` for the checks)."""
        return cls(read_seed_file(path))

    def stable_id(self, anchor: str, *parts: str) -> str:
        """An event id that this key gives ``anchor`` and ``parts`` on every retry, and
        that no one without this key can work out (see :func:`schemas.ids.stable_id`).

        Raises:
            ValueError: ``anchor`` is not an id made by :func:`schemas.ids.new_id`.
        """
        return stable_id(anchor, *parts, secret=self._id_key)

    def sign(self, data: bytes) -> bytes:
        """The 64-byte ed25519 signature of ``data``."""
        signature: bytes = self._kp.sign(data)
        return signature

    def open_sealed(
        self, sealed: bytes, binding: SealBinding, *, now_ns: int | None = None
    ) -> bytes:
        """Open what :func:`seal_for` sealed to this key for exactly ``binding``.

        ``binding.expires_at`` is ignored: the expiry is read from the sealed bytes,
        where the associated data authenticates it.

        Raises:
            SignatureError: not sealed to this key, sealed for another job, agent or
                submitter, altered, expired, or in the old unbound format.
        """
        if len(sealed) < _SEAL_HEADER + _AEAD.ABYTES or sealed[0] != SEAL_VERSION:
            raise SignatureError(
                "the sealed credential is not bound to its job (old or unknown format); "
                "seal it again with this version of fleet"
            )
        expires_at = int.from_bytes(sealed[1:9], "big")
        ephemeral, nonce = sealed[9:41], sealed[41:_SEAL_HEADER]
        bound = SealBinding(binding.job_id, binding.agent, binding.submitter, expires_at)
        try:
            private = bytes(self._kp._keys.to_curve25519_private_key())
            shared = nacl.bindings.crypto_scalarmult(private, ephemeral)
            key = _seal_key(shared, ephemeral, nacl.bindings.crypto_scalarmult_base(private))
            opened: bytes = _AEAD.decrypt(
                sealed[_SEAL_HEADER:], bound.associated_data(), nonce, key
            )
        except (nacl.exceptions.CryptoError, TypeError, ValueError):
            raise SignatureError(
                "the sealed credential cannot be opened here: sealed to another key, for "
                "another job, agent or submitter, or altered"
            ) from None
        if (time.time_ns() if now_ns is None else now_ns) > expires_at:
            raise SignatureError("the sealed credential has expired")
        return opened

    def __repr__(self) -> str:
        return f"Signer(public_key={self.public_key!r})"


SEAL_VERSION = 1
"""The first byte of a sealed credential: version 1 binds it to its job."""

_SEAL_TAG = b"fleetbus.seal/1"
# version (1) | expires_at ns (8, big endian) | ephemeral x25519 key (32) | nonce (24)
_SEAL_HEADER = 1 + 8 + 32 + 24


class _AEAD:
    ABYTES = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_ABYTES
    encrypt = staticmethod(nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt)
    decrypt = staticmethod(nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt)


@dataclass(frozen=True)
class SealBinding:
    """What a sealed credential is good for: one job, on one agent, from one submitter,
    until ``expires_at`` (nanoseconds since the epoch)."""

    job_id: str
    agent: str
    submitter: str
    expires_at: int

    def associated_data(self) -> bytes:
        return pack([_SEAL_TAG.decode(), self.job_id, self.agent, self.submitter, self.expires_at])


def _seal_key(shared: bytes, ephemeral: bytes, recipient: bytes) -> bytes:
    return hashlib.blake2b(
        shared + ephemeral + recipient, digest_size=32, person=_SEAL_TAG
    ).digest()


def seal_for(public_key: str, secret: bytes, binding: SealBinding) -> bytes:
    """Encrypt ``secret`` so that only the holder of ``public_key``'s seed can read it,
    and only for the job, agent and submitter of ``binding``, until its expiry.

    An ephemeral x25519 key agreement with the curve25519 form of the nkey's ed25519
    key, then XChaCha20-Poly1305 with the binding as authenticated associated data: a
    copy pasted into another job's request does not open.

    Raises:
        UsageError: not a valid nkey public key.
    """
    recipient = bytes(verify_key_for(public_key).to_curve25519_public_key())
    eph_private = nacl.public.PrivateKey.generate()
    ephemeral = bytes(eph_private.public_key)
    shared = nacl.bindings.crypto_scalarmult(bytes(eph_private), recipient)
    nonce = os.urandom(24)
    sealed: bytes = _AEAD.encrypt(
        secret, binding.associated_data(), nonce, _seal_key(shared, ephemeral, recipient)
    )
    header = bytes([SEAL_VERSION]) + binding.expires_at.to_bytes(8, "big") + ephemeral + nonce
    return header + sealed


MAX_SEAL_LIFETIME_NS = 7 * 24 * 3600 * 10**9
"""An agent refuses seals valid for longer: it remembers used ones until they expire."""


def seal_expiry(sealed: bytes) -> int:
    """When a (version 1) sealed credential expires, in ns since the epoch; 0 if unknown.

    Read without opening it: only trust it after :meth:`Signer.open_sealed` succeeded.
    """
    if len(sealed) < 9 or sealed[0] != SEAL_VERSION:
        return 0
    return int.from_bytes(sealed[1:9], "big")


def seal_digest(sealed: bytes) -> str:
    """A sealed credential's fingerprint, for remembering that it was used."""
    return hashlib.sha256(sealed).hexdigest()


def sign_envelope(envelope: Envelope, signer: Signer) -> Envelope:
    """A copy of ``envelope`` with ``signer`` set and ``sig`` over its canonical bytes."""
    unsigned = envelope.model_copy(update={"signer": signer.public_key, "sig": None})
    return unsigned.model_copy(update={"sig": signer.sign(canonical_bytes(unsigned))})


def verify_signature(public_key: str, data: bytes, signature: bytes) -> None:
    """Check an ed25519 signature by an nkey public key.

    Raises:
        SignatureError: the key is malformed or the signature does not verify.
    """
    try:
        verify_key_for(public_key).verify(data, signature)
    except UsageError as exc:
        raise SignatureError(str(exc)) from None
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, TypeError):
        raise SignatureError("signature does not verify") from None


def verify_envelope(
    envelope: Envelope,
    trusted: Collection[str] | None = None,
    *,
    subject: str | None = None,
) -> str:
    """Verify an envelope's signature and, optionally, who signed it and where it was sent.

    Args:
        envelope: the decoded envelope.
        trusted: public keys allowed to sign; None accepts any valid signer.
        subject: the subject the message arrived on, which must be the signed one.

    Returns:
        The signer's public key.

    Raises:
        SignatureError: unsigned, forged, altered, untrusted signer, or moved subject.
    """
    if envelope.signer is None or envelope.sig is None:
        raise SignatureError(f"event {envelope.id} ({envelope.type}) is not signed")
    if subject is not None and not hmac.compare_digest(subject, envelope.subject):
        raise SignatureError(
            f"event {envelope.id} was signed for {envelope.subject}, but arrived on {subject}"
        )
    verify_signature(envelope.signer, canonical_bytes(envelope), envelope.sig)
    if trusted is not None and envelope.signer not in trusted:
        raise SignatureError(
            f"event {envelope.id} is signed by {envelope.signer[:12]}…, which is not trusted"
        )
    return envelope.signer


def sign_control(
    request: ControlRequest, subject: str, signer: Signer, *, now_ns: int | None = None
) -> ControlRequest:
    """A copy of ``request`` with a fresh id and time, bound to ``subject``, signed."""
    unsigned = request.model_copy(
        update={
            "id": new_id(),
            "ts": time.time_ns() if now_ns is None else now_ns,
            "subject": subject,
            "signer": signer.public_key,
            "sig": None,
        }
    )
    data = canonical_control_bytes(
        unsigned.id, unsigned.ts, subject, signer.public_key, unsigned.args
    )
    return unsigned.model_copy(update={"sig": signer.sign(data)})


def verify_control(
    request: ControlRequest, subject: str, *, window_s: float, now_ns: int | None = None
) -> str:
    """Check a control request's signature, subject and age; return the signer's key.

    Raises:
        SignatureError: unsigned, forged, altered, sent to another subject, or signed
            more than ``window_s`` from now.
    """
    if request.signer is None or request.sig is None or request.id is None or request.ts is None:
        raise SignatureError("the control request is not signed")
    if request.subject is None or not hmac.compare_digest(request.subject, subject):
        raise SignatureError(f"the control request was signed for {request.subject}, not {subject}")
    data = canonical_control_bytes(
        request.id, request.ts, request.subject, request.signer, request.args
    )
    verify_signature(request.signer, data, request.sig)
    age = ((time.time_ns() if now_ns is None else now_ns) - request.ts) / 1e9
    if abs(age) > window_s:
        raise SignatureError(
            f"the control request was signed {age:.0f}s from now, outside the {window_s:g}s window"
        )
    return request.signer
