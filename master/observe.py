"""What the master shows outside the bus: metrics and health on ``metrics_listen``, the
status page on ``web_listen``, and systemd's watchdog. Started with the master's other
parts and owned by it, so they stop with it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bus.metrics import Registry
from bus.observe import serve_observability
from bus.sdnotify import feed_watchdog
from master.metrics import MasterMetrics
from master.web.server import StatusPage

if TYPE_CHECKING:
    from master.controller import Master


def readiness(master: Master) -> str | None:
    """None when the master is connected and caught up with the log; else why not."""
    if not master.bus.connected:
        return "not connected to NATS"
    if not master.ready.is_set():
        return f"catching up with the log (at seq {master.projection.seq})"
    return None


async def start_observability(master: Master) -> None:
    """Start the listeners the configuration asks for.

    A metrics listener that cannot bind is logged and left out; a status page that is
    configured but cannot be served (its token, TLS files or address) stops the master.

    Raises:
        UsageError: the status page cannot be served.
    """
    config = master.config
    if config.metrics_listen:
        registry = Registry()
        MasterMetrics(master).attach(registry)
        master.tasks.spawn(
            serve_observability(
                config.metrics_listen, registry, lambda: readiness(master), master.stopping
            ),
            "metrics",
        )
    if config.web_listen:
        page = StatusPage(master)
        await page.server.start()
        master.tasks.spawn(page.serve(), "status page")
    master.tasks.spawn(feed_watchdog(master.stopping), "watchdog")
