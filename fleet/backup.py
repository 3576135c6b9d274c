"""``fleet ops export`` and ``fleet ops import``: a verifiable copy of the event log.

The file format is :mod:`bus.backup_file` (documented in docs/protocol.md, "Backup
file"). Export writes ``FILE.partial`` and renames it when complete, so a ``FILE`` that
exists is whole. Import checks the whole file (header, counts, order, sha256) before it
restores anything.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from bus import UsageError, connect
from bus.backup import ExportPlan, export_streams, restore, seq_at_time
from bus.backup_file import BackupWriter, read_records, verify
from bus.command import add_connection_args, connect_settings
from fleet.audit import parse_time


def add_parsers(ops_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``export`` and ``import`` under ``fleet ops``."""
    export = ops_sub.add_parser(
        "export",
        help="write a verifiable copy of the event log (and optionally outputs, bundles)",
        description=(
            "Write every event as stored (bytes, subject, headers, sequence), and the "
            "fleet-config bucket, to FILE: JSON Lines with a header, per-stream counts and "
            "a sha256 (docs/protocol.md, 'Backup file'). Reads up to the last event at "
            "the start."
        ),
    )
    export.add_argument("file", type=Path, metavar="FILE", help="where to write (must not exist)")
    export.add_argument(
        "--since",
        metavar="SEQ|TIME",
        help="only events from this sequence, or stored since this time (ISO 8601 or "
        "a duration ago like 2d); an incremental backup, restored after the full one",
    )
    export.add_argument("--outputs", action="store_true", help="also the job output stream")
    export.add_argument("--bundles", action="store_true", help="also the update bundles")
    export.add_argument("--json", action="store_true", help="print a JSON summary")
    add_connection_args(export)
    export.set_defaults(handler=export_command, is_async=True)

    restore_p = ops_sub.add_parser(
        "import",
        help="restore an export into an empty deployment",
        description=(
            "Check FILE whole, then republish every message as it was stored, keeping "
            "sequences, so `fleet audit --verify` passes and `fleet replay` is unchanged. "
            "Run `fleet ops init` first, with no master or agent running. A non-empty "
            "stream is refused unless --force: then only the events not held yet are "
            "added to the log and other non-empty streams are left alone."
        ),
    )
    restore_p.add_argument("file", type=Path, metavar="FILE")
    restore_p.add_argument("--force", action="store_true", help="restore into a non-empty log")
    restore_p.add_argument(
        "--check", action="store_true", help="only verify the file; connect to nothing"
    )
    restore_p.add_argument("--json", action="store_true", help="print a JSON summary")
    add_connection_args(restore_p)
    restore_p.set_defaults(handler=import_command, is_async=True)


def _new_file(path: Path) -> Path:
    """Where to write ``path`` until it is complete; refuses to overwrite it."""
    if path.exists():
        raise UsageError(f"{path} exists; choose another name (an export never overwrites)")
    partial = path.with_name(path.name + ".partial")
    partial.unlink(missing_ok=True)  # left by an interrupted export; made anew, mode 0600
    return partial


async def export_command(args: argparse.Namespace) -> int:
    path: Path = args.file
    partial = _new_file(path)
    async with await connect(connect_settings(args, "fleet-ops")) as bus:
        subjects = bus.subjects
        start = 0
        if args.since:
            if args.since.isdigit():
                start = int(args.since)
            else:
                start = await seq_at_time(bus, subjects.events_stream, parse_time(args.since))
        # The fleet's settings (and the master's record of its last checkpoint) are
        # small and part of what `fleet audit --verify` checks: always included.
        plan = ExportPlan({subjects.events_stream: start, f"KV_{subjects.config_bucket}": 0})
        if args.outputs:
            plan.start[subjects.output_stream] = 0
        if args.bundles:
            plan.start[f"OBJ_{subjects.bundles_bucket}"] = 0
        try:
            # The log holds every job's command and output: for its owner's eyes only.
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                writer = BackupWriter(out)
                counts = await export_streams(bus, plan, writer)
                digest = writer.trailer()
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    partial.rename(path)
    summary = {"file": str(path), "counts": counts, "sha256": digest}
    if args.json:
        print(json.dumps(summary))
    else:
        for stream, count in counts.items():
            print(f"exported {count:>8} messages of {stream}")
        print(f"sha256   {digest}  {path}")
    return 0


async def import_command(args: argparse.Namespace) -> int:
    header, counts, digest = verify(args.file)
    summary: dict[str, object] = {"file": str(args.file), "counts": counts, "sha256": digest}
    report = None
    if not args.check:
        async with await connect(connect_settings(args, "fleet-ops")) as bus:
            if header.prefix and header.prefix != bus.subjects.prefix:
                raise UsageError(
                    f"{args.file} is an export of fleet prefix {header.prefix!r}, "
                    f"not {bus.subjects.prefix!r}"
                )
            report = await restore(bus, header, lambda: read_records(args.file), force=args.force)
        summary.update(
            restored=report.restored, skipped=report.skipped, sequences_kept=report.sequences_kept
        )
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"verified {args.file}: sha256 {digest}, {counts}")
        for stream, count in (report.restored if report else {}).items():
            print(f"restored {count:>8} messages of {stream}")
    if report is not None and not all(report.sequences_kept.values()):
        print(
            "fleet: some sequences differ from the export (restored after other messages)",
            file=sys.stderr,
        )
    return 0
