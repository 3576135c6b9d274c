"""The package boundaries, read from the source: who may import what.

Imports are read with :mod:`ast` (not text search), so a module named in a string or a
comment does not count, and ``import nats.js.api`` or ``from nats import errors`` do.
Imports under ``if TYPE_CHECKING:`` count too: a nats type in a signature outside
``bus/`` is the leak the rule is about.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bus", "schemas", "ledger", "agentd", "master", "updater", "headless", "fleet")
# Only bus/ talks to NATS; the tests and benchmarks measure it directly.
NATS_ALLOWED = ("bus", "tests", "bench")
WIRE_LIBRARIES = ("nats", "msgpack")


def _python_files() -> Iterator[Path]:
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if any(part.startswith(".") or part in ("build", "__pycache__") for part in rel.parts):
            continue  # virtual environments, caches, build output
        yield path


def imported_modules(path: Path, package: list[str] | None = None) -> list[tuple[int, str]]:
    """``(line, module)`` for every import in the file, relative ones resolved.

    ``package`` is the dotted package the file belongs to, as parts (default: from its
    place under the repository).
    """
    tree = ast.parse(path.read_bytes(), filename=str(path))
    if package is None:
        package = list(path.relative_to(ROOT).parts[:-1])
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found.append((node.lineno, module))
    return found


def _top(module: str) -> str:
    return module.split(".", 1)[0]


def _offenders(packages: tuple[str, ...], forbidden: set[str]) -> list[str]:
    """``path:line imports module`` for each import of ``forbidden`` in ``packages``."""
    found = []
    for path in _python_files():
        rel = path.relative_to(ROOT)
        top = rel.parts[0] if len(rel.parts) > 1 else ""
        if top not in packages:
            continue
        for line, module in imported_modules(path):
            if _top(module) in forbidden:
                found.append(f"{rel}:{line} imports {module}")
    return found


def test_the_walk_sees_every_package() -> None:
    """Guards the other tests: a walk that found nothing would pass them vacuously."""
    walked = [p.relative_to(ROOT).parts for p in _python_files()]
    assert set(PACKAGES) <= {parts[0] for parts in walked}
    assert not any(part.startswith(".") for parts in walked for part in parts)


def test_the_walk_reads_imports_as_python_does(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os, nats.js.api as api\n"
        "from nats import errors\n"
        "from . import busutil\n"
        "x = 'import msgpack'  # import msgpack\n"
        "def f():\n"
        "    import msgpack\n"
    )
    modules = [m for _, m in imported_modules(probe, ["tests"])]
    assert modules == ["os", "nats.js.api", "nats", "tests", "msgpack"]


# Packages already behind the boundary; the rest join as they are converted.
SEALED = ("schemas", "ledger", "agentd", "updater")


def test_sealed_packages_import_no_wire_library() -> None:
    offenders = _offenders(SEALED, set(WIRE_LIBRARIES))
    assert not offenders, "\n  ".join(["nats or msgpack outside bus/:", *offenders])


def test_only_bus_imports_the_wire_libraries() -> None:
    outside = tuple(p for p in PACKAGES if p not in NATS_ALLOWED)
    offenders = _offenders(outside, set(WIRE_LIBRARIES))
    # Top-level scripts (not in any package) are held to the same rule.
    offenders += [
        f"{p.name}:{line} imports {m}"
        for p in ROOT.glob("*.py")
        for line, m in imported_modules(p)
        if _top(m) in WIRE_LIBRARIES
    ]
    assert not offenders, (
        "only bus/ may import nats or msgpack (offer what callers need through bus/):\n  "
        + "\n  ".join(offenders)
    )


def test_ledger_does_not_import_its_users() -> None:
    offenders = _offenders(("ledger",), {"master", "fleet", "agentd", "updater", "headless"})
    assert not offenders, "ledger/ is shared by master and fleet; it imports neither:\n  " + (
        "\n  ".join(offenders)
    )


def test_bus_imports_no_fleetbus_package_but_schemas() -> None:
    others = set(PACKAGES) - {"bus", "schemas"}
    offenders = _offenders(("bus",), others)
    assert not offenders, "bus/ may import only schemas/ of fleetbus:\n  " + "\n  ".join(offenders)


# Who may import whom among fleetbus's packages: docs/protocol.md, "Parts". The agent
# hosts the updater; the master reads and writes the update settings through it.
ALLOWED: dict[str, set[str]] = {
    "schemas": set(),
    "bus": {"schemas"},
    "ledger": {"schemas", "bus"},
    "updater": {"schemas", "bus"},
    "headless": {"schemas", "bus"},
    "agentd": {"schemas", "bus", "updater"},
    "master": {"schemas", "bus", "ledger", "updater"},
    "fleet": set(PACKAGES),
}


def test_packages_import_only_what_the_protocol_allows() -> None:
    assert set(ALLOWED) == set(PACKAGES)
    offenders = []
    for package, allowed in ALLOWED.items():
        forbidden = set(PACKAGES) - allowed - {package}
        offenders += _offenders((package,), forbidden)
    assert not offenders, (
        "imports the protocol's package table does not allow (change docs/protocol.md "
        "and ALLOWED together if the design changed):\n  " + "\n  ".join(offenders)
    )


def test_schemas_imports_no_other_fleetbus_package() -> None:
    offenders = _offenders(("schemas",), set(PACKAGES) - {"schemas"})
    assert not offenders, "schemas/ imports only pydantic and the stdlib:\n  " + "\n  ".join(
        offenders
    )


def test_master_fleet_and_ledger_import_no_wire_library() -> None:
    """The rule above, named for the packages that were converted first."""
    offenders = _offenders(("master", "fleet", "ledger"), set(WIRE_LIBRARIES))
    assert not offenders, "only bus/ may import nats or msgpack:\n  " + "\n  ".join(offenders)


def test_master_and_fleet_reach_nats_only_through_bus_methods() -> None:
    """No ``bus.nc`` or ``bus.js``: the connection's raw nats-py objects stay inside bus/."""
    found = []
    for path in _python_files():
        rel = path.relative_to(ROOT)
        if rel.parts[0] not in ("master", "fleet", "ledger", "agentd", "updater"):
            continue
        for node in ast.walk(ast.parse(path.read_bytes(), filename=str(path))):
            if isinstance(node, ast.Attribute) and node.attr in ("nc", "js"):
                found.append(f"{rel}:{node.lineno} uses .{node.attr}")
    assert not found, "\n  ".join(found)
