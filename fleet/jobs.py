"""``fleet job show|wait|logs|cancel ID``, ``fleet jobs`` and ``fleet agents``.

All of them read the event log (and presence) directly, so they work with no master.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from bus import Bus, UsageError, check_token, connect
from bus.codec import HEADER_OUTPUT_STREAM
from bus.command import add_connection_args, connect_settings
from bus.errors import EXIT_JOB_FAILED, EXIT_OK, EXIT_TIMEOUT
from bus.log import read_log
from fleet.common import (
    fold,
    job_projection,
    offline_since,
    operator_signer,
    presence,
    publish_signed,
)
from fleet.follow import JobFollower, OutputPrinter
from master.projection import AgentView, JobView, Projection, iso
from schemas import JobCancelRequested, Presence


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
    jobs.add_argument("--status", metavar="STATUS", help="only jobs in this status")
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


async def _find(bus: Bus, job_id: str) -> JobView:
    view = (await job_projection(bus, check_token(job_id, "job id"))).jobs.get(job_id)
    if view is None:
        raise UsageError(f"no job {job_id} in the event log")
    return view


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
        for record in await read_log(bus, bus.subjects.output_stream, subject):
            stream = record.headers.get(HEADER_OUTPUT_STREAM, "stdout")
            target = sys.stdout.buffer if stream == "stdout" else sys.stderr.buffer
            target.write(record.data)
        sys.stdout.flush()
        if view.finished and view.output_chunks == 0 and view.stdout_bytes + view.stderr_bytes:
            print(
                "fleet: the output is no longer stored (expired from the output stream)",
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
    async with await connect(connect_settings(args, "fleet jobs")) as bus:
        projection = await _log_projection(bus)
        online = await presence(bus)
    jobs = sorted(projection.jobs.values(), key=lambda j: j.job_id)
    if args.agent:
        jobs = [j for j in jobs if j.agent == args.agent]
    if args.status:
        jobs = [j for j in jobs if j.status == args.status]
    if args.limit:
        jobs = jobs[-args.limit :]
    agents = _agents(projection, online)
    if args.json:
        print(
            json.dumps(
                {
                    "jobs": [j.to_json() for j in jobs],
                    "agents": [a.to_json() for a in agents],
                    "seq": projection.seq,
                }
            )
        )
        return EXIT_OK
    print(f"{'JOB':<27}{'AGENT':<16}{'STATUS':<11}{'EXIT':<6}{'SUBMITTED':<25}COMMAND")
    for j in jobs:
        exit_code = "" if j.exit_code is None else str(j.exit_code)
        when = iso(j.submitted_at) or ""
        print(f"{j.job_id:<27}{j.agent:<16}{j.status:<11}{exit_code:<6}{when:<25}{j.command or ''}")
    return EXIT_OK


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
        records = await read_log(
            bus, bus.subjects.events_stream, f"{bus.subjects.prefix}.evt.agent.>"
        )
    agents = _agents(fold(records), online)
    if args.json:
        print(json.dumps({"agents": [a.to_json() for a in agents]}))
        return EXIT_OK
    now = time.time_ns()
    print(f"{'AGENT':<18}{'STATE':<9}{'VERSION':<10}{'RUNNING':<9}{'LAST SEEN':<14}LABELS")
    for a in agents:
        seen = f"{(now - a.last_seen) / 1e9:.0f}s ago" if a.last_seen else "never"
        labels = ",".join(f"{k}={v}" for k, v in sorted(a.labels.items()))
        state, version = "online" if a.online else "offline", a.version or "?"
        print(f"{a.id:<18}{state:<9}{version:<10}{len(a.running):<9}{seen:<14}{labels}")
    return EXIT_OK
