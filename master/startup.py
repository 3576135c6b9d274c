"""Starting the master as a daemon: its identity, its hash file, the shell around it."""

from __future__ import annotations

import logging
from pathlib import Path

from bus import FleetError, Signer, generate_seed, write_seed_file
from bus.connection import Bus
from bus.daemon_shell import DaemonSettings, run_daemon, serve
from bus.reloadreport import write_reload_report
from master.config import MasterConfig, load_master_config
from master.controller import Master

logger = logging.getLogger(__name__)

PROGRAM = "fleet-master"


def ensure_identity(config: MasterConfig) -> Signer:
    """The master's key, created (0400) on first start."""
    path = config.key_path
    if not path.exists():
        write_seed_file(path, generate_seed())
        signer = Signer.from_file(path)
        logger.warning("created the master's identity: public key %s", signer.public_key)
        return signer
    return Signer.from_file(path)


def write_hash(config: MasterConfig) -> None:
    if config.hash_file is not None:
        config.hash_file.parent.mkdir(parents=True, exist_ok=True)
        config.hash_file.write_text(config.config_hash() + "\n")


async def serve_master(config_path: Path | None, config: MasterConfig) -> None:
    """The master's life in the daemon: until SIGTERM/SIGINT; SIGHUP re-reads the config."""
    write_hash(config)
    config.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    signer = ensure_identity(config)

    async def build(bus: Bus) -> Master:
        return Master(bus, config, signer)

    def reload(master: Master) -> None:
        try:
            new = load_master_config(config_path)
        except FleetError as exc:
            logger.error("reload refused, keeping the running configuration: %s", exc)
            write_reload_report(config.pid_path, False, f"refused: {exc}")
            return
        write_hash(new)
        master.reload(new)
        write_reload_report(config.pid_path, True, f"reloaded; config hash {new.config_hash()}")

    async def snapshots(bus: Bus) -> object:
        return await bus.objects(bus.subjects.snapshots_bucket)

    await serve(config.connect_settings(), build, storage=snapshots, reload=reload)


def run_master(config_path: Path | None, level: str | None, detach: bool) -> int:
    """Run the master in the foreground (``run``) or detached (``start``), on uvloop."""
    config = load_master_config(config_path)
    settings = DaemonSettings(
        program=PROGRAM,
        pid_path=config.pid_path,
        log_level=level or config.log_level,
        log_file=config.log_file,
        default_log_file=config.data_dir / "master.log",
        log_format=config.log_format,
    )
    code, _ = run_daemon(settings, lambda: serve_master(config_path, config), detach=detach)
    return code
