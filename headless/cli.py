"""``fleet-headless``: start one batch job from cron (after the PLANTA headless client).

Quiet by default, so cron mails only when something went wrong: any return code but 0
prints one line with the reason on stderr (-q: not even that). Return codes: 0 ok,
1 socket or connection error, 2 parameter error (bad flag, bad secret file, failed
authentication, a job the agent rejected: unknown module, not granted), 3 timeout (the
job goes on) or the --lock is held, 4 the job ran and failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from bus import ConnectSettings, UsageError, check_agent_id, connect
from bus.command import add_tls_args, add_version_flag, run_command, tls_settings
from bus.errors import EXIT_JOB_FAILED, EXIT_OK, EXIT_TIMEOUT, EXIT_USAGE, FleetError
from bus.lease import Lease
from headless.client import Submission, submit, wait_finished
from headless.secret import read_hash
from schemas import JobRequest, ModuleCommand, ScriptCommand

PROG = "fleet-headless"
_LOCK_TTL_S = 30.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_version_flag(parser)
    talk = parser.add_mutually_exclusive_group()
    talk.add_argument(
        "-q", "--quiet", action="store_true", help="no output at all, not even why it failed"
    )
    talk.add_argument(
        "-v", "--verbose", action="count", default=0, help="info; -vv the request; -vvv the reply"
    )
    parser.add_argument(
        "-s",
        "--service",
        "--server",
        dest="service",
        metavar="HOST:PORT|URL",
        default=os.environ.get("FLEET_SERVER") or "127.0.0.1:4222",
        help="the NATS server (env FLEET_SERVER; default 127.0.0.1:4222)",
    )
    parser.add_argument(
        "-t",
        "--timeout",
        type=int,
        metavar="N",
        help="absent: return once the job is stored; N: wait N s for its end "
        "(exit 3 if not); -1: wait for the end",
    )
    parser.add_argument("-u", "--user", metavar="NAME", required=True, help="the headless user")
    parser.add_argument(
        "-a",
        "--auth_type",
        "--auth-type",
        dest="auth_type",
        choices=("challenge", "nkey"),
        default="challenge",
        help="challenge (bcrypt hash, via the master) or nkey (a seed, no master)",
    )
    parser.add_argument(
        "-p",
        "--secret",
        type=Path,
        metavar="FILE",
        required=True,
        help="the secret file: mode 0400 (0600 accepted), owned by you",
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("-m", "--module", metavar="ID", help="run a module defined on the agent")
    what.add_argument(
        "-f",
        "--py_file",
        "--py-file",
        dest="py_file",
        type=Path,
        metavar="FILE",
        help="run this file (interpreter from its #! line; Python for .py)",
    )
    what.add_argument(
        "-c",
        "--py_code",
        "--py-code",
        dest="py_code",
        metavar="CODE",
        help="run this snippet (shell, or --lang python)",
    )
    parser.add_argument(
        "--lang", choices=("sh", "python"), default="sh", help="language of -c (default sh)"
    )
    parser.add_argument("--agent", required=True, metavar="ID", help="the agent to run on")
    parser.add_argument(
        "--lock",
        metavar="NAME",
        help="run only if no other client holds this fleet-wide lock; the client then "
        "waits for the job's end (or -t) to hold it that long",
    )
    add_tls_args(parser)
    parser.add_argument(
        "--master-wait",
        type=float,
        default=30.0,
        metavar="N",
        help="while no master answers (one is taking over from another), keep trying for "
        "up to N s (default 30)",
    )
    parser.add_argument(
        "--lock-wait",
        type=float,
        default=0.0,
        metavar="N",
        help="wait up to N s for the lock (default: exit 3 at once)",
    )
    return parser


def _request(args: argparse.Namespace) -> JobRequest:
    if args.module:
        return JobRequest(command=ModuleCommand(module=args.module))
    if args.py_file is not None:
        try:
            text = args.py_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"{args.py_file}: {exc.strerror}") from None
        first = text.splitlines()[0] if text else ""
        if first.startswith("#!") and first[2:].strip():
            interpreter = first[2:].split()
        elif args.py_file.suffix == ".py":
            interpreter = ["python3"]
        else:
            interpreter = ["/bin/sh"]
        return JobRequest(command=ScriptCommand(script=text, interpreter=interpreter))
    interpreter = ["python3"] if args.lang == "python" else ["/bin/sh"]
    return JobRequest(command=ScriptCommand(script=args.py_code, interpreter=interpreter))


def _connection_key(args: argparse.Namespace) -> Path | None:
    """The key the connection authenticates with on a server that requires one: the
    user's own nkey with ``-a nkey``, else ``FLEET_NKEY`` if set."""
    if args.auth_type == "nkey":
        return Path(args.secret)
    env = os.environ.get("FLEET_NKEY")
    return Path(env) if env else None


def _server(service: str) -> str:
    return service if "://" in service else f"nats://{service}"


async def _run(args: argparse.Namespace) -> int:
    job = Submission(
        user=args.user,
        agent=check_agent_id(args.agent),
        request=_request(args),
        auth=args.auth_type,
        secret=args.secret,
        master_wait_s=max(0.0, args.master_wait),
    )
    if args.lock is not None and args.lock.startswith("master."):
        raise UsageError("lock names beginning with master. are the masters' own")
    wait: float | None = None if args.timeout in (None, -1) else float(args.timeout)
    if args.timeout is not None and args.timeout < -1:
        raise UsageError("-t takes a number of seconds, or -1 to wait for the end")
    settings = ConnectSettings(
        servers=[_server(args.service)],
        name=f"{PROG} {args.user}",
        connect_timeout_s=3,
        inbox_prefix=f"_INBOX_{args.user}",
        nkey_file=_connection_key(args),
        **tls_settings(args),
    )
    async with await connect(settings) as bus:
        lease = None
        if args.lock:
            lease = Lease(
                bus, bus.subjects.locks_bucket, args.lock, f"{args.user}@{args.agent}", _LOCK_TTL_S
            )
            if not await lease.acquire(args.lock_wait):
                _failed(f"lock {args.lock} is held by another client")
                return EXIT_TIMEOUT
        keeper = asyncio.create_task(lease.keep()) if lease else None
        try:
            job_id = await submit(bus, job)
            logging.getLogger(PROG).info("job %s submitted to %s", job_id, job.agent)
            if args.timeout is None and lease is None:
                return EXIT_OK  # fire and forget: the log holds the job
            finished = await wait_finished(bus, job.user, job_id, wait, job.master_wait_s)
        finally:
            if keeper is not None:
                keeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await keeper
            if lease is not None:
                await asyncio.shield(lease.release())
    if finished is None:
        _failed(f"job {job_id} has not ended within {args.timeout}s; it goes on")
        return EXIT_TIMEOUT
    if finished.status == "succeeded":
        logging.getLogger(PROG).info("job %s succeeded", job_id)
        return EXIT_OK
    why = f": {finished.reason}" if finished.reason else ""
    exit_code = "" if finished.exit_code is None else f" (exit code {finished.exit_code})"
    _failed(f"job {job_id} {finished.status}{exit_code}{why}")
    # Rejected: the agent never ran it (unknown module, not granted): a parameter error.
    return EXIT_USAGE if finished.status == "rejected" else EXIT_JOB_FAILED


def _failed(why: str) -> None:
    """The one line a failed run prints (to stderr, which -q silences)."""
    print(f"{PROG}: {why}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fleet-headless``; returns the exit code."""
    args = build_parser().parse_args(argv)
    levels = {0: logging.CRITICAL + 1, 1: logging.INFO, 2: logging.DEBUG}
    level = levels.get(args.verbose, logging.DEBUG - 1)
    logging.basicConfig(level=level, format=f"{PROG}: %(message)s", stream=sys.stderr, force=True)
    if args.verbose < 2:
        logging.getLogger("bus").setLevel(logging.CRITICAL + 1)
        logging.getLogger("nats").setLevel(logging.CRITICAL + 1)
    with contextlib.ExitStack() as stack:
        if args.quiet:  # -q: nothing at all, not even the reason for a failure
            stack.enter_context(contextlib.redirect_stderr(open(os.devnull, "w")))  # noqa: SIM115
        try:
            if args.auth_type == "challenge" and Path(args.secret).exists():
                read_hash(Path(args.secret))  # an unsafe secret file is a 2, server or not
            return run_command(PROG, _run(args))
        except FleetError as exc:  # errors raised before the loop runs
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            return exc.exit_code
