"""``fleet`` imports only the module of the command asked for, and misses none."""

from __future__ import annotations

import argparse
import subprocess
import sys

from fleet.cli import _MODULES, build_parser


def commands(parser: argparse.ArgumentParser) -> list[str]:
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return list(sub.choices)


def test_every_command_is_known_and_its_module_alone_builds_it() -> None:
    everything = commands(build_parser())
    assert sorted(everything) == sorted(_MODULES)
    for command in everything:
        assert command in commands(build_parser(command))


def test_run_help_imports_neither_the_audit_nor_the_operator_commands() -> None:
    probe = (
        "import sys\n"
        "from fleet.cli import main\n"
        "try:\n"
        "    main(['-l', 'INFO', 'run', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted(m for m in sys.modules if m.startswith(('fleet.', 'master.'))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = done.stdout.strip().splitlines()[-1]
    assert "fleet.run" in loaded
    for heavy in ("fleet.audit", "fleet.ops", "fleet.update", "fleet.shell", "master."):
        assert heavy not in loaded
