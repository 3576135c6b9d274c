"""``python -m bench all``: every benchmark, its JSON kept in ``bench/results/``, and the
table in the top-level ``README.md`` rendered from them with the machine they ran on.

Each benchmark runs as its own process (``python -m bench.<name>``), as it would by hand,
so one's memory or child processes never colour the next.

    python -m bench all [--quick] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.histogram import write_histogram
from bench.table import render_table

HERE = Path(__file__).parent
RESULTS = HERE / "results"
README = HERE.parent / "README.md"

FULL: dict[str, list[str]] = {
    "roundtrip": ["--count", "300"],
    "throughput": ["--jobs", "2000", "--max-jobs", "16"],
    "fanout": ["--agents", "1000"],
    "replay": ["--events", "200000"],
    "memory": ["--jobs", "2000", "--agents", "100", "--master-jobs", "100000"],
    "coldstart": ["--runs", "20"],
    "scale": ["--agents", "10000", "--procs", "4"],
}
"""Sizes for a full run: the issue's targets (1,000-agent fan-out, 10,000 agents online,
a master with 100,000 jobs)."""

QUICK: dict[str, list[str]] = {
    "roundtrip": ["--count", "3"],
    "throughput": ["--jobs", "10", "--max-jobs", "4"],
    "fanout": ["--agents", "3"],
    "replay": ["--events", "300"],
    "memory": ["--jobs", "5", "--agents", "2", "--master-jobs", "50"],
    "coldstart": ["--runs", "1"],
    "scale": ["--agents", "4", "--procs", "2"],
}
"""Tiny sizes that prove each benchmark works (the smoke test), not how fast."""


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = ""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        found = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
        model = found.group(1) if found else ""
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    nats_server = subprocess.run(
        [_nats_server(), "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "cpu": model,
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(mem_gib, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nats_server": nats_server,
    }


def _nats_server() -> str:
    from bus.embedded import nats_server_binary

    return nats_server_binary()


def run_one(name: str, args: list[str]) -> dict[str, Any]:
    """Run ``python -m bench.<name> args`` and return the JSON it printed."""
    done = subprocess.run(
        [sys.executable, "-m", f"bench.{name}", *args],
        stdout=subprocess.PIPE,
        check=True,
        timeout=3600,
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def stamp_older_results(results: Path) -> None:
    """Give each kept result without its own time the time of the run that made it (the
    previous ``machine.json``), so a table from ``--only`` runs says which figure is new."""
    machine_path = results / "machine.json"
    if not machine_path.exists():
        return
    when = json.loads(machine_path.read_text()).get("date_utc")
    for path in results.glob("*.json"):
        if path == machine_path:
            continue
        result = json.loads(path.read_text())
        if "measured_utc" not in result and when:
            result["measured_utc"] = when
            path.write_text(json.dumps(result, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("what", choices=["all"], help="run every benchmark")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: proves, not measures")
    parser.add_argument("--only", nargs="+", choices=list(FULL), help="a subset")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the JSON goes")
    parser.add_argument("--readme", type=Path, default=README, help="whose table to render")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    args.results.mkdir(parents=True, exist_ok=True)
    stamp_older_results(args.results)
    results: dict[str, dict[str, Any]] = {}
    for name in args.only or list(sizes):
        print(f"bench {name} {' '.join(sizes[name])}", file=sys.stderr, flush=True)
        results[name] = run_one(name, sizes[name])
        results[name]["measured_utc"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
        (args.results / f"{name}.json").write_text(json.dumps(results[name], indent=2) + "\n")
    host = machine()
    (args.results / "machine.json").write_text(json.dumps(host, indent=2) + "\n")
    render_table(args.readme, args.results)
    if write_histogram(args.results) is None:
        print(
            "bench: skipped roundtrip-histogram.png (needs matplotlib: pip install -e '.[bench]'"
            " and a round trip with samples)",
            file=sys.stderr,
        )
    print(json.dumps({"machine": host, **results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
