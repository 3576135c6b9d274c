"""The agent's recent log lines, kept in memory for the ``log`` control operation."""

from __future__ import annotations

import collections
import logging
import threading

_CAPACITY = 2000


class RingBufferHandler(logging.Handler):
    """Keeps the last few thousand formatted log lines."""

    def __init__(self, capacity: int = _CAPACITY) -> None:
        super().__init__(logging.DEBUG)
        self.lines: collections.deque[str] = collections.deque(maxlen=capacity)
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # a broken record must not break logging
            self.handleError(record)
            return
        with self._guard:
            self.lines.append(line)


_handler = RingBufferHandler()
_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))


def install() -> None:
    """Collect the ``agentd`` and ``bus`` loggers' lines (idempotent)."""
    for name in ("agentd", "bus"):
        log = logging.getLogger(name)
        if _handler not in log.handlers:
            log.addHandler(_handler)


def recent_log_lines(count: int) -> list[str]:
    """The last ``count`` lines, oldest first."""
    with _handler._guard:
        return list(_handler.lines)[-count:]
