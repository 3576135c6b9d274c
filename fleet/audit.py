"""``fleet replay`` and ``fleet audit``: the log, rebuilt and checked, with no master needed.

Both read the log through :mod:`ledger`'s one record driver. ``replay`` folds the whole
log with the master's own fold and can compare the result with the running master and
with its newest snapshot. ``audit`` lists events with filters and, with ``--verify``,
checks every signature against the trusted keys and the hash chain against the master's
checkpoints. Events that cannot be decoded are listed as such.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import fnmatch
import json
import sys
from pathlib import Path
from typing import Any

from bus import (
    BadMessageError,
    Bus,
    FleetError,
    FleetTimeoutError,
    UsageError,
    VerificationError,
    connect,
)
from bus.bulkread import read_all as read_stream
from bus.bulkread import read_bulk
from bus.codec import unpack
from bus.command import add_connection_args, connect_settings
from bus.keys import public_key_of, read_seed_file
from bus.log import LogRecord, Tail
from bus.request import control
from ledger.anchoring import Anchoring, WitnessEntry, read_witness
from ledger.chain import CHECKPOINT_KEY, Chain
from ledger.driver import Entry, Problem, RecordDriver
from ledger.gate import guard
from ledger.policy import Principals
from ledger.projection import Projection, differences
from ledger.snapshot import load_snapshot
from ledger.verify import CheckpointCheck, check_end, signature_check
from ledger.views import iso
from master.config import MasterConfig, default_config_path, load_master_config
from schemas import AuditCheckpoint

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
    replay.add_argument(
        "--trust",
        type=Path,
        metavar="FILE",
        help="the master config whose registry decides who may say what, as the master "
        f"does (default {default_config_path()} if present)",
    )
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
    return await read_stream(bus, bus.subjects.events_stream, bus.subjects.all_events)


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
    principals = registry(args.trust, strict=False)
    driver, refused = _fold(records, principals, until_seq, until_ts)
    projection, chain = driver.projection, driver.chain
    assert chain is not None
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
    problems = [f"not folded: {p}" for p in refused]
    if master_doc is None:
        print("fleet: no master answered; comparing with the snapshot only", file=sys.stderr)
    else:
        problems += _compare("the running master", master_doc, records, principals)
    if snapshot is None:
        print("fleet: no usable snapshot to compare with", file=sys.stderr)
    else:
        at_snapshot, _ = _fold(records, principals, until_seq=snapshot.seq)
        expected, expected_chain = at_snapshot.projection, at_snapshot.chain
        assert expected_chain is not None
        diff = differences(expected, snapshot.projection)
        if expected_chain.value != snapshot.chain.value:
            ours, theirs = expected_chain.hex[:16], snapshot.chain.hex[:16]
            diff.append(f"chain at seq {snapshot.seq}: replay {ours}… ≠ snapshot {theirs}…")
        problems += [f"snapshot (seq {snapshot.seq}): {line}" for line in diff]
    if refused:
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(_count(refused).items()))
        problems.append(f"{len(refused)} events do not count and were not folded ({kinds})")
    if problems:
        print("\n".join(problems), file=sys.stderr)
        what = "does not verify" if refused else "differs from what the master holds"
        raise VerificationError(f"the replay {what} ({len(problems)} problems)")
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


def _fold(
    records: list[LogRecord],
    principals: Principals,
    until_seq: int | None = None,
    until_ts: int | None = None,
) -> tuple[RecordDriver, list[Problem]]:
    """Fold as the master does: signatures and the policy checked, and what fails them
    not folded but returned."""
    found: list[Problem] = []
    driver = RecordDriver(chain=Chain(), on_problem=found.append)
    guard(driver, copy.deepcopy(principals))
    driver.feed_all(records, until_seq=until_seq, until_ts=until_ts)
    return driver, found


def _count(problems: list[Problem]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for problem in problems:
        counts[problem.kind] = counts.get(problem.kind, 0) + 1
    return counts


def _compare(
    name: str, doc: dict[str, Any], records: list[LogRecord], principals: Principals
) -> list[str]:
    seq = int(doc["seq"])
    folded, _ = _fold(records, principals, until_seq=seq)
    expected, chain = folded.projection, folded.chain
    assert chain is not None
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


def registry(path: Path | None, *, strict: bool) -> Principals:
    """The principals of a master config, or, with no config, an open registry that
    learns agents' keys from the log.

    ``strict`` (audit): every signer must be in the config. Otherwise (replay), as the
    master folds: an agent the config does not name is known by its first key.
    """
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
    return config.principals(master_key, strict=strict)


class Auditor:
    """``--verify``: signatures, who may say what (:mod:`ledger.gate`), the chain at every
    checkpoint, gaps and the witness (:mod:`ledger.anchoring`), through the one record
    driver; problems are collected to print at the end."""

    def __init__(self, principals: Principals, witness: WitnessEntry | None = None) -> None:
        self.problems: list[Problem] = []
        chain = Chain()
        self.driver = RecordDriver(
            chain=chain,
            checks=[signature_check(), CheckpointCheck(chain)],
            on_problem=self.problems.append,
        )
        self.policy = guard(self.driver, principals, signatures=False)
        self.anchoring = Anchoring(witness)

    def saw(self, entry: Entry) -> None:
        """Follow the log's sequence and anchoring past one fed record."""
        chain = self.driver.chain
        assert chain is not None
        checkpoint = entry.envelope is not None and entry.envelope.type == AuditCheckpoint.TYPE
        self.anchoring.saw(entry.seq, chain.count, chain.value, checkpoint=checkpoint)

    def check_end(self, recorded: AuditCheckpoint | None) -> None:
        """Compare the log's length with the master's latest checkpoint outside the log
        (in the settings bucket and, if given, the witness file)."""
        assert self.driver.chain is not None
        problem = check_end(self.driver.chain, recorded)
        if problem is not None:
            self.driver.report(problem)
        self.anchoring.end()
        for kind, text in self.anchoring.problems:
            self.driver.report(Problem(0, kind, text))


def _matches(args: argparse.Namespace, entry: Entry, since: int | None, until: int | None) -> bool:
    envelope = entry.envelope
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


def _print(args: argparse.Namespace, entry: Entry) -> None:
    record, envelope = entry.record, entry.envelope
    problem = "; ".join(p.text for p in entry.problems)
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
                "verified": entry.verified,
            }
        print(json.dumps(doc, default=str), flush=True)
        return
    if envelope is None:
        print(f"{record.seq:>7}  {'':<24}  UNDECODABLE ({problem}) on {record.subject}", flush=True)
        return
    mark = {True: "✓", False: "✗", None: " "}[entry.verified]
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
    auditor = Auditor(registry(args.trust, strict=True), witness) if args.verify else None
    driver = auditor.driver if auditor is not None else RecordDriver(chain=Chain())

    def audit_one(record: LogRecord) -> None:
        entry = driver.feed(record)
        if auditor is not None:
            auditor.saw(entry)
        if _matches(args, entry, since, until):
            _print(args, entry)

    async with await connect(connect_settings(args, "fleet audit")) as bus:
        last = 0
        reading = read_bulk(bus, bus.subjects.events_stream, bus.subjects.all_events)
        async with contextlib.aclosing(reading):  # the reader's socket, however this ends
            async for batch in reading:
                for record in batch:
                    audit_one(record)
                last = batch[-1].seq
        if auditor is not None:
            auditor.check_end(await _recorded_checkpoint(bus))
        if args.follow:
            events = bus.subjects.all_events
            async with await Tail.open(
                bus, bus.subjects.events_stream, events, start_seq=last + 1
            ) as tail:
                while True:
                    for record in await tail.fetch(timeout=1.0):
                        audit_one(record)
    if auditor is None:
        return 0
    for problem in auditor.problems:
        print(f"fleet: {problem}", file=sys.stderr)
    if auditor.problems:
        summary = ", ".join(f"{n} {kind}" for kind, n in sorted(driver.counts.items()))
        raise VerificationError(f"the log does not verify: {summary}")
    assert driver.chain is not None
    count = driver.chain.count
    print(f"fleet: verified {count} events: signatures trusted, hash chain intact", file=sys.stderr)
    if auditor.anchoring.unanchored:
        print(
            f"fleet: warning: {auditor.anchoring.unanchored} events after the newest "
            "checkpoint are unanchored (no signed hash covers them yet)",
            file=sys.stderr,
        )
    if not auditor.policy.principals.registered:
        print(
            "fleet: warning: no registry (--trust): signers are checked against each other "
            "and the log's registrations, not against configured keys",
            file=sys.stderr,
        )
    return 0


async def _recorded_checkpoint(bus: Bus) -> AuditCheckpoint | None:
    try:
        kv = await bus.kv(bus.subjects.config_bucket)
        entry = await kv.get(CHECKPOINT_KEY)
    except FleetError:
        return None
    if entry is None:
        return None
    try:
        return AuditCheckpoint.model_validate(unpack(entry.value))
    except (BadMessageError, ValueError):
        return None
