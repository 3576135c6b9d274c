"""Signing and verifying envelopes; nkey files. No server needed."""

from __future__ import annotations

import os
from pathlib import Path

import msgpack
import pytest
from samples import sample_data, sample_envelope

from bus import (
    SecretFileError,
    SignatureError,
    Signer,
    decode_envelope,
    encode_envelope,
    generate_seed,
    public_key_of,
    read_seed_file,
    sign_envelope,
    verify_envelope,
    write_seed_file,
)
from bus.keys import check_secret_file, verify_key_for
from schemas import Envelope


@pytest.fixture
def alice() -> Signer:
    return Signer(generate_seed())


@pytest.fixture
def mallory() -> Signer:
    return Signer(generate_seed())


def signed(signer: Signer) -> Envelope:
    return sign_envelope(sample_envelope(sample_data()[0]), signer)


def test_signed_envelope_verifies_after_the_wire(alice: Signer) -> None:
    env = signed(alice)
    received = decode_envelope(encode_envelope(env))
    assert verify_envelope(received, {alice.public_key}, subject=env.subject) == alice.public_key
    assert received.signer == alice.public_key
    assert received.sig is not None


def test_signature_ignores_map_order(alice: Signer) -> None:
    env = signed(alice)
    reordered = env.model_copy(update={"data": dict(reversed(list(env.data.items())))})
    verify_envelope(reordered)


@pytest.mark.parametrize(
    "change",
    [
        {"type": "job.finished"},
        {"ts": 1},
        {"source": "bob"},
        {"subject": "fleet.evt.job.web-02.01JB3Z0000000000000000000A.submitted"},
        {"id": "01JB3Z0000000000000000000B"},
    ],
)
def test_any_altered_field_is_rejected(alice: Signer, change: dict[str, object]) -> None:
    with pytest.raises(SignatureError, match="does not verify"):
        verify_envelope(signed(alice).model_copy(update=change))


def test_altered_data_is_rejected(alice: Signer) -> None:
    env = signed(alice)
    data = {**env.data, "submitted_by": "root"}
    with pytest.raises(SignatureError, match="does not verify"):
        verify_envelope(env.model_copy(update={"data": data}))


def test_altered_bytes_on_the_wire_are_rejected(alice: Signer) -> None:
    wire = msgpack.unpackb(encode_envelope(signed(alice)))
    wire["data"]["request"]["command"]["argv"] = ["/bin/rm", "-rf", "/"]
    with pytest.raises(SignatureError):
        verify_envelope(decode_envelope(msgpack.packb(wire, use_bin_type=True)))


def test_forged_signer_claim_is_rejected(alice: Signer, mallory: Signer) -> None:
    # Mallory signs, then claims Alice's key.
    forged = signed(mallory).model_copy(update={"signer": alice.public_key})
    with pytest.raises(SignatureError, match="does not verify"):
        verify_envelope(forged, {alice.public_key})


def test_valid_signature_by_a_stranger_is_not_trusted(alice: Signer, mallory: Signer) -> None:
    with pytest.raises(SignatureError, match="not trusted"):
        verify_envelope(signed(mallory), {alice.public_key})


def test_unsigned_and_garbage_signatures(alice: Signer) -> None:
    with pytest.raises(SignatureError, match="not signed"):
        verify_envelope(sample_envelope(sample_data()[0]))
    with pytest.raises(SignatureError, match="does not verify"):
        verify_envelope(signed(alice).model_copy(update={"sig": b"\0" * 64}))
    with pytest.raises(SignatureError, match="public key"):
        verify_envelope(signed(alice).model_copy(update={"signer": "U" + "A" * 55}))


def test_event_moved_to_another_subject_is_rejected(alice: Signer) -> None:
    env = signed(alice)
    with pytest.raises(SignatureError, match="arrived on"):
        verify_envelope(env, subject="fleet.evt.job.other.J.submitted")


def test_signer_never_shows_its_seed() -> None:
    seed = generate_seed()
    signer = Signer(seed)
    assert seed.decode() not in repr(signer)
    assert signer.public_key.startswith("U")
    assert len(signer.public_key) == 56


def test_public_key_parsing_checks_the_checksum(alice: Signer) -> None:
    verify_key_for(alice.public_key)
    broken = alice.public_key[:-1] + ("A" if alice.public_key[-1] != "A" else "B")
    with pytest.raises(ValueError, match=r"checksum|not a valid"):
        verify_key_for(broken)


# --- seed files ---------------------------------------------------------------------------


def test_seed_file_is_0400_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path = tmp_path / "keys" / "a.nk"
        seed = generate_seed()
        write_seed_file(path, seed)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o400
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert read_seed_file(path) == seed
    assert public_key_of(read_seed_file(path)) == Signer(seed).public_key


def test_existing_key_is_not_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "a.nk"
    write_seed_file(path, generate_seed())
    with pytest.raises(SecretFileError, match="refusing to overwrite"):
        write_seed_file(path, generate_seed())


@pytest.mark.parametrize("mode", [0o440, 0o404, 0o644, 0o700, 0o666])
def test_open_permissions_are_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "a.nk"
    write_seed_file(path, generate_seed())
    path.chmod(mode)
    with pytest.raises(SecretFileError, match="chmod 400"):
        read_seed_file(path)


def test_0600_is_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "a.nk"
    write_seed_file(path, generate_seed())
    path.chmod(0o600)
    read_seed_file(path)
    with pytest.raises(SecretFileError):
        check_secret_file(path, allow_0600=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_foreign_owner_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.nk"
    write_seed_file(path, generate_seed())
    os.chown(path, 65534, 65534)
    with pytest.raises(SecretFileError, match="owned by uid 65534"):
        read_seed_file(path)


def test_symlinks_directories_garbage_and_missing(tmp_path: Path) -> None:
    real = tmp_path / "a.nk"
    write_seed_file(real, generate_seed())
    link = tmp_path / "link.nk"
    link.symlink_to(real)
    with pytest.raises(SecretFileError, match="not a regular file"):
        read_seed_file(link)
    with pytest.raises(SecretFileError, match="not a regular file"):
        read_seed_file(tmp_path)
    with pytest.raises(SecretFileError, match="does not exist"):
        read_seed_file(tmp_path / "nope.nk")
    junk = tmp_path / "junk.nk"
    write_seed_file(junk, b"SUNOTAREALSEED")
    with pytest.raises(SecretFileError, match="no valid nkey seed"):
        read_seed_file(junk)
