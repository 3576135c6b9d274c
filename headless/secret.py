"""The headless secret file: a bcrypt hash (challenge) or an nkey seed (nkey)."""

from __future__ import annotations

import getpass
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

import bcrypt

from bus import AuthError, SecretFileError, Signer, UsageError
from bus.keys import check_secret_file, write_secret_file

_BCRYPT_HASH = re.compile(rb"^\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}$")


def read_hash(path: Path) -> bytes:
    """The bcrypt hash in a secret file that passes the permission checks.

    Raises:
        SecretFileError: unsafe, unreadable, or not a bcrypt hash.
    """
    check_secret_file(path)
    try:
        raw = path.read_bytes().strip()
    except OSError as exc:
        raise SecretFileError(path, exc.strerror or str(exc)) from None
    if not _BCRYPT_HASH.match(raw):
        raise SecretFileError(path, "does not hold a bcrypt hash")
    return raw


async def create_hash_file(path: Path, salt_of: Callable[[], Awaitable[str]]) -> bytes:
    """First use: ask for the password (no echo), hash it with the user's salt, store 0400.

    Raises:
        UsageError: no terminal to ask on, an empty or too long password.
        SecretFileError: the file cannot be written.
    """
    try:
        password = getpass.getpass(f"password (to create {path}): ")
    except (EOFError, OSError):
        raise UsageError(
            f"{path} does not exist, and there is no terminal to ask for the password"
        ) from None
    raw = password.encode("utf-8")
    if not raw or len(raw) > 72:
        raise AuthError("the password must be 1 to 72 bytes")
    hashed: bytes = bcrypt.hashpw(raw, (await salt_of()).encode("ascii"))
    write_secret_file(path, hashed)
    return hashed


def read_nkey(path: Path) -> Signer:
    """The user's nkey from a secret file (same permission rules)."""
    return Signer.from_file(path)
