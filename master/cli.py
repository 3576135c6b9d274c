"""``fleet-master``: the controller's command line (after Kernun icamd)."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from bus import connect, decode_model
from bus.command import add_version_flag, configure_logging, run_command
from bus.detach import EXIT_NOT_RUNNING, kill_daemon, running_pid
from bus.errors import FleetError, UsageError
from master.config import MasterConfig, default_config_path, load_master_config
from master.leadership import read_masters
from master.startup import PROGRAM, run_master
from master.users import UserStore, make_record
from schemas import Presence

COMMANDS = ("run", "start", "stop", "restart", "reload", "status", "hash", "user")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "The fleetbus master: folds the event log into the state of every agent, job and "
            "rollout, tracks the configured agents and who is connected, and answers status "
            "queries. Several may run: the one holding the master lease is active, the others "
            "stand by and take over when it dies. Commands: run (foreground), start "
            "(background), stop, restart, reload (re-read the config, keeping state), status "
            "(the masters, active or standby; configured agents and whether they are "
            "connected), hash (the configuration's hash)."
        ),
    )
    parser.add_argument("command", choices=COMMANDS, metavar="COMMAND", help=", ".join(COMMANDS))
    parser.add_argument("action", nargs="?", choices=("add", "passwd", "del"), help="with user")
    parser.add_argument("name", nargs="?", help="with user: the headless user's name")
    parser.add_argument(
        "--password-stdin",
        action="store_true",
        help="with user add/passwd: read the password from stdin instead of the terminal",
    )
    parser.add_argument("--cost", type=int, default=12, help="bcrypt cost (at least 12)")
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        metavar="FILE",
        help=f"configuration (default {default_config_path()})",
    )
    parser.add_argument("-l", "--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    parser.add_argument("--json", action="store_true", help="status as a JSON document")
    add_version_flag(parser, "-V", "--version")
    return parser


PROG = PROGRAM


def _config_path(args: argparse.Namespace) -> Path | None:
    if args.config is not None:
        return Path(args.config)
    default = default_config_path()
    return default if default.exists() else None


async def _status(config: MasterConfig, as_json: bool) -> int:
    async with await connect(
        config.connect_settings().model_copy(update={"nkey_file": None})
    ) as bus:
        kv = await bus.kv(bus.subjects.presence_bucket)
        online: dict[str, Presence] = {}
        for key in await kv.keys():
            entry = await kv.get(key)
            if entry is not None and entry.value:
                online[key] = decode_model(entry.value, Presence)
        holder, present = await read_masters(bus)
    pid = running_pid(config.pid_path)
    configured = [
        {
            "id": a,
            "configured": True,
            "connected": a in online,
            "version": online[a].version if a in online else None,
        }
        for a in sorted(config.agents)
    ]
    strangers = [
        {"id": a, "configured": False, "connected": True, "version": online[a].version}
        for a in sorted(set(online) - set(config.agents))
    ]
    mine = next((m for m in present if m.name == config.name), None)
    master = {
        "running": pid is not None,
        "pid": pid,
        "config_hash": config.config_hash(),
        "name": config.name,
        "role": mine.role if mine is not None else None,
    }
    masters = [
        {"name": m.name, "role": m.role, "seq": m.seq, "ready": m.ready, "host": m.host}
        for m in present
    ]
    if as_json:
        print(
            json.dumps(
                {
                    "master": master,
                    "active": holder,
                    "masters": masters,
                    "agents": configured + strangers,
                }
            )
        )
        return 0
    state = f"running (pid {pid})" if pid else "not running"
    role = f", {mine.role}" if mine is not None else ""
    print(f"master {config.name}: {state}{role}, config hash {config.config_hash()[:16]}")
    print(f"{'MASTER':<20}{'ROLE':<10}{'SEQ':<12}HOST")
    for m in present:
        print(f"{m.name:<20}{m.role:<10}{m.seq:<12}{m.host}")
    if holder is None:
        print("no master holds the lease: none is active")
    else:
        print(f"the master lease is held by {holder}")
    print(f"{'AGENT':<20}{'CONFIGURED':<12}{'CONNECTED':<11}VERSION")
    for row in configured + strangers:
        known = "yes" if row["configured"] else "NO"
        connected = "yes" if row["connected"] else "no"
        print(f"{row['id']:<20}{known:<12}{connected:<11}{row['version'] or '-'}")
    return 0


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("new password: ")
    if getpass.getpass("again: ") != first:
        raise UsageError("the passwords differ")
    return first


def manage_user(config: MasterConfig, args: argparse.Namespace) -> int:
    """``fleet-master user add|passwd|del NAME``: the headless users' store."""
    if not args.action or not args.name:
        raise UsageError("say: fleet-master user add|passwd|del NAME")
    store = UserStore(config.users_path)
    if args.action == "del":
        store.delete(args.name)
        print(f"{PROGRAM}: user {args.name} deleted", file=sys.stderr)
        return 0
    record = make_record(_read_password(args.password_stdin), args.cost)
    store.put(args.name, record, must_exist=args.action == "passwd")
    print(
        f"{PROGRAM}: user {args.name} {'added' if args.action == 'add' else 'updated'}",
        file=sys.stderr,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fleet-master``; returns the exit code."""
    args = build_parser().parse_args(argv)
    path = _config_path(args)
    try:
        config = load_master_config(path)
        if args.command == "user":
            return manage_user(config, args)
        if args.command == "hash":
            print(config.config_hash())
            return 0
        if args.command == "run":
            return run_master(path, args.log_level, detach=False)
        if args.command == "start":
            return run_master(path, args.log_level, detach=True)
        if args.command == "stop":
            return kill_daemon(config.pid_path, timeout=60, program=PROGRAM)
        if args.command == "restart":
            if running_pid(config.pid_path) is not None:
                stopped = kill_daemon(config.pid_path, timeout=60, program=PROGRAM)
                if stopped != 0:
                    return stopped
            return run_master(path, args.log_level, detach=True)
        if args.command == "reload":
            pid = running_pid(config.pid_path)
            if pid is None:
                print(f"{PROGRAM} is not running", file=sys.stderr)
                return EXIT_NOT_RUNNING
            os.kill(pid, signal.SIGHUP)
            print(
                f"{PROGRAM} (pid {pid}) reloading; config hash {config.config_hash()}",
                file=sys.stderr,
            )
            return 0
        configure_logging(args.log_level or "WARNING")
        return run_command(PROGRAM, _status(config, args.json))
    except FleetError as exc:
        print(f"{PROGRAM}: error: {exc}", file=sys.stderr)
        return exc.exit_code
