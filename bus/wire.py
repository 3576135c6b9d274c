"""The NATS client protocol at its barest: one connection that subscribes and reads
deliveries in bulk, for :mod:`bus.bulkread`.

nats-py turns every delivered message into a ``Msg``, parses its headers, queues it
and wakes a task for it: about 20 µs a message, a ceiling near 50,000 messages/s before
anything is decoded. A replay reads one stream from start to end once, so the deliveries
are taken here instead: whole socket reads parsed at once, headers split only as far as
a status line. Everything else (creating the consumer, permissions, reconnects) stays
with the bus's nats-py connection; this one only listens, with the same credentials.

The wire format (https://docs.nats.io/reference/reference-protocols/nats-protocol):
``HMSG <subject> <sid> [reply] <header bytes> <total bytes>\\r\\n<headers><body>\\r\\n``,
``MSG <subject> <sid> [reply] <bytes>\\r\\n<body>\\r\\n``, ``PING``/``PONG``, ``+OK``,
``-ERR '<text>'`` and ``INFO {json}``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import ssl
from typing import Any
from urllib.parse import urlsplit

import nkeys

from bus.connection import Bus, _permission_violation, _tls_context
from bus.errors import AuthError, ConnectionFailedError, FleetError
from bus.keys import read_seed_file

_READ_BYTES = 1 << 20
_HANDSHAKE_S = 5.0
_STATUS_LINE = b"NATS/1.0"


Delivery = tuple[bytes, bytes, bytes, bytes]
"""One message as the wire brought it: subject, reply (b"" if none), the raw header block
(``NATS/1.0…\r\n\r\n``, b"" for a plain ``MSG``) and the body."""

_HMSG = re.compile(rb"HMSG ([^ \r]+) [^ \r]+ (?:([^ \r]+) )?(\d+) (\d+)\r\n")
_MSG = re.compile(rb"MSG ([^ \r]+) [^ \r]+ (?:([^ \r]+) )?(\d+)\r\n")
_ONE_ID = b"NATS/1.0\r\nNats-Msg-Id: "


def status_of(headers: bytes) -> str | None:
    """The status code of a status message (``100`` heartbeat or flow control, ``404``…),
    or None for a message that carries data."""
    if headers[8:9] != b" " or not headers.startswith(_STATUS_LINE):
        return None
    line = headers[9 : headers.find(b"\r\n")]
    return line.split(b" ", 1)[0].decode("ascii", "replace")


def header_value(headers: bytes, name: str) -> str | None:
    """One header's value (the first), or None."""
    return header_map(headers).get(name)


def header_map(headers: bytes) -> dict[str, str]:
    """Every header (the first value of each), as nats-py would give them."""
    if headers.startswith(_ONE_ID) and headers.count(b"\r\n") == 3:
        # What every stored event carries, and nothing else: the common case, cheaply.
        return {"Nats-Msg-Id": headers[len(_ONE_ID) : -4].strip().decode("utf-8", "replace")}
    out: dict[str, str] = {}
    for line in headers.split(b"\r\n")[1:]:
        key, sep, value = line.partition(b":")
        if sep:
            out.setdefault(key.decode("utf-8", "replace"), value.strip().decode("utf-8", "replace"))
    return out


def _check_end(buffer: bytes, stop: int) -> None:
    # A frame's length that does not land on its CRLF would have the rest of the stream
    # read from inside a message body: a body could then pass for a delivery.
    if buffer[stop : stop + 2] != b"\r\n":
        raise ConnectionFailedError("the server's framing is broken (a length that is not)")


class WireConnection:
    """A listening connection to the server the bus is connected to, as the same user."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._rest = b""
        self._sids = 0

    @classmethod
    async def open(cls, bus: Bus, name: str) -> WireConnection:
        """Connect and authenticate as ``bus`` does (nkey, TLS), to the server it uses.

        Raises:
            ConnectionFailedError: the server is unreachable or ended the handshake.
            AuthError: it refused the credentials.
        """
        url = bus.nc.connected_url
        if url is None:
            raise ConnectionFailedError("the bus is not connected: no server to open a reader to")
        if url.scheme not in ("nats", "tls"):
            raise ConnectionFailedError(
                f"the bulk reader needs a nats:// or tls:// server, not {url.scheme}://"
            )
        parts = urlsplit(url.geturl())
        host, port = parts.hostname or "127.0.0.1", parts.port or 4222
        settings = bus.settings
        tls = _tls_context(settings)
        try:
            async with asyncio.timeout(_HANDSHAKE_S):
                reader, writer = await asyncio.open_connection(host, port, limit=_READ_BYTES)
                conn = cls(reader, writer)
                try:
                    info = await conn._expect_info()
                    if info.get("tls_required") or tls is not None or url.scheme == "tls":
                        await writer.start_tls(
                            tls or ssl.create_default_context(), server_hostname=host
                        )
                    await conn._send_connect(info, name, settings.nkey_file)
                except BaseException:
                    conn.close()
                    raise
        except FleetError:
            raise
        except TimeoutError:
            raise ConnectionFailedError(f"no handshake with {host}:{port}") from None
        except (OSError, ssl.SSLError, EOFError, asyncio.LimitOverrunError, ValueError) as exc:
            # EOFError: the server hung up mid-handshake (IncompleteReadError); ValueError:
            # what it sent was no INFO line. Either way there is no reader.
            reason = str(exc) or type(exc).__name__
            raise ConnectionFailedError(f"cannot open a reader to {host}:{port}: {reason}") from exc
        return conn

    async def _expect_info(self) -> dict[str, Any]:
        line = await self._reader.readuntil(b"\r\n")
        if not line.startswith(b"INFO "):
            raise ConnectionFailedError(f"the server did not introduce itself: {line[:80]!r}")
        info: dict[str, Any] = json.loads(line[5:])
        return info

    async def _send_connect(self, info: dict[str, Any], name: str, nkey_file: Any) -> None:
        options: dict[str, Any] = {
            "verbose": False,
            "pedantic": False,
            "lang": "python3",
            "version": "fleetbus-wire",
            "protocol": 1,
            "headers": True,
            "no_responders": True,
            "name": name,
        }
        if nkey_file is not None:
            pair = nkeys.from_seed(bytearray(read_seed_file(nkey_file)))
            try:
                options["nkey"] = pair.public_key.decode("ascii")
                nonce = str(info.get("nonce", "")).encode("ascii")
                options["sig"] = base64.b64encode(pair.sign(nonce)).decode("ascii")
            finally:
                pair.wipe()
        self._writer.write(b"CONNECT " + json.dumps(options).encode() + b"\r\nPING\r\n")
        await self._writer.drain()
        await self.flushed()

    async def flushed(self) -> None:
        """Wait until the server has processed everything sent so far (a PING's PONG).

        Raises:
            AuthError: the server refused our credentials.
            PermissionDeniedError: it refused a subscription (or a publish) to this user.
            ConnectionFailedError: it sent an error or closed the connection.
        """
        while True:
            try:
                line = await self._reader.readuntil(b"\r\n")
            except (OSError, EOFError, asyncio.LimitOverrunError) as exc:
                # EOFError: the server hung up (IncompleteReadError), as after a refusal.
                reason = str(exc) or type(exc).__name__
                raise ConnectionFailedError(f"the reader's connection broke: {reason}") from exc
            if line.startswith(b"PONG"):
                return
            if line.startswith(b"PING"):
                self._writer.write(b"PONG\r\n")  # the server drops a client that never answers
            elif line.startswith(b"-ERR"):
                text = _error_text(line)
                if "authoriz" in text.lower():
                    raise AuthError(f"the server refused the reader's credentials: {text}")
                raise _refusal(text, "the server refused the reader")
            # +OK and INFO updates say nothing we need before the first delivery.

    def subscribe(self, subject: str) -> None:
        """Listen on ``subject`` (sent; :meth:`flushed` says when the server has it)."""
        self._sids += 1
        self._writer.write(f"SUB {subject} {self._sids}\r\nPING\r\n".encode())

    def publish(self, subject: str, data: bytes = b"") -> None:
        """Send a message (flow-control answers); no reply expected."""
        self._writer.write(b"PUB %s %d\r\n%s\r\n" % (subject.encode(), len(data), data))

    async def read(self) -> list[Delivery]:
        """The deliveries in the next socket read (maybe none: a PING answered, a partial
        frame kept for the next read).

        Raises:
            PermissionDeniedError: the server refused a subject to this user.
            ConnectionFailedError: the server sent an error or closed the connection.
        """
        try:
            chunk = await self._reader.read(_READ_BYTES)
        except (OSError, ssl.SSLError) as exc:  # a reset, a broken TLS record
            raise ConnectionFailedError(f"the reader's connection broke: {exc}") from exc
        if not chunk:
            raise ConnectionFailedError("the server closed the reader's connection")
        buffer = self._rest + chunk if self._rest else chunk
        out: list[Delivery] = []
        append, hmsg, msg = out.append, _HMSG.match, _MSG.match
        pos, end = 0, len(buffer)
        while pos < end:
            frame = hmsg(buffer, pos)
            if frame is not None:
                subject, reply, header_len, total = frame.groups()
                start = frame.end()
                stop = start + int(total)
                if stop + 2 > end:
                    break
                split = start + int(header_len)
                _check_end(buffer, stop)
                append((subject, reply or b"", buffer[start:split], buffer[split:stop]))
                pos = stop + 2
                continue
            frame = msg(buffer, pos)
            if frame is not None:
                subject, reply, total = frame.groups()
                start = frame.end()
                stop = start + int(total)
                if stop + 2 > end:
                    break
                _check_end(buffer, stop)
                append((subject, reply or b"", b"", buffer[start:stop]))
                pos = stop + 2
                continue
            eol = buffer.find(b"\r\n", pos)
            if eol < 0:
                break
            line, pos = buffer[pos:eol], eol + 2
            if line.startswith(b"PING"):
                self._writer.write(b"PONG\r\n")
            elif line.startswith(b"-ERR"):
                raise _refusal(_error_text(line), "the server ended the reader")
            # +OK, PONG and INFO updates need nothing from a listener.
        self._rest = buffer[pos:]
        return out

    async def drain(self) -> None:
        """Send what is buffered (flow-control answers).

        Raises:
            ConnectionFailedError: the connection broke.
        """
        try:
            await self._writer.drain()
        except (OSError, ssl.SSLError) as exc:
            raise ConnectionFailedError(f"the reader's connection broke: {exc}") from exc

    def close(self) -> None:
        """Hang up (the server drops the subscription with the connection)."""
        with contextlib.suppress(Exception):
            self._writer.close()


def _error_text(line: bytes) -> str:
    return line[4:].strip().strip(b"'").decode("utf-8", "replace")


def _refusal(text: str, what: str) -> FleetError:
    """A ``-ERR``: a permission violation (the connection stays, the subject is refused)
    says which subject, as the bus's own refusals do; anything else ends the reader."""
    if "permissions violation" in text.lower():
        return _permission_violation(text)
    return ConnectionFailedError(f"{what}: {text}")
