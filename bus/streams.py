"""Provisioning every stream, KV bucket and object store of the design, idempotently.

Setting up storage is separate from using it: an operator (``fleet ops init``), the demo
and the tests provision; daemons only publish and consume. Running :func:`provision`
twice changes nothing. A resource that exists with another configuration is reported
field by field (:class:`~bus.errors.ProvisioningConflictError`) and left alone: silently
rewriting the retention of someone's audit log is not a provisioning step.

What is provisioned is described in :mod:`bus.storage_design` (re-exported here).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext, api

from bus.errors import (
    ConnectionFailedError,
    FleetError,
    FleetTimeoutError,
    ProvisioningConflictError,
)
from bus.migrate import FieldChange, migrate_stream
from bus.storage_design import (
    StorageSettings,
    StreamSpec,
    desired_streams,
    differences,
)
from bus.subjects import Subjects

if TYPE_CHECKING:
    from bus.connection import Bus

__all__ = [
    "PROVISION_DEADLINE_S",
    "ProvisionReport",
    "StorageSettings",
    "StreamSpec",
    "desired_streams",
    "differences",
    "ensure_stream",
    "provision",
    "provision_fleet",
]

logger = logging.getLogger(__name__)

PROVISION_DEADLINE_S = 30.0
"""How long provisioning keeps asking an unanswering server (longer than an election)."""

_ERR_NO_SUITABLE_PEERS = 10005  # replicas cannot be placed (yet)
# The server answers this when a stream name is taken by a different configuration.
_ERR_STREAM_NAME_IN_USE = 10058


@dataclass
class ProvisionReport:
    """What :func:`provision` did: the names it created and the ones already right."""

    created: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    changed: list[FieldChange] = field(default_factory=list)
    """Fields migrated (only with ``migrate=True``)."""
    refused: list[FieldChange] = field(default_factory=list)
    """Fields that differ and were left as they are, with the reason."""


async def _create_or_fetch(js: JetStreamContext, spec: StreamSpec) -> api.StreamInfo | None:
    """One attempt: the existing stream's info, or None after creating it."""
    try:
        return await js.stream_info(spec.name)
    except nats.js.errors.NotFoundError:
        pass
    try:
        await js.add_stream(spec.config())
    except nats.js.errors.BadRequestError as exc:
        if exc.err_code != _ERR_STREAM_NAME_IN_USE:
            raise
        # Someone created it between our look and our create: compare theirs.
        return await js.stream_info(spec.name)
    return None


async def ensure_stream(
    js: JetStreamContext,
    spec: StreamSpec,
    *,
    deadline_s: float = PROVISION_DEADLINE_S,
    migrate: bool = False,
    report: ProvisionReport | None = None,
) -> bool:
    """Create the stream of ``spec`` if absent; check it (or migrate it) if present.

    Unanswered requests are retried until ``deadline_s``: in a cluster, a stream whose
    leader was just lost answers nothing until a new leader is elected.

    Args:
        migrate: change a differing existing stream where the server allows it
            (:func:`bus.migrate.migrate_stream`), recording what changed and what was
            refused in ``report``, instead of raising.

    Returns:
        True if it was created, False if it existed (right, or migrated).

    Raises:
        ProvisioningConflictError: it exists with another configuration (not migrating).
        ConnectionFailedError, FleetTimeoutError: the server did not answer in time.
    """
    loop = asyncio.get_running_loop()
    give_up_at = loop.time() + deadline_s
    attempt = 0
    while True:
        attempt += 1
        try:
            info = await _create_or_fetch(js, spec)
            break
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
            if loop.time() >= give_up_at:
                raise FleetTimeoutError(
                    f"no answer from JetStream provisioning {spec.name} "
                    f"after {attempt} attempts ({exc.__class__.__name__})"
                ) from exc
            logger.warning(
                "↻ provisioning %s: no answer (attempt %d); retrying", spec.name, attempt
            )
            await asyncio.sleep(min(2.0, 0.25 * attempt))
        except nats.errors.ConnectionClosedError as exc:
            raise ConnectionFailedError(f"cannot provision {spec.name}: connection closed") from exc
        except nats.js.errors.APIError as exc:
            # A cluster that is starting, or has a peer restarting, cannot place replicas
            # for a moment: that passes, so it is retried like an unanswered request.
            if exc.err_code != _ERR_NO_SUITABLE_PEERS or loop.time() >= give_up_at:
                raise FleetError(
                    f"JetStream refused {spec.kind} {spec.name}: {exc.description}"
                ) from exc
            logger.warning("↻ provisioning %s: %s; retrying", spec.name, exc.description)
            await asyncio.sleep(min(2.0, 0.25 * attempt))
    if info is None:
        logger.info("created %s %s", spec.kind, spec.name)
        return True
    diffs = differences(spec, info.config)
    if diffs and not migrate:
        raise ProvisioningConflictError(spec.name, diffs)
    if diffs:
        migration = await migrate_stream(js, info, spec.fields, diffs, record=spec.record)
        for change in migration.changed:
            logger.info("migrated %s: %s %r -> %r", spec.name, change.field, change.old, change.new)
        if report is not None:
            report.changed.extend(migration.changed)
            report.refused.extend(migration.refused)
    return False


async def provision(
    js: JetStreamContext,
    subjects: Subjects | None = None,
    settings: StorageSettings | None = None,
    *,
    migrate: bool = False,
) -> ProvisionReport:
    """Make sure every stream, KV bucket and object store of the design exists.

    Idempotent: a second run creates nothing and changes nothing.

    Args:
        migrate: bring existing resources to ``settings`` where the server allows it;
            the report lists what changed and what was refused.

    Raises:
        ProvisioningConflictError: a resource exists with another configuration and
            ``migrate`` is False; the ones before it in the list have been provisioned,
            nothing was modified.
    """
    subjects = subjects or Subjects()
    settings = settings or StorageSettings()
    report = ProvisionReport()
    for spec in desired_streams(subjects, settings):
        created = await ensure_stream(js, spec, migrate=migrate, report=report)
        (report.created if created else report.unchanged).append(spec.name)
    return report


async def provision_fleet(
    bus: Bus, settings: StorageSettings | None = None, *, migrate: bool = False
) -> ProvisionReport:
    """:func:`provision` this bus's fleet (its subject prefix), for callers outside ``bus``."""
    return await provision(bus.js, bus.subjects, settings, migrate=migrate)
