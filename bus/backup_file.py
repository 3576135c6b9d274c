"""The backup file of ``fleet ops export``: JSON Lines with a header, records and a trailer.

::

    {"format": "fleetbus-export", "version": 1, "created": "...", "prefix": "fleet",
     "streams": {"FLEET_EVENTS": {"first_seq": 1}, ...}}
    {"stream": "FLEET_EVENTS", "seq": 1, "subject": "fleet.evt...", "headers": {...},
     "data": "<base64 of the stored bytes>"}
    ...
    {"end": true, "counts": {"FLEET_EVENTS": 1234, ...}, "sha256": "<hex>"}

``sha256`` is the digest of every byte of the file before the trailer line, so a
truncated, reordered or edited file is refused before anything is restored. Each record
holds a message exactly as stored (its bytes, subject and headers), so restored events
keep their signatures and the log's hash chain. The file is independent of the server:
it can be read, counted and checked with nothing but Python.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from bus.errors import BadMessageError

FORMAT = "fleetbus-export"
VERSION = 1


@dataclass(frozen=True, slots=True)
class BackupRecord:
    """One stored message of one stream."""

    stream: str
    seq: int
    subject: str
    headers: dict[str, str]
    data: bytes


@dataclass
class BackupHeader:
    """What the file says about itself before its records."""

    prefix: str
    first_seqs: dict[str, int]
    """Each stream's first exported sequence (the ``--since`` point, or its first)."""
    created: str = ""


@dataclass
class BackupWriter:
    """Writes a backup file, digesting as it goes."""

    out: IO[bytes]
    counts: dict[str, int] = field(default_factory=dict)
    _digest: Any = field(default_factory=hashlib.sha256)

    def _line(self, value: dict[str, Any]) -> None:
        raw = json.dumps(value, separators=(",", ":"), sort_keys=True).encode() + b"\n"
        self._digest.update(raw)
        self.out.write(raw)

    def header(self, header: BackupHeader) -> None:
        """Write the header (first)."""
        created = header.created or datetime.datetime.now(datetime.UTC).isoformat()
        streams = {s: {"first_seq": q} for s, q in header.first_seqs.items()}
        self._line(
            {
                "format": FORMAT,
                "version": VERSION,
                "created": created,
                "prefix": header.prefix,
                "streams": streams,
            }
        )
        self.counts = dict.fromkeys(header.first_seqs, 0)

    def record(self, record: BackupRecord) -> None:
        """Write one stored message."""
        self._line(
            {
                "stream": record.stream,
                "seq": record.seq,
                "subject": record.subject,
                "headers": record.headers,
                "data": base64.b64encode(record.data).decode("ascii"),
            }
        )
        self.counts[record.stream] = self.counts.get(record.stream, 0) + 1

    def trailer(self) -> str:
        """Write the trailer (last); returns the digest."""
        digest: str = self._digest.hexdigest()
        raw = json.dumps({"end": True, "counts": self.counts, "sha256": digest}).encode()
        self.out.write(raw + b"\n")
        return digest


def _bad(path: Path, line: int, why: str) -> BadMessageError:
    return BadMessageError(f"{path}:{line}: not a valid fleetbus export: {why}")


def _parse(path: Path, number: int, raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise _bad(path, number, f"not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise _bad(path, number, "not a JSON object")
    return value


def _header(path: Path, value: dict[str, Any]) -> BackupHeader:
    if value.get("format") != FORMAT:
        raise _bad(path, 1, f"format is {value.get('format')!r}, not {FORMAT!r}")
    if value.get("version") != VERSION:
        raise _bad(path, 1, f"version {value.get('version')!r} is not {VERSION}")
    streams = value.get("streams")
    if not isinstance(streams, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("first_seq"), int) for v in streams.values()
    ):
        raise _bad(path, 1, "no valid streams")
    return BackupHeader(
        prefix=str(value.get("prefix", "")),
        first_seqs={str(s): int(v["first_seq"]) for s, v in streams.items()},
        created=str(value.get("created", "")),
    )


def _record(
    path: Path, number: int, value: dict[str, Any], streams: dict[str, int]
) -> BackupRecord:
    try:
        record = BackupRecord(
            stream=str(value["stream"]),
            seq=int(value["seq"]),
            subject=str(value["subject"]),
            headers={str(k): str(v) for k, v in dict(value["headers"]).items()},
            data=base64.b64decode(value["data"], validate=True),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise _bad(path, number, f"bad record ({exc})") from None
    if record.stream not in streams:
        raise _bad(path, number, f"record of {record.stream}, not in the header")
    return record


def verify(path: Path) -> tuple[BackupHeader, dict[str, int], str]:
    """Check a whole file: header, every record, counts, order and digest.

    Returns:
        The header, the count of records per stream, and the digest.

    Raises:
        BadMessageError: anything wrong, with the line.
    """
    header: BackupHeader | None = None
    counts: dict[str, int] = {}
    last: dict[str, int] = {}
    digest = hashlib.sha256()
    trailer: dict[str, Any] | None = None
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if trailer is not None:
                raise _bad(path, number, "lines after the trailer")
            value = _parse(path, number, raw)
            if header is None:
                header = _header(path, value)
                counts = dict.fromkeys(header.first_seqs, 0)
            elif value.get("end") is True:
                trailer = value
                continue
            else:
                record = _record(path, number, value, header.first_seqs)
                if record.seq <= last.get(record.stream, 0):
                    raise _bad(path, number, f"{record.stream} seq {record.seq} out of order")
                last[record.stream] = record.seq
                counts[record.stream] += 1
            digest.update(raw)
    if header is None:
        raise _bad(path, 1, "empty file")
    if trailer is None:
        raise _bad(path, 0, "no trailer: the file is truncated")
    if trailer.get("counts") != counts:
        raise _bad(path, 0, f"counts {trailer.get('counts')} but {counts} records")
    if trailer.get("sha256") != digest.hexdigest():
        raise _bad(path, 0, "sha256 does not match: the file was altered")
    return header, counts, digest.hexdigest()


def read_records(path: Path) -> Iterator[BackupRecord]:
    """The records of a file :func:`verify` accepted, in order."""
    with path.open("rb") as f:
        header = _header(path, _parse(path, 1, f.readline()))
        for number, raw in enumerate(f, start=2):
            value = _parse(path, number, raw)
            if value.get("end") is True:
                return
            yield _record(path, number, value, header.first_seqs)
