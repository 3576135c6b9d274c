"""``fleet-headless``: start one batch job from cron (after the PLANTA headless client)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from bus.command import add_version_flag, not_available

PROG = "fleet-headless"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Start a batch job on a fleetbus agent without a person present. Quiet by "
            "default. Return codes: 0 ok, 1 connection error, 2 parameter or "
            "authentication error, 3 timeout, 4 the job ran and failed."
        ),
    )
    add_version_flag(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fleet-headless``; returns the exit code."""
    build_parser().parse_args(argv)
    return not_available(PROG, "the headless client")
