"""Cold start: the whole ``fleet run`` process, against ``python -c 'import nats'``.

Three commands, interleaved run by run so a drifting machine moves all alike: the
baseline ``python -c 'import nats'`` (the floor every client pays), ``fleet run --help``
(start-up alone) and ``fleet run -a bench -- true`` (start-up, connect, submit, follow
the job on a real agent to its end). Prints medians of wall time and the ratios.

    python -m bench.coldstart [--runs N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.harness import agent_process, measure_and_print, write_agent_config
from bus import ConnectSettings, Signer, connect, generate_seed, provision, write_seed_file

FLEET = str(Path(sys.executable).parent / "fleet")


def wall_s(argv: list[str], env: dict[str, str]) -> float:
    """Seconds from start to exit of one run of ``argv`` (which must succeed)."""
    t0 = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


async def measure(url: str, work: Path, runs: int) -> dict[str, object]:
    key = work / "operator.nk"
    write_seed_file(key, generate_seed())
    config = write_agent_config(work, url, Signer.from_file(key), "bench", 4)
    env = {**os.environ, "FLEET_SERVER": url, "FLEET_NKEY": str(key), "FLEET_USER": "bench"}
    commands = {
        "baseline_import_nats": [sys.executable, "-c", "import nats"],
        "fleet_run_help": [FLEET, "run", "--help"],
        "fleet_run_true": [FLEET, "run", "-a", "bench", "--", "true"],
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    async with await connect(ConnectSettings(servers=[url])) as bus:
        await provision(bus.js)
        async with agent_process(config):
            # The agent is up once a first run returns (it may take a few tries).
            for _ in range(60):
                if await asyncio.to_thread(_succeeds, commands["fleet_run_true"], env):
                    break
                await asyncio.sleep(0.5)
            for _ in range(runs):
                for name, argv in commands.items():
                    times[name].append(await asyncio.to_thread(wall_s, argv, env))
    median = {name: round(statistics.median(t), 4) for name, t in times.items()}
    base = median["baseline_import_nats"]
    return {
        "benchmark": "coldstart",
        "runs": runs,
        "median_wall_s": median,
        "ratio_help": round(median["fleet_run_help"] / base, 3),
        "ratio": round(median["fleet_run_true"] / base, 3),
    }


def _succeeds(argv: list[str], env: dict[str, str]) -> bool:
    done = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return done.returncode == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.coldstart", description=__doc__)
    parser.add_argument("--runs", type=int, default=20, help="runs of each command")
    args = parser.parse_args(argv)
    return measure_and_print(lambda url, _pid, work: measure(url, work, args.runs))


if __name__ == "__main__":
    sys.exit(main())
