"""The round trip's latency histogram as a PNG, when matplotlib is installed.

matplotlib is an optional extra (``pip install -e '.[bench]'``): without it the
benchmarks run all the same and only the picture is skipped.
"""

from __future__ import annotations

import json
from pathlib import Path


def write_histogram(results: Path) -> Path | None:
    """Draw ``results/roundtrip-histogram.png`` from ``results/roundtrip.json``; its path,
    or None when matplotlib is missing or the round trip kept no samples.

    Raises:
        OSError: the PNG cannot be written.
    """
    source = results / "roundtrip.json"
    if not source.exists():
        return None
    samples = json.loads(source.read_text()).get("samples_ms")
    if not samples:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: a file, never a window
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ours, base = samples["fleetbus"], samples["baseline"]
    top = max(max(ours), max(base))
    bins = [top * n / 60 for n in range(61)]
    figure, axes = plt.subplots(figsize=(8, 4.5))
    axes.hist(base, bins=bins, alpha=0.6, label=f"raw nats-py request/reply + spawn ({len(base)})")
    axes.hist(ours, bins=bins, alpha=0.6, label=f"fleetbus job `true` ({len(ours)})")
    axes.set_xlabel("round trip (ms)")
    axes.set_ylabel("jobs")
    axes.set_title("Round trip of a `true` job, same run")
    axes.legend()
    figure.tight_layout()
    path = results / "roundtrip-histogram.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
