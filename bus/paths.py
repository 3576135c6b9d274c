"""Where fleetbus keeps things: FHS paths for root, XDG paths for everyone else."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from bus.errors import UsageError


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


def read_toml(path: Path, hint: str = "") -> dict[str, Any]:
    """A TOML file's table.

    Raises:
        UsageError: missing (with ``hint`` on how to make one), unreadable, or not TOML.
    """
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such config file{hint}") from None
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML: {exc}") from None
