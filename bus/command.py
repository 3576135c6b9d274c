"""What every fleetbus command shares: version, logging, connection flags, exit codes.

Each command's ``main(argv) -> int`` parses its arguments, then hands a coroutine to
:func:`run_command`, the one boundary where exceptions become the contract's exit codes
and a one-line message on stderr. Logs go to stderr; stdout is for results.
"""

from __future__ import annotations

import argparse
import functools
import getpass
import logging
import os
import re
import sys
from collections.abc import Coroutine
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator

from bus.connection import DEFAULT_SERVER, ConnectSettings, default_server
from bus.errors import FleetError, exit_code_for
from bus.eventloop import run
from bus.keys import read_key_owner

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

TRACE = 5
"""Below DEBUG: everything, nats-py's own protocol chatter included (JAMS's TRACE)."""
logging.addLevelName(TRACE, "TRACE")

LOG_LEVEL_NAMES = ("TRACE", "DEBUG", "INFO", "WARN", "WARNING", "ERROR")
"""What ``-l`` and ``log_level`` accept, in any case; WARN is WARNING (the JAMS spelling)."""


def log_level_name(value: str) -> str:
    """The canonical name of a log level given as any of :data:`LOG_LEVEL_NAMES`.

    Raises:
        ValueError: not a level name (argparse and pydantic turn it into a usage error).
    """
    name = value.strip().upper()
    if name not in LOG_LEVEL_NAMES:
        raise ValueError(f"{value!r} is not a log level: use one of {', '.join(LOG_LEVEL_NAMES)}")
    return "WARNING" if name == "WARN" else name


LogLevel = Annotated[str, BeforeValidator(lambda v: log_level_name(str(v)))]
"""A configuration file's ``log_level``: checked and made canonical like ``-l``."""


def nats_log_level(level: str | int) -> int:
    """How much of nats-py's own logging to let through at our ``level``: its reconnect
    chatter says what ours already says, so only errors, except at TRACE."""
    number = level if isinstance(level, int) else logging.getLevelName(level)
    return logging.DEBUG if isinstance(number, int) and number <= TRACE else logging.ERROR


def add_log_level_flag(parser: argparse.ArgumentParser, help_text: str) -> None:
    """``-l/--log-level`` accepting :data:`LOG_LEVEL_NAMES` in any case."""

    def level(value: str) -> str:
        try:
            return log_level_name(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parser.add_argument(
        "-l",
        "--log-level",
        type=level,
        metavar="LEVEL",
        help=f"{help_text}: {', '.join(LOG_LEVEL_NAMES)}",
    )


@functools.cache
def fleetbus_version() -> str:
    """The installed distribution's version, as this process loaded it.

    Read once: the metadata lookup scans every installed distribution (~4 ms), once per
    identity when ``--simulate`` hosts thousands; an update is a new process anyway.
    """
    try:
        return metadata.version("fleetbus")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def add_version_flag(parser: argparse.ArgumentParser, *flags: str) -> None:
    """``--version`` (and any extra flags, e.g. ``-V``) printing ``prog X.Y.Z``."""
    parser.add_argument(
        *(flags or ("--version",)),
        action="version",
        version=f"%(prog)s {fleetbus_version()}",
        help="print the version and exit",
    )


def add_connection_args(parser: argparse.ArgumentParser) -> None:
    """``-s/--server`` (env ``FLEET_SERVER``) and ``--nkey`` (env ``FLEET_NKEY``)."""
    group = parser.add_argument_group("connection")
    group.add_argument(
        "-s",
        "--server",
        metavar="URL",
        help=f"NATS server URL, comma-separated for a cluster "
        f"(env FLEET_SERVER; default {DEFAULT_SERVER})",
    )
    group.add_argument(
        "--nkey",
        metavar="SEED_FILE",
        type=Path,
        help="nkey seed file to authenticate with, mode 0400 (env FLEET_NKEY)",
    )
    add_tls_args(group)


def add_tls_args(group: argparse._ArgumentGroup | argparse.ArgumentParser) -> None:
    """``--tls-ca``, ``--tls-cert``, ``--tls-key`` (env ``FLEET_TLS_CA`` …)."""
    for name, what in (
        ("ca", "CA bundle to verify the server"),
        ("cert", "client certificate"),
        ("key", "client key"),
    ):
        group.add_argument(
            f"--tls-{name}",
            type=Path,
            metavar="FILE",
            help=f"TLS: {what} (env FLEET_TLS_{name.upper()})",
        )


def tls_settings(args: argparse.Namespace) -> dict[str, Path | None]:
    """The TLS files from flags, else the environment."""
    out: dict[str, Path | None] = {}
    for name in ("ca", "cert", "key"):
        value = getattr(args, f"tls_{name}", None) or os.environ.get(f"FLEET_TLS_{name.upper()}")
        out[f"tls_{name}"] = Path(value) if value else None
    return out


def principal_name(nkey: Path | None = None) -> str:
    """Who is acting, made a safe token.

    ``FLEET_USER`` (an override), else the name the key file records (``fleet keys gen``
    writes it: the principal is the key's registered name), else the login name.

    Raises:
        SecretFileError: the key file is unsafe or unreadable.
    """
    raw = (
        os.environ.get("FLEET_USER")
        or (read_key_owner(nkey) if nkey is not None else None)
        or getpass.getuser()
    )
    name = re.sub(r"[^A-Za-z0-9_-]", "-", raw).strip("-_") or "operator"
    return name[:64]


def connect_settings(args: argparse.Namespace, name: str) -> ConnectSettings:
    """Settings from the connection flags, falling back to the environment, then defaults.

    Replies come to ``_INBOX_<principal>``: least-privilege servers allow no other inbox.
    """
    server = args.server or default_server()
    nkey = args.nkey or (Path(os.environ["FLEET_NKEY"]) if os.environ.get("FLEET_NKEY") else None)
    servers = [s.strip() for s in server.split(",") if s.strip()]
    return ConnectSettings(
        servers=servers,
        nkey_file=nkey,
        name=name,
        inbox_prefix=f"_INBOX_{principal_name(nkey)}",
        **tls_settings(args),
    )


def configure_logging(level: str | int = "WARNING") -> None:
    """Log to stderr at ``level``. Only entry points call this; libraries just log."""
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr, force=True)
    logging.getLogger("nats").setLevel(nats_log_level(level))


def run_command(prog: str, main: Coroutine[Any, Any, int], *, use_uvloop: bool = True) -> int:
    """Run a command's coroutine; map whatever ends it to an exit code and one message.

    Returns:
        The coroutine's own exit code, or the contract's code for the exception.
    """
    try:
        return run(main, use_uvloop=use_uvloop)
    except FleetError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        print(f"{prog}: interrupted", file=sys.stderr)
        return exit_code_for(exc)
