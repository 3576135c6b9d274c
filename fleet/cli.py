"""``fleet``: the operator's command line. Parses, then calls a handler; nothing more.

Only the module of the command asked for is imported (``fleet run`` needs neither the
audit's verifier nor the operator's provisioning): a command's start-up is most of a short
command's time.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from collections.abc import Sequence

from bus.command import add_version_flag, configure_logging, log_level_name, run_command
from bus.errors import FleetError, exit_code_for

PROG = "fleet"

_MODULES = {
    "run": "fleet.run",
    "job": "fleet.jobs",
    "jobs": "fleet.jobs",
    "agents": "fleet.jobs",
    "agent": "fleet.agent",
    "replay": "fleet.audit",
    "audit": "fleet.audit",
    "keys": "fleet.keys",
    "ops": "fleet.ops",
    "demo": "fleet.demo",
    "update": "fleet.update",
    "completion": "fleet.shell",
}
"""Each command, and the module whose ``add_parser`` or ``add_parsers`` adds it."""


def _command_in(argv: Sequence[str]) -> str | None:
    """The command ``argv`` names, if it names one before anything else positional."""
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("-l", "--log-level"):
            skip = True
        elif not arg.startswith("-"):
            return arg if arg in _MODULES else None
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or of ``command`` alone (imported alone)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Run jobs on a fleet of machines over NATS, and audit what happened. "
            "Exit codes: 0 ok, 1 connection error, 2 usage error, 3 timeout, 4 a job failed, "
            "5 verification failed (--verify), 6 a multi-target run skipped unsupported "
            "agents (the rest succeeded)."
        ),
    )
    add_version_flag(parser, "-V", "--version")
    parser.add_argument(
        "-l",
        "--log-level",
        default="WARNING",
        type=log_level_name,
        metavar="LEVEL",
        help="diagnostics on stderr: TRACE, DEBUG, INFO, WARN, ERROR (default WARNING)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    names = [_MODULES[command]] if command in _MODULES else list(dict.fromkeys(_MODULES.values()))
    for name in names:
        module = importlib.import_module(name)
        add = getattr(module, "add_parsers", None) or module.add_parser
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fleet``; returns the exit code.

    A reader that goes away (``fleet audit --json | head -2``) ends the command quietly,
    as SIGPIPE ends ``cat``: exit 141 and no traceback, whatever the subcommand.
    """
    try:
        return _main(argv)
    except BrokenPipeError:
        # Later writes (and the interpreter's final flush) go nowhere instead of failing.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser(_command_in(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    if getattr(args, "is_async", False):
        return run_command(PROG, args.handler(args))
    try:
        code: int = args.handler(args)
    except FleetError as exc:
        parser.exit(exit_code_for(exc), f"{PROG}: error: {exc}\n")
    return code
