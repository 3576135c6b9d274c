"""The daemon around :class:`~master.runtime.MasterRuntime`: signals, identity, hash file."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path

from bus import FleetError, Signer, generate_seed, write_seed_file
from bus.command import LOG_FORMAT
from bus.daemon import (
    PidFile,
    connect_unless_stopped,
    daemonize,
    report_ready,
    wait_for_storage,
)
from master.config import MasterConfig, load_master_config
from master.runtime import MasterRuntime

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


async def _reload(runtime: MasterRuntime, config: MasterConfig) -> None:
    try:
        await runtime.reload(config)
    except FleetError as exc:
        logger.error("reload failed: %s", exc)


async def serve(config_path: Path | None, config: MasterConfig) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    runtime: MasterRuntime | None = None

    def on_stop() -> None:
        stop.set()
        if runtime is not None:
            runtime.stop()

    def on_reload() -> None:
        try:
            new = load_master_config(config_path)
        except FleetError as exc:
            logger.error("reload refused, keeping the running configuration: %s", exc)
            return
        write_hash(new)
        if runtime is not None:
            task = asyncio.ensure_future(_reload(runtime, new))
            reloading.add(task)
            task.add_done_callback(reloading.discard)

    reloading: set[asyncio.Future[None]] = set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop)
    loop.add_signal_handler(signal.SIGHUP, on_reload)

    config.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    signer = ensure_identity(config)
    bus = await connect_unless_stopped(config.connect_settings(), stop)
    if bus is None:
        return
    async with bus:
        snapshots = bus.subjects.snapshots_bucket
        if not await wait_for_storage(bus, stop, lambda b: b.object_store(snapshots)):
            return
        runtime = MasterRuntime(bus, config, signer)
        await runtime.run()


def run_master(config_path: Path | None, level: str | None, detach: bool) -> int:
    """Run the master in the foreground (``run``) or detached (``start``)."""
    config = load_master_config(config_path)
    ready_fd = daemonize() if detach else None
    log_file = config.log_file or (config.data_dir / "master.log" if detach else None)
    if log_file:
        log_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    handlers: list[logging.Handler] = (
        [logging.FileHandler(log_file)] if log_file else [logging.StreamHandler(sys.stderr)]
    )
    logging.basicConfig(
        level=level or config.log_level, format=LOG_FORMAT, handlers=handlers, force=True
    )
    logging.getLogger("nats").setLevel(logging.ERROR)
    pidfile = PidFile(config.pid_path, PROGRAM)
    try:
        pidfile.acquire()
    except FleetError as exc:
        logger.error("%s", exc)
        report_ready(ready_fd, ok=False)
        return exc.exit_code
    report_ready(ready_fd, ok=True)
    write_hash(config)
    try:
        asyncio.run(serve(config_path, config))
    except FleetError as exc:
        logger.error("%s", exc)
        return exc.exit_code
    finally:
        pidfile.release()
    return 0
