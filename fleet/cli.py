"""``fleet``: the operator's command line. Parses, then calls a handler; nothing more."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence

from bus.command import add_version_flag, configure_logging, log_level_name, run_command
from bus.errors import FleetError, exit_code_for
from fleet import agent, audit, demo, jobs, keys, ops, run, shell, update

PROG = "fleet"


def build_parser() -> argparse.ArgumentParser:
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
    run.add_parser(sub)
    jobs.add_parsers(sub)
    agent.add_parser(sub)
    audit.add_parsers(sub)
    keys.add_parser(sub)
    ops.add_parser(sub)
    demo.add_parser(sub)
    update.add_parser(sub)
    shell.add_parser(sub)
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
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    if getattr(args, "is_async", False):
        return run_command(PROG, args.handler(args))
    try:
        code: int = args.handler(args)
    except FleetError as exc:
        parser.exit(exit_code_for(exc), f"{PROG}: error: {exc}\n")
    return code
