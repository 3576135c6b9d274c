"""``fleet update status [--watch]``: the rollout as it stands, or as it moves.

``--watch`` redraws whenever an agent's presence or a fleet setting changes (two KV
watches, no polling) until the rollout is over: every online agent on the target or
unable to take it (exit 0), the rollout halted (exit 4), or ``--wait`` run out (exit 3).
With ``--json`` each refresh is one JSON line. Ctrl-C ends it quietly (130).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
from typing import Any

from bus import Bus, UsageError, connect
from bus.command import add_connection_args, connect_settings
from bus.errors import EXIT_JOB_FAILED, EXIT_OK, EXIT_TIMEOUT
from bus.kv import KeyValueStore
from bus.log import read_log
from bus.subjects import version_token
from fleet.common import presence
from ledger.driver import fold
from ledger.views import AgentView, RolloutView
from schemas import Presence
from schemas.update import UpdateSettings
from updater.settings import read_settings

REFRESH_S = 0.5
"""At most two redraws a second: a burst of heartbeats is one redraw."""

DEFAULT_WATCH_S = 3600.0


def add_parser(
    cmds: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    status = cmds.add_parser(
        "status",
        help="the target, the settings and every agent's version (--watch: live progress)",
        description="The fleet's target version, the rollout's stage and switches, and every "
        "agent's version and update state. --watch follows the rollout live until it is "
        "over: exit 0 when every online agent is on the target or cannot take it, 4 when "
        "it halted, 3 when --wait ran out; Ctrl-C stops watching (130).",
    )
    status.add_argument("--json", action="store_true", help="print JSON (one line per refresh)")
    status.add_argument(
        "-w", "--watch", action="store_true", help="redraw on every change until it is over"
    )
    status.add_argument(
        "--wait",
        type=float,
        default=DEFAULT_WATCH_S,
        metavar="S",
        help=f"with --watch: give up after S seconds (default {DEFAULT_WATCH_S:g})",
    )
    add_connection_args(status)
    status.set_defaults(handler=status_cmd, is_async=True)
    return status


async def status_cmd(args: argparse.Namespace) -> int:
    if args.wait <= 0:
        raise UsageError("--wait must be positive")
    async with await connect(connect_settings(args, "fleet update")) as bus:
        if not args.watch:
            doc = await collect(bus)
            print(json.dumps(doc) if args.json else render(doc))
            return EXIT_OK
        return await watch(bus, args.json, args.wait)


async def collect(bus: Bus) -> dict[str, Any]:
    """The status document: settings, presence and the log, read now."""
    settings = await read_settings(bus)
    online = await presence(bus)
    # Agents that are not online: their last known version, from their own events.
    known = fold(
        await read_log(bus, bus.subjects.events_stream, f"{bus.subjects.prefix}.evt.agent.>")
    ).agents
    rollout: RolloutView | None = None
    if settings.target is not None:
        v = settings.target.version
        subject = f"{bus.subjects.prefix}.evt.update.{version_token(v)}.>"
        projection = fold(await read_log(bus, bus.subjects.events_stream, subject))
        rollout = projection.rollouts.get(v)
    return status_doc(settings, online, known, rollout)


def status_doc(
    settings: UpdateSettings,
    online: dict[str, Presence],
    known: dict[str, AgentView],
    rollout: RolloutView | None,
) -> dict[str, Any]:
    """The ``fleet update status --json`` document, with its ``progress`` summary."""
    target = settings.target
    agents: list[dict[str, Any]] = []
    for agent_id in sorted(set(online) | set(known)):
        p = online.get(agent_id)
        view = known.get(agent_id)
        version = p.version if p else (view.version if view else None)
        agents.append(
            {
                "id": agent_id,
                "online": p is not None,
                "version": version,
                "state": p.state if p else "offline",
                "update": p.update if p else (view.unsupported if view else None),
                "on_target": target is not None and version == target.version,
                "rollout": rollout.agents.get(agent_id) if rollout else None,
            }
        )
    live = [a for a in agents if a["online"]]
    progress = {
        "online": len(live),
        "on_target": sum(1 for a in live if a["on_target"]),
        "updating": sorted(str(a["id"]) for a in live if a["state"] == "updating"),
        "unsupported": sorted(
            str(a["id"]) for a in live if a["state"] == "unsupported" and not a["on_target"]
        ),
        "failed": sorted(
            a for a, s in (rollout.agents if rollout else {}).items() if s == "failed"
        ),
    }
    stage = settings.stage_of(target.version) if target else None
    return {
        "target": target.model_dump(mode="json") if target else None,
        "stage": stage,
        "enabled": settings.enabled,
        "paused": settings.paused,
        "max_concurrent": settings.max_concurrent,
        "retry_after_s": settings.retry_after_s,
        "rollout": rollout.to_json() if rollout else None,
        "progress": progress,
        "agents": agents,
    }


def outcome(doc: dict[str, Any]) -> int | None:
    """How a watched rollout ended (an exit code), or None while it goes on."""
    if doc["target"] is None:
        return None
    if doc["stage"] == "halted":
        return EXIT_JOB_FAILED
    p = doc["progress"]
    if p["online"] and p["on_target"] + len(p["unsupported"]) == p["online"]:
        return EXIT_OK
    return None


def progress_line(doc: dict[str, Any], width: int = 20) -> str:
    """``1.1.0 [#########-----------] 3/7 on target; updating: a2; …`` for one glance."""
    p = doc["progress"]
    if doc["target"] is None:
        return "no target version (fleet update announce VERSION)"
    done, total = p["on_target"], p["online"]
    filled = round(width * done / total) if total else 0
    parts = [f"{doc['target']['version']} [{'#' * filled}{'-' * (width - filled)}] "]
    parts.append(f"{done}/{total} on target, stage {doc['stage']}")
    for key in ("updating", "failed", "unsupported"):
        if p[key]:
            parts.append(f"; {key}: {', '.join(p[key][:5])}" + ("…" if len(p[key]) > 5 else ""))
    if doc["paused"]:
        parts.append("; PAUSED")
    return "".join(parts)


def render(doc: dict[str, Any], max_rows: int | None = None) -> str:
    """The human table; at most ``max_rows`` agent rows (the rest counted), if given."""
    target, rollout = doc["target"], doc["rollout"]
    lines = [f"target:         {target['version'] if target else '(none)'}"]
    if target:
        lines.append(f"stage:          {doc['stage']}")
        lines.append(f"progress:       {progress_line(doc)}")
    lines.append(
        f"updates:        {'enabled' if doc['enabled'] else 'DISABLED'}"
        f"{', paused' if doc['paused'] else ''}"
    )
    lines.append(f"max concurrent: {doc['max_concurrent']}")
    if rollout is not None:
        halted = f"; halted: {rollout['halted']}" if rollout["halted"] else ""
        lines.append(
            f"failures:       {rollout['failures']} (max {rollout['max_failures']}){halted}"
        )
    lines += ["", f"{'AGENT':<20} {'VERSION':<12} {'STATE':<12} NOTE"]
    rows = doc["agents"]
    shown = rows if max_rows is None else rows[: max(max_rows, 1)]
    for agent in shown:
        note = agent["update"] or agent["rollout"] or ""
        version = agent["version"] or "?"
        lines.append(f"{agent['id']:<20} {version:<12} {agent['state']:<12} {note}")
    if len(shown) < len(rows):
        lines.append(f"… and {len(rows) - len(shown)} more (fleet update status --json)")
    return "\n".join(lines)


async def watch(bus: Bus, as_json: bool, wait: float) -> int:
    """Redraw on every change until the rollout is over or ``wait`` seconds pass."""
    changed = asyncio.Event()
    kvs = [await bus.kv(b) for b in (bus.subjects.presence_bucket, bus.subjects.config_bucket)]
    tty = sys.stdout.isatty() and not as_json
    last = ""
    try:
        async with asyncio.timeout(wait), asyncio.TaskGroup() as tg:
            pumps = [tg.create_task(_note_changes(kv, changed)) for kv in kvs]
            try:
                while True:
                    changed.clear()
                    doc = await collect(bus)
                    last = _show(doc, as_json, tty, last)
                    code = outcome(doc)
                    if code is not None:
                        return code
                    await changed.wait()
                    await asyncio.sleep(REFRESH_S)  # coalescing a burst, not waiting for it
            finally:
                for pump in pumps:
                    pump.cancel()
    except TimeoutError:
        print(f"fleet: --wait ran out after {wait:g}s; the rollout goes on", file=sys.stderr)
        return EXIT_TIMEOUT


def _show(doc: dict[str, Any], as_json: bool, tty: bool, last: str) -> str:
    """Print ``doc`` if it differs from what was shown last; returns what is shown now."""
    if as_json:
        text = json.dumps(doc)
    elif tty:
        size = shutil.get_terminal_size()
        text = "\x1b[H\x1b[J" + render(doc, max_rows=max(size.lines - 10, 3))
    else:
        text = progress_line(doc)
    if text != last:
        print(text, flush=True)
    return text


async def _note_changes(kv: KeyValueStore, changed: asyncio.Event) -> None:
    async with kv.watch() as updates:
        async for entry in updates:
            if entry is not None:
                changed.set()
