"""Where fleetbus keeps things: FHS paths for root, XDG paths for everyone else."""

from __future__ import annotations

import io
import os
import tomllib
from pathlib import Path
from typing import Any, TextIO, TypeVar

from pydantic import BaseModel

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


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) if need be, and make it 0700: state nobody else reads.

    An existing directory is narrowed too, so one made by an older version (0755) or by
    a log file's ``mkdir`` is fixed on the next start.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        path.chmod(0o700)
    return path


def open_private(path: Path, mode: str = "a") -> TextIO:
    """Open a state file for text writing (``"a"`` or ``"w"``), created 0600, kept 0600."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_APPEND if mode == "a" else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its old mode through os.open: narrow it
    return io.TextIOWrapper(io.FileIO(fd, mode), encoding="utf-8")


M = TypeVar("M", bound=BaseModel)


def anchored(config: M, config_file: Path) -> M:
    """``config`` with every relative top-level path made absolute against the directory
    of the file it came from: a daemon changes to ``/`` when it detaches, and a reload or a
    restart must find the same files the first start did."""
    base = Path(os.path.abspath(config_file)).parent
    update = {
        name: base / value
        for name, value in config
        if isinstance(value, Path) and not value.is_absolute()
    }
    return config.model_copy(update=update) if update else config


def missing_files(config: BaseModel, *names: str) -> list[str]:
    """``name: path`` for each of the named top-level path settings that is set but
    names no file: what ``--check`` reports before a start would fail on it."""
    out = []
    for name in names:
        value = getattr(config, name)
        if isinstance(value, Path) and not value.exists():
            out.append(f"{name}: {value}: no such file")
    return out
