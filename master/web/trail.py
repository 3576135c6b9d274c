"""What the status page reads from the log itself: a job's signed trail and output, and
pages of the audit view (every event, newest first).

Each event is checked as ``fleet audit --verify`` checks it: signed, for the subject it
is stored on, by a key the master's registry trusts for the principal it names. The
page shows the verdict beside the event; it never hides an event that fails.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bus import Bus
from bus.codec import HEADER_OUTPUT_STREAM
from bus.log import LogRecord, Tail, last_seq, read_log
from ledger.driver import Check, Entry, decode_record
from ledger.verify import signature_check
from ledger.views import iso

OUTPUT_LIMIT = 256 * 1024
"""Bytes of a job's output the page shows (the end of it)."""


def verdict(entry: Entry, check: Check) -> dict[str, Any]:
    """An event as the page shows it, with ``verified`` (true/false) and ``problem``."""
    envelope = entry.envelope
    if envelope is None:
        problem = entry.problems[0].text if entry.problems else "undecodable"
        return {
            "seq": entry.seq,
            "subject": entry.record.subject,
            "type": None,
            "verified": False,
            "problem": problem,
        }
    found = check(entry)
    event = entry.event
    data: Any = None
    if event is not None and hasattr(event, "data"):
        data = event.data.model_dump(mode="json")
    return {
        "seq": entry.seq,
        "subject": entry.record.subject,
        "type": envelope.type,
        "source": envelope.source,
        "time": iso(envelope.ts),
        "id": str(envelope.id),
        "verified": found is None,
        "problem": None if found is None else f"{found.kind}: {found.text}",
        "data": data,
    }


async def job_trail(bus: Bus, agent: str, job_id: str, trusted: Mapping[str, str]) -> list[Any]:
    """Every event of one job, in log order, each with its verification."""
    subjects = bus.subjects
    records = await read_log(bus, subjects.events_stream, subjects.job_events(agent, job_id))
    check = signature_check(trusted)
    return [verdict(decode_record(r), check) for r in records]


async def job_output(bus: Bus, agent: str, job_id: str) -> dict[str, Any]:
    """The job's stored output (its last :data:`OUTPUT_LIMIT` bytes) as text chunks."""
    subjects = bus.subjects
    records = await read_log(bus, subjects.output_stream, subjects.output(agent, job_id))
    chunks: list[dict[str, str]] = []
    size = 0
    for record in reversed(records):
        if size >= OUTPUT_LIMIT:
            break
        size += len(record.data)
        stream = record.headers.get(HEADER_OUTPUT_STREAM, "stdout")
        chunks.append({"stream": stream, "text": record.data.decode("utf-8", "replace")})
    chunks.reverse()
    return {"chunks": chunks, "cut": size >= OUTPUT_LIMIT and len(chunks) < len(records)}


async def audit_page(
    bus: Bus, before: int, limit: int, trusted: Mapping[str, str], type_prefix: str = ""
) -> dict[str, Any]:
    """Up to ``limit`` events stored before sequence ``before`` (0: the newest), newest
    first, each with its verification; ``type_prefix`` keeps only types starting so."""
    subjects = bus.subjects
    if before <= 0:
        before = await last_seq(bus, subjects.events_stream) + 1
    check = signature_check(trusted)
    items: list[Any] = []
    end = before
    # Read backwards a window at a time until the page is full or the log begins.
    while len(items) < limit and end > 1:
        start = max(1, end - max(limit, 64))
        window = await _read_range(bus, start, end)
        for record in reversed(window):
            row = verdict(decode_record(record), check)
            if not type_prefix or (row["type"] or "").startswith(type_prefix):
                items.append(row)
                if len(items) >= limit:
                    break
        end = start
    oldest = items[-1]["seq"] if items else 0
    return {"items": items, "next_before": oldest if oldest > 1 else 0}


async def _read_range(bus: Bus, start: int, end: int) -> list[LogRecord]:
    """Events with ``start <= seq < end``."""
    subjects = bus.subjects
    out: list[LogRecord] = []
    async with await Tail.open(
        bus, subjects.events_stream, subjects.all_events, start_seq=start
    ) as tail:
        while True:
            batch = await tail.fetch(batch=min(1024, end - start), timeout=1.0)
            if not batch:
                break
            out.extend(r for r in batch if r.seq < end)
            if batch[-1].seq >= end - 1 or await tail.caught_up():
                break
    return out
