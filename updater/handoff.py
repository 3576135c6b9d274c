"""The contract between ``fleet-agentd-launcher`` and the agent it runs.

The launcher passes, in the environment, the install root and a pipe the agent writes
one line to once it is healthy (connected, consuming, presence written). An agent that
wants to be restarted into whatever ``current`` now points at exits with
:data:`RESTART_EXIT`. Standard library only: the launcher must not depend on anything an
update could replace.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

ROOT_ENV = "FLEET_INSTALL_ROOT"
READY_FD_ENV = "FLEET_READY_FD"
RESTART_EXIT = 75
"""``EX_TEMPFAIL``: "start me again" (into the version ``current`` names)."""
READY_LINE = b"ready\n"


def install_root_from_env() -> Path | None:
    """The install root when the launcher runs this process, else None."""
    value = os.environ.get(ROOT_ENV)
    return Path(value) if value else None


def notify_ready() -> bool:
    """Tell the launcher this agent is healthy (once). False when nobody is listening."""
    value = os.environ.pop(READY_FD_ENV, None)
    if not value:
        return False
    try:
        fd = int(value)
    except ValueError:
        return False
    try:
        os.write(fd, READY_LINE)
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    return True
