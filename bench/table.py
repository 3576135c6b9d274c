"""The README's table of the latest results, rendered from ``bench/results/*.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"


def _load(results: Path, name: str) -> dict[str, Any] | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _verdict(met: bool) -> str:
    return "met" if met else "**missed**"


def rows(results: Path) -> list[list[str]]:
    """bench, fleetbus, baseline, ratio, target, verdict: one row per figure measured."""
    out: list[list[str]] = []
    if r := _load(results, "roundtrip"):
        ours, base = (
            r["fleetbus_job_roundtrip"],
            r["baseline_nats_py_request_reply_plus_subprocess"],
        )
        out.append(
            [
                f"round trip `true` ({r['count']} jobs), p50 / p99",
                f"{ours['p50_ms']:.2f} / {ours['p99_ms']:.2f} ms",
                f"{base['p50_ms']:.2f} / {base['p99_ms']:.2f} ms (request/reply + spawn)",
                f"{r['ratio_p50']}× / {r['ratio_p99']}×",
                "≤ 1.5× (p99 ≤ 3×)",
                _verdict(r["ratio_p50"] <= 1.5 and r["ratio_p99"] <= 3),
            ]
        )
    if r := _load(results, "throughput"):
        out.append(
            [
                f"throughput, {r['jobs']} jobs, `max_jobs` {r['max_jobs']}",
                f"{r['fleetbus_jobs_per_s']} jobs/s",
                f"{r['baseline_jobs_per_s']} jobs/s (request/reply + spawn, "
                f"{r['max_jobs']} at once)",
                f"{r['ratio']}× the rate",
                "≥ 0.8× the rate",
                _verdict(r["ratio"] >= 0.8),
            ]
        )
    if r := _load(results, "fanout"):
        out.append(
            [
                f"fan-out, {r['agents']} hosted agents ({r['finished']} finished)",
                f"{r['fleetbus_s']} s",
                f"{r['baseline_s']} s ({r['agents']} raw request + spawn)",
                f"{r['ratio']}×",
                "≤ 1.5×",
                _verdict(r["ratio"] <= 1.5),
            ]
        )
    if r := _load(results, "replay"):
        out.append(
            [
                f"replay, {r['events']} events",
                f"{r['fleetbus_replay_events_per_s']:,} events/s",
                f"{r['baseline_nats_py_read_events_per_s']:,} events/s (nats-py pull, no decoding)",
                f"{r['ratio_replay_time']}× the time",
                "≥ 100,000 events/s",
                _verdict(r["fleetbus_replay_events_per_s"] >= 100_000),
            ]
        )
        if "fleetbus_read_events_per_s" in r:
            out.append(
                [
                    f"replay's read alone, {r['events']} events",
                    f"{r['fleetbus_read_events_per_s']:,} events/s",
                    f"{r['baseline_nats_py_read_events_per_s']:,} events/s (pull); "
                    f"{r['baseline_nats_py_ordered_push_events_per_s']:,} (ordered push)",
                    f"{r['ratio_read_time']}× the time (to ordered push: "
                    f"{r['ratio_read_time_to_ordered_push']}×)",
                    "faster than nats-py's pull fetch",
                    _verdict(r["ratio_read_time"] < 1),
                ]
            )
    if r := _load(results, "coldstart"):
        median = r["median_wall_s"]
        out.append(
            [
                "`fleet run -a bench -- true`, whole process (median)",
                f"{median['fleet_run_true']} s (`--help`: {median['fleet_run_help']} s)",
                f"{median['baseline_import_nats']} s (`python -c 'import nats'`)",
                f"{r['ratio']}× (`--help`: {r['ratio_help']}×)",
                "≤ 1.5×",
                _verdict(r["ratio"] <= 1.5),
            ]
        )
    if r := _load(results, "memory"):
        idle, after = r["agent_idle"], r["agent_after_jobs"]
        base = r["baseline_nats_py_idle"]
        out.append(
            [
                f"idle agent RSS / PSS, then after {r['jobs']} jobs",
                f"{idle['rss_kib'] / 1024:.1f} / {idle['pss_kib'] / 1024:.1f} MiB, then "
                f"{after['rss_kib'] / 1024:.1f} / {after['pss_kib'] / 1024:.1f} MiB "
                f"({r['agent_growth_bytes_per_job']} B/job)",
                f"{base['rss_kib'] / 1024:.1f} / {base['pss_kib'] / 1024:.1f} MiB "
                "(idle nats-py client)",
                f"{r['ratio']}×",
                "≤ 45 MiB RSS, flat over jobs",
                _verdict(after["rss_kib"] <= 45 * 1024),
            ]
        )
        server0, server1 = r["nats_server_before_agents"], r["nats_server_with_agents"]
        out.append(
            [
                f"{r['hosted_agents']} idle agents hosted in one process",
                f"{r['rss_kib_per_hosted_identity']} KiB RSS per identity; nats-server "
                f"{server1['rss_kib'] / 1024:.1f} MiB",
                f"nats-server alone {server0['rss_kib'] / 1024:.1f} MiB",
                "",
                "",
                "",
            ]
        )
        if "master_with_jobs" in r:
            master, empty = r["master_with_jobs"], r["master_empty_log"]
            out.append(
                [
                    f"master with {r['master_jobs']:,} jobs folded at start "
                    f"({r['master_events_folded']:,} events)",
                    f"{master['rss_kib'] / 1024:.1f} MiB RSS ({r['master_bytes_per_job']} B/job; "
                    f"ready in {r['master_ready_s']} s)",
                    f"the same master, empty log: {empty['rss_kib'] / 1024:.1f} MiB",
                    f"{master['rss_kib'] / empty['rss_kib']:.2f}×",
                    "≤ 300 MiB",
                    _verdict(master["rss_kib"] <= 300 * 1024),
                ]
            )
    if r := _load(results, "scale"):
        n = r["agents"]
        everything = r["finished"] == r["followed"] == r["succeeded"] == n
        out.append(
            [
                f"{n:,} simulated agents ({r['procs']} processes): `fleet run -g` to all, followed",
                f"{r['fleetbus_s']} s whole run, {r['fleetbus_fanout_s']} s first submit → last "
                f"finished (submitting: {r.get('fleetbus_submit_s', '?')} s); "
                f"{r['finished']:,} finished, {r['followed']:,} followed",
                f"{r['baseline_s']} s ({n:,} raw connections: request + spawn)",
                f"{r['ratio']}× ({r['ratio_fanout']}× the fan-out)",
                "every job finished and followed",
                _verdict(everything),
            ]
        )
        out.append(
            [
                f"{n:,} simulated agents online at once",
                f"online in {r['online_s']} s; nats-server {r['nats_server_rss_mib']:.0f} MiB "
                f"(peak {r['nats_server_peak_rss_mib']:.0f}); hosts {r['host_rss_mib']:.0f} MiB",
                f"{r['baseline_online_s']} s for {n:,} raw connections; hosts "
                f"{r['baseline_host_rss_mib']:.0f} MiB",
                f"{r['ratio_online']}× the time",
                "nats-server ≤ 1 GiB",
                _verdict(r["nats_server_peak_rss_mib"] <= 1024),
            ]
        )
    return out


def _when(results: Path, default: str) -> str:
    """When each figure was measured: one time, or which benchmarks ran when."""
    runs: dict[str, list[str]] = {}
    for path in sorted(results.glob("*.json")):
        if path.name != "machine.json":
            when = json.loads(path.read_text()).get("measured_utc", default)
            runs.setdefault(when, []).append(path.stem)
    if len(runs) <= 1:
        return f"{next(iter(runs), default)} UTC"
    return "; ".join(f"{', '.join(names)} at {when} UTC" for when, names in sorted(runs.items()))


def render_table(readme: Path, results: Path) -> None:
    """Replace the table between the markers in ``readme`` with the latest results."""
    head = ["bench", "fleetbus", "baseline (same run)", "ratio", "target", ""]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows(results)]
    machine_path = results / "machine.json"
    if machine_path.exists():
        m = json.loads(machine_path.read_text())
        lines += [
            "",
            f"Measured {_when(results, m['date_utc'])} on {m['cpu'] or 'an unnamed CPU'}, "
            f"{m['cores']} cores available, {m['memory_gib']} GiB, Linux {m['kernel']}, "
            f"Python {m['python']}, {m['nats_server']}.",
        ]
    text = readme.read_text()
    if START not in text:
        text += f"\n## Latest results\n\n{START}\n{END}\n"
    before, _, rest = text.partition(START)
    _, _, after = rest.partition(END)
    readme.write_text(before + START + "\n" + "\n".join(lines) + "\n" + END + after)
