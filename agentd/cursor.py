"""Where the agent's next catch-up starts: the lowest stream sequence on its subjects it
has not settled.

Kept in ``data_dir/catchup.seq``, replaced atomically and not fsynced: a cursor lost or
stale in a crash only makes the next catch-up read from further back, and whatever it
finds again is known to the journal (taken here) or to the log (ended), so nothing
runs twice. It never moves past a message that is not settled, so nothing is lost.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from bus.paths import open_private

logger = logging.getLogger(__name__)


class Cursor:
    """The persisted catch-up start (1: from the beginning of the log)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seq = self._load()

    def _load(self) -> int:
        try:
            text = self.path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return 1
        except OSError as exc:
            logger.warning("%s: %s; catching up from the start of the log", self.path, exc)
            return 1
        if not text.isdigit() or int(text) < 1:
            logger.warning("%s: unreadable; catching up from the start of the log", self.path)
            return 1
        return int(text)

    def save(self, seq: int) -> None:
        """Remember ``seq`` (if it moved); a failure to write is logged, never raised."""
        if seq == self.seq:
            return
        self.seq = seq
        tmp = self.path.with_suffix(".tmp")
        try:
            with open_private(tmp, "w") as f:
                f.write(f"{seq}\n")
            os.replace(tmp, self.path)
        except OSError as exc:
            logger.warning("cannot keep the catch-up cursor in %s: %s", self.path, exc)
