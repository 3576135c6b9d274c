"""``fleet-master``: the controller's command line (after Kernun icamd)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from bus.command import add_version_flag, not_available

PROG = "fleet-master"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "The fleetbus master: folds the event log into the state of every agent, job "
            "and rollout, tracks the configured agents and who is connected, and answers "
            "status queries."
        ),
    )
    add_version_flag(parser, "-V", "--version")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fleet-master``; returns the exit code."""
    build_parser().parse_args(argv)
    return not_available(PROG, "the master")
