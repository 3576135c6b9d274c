"""The design of the fleet's storage: every stream, KV bucket and object store, as data.

Pure: no I/O. :mod:`bus.streams` provisions what this describes and compares what a
server has with it; ``fleet.protocol_doc`` renders it into docs/protocol.md.

KV buckets and object stores are JetStream streams with reserved names
(``KV_<bucket>``, ``OBJ_<bucket>``). They are declared here as such streams, with the
fields nats-py's ``create_key_value``/``create_object_store`` would use, so one
compare-or-create path covers all three kinds.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from nats.js import api

from bus.codec import DEFAULT_MAX_SIZE
from bus.subjects import Subjects

DAY = 86_400.0


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


def _object_store(bucket: str, settings: StorageSettings) -> StreamSpec:
    fields: dict[str, Any] = {
        "name": f"OBJ_{bucket}",
        "subjects": [f"$O.{bucket}.C.>", f"$O.{bucket}.M.>"],
        "storage": api.StorageType.FILE,
        "num_replicas": settings.replicas,
        "max_consumers": settings.max_consumers,
        "discard": api.DiscardPolicy.NEW,
        "allow_rollup_hdrs": True,
        "allow_direct": True,
    }
    return StreamSpec("object store", fields)


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
        _object_store(subjects.bundles_bucket, s),
        _object_store(subjects.snapshots_bucket, s),
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
