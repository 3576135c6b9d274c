"""``fleet-master``: the controller's command line (after Kernun icamd)."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

from bus import connect, decode_model
from bus.command import add_log_level_flag, add_version_flag, configure_logging, run_command
from bus.detach import EXIT_NOT_RUNNING, kill_daemon, running_pid
from bus.errors import FleetError, UsageError
from bus.keys import read_seed_file
from bus.paths import missing_files
from bus.reloadreport import request_reload
from master.config import MasterConfig, default_config_path, load_master_config
from master.leadership import read_masters
from master.startup import PROGRAM, run_master
from master.users import UserStore, make_record
from schemas import Presence

COMMANDS = ("run", "start", "stop", "restart", "reload", "status", "hash", "user")

COMMAND_HELP: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "run": (
        "",
        "Run the master in the foreground, logging to stderr; SIGTERM stops it "
        "(a last snapshot first), SIGHUP reloads its configuration.",
        ("-c", "-l"),
    ),
    "start": (
        "",
        "Start the master in the background (pid file and log in data_dir); "
        "says on the terminal, exit 2, if one runs already.",
        ("-c", "-l"),
    ),
    "stop": ("", "Stop the running master and wait for it; exit 3 if none runs.", ("-c",)),
    "restart": ("", "Stop the running master (if any), then start it.", ("-c", "-l")),
    "reload": (
        "",
        "Make the running master re-read its configuration, keeping its state; "
        "exit 0 when it took the file, 2 (with the reason) when it refused it, "
        "3 when none runs.",
        ("-c",),
    ),
    "status": (
        "",
        "The masters (active or standby), the configured agents and whether "
        "each is connected (WRONG KEY: its presence carries another key); "
        "exit 3 when this host's master is not running.",
        ("-c", "--json"),
    ),
    "hash": ("", "Print the SHA-256 of the whole configuration, defaults included.", ("-c",)),
    "user": (
        " add|passwd|del NAME",
        "Manage the headless users' bcrypt store: add or "
        "passwd asks for the password twice (or reads one line with --password-stdin).",
        ("-c", "--password-stdin", "--cost"),
    ),
}
"""Each command's arguments, description and the options it takes: ``fleet-master
COMMAND --help``."""


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
            "connected), hash (the configuration's hash), user (headless users). "
            "`fleet-master COMMAND --help` tells about one command."
        ),
    )
    parser.add_argument(
        "command", nargs="?", choices=COMMANDS, metavar="COMMAND", help=", ".join(COMMANDS)
    )
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
    add_log_level_flag(parser, "override the configured log level")
    parser.add_argument("--json", action="store_true", help="status as a JSON document")
    parser.add_argument(
        "--check",
        action="store_true",
        help="check the configuration and the files it names without starting; "
        "exit 0 if they are good, 2 with the reason if not",
    )
    add_version_flag(parser, "-V", "--version")
    return parser


PROG = PROGRAM


def _config_path(args: argparse.Namespace) -> Path | None:
    if args.config is not None:
        # Absolute: -d, reload, restart and the generated unit run from elsewhere.
        return Path(os.path.abspath(args.config))
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

    def wrong_key(agent: str) -> bool:
        # Presence under a configured id but another key is not that agent: an
        # impostor, or a reinstalled host whose new key was never registered.
        return agent in online and online[agent].public_key != config.agents[agent].public_key

    configured = [
        {
            "id": a,
            "configured": True,
            "connected": a in online and not wrong_key(a),
            "wrong_key": wrong_key(a),
            "version": online[a].version if a in online else None,
        }
        for a in sorted(config.agents)
    ]
    strangers = [
        {
            "id": a,
            "configured": False,
            "connected": True,
            "wrong_key": False,
            "version": online[a].version,
        }
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
    # Exit 3 when the master is not running, like `systemctl status` and `-Q`: scripts
    # asking "is it up?" get the answer from the code, the table still says the rest.
    code = 0 if pid is not None else EXIT_NOT_RUNNING
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
        return code
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
        connected = "WRONG KEY" if row["wrong_key"] else "yes" if row["connected"] else "no"
        print(f"{row['id']:<20}{known:<12}{connected:<11}{row['version'] or '-'}")
    return code


def check_config(path: Path | None, config: MasterConfig) -> str:
    """What ``--check`` prints for a good configuration.

    Raises:
        UsageError, SecretFileError: what a start would stop on.
    """
    problems = missing_files(config, "tls_ca", "tls_cert", "tls_key", "web_tls_cert", "web_tls_key")
    if problems:
        raise UsageError("; ".join(problems))
    if config.key_path.exists():
        read_seed_file(config.key_path)  # unsafe permissions stop a start: say so now
    return (
        f"{path or 'defaults'}: OK: server {config.server}, {len(config.agents)} agents, "
        f"config hash {config.config_hash()[:16]}"
    )


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


def command_help(parser: argparse.ArgumentParser, command: str) -> str:
    """``fleet-master COMMAND --help``: that command alone, with the options it takes."""
    arguments, description, options = COMMAND_HELP[command]
    lines = [f"usage: {PROG} {command}{arguments} [options]", "", textwrap.fill(description, 79)]
    lines += ["", "options:"]
    for action in parser._actions:  # argparse has no public lookup by option string
        if set(action.option_strings) & set(options):
            flags = ", ".join(action.option_strings)
            lines.append(f"  {flags:<22}{action.help or ''}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fleet-master``; returns the exit code."""
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    asked = [w for w in words if w in COMMANDS]
    if asked and ("-h" in words or "--help" in words):
        sys.stdout.write(command_help(parser, asked[0]))
        return 0
    args = parser.parse_args(argv)
    if args.command is None and not args.check:
        parser.error(f"a COMMAND is needed: {', '.join(COMMANDS)} (or --check)")
    path = _config_path(args)
    try:
        config = load_master_config(path)
        if args.check:
            print(check_config(path, config))
            return 0
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
            report = request_reload(config.pid_path, pid)
            if report is None:
                print(
                    f"{PROGRAM} (pid {pid}) was sent SIGHUP but gave no verdict within 10 s; "
                    f"see its log",
                    file=sys.stderr,
                )
                return 1
            print(f"{PROGRAM} (pid {pid}): {report.message}", file=sys.stderr)
            return 0 if report.ok else UsageError.exit_code
        configure_logging(args.log_level or "WARNING")
        return run_command(PROGRAM, _status(config, args.json))
    except FleetError as exc:
        print(f"{PROGRAM}: error: {exc}", file=sys.stderr)
        return exc.exit_code
