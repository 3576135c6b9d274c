"""``fleet replay`` and ``fleet audit``: the log, rebuilt and checked, with no master needed.

``replay`` folds the whole log with the master's own fold and can compare the result with
the running master and with its newest snapshot. ``audit`` lists events with filters and,
with ``--verify``, checks every signature against the trusted keys and the hash chain
against the master's checkpoints. Events that cannot be decoded are listed as such.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fnmatch
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats.js.errors

from bus import (
    BadMessageError,
    Bus,
    FleetError,
    FleetTimeoutError,
    SignatureError,
    UsageError,
    VerificationError,
    connect,
    decode_envelope,
    verify_envelope,
)
from bus.codec import decode_data, unpack
from bus.command import add_connection_args, connect_settings
from bus.keys import public_key_of, read_seed_file
from bus.log import LogRecord, Tail
from bus.request import control
from ledger.anchoring import Anchoring, WitnessEntry, read_witness
from ledger.gate import Gate
from ledger.policy import Principals
from master.chain import Chain
from master.config import MasterConfig, default_config_path, load_master_config
from master.projection import Projection, differences, iso
from master.runtime import CHECKPOINT_KEY
from master.snapshot import load_snapshot
from schemas import AuditCheckpoint, Envelope, Event

_MASTER_TIMEOUT_S = 5.0


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    replay = sub.add_parser(
        "replay",
        help="rebuild every job's and agent's state from the event log",
        description=__doc__,
    )
    replay.add_argument(
        "--until", metavar="SEQ|TIME", help="stop at this stream sequence or time (ISO 8601)"
    )
    replay.add_argument(
        "--verify",
        action="store_true",
        help="compare with the running master and its snapshot; exit 5 on a difference",
    )
    replay.add_argument("--json", action="store_true", help="print a JSON document")
    replay.set_defaults(handler=replay_command, is_async=True)

    audit = sub.add_parser("audit", help="who did what: list, filter, follow and verify events")
    audit.add_argument("--job", metavar="ID")
    audit.add_argument("--agent", metavar="AGENT")
    audit.add_argument("--user", metavar="PRINCIPAL", help="events produced by this principal")
    audit.add_argument("--type", metavar="TYPE", help="event type, globs allowed (job.*)")
    audit.add_argument(
        "--since", metavar="TIME", help="ISO 8601 time, or a duration ago: 30m, 2h, 7d"
    )
    audit.add_argument("--until", metavar="TIME", help="ISO 8601 time, or a duration ago")
    audit.add_argument(
        "--verify",
        action="store_true",
        help="check signatures and the hash chain; exit 5 on a problem",
    )
    audit.add_argument(
        "--trust",
        type=Path,
        metavar="FILE",
        help=f"master config whose keys are trusted (default {default_config_path()} if present)",
    )
    audit.add_argument(
        "--witness",
        type=Path,
        metavar="FILE",
        help="the master's witness file (<data_dir>/witness): with --verify, a log cut "
        "short of its last checkpoint fails",
    )
    audit.add_argument("--json", action="store_true", help="one JSON document per event")
    audit.add_argument("-f", "--follow", action="store_true", help="keep printing new events")
    audit.set_defaults(handler=audit_command, is_async=True)
    for parser in (replay, audit):
        add_connection_args(parser)


def parse_time(text: str) -> int:
    """ISO 8601, or ``<n>s|m|h|d`` ago, as nanoseconds since the epoch.

    Raises:
        UsageError: neither.
    """
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text[-1:] in units and text[:-1].isdigit():
        return int(
            (datetime.datetime.now(datetime.UTC).timestamp() - int(text[:-1]) * units[text[-1]])
            * 1e9
        )
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"{text!r} is neither an ISO 8601 time nor a duration like 2h") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return int(moment.timestamp() * 1e9)


async def read_all(bus: Bus) -> list[LogRecord]:
    async with await Tail.open(bus, bus.subjects.events_stream, bus.subjects.all_events) as tail:
        return await tail.read_available()


def fold_records(
    records: list[LogRecord], until_seq: int | None = None, until_ts: int | None = None
) -> tuple[Projection, Chain]:
    """The projection and chain of the log's first events (all, or up to a bound)."""
    projection, chain = Projection(), Chain()
    for record in records:
        if until_seq is not None and record.seq > until_seq:
            break
        try:
            envelope = decode_envelope(record.data)
            if until_ts is not None and envelope.ts > until_ts:
                break
            event = decode_data(envelope)
        except BadMessageError:
            projection.apply_undecodable(record.seq)
        else:
            projection.apply(record.seq, event)
        chain.add(record.data)
    return projection, chain


# --- replay --------------------------------------------------------------------------------


async def replay_command(args: argparse.Namespace) -> int:
    until_seq = until_ts = None
    if args.until:
        if args.until.isdigit():
            until_seq = int(args.until)
        else:
            until_ts = parse_time(args.until)
    async with await connect(connect_settings(args, "fleet replay")) as bus:
        master_doc = await _master_state(bus) if args.verify else None
        records = await read_all(bus)
        snapshot = await load_snapshot(bus) if args.verify else None
    projection, chain = fold_records(records, until_seq, until_ts)
    if args.json:
        doc = {
            "jobs": [j.to_json() for j in sorted(projection.jobs.values(), key=lambda j: j.job_id)],
            "agents": [a.to_json() for a in sorted(projection.agents.values(), key=lambda a: a.id)],
            "rollouts": [
                r.to_json() for r in sorted(projection.rollouts.values(), key=lambda r: r.version)
            ],
            "seq": projection.seq,
            "events": projection.events,
            "unknown": projection.unknown,
            "chain": chain.hex,
        }
        print(json.dumps(doc))
    else:
        statuses: dict[str, int] = {}
        for job in projection.jobs.values():
            statuses[job.status] = statuses.get(job.status, 0) + 1
        print(f"replayed {projection.events} events up to seq {projection.seq}")
        by_status = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())) or "none"
        print(f"jobs: {len(projection.jobs)} ({by_status})")
        online = sum(a.online for a in projection.agents.values())
        print(f"agents: {len(projection.agents)} ({online} online)")
        if projection.unknown:
            print(f"not understood: {projection.unknown}")
    if not args.verify:
        return 0
    problems = []
    if master_doc is None:
        print("fleet: no master answered; comparing with the snapshot only", file=sys.stderr)
    else:
        problems += _compare("the running master", master_doc, records)
    if snapshot is None:
        print("fleet: no usable snapshot to compare with", file=sys.stderr)
    else:
        expected, expected_chain = fold_records(records, until_seq=snapshot.seq)
        diff = differences(expected, snapshot.projection)
        if expected_chain.value != snapshot.chain.value:
            ours, theirs = expected_chain.hex[:16], snapshot.chain.hex[:16]
            diff.append(f"chain at seq {snapshot.seq}: replay {ours}… ≠ snapshot {theirs}…")
        problems += [f"snapshot (seq {snapshot.seq}): {line}" for line in diff]
    if problems:
        print("\n".join(problems), file=sys.stderr)
        raise VerificationError(
            f"the replay differs from what the master holds ({len(problems)} differences)"
        )
    compared = [
        name
        for name, present in (("the running master", master_doc), ("its newest snapshot", snapshot))
        if present is not None
    ]
    if compared:
        print(f"fleet: verified: the replay equals {' and '.join(compared)}", file=sys.stderr)
    else:
        print("fleet: nothing to compare the replay with", file=sys.stderr)
    return 0


async def _master_state(bus: Bus) -> dict[str, Any] | None:
    try:
        reply = await control(
            bus, bus.subjects.master_control("state"), timeout=_MASTER_TIMEOUT_S, attempts=1
        )
    except FleetTimeoutError:
        return None
    return reply.data


def _compare(name: str, doc: dict[str, Any], records: list[LogRecord]) -> list[str]:
    seq = int(doc["seq"])
    expected, chain = fold_records(records, until_seq=seq)
    problems = []
    if expected.seq < seq:
        problems.append(f"{name} is at seq {seq}, but the log read ends at {expected.seq}")
    if "state" in doc:
        theirs = Projection.from_state(doc["state"])
        problems += [f"{name}: {line}" for line in differences(expected, theirs)]
    if chain.hex != doc["chain"]:
        problems.append(f"{name}: chain {doc['chain'][:16]}… ≠ replay {chain.hex[:16]}…")
    return problems


# --- audit ---------------------------------------------------------------------------------


@dataclass
class Findings:
    """What ``--verify`` found."""

    problems: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, text: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self.problems.append(text)


def registry(path: Path | None) -> Principals:
    """The principals of a master config (strict: only they may sign), or, with no
    config, an open registry that learns agents' keys from the log."""
    if path is None:
        default = default_config_path()
        if not default.exists():
            return Principals()
        path = default
    config: MasterConfig = load_master_config(path)
    # Without the master's key file here, its events show as by an unknown signer.
    master_key = None
    with contextlib.suppress(FleetError):
        master_key = public_key_of(read_seed_file(config.key_path))
    return config.principals(master_key, strict=True)


class Auditor:
    """Checks events in log order: signatures, who may say what (:mod:`ledger.policy`,
    :mod:`ledger.gate`), the chain at checkpoints, gaps and the witness."""

    def __init__(self, principals: Principals, witness: WitnessEntry | None = None) -> None:
        self.gate = Gate(principals)
        self.projection = Projection()
        self.chain = Chain()
        self.anchoring = Anchoring(witness)
        self.findings = Findings()

    def check(self, record: LogRecord, envelope: Envelope | None) -> bool | None:
        """Verify one record (in order); True/False for signed events, None if undecodable."""
        before = self.chain.count
        self.chain.add(record.data)
        checkpoint = envelope is not None and envelope.type == AuditCheckpoint.TYPE
        self.anchoring.saw(record.seq, self.chain.count, self.chain.value, checkpoint=checkpoint)
        if envelope is None:
            self.findings.add("undecodable", f"seq {record.seq}: cannot be decoded")
            return None
        where = f"seq {record.seq} {envelope.type} by {envelope.source}"
        try:
            signer = verify_envelope(envelope, subject=record.subject)
            event = decode_data(envelope)
        except SignatureError as exc:
            kind = "unsigned" if not envelope.signed else "forged"
            self.findings.add(kind, f"{where}: {exc}")
            return False
        except BadMessageError as exc:
            self.findings.add("undecodable", f"{where}: {exc}")
            return False
        verdict = self.gate.admit(envelope, signer, self.projection.jobs)
        if verdict.problem is not None:
            self.findings.add(verdict.problem.kind, f"{where}: {verdict.problem.text}")
            return False
        self.projection.apply(record.seq, event)
        self.gate.admitted(envelope, verdict)
        if checkpoint:
            self._check_checkpoint(record, envelope, before)
        return True

    def _check_checkpoint(self, record: LogRecord, envelope: Envelope, before: int) -> None:
        try:
            event = decode_data(envelope)
        except BadMessageError:
            return
        if not isinstance(event, Event) or not isinstance(event.data, AuditCheckpoint):
            return
        cp = event.data
        ours = self.chain.at(cp.count) if cp.count <= before else None
        if ours is None:
            text = f"checkpoint covers {cp.count} events, the log has {before} before it"
            self.findings.add("chain", f"seq {record.seq}: {text}: events were removed or added")
        elif ours.hex() != cp.chain:
            text = f"checkpoint of {cp.count} events does not match the log"
            self.findings.add(
                "chain", f"seq {record.seq}: {text}: an event was removed, altered or reordered"
            )

    def check_end(self, recorded: AuditCheckpoint | None) -> None:
        """Compare the log's length with the master's latest checkpoint outside the log
        (in the settings bucket and, if given, the witness file)."""
        self.anchoring.end()
        for kind, text in self.anchoring.problems:
            self.findings.add(kind, text)
        if recorded is not None and recorded.count > self.chain.count:
            held = self.chain.count
            text = f"the master checkpointed {recorded.count} events, the log holds {held}"
            self.findings.add("truncated", f"{text}: cut short")


def _matches(
    args: argparse.Namespace,
    record: LogRecord,
    envelope: Envelope | None,
    since: int | None,
    until: int | None,
) -> bool:
    if envelope is None:
        return not any((args.job, args.agent, args.user, args.type))
    data = envelope.data
    if args.job and data.get("job_id") != args.job:
        return False
    if args.agent and data.get("agent") != args.agent:
        return False
    if args.user and envelope.source != args.user:
        return False
    if args.type and not fnmatch.fnmatchcase(envelope.type, args.type):
        return False
    if since is not None and envelope.ts < since:
        return False
    return until is None or envelope.ts <= until


def _print(
    args: argparse.Namespace,
    record: LogRecord,
    envelope: Envelope | None,
    verified: bool | None,
    problem: str | None,
) -> None:
    if args.json:
        if envelope is None:
            doc: dict[str, Any] = {
                "seq": record.seq,
                "subject": record.subject,
                "undecodable": problem,
            }
        else:
            doc = {
                "seq": record.seq,
                "id": envelope.id,
                "type": envelope.type,
                "ts": iso(envelope.ts),
                "source": envelope.source,
                "subject": envelope.subject,
                "data": envelope.data,
                "signer": envelope.signer,
                "verified": verified,
            }
        print(json.dumps(doc, default=str), flush=True)
        return
    if envelope is None:
        print(f"{record.seq:>7}  {'':<24}  UNDECODABLE ({problem}) on {record.subject}", flush=True)
        return
    mark = {True: "✓", False: "✗", None: " "}[verified]
    when, kind, source = iso(envelope.ts) or "", envelope.type, envelope.source
    line = f"{record.seq:>7}  {when:<24}  {mark} {kind:<22} {source:<16} {envelope.subject}"
    print(line, flush=True)


async def audit_command(args: argparse.Namespace) -> int:
    since = parse_time(args.since) if args.since else None
    until = parse_time(args.until) if args.until else None
    witness = None
    if args.witness is not None:
        if not args.verify:
            raise UsageError("--witness needs --verify")
        entries = read_witness(args.witness)
        witness = entries[-1] if entries else None
    auditor = Auditor(registry(args.trust), witness) if args.verify else None
    async with await connect(connect_settings(args, "fleet audit")) as bus:
        tail = await Tail.open(bus, bus.subjects.events_stream, bus.subjects.all_events)
        async with tail:
            for record in await tail.read_available():
                _audit_one(args, auditor, record, since, until)
            if auditor is not None:
                auditor.check_end(await _recorded_checkpoint(bus))
            while args.follow:
                for record in await tail.fetch(timeout=1.0):
                    _audit_one(args, auditor, record, since, until)
    if auditor is None:
        return 0
    findings = auditor.findings
    for line in findings.problems:
        print(f"fleet: {line}", file=sys.stderr)
    if findings.problems:
        summary = ", ".join(f"{n} {kind}" for kind, n in sorted(findings.counts.items()))
        raise VerificationError(f"the log does not verify: {summary}")
    count = auditor.chain.count
    print(f"fleet: verified {count} events: signatures trusted, hash chain intact", file=sys.stderr)
    if auditor.anchoring.unanchored:
        print(
            f"fleet: warning: {auditor.anchoring.unanchored} events after the newest "
            "checkpoint are not anchored yet (no signed hash covers them)",
            file=sys.stderr,
        )
    if not auditor.gate.principals.registered:
        print(
            "fleet: warning: no registry (--trust): signers are checked only against "
            "each other, not against configured keys",
            file=sys.stderr,
        )
    return 0


def _audit_one(
    args: argparse.Namespace,
    auditor: Auditor | None,
    record: LogRecord,
    since: int | None,
    until: int | None,
) -> None:
    problem = None
    try:
        envelope: Envelope | None = decode_envelope(record.data)
    except BadMessageError as exc:
        envelope, problem = None, str(exc)
    verified = auditor.check(record, envelope) if auditor is not None else None
    if _matches(args, record, envelope, since, until):
        _print(args, record, envelope, verified, problem)


async def _recorded_checkpoint(bus: Bus) -> AuditCheckpoint | None:
    try:
        kv = await bus.key_value(bus.subjects.config_bucket)
        entry = await kv.get(CHECKPOINT_KEY)
    except (nats.js.errors.KeyNotFoundError, FleetError):
        return None
    try:
        return AuditCheckpoint.model_validate(unpack(entry.value or b""))
    except (BadMessageError, ValueError):
        return None
