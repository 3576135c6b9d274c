"""The one record driver: every reader of the log folds it through here.

For each stored record, in log order: extend the hash chain (it covers what was
stored, decodable or not), decode the envelope and its data, run the checks, and
apply the event to the projection. The master, ``fleet replay``, ``fleet audit``,
``fleet jobs``/``job show`` and job followers all use :class:`RecordDriver`, so they
count the same events the same way:

- an undecodable record is counted (``projection.unknown["undecodable"]``) and
  reported as a problem, never dropped and never fatal;
- an event of a type or version this code does not know is kept, counted under its
  type in ``projection.unknown`` and reported in the entry, never dropped;
- a check (signature, trust, checkpoint, an authorisation policy: any
  ``check(entry) -> Problem | None``) that finds a problem reports it; with
  ``refuse=True`` the event is then counted as refused instead of applied.

The driver takes records the bus has read (:class:`bus.log.LogRecord`); it does no
I/O and never touches NATS.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from bus import BadMessageError, decode_envelope
from bus.codec import decode_data
from bus.log import LogRecord
from ledger.chain import Chain
from ledger.projection import Projection
from schemas import Envelope, Event, EventData, UnknownEvent

logger = logging.getLogger(__name__)

UNDECODABLE = "undecodable"
"""The problem kind of a record that is not an event this code can read."""


@dataclass(frozen=True, slots=True)
class Problem:
    """Something wrong with one record (or, with ``seq`` 0, with the log as a whole)."""

    seq: int
    kind: str
    """Short and countable: ``undecodable``, ``forged``, ``chain``, ``truncated``, …"""
    text: str

    def __str__(self) -> str:
        return f"seq {self.seq}: {self.text}" if self.seq else self.text


@dataclass(slots=True)
class Entry:
    """One record as the driver saw it."""

    record: LogRecord
    envelope: Envelope | None = None
    """None when the bytes are not an envelope at all."""
    event: Event[EventData] | UnknownEvent | None = None
    """None when undecodable; an :class:`UnknownEvent` for types or versions not known."""
    problems: list[Problem] = field(default_factory=list)
    checked: bool = False
    applied: bool = False

    @property
    def seq(self) -> int:
        return self.record.seq

    @property
    def unknown(self) -> bool:
        """A readable event of a type or version this code does not know."""
        return isinstance(self.event, UnknownEvent)

    @property
    def verified(self) -> bool | None:
        """Whether the checks passed; None when they did not run (or nothing to check)."""
        if not self.checked:
            return None
        return not any(p.kind != UNDECODABLE for p in self.problems)


Check = Callable[[Entry], "Problem | None"]
"""Looks at one decoded record (``entry.envelope`` is set) and says what is wrong, if
anything. Checks run in order after the chain has been extended by the record."""


def decode_record(record: LogRecord) -> Entry:
    """Decode one record without checking or applying it."""
    entry = Entry(record)
    try:
        entry.envelope = decode_envelope(record.data)
        entry.event = decode_data(entry.envelope)
    except BadMessageError as exc:
        entry.problems.append(Problem(record.seq, UNDECODABLE, f"cannot be decoded: {exc}"))
    return entry


class RecordDriver:
    """Decode → check → apply, for every record of a log read in order.

    Args:
        projection: the fold to continue (a snapshot's), or a new one.
        chain: the hash chain to extend, or None for a reader of a filtered slice of the
            log (a chain only means something over the whole log).
        checks: run on every decodable record while ``checking`` is true.
        refuse: do not apply an event a check found a problem with (it is counted as
            ``refused (<kind>)`` instead); otherwise it is applied and only reported.
        on_problem: called with every problem found, as it is found.
    """

    def __init__(
        self,
        projection: Projection | None = None,
        chain: Chain | None = None,
        *,
        checks: Sequence[Check] = (),
        refuse: bool = False,
        on_problem: Callable[[Problem], None] | None = None,
    ) -> None:
        self.projection = projection if projection is not None else Projection()
        self.chain = chain
        self.checks: list[Check] = list(checks)
        self.checking = True
        """Whether to run the checks (the master checks live events only)."""
        self.refuse = refuse
        self.on_problem = on_problem
        self.counts: dict[str, int] = {}
        """Problems found so far, by kind."""

    def add_check(self, check: Check) -> None:
        """Run ``check`` too, after those already there."""
        self.checks.append(check)

    def report(self, problem: Problem) -> None:
        """Count a problem and pass it on (checks of the log as a whole use this too)."""
        self.counts[problem.kind] = self.counts.get(problem.kind, 0) + 1
        if self.on_problem is not None:
            self.on_problem(problem)

    @property
    def undecodable(self) -> int:
        """Records that could not be decoded so far."""
        return self.counts.get(UNDECODABLE, 0)

    def feed(self, record: LogRecord) -> Entry:
        """Chain, decode, check and apply one record (the next in log order)."""
        if self.chain is not None:
            self.chain.add(record.data)
        entry = decode_record(record)
        if entry.envelope is not None and self.checking and self.checks:
            entry.checked = True
            for check in self.checks:
                problem = check(entry)
                if problem is not None:
                    entry.problems.append(problem)
        for problem in entry.problems:
            self.report(problem)
        if entry.event is None:
            self.projection.apply_undecodable(record.seq)
        elif self.refuse and entry.verified is False:
            self.projection.note(record.seq, f"refused ({entry.problems[0].kind})")
        else:
            self.projection.apply(record.seq, entry.event)
            entry.applied = True
        return entry

    def feed_all(
        self,
        records: Iterable[LogRecord],
        *,
        until_seq: int | None = None,
        until_ts: int | None = None,
    ) -> RecordDriver:
        """Feed records in order, stopping before the first past ``until_seq`` or, among
        those with a readable envelope, past ``until_ts`` (ns since the epoch)."""
        for record in records:
            if until_seq is not None and record.seq > until_seq:
                break
            if until_ts is not None:
                try:
                    if decode_envelope(record.data).ts > until_ts:
                        break
                except BadMessageError:
                    pass
            self.feed(record)
        return self


def fold_records(
    records: Iterable[LogRecord],
    until_seq: int | None = None,
    until_ts: int | None = None,
) -> tuple[Projection, Chain]:
    """The projection and chain of the log's first records (all, or up to a bound)."""
    driver = RecordDriver(chain=Chain()).feed_all(records, until_seq=until_seq, until_ts=until_ts)
    assert driver.chain is not None
    return driver.projection, driver.chain


def fold(records: Iterable[LogRecord], projection: Projection | None = None) -> Projection:
    """Fold records of a slice of the log (no chain); undecodable ones are counted and
    logged, never fatal."""

    def log(problem: Problem) -> None:
        logger.warning("event at %s", problem)

    return RecordDriver(projection, on_problem=log).feed_all(records).projection
