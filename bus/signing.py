"""Signing and verifying envelopes with nkeys (ed25519).

The producer puts its public key in ``signer`` and signs :func:`bus.codec.canonical_bytes`,
which covers every field but ``sig``, including the subject. A reader verifies the
signature against the key in the envelope and then decides separately whether it trusts
that key (``trusted``): a valid signature by a stranger proves nothing.
"""

from __future__ import annotations

import hmac
from collections.abc import Collection
from pathlib import Path

import nacl.exceptions
import nacl.public
import nkeys

from bus.codec import canonical_bytes
from bus.errors import SignatureError, UsageError
from bus.keys import public_key_of, read_seed_file, verify_key_for
from schemas import Envelope


class Signer:
    """Holds one principal's seed and signs with it. Its repr never shows the seed."""

    __slots__ = ("_kp", "public_key")

    def __init__(self, seed: bytes) -> None:
        self.public_key: str = public_key_of(seed)
        self._kp = nkeys.from_seed(bytearray(seed))

    @classmethod
    def from_file(cls, path: Path) -> Signer:
        """Load from a seed file (see :func:`bus.keys.read_seed_file` for the checks)."""
        return cls(read_seed_file(path))

    def sign(self, data: bytes) -> bytes:
        """The 64-byte ed25519 signature of ``data``."""
        signature: bytes = self._kp.sign(data)
        return signature

    def open_sealed(self, sealed: bytes) -> bytes:
        """Open what :func:`seal_for` sealed to this key.

        Raises:
            SignatureError: not sealed to this key, or altered.
        """
        try:
            private = self._kp._keys.to_curve25519_private_key()
            opened: bytes = nacl.public.SealedBox(private).decrypt(sealed)
        except (nacl.exceptions.CryptoError, TypeError, ValueError):
            raise SignatureError("the sealed credential cannot be opened with this key") from None
        return opened

    def __repr__(self) -> str:
        return f"Signer(public_key={self.public_key!r})"


def seal_for(public_key: str, secret: bytes) -> bytes:
    """Encrypt ``secret`` so that only the holder of ``public_key``'s seed can read it.

    A libsodium sealed box to the curve25519 form of the nkey's ed25519 key: anonymous,
    and authenticated against tampering.

    Raises:
        UsageError: not a valid nkey public key.
    """
    curve = verify_key_for(public_key).to_curve25519_public_key()
    sealed: bytes = nacl.public.SealedBox(curve).encrypt(secret)
    return sealed


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
