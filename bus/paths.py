"""Where fleetbus keeps things: FHS paths for root, XDG paths for everyone else."""

from __future__ import annotations

import os
from pathlib import Path


def config_file(name: str) -> Path:
    """``/etc/fleetbus/NAME`` for root, else ``$XDG_CONFIG_HOME/fleetbus/NAME``."""
    if os.geteuid() == 0:
        return Path("/etc/fleetbus") / name
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "fleetbus" / name


def data_dir(name: str) -> Path:
    """``/var/lib/fleetbus/NAME`` for root, else ``$XDG_DATA_HOME/fleetbus/NAME``."""
    if os.geteuid() == 0:
        return Path("/var/lib/fleetbus") / name
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "fleetbus" / name
