"""``fleet-agentd``: the agent daemon's command line (after JAMS agentd)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from agentd import service
from agentd.config import default_config_path, load_config, render_config, update_config_text
from agentd.startup import PROGRAM, run_daemon
from agentd.trust import load_trust
from bus.command import add_log_level_flag, add_version_flag
from bus.detach import EXIT_NOT_RUNNING, kill_daemon, running_pid
from bus.errors import FleetError, UsageError
from bus.keys import read_seed_file
from bus.paths import missing_files

PROG = "fleet-agentd"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "The fleetbus agent: runs the jobs sent to this machine's identity, streams "
            "their output, reports presence, and updates itself from signed bundles. "
            "Without an action option it runs in the foreground; SIGTERM drains, SIGHUP "
            "reloads the configuration."
        ),
    )
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        metavar="FILE",
        help=f"configuration file (default {default_config_path()})",
    )
    parser.add_argument(
        "-d", "--daemon", action="store_true", help="detach and run in the background"
    )
    # What a control `restart` of a `-d` agent re-executes with: already in the background.
    parser.add_argument("--detached", action="store_true", help=argparse.SUPPRESS)
    add_log_level_flag(parser, "override the configured log level")
    actions = parser.add_argument_group("actions (each does one thing and exits)")
    one = actions.add_mutually_exclusive_group()
    one.add_argument(
        "-C", "--create-config", metavar="FILE|-", help="write a commented default configuration"
    )
    one.add_argument(
        "-U",
        "--update-config",
        metavar="FILE",
        help="add keys this version knows, keeping your values",
    )
    one.add_argument(
        "-P", "--pam-file", metavar="FILE|-", help="write the PAM service file (auth and account)"
    )
    one.add_argument("-S", "--service-file", metavar="FILE|-", help="write a systemd unit")
    one.add_argument(
        "-I",
        "--install-service",
        action="store_true",
        help="install, enable and start the systemd unit",
    )
    one.add_argument(
        "-R",
        "--remove-service",
        action="store_true",
        help="stop, disable and remove the systemd unit",
    )
    one.add_argument(
        "-K", "--kill-daemon", action="store_true", help="stop the running agent and wait for it"
    )
    one.add_argument(
        "-Q", "--query-status", action="store_true", help="exit 0 if the agent runs, 3 if not"
    )
    one.add_argument(
        "--check",
        action="store_true",
        help="check the configuration, its trust file and key files without starting; "
        "exit 0 if they are good, 2 with the reason if not",
    )
    add_version_flag(parser, "-V", "--version")
    return parser


def _config_path(args: argparse.Namespace) -> Path | None:
    if args.config is not None:
        # Absolute: -d, reload, restart and the generated unit run from elsewhere.
        return Path(os.path.abspath(args.config))
    default = default_config_path()
    return default if default.exists() else None


def check_config(path: Path | None) -> str:
    """What ``--check`` prints for a good configuration.

    Raises:
        UsageError, SecretFileError: what a start would stop on.
    """
    config = load_config(path)
    grants = len(load_trust(config.trust_file).grant) if config.trust_file else 0
    problems = missing_files(config, "tls_ca", "tls_cert", "tls_key")
    if problems:
        raise UsageError("; ".join(problems))
    if config.key_path.exists():
        read_seed_file(config.key_path)  # unsafe permissions stop a start: say so now
    trust = f"{grants} grants in {config.trust_file}" if config.trust_file else "no trust file"
    return (
        f"{path or 'defaults'}: OK: agent {config.id}, server {config.server}, "
        f"run_as_mode {config.run_as_mode}, {trust}"
    )


def _act(args: argparse.Namespace) -> int | None:
    """Run a one-shot action; None when no action was asked for."""
    config_path = _config_path(args)
    if args.create_config:
        service.write_text(args.create_config, render_config(), mode=0o640)
        return 0
    if args.update_config:
        path = Path(args.update_config)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"{path}: {exc.strerror}") from None
        new, added = update_config_text(text)
        if added:
            path.write_text(new, encoding="utf-8")
            print(f"{path}: added {', '.join(added)}", file=sys.stderr)
        else:
            print(f"{path}: already has every key", file=sys.stderr)
        return 0
    if args.pam_file:
        service.write_text(args.pam_file, service.pam_service())
        return 0
    if args.service_file:
        service.write_text(
            args.service_file, service.systemd_unit(config_path or default_config_path())
        )
        return 0
    if args.install_service:
        service.install_service(config_path or default_config_path())
        return 0
    if args.remove_service:
        service.remove_service()
        return 0
    if args.check:
        print(check_config(config_path))
        return 0
    if args.kill_daemon or args.query_status:
        config = load_config(config_path)
        if args.kill_daemon:
            return kill_daemon(
                config.pid_path,
                timeout=config.shutdown_grace_s + config.job_kill_grace_s + 30,
                program=PROGRAM,
            )
        pid = running_pid(config.pid_path)
        print(f"fleet-agentd {'is running (pid ' + str(pid) + ')' if pid else 'is not running'}")
        return 0 if pid else EXIT_NOT_RUNNING
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fleet-agentd``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        done = _act(args)
        if done is not None:
            return done
        return run_daemon(_config_path(args), args.log_level, args.daemon, detached=args.detached)
    except FleetError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.exit_code
