"""Latency summaries and the JSON every benchmark prints."""

from __future__ import annotations

import statistics


def summary(samples_s: list[float]) -> dict[str, float]:
    """p50, p99 and mean of latencies given in seconds, in milliseconds."""
    ms = sorted(s * 1000 for s in samples_s)
    return {
        "p50_ms": round(statistics.median(ms), 4),
        "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 4),
        "mean_ms": round(statistics.fmean(ms), 4),
    }


def ratios(ours: dict[str, float], baseline: dict[str, float]) -> dict[str, float]:
    """How many times the baseline's p50 and p99 fleetbus takes."""
    return {
        "ratio_p50": round(ours["p50_ms"] / baseline["p50_ms"], 3),
        "ratio_p99": round(ours["p99_ms"] / baseline["p99_ms"], 3),
    }
