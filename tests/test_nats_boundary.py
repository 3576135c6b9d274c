"""No package outside ``bus/`` imports nats (issue 13): checked by walking the source."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Packages already behind the boundary; the rest join as they are converted.
SEALED = ("agentd", "updater", "schemas", "ledger")


def nats_imports(package: str) -> list[str]:
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                if name == "nats" or name.startswith("nats."):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {name}")
    return found


@pytest.mark.parametrize("package", SEALED)
def test_package_does_not_import_nats(package: str) -> None:
    assert nats_imports(package) == []


def test_the_walk_finds_an_import() -> None:
    assert nats_imports("bus"), "bus imports nats: the walk must see it"
