"""nkey files: generating them, reading them safely, and parsing public keys.

A seed file is a secret. It is created with mode 0400 whatever the umask, and read only
when it is a regular file owned by the caller with no group or other permission bits,
as ssh's StrictModes does: a key others could read is a key others may have.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import stat
from functools import lru_cache
from pathlib import Path
from typing import Literal

import nacl.signing
import nkeys

from bus.errors import SecretFileError, UsageError
from bus.paths import config_file

KeyKind = Literal["agent", "operator", "admin", "master", "release", "user", "site"]
KEY_KINDS: tuple[KeyKind, ...] = ("agent", "operator", "admin", "master", "release", "user", "site")

SEED_FILE_SUFFIX = ".nk"
_MAX_SEED_FILE = 4096
_OWNER_LINE = "# fleetbus {kind} key: {name}"
_OWNER_RE = re.compile(rb"^# fleetbus ([a-z]+) key: ([A-Za-z0-9_-]{1,64})$")


def generate_seed() -> bytes:
    """A new user nkey seed (``SU...``).

    Every principal gets a *user* nkey: that is the kind nats-server accepts for client
    authentication, and the role lives in the registry, not in the key.
    """
    seed: bytes = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    return seed


def public_key_of(seed: bytes) -> str:
    """The public key (``U...``) of a seed.

    Raises:
        SecretFileError: the seed is malformed (the path is given as ``<seed>``).
    """
    try:
        kp = nkeys.from_seed(seed)
        return bytes(kp.public_key).decode("ascii")
    except (nkeys.NkeysError, binascii.Error, ValueError, TypeError):
        raise SecretFileError("<seed>", "not a valid nkey seed") from None


def write_seed_file(
    path: Path, seed: bytes, *, overwrite: bool = False, owner: tuple[str, str] | None = None
) -> None:
    """Write an nkey seed as a secret file (see :func:`write_secret_file`).

    ``owner`` is the principal's ``(kind, name)``: recorded on a comment line after the
    seed (``# fleetbus operator key: NAME``), so the file knows whose it is. Readers that
    take the seed line (this module, the nats CLI's decorated-key parser, ``head -1``)
    are unaffected.
    """
    text = seed
    if owner is not None:
        kind, name = owner
        text += b"\n" + _OWNER_LINE.format(kind=kind, name=name).encode()
    write_secret_file(path, text, overwrite=overwrite)


def write_secret_file(path: Path, secret: bytes, *, overwrite: bool = False) -> None:
    """Write ``secret`` to ``path`` with mode 0400, creating parent directories 0700.

    Raises:
        SecretFileError: the file exists (unless ``overwrite``) or cannot be written.
    """
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if overwrite and path.exists():
            path.unlink()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o400)
    except FileExistsError:
        raise SecretFileError(path, "exists already; refusing to overwrite a key") from None
    except OSError as exc:
        raise SecretFileError(path, exc.strerror or str(exc)) from None
    try:
        os.fchmod(fd, 0o400)  # the umask may have narrowed the mode; never widened it
        os.write(fd, secret + b"\n")
    finally:
        os.close(fd)


def check_secret_file(path: Path, *, allow_0600: bool = True) -> os.stat_result:
    """Check that ``path`` is a regular file of the caller's with no group/other bits.

    Returns:
        The file's stat.

    Raises:
        SecretFileError: it is missing, not a regular file, owned by someone else, or
            accessible by group or others (0400 required; 0600 accepted when allowed).
    """
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        raise SecretFileError(path, "does not exist") from None
    except OSError as exc:
        raise SecretFileError(path, exc.strerror or str(exc)) from None
    if not stat.S_ISREG(st.st_mode):
        raise SecretFileError(path, "is not a regular file")
    if st.st_uid != os.geteuid():
        raise SecretFileError(path, f"is owned by uid {st.st_uid}, not by you ({os.geteuid()})")
    mode = stat.S_IMODE(st.st_mode)
    allowed = {0o400, 0o600} if allow_0600 else {0o400}
    if mode not in allowed:
        raise SecretFileError(path, f"has mode {mode:04o}; it must be 0400 (chmod 400 {path})")
    return st


def read_seed_file(path: Path) -> bytes:
    """Read an nkey seed from a file that passes :func:`check_secret_file`.

    Raises:
        SecretFileError: the file is unsafe, unreadable or holds no valid seed.
    """
    raw = _read_key_file(path)
    # Tolerate the comment lines and framing of `nsc`-style files: take the seed line.
    for line in raw.splitlines():
        line = line.strip()
        if line.startswith(b"S") and not line.startswith(b"-"):
            try:
                public_key_of(line)
            except SecretFileError:
                continue
            return line
    raise SecretFileError(path, "holds no valid nkey seed")


def read_key_owner(path: Path) -> str | None:
    """The principal name a seed file records (``fleet keys gen``), or None (older files).

    Raises:
        SecretFileError: the file is unsafe or unreadable.
    """
    for line in _read_key_file(path).splitlines():
        match = _OWNER_RE.match(line.strip())
        if match:
            return match.group(2).decode("ascii")
    return None


def _read_key_file(path: Path) -> bytes:
    check_secret_file(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_SEED_FILE + 1)
    except OSError as exc:
        raise SecretFileError(path, exc.strerror or str(exc)) from None
    if len(raw) > _MAX_SEED_FILE:
        raise SecretFileError(path, "is too large to be an nkey seed")
    return raw


@lru_cache(maxsize=4096)
def verify_key_for(public_key: str) -> nacl.signing.VerifyKey:
    """The ed25519 verification key of an nkey public key, checksum checked.

    Raises:
        UsageError: not a valid nkey public key.
    """
    try:
        raw = base64.b32decode(public_key + "=" * (-len(public_key) % 8))
    except (binascii.Error, ValueError):
        raise UsageError(f"{public_key[:12]!r}… is not a valid nkey public key") from None
    if len(raw) != 35 or not nkeys.valid_public_prefix_byte(raw[0]):
        raise UsageError(f"{public_key[:12]!r}… is not a valid nkey public key")
    body, crc = raw[:33], raw[33:]
    if nkeys.crc16(bytearray(body)).to_bytes(2, "little") != crc:
        raise UsageError(f"{public_key[:12]!r}… is not a valid nkey public key (bad checksum)")
    return nacl.signing.VerifyKey(body[1:])


def default_key_dir() -> Path:
    """Where ``fleet keys gen`` writes: ``/etc/fleetbus/keys`` for root, else XDG config."""
    return config_file("keys")
