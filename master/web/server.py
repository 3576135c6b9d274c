"""The master's read-only status page: static files, JSON pages, live events.

Served on ``web_listen`` only when configured. Beyond loopback the configuration must
name a TLS certificate and key and a token file (:mod:`master.config` refuses to load
otherwise); with a token, every request must carry it: ``Authorization: Bearer …``, or
the ``fleet_token`` cookie that visiting ``/?token=…`` once sets (HttpOnly, SameSite
Strict, Secure under TLS), so the browser's EventSource carries it too.

Everything the page shows comes from the fold or the log and may be attacker-chosen
(job output, labels, user names): the page builds its DOM with ``textContent`` only,
and a strict Content-Security-Policy forbids any script but its own file.
"""

from __future__ import annotations

import hmac
import json
import logging
import ssl
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bus import FleetError
from bus.errors import UsageError
from bus.httpd import HttpServer, Listen, Request, Response, text
from master.web import pages, trail
from master.web.live import Live

if TYPE_CHECKING:
    from master.controller import Master

logger = logging.getLogger(__name__)

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/app.css": ("app.css", "text/css; charset=utf-8"),
}
COOKIE = "fleet_token"


def read_token(path: Path) -> str:
    """The page's access token, from a file only its owner may read.

    Raises:
        UsageError: missing, empty, or readable by others.
    """
    try:
        mode = path.stat().st_mode
        token = path.read_text().strip()
    except OSError as exc:
        raise UsageError(f"web_token_file {path}: {exc.strerror or exc}") from None
    if mode & 0o077:
        raise UsageError(f"web_token_file {path} is readable by others; chmod 600 it")
    if len(token) < 16:
        raise UsageError(f"web_token_file {path}: the token must have at least 16 characters")
    return token


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context for the page.

    Raises:
        UsageError: the files cannot be loaded.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"web TLS files {cert}, {key}: {exc}") from None
    return context


class StatusPage:
    """The page's HTTP side; :meth:`serve` runs it as one of the master's tasks."""

    def __init__(self, master: Master) -> None:
        config = master.config
        assert config.web_listen is not None
        self.master = master
        self.listen = Listen.parse(config.web_listen)
        self.token = read_token(config.web_token_file) if config.web_token_file else None
        self.tls = (
            tls_context(config.web_tls_cert, config.web_tls_key)
            if config.web_tls_cert and config.web_tls_key
            else None
        )
        self.live = Live(lambda: master.projection, self._summary_args)
        self.server = HttpServer(self.listen, self.handle, tls=self.tls)

    def _summary_args(self) -> tuple[bool, int]:
        return self.master.ready.is_set(), len(self.master.config.agents)

    async def serve(self) -> None:
        """Serve (the server is started already) until the master stops, pushing live
        updates to open pages; then close every connection."""
        self.master.on_folded(self.live.folded)
        try:
            scheme = "https" if self.tls else "http"
            logger.info("status page on %s://%s:%d/", scheme, self.listen.host, self.server.port)
            await self.live.pump(self.master.stopping)
        finally:
            await self.server.close()

    # --- requests ---------------------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        response = await self._route(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    def _authorised(self, request: Request) -> bool:
        if self.token is None:
            return True
        given = request.cookie(COOKIE) or ""
        auth = request.headers.get("authorization", "")
        if auth.startswith("Bearer "):
            given = auth[7:].strip()
        return hmac.compare_digest(given.encode(), self.token.encode())

    async def _route(self, request: Request) -> Response:
        if self.token is not None and request.path == "/" and "token" in request.query:
            return self._login(request.query["token"])
        if not self._authorised(request):
            return text(401, "unauthorised: open /?token=… once, or send a Bearer token")
        if request.path in STATIC:
            name, content_type = STATIC[request.path]
            body = resources.files("master.web").joinpath("static", name).read_bytes()
            return Response(200, body, content_type)
        if request.path == "/api/stream":
            return Response(
                200,
                content_type="text/event-stream",
                stream=self.live.stream(),
                headers={"X-Accel-Buffering": "no"},
            )
        if request.path.startswith("/api/"):
            try:
                doc = await self._api(request.path[5:], request.query)
            except ValueError as exc:
                return text(400, f"bad request: {exc}")
            except LookupError as exc:
                return text(404, str(exc))
            except FleetError as exc:
                return text(503, f"the log cannot be read now: {exc}")
            body = json.dumps(doc, separators=(",", ":")).encode()
            return Response(200, body, "application/json")
        return text(404, "not found")

    def _login(self, given: str) -> Response:
        assert self.token is not None
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            return text(401, "unauthorised")
        secure = "; Secure" if self.tls else ""
        return Response(
            303,
            b"",
            headers={
                "Location": "/",
                "Set-Cookie": f"{COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict{secure}",
            },
        )

    async def _api(self, name: str, query: dict[str, str]) -> Any:
        master = self.master
        p = master.projection
        if name == "summary":
            ready, configured = self._summary_args()
            return pages.summary(p, ready=ready, configured=configured)
        if name == "agents":
            return pages.agents_page(p, query)
        if name == "jobs":
            return pages.jobs_page(p, query)
        if name == "rollouts":
            return pages.rollouts_page(p)
        trusted = {**master.config.trusted_keys(), master.signer.public_key: master.config.id}
        if name == "job":
            job = p.jobs.get(query.get("id", ""))
            if job is None:
                raise LookupError(f"no job {query.get('id', '')!r}")
            return {
                "job": job.to_json(tail=True),
                "events": await trail.job_trail(master.bus, job.agent, job.job_id, trusted),
                "output": await trail.job_output(master.bus, job.agent, job.job_id),
            }
        if name == "audit":
            before = int(query.get("before") or 0)
            _, limit = pages.paging(query)
            return await trail.audit_page(master.bus, before, limit, trusted, query.get("type", ""))
        raise LookupError(f"no such page {name!r}")
