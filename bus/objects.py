"""Object stores behind fleetbus types: whole objects, their records, chunked reads.

An :class:`ObjectStoreHandle` (from :meth:`bus.connection.Bus.objects`) raises only
fleetbus errors; a missing object reads as None. :meth:`ObjectStoreHandle.chunks` reads
an object chunk by chunk with a deadline per chunk, because nats-py's ``get`` waits
forever when the server goes away mid-transfer.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
from nats.js.api import ObjectMeta
from nats.js.object_store import ObjectStore

from bus.errors import ConnectionFailedError
from bus.kv import translate
from bus.subjects import Subjects

_NATS_ERRORS = (nats.errors.Error, nats.js.errors.Error, OSError)
_MISSING = (nats.js.errors.ObjectNotFoundError, nats.js.errors.ObjectDeletedError)


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What the store records of one object. ``digest`` is ``SHA-256=<base64url>``."""

    name: str
    size: int
    digest: str | None
    nuid: str
    description: str | None = None


def _info(info: Any) -> ObjectInfo:
    return ObjectInfo(
        name=str(info.name),
        size=int(info.size or 0),
        digest=info.digest,
        nuid=str(info.nuid or ""),
        description=getattr(info, "description", None),
    )


class ObjectStoreHandle:
    """One provisioned object store bucket."""

    def __init__(self, store: ObjectStore, bucket: str, subjects: Subjects, js: Any) -> None:
        self._store = store
        self._js = js
        self.bucket = bucket
        self._subjects = subjects

    async def info(self, name: str) -> ObjectInfo | None:
        """The object's record; None if there is no such object."""
        try:
            return _info(await self._store.get_info(name))
        except _MISSING:
            return None
        except _NATS_ERRORS as exc:
            raise translate(f"object info of {self.bucket}/{name}", exc) from exc

    async def get(self, name: str) -> bytes | None:
        """The whole object; None if there is no such object."""
        try:
            result = await self._store.get(name)
        except _MISSING:
            return None
        except _NATS_ERRORS as exc:
            raise translate(f"reading {self.bucket}/{name}", exc) from exc
        return bytes(result.data or b"")

    async def put(self, name: str, data: bytes, *, description: str | None = None) -> ObjectInfo:
        """Store ``data`` as ``name``, replacing any object of that name."""
        meta = ObjectMeta(name=name, description=description)
        try:
            return _info(await self._store.put(name, data, meta=meta))
        except _NATS_ERRORS as exc:
            raise translate(f"storing {self.bucket}/{name}", exc) from exc

    async def delete(self, name: str) -> None:
        """Delete the object (nothing happens if it is not there)."""
        try:
            await self._store.delete(name)
        except _MISSING:
            return
        except _NATS_ERRORS as exc:
            raise translate(f"deleting {self.bucket}/{name}", exc) from exc

    async def list(self) -> list[ObjectInfo]:
        """Every object in the bucket."""
        try:
            infos = await self._store.list(ignore_deletes=True)
        except nats.js.errors.NotFoundError:
            return []
        except _NATS_ERRORS as exc:
            raise translate(f"listing {self.bucket}", exc) from exc
        return [_info(i) for i in infos]

    async def chunks(self, info: ObjectInfo, *, chunk_timeout_s: float) -> AsyncIterator[bytes]:
        """The object's chunks in order, each within ``chunk_timeout_s`` of the last.

        Raises:
            ConnectionFailedError: the server went away or stalled mid-object.
        """
        if info.size == 0:
            return
        what = f"reading {self.bucket}/{info.name}"
        try:
            sub = await self._js.subscribe(
                self._subjects.object_chunks(self.bucket, info.nuid),
                stream=self._subjects.object_stream(self.bucket),
                ordered_consumer=True,
            )
        except _NATS_ERRORS as exc:
            raise translate(what, exc) from exc
        received = 0
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=chunk_timeout_s)
                except _NATS_ERRORS as exc:
                    raise ConnectionFailedError(
                        f"{what}: stalled at {received} of {info.size} bytes ({exc!r})"
                    ) from exc
                received += len(msg.data)
                yield msg.data
                if msg.metadata.num_pending == 0:
                    return
        finally:
            with contextlib.suppress(*_NATS_ERRORS):
                await sub.unsubscribe()
