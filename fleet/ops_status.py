"""``fleet ops status``: how full each stream is against each of its limits.

A limit is shown as a fraction used; at ``--warn-at`` (80 % by default) a warning says
what happens at 100 %: the event log (and any store that discards new) refuses new
messages (publishers get an error, nothing is dropped), events older than the max age
are removed by age (export them first), and agents beyond the consumer limit cannot
create their consumer. The output stream and the TTL buckets lose their oldest entries
by design, so they are shown but not warned about.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from typing import Any

from bus import connect
from bus.command import connect_settings
from bus.connection import Bus
from bus.storage_design import StorageSettings, desired_streams
from bus.streaminfo import StreamUsage, stream_usage
from fleet.quantities import human_bytes, human_seconds

SERVER_DEFAULT_MAX_CONSUMERS = 1000
"""What nats-server 2.15 applies to a stream whose consumer limit is -1 (none set)."""


@dataclass
class Gauge:
    """One limit of one stream: used of limit (limit 0: none)."""

    what: str
    used: float
    limit: float

    @property
    def fraction(self) -> float | None:
        return self.used / self.limit if self.limit > 0 else None


@dataclass
class StreamStatus:
    """A stream's usage, gauges and warnings."""

    usage: StreamUsage
    record: bool
    gauges: list[Gauge] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        u = self.usage
        return {
            "stream": u.name,
            "messages": u.messages,
            "bytes": u.bytes,
            "first_seq": u.first_seq,
            "last_seq": u.last_seq,
            "oldest_age_s": u.oldest_age_s,
            "consumers": u.consumers,
            "discard": "new" if u.discard_new else "old",
            "limits": {
                g.what: {"used": g.used, "limit": g.limit or None, "fraction": g.fraction}
                for g in self.gauges
            },
            "replicas": u.replicas,
            "current_replicas": u.current_replicas,
            "quorum": not u.quorum_lost,
            "warnings": self.warnings,
        }


def assess(usage: StreamUsage, *, record: bool, warn_at: float) -> StreamStatus:
    """Gauges and warnings for one stream (pure)."""
    status = StreamStatus(usage, record)
    consumers_limit = usage.max_consumers or SERVER_DEFAULT_MAX_CONSUMERS
    status.gauges = [
        Gauge("messages", usage.messages, usage.max_messages),
        Gauge("bytes", usage.bytes, usage.max_bytes),
        Gauge("age_s", usage.oldest_age_s or 0.0, usage.max_age_s),
        Gauge("consumers", usage.consumers, consumers_limit),
    ]
    full = (
        "new events are refused (publishers get an error; nothing is dropped)"
        if usage.discard_new
        else "the oldest messages are removed"
    )
    for gauge in status.gauges:
        fraction = gauge.fraction
        if fraction is None or fraction < warn_at:
            continue
        # Output and buckets that lose their oldest entries by design are not warned
        # about: a warning always on is a warning nobody reads.
        if gauge.what != "consumers" and not record and not usage.discard_new:
            continue
        if gauge.what == "age_s" and not record:
            continue
        pct = f"{fraction:.0%}"
        if gauge.what == "bytes":
            text = f"bytes at {pct} of {human_bytes(int(gauge.limit))}: when full, {full}"
        elif gauge.what == "messages":
            text = f"messages at {pct} of {int(gauge.limit)}: when full, {full}"
        elif gauge.what == "age_s":
            text = (
                f"oldest message is {human_seconds(gauge.used)} old, max age "
                f"{human_seconds(gauge.limit)}: older ones are removed by age"
                + (" (export them first: fleet ops export)" if record else "")
            )
        else:
            text = (
                f"consumers at {pct} of {int(gauge.limit)}: beyond it new agents cannot "
                "create their consumer"
            )
        status.warnings.append(f"{usage.name}: {text}")
    if usage.quorum_lost:
        status.warnings.append(
            f"{usage.name}: quorum lost ({usage.current_replicas} of {usage.replicas} "
            "replicas current): nothing can be stored until enough nodes return"
        )
    if not usage.max_consumers:
        status.warnings.append(
            f"{usage.name}: no explicit consumer limit, so nats-server applies its default "
            f"({SERVER_DEFAULT_MAX_CONSUMERS}); run `fleet ops init --migrate`"
        )
    return status


async def collect(bus: Bus, warn_at: float) -> list[StreamStatus]:
    """The status of every stream of the design."""
    out = []
    for spec in desired_streams(bus.subjects, StorageSettings()):
        usage = await stream_usage(bus, spec.name, with_age=spec.kind == "stream")
        out.append(assess(usage, record=spec.record, warn_at=warn_at))
    return out


def _limit_text(gauge: Gauge) -> str:
    if gauge.what == "bytes":
        used = human_bytes(int(gauge.used))
        limit = human_bytes(int(gauge.limit)) if gauge.limit else "-"
    elif gauge.what == "age_s":
        used = human_seconds(gauge.used)
        limit = human_seconds(gauge.limit) if gauge.limit else "-"
    else:
        used, limit = f"{int(gauge.used)}", f"{int(gauge.limit)}" if gauge.limit else "-"
    fraction = gauge.fraction
    return f"{used}/{limit}" + (f" ({fraction:.0%})" if fraction is not None else "")


async def status_command(args: argparse.Namespace) -> int:
    """Print every stream's usage against its limits; warnings also on stderr."""
    async with await connect(connect_settings(args, "fleet-ops")) as bus:
        statuses = await collect(bus, args.warn_at)
    warnings = [w for s in statuses for w in s.warnings]
    if args.json:
        print(json.dumps({"streams": [s.as_dict() for s in statuses], "warnings": warnings}))
    else:
        print(f"{'stream':24} {'messages':>18} {'bytes':>26} {'age':>22} {'consumers':>18}")
        for s in statuses:
            g = {x.what: _limit_text(x) for x in s.gauges}
            print(
                f"{s.usage.name:24} {g['messages']:>18} {g['bytes']:>26} "
                f"{g['age_s']:>22} {g['consumers']:>18}"
            )
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0
