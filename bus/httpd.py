"""A small HTTP/1.1 server on asyncio for a daemon's read-only endpoints.

Metrics, health and the status page need GET, HEAD and a long-lived stream
(server-sent events); nothing else. So this is a few dozen lines on
:func:`asyncio.start_server` rather than a framework: one request per connection
(``Connection: close``), bounded request heads, a read timeout, and every connection's
task owned by the server and cancelled when it closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus

from bus.errors import UsageError

logger = logging.getLogger(__name__)

_HEAD_LIMIT = 16 * 1024
_READ_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    """Lower-cased names; the last value of a repeated header."""
    peer: str

    def cookie(self, name: str) -> str | None:
        for part in self.headers.get("cookie", "").split(";"):
            key, _, value = part.strip().partition("=")
            if key == name:
                return value
        return None


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)
    stream: AsyncIterator[bytes] | None = None
    """Sent after the head, chunk by chunk, until it ends or the client goes away (the
    body is then ignored and no length is sent)."""


def text(status: int, message: str) -> Response:
    return Response(status, (message + "\n").encode())


Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class Listen:
    """Where to listen: ``host:port``; a missing host means loopback."""

    host: str
    port: int

    @classmethod
    def parse(cls, value: str) -> Listen:
        """``127.0.0.1:9464``, ``:9464``, ``[::1]:9464``, ``0.0.0.0:8443`` (port 0: any free one).

        Raises:
            UsageError: not that shape.
        """
        host, sep, port = value.strip().rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
            raise UsageError(f"listen address {value!r}: say HOST:PORT (e.g. 127.0.0.1:9464)")
        host = host.strip("[]") or "127.0.0.1"
        return cls(host, int(port))

    @property
    def loopback(self) -> bool:
        """Whether only this machine can connect."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False  # a name: it may resolve to anything

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def loopback_host(host: str) -> bool:
    """Whether a ``Host`` header names this machine's loopback (port or not)."""
    name = host.strip().lower()
    if name.startswith("["):
        name = name[1 : name.find("]")] if "]" in name else name
    elif name.count(":") == 1:
        name = name.rpartition(":")[0]
    if name in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class HttpServer:
    """Serves ``handler`` on ``listen`` (with TLS when ``tls`` is given) until closed.

    On a loopback address it answers only requests whose ``Host`` names loopback: a web
    page elsewhere whose name an attacker re-resolved to 127.0.0.1 (DNS rebinding)
    gets 421, never the data. At most ``max_connections`` are served at once (streams
    included); more get 503.
    """

    def __init__(
        self,
        listen: Listen,
        handler: Handler,
        *,
        tls: ssl.SSLContext | None = None,
        max_connections: int = 256,
    ):
        self.listen = listen
        self.handler = handler
        self.tls = tls
        self.max_connections = max_connections
        self.port = listen.port
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Bind and start accepting.

        Raises:
            UsageError: the address cannot be bound (in use, not ours).
        """
        try:
            self._server = await asyncio.start_server(
                self._accept, self.listen.host, self.listen.port, ssl=self.tls
            )
        except OSError as exc:
            raise UsageError(f"cannot listen on {self.listen}: {exc.strerror or exc}") from None
        sockets = self._server.sockets
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        scheme = "https" if self.tls else "http"
        logger.info("HTTP on %s://%s:%d", scheme, self.listen.host, self.port)

    async def close(self) -> None:
        """Stop accepting, end every open connection (streams included) and wait for them."""
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> HttpServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        busy = len(self._connections) >= self.max_connections
        serve = self._busy(reader, writer) if busy else self._serve(reader, writer)
        task = asyncio.get_running_loop().create_task(serve, name="http")
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)

    async def _busy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            # Read the request first: closing on unread data would reset the connection
            # before the client reads why.
            async with asyncio.timeout(_READ_TIMEOUT_S):
                await reader.readuntil(b"\r\n\r\n")
            await self._write_plain(writer, text(503, "too many connections; try again later"))
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        except asyncio.LimitOverrunError:
            pass
        finally:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await self._read_request(reader, writer)
            if request is None:
                return
            host = request.headers.get("host")
            if self.listen.loopback and host is not None and not loopback_host(host):
                refusal = text(421, "this listener answers to loopback names only")
                await self._write(writer, request, refusal)
                return
            try:
                response = await self.handler(request)
            except Exception:
                logger.exception("HTTP handler failed on %s", request.path)
                response = text(500, "internal error")
            await self._write(writer, request, response)
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError, ssl.SSLError):
            pass  # the client went away or never spoke; nothing to tell anyone
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _read_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> Request | None:
        try:
            async with asyncio.timeout(_READ_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            await self._write_plain(writer, text(431, "request head too large"))
            return None
        if len(head) > _HEAD_LIMIT:
            await self._write_plain(writer, text(431, "request head too large"))
            return None
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            await self._write_plain(writer, text(400, "bad request"))
            return None
        method, target, _ = parts
        if method not in ("GET", "HEAD"):
            await self._write_plain(writer, text(405, "read-only: GET and HEAD only"))
            return None
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        url = urllib.parse.urlsplit(target)
        query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        peer = writer.get_extra_info("peername")
        return Request(method, url.path or "/", query, headers, str(peer[0]) if peer else "?")

    async def _write(self, writer: asyncio.StreamWriter, request: Request, r: Response) -> None:
        try:
            reason = HTTPStatus(r.status).phrase
        except ValueError:
            reason = ""
        head = [f"HTTP/1.1 {r.status} {reason}", f"Content-Type: {r.content_type}"]
        head += [f"{k}: {v}" for k, v in r.headers.items()]
        head.append("Connection: close")
        if r.stream is None:
            head.append(f"Content-Length: {len(r.body)}")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        if request.method == "HEAD":
            await writer.drain()
            return
        if r.stream is None:
            writer.write(r.body)
            await writer.drain()
            return
        try:
            async for chunk in r.stream:
                writer.write(chunk)
                await writer.drain()
        finally:
            closer = getattr(r.stream, "aclose", None)
            if closer is not None:
                await closer()

    async def _write_plain(self, writer: asyncio.StreamWriter, r: Response) -> None:
        await self._write(writer, Request("GET", "/", {}, {}, ""), r)
