"""Every benchmark runs, with tiny sizes, and prints the JSON its readers rely on.

Nothing here is timed: ``python -m bench all --quick`` proves the benchmarks work; the
figures come from a full run (``python -m bench all``).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_every_bench_runs_and_the_table_is_rendered(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n\nhand-written text stays\n")
    results = tmp_path / "results"
    command = [sys.executable, "-m", "bench", "all", "--quick"]
    subprocess.run(
        [*command, "--results", str(results), "--readme", str(readme)],
        check=True,
        stdout=subprocess.DEVNULL,
        timeout=850,
    )

    def load(name: str) -> dict[str, object]:
        loaded: dict[str, object] = json.loads((results / f"{name}.json").read_text())
        return loaded

    fanout = load("fanout")
    assert {"agents", "finished", "fleetbus_s", "baseline_s", "ratio"} <= fanout.keys()
    assert fanout["finished"] == fanout["agents"] == 3
    throughput = load("throughput")
    assert throughput["finished"] == throughput["jobs"] == 10
    assert throughput["not_succeeded"] == 0
    roundtrip = load("roundtrip")
    assert {"fleetbus_job_roundtrip", "ratio_p50", "ratio_p99"} <= roundtrip.keys()
    assert "baseline_nats_py_request_reply_plus_subprocess" in roundtrip
    replay = load("replay")
    assert {"fleetbus_replay_events_per_s", "baseline_nats_py_read_events_per_s"} <= replay.keys()
    read_keys = {"fleetbus_read_events_per_s", "baseline_nats_py_ordered_push_events_per_s"}
    assert read_keys <= replay.keys()
    memory = load("memory")
    assert memory["jobs_finished"] == 5
    assert {"rss_kib", "pss_kib"} == set(memory["agent_idle"])  # type: ignore[arg-type]
    assert memory["master_events_folded"] == 3 * 50  # every job's three events
    assert "rss_kib" in memory["master_with_jobs"]  # type: ignore[operator]
    assert "ratio" in load("coldstart")
    scale = load("scale")
    assert scale["finished"] == scale["followed"] == scale["succeeded"] == scale["agents"] == 4
    assert {"fleetbus_s", "baseline_s", "ratio", "nats_server_rss_mib"} <= scale.keys()
    text = readme.read_text()
    assert "hand-written text stays" in text
    # One row per figure, between the markers, and the machine it ran on.
    table = text.split("<!-- bench-table:start -->")[1].split("<!-- bench-table:end -->")[0]
    assert table.count("\n| ") == 1 + 11
    assert "cores available" in table
    # The histogram is drawn when the optional extra is installed, and only then.
    png = results / "roundtrip-histogram.png"
    if importlib.util.find_spec("matplotlib") is None:
        assert not png.exists()
    else:
        assert png.read_bytes().startswith(b"\x89PNG")
