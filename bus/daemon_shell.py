"""The one daemon shell: what ``fleet-agentd`` and ``fleet-master`` do around their service.

:func:`run_daemon` is the process: detach if asked, log to a file or stderr, hold the
pid file, run the service's coroutine on the chosen event loop, map a fleetbus error to
its exit code. :func:`serve` is the service's life inside it: SIGTERM/SIGINT stop it,
SIGHUP reloads it, it connects (waiting for the server as long as it takes, unless told
to stop first), waits until the fleet's storage exists, builds the service and runs it
until it returns. What differs between the agent and the master is passed in.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from bus.command import LOG_FORMAT, nats_log_level
from bus.connection import Bus, ConnectSettings, connect
from bus.detach import PidFile, daemonize, report_ready
from bus.errors import FleetError
from bus.eventloop import run
from bus.log import last_seq
from bus.logformat import LogFormat, use_format
from bus.tasks import first_of, wait_any

logger = logging.getLogger(__name__)

T = TypeVar("T")
S = TypeVar("S", bound="Service")

_STORAGE_WAIT_S = 5.0


class Service(Protocol):
    """A long-lived part (the agent, the master) as the shell drives it."""

    ready: asyncio.Event

    def stop(self) -> None:
        """Begin stopping; :meth:`run` returns soon after. Safe from a signal handler."""

    async def run(self) -> None:
        """Run until stopped."""


@dataclass(frozen=True)
class DaemonSettings:
    """What the shell needs to know about the daemon it runs."""

    program: str
    pid_path: Path
    log_level: str
    log_file: Path | None = None
    """Where to log; None: stderr in the foreground, ``default_log_file`` detached."""
    default_log_file: Path | None = None
    use_uvloop: bool = True
    log_format: LogFormat = "text"


def configure_daemon_logging(settings: DaemonSettings, *, detached: bool) -> None:
    """stderr in the foreground, a file when detached (or when one is configured)."""
    log_file = settings.log_file or (settings.default_log_file if detached else None)
    handlers: list[logging.Handler]
    if log_file is not None:
        log_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        handlers = [logging.FileHandler(log_file)]
    else:
        handlers = [logging.StreamHandler(sys.stderr)]
    logging.basicConfig(level=settings.log_level, format=LOG_FORMAT, handlers=handlers, force=True)
    use_format(settings.log_format)
    logging.getLogger("nats").setLevel(nats_log_level(settings.log_level))


def run_daemon(
    settings: DaemonSettings,
    main: Callable[[], Coroutine[Any, Any, T]],
    *,
    detach: bool,
    configure_logging: Callable[[bool], None] | None = None,
) -> tuple[int, T | None]:
    """Run ``main()`` as the daemon ``settings.program``.

    Args:
        settings: pid file, logging, event loop.
        main: the daemon's coroutine (usually one that calls :func:`serve`).
        detach: double fork into the background first (``start``, ``-d``).
        configure_logging: instead of :func:`configure_daemon_logging`, given ``detach``.

    Returns:
        The exit code and, when ``main`` ran to its end, what it returned.
    """
    ready_fd = daemonize() if detach else None
    if configure_logging is not None:
        configure_logging(detach)
    else:
        configure_daemon_logging(settings, detached=detach)
    pidfile = PidFile(settings.pid_path, settings.program)
    try:
        pidfile.acquire()
    except FleetError as exc:
        logger.error("%s", exc)
        report_ready(
            ready_fd, ok=False, why=f"{settings.program}: error: {exc}", code=exc.exit_code
        )
        return exc.exit_code, None
    report_ready(ready_fd, ok=True)
    try:
        return 0, run(main(), use_uvloop=settings.use_uvloop)
    except FleetError as exc:
        logger.error("%s", exc)
        return exc.exit_code, None
    finally:
        pidfile.release()


async def serve(
    connect_settings: ConnectSettings,
    build: Callable[[Bus], Awaitable[S]],
    *,
    storage: Callable[[Bus], Awaitable[object]],
    reload: Callable[[S], None] | None = None,
    when_ready: Callable[[], None] | None = None,
) -> S | None:
    """Run one service until it stops; returns it (None if stopped before it was built).

    Args:
        connect_settings: how to reach the bus.
        build: make the service once connected and the storage exists.
        storage: opens the one resource the service cannot start without (raises a
            FleetError while it is missing).
        reload: what SIGHUP does to the running service.
        when_ready: called once the service says it is ready.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    service: S | None = None

    def on_stop() -> None:
        stop.set()
        if service is not None:
            service.stop()

    def on_reload() -> None:
        if service is not None and reload is not None:
            reload(service)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop)
    loop.add_signal_handler(signal.SIGHUP, on_reload)
    try:
        bus = await connect_unless_stopped(connect_settings, stop)
        if bus is None:
            return None
        async with bus:
            if not await wait_for_storage(bus, stop, storage):
                return None
            service = await build(bus)
            if stop.is_set():
                return service
            await _run_reporting_ready(service, when_ready)
        return service
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)


async def _run_reporting_ready(service: Service, when_ready: Callable[[], None] | None) -> None:
    if when_ready is None:
        await service.run()
        return

    async def report() -> None:
        await service.ready.wait()
        when_ready()

    async with asyncio.TaskGroup() as group:
        reporter = group.create_task(report(), name="report ready")
        try:
            await service.run()
        finally:
            reporter.cancel()


async def connect_unless_stopped(settings: ConnectSettings, stop: asyncio.Event) -> Bus | None:
    """Connect, waiting for the server as long as it takes, unless ``stop`` is set first."""
    connecting = asyncio.ensure_future(connect(settings, wait_for_server=True))
    winner = await first_of(connecting, stop.wait())
    if winner is connecting:
        return connecting.result()
    return None


async def wait_for_storage(
    bus: Bus, stop: asyncio.Event, *checks: Callable[[Bus], Awaitable[object]]
) -> bool:
    """Wait until the fleet's streams exist (``fleet ops init``); False if told to stop.

    Each check opens one resource the daemon needs and raises while it is missing.
    """
    warned = False
    while not stop.is_set():
        try:
            await last_seq(bus, bus.subjects.events_stream)
            for check in checks:
                await check(bus)
            return True
        except FleetError as exc:
            if not warned:
                logger.error("the fleet's streams are missing (%s); run `fleet ops init`", exc)
                warned = True
        await wait_any(stop, timeout=_STORAGE_WAIT_S)
    return False
