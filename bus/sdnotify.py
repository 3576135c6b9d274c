"""systemd's watchdog: ``WATCHDOG=1`` on ``$NOTIFY_SOCKET`` while the event loop runs.

systemd cannot poll an HTTP endpoint, so the unit's ``WatchdogSec=`` is fed from inside:
a task pings at half the interval systemd asks for. It pings as long as the event loop
turns, which is what ``/healthz`` answers too; a loop that hangs stops the pings and
systemd restarts the daemon. Readiness (``/readyz``) is deliberately not tied to it: a
master waiting for its NATS server must not be killed for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket

from bus.tasks import wait_any

logger = logging.getLogger(__name__)


def notify(state: str) -> bool:
    """Send ``state`` (``READY=1``, ``WATCHDOG=1`` …) to systemd; False when not run by it."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(state.encode(), address)
        return True
    return False


def watchdog_interval() -> float | None:
    """Seconds between pings systemd wants (half its timeout), None without a watchdog."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


async def feed_watchdog(stop: asyncio.Event) -> None:
    """Ping systemd's watchdog until ``stop`` (returns at once when there is none)."""
    interval = watchdog_interval()
    if interval is None:
        return
    logger.info("feeding systemd's watchdog every %.1fs", interval)
    while notify("WATCHDOG=1") and not await wait_any(stop, timeout=interval):
        pass
