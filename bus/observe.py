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

from bus.errors import UsageError
from bus.httpd import Handler, HttpServer, Listen, Request, Response, text
from bus.metrics import CONTENT_TYPE, Registry
from bus.tasks import wait_any

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
    """Serve the listener until ``stop`` is set (or the task is cancelled). One that
    cannot listen is logged as an error, never fatal: metrics must not stop the work.
    """
    try:
        server = HttpServer(Listen.parse(listen), observe_handler(registry, readiness))
        await server.start()
    except UsageError as exc:
        logger.error("! no metrics or health endpoints: %s", exc)
        return
    try:
        host = server.listen.host
        logger.info("metrics and health on http://%s:%d/metrics", host, server.port)
        await wait_any(stop)
    finally:
        await server.close()
