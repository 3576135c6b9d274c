"""``fleet-agentd``: the agent daemon's command line (after JAMS agentd)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from bus.command import add_version_flag, not_available

PROG = "fleet-agentd"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "The fleetbus agent: runs the jobs sent to this machine's identity, streams "
            "their output, reports presence, and updates itself from signed bundles."
        ),
    )
    add_version_flag(parser, "-V", "--version")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fleet-agentd``; returns the exit code."""
    build_parser().parse_args(argv)
    return not_available(PROG, "the agent daemon")
