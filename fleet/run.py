"""``fleet run``: publish a job to one or many agents and follow it to its end."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bus import Bus, SealBinding, Signer, UsageError, check_agent_id, connect, seal_for
from bus.command import add_connection_args, connect_settings
from bus.errors import (
    EXIT_JOB_FAILED,
    EXIT_OK,
    EXIT_SKIPPED,
    EXIT_TIMEOUT,
    ConnectionFailedError,
    PublishTimeoutError,
    StoreFullError,
    SubmissionUnknownError,
)
from fleet.common import (
    known_agents,
    match_agents,
    offline_since,
    operator_signer,
    parse_pairs,
    presence,
    publish_signed,
)
from fleet.follow import JobFollower, OutputPrinter
from ledger.views import JobView
from schemas import (
    ArgvCommand,
    Command,
    JobRequest,
    JobSubmitted,
    ModuleCommand,
    Presence,
    ScriptCommand,
    new_id,
)

logger = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = sub.add_parser(
        "run",
        help="run a command on agents and follow it",
        usage="fleet run [-a AGENT]... [-g GLOB] [-l KEY=VALUE]... [options] -- CMD [ARG...]",
        description=(
            "Publish a job to every targeted agent, stream its output, and exit with 0 when "
            "every job succeeded, 4 when any failed, 3 when --wait ran out (the jobs go on). "
            "Agents are chosen by id (-a: also offline ones the fleet knows, whose job waits "
            "for them; an id never configured nor seen is refused unless --queue), or among "
            "the online agents by glob (-g) and labels (-l). Each job's id is printed on "
            "stderr (follow it with `fleet job wait ID`)."
        ),
    )
    where = run.add_argument_group("targets")
    where.add_argument(
        "-a",
        "--agent",
        action="append",
        default=[],
        metavar="AGENT",
        help="an agent id (repeatable)",
    )
    where.add_argument(
        "--queue",
        action="store_true",
        help="queue the job for an -a agent the fleet has never seen (else: a usage error)",
    )
    where.add_argument(
        "-g", "--glob", metavar="GLOB", help="online agents whose id matches, e.g. 'web-*'"
    )
    where.add_argument(
        "-l",
        "--label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="online agents with this label (repeatable: all must match)",
    )
    what = run.add_argument_group("what runs")
    what.add_argument(
        "--script", type=Path, metavar="FILE", help="run this script file on the agent"
    )
    what.add_argument(
        "--interpreter",
        metavar="PROG",
        help="interpreter for --script (default: its #! line, else /bin/sh)",
    )
    what.add_argument(
        "-m", "--module", metavar="MODULE", help="run a module defined in the agent's config"
    )
    what.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment for the job (repeatable); only names the agent's trust grant or "
        "module allows, never PATH, LD_*, BASH_ENV and the like",
    )
    what.add_argument("--cwd", metavar="DIR", help="working directory on the agent")
    what.add_argument("--user", metavar="USER", help="run as this user (needs the agent's consent)")
    what.add_argument(
        "--password-stdin",
        action="store_true",
        help="with --user: read the user's password from stdin; it is sealed to each "
        "agent's key and checked there by PAM",
    )
    what.add_argument(
        "--timeout", type=float, metavar="S", help="the agent stops the job after S seconds"
    )
    what.add_argument(
        "--expire", type=float, metavar="S", help="not started within S seconds: expired, never run"
    )
    how = run.add_argument_group("how to wait")
    how.add_argument(
        "--async",
        dest="detach",
        action="store_true",
        help="print the job ids and return at once (one target: only its id)",
    )
    how.add_argument(
        "--force",
        action="store_true",
        help="run on agents marked unsupported (off the target version, may not update); "
        "without it, several targets skip them (exit 6) and one alone is refused",
    )
    how.add_argument(
        "--wait",
        type=_wait_seconds,
        metavar="S",
        help=f"stop waiting after S seconds (exit 3; the jobs go on); default {DEFAULT_WAIT_S:g}, "
        "or longer to cover --expire and --timeout; 'inf' for no limit",
    )
    how.add_argument(
        "--batch-size", type=int, metavar="N", help="run on N agents at a time (rolling)"
    )
    how.add_argument(
        "--fail-fast", action="store_true", help="with --batch-size: no new batch after a failure"
    )
    how.add_argument(
        "--json", action="store_true", help="print one JSON document instead of output"
    )
    run.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        metavar="CMD",
        help="the command and its arguments, after --",
    )
    add_connection_args(run)
    run.set_defaults(handler=run_command, is_async=True)


DEFAULT_WAIT_S = 600.0
"""How long ``fleet run`` follows its jobs by default: bounded, so a job that cannot start
never hangs the terminal; the jobs go on after it (``fleet job wait ID``). A job given
``--expire``/``--timeout`` is waited for as long as those allow, plus a margin."""

_WAIT_MARGIN_S = 30.0


def default_wait(args: argparse.Namespace) -> float:
    """``--wait`` when not given: bounded, and never shorter than the job's own bounds."""
    own = (args.expire or 0.0) + (args.timeout or 0.0)
    return max(DEFAULT_WAIT_S, own + _WAIT_MARGIN_S) if own else DEFAULT_WAIT_S


def _wait_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if value != value or value <= 0:
        raise argparse.ArgumentTypeError("must be a positive number of seconds, or 'inf'")
    return value


def build_request(args: argparse.Namespace) -> JobRequest:
    """The job request from the command line.

    Raises:
        UsageError: no command, or more than one kind of command.
    """
    argv = list(args.command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    # Words after --script FILE or -m MODULE are its arguments, not a second command.
    is_argv = bool(argv) and not args.module and not args.script
    kinds = sum(bool(x) for x in (is_argv, args.script, args.module))
    if kinds != 1:
        raise UsageError("say what to run: a command after --, or --script FILE, or -m MODULE")
    command: Command
    if args.script:
        try:
            text = args.script.read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"{args.script}: {exc.strerror}") from None
        command = ScriptCommand(script=text, interpreter=_interpreter(args, text), args=argv)
    elif args.module:
        command = ModuleCommand(module=args.module, args=argv)
    else:
        command = ArgvCommand(argv=argv)
    if args.timeout is not None and args.timeout <= 0:
        raise UsageError("--timeout must be positive")
    expires_at = None
    if args.expire is not None:
        if args.expire <= 0:
            raise UsageError("--expire must be positive")
        expires_at = time.time_ns() + int(args.expire * 1e9)
    return JobRequest(
        command=command,
        env=dict(parse_pairs(args.env, "--env")),
        cwd=args.cwd,
        run_as=args.user,
        timeout_s=args.timeout,
        expires_at=expires_at,
    )


def _interpreter(args: argparse.Namespace, text: str) -> list[str]:
    if args.interpreter:
        return str(args.interpreter).split()
    first = text.splitlines()[0] if text else ""
    if first.startswith("#!") and first[2:].strip():
        return first[2:].split()
    if str(args.script).endswith(".py"):
        return ["python3"]
    return ["/bin/sh"]


def resolve_targets(args: argparse.Namespace, online: dict[str, Presence]) -> list[str]:
    """The agents to run on, in a stable order.

    Raises:
        UsageError: no target given, or nothing matched.
    """
    explicit = [check_agent_id(a) for a in args.agent]
    labels = parse_pairs(args.label, "-l")
    if not explicit and args.glob is None and not labels:
        raise UsageError("say where to run: -a AGENT, -g GLOB or -l KEY=VALUE")
    chosen = list(dict.fromkeys(explicit))
    if args.glob is not None or labels:
        matched = match_agents(online, args.glob, labels)
        if not matched:
            wanted = " ".join(
                ([f"-g {args.glob}"] if args.glob else []) + [f"-l {k}={v}" for k, v in labels]
            )
            known = ", ".join(sorted(online)) or "none"
            raise UsageError(f"no online agent matches {wanted} (online: {known})")
        chosen += [a for a in matched if a not in chosen]
    return chosen


async def refuse_unknown(bus: Bus, agents: list[str], online: dict[str, Presence]) -> None:
    """Refuse ``-a`` agents the fleet has never heard of: most likely a typo.

    Raises:
        UsageError: an agent is neither online, nor seen in the log, nor configured.
    """
    if all(a in online for a in agents):
        return
    known = await known_agents(bus, online)
    if known is None:
        logger.warning("cannot tell whether %s exist: neither master nor log answered", agents)
        return
    unknown = [a for a in agents if a not in known]
    if unknown:
        names = ", ".join(unknown)
        raise UsageError(
            f"no agent matches {names}; use --queue to queue it for an agent not yet seen"
        )


def skip_unsupported(
    targets: list[str], online: dict[str, Presence], *, force: bool
) -> tuple[list[str], list[dict[str, str]]]:
    """Leave out agents off the fleet's target version that may not update (RHQ's rule).

    One target, or only such targets, is refused; among several, the healthy ones get
    the job and the others are skipped with a warning (the exit code says so).

    Returns:
        The targets to run on, and the skipped ones (``agent``, ``reason``).

    Raises:
        UsageError: every target is ``unsupported`` and ``force`` is not set.
    """
    bad = [a for a in targets if a in online and online[a].state == "unsupported"]
    reasons = {a: online[a].update or "off the fleet's target version" for a in bad}
    if not bad or force:
        for agent in bad:
            print(f"fleet: warning: {agent} is unsupported: {reasons[agent]}", file=sys.stderr)
        return targets, []
    if len(bad) == len(targets):
        why = "; ".join(f"{a}: {reasons[a]}" for a in bad)
        raise UsageError(f"refusing unsupported agents ({why}); --force runs there anyway")
    for agent in bad:
        print(
            f"fleet: warning: skipping {agent}, unsupported: {reasons[agent]} "
            "(--force runs there anyway)",
            file=sys.stderr,
        )
    healthy = [a for a in targets if a not in reasons]
    return healthy, [{"agent": a, "reason": reasons[a]} for a in bad]


@dataclass
class Outcome:
    agent: str
    job_id: str | None
    status: str
    exit_code: int | None = None
    note: str | None = None
    view: JobView | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "job_id": self.job_id,
            "agent": self.agent,
            "status": self.status,
            "exit_code": self.exit_code,
        }
        if self.note:
            doc["note"] = self.note
        view = self.view
        if view is not None and view.finished:
            doc["output_tail"] = view.output_tail
            stored = view.stdout_bytes + view.stderr_bytes
            doc["output_complete"] = len(view.output_tail.encode()) >= stored
            if not doc["output_complete"]:
                doc["output_rest"] = f"fleet job logs {view.job_id}"
        return doc


SEAL_LIFETIME_S = 24 * 3600.0
"""How long a sealed password stays good when the job sets no ``--expire``."""


def agent_key(agent: str, online: dict[str, Presence]) -> str:
    """The public key a password for ``agent`` is sealed to.

    Raises:
        UsageError: the agent is offline or does not publish its key.
    """
    presence = online.get(agent)
    if presence is None or presence.public_key is None:
        raise UsageError(
            f"cannot seal the password for {agent}: it is offline (its key is unknown)"
        )
    return presence.public_key


def sealed_for(
    request: JobRequest,
    agent: str,
    job_id: str,
    who: str,
    online: dict[str, Presence],
    password: bytes | None,
) -> JobRequest:
    """The request with the password sealed to this agent's key for this one job.

    The seal is bound to the job id, the agent and the submitter, and expires with the
    job's ``expires_at`` (or after :data:`SEAL_LIFETIME_S`): copied into any other job,
    it does not open.

    Raises:
        UsageError: the agent is offline or does not publish its key.
    """
    if password is None:
        return request
    expires_at = request.expires_at or time.time_ns() + int(SEAL_LIFETIME_S * 1e9)
    binding = SealBinding(job_id=job_id, agent=agent, submitter=who, expires_at=expires_at)
    sealed = seal_for(agent_key(agent, online), password, binding)
    return request.model_copy(update={"credential": sealed})


async def publish_job(
    bus: Bus, job_id: str, agent: str, request: JobRequest, who: str, signer: Signer
) -> None:
    """Publish one job, once: its retries resend the same signed envelope (same id).

    Raises:
        SubmissionUnknownError: no acknowledgement came (the deadline passed while the
            message may sit in the client's reconnect buffer or the server's socket),
            so it may yet be stored and run; the caller must not resubmit it anew.
        StoreFullError: the server refused it for lack of storage (not stored).
    """
    data = JobSubmitted(job_id=job_id, agent=agent, request=request, submitted_by=who)
    subject = bus.subjects.job_event(agent, job_id, "submitted")
    try:
        await publish_signed(bus, data, who, signer, subject)
    except (PublishTimeoutError, ConnectionFailedError) as exc:
        raise SubmissionUnknownError(job_id, agent, str(exc)) from exc
    except StoreFullError as exc:
        if exc.certain:
            raise
        raise SubmissionUnknownError(job_id, agent, str(exc)) from exc


async def submit(
    bus: Bus,
    agent: str,
    request: JobRequest,
    who: str,
    signer: Signer,
    printer: OutputPrinter | None,
    *,
    job_id: str | None = None,
) -> JobFollower:
    """Start following a new job, then publish it (so no event can slip past)."""
    job_id = job_id or new_id()
    follower = await JobFollower(bus, agent, job_id, printer).start()
    try:
        await publish_job(bus, job_id, agent, request, who, signer)
    except BaseException:
        await follower.close()
        raise
    print(f"fleet: {agent}: job {job_id}", file=sys.stderr, flush=True)
    return follower


async def run_command(args: argparse.Namespace) -> int:
    request = build_request(args)
    password = None
    if args.password_stdin:
        if not args.user:
            raise UsageError("--password-stdin goes with --user")
        password = sys.stdin.readline().rstrip("\n").encode()
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if args.wait is None:
        args.wait = default_wait(args)
    if args.wait == float("inf"):
        args.wait = None
    who, signer = operator_signer(args.nkey)
    async with await connect(connect_settings(args, "fleet run")) as bus:
        online = await presence(bus)
        targets = resolve_targets(args, online)
        if not args.queue:
            await refuse_unknown(bus, [check_agent_id(a) for a in args.agent], online)
        targets, skipped = skip_unsupported(targets, online, force=args.force)
        if password is not None:
            for agent in targets:
                agent_key(agent, online)  # every key known before anything is submitted
        if args.detach:
            jobs: list[dict[str, str]] = []
            unknown: SubmissionUnknownError | None = None
            for agent in targets:
                job_id = new_id()
                sealed = sealed_for(request, agent, job_id, who, online, password)
                try:
                    await publish_job(bus, job_id, agent, sealed, who, signer)
                except SubmissionUnknownError as exc:
                    # Said with its id, and no further targets: the server is not answering.
                    jobs.append({"job_id": job_id, "agent": agent, "status": "unknown"})
                    unknown = exc
                    break
                jobs.append({"job_id": job_id, "agent": agent})
            if args.json:
                print(json.dumps({"jobs": jobs, "skipped": skipped}))
            elif len(jobs) == 1:
                print(jobs[0]["job_id"])  # so that J=$(fleet run --async …) is the id
            else:
                for job in jobs:
                    print(
                        f"{job['job_id']}\t{job['agent']}"
                        + ("\tunknown" if "status" in job else "")
                    )
            if unknown is not None:
                print(f"fleet: {unknown}", file=sys.stderr)
                return EXIT_TIMEOUT
            return EXIT_SKIPPED if skipped else EXIT_OK
        printer = None if args.json else OutputPrinter(prefix=len(targets) + len(skipped) > 1)
        submitted: list[JobFollower] = []
        try:
            outcomes, timed_out = await _run_batches(
                bus, args, targets, online, (request, password), who, signer, printer, submitted
            )
        except asyncio.CancelledError:
            _print_follow_hint(submitted, "interrupted")
            raise
        except SubmissionUnknownError:
            _print_follow_hint(submitted, "stopped submitting")
            raise
    if args.json:
        print(json.dumps({"jobs": [o.to_json() for o in outcomes], "skipped": skipped}))
    else:
        _print_summary(outcomes, single=len(targets) == 1 and not skipped)
        for skip in skipped:
            print(
                f"fleet: {skip['agent']}: skipped, unsupported ({skip['reason']})", file=sys.stderr
            )
    if timed_out:
        _print_follow_hint(
            [o for o in outcomes if o.job_id and o.status in ("queued", "running")],
            f"--wait ran out after {args.wait:g}s",
        )
        return EXIT_TIMEOUT
    if not all(o.status == "succeeded" for o in outcomes):
        return EXIT_JOB_FAILED
    return EXIT_SKIPPED if skipped else EXIT_OK


async def _run_batches(
    bus: Bus,
    args: argparse.Namespace,
    targets: list[str],
    online: dict[str, Presence],
    what: tuple[JobRequest, bytes | None],
    who: str,
    signer: Signer,
    printer: OutputPrinter | None,
    submitted: list[JobFollower],
) -> tuple[list[Outcome], bool]:
    deadline = None if args.wait is None else time.monotonic() + args.wait
    size = args.batch_size or len(targets)
    outcomes: list[Outcome] = []
    for start in range(0, len(targets), size):
        batch = targets[start : start + size]
        if args.fail_fast and any(o.status != "succeeded" for o in outcomes):
            outcomes += [
                Outcome(a, None, "skipped", note="not started: an earlier batch failed")
                for a in batch
            ]
            continue
        followers: list[JobFollower] = []
        for agent in batch:
            job_id = new_id()
            request = sealed_for(what[0], agent, job_id, who, online, what[1])
            followers.append(await submit(bus, agent, request, who, signer, printer, job_id=job_id))
            submitted.append(followers[-1])
        for follower in followers:
            if follower.agent not in online and not args.json:
                note = await offline_since(bus, follower.agent)
                print(f"fleet: {follower.agent}: queued ({note})", file=sys.stderr)
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        ran_out = not await _all_done(followers, remaining)
        for follower in followers:
            outcomes.append(await _outcome(bus, follower, online))
            await follower.close()
        if ran_out:
            rest = targets[start + size :]
            outcomes += [
                Outcome(a, None, "skipped", note="not started: --wait ran out") for a in rest
            ]
            return outcomes, True
    return outcomes, False


async def _all_done(followers: list[JobFollower], timeout: float | None) -> bool:
    """Wait until every follower is done; False if ``timeout`` seconds passed first."""
    try:
        async with asyncio.timeout(timeout), asyncio.TaskGroup() as group:
            for follower in followers:
                group.create_task(follower.done.wait(), name=f"wait {follower.job_id}")
    except TimeoutError:
        return False
    return True


async def _outcome(bus: Bus, follower: JobFollower, online: dict[str, Presence]) -> Outcome:
    view = follower.view
    if view is not None and view.finished:
        return Outcome(
            follower.agent, follower.job_id, view.status, view.exit_code, view.reason, view
        )
    if view is not None and view.status == "running":
        return Outcome(follower.agent, follower.job_id, "running", note="still running")
    note = (
        "agent online, not started yet"
        if follower.agent in online
        else await offline_since(bus, follower.agent)
    )
    return Outcome(follower.agent, follower.job_id, "queued", note=note)


def describe(o: Outcome) -> str:
    """One outcome in words: ``failed (exit 3)``, ``queued (agent offline since …)``."""
    if o.status in ("queued", "running", "skipped"):
        return f"{o.status} ({o.note})" if o.note else o.status
    text = o.status if o.exit_code is None else f"{o.status} (exit {o.exit_code})"
    if o.note and o.note != f"exit status {o.exit_code}":
        text += f": {o.note}"
    return text


def _print_follow_hint(jobs: list[JobFollower] | list[Outcome], why: str) -> None:
    """Which jobs go on without us, and how to follow them."""
    if not jobs:
        return
    print(f"fleet: {why}; the jobs go on:", file=sys.stderr)
    for job in jobs:
        print(f"fleet:   {job.agent}: fleet job wait {job.job_id}", file=sys.stderr)


def _print_summary(outcomes: list[Outcome], *, single: bool) -> None:
    for o in outcomes:
        if single and o.status == "succeeded":
            continue  # the output said it all
        job = f" [job {o.job_id}]" if o.job_id else ""
        print(f"fleet: {o.agent}: {describe(o)}{job}", file=sys.stderr)
