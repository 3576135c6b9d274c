"""What the ``fleet`` subcommands share: who I am, reading the log, presence, printing."""

from __future__ import annotations

import fnmatch
import logging
import os
import sys
from pathlib import Path
from typing import Any

from bus import (
    BadMessageError,
    Bus,
    FleetError,
    SecretFileError,
    Signer,
    UsageError,
    decode_envelope,
    decode_model,
    generate_seed,
    sign_envelope,
    write_seed_file,
)
from bus.command import principal_name
from bus.keys import SEED_FILE_SUFFIX, default_key_dir
from bus.log import last_message, read_log
from bus.request import control
from ledger.driver import fold
from ledger.projection import Projection
from ledger.views import iso
from schemas import EventData, Presence, make_envelope
from schemas.events import event_name

logger = logging.getLogger(__name__)


def operator_signer(nkey: Path | None) -> tuple[str, Signer]:
    """The principal's name and the key it signs with.

    The key is ``--nkey`` (which also authenticates the connection), else ``FLEET_NKEY``,
    else ``operator-<name>.nk`` in the key directory, created on first use. The name is
    the one the key file records (``FLEET_USER`` overrides), else the login name, so
    signer and source agree (:func:`bus.command.principal_name`).

    Raises:
        SecretFileError: the key file is unsafe or invalid.
    """
    explicit = nkey or (Path(os.environ["FLEET_NKEY"]) if os.environ.get("FLEET_NKEY") else None)
    if explicit is not None:
        return principal_name(explicit), Signer.from_file(explicit)
    name = principal_name()
    path = default_key_dir() / f"operator-{name}{SEED_FILE_SUFFIX}"
    if not path.exists():
        try:
            write_seed_file(path, generate_seed(), owner=("operator", name))
        except SecretFileError as exc:
            raise SecretFileError(path, f"cannot create your operator key: {exc.reason}") from None
        signer = Signer.from_file(path)
        print(
            f"fleet: created your operator key {path} (public key {signer.public_key}); "
            "agents that check signatures must trust it",
            file=sys.stderr,
        )
        return name, signer
    return principal_name(path), Signer.from_file(path)


async def publish_signed(
    bus: Bus, data: EventData, source: str, signer: Signer, subject: str
) -> str:
    """Sign and store an event; returns its id."""
    envelope = sign_envelope(make_envelope(data, source=source, subject=subject), signer)
    await bus.publish_event(envelope)
    return envelope.id


async def job_projection(bus: Bus, job_id: str = "*", agent: str = "*") -> Projection:
    """The projection of the job events matching ``agent`` and ``job_id``."""
    subject = bus.subjects.job_events(agent, job_id)
    return fold(await read_log(bus, bus.subjects.events_stream, subject))


async def presence(bus: Bus) -> dict[str, Presence]:
    """Every agent with a live heartbeat, by id."""
    kv = await bus.kv(bus.subjects.presence_bucket)
    out: dict[str, Presence] = {}
    for key in await kv.keys():
        entry = await kv.get(key)
        if entry is None or not entry.value:
            continue  # expired between listing and reading
        try:
            out[key] = decode_model(entry.value, Presence)
        except BadMessageError as exc:
            logger.warning("presence of %s cannot be decoded: %s", key, exc)
    return out


async def offline_since(bus: Bus, agent: str) -> str:
    """When an agent was last seen leaving, for "queued (agent offline since …)"."""
    subject = bus.subjects.agent_event(agent, event_name("agent.offline"))
    try:
        record = await last_message(bus, bus.subjects.events_stream, subject)
    except FleetError:
        record = None
    if record is None:
        return "agent offline, never seen leaving"
    try:
        ts = decode_envelope(record.data).ts
    except BadMessageError:
        return "agent offline"
    return f"agent offline since {iso(ts)}"


async def ask_master(bus: Bus, op: str, args: dict[str, object]) -> dict[str, Any] | None:
    """The master's answer, or None when no master answers (then the log is read).

    With no master subscribed the server says so at once (no responders): no wait.
    """
    try:
        reply = await control(bus, bus.subjects.master_control(op), args, timeout=5, attempts=1)
    except FleetError as exc:
        logger.debug("no answer from the master (%s); reading the log", exc)
        return None
    return reply.data


async def known_agents(bus: Bus, online: dict[str, Presence]) -> set[str] | None:
    """Every agent the fleet knows: online, seen in the log, or configured (registered).

    A lookup, never a wait: presence, the master's ``agents`` answer when a master runs,
    and the log's agent events. None when neither the master nor the log can be read
    (this principal may not): then no one can tell.
    """
    known = set(online)
    doc = await ask_master(bus, "agents", {})
    if doc is not None:
        known |= {str(a["id"]) for a in doc.get("agents", []) if isinstance(a, dict)}
    try:
        subject = f"{bus.subjects.prefix}.evt.agent.>"
        records = await read_log(bus, bus.subjects.events_stream, subject)
    except FleetError as exc:
        if doc is None:
            return None  # neither master nor log answered: no one can tell
        logger.info("the log's agent events cannot be read (%s); the master's list it is", exc)
        return known
    return known | set(fold(records).agents)


def match_agents(
    online: dict[str, Presence], glob: str | None, labels: list[tuple[str, str]]
) -> list[str]:
    """The online agents matching a glob and every label."""
    return sorted(
        agent
        for agent, p in online.items()
        if (glob is None or fnmatch.fnmatchcase(agent, glob))
        and all(p.labels.get(k) == v for k, v in labels)
    )


def parse_pairs(values: list[str] | None, what: str) -> list[tuple[str, str]]:
    """``KEY=VALUE`` arguments.

    Raises:
        UsageError: one has no ``=``.
    """
    pairs = []
    for value in values or []:
        key, sep, val = value.partition("=")
        if not sep or not key:
            raise UsageError(f"{what} must be KEY=VALUE, not {value!r}")
        pairs.append((key, val))
    return pairs
