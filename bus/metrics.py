"""Prometheus text exposition (format 0.0.4), written by hand: no client library.

A daemon's metrics are mostly facts it already holds (the fold's records, the agent's
running jobs), so they are read when scraped: a :class:`Registry` holds collectors,
each an async function returning :class:`Family` objects, and :meth:`Registry.render`
asks them all. The few things that only happen (a publish retried, a job finished) are
kept in :class:`Counter` and :class:`Histogram` objects the daemon updates as they do.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Kind = Literal["counter", "gauge", "histogram"]
Labels = tuple[tuple[str, str], ...]

DURATION_BUCKETS = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
"""Seconds: fleet jobs run from a fraction of a second (a probe) to an hour (a backup)."""


def labels(**values: str) -> Labels:
    """Label pairs in a fixed order (by name), as the registry keys them."""
    return tuple(sorted(values.items()))


@dataclass
class Family:
    """One metric family: its samples, each a label set and a value."""

    name: str
    kind: Kind
    help: str
    samples: list[tuple[str, Labels, float]] = field(default_factory=list)
    """(sample name suffix, labels, value): the suffix is ``""`` or ``_bucket`` …"""

    def add(self, value: float, **label_values: str) -> Family:
        """One sample of this family (returns self, for chaining)."""
        self.samples.append(("", labels(**label_values), float(value)))
        return self

    def render(self) -> str:
        lines = [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]
        for suffix, pairs, value in self.samples:
            lines.append(f"{self.name}{suffix}{_render_labels(pairs)} {_render_value(value)}")
        return "\n".join(lines) + "\n"


class Counter:
    """A monotonically increasing count per label set, updated as things happen."""

    def __init__(self, name: str, help: str) -> None:
        self.name, self.help = name, help
        self.values: dict[Labels, float] = {}

    def inc(self, amount: float = 1.0, **label_values: str) -> None:
        key = labels(**label_values)
        self.values[key] = self.values.get(key, 0.0) + amount

    def value(self, **label_values: str) -> float:
        return self.values.get(labels(**label_values), 0.0)

    def family(self) -> Family:
        out = Family(self.name, "counter", self.help)
        out.samples = [("", key, value) for key, value in sorted(self.values.items())]
        return out


class Histogram:
    """Observations counted into cumulative buckets, per label set."""

    def __init__(self, name: str, help: str, buckets: Sequence[float] = DURATION_BUCKETS) -> None:
        self.name, self.help = name, help
        self.bounds = tuple(sorted(buckets))
        self._series: dict[Labels, tuple[list[int], list[float]]] = {}

    def observe(self, value: float, **label_values: str) -> None:
        key = labels(**label_values)
        counts, total = self._series.setdefault(key, ([0] * (len(self.bounds) + 1), [0.0]))
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                counts[i] += 1
        counts[-1] += 1  # +Inf
        total[0] += value

    def count(self, **label_values: str) -> int:
        series = self._series.get(labels(**label_values))
        return series[0][-1] if series else 0

    def family(self) -> Family:
        out = Family(self.name, "histogram", self.help)
        for key, (counts, total) in sorted(self._series.items()):
            for bound, count in zip((*self.bounds, math.inf), counts, strict=True):
                le = "+Inf" if bound == math.inf else _render_value(bound)
                out.samples.append(("_bucket", tuple(sorted((*key, ("le", le)))), count))
            out.samples.append(("_sum", key, total[0]))
            out.samples.append(("_count", key, counts[-1]))
        return out


Collector = Callable[[], Awaitable[Iterable[Family]]]


class Registry:
    """The collectors of one daemon; :meth:`render` is a scrape."""

    def __init__(self) -> None:
        self._collectors: list[tuple[str, Collector]] = []

    def add(self, name: str, collector: Collector) -> None:
        self._collectors.append((name, collector))

    async def collect(self) -> list[Family]:
        """Every family; a collector that fails is logged and left out, never fatal (the
        ``fleet_scrape_collector_success`` family says which)."""
        families: list[Family] = []
        success = Family(
            "fleet_scrape_collector_success", "gauge", "1 if the collector answered this scrape"
        )
        for name, collector in self._collectors:
            try:
                families.extend(await collector())
            except Exception as exc:  # a scrape never takes the daemon down
                logger.warning("metrics collector %s failed: %s", name, exc)
                success.add(0, collector=name)
            else:
                success.add(1, collector=name)
        return [*families, success]

    async def render(self) -> bytes:
        return "".join(f.render() for f in await self.collect()).encode()


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _render_labels(pairs: Labels) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape_label(v)}"' for k, v in pairs) + "}"


def _render_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def parse(text: str) -> dict[str, dict[Labels, float]]:
    """Samples of an exposition by sample name, then label set (for tests and tools)."""
    out: dict[str, dict[Labels, float]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, rest = head.partition("{")
        pairs: list[tuple[str, str]] = []
        rest = rest.rstrip("}")
        while rest:
            key, _, rest = rest.partition('="')
            chars: list[str] = []
            i = 0
            while rest[i] != '"':
                if rest[i] == "\\":
                    i += 1
                    chars.append({"n": "\n"}.get(rest[i], rest[i]))
                else:
                    chars.append(rest[i])
                i += 1
            pairs.append((key, "".join(chars)))
            rest = rest[i + 1 :].lstrip(",")
        out.setdefault(name, {})[tuple(sorted(pairs))] = float(value)
    return out


def sample(parsed: Mapping[str, Mapping[Labels, float]], name: str, **label_values: str) -> float:
    """One value from :func:`parse`'s result; KeyError when it is not there."""
    return parsed[name][labels(**label_values)]
