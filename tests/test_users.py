"""The master's user store: no secret, no hash, and safe to open from several processes."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from master.users import UserStore


def _pepper(directory: str) -> bytes:
    return UserStore(Path(directory) / "users.json")._pepper


def test_concurrent_first_opens_agree_on_one_secret(tmp_path: Path) -> None:
    # The master and `fleet-master user add` may create the store's secret at once.
    with multiprocessing.get_context("spawn").Pool(8) as pool:
        secrets = pool.map(_pepper, [str(tmp_path)] * 32)
    assert len(set(secrets)) == 1
    assert len(secrets[0]) == 32
    assert (tmp_path / "users.secret").stat().st_mode & 0o777 == 0o600
    assert not list(tmp_path.glob("*.tmp"))


def test_unknown_users_get_a_stable_plausible_salt(tmp_path: Path) -> None:
    store = UserStore(tmp_path / "users.json")
    salt = store.salt_for("nobody")
    assert salt == store.salt_for("nobody")
    assert salt != store.salt_for("somebody")
    assert salt.startswith("$2b$12$")
    assert len(salt) == 29
