"""``fleet agent status|config get|config set|log|restart ID``: one agent's control operations.

Each is a signed control request (``fleet.ctl.<agent>.<op>``) that the agent answers only
if its trust file grants the operator's key that operation. Unanswered requests are tried
again after 1 s, 2 s, 4 s … (at most 60 s) within the operation's budget (``--timeout``,
by default the contract's per-operation timeout, :data:`bus.request.OP_TIMEOUTS_S`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tomllib
from typing import Any

from bus import Bus, FleetError, UsageError, check_agent_id, connect, decode_model
from bus.command import add_connection_args, connect_settings
from bus.errors import EXIT_OK, FleetTimeoutError
from bus.request import OP_TIMEOUTS_S, control
from fleet.common import operator_signer
from ledger.views import iso
from schemas import Presence


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    agent = sub.add_parser(
        "agent",
        help="one agent's control operations: status, config, log, restart",
        description=(
            "Ask one agent directly (signed control requests). The agent answers only if its "
            "trust file grants your key the operation (`control = [...]`). Unanswered "
            "requests are retried after 1, 2, 4 ... s (at most 60 s) until --timeout. Exit "
            "codes: 0 ok, 1 connection error, 2 refused or invalid, 3 no answer in time."
        ),
    )
    agent_sub = agent.add_subparsers(dest="agent_command", required=True, metavar="COMMAND")

    status = agent_sub.add_parser("status", help="presence, jobs, counters and update state")
    _common(status, "status")
    status.set_defaults(handler=agent_status)

    config = agent_sub.add_parser("config", help="read or change the agent's configuration")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="COMMAND")
    get = config_sub.add_parser("get", help="the agent's configuration (or one KEY of it)")
    _common(get, "config-get")
    get.add_argument("key", nargs="?", metavar="KEY", help="print only this key's value")
    get.set_defaults(handler=agent_config_get)
    put = config_sub.add_parser(
        "set",
        help="change run-time keys; kept in the agent's config file (comments stay)",
        description=(
            "Change keys the agent can change while running (max_jobs, labels, log_level, "
            "heartbeat_s, job_kill_grace_s, shutdown_grace_s, max_output_bytes, "
            'auto_update). VALUE is a TOML value (5, true, "x", { role = "web" }); '
            "anything else is taken as a string. The agent writes the change into its "
            "config file (atomically, keeping comments) before applying it, so a restart "
            "keeps it."
        ),
    )
    _common(put, "config-set")
    put.add_argument("pairs", nargs="+", metavar="KEY=VALUE")
    put.set_defaults(handler=agent_config_set)

    log = agent_sub.add_parser("log", help="the agent's recent log lines")
    _common(log, "log")
    log.add_argument(
        "-n", "--lines", type=int, default=200, metavar="N", help="how many (default 200)"
    )
    log.set_defaults(handler=agent_log)

    restart = agent_sub.add_parser("restart", help="restart the agent process in place")
    _common(restart, "restart")
    restart.add_argument(
        "--wait",
        action="store_true",
        help="also wait (within --timeout) until the new process reports online",
    )
    restart.set_defaults(handler=agent_restart)


def _common(parser: argparse.ArgumentParser, op: str) -> None:
    parser.add_argument("agent", metavar="ID", help="the agent's id")
    parser.add_argument(
        "--timeout",
        type=float,
        default=OP_TIMEOUTS_S[op],
        metavar="S",
        help=f"give up after S seconds, retries included (default {OP_TIMEOUTS_S[op]:g})",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON document")
    add_connection_args(parser)
    parser.set_defaults(is_async=True, op=op)


async def _ask(bus: Bus, args: argparse.Namespace, data: dict[str, object]) -> dict[str, Any]:
    """The agent's answer to ``args.op``.

    Raises:
        AuthError: the agent refused the request (not granted, not signed, …).
        UsageError: the agent rejected the arguments.
        FleetTimeoutError: no answer within ``--timeout``.
    """
    if args.timeout <= 0:
        raise UsageError("--timeout must be positive")
    _, signer = operator_signer(args.nkey)
    subject = bus.subjects.control(check_agent_id(args.agent), args.op)
    try:
        reply = await control(bus, subject, data, deadline=args.timeout, signer=signer)
    except FleetTimeoutError as exc:
        raise FleetTimeoutError(
            f"agent {args.agent} did not answer {args.op} within {args.timeout:g}s "
            f"(is it running and connected?): {exc}"
        ) from None
    except FleetError as exc:
        if type(exc) is FleetError and "failed inside the agent" not in str(exc):
            raise UsageError(f"agent {args.agent}: {exc}") from None
        raise
    return reply.data


def _print(args: argparse.Namespace, doc: dict[str, Any], text: str) -> int:
    print(json.dumps(doc) if args.json else text)
    return EXIT_OK


async def agent_status(args: argparse.Namespace) -> int:
    async with await connect(connect_settings(args, "fleet agent status")) as bus:
        doc = await _ask(bus, args, {})
    return _print(args, doc, render_status(doc))


def render_status(doc: dict[str, Any]) -> str:
    """The human form of a ``status`` answer."""
    counters = doc.get("counters") or {}
    flat = []
    for key, value in counters.items():
        if isinstance(value, dict):
            flat += [f"{key}.{k}={v}" for k, v in sorted(value.items())]
        else:
            flat.append(f"{key}={value}")
    labels = ",".join(f"{k}={v}" for k, v in sorted((doc.get("labels") or {}).items()))
    started = doc.get("started_at")
    rows = [
        ("agent", doc.get("agent")),
        ("state", doc.get("state")),
        ("version", doc.get("version")),
        ("host", doc.get("host")),
        ("started", iso(started) if isinstance(started, int) else started),
        ("user", f"{doc.get('user')} (run_as_mode {doc.get('run_as_mode')})"),
        ("jobs", f"{len(doc.get('running') or [])} running of {doc.get('max_jobs')}"),
        ("update", doc.get("update") or "up to date"),
        ("labels", labels or "-"),
        ("counters", " ".join(flat) or "-"),
    ]
    return "\n".join(f"{name + ':':<10}{value}" for name, value in rows)


async def agent_config_get(args: argparse.Namespace) -> int:
    async with await connect(connect_settings(args, "fleet agent config get")) as bus:
        doc = await _ask(bus, args, {})
    if args.key is not None:
        if args.key not in doc:
            raise UsageError(f"agent {args.agent} has no config key {args.key!r}")
        doc = {args.key: doc[args.key]}
        if not args.json:
            value = doc[args.key]
            print(value if isinstance(value, str) else json.dumps(value))
            return EXIT_OK
    text = "\n".join(f"{k} = {json.dumps(v)}" for k, v in doc.items() if v is not None)
    return _print(args, doc, text)


def parse_settings(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` arguments, each VALUE a TOML value or else a plain string.

    Raises:
        UsageError: an argument without ``=`` or a key given twice.
    """
    changes: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"expected KEY=VALUE, not {pair!r}")
        if key in changes:
            raise UsageError(f"{key} given twice")
        try:
            changes[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            changes[key] = raw  # `log_level=INFO` needs no quotes
    return changes


async def agent_config_set(args: argparse.Namespace) -> int:
    changes = parse_settings(args.pairs)
    async with await connect(connect_settings(args, "fleet agent config set")) as bus:
        doc = await _ask(bus, args, changes)
    changed = ", ".join(doc.get("changed") or []) or "nothing"
    return _print(args, doc, f"{args.agent}: changed {changed} (kept in its config file)")


async def agent_log(args: argparse.Namespace) -> int:
    if args.lines < 1:
        raise UsageError("--lines must be a positive integer")
    async with await connect(connect_settings(args, "fleet agent log")) as bus:
        doc = await _ask(bus, args, {"lines": args.lines})
    return _print(args, doc, "\n".join(str(line) for line in doc.get("lines") or []))


async def agent_restart(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    give_up_at = loop.time() + args.timeout
    async with await connect(connect_settings(args, "fleet agent restart")) as bus:
        kv = await bus.kv(bus.subjects.presence_bucket)
        before = await kv.get(args.agent)
        old = decode_model(before.value, Presence).started_at if before and before.value else None
        doc = await _ask(bus, args, {})
        if args.wait:
            left = give_up_at - loop.time()
            presence = await _new_incarnation(bus, args.agent, old, left)
            doc = {**doc, "online": True, "started_at": presence.started_at}
    text = f"{args.agent}: restarting"
    if args.wait:
        text = f"{args.agent}: restarted, online again (version {presence.version})"
    return _print(args, doc, text)


async def _new_incarnation(bus: Bus, agent: str, old: int | None, timeout: float) -> Presence:
    """The first heartbeat of a process other than the one that started at ``old``.

    Raises:
        FleetTimeoutError: none within ``timeout`` seconds.
    """
    kv = await bus.kv(bus.subjects.presence_bucket)
    try:
        async with asyncio.timeout(max(timeout, 0.001)), kv.watch(agent) as updates:
            async for entry in updates:
                if entry is None or entry.deleted or not entry.value:
                    continue
                presence = decode_model(entry.value, Presence)
                if presence.started_at != old:
                    return presence
    except TimeoutError:
        pass
    raise FleetTimeoutError(f"agent {agent} answered restart but was not back within the timeout")
