"""Sealed credentials this agent has accepted, remembered until they expire.

A sealed run-as password is bound to one job (see :func:`bus.signing.seal_for`); this
store makes it good for one use as well. It is a file of JSON lines in ``data_dir``
(0600), fsynced before the password is tried, so a restart does not reopen the window.
Expired entries are dropped when the file is loaded.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from bus.paths import open_private, private_dir

logger = logging.getLogger(__name__)


class UsedSeals:
    """Fingerprints of accepted sealed credentials, each with its expiry."""

    def __init__(self, path: Path) -> None:
        self.path = path
        private_dir(path.parent)
        self._used: dict[str, int] = {}
        self._load()
        self._rewrite()  # drops what expired, and narrows an old file to 0600

    def _load(self) -> None:
        if not self.path.exists():
            return
        now = time.time_ns()
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                try:
                    entry = json.loads(line)
                    digest, expires = str(entry["seal"]), int(entry["expires_at"])
                except (ValueError, KeyError, TypeError):
                    logger.warning("%s:%d: unreadable line skipped", self.path, number)
                    continue
                if expires >= now:
                    self._used[digest] = expires

    def _rewrite(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        with open_private(tmp, "w") as f:
            for digest, expires in self._used.items():
                f.write(json.dumps({"seal": digest, "expires_at": expires}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def claim(self, digest: str, expires_at: int) -> bool:
        """Record ``digest`` as used; False if it was used before (a replay)."""
        if digest in self._used:
            return False
        with open_private(self.path, "a") as f:
            f.write(json.dumps({"seal": digest, "expires_at": expires_at}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._used[digest] = expires_at
        return True
