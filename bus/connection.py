"""The one way to connect to NATS: :func:`connect` gives a :class:`Bus`.

Once connected, a Bus reconnects forever, with exponential backoff and full jitter so a
fleet of agents that lost the same server does not return in lock step, and logs every
disconnect and reconnect. The first connection is bounded for commands (an operator
wants exit 1 in seconds, not a hang) and unbounded for daemons, which wait for the
server to come up.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client
from nats.aio.client import Server as _NatsServer
from nats.js import JetStreamContext
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore
from pydantic import BaseModel, ConfigDict, Field

from bus.codec import DEFAULT_MAX_SIZE
from bus.errors import (
    AuthError,
    ConnectionFailedError,
    FleetTimeoutError,
    PermissionDeniedError,
)
from bus.keys import read_seed_file
from bus.kv import DomainJetStream, KeyValueStore
from bus.objects import ObjectStoreHandle
from bus.publish import DEFAULT_DEADLINE_S, PublishResult, publish_event, publish_with_retry
from bus.retry import Backoff
from bus.subjects import DEFAULT_PREFIX, Subjects, js_api
from schemas import Envelope

logger = logging.getLogger(__name__)

DEFAULT_SERVER = "nats://127.0.0.1:4222"


# Room for the headers of an event (message id, expected sequence): the server counts
# them against its max_payload, nats-py checks only the body.
def default_server() -> str:
    """``FLEET_SERVER`` if set, else the local server: what a command or a daemon whose
    configuration names no server connects to."""
    return os.environ.get("FLEET_SERVER") or DEFAULT_SERVER


_HEADER_ALLOWANCE = 1024
_WAITING_WARN_S = 30.0
"""A daemon waiting for its server warns at once, then at most this often."""


class ConnectSettings(BaseModel):
    """How to reach the bus. Built once from flags, environment and config, then passed down."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    servers: list[str] = Field(default_factory=lambda: [DEFAULT_SERVER], min_length=1)
    name: str = "fleetbus"
    """The connection name the server shows in its monitoring."""
    prefix: str = DEFAULT_PREFIX
    nkey_file: Path | None = None
    """Seed file to authenticate with (mode 0400, owned by the caller)."""
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    inbox_prefix: str | None = None
    """Where replies come back; a per-principal prefix keeps others from reading them."""
    connect_timeout_s: float = Field(default=2.0, gt=0)
    """Bound on the first connection for commands; see ``wait_for_server``."""
    request_timeout_s: float = Field(default=5.0, gt=0)
    """Default bound on JetStream API requests."""
    backoff_initial_s: float = Field(default=0.25, gt=0)
    backoff_max_s: float = Field(default=10.0, gt=0)
    max_msg_size: int = Field(default=DEFAULT_MAX_SIZE, gt=0)
    js_domain: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    """The hub's JetStream domain, for a client at a site behind a leaf node (its API is
    then ``$JS.<domain>.API``); None reaches the JetStream of the server connected to."""


def backoff_delay(attempt: int, initial: float, cap: float, rng: random.Random) -> float:
    """Full-jitter exponential backoff: uniform in ``[0, min(cap, initial·2^attempt)]``."""
    return Backoff(initial, cap, rng=rng).delay(attempt)


def _reconnect_handler(
    settings: ConnectSettings,
) -> Callable[[list[_NatsServer], dict[str, Any]], tuple[_NatsServer | None, float]]:
    rng = random.Random()

    def choose(servers: list[_NatsServer], info: dict[str, Any]) -> tuple[_NatsServer, float]:
        # The least-tried server next rotates through a cluster instead of hammering one.
        server = min(servers, key=lambda s: s.reconnects)
        delay = backoff_delay(
            server.reconnects, settings.backoff_initial_s, settings.backoff_max_s, rng
        )
        logger.debug("reconnecting to %s in %.2fs", server.uri.netloc, delay)
        return server, delay

    return choose


def _tls_context(settings: ConnectSettings) -> ssl.SSLContext | None:
    if settings.tls_ca is None and settings.tls_cert is None:
        return None
    try:
        ctx = ssl.create_default_context(cafile=str(settings.tls_ca) if settings.tls_ca else None)
        if settings.tls_cert is not None:
            ctx.load_cert_chain(
                str(settings.tls_cert), str(settings.tls_key) if settings.tls_key else None
            )
    except (OSError, ssl.SSLError) as exc:
        raise ConnectionFailedError(f"cannot load TLS files: {exc}") from exc
    return ctx


class Bus:
    """A live connection: core NATS, JetStream, and this fleet's subjects.

    Use as ``async with await connect(settings) as bus:``; leaving the block drains.
    """

    def __init__(self, nc: Client, settings: ConnectSettings) -> None:
        self.nc = nc
        self.settings = settings
        self.subjects = Subjects(settings.prefix)
        self.js: JetStreamContext = (
            nc.jetstream(timeout=settings.request_timeout_s)
            if settings.js_domain is None
            else DomainJetStream(nc, domain=settings.js_domain, timeout=settings.request_timeout_s)
        )
        self.permission_errors: list[PermissionDeniedError] = []
        self.reconnects = 0
        self._reconnected = asyncio.Condition()
        self._denied = asyncio.Condition()
        self._kv: dict[str, KeyValue] = {}

    async def wait_reconnected(self, after: int, timeout: float) -> int:
        """Wait until more than ``after`` reconnects have happened; returns the count.

        Raises:
            FleetTimeoutError: no such reconnect within ``timeout`` seconds.
        """
        try:
            async with asyncio.timeout(timeout), self._reconnected:
                await self._reconnected.wait_for(lambda: self.reconnects > after)
        except TimeoutError:
            raise FleetTimeoutError(f"not reconnected within {timeout:g}s") from None
        return self.reconnects

    async def wait_denied(self, subject: str, timeout: float) -> PermissionDeniedError:
        """Wait until the server has refused ``subject`` to this connection.

        nats-py reports a permission violation only through the error callback, so a
        request to a forbidden subject would otherwise just time out; racing this
        against the request turns that into a clear denial.

        Raises:
            FleetTimeoutError: no such refusal within ``timeout`` seconds.
        """

        try:
            async with asyncio.timeout(timeout), self._denied:
                await self._denied.wait_for(lambda: self.denial(subject) is not None)
        except TimeoutError:
            raise FleetTimeoutError(f"{subject} was not refused within {timeout:g}s") from None
        denial = self.denial(subject)
        assert denial is not None
        return denial

    async def _note_denied(self, denial: PermissionDeniedError) -> None:
        async with self._denied:
            self.permission_errors.append(denial)
            self._denied.notify_all()

    async def _note_reconnect(self) -> None:
        async with self._reconnected:
            self.reconnects += 1
            self._reconnected.notify_all()

    @property
    def connected(self) -> bool:
        return bool(self.nc.is_connected)

    @property
    def max_event_size(self) -> int:
        """The largest event this connection may publish: our own limit, or less if the
        server's ``max_payload`` (which counts headers too) is smaller."""
        server = int(self.nc.max_payload or 0)
        if server <= 0:
            return self.settings.max_msg_size
        return max(0, min(self.settings.max_msg_size, server - _HEADER_ALLOWANCE))

    async def publish_event(
        self,
        envelope: Envelope,
        *,
        timeout: float = 2.0,
        expected_last_subject_seq: int | None = None,
        deadline_s: float = DEFAULT_DEADLINE_S,
    ) -> PublishResult:
        """Store an event in the event log, deduplicated by its id (see :mod:`bus.publish`).

        With ``expected_last_subject_seq=0`` the event is stored only as the first on its
        subject; otherwise :class:`~bus.errors.SubjectTakenError` says who was first.
        Retries end ``deadline_s`` seconds after the first try.
        """
        return await publish_event(
            self.js,
            envelope,
            stream=self.subjects.events_stream,
            timeout=min(timeout, deadline_s),
            deadline_s=deadline_s,
            max_size=self.max_event_size,
            denied=self.denial,
            expected_last_subject_seq=expected_last_subject_seq,
        )

    async def publish_stored(
        self,
        subject: str,
        payload: bytes,
        *,
        msg_id: str,
        stream: str,
        headers: dict[str, str] | None = None,
    ) -> PublishResult:
        """Store raw bytes (a job's output chunk) in ``stream``, deduplicated by ``msg_id``
        (see :func:`bus.publish.publish_with_retry`)."""
        return await publish_with_retry(
            self.js,
            subject,
            payload,
            msg_id=msg_id,
            headers=headers,
            stream=stream,
            denied=self.denial,
        )

    def api_subject(self, rest: str) -> str:
        """``$JS.API.<rest>`` in this connection's JetStream domain."""
        return f"{js_api(self.settings.js_domain)}.{rest}"

    def denial(self, subject: str) -> PermissionDeniedError | None:
        """The server's refusal of ``subject`` to this connection, if it refused it."""
        # nats-py lowercases the server's error text, subject included: compare so.
        wanted = subject.lower()
        for refusal in self.permission_errors:
            if refusal.subject.lower() == wanted:
                return PermissionDeniedError(refusal.operation, subject)
        return None

    async def kv(self, bucket: str) -> KeyValueStore:
        """A provisioned KV bucket behind fleetbus types (see :mod:`bus.kv`).

        Raises:
            ConnectionFailedError: the bucket does not exist (``fleet ops init``) or the
                server cannot be reached.
        """
        return KeyValueStore(await self.key_value(bucket), bucket)

    async def objects(self, bucket: str) -> ObjectStoreHandle:
        """A provisioned object store behind fleetbus types (see :mod:`bus.objects`).

        Raises:
            ConnectionFailedError: the store does not exist (``fleet ops init``) or the
                server cannot be reached.
        """
        return ObjectStoreHandle(await self.object_store(bucket), bucket, self.subjects, self.js)

    async def key_value(self, bucket: str) -> KeyValue:
        """A provisioned KV bucket (cached)."""
        if bucket not in self._kv:
            try:
                self._kv[bucket] = await self.js.key_value(bucket)
            except nats.js.errors.BucketNotFoundError:
                raise ConnectionFailedError(
                    f"KV bucket {bucket} does not exist; run `fleet ops init` first"
                ) from None
            except (nats.errors.Error, OSError) as exc:
                raise ConnectionFailedError(f"KV bucket {bucket}: {exc}") from exc
        return self._kv[bucket]

    async def object_store(self, bucket: str) -> ObjectStore:
        """A provisioned object store."""
        try:
            return await self.js.object_store(bucket)
        except nats.js.errors.BucketNotFoundError:
            raise ConnectionFailedError(
                f"object store {bucket} does not exist; run `fleet ops init` first"
            ) from None
        except (nats.errors.Error, OSError) as exc:
            raise ConnectionFailedError(f"object store {bucket}: {exc}") from exc

    async def close(self, timeout: float = 5.0) -> None:
        """Drain (deliver what is in flight, then close), bounded by ``timeout``."""
        if self.nc.is_closed:
            return
        try:
            async with asyncio.timeout(timeout):
                await self.nc.drain()
        except (TimeoutError, OSError, RuntimeError, nats.errors.Error) as exc:
            logger.warning("drain did not finish (%s); closing", exc or type(exc).__name__)
        finally:
            if not self.nc.is_closed:
                try:
                    await self.nc.close()
                except (OSError, RuntimeError, nats.errors.Error) as exc:
                    # The transport is already broken (server gone): nothing left to flush.
                    logger.debug("close after a lost connection: %r", exc)

    async def __aenter__(self) -> Bus:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        # Shielded: cleanup must run to completion even when the caller is cancelled.
        await asyncio.shield(self.close())


async def connect(settings: ConnectSettings | None = None, *, wait_for_server: bool = False) -> Bus:
    """Connect to NATS.

    Args:
        settings: where and how; the defaults reach a local server.
        wait_for_server: keep trying forever (daemons); otherwise give up after
            ``settings.connect_timeout_s`` (commands).

    Raises:
        ConnectionFailedError: no server reachable in time, or bad TLS files.
        AuthError: the server refused our credentials.
        SecretFileError: the nkey file is missing, unsafe or invalid.
    """
    settings = settings or ConnectSettings()
    options: dict[str, Any] = {}
    if settings.nkey_file is not None:
        options["nkeys_seed_str"] = read_seed_file(settings.nkey_file).decode("ascii")
    tls = _tls_context(settings)
    if tls is not None:
        options["tls"] = tls
    if settings.inbox_prefix:
        options["inbox_prefix"] = settings.inbox_prefix

    nc = Client()
    bus = Bus(nc, settings)
    first_connect = True
    last_error: Exception | None = None
    refused: Exception | None = None  # an authorization refusal outranks later resets
    servers = ", ".join(settings.servers)
    warned_at: float | None = None  # a daemon waiting for its server says so, not too often
    if wait_for_server:
        logger.info("connecting to %s", servers)
    # `bus` is created before connecting so the callbacks can record into it.

    async def on_error(exc: Exception) -> None:
        nonlocal last_error, refused
        last_error = exc
        text = str(exc)
        if first_connect and "authorization" in text.lower():
            refused = exc
        if "permissions violation" in text.lower():
            denied = _permission_violation(text)
            logger.error("%s", denied)
            await bus._note_denied(denied)
        elif first_connect:
            nonlocal warned_at
            now = time.monotonic()
            if wait_for_server and (warned_at is None or now - warned_at >= _WAITING_WARN_S):
                warned_at = now
                logger.warning("cannot reach %s (%s); still trying", servers, _describe(exc))
            else:
                logger.debug("connect attempt failed: %s", exc)
        else:
            logger.warning("NATS error: %s", exc)

    async def on_disconnected() -> None:
        if not first_connect and not (nc.is_closed or nc.is_draining):
            logger.warning("disconnected from NATS; reconnecting")

    async def on_reconnected() -> None:
        url = nc.connected_url.netloc if nc.connected_url else "?"
        logger.warning("reconnected to NATS at %s", url)
        await bus._note_reconnect()

    async def on_closed() -> None:
        logger.debug("NATS connection closed")

    try:
        async with asyncio.timeout(None if wait_for_server else settings.connect_timeout_s):
            await nc.connect(
                servers=settings.servers,
                name=settings.name,
                connect_timeout=max(1, round(settings.connect_timeout_s)),
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                # Only paces retries of the first connection; later ones use the handler.
                reconnect_time_wait=1,
                reconnect_to_server_handler=_reconnect_handler(settings),
                error_cb=on_error,
                disconnected_cb=on_disconnected,
                reconnected_cb=on_reconnected,
                closed_cb=on_closed,
                **options,
            )
    except TimeoutError:
        await nc.close()
        if refused is not None:
            raise AuthError(
                f"{', '.join(settings.servers)} refused our credentials: {_describe(refused)}"
            ) from None
        why = f": {_describe(last_error)}" if last_error is not None else ""
        raise ConnectionFailedError(
            f"cannot connect to {', '.join(settings.servers)} "
            f"within {settings.connect_timeout_s:g}s{why}"
        ) from None
    except (OSError, nats.errors.Error) as exc:
        await nc.close()
        raise ConnectionFailedError(f"cannot connect to {servers}: {exc}") from exc
    first_connect = False
    url = nc.connected_url.netloc if nc.connected_url else "?"
    if warned_at is not None:
        logger.warning("connected to %s", url)
    else:
        logger.log(logging.INFO if wait_for_server else logging.DEBUG, "connected to %s", url)
    return bus


def _describe(exc: Exception) -> str:
    text = str(exc).strip().strip("'\"") or type(exc).__name__
    return text.removeprefix("nats: ")


def _permission_violation(text: str) -> PermissionDeniedError:
    # nats-py says: nats: permissions violation for publish to "fleet.evt.x"
    operation = "subscribing to" if "subscription" in text.lower() else "publishing to"
    subject = text.split('"')[1] if text.count('"') >= 2 else text
    return PermissionDeniedError(operation, subject)
