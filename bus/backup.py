"""Exporting streams to a backup file and restoring them, message for message.

Export reads each stream up to its last sequence at the start (a consistent point) and
writes every message as stored (:mod:`bus.backup_file`). Import checks the whole file
first, then republishes each message with its subject, bytes and headers into the same
stream of the target. An empty target stream is (re)created to start at the file's first
sequence, so every restored event keeps its sequence as well as its bytes: the hash
chain, signatures, ``fleet audit --verify`` and ``fleet replay`` see the same log.

A non-empty target is refused unless forced; forced, the event log gets only the events
whose id it does not hold yet, appended (their sequences are kept only when they follow
on), and any other non-empty stream is left alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import nats.errors
import nats.js.errors
from nats.js import api

from bus.backup_file import BackupHeader, BackupRecord, BackupWriter
from bus.codec import HEADER_MSG_ID
from bus.connection import Bus
from bus.errors import ConnectionFailedError, FleetError, UsageError
from bus.log import Tail
from bus.publish import publish_with_retry

logger = logging.getLogger(__name__)

_PRECONDITION = "Nats-Expected-"
"""Headers that were conditions of the original write, not part of the message."""


def _stream_error(stream: str, exc: Exception) -> FleetError:
    if isinstance(exc, nats.js.errors.NotFoundError):
        return UsageError(f"stream {stream} does not exist; run `fleet ops init` first")
    return ConnectionFailedError(f"cannot read stream {stream}: {exc!r}")


async def _info(bus: Bus, stream: str) -> api.StreamInfo:
    try:
        return await bus.js.stream_info(stream)
    except (nats.errors.Error, OSError) as exc:
        refusal = bus.denial(bus.api_subject(f"STREAM.INFO.{stream}"))
        if refusal is not None:
            raise refusal from exc
        raise _stream_error(stream, exc) from exc


async def seq_at_time(bus: Bus, stream: str, since_ns: int) -> int:
    """The first sequence of ``stream`` stored at or after ``since_ns`` (past the end if
    none), by bisection over the stored timestamps."""
    state = (await _info(bus, stream)).state
    low, high = state.first_seq, state.last_seq + 1
    while low < high:
        mid = (low + high) // 2
        try:
            msg = await bus.js.get_msg(stream, mid)
        except nats.js.errors.NotFoundError:
            high = mid
            continue
        stamp = msg.time
        if stamp is not None and stamp.timestamp() * 1e9 < since_ns:
            low = int(msg.seq or mid) + 1
        else:
            high = mid
    return low


@dataclass
class ExportPlan:
    """Which streams, and from which sequence each (0: its first)."""

    start: dict[str, int]


async def export_streams(bus: Bus, plan: ExportPlan, writer: BackupWriter) -> dict[str, int]:
    """Write every message of the planned streams up to their last sequence now.

    Returns:
        The number of records written per stream.
    """
    ends: dict[str, int] = {}
    firsts: dict[str, int] = {}
    for stream, start in plan.start.items():
        state = (await _info(bus, stream)).state
        firsts[stream] = max(start, state.first_seq or 1)
        ends[stream] = state.last_seq
    writer.header(BackupHeader(prefix=bus.subjects.prefix, first_seqs=firsts))
    for stream in plan.start:
        if ends[stream] >= firsts[stream]:
            await _export_one(bus, stream, firsts[stream], ends[stream], writer)
    return writer.counts


async def _export_one(bus: Bus, stream: str, first: int, last: int, writer: BackupWriter) -> None:
    subjects = (await _info(bus, stream)).config.subjects or []
    if len(subjects) != 1:
        # Object stores have two subjects and few, large messages: read them one by one.
        for seq in range(first, last + 1):
            try:
                msg = await bus.js.get_msg(stream, seq)
            except nats.js.errors.NotFoundError:
                continue  # a chunk of an object since replaced
            except (nats.errors.Error, OSError) as exc:
                raise _stream_error(stream, exc) from exc
            writer.record(
                BackupRecord(
                    stream, seq, msg.subject or "", dict(msg.headers or {}), msg.data or b""
                )
            )
        return
    async with await Tail.open(bus, stream, subjects[0], start_seq=first) as tail:
        while tail.last_seq < last:
            batch = await tail.fetch(timeout=5.0)
            if not batch and await tail.caught_up():
                break
            for r in batch:
                if r.seq <= last:
                    writer.record(BackupRecord(stream, r.seq, r.subject, r.headers, r.data))


@dataclass
class RestoreReport:
    """What :func:`restore` did, per stream."""

    restored: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    """Records not restored: already held (forced into the event log), or their stream
    was not empty (forced, other streams)."""
    sequences_kept: dict[str, bool] = field(default_factory=dict)


class _Target:
    """One stream being restored into."""

    def __init__(self, stream: str, *, append: bool, skip: bool, known: set[str]) -> None:
        self.stream = stream
        self.append = append
        self.skip = skip
        self.known = known


async def _prepare(bus: Bus, stream: str, first_seq: int, *, force: bool, is_log: bool) -> _Target:
    info = await _info(bus, stream)
    if info.state.messages == 0:
        if first_seq > 1 and info.state.last_seq + 1 != first_seq:
            # Empty: recreate it to start at the file's first sequence (nothing is lost).
            config = replace(info.config, first_seq=first_seq)
            try:
                await bus.js.delete_stream(stream)
                await bus.js.add_stream(config)
            except nats.js.errors.APIError as exc:
                raise FleetError(f"cannot recreate empty {stream}: {exc.description}") from exc
        return _Target(stream, append=False, skip=False, known=set())
    if not force:
        raise UsageError(
            f"{stream} is not empty ({info.state.messages} messages): a restore goes into "
            "an empty deployment; --force adds the events it does not hold yet"
        )
    if not is_log:
        logger.warning("%s is not empty: left as it is", stream)
        return _Target(stream, append=True, skip=True, known=set())
    known: set[str] = set()
    async with await Tail.open(bus, stream, (info.config.subjects or [">"])[0]) as tail:
        for record in await tail.read_available():
            if HEADER_MSG_ID in record.headers:
                known.add(record.headers[HEADER_MSG_ID])
    return _Target(stream, append=True, skip=False, known=known)


def restorable(bus: Bus) -> set[str]:
    """The streams an export may hold, and so the only ones an import writes to."""
    s = bus.subjects
    return {s.events_stream, s.output_stream, f"KV_{s.config_bucket}", f"OBJ_{s.bundles_bucket}"}


def subject_matches(subject: str, pattern: str) -> bool:
    """NATS wildcard matching: ``*`` one token, ``>`` one or more at the end."""
    tokens, wanted = subject.split("."), pattern.split(".")
    for i, want in enumerate(wanted):
        if want == ">":
            return len(tokens) > i
        if i >= len(tokens) or (want != "*" and want != tokens[i]):
            return False
    return len(tokens) == len(wanted)


async def check_records(bus: Bus, header: BackupHeader, records: Iterable[BackupRecord]) -> None:
    """Refuse a file that would write outside the streams an export holds, or put a
    subject into a stream that does not take it, before anything is written.

    Raises:
        UsageError: the first such record or stream.
    """
    allowed = restorable(bus)
    subjects: dict[str, list[str]] = {}
    for stream in header.first_seqs:
        if stream not in allowed:
            raise UsageError(f"the file names stream {stream}, which an export never holds")
        subjects[stream] = list((await _info(bus, stream)).config.subjects or [])
    for record in records:
        if not any(subject_matches(record.subject, p) for p in subjects[record.stream]):
            raise UsageError(
                f"record {record.stream} seq {record.seq}: subject {record.subject} is not "
                f"one of {record.stream}'s"
            )


async def restore(
    bus: Bus,
    header: BackupHeader,
    records: Callable[[], Iterable[BackupRecord]],
    *,
    force: bool = False,
    progress: Callable[[str, int], None] | None = None,
) -> RestoreReport:
    """Republish the records (of a verified file; ``records()`` reads them from the
    start) into their streams, after checking them all (:func:`check_records`).

    Raises:
        UsageError: a record or stream an export never holds; a target stream missing,
            or not empty and ``force`` is False.
    """
    await check_records(bus, header, records())
    report = RestoreReport()
    log_stream = bus.subjects.events_stream
    targets: dict[str, _Target] = {}
    for stream, first in header.first_seqs.items():
        targets[stream] = await _prepare(
            bus, stream, first, force=force, is_log=stream == log_stream
        )
        report.restored[stream] = report.skipped[stream] = 0
        report.sequences_kept[stream] = True
    for record in records():
        target = targets[record.stream]
        msg_id = record.headers.get(HEADER_MSG_ID)
        if target.skip or (msg_id is not None and msg_id in target.known):
            report.skipped[record.stream] += 1
            continue
        headers = {k: v for k, v in record.headers.items() if not k.startswith(_PRECONDITION)}
        result = await publish_with_retry(
            bus.js,
            record.subject,
            record.data,
            msg_id=msg_id or f"restore-{record.stream}-{record.seq}",
            headers=headers,
            stream=record.stream,
            denied=bus.denial,
        )
        if result.seq != record.seq:
            report.sequences_kept[record.stream] = False
        report.restored[record.stream] += 1
        if progress is not None:
            progress(record.stream, report.restored[record.stream])
    return report
