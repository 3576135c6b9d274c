"""A daemon's observability listener: ``/metrics``, ``/healthz`` and ``/readyz``.

``/healthz`` answers 200 while the process and its event loop live (an answer at all
is the proof). ``/readyz`` answers 200 only when the daemon says it is ready (connected
to NATS, caught up with the log) and 503 with the reason otherwise, so a load balancer,
an orchestrator or the systemd watchdog (see ``ops/systemd``) can tell them apart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from bus.httpd import Handler, HttpServer, Listen, Request, Response, text
from bus.metrics import CONTENT_TYPE, Registry

logger = logging.getLogger(__name__)

Readiness = Callable[[], "str | None"]
"""None when ready; otherwise why not, in a few words."""


def observe_handler(registry: Registry, readiness: Readiness) -> Handler:
    """The request handler of the observability listener."""

    async def handle(request: Request) -> Response:
        if request.path == "/metrics":
            return Response(200, await registry.render(), CONTENT_TYPE)
        if request.path == "/healthz":
            return text(200, "ok")
        if request.path == "/readyz":
            why = readiness()
            return text(200, "ready") if why is None else text(503, f"not ready: {why}")
        return text(404, "not found: try /metrics, /healthz or /readyz")

    return handle


async def serve_observability(
    listen: str, registry: Registry, readiness: Readiness, stop: asyncio.Event
) -> None:
    """Serve the listener until ``stop`` is set (or the task is cancelled).

    Raises:
        UsageError: ``listen`` is malformed or cannot be bound.
    """
    server = HttpServer(Listen.parse(listen), observe_handler(registry, readiness))
    async with server:
        logger.info("metrics and health on http://%s/metrics", server.listen)
        await stop.wait()
