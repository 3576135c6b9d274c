"""Provisioning every stream, KV bucket and object store of the design, idempotently.

Setting up storage is separate from using it: an operator (``fleet ops init``), the demo
and the tests provision; daemons only publish and consume. Running :func:`provision`
twice changes nothing. A resource that exists with another configuration is reported
field by field (:class:`~bus.errors.ProvisioningConflictError`) and left alone: silently
rewriting the retention of someone's audit log is not a provisioning step.

KV buckets and object stores are JetStream streams with reserved names
(``KV_<bucket>``, ``OBJ_<bucket>``). They are declared here as such streams, with the
fields nats-py's ``create_key_value``/``create_object_store`` would use, so one
compare-or-create path covers all three kinds.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext, api

from bus.codec import DEFAULT_MAX_SIZE
from bus.errors import (
    ConnectionFailedError,
    FleetError,
    FleetTimeoutError,
    ProvisioningConflictError,
)
from bus.migrate import FieldChange, migrate_stream
from bus.subjects import Subjects

if TYPE_CHECKING:
    from bus.connection import Bus

logger = logging.getLogger(__name__)

DAY = 86_400.0

PROVISION_DEADLINE_S = 30.0
"""How long provisioning keeps asking an unanswering server (longer than an election)."""

_ERR_NO_SUITABLE_PEERS = 10005  # replicas cannot be placed (yet)
# The server answers this when a stream name is taken by a different configuration.
_ERR_STREAM_NAME_IN_USE = 10058


@dataclass(frozen=True)
class StorageSettings:
    """Sizes and lifetimes of the fleet's storage. Defaults suit one node.

    A limit of 0 means none (the server's store is then the limit).
    """

    replicas: int = 1
    """JetStream replicas for every stream (3 in a cluster)."""
    events_max_age_s: float = 90 * DAY
    """How long the event log keeps events (0: forever). Older ones are removed by age."""
    events_max_bytes: int = 0
    """The event log's size limit (0: none). When reached, new events are refused with an
    error (discard new): the log never drops an event to make room."""
    duplicate_window_s: float = 120.0
    """How long a retried publish with the same ``Nats-Msg-Id`` is recognised (≥ 2 min)."""
    max_msg_size: int = DEFAULT_MAX_SIZE
    """The largest single event or output chunk the streams accept."""
    output_max_age_s: float = 7 * DAY
    """How long job output is kept (0: forever)."""
    output_max_bytes: int = 1024**3
    """The output stream's size limit (0: none); the oldest output goes first (discard old)."""
    max_consumers: int = 20_000
    """Consumers per stream. Explicit, because nats-server 2.15 reads "no limit" (-1) as
    its default of 1,000: one durable consumer per agent plus readers, for 10,000 agents."""
    presence_ttl_s: float = 15.0
    """An agent whose heartbeat is older than this is gone."""
    marker_ttl_s: float = 60.0
    """How long the server's delete markers for expired keys stay visible to watchers."""
    config_history: int = 10
    """Revisions kept per key of the fleet's config bucket."""
    tokens_ttl_s: float = 300.0
    """Backstop lifetime of a download token whose holder stopped renewing it."""


@dataclass(frozen=True)
class StreamSpec:
    """One resource to provision: its kind for messages, and the fields that matter."""

    kind: str  # "stream", "kv" or "object store"
    fields: dict[str, Any]
    record: bool = False
    """The log of record: a limit change that would remove stored messages is refused."""

    @property
    def name(self) -> str:
        name: str = self.fields["name"]
        return name

    def config(self) -> api.StreamConfig:
        return api.StreamConfig(**self.fields)


@dataclass
class ProvisionReport:
    """What :func:`provision` did: the names it created and the ones already right."""

    created: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    changed: list[FieldChange] = field(default_factory=list)
    """Fields migrated (only with ``migrate=True``)."""
    refused: list[FieldChange] = field(default_factory=list)
    """Fields that differ and were left as they are, with the reason."""


def _limit(value: int) -> int:
    """A size limit as the server keeps it: -1 for none."""
    return value if value > 0 else -1


def _kv(bucket: str, settings: StorageSettings, *, history: int = 1, **extra: Any) -> StreamSpec:
    ttl = extra.pop("max_age", None)
    fields: dict[str, Any] = {
        "name": f"KV_{bucket}",
        "subjects": [f"$KV.{bucket}.>"],
        "storage": api.StorageType.FILE,
        "num_replicas": settings.replicas,
        "max_msgs_per_subject": history,
        "max_msg_size": settings.max_msg_size,
        "discard": api.DiscardPolicy.NEW,
        "allow_rollup_hdrs": True,
        "allow_direct": True,
        "deny_delete": True,
        "allow_msg_ttl": True,
        "duplicate_window": min(120.0, ttl) if ttl else 120.0,
        "max_age": ttl or 0.0,
        "max_consumers": settings.max_consumers,
        **extra,
    }
    return StreamSpec("kv", fields)


def desired_streams(subjects: Subjects, settings: StorageSettings) -> list[StreamSpec]:
    """Every stream, bucket and object store of the design, as they should be."""
    s = settings
    return [
        StreamSpec(
            "stream",
            {
                "name": subjects.events_stream,
                "description": "fleetbus event log: the source of truth",
                "subjects": [subjects.all_events],
                "retention": api.RetentionPolicy.LIMITS,
                "storage": api.StorageType.FILE,
                "num_replicas": s.replicas,
                "max_age": s.events_max_age_s,
                "max_bytes": _limit(s.events_max_bytes),
                "max_consumers": s.max_consumers,
                "max_msg_size": s.max_msg_size,
                "duplicate_window": s.duplicate_window_s,
                # Full means refused, with an error to the publisher: never an old event
                # dropped to make room.
                "discard": api.DiscardPolicy.NEW,
                # An audit log nobody can rewrite: no deleting or purging events.
                "deny_delete": True,
                "deny_purge": True,
                # Direct gets put the subject in the API subject, so permissions can limit
                # an agent to reading its own events.
                "allow_direct": True,
            },
            record=True,
        ),
        StreamSpec(
            "stream",
            {
                "name": subjects.output_stream,
                "description": "fleetbus job output chunks",
                "subjects": [subjects.all_output],
                "retention": api.RetentionPolicy.LIMITS,
                "storage": api.StorageType.FILE,
                "num_replicas": s.replicas,
                "max_age": s.output_max_age_s,
                "max_bytes": _limit(s.output_max_bytes),
                "max_consumers": s.max_consumers,
                "max_msg_size": s.max_msg_size,
                "duplicate_window": s.duplicate_window_s,
                "discard": api.DiscardPolicy.OLD,
            },
        ),
        _kv(
            subjects.presence_bucket,
            s,
            max_age=s.presence_ttl_s,
            subject_delete_marker_ttl=s.marker_ttl_s,
        ),
        _kv(subjects.config_bucket, s, history=s.config_history),
        _kv(
            subjects.tokens_bucket,
            s,
            max_age=s.tokens_ttl_s,
            subject_delete_marker_ttl=s.marker_ttl_s,
        ),
        _kv(
            subjects.locks_bucket,
            s,
            max_age=s.tokens_ttl_s,
            subject_delete_marker_ttl=s.marker_ttl_s,
        ),
        StreamSpec(
            "object store",
            {
                "name": f"OBJ_{subjects.bundles_bucket}",
                "subjects": [
                    f"$O.{subjects.bundles_bucket}.C.>",
                    f"$O.{subjects.bundles_bucket}.M.>",
                ],
                "storage": api.StorageType.FILE,
                "num_replicas": s.replicas,
                "max_consumers": s.max_consumers,
                "discard": api.DiscardPolicy.NEW,
                "allow_rollup_hdrs": True,
                "allow_direct": True,
            },
        ),
        StreamSpec(
            "object store",
            {
                "name": f"OBJ_{subjects.snapshots_bucket}",
                "subjects": [
                    f"$O.{subjects.snapshots_bucket}.C.>",
                    f"$O.{subjects.snapshots_bucket}.M.>",
                ],
                "storage": api.StorageType.FILE,
                "num_replicas": s.replicas,
                "max_consumers": s.max_consumers,
                "discard": api.DiscardPolicy.NEW,
                "allow_rollup_hdrs": True,
                "allow_direct": True,
            },
        ),
    ]


def _comparable(name: str, value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if name in ("max_age", "duplicate_window", "subject_delete_marker_ttl"):
        return round((value or 0) * 1e9)  # the server keeps nanoseconds
    if name == "subjects":
        return sorted(value or [])
    if name == "description":
        return value or None
    if name in ("max_bytes", "max_msgs", "max_consumers"):
        return value if value and value > 0 else -1  # the server reads 0 and None as -1
    return value


def differences(spec: StreamSpec, existing: api.StreamConfig) -> list[tuple[str, Any, Any]]:
    """``(field, existing, wanted)`` for every field of ``spec`` the server has otherwise."""
    diffs = []
    for name, wanted in spec.fields.items():
        have = _comparable(name, getattr(existing, name, None))
        want = _comparable(name, wanted)
        if name == "description":
            continue  # cosmetic: an operator may annotate streams
        if have != want and not (want is False and have is None):
            diffs.append((name, have, want))
    return diffs


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
