"""``fleet job show|wait|logs|cancel ID``, ``fleet jobs`` and ``fleet agents``.

All of them read the event log (and presence) directly, so they work with no master.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import sys
import time
from typing import Any

from bus import Bus, UsageError, check_token, connect
from bus.codec import HEADER_OUTPUT_STREAM
from bus.command import add_connection_args, connect_settings
from bus.errors import EXIT_JOB_FAILED, EXIT_OK, EXIT_TIMEOUT
from bus.log import read_log
from fleet.audit import parse_time
from fleet.common import (
    ask_master,
    job_projection,
    offline_since,
    operator_signer,
    presence,
    publish_signed,
)
from fleet.follow import JobFollower, OutputPrinter
from fleet.table import cut, format_table, print_table, terminal_width
from ledger.driver import fold
from ledger.projection import Projection
from ledger.views import AgentView, JobView, iso
from schemas import TERMINAL_STATUSES, JobCancelRequested, Presence

logger = logging.getLogger(__name__)


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    job = sub.add_parser("job", help="show, wait for, read or cancel one job")
    job_sub = job.add_subparsers(dest="job_command", required=True, metavar="COMMAND")

    show = job_sub.add_parser("show", help="a job's status, times and output tail")
    show.add_argument("job_id", metavar="ID")
    show.add_argument("--json", action="store_true", help="print a JSON document")
    show.set_defaults(handler=show_job)

    wait = job_sub.add_parser(
        "wait", help="wait for a job to end; exit 0, 4 (failed) or 3 (--wait ran out)"
    )
    wait.add_argument("job_id", metavar="ID")
    wait.add_argument("--wait", type=float, metavar="S", help="give up after S seconds")
    wait.add_argument("--json", action="store_true", help="print a JSON document")
    wait.set_defaults(handler=wait_job)

    logs = job_sub.add_parser(
        "logs", help="a job's stored output (stdout to stdout, stderr to stderr)"
    )
    logs.add_argument("job_id", metavar="ID")
    logs.add_argument(
        "-f", "--follow", action="store_true", help="keep printing until the job ends"
    )
    logs.set_defaults(handler=job_logs)

    cancel = job_sub.add_parser("cancel", help="ask the agent to stop a job")
    cancel.add_argument("job_id", metavar="ID")
    cancel.add_argument("--reason", help="why, for the record")
    cancel.add_argument(
        "--wait", type=float, metavar="S", help="wait up to S seconds for the job to end"
    )
    cancel.set_defaults(handler=cancel_job)

    jobs = sub.add_parser("jobs", help="recent jobs, from the event log")
    jobs.add_argument("--agent", metavar="AGENT", help="only this agent's jobs")
    jobs.add_argument(
        "--status",
        choices=STATUSES,
        metavar="STATUS",
        help=f"only jobs in this status: {', '.join(STATUSES)}",
    )
    jobs.add_argument(
        "--since", metavar="TIME", help="only jobs submitted since: ISO 8601, or 30m, 2h, 7d ago"
    )
    jobs.add_argument("--user", metavar="USER", help="only jobs submitted by this principal")
    jobs.add_argument(
        "-n", "--limit", type=int, default=50, metavar="N", help="newest N (default 50; 0: all)"
    )
    jobs.add_argument("--json", action="store_true", help="print a JSON document")
    jobs.set_defaults(handler=list_jobs)

    agents = sub.add_parser("agents", help="agents: online from presence, the rest from the log")
    agents.add_argument("--json", action="store_true", help="print a JSON document")
    agents.set_defaults(handler=list_agents)

    for parser in (show, wait, logs, cancel, jobs, agents):
        add_connection_args(parser)
        parser.set_defaults(is_async=True)


JOB_ID_LENGTH = 26
STATUSES = ("submitted", "running", *sorted(TERMINAL_STATUSES))


async def _find(bus: Bus, job_id: str) -> JobView:
    """The job with this id, or with the only id that starts with it.

    Raises:
        UsageError: no such job, or the prefix is ambiguous (the candidates are listed).
    """
    job_id = check_token(job_id, "job id").upper()
    if len(job_id) < JOB_ID_LENGTH:
        job_id = await _complete(bus, job_id)
    view = (await job_projection(bus, job_id)).jobs.get(job_id)
    if view is None:
        raise UsageError(f"no job {job_id} in the event log")
    return view


async def _complete(bus: Bus, prefix: str) -> str:
    subject = f"{bus.subjects.prefix}.evt.job.*.*.submitted"
    records = await read_log(bus, bus.subjects.events_stream, subject)
    ids = sorted({r.subject.split(".")[-2] for r in records} if records else set())
    matches = [i for i in ids if i.startswith(prefix)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise UsageError(f"no job id starts with {prefix} in the event log")
    shown = ", ".join(matches[:10]) + (" …" if len(matches) > 10 else "")
    raise UsageError(f"job id prefix {prefix} is ambiguous: {len(matches)} jobs ({shown})")


def _print_view(view: JobView, note: str | None) -> None:
    rows = [
        ("job", view.job_id),
        ("agent", view.agent),
        ("status", view.status + (f" ({note})" if note else "")),
        ("command", view.command),
        ("submitted by", view.submitted_by),
        (
            "run as",
            view.run_as
            or f"(agent's user{': ' + view.effective_user if view.effective_user else ''})",
        ),
        ("submitted", iso(view.submitted_at)),
        ("started", iso(view.started_at)),
        ("finished", iso(view.finished_at)),
        ("duration", f"{view.duration_s:.3f}s" if view.duration_s is not None else None),
        ("exit code", view.exit_code),
        ("signal", view.signal),
        ("reason", view.reason),
        # Outcomes that lost the race for the job's end: beside the outcome, never it.
        (
            "late result",
            "; ".join(
                str(late["status"]) + (f" ({late['reason']})" if late.get("reason") else "")
                for late in view.late_results
            )
            or None,
        ),
        (
            "output",
            f"{view.stdout_bytes} bytes stdout, {view.stderr_bytes} bytes stderr"
            + (" (truncated)" if view.truncated else "")
            if view.finished
            else None,
        ),
    ]
    for name, value in rows:
        if value is not None:
            print(f"{name + ':':<14}{value}")
    if view.output_tail:
        print("output tail:")
        print(view.output_tail, end="" if view.output_tail.endswith("\n") else "\n")


async def _queued_note(bus: Bus, view: JobView) -> str | None:
    if view.status != "submitted":
        return None
    if view.agent in await presence(bus):
        return "agent online, not started yet"
    return await offline_since(bus, view.agent)


async def show_job(args: argparse.Namespace) -> int:
    async with await connect(connect_settings(args, "fleet job")) as bus:
        view = await _find(bus, args.job_id)
        note = await _queued_note(bus, view)
    if args.json:
        doc = view.to_json(tail=True)
        if note:
            doc["note"] = note
        print(json.dumps(doc))
    else:
        _print_view(view, note)
    return EXIT_OK


async def _wait_for(
    bus: Bus, view: JobView, seconds: float | None, printer: OutputPrinter | None
) -> JobView | None:
    follower = await JobFollower(bus, view.agent, view.job_id, printer).start()
    try:
        async with asyncio.timeout(seconds):
            await follower.done.wait()
    except TimeoutError:
        return None
    finally:
        await follower.close()
    return follower.view


async def wait_job(args: argparse.Namespace) -> int:
    async with await connect(connect_settings(args, "fleet job")) as bus:
        view = await _find(bus, args.job_id)
        final = await _wait_for(bus, view, args.wait, None)
        if final is None:
            current = (await job_projection(bus, view.job_id)).jobs[view.job_id]
            note = await _queued_note(bus, current)
            state = current.status + (f" ({note})" if note else "")
            if args.json:
                print(json.dumps({**current.to_json(), "note": note}))
            print(f"fleet: job {view.job_id} still {state} after {args.wait:g}s", file=sys.stderr)
            return EXIT_TIMEOUT
    if args.json:
        print(json.dumps(final.to_json()))
    else:
        print(
            f"{final.agent}: {final.status}"
            + (f" (exit {final.exit_code})" if final.exit_code is not None else "")
        )
    return EXIT_OK if final.status == "succeeded" else EXIT_JOB_FAILED


async def job_logs(args: argparse.Namespace) -> int:
    async with await connect(connect_settings(args, "fleet job")) as bus:
        view = await _find(bus, args.job_id)
        if args.follow:
            await _wait_for(bus, view, None, OutputPrinter(prefix=False))
            return EXIT_OK
        subject = bus.subjects.output(view.agent, view.job_id)
        records = await read_log(bus, bus.subjects.output_stream, subject)
        for record in records:
            stream = record.headers.get(HEADER_OUTPUT_STREAM, "stdout")
            target = sys.stdout.buffer if stream == "stdout" else sys.stderr.buffer
            target.write(record.data)
        sys.stdout.flush()
        if view.finished and view.output_chunks == 0 and view.stdout_bytes + view.stderr_bytes:
            print(
                "fleet: the output is no longer stored (expired from the output stream)",
                file=sys.stderr,
            )
        elif view.finished and len(records) < view.output_chunks:
            # Never a silent short read: the agent counted what it stored.
            print(
                f"fleet: only {len(records)} of the {view.output_chunks} output chunks the "
                "agent stored are there (expired from the output stream, or removed); "
                "the output above is incomplete",
                file=sys.stderr,
            )
    return EXIT_OK


async def cancel_job(args: argparse.Namespace) -> int:
    who, signer = operator_signer(args.nkey)
    async with await connect(connect_settings(args, "fleet job")) as bus:
        view = await _find(bus, args.job_id)
        if view.finished:
            print(f"fleet: job {view.job_id} already ended: {view.status}", file=sys.stderr)
            return EXIT_OK
        data = JobCancelRequested(
            job_id=view.job_id, agent=view.agent, requested_by=who, reason=args.reason
        )
        await publish_signed(
            bus,
            data,
            who,
            signer,
            bus.subjects.job_event(view.agent, view.job_id, "cancel_requested"),
        )
        print(f"fleet: cancel of job {view.job_id} on {view.agent} requested", file=sys.stderr)
        if args.wait is None:
            return EXIT_OK
        final = await _wait_for(bus, view, args.wait, None)
    if final is None:
        print(f"fleet: job {view.job_id} has not ended within {args.wait:g}s", file=sys.stderr)
        return EXIT_TIMEOUT
    print(f"{final.agent}: {final.status}")
    return EXIT_OK


async def _log_projection(bus: Bus) -> Projection:
    stream = bus.subjects.events_stream
    records = await read_log(bus, stream, bus.subjects.job_events())
    records += await read_log(bus, stream, f"{bus.subjects.prefix}.evt.agent.>")
    records.sort(key=lambda r: r.seq)
    return fold(records)


async def list_jobs(args: argparse.Namespace) -> int:
    since = iso(parse_time(args.since)) if args.since else None
    # The master knows no --since/--user: ask it for every job and filter here.
    local = since is not None or args.user is not None
    filters = {"agent": args.agent, "status": args.status, "limit": 0 if local else args.limit}
    async with await connect(connect_settings(args, "fleet jobs")) as bus:
        online = await presence(bus)
        doc = await ask_master(bus, "jobs", filters)
        if doc is None:
            projection = await _log_projection(bus)
            jobs = sorted(projection.jobs.values(), key=lambda j: j.job_id)
            if args.agent:
                jobs = [j for j in jobs if j.agent == args.agent]
            if args.status:
                jobs = [j for j in jobs if j.status == args.status]
            doc = {
                "jobs": [j.to_json() for j in jobs],
                "agents": [a.to_json() for a in _agents(projection, online)],
                "seq": projection.seq,
            }
            local = True
        else:
            doc["agents"] = _overlay_presence(doc["agents"], online)
    if local:
        rows = [
            j
            for j in doc["jobs"]
            if (since is None or (j.get("submitted_at") or "") >= since)
            and (args.user is None or j.get("submitted_by") == args.user)
        ]
        doc["jobs"] = rows[-args.limit :] if args.limit else rows
    if args.json:
        print(json.dumps(doc))
        return EXIT_OK
    rows = [
        [
            j["job_id"],
            j["agent"],
            j["status"],
            "" if j["exit_code"] is None else str(j["exit_code"]),
            j["submitted_at"] or "",
            j["command"] or "",
        ]
        for j in doc["jobs"]
    ]
    print_table(["JOB", "AGENT", "STATUS", "EXIT", "SUBMITTED", "COMMAND"], rows)
    return EXIT_OK


def _overlay_presence(
    agents: list[dict[str, Any]], online: dict[str, Presence]
) -> list[dict[str, Any]]:
    """Agents as the log (or master) knows them, with live facts from presence on top."""
    by_id = {a["id"]: dict(a) for a in agents}
    for agent_id, p in online.items():
        row = by_id.setdefault(agent_id, {"id": agent_id, "configured": False})
        row.update(
            online=True,
            version=p.version,
            labels=dict(p.labels),
            last_seen=iso(p.ts),
            running=list(p.running),
            state=p.state,
            update=p.update,
        )
    for agent_id, row in by_id.items():
        if agent_id not in online:
            row.update(online=False, running=[], state="offline", update=row.get("unsupported"))
    return [by_id[k] for k in sorted(by_id)]


def _agents(projection: Projection, online: dict[str, Presence]) -> list[AgentView]:
    views = dict(projection.agents)
    for agent_id, p in online.items():
        view = views.setdefault(agent_id, AgentView(id=agent_id))
        view.online, view.version, view.labels = True, p.version, dict(p.labels)
        view.last_seen, view.running, view.host = p.ts, list(p.running), p.host
    for agent_id, view in views.items():
        if agent_id not in online:
            view.online, view.running = False, []
    return sorted(views.values(), key=lambda a: a.id)


async def list_agents(args: argparse.Namespace) -> int:
    async with await connect(connect_settings(args, "fleet agents")) as bus:
        online = await presence(bus)
        doc = await ask_master(bus, "agents", {})
        if doc is None:
            subject = f"{bus.subjects.prefix}.evt.agent.>"
            records = await read_log(bus, bus.subjects.events_stream, subject)
            doc = {"agents": [a.to_json() for a in _agents(fold(records), online)]}
        agents = _overlay_presence(doc["agents"], online)
    if args.json:
        print(json.dumps({"agents": agents}))
        return EXIT_OK
    now = time.time()
    rows = []
    for a in agents:
        seen = "never"
        if a.get("last_seen"):
            moment = datetime.datetime.fromisoformat(a["last_seen"].replace("Z", "+00:00"))
            seen = f"{now - moment.timestamp():.0f}s ago"
        labels = ",".join(f"{k}={v}" for k, v in sorted((a.get("labels") or {}).items()))
        rows.append(
            [a["id"], agent_state(a), a.get("version") or "?", str(len(a["running"])), seen, labels]
        )
    width = terminal_width(sys.stdout)
    headers = ["AGENT", "STATE", "VERSION", "RUNNING", "LAST SEEN", "LABELS"]
    header, *lines = format_table(headers, rows, width)
    print(header)
    indent = " " * len(header.split("STATE")[0])  # the update note sits under STATE
    for a, line in zip(agents, lines, strict=True):
        print(line)
        if a.get("update"):
            print(cut(f"{indent}↳ {a['update']}", width))
    return EXIT_OK


def agent_state(agent: dict[str, Any]) -> str:
    """``online``, or what keeps it from being plainly so: ``updating``, ``unsupported``
    (it cannot take the fleet's target: no job is sent to it), ``draining``, ``offline``."""
    if not agent.get("online"):
        return "offline"
    state = str(agent.get("state") or "ready")
    return "online" if state == "ready" else state
