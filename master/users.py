"""Headless users: what the master keeps so it can check a proof, and nothing more.

For each user only the bcrypt salt (with its cost), ``StoredKey`` and ``ServerKey`` of
:mod:`bus.scram`: no password and no bcrypt hash, so a leaked store lets no one log in.
The file is JSON, mode 0600, replaced atomically on every change.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from pathlib import Path

import bcrypt

from bus import UsageError
from bus.scram import derive_keys
from schemas import ids

MIN_COST = 12
MAX_PASSWORD_BYTES = 72  # bcrypt ignores anything past 72 bytes: refuse rather than truncate
_BCRYPT_ALPHABET = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


@dataclass(frozen=True)
class UserRecord:
    salt: str
    stored_key: bytes
    server_key: bytes


def check_password(password: str) -> bytes:
    """The password's bytes, if bcrypt can take it whole.

    Raises:
        UsageError: empty, or longer than 72 bytes.
    """
    raw = password.encode("utf-8")
    if not raw:
        raise UsageError("the password must not be empty")
    if len(raw) > MAX_PASSWORD_BYTES:
        raise UsageError(
            f"the password is {len(raw)} bytes; bcrypt uses at most {MAX_PASSWORD_BYTES}, "
            "so a longer one would be silently cut: choose a shorter one"
        )
    return raw


def make_record(password: str, cost: int = MIN_COST) -> UserRecord:
    """Hash a new password and derive what the store keeps."""
    if cost < MIN_COST:
        raise UsageError(f"bcrypt cost must be at least {MIN_COST}")
    salt = bcrypt.gensalt(rounds=cost)
    hashed = bcrypt.hashpw(check_password(password), salt)
    stored, server = derive_keys(hashed)
    return UserRecord(salt.decode("ascii"), stored, server)


class UserStore:
    """The user file. Reads it fresh for every lookup, so edits apply at once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pepper = self._secret()

    def _secret(self) -> bytes:
        # A per-master secret for the fake salts of unknown users. Made atomically: the
        # master and `fleet-master user add` may both create it at the same moment, and
        # neither may see it half-written.
        path = self.path.with_suffix(".secret")
        if not path.exists():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(32))
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another process made it first: use theirs
            finally:
                tmp.unlink()
        secret = path.read_bytes()
        if len(secret) != 32:
            raise UsageError(f"{path} is not a 32-byte secret")
        return secret

    def _load(self) -> dict[str, dict[str, str]]:
        try:
            data: dict[str, dict[str, str]] = json.loads(self.path.read_text())
            return data
        except FileNotFoundError:
            return {}

    def _save(self, users: dict[str, dict[str, str]]) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(users, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def get(self, user: str) -> UserRecord | None:
        entry = self._load().get(user)
        if entry is None:
            return None
        return UserRecord(
            entry["salt"], bytes.fromhex(entry["stored_key"]), bytes.fromhex(entry["server_key"])
        )

    def salt_for(self, user: str) -> str:
        """The user's salt; for an unknown user a fake one, stable and indistinguishable."""
        record = self.get(user)
        if record is not None:
            return record.salt
        digest = hmac.new(self._pepper, user.encode(), hashlib.sha256).digest()
        fake = "".join(_BCRYPT_ALPHABET[b % 64] for b in digest[:22])
        # The last character of a bcrypt salt carries only 2 bits: keep it canonical.
        fake = fake[:21] + _BCRYPT_ALPHABET[(_BCRYPT_ALPHABET.index(fake[21]) // 16) * 16]
        return f"$2b${MIN_COST:02d}${fake}"

    def put(self, user: str, record: UserRecord, *, must_exist: bool | None = None) -> None:
        problem = ids.token_problem(user, "user name")
        if problem:
            raise UsageError(problem)
        users = self._load()
        if must_exist is True and user not in users:
            raise UsageError(f"no user {user!r}")
        if must_exist is False and user in users:
            raise UsageError(f"user {user!r} exists already (use passwd)")
        users[user] = {
            "salt": record.salt,
            "stored_key": record.stored_key.hex(),
            "server_key": record.server_key.hex(),
        }
        self._save(users)

    def delete(self, user: str) -> None:
        users = self._load()
        if users.pop(user, None) is None:
            raise UsageError(f"no user {user!r}")
        self._save(users)
