"""Key-value buckets behind fleetbus types: entries, conditional writes, watches.

A :class:`KeyValueStore` (from :meth:`bus.connection.Bus.kv`) raises only fleetbus
errors. A missing or deleted key reads as None and an empty bucket lists no keys, which
is what every caller means by "not there"; a conditional write that lost raises
:class:`~bus.errors.RevisionMismatchError` (:class:`~bus.errors.KeyExistsError` for
create).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue

from bus.errors import (
    ConnectionFailedError,
    FleetError,
    FleetTimeoutError,
    KeyExistsError,
    RevisionMismatchError,
)
from bus.subjects import published_in_domain


class DomainJetStream(JetStreamContext):
    """JetStream in another domain (a site's client of the hub's JetStream, across a
    leaf node), KV writes included.

    nats-server lets no ``$KV.>`` cross a leaf link between JetStream domains; the hub
    takes them as ``$JS.<domain>.API.$KV.>`` and maps them back (as nats-go does for a
    non-default API prefix). nats-py writes keys to ``$KV.`` only: so here
    (:func:`bus.subjects.published_in_domain`, also what the site's permissions allow).
    """

    def __init__(self, conn: Client, *, domain: str, timeout: float) -> None:
        super().__init__(conn, domain=domain, timeout=timeout)
        self._domain = domain

    async def publish(
        self,
        subject: str,
        payload: bytes = b"",
        timeout: float | None = None,
        stream: str | None = None,
        headers: dict[str, Any] | None = None,
        msg_ttl: float | None = None,
    ) -> api.PubAck:
        subject = published_in_domain(subject, self._domain)
        return await super().publish(subject, payload, timeout, stream, headers, msg_ttl)


_FREE_OPERATIONS = frozenset({"DEL", "PURGE"})
_NATS_ERRORS = (nats.errors.Error, nats.js.errors.Error, OSError)
_LOST = (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.BadRequestError)


@dataclass(frozen=True, slots=True)
class KvEntry:
    """One revision of a key. ``deleted`` for a delete or purge marker."""

    key: str
    value: bytes
    revision: int
    deleted: bool = False
    purged: bool = False
    """Removed by a purge (which is how a per-key TTL expiry shows), not by a delete."""


def _entry(entry: Any) -> KvEntry:
    return KvEntry(
        key=str(entry.key),
        value=bytes(entry.value or b""),
        revision=int(entry.revision or 0),
        deleted=entry.operation in _FREE_OPERATIONS,
        purged=entry.operation == "PURGE",
    )


def translate(what: str, exc: BaseException) -> FleetError:
    """The fleetbus error for a nats-py failure while doing ``what``."""
    if isinstance(exc, nats.errors.TimeoutError):
        return FleetTimeoutError(f"{what}: no answer from the server")
    return ConnectionFailedError(f"{what}: {exc or type(exc).__name__}")


class KeyValueStore:
    """One provisioned KV bucket."""

    def __init__(self, kv: KeyValue, bucket: str) -> None:
        self._kv = kv
        self.bucket = bucket

    async def get(self, key: str) -> KvEntry | None:
        """The key's current entry; None if it never existed or was deleted."""
        try:
            entry = _entry(await self._kv.get(key))
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        except _NATS_ERRORS as exc:
            raise translate(f"reading {self.bucket}/{key}", exc) from exc
        return None if entry.deleted else entry

    async def put(self, key: str, value: bytes) -> int:
        """Write ``value``; returns the new revision."""
        try:
            return await self._kv.put(key, value)
        except _NATS_ERRORS as exc:
            raise translate(f"writing {self.bucket}/{key}", exc) from exc

    async def create(self, key: str, value: bytes) -> int:
        """Write ``value`` only if the key has no live value; returns the new revision.

        Raises:
            KeyExistsError: the key has a value.
        """
        try:
            return await self._kv.create(key, value)
        except _LOST:
            raise KeyExistsError(self.bucket, key) from None
        except _NATS_ERRORS as exc:
            raise translate(f"creating {self.bucket}/{key}", exc) from exc

    async def update(self, key: str, value: bytes, *, last: int) -> int:
        """Write ``value`` only if ``last`` is still the key's revision.

        Raises:
            RevisionMismatchError: someone wrote the key since.
        """
        try:
            return await self._kv.update(key, value, last=last)
        except _LOST:
            raise RevisionMismatchError(self.bucket, key) from None
        except _NATS_ERRORS as exc:
            raise translate(f"updating {self.bucket}/{key}", exc) from exc

    async def delete(self, key: str) -> None:
        """Delete the key (a delete marker; its history stays until purged)."""
        try:
            await self._kv.delete(key)
        except _NATS_ERRORS as exc:
            raise translate(f"deleting {self.bucket}/{key}", exc) from exc

    async def keys(self) -> list[str]:
        """Every key with a live value (empty for an empty bucket)."""
        try:
            return list(await self._kv.keys())
        except nats.js.errors.NoKeysError:
            return []
        except _NATS_ERRORS as exc:
            raise translate(f"listing {self.bucket}", exc) from exc

    @contextlib.asynccontextmanager
    async def watch(
        self, keys: str = ">", *, include_history: bool = False
    ) -> AsyncIterator[AsyncIterator[KvEntry | None]]:
        """Watch ``keys`` (a key or a wildcard); use as ``async with kv.watch(k) as w``.

        The iterator first yields the current values (or the history), then one None
        meaning "caught up", then every change as it happens, deletes included (as
        entries with ``deleted`` set).
        """
        what = f"watching {self.bucket}/{keys}"
        try:
            watcher = await self._kv.watch(keys, include_history=include_history)
        except _NATS_ERRORS as exc:
            raise translate(what, exc) from exc

        async def updates() -> AsyncIterator[KvEntry | None]:
            try:
                async for entry in watcher:
                    yield None if entry is None else _entry(entry)
            except _NATS_ERRORS as exc:
                raise translate(what, exc) from exc

        try:
            yield updates()
        finally:
            # The connection may be gone already, and the watch with it.
            with contextlib.suppress(*_NATS_ERRORS):
                await watcher.stop()  # type: ignore[no-untyped-call]
