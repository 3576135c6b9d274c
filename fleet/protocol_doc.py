"""Regenerate the generated parts of ``docs/protocol.md`` from the code.

    python -m fleet.protocol_doc --write     # rewrite the generated sections
    python -m fleet.protocol_doc             # check only: exit 1 if they are stale

The event catalogue comes from the schema registry, the config tables from the agent's
and the master's config models, the storage table from :func:`bus.streams.desired_streams`,
the exit codes from :mod:`bus.errors`. It lives in ``fleet/`` because only the operator
CLI's package may import the agent's and the master's models together; ``fleet.cli``
never imports it, so commands do not pay for it.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import get_args

from pydantic import BaseModel

from agentd.config import AgentConfig, ModuleSpec
from bus import errors
from bus.storage_design import StorageSettings, desired_streams
from bus.subjects import Subjects
from master.config import MasterConfig, Principal
from schemas.auth import AuthAccepted, AuthChallenge, AuthStart, AuthSubmit
from schemas.catalogue import (
    alias_table,
    attribute_docs,
    event_catalogue,
    fields_table,
    model_section,
    replace_sections,
    summary,
)
from schemas.control import ControlReply, ControlRequest
from schemas.envelope import Envelope
from schemas.events import EventData, event_name
from schemas.jobs import ArgvCommand, JobRequest, ModuleCommand, ScriptCommand
from schemas.presence import MasterPresence, Presence
from schemas.registry import EventRegistry, default_registry
from schemas.update import (
    SETTING_KEYS,
    BundleManifest,
    BundleSignature,
    ReleaseTarget,
    RolloutStage,
    UpdateSettings,
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
REGENERATE = "python -m fleet.protocol_doc --write"

SHAPES: tuple[type[BaseModel], ...] = (
    Envelope,
    JobRequest,
    ArgvCommand,
    ScriptCommand,
    ModuleCommand,
    Presence,
    MasterPresence,
    ControlRequest,
    ControlReply,
    AuthStart,
    AuthChallenge,
    AuthSubmit,
    AuthAccepted,
    ReleaseTarget,
    RolloutStage,
    BundleManifest,
    BundleSignature,
)

# Placeholders that are valid subject tokens, so the real builders can be asked.
_PLACEHOLDERS = {"AGENTX": "<agent>", "JOBX": "<job_id>", "VERSIONX": "<version>"}


def event_subject(model: type[EventData], subjects: Subjects | None = None) -> str:
    """The subject pattern an event type is published on, from :mod:`bus.subjects`."""
    s = subjects or Subjects()
    domain = model.TYPE.split(".", 1)[0]
    name = event_name(model.TYPE)
    if domain == "job":
        subject = s.job_event("AGENTX", "JOBX", name)
    elif domain == "agent":
        subject = s.agent_event("AGENTX", name)
    elif domain == "update":
        agent = "AGENTX" if "agent" in model.model_fields else None
        subject = s.update_event("VERSIONX", name, agent=agent)
    else:
        builder = getattr(s, f"{domain}_event", None)
        if builder is None:
            return "(no subject builder for this domain)"
        subject = builder(name)
    for token, shown in _PLACEHOLDERS.items():
        subject = subject.replace(token, shown)
    return str(subject)


def _events(registry: EventRegistry) -> str:
    models = [m for t in registry.known_types() if (m := registry.model_for(t)) is not None]
    # Grouped by domain in the order the log's readers meet them, then by name.
    order = {"job": 0, "agent": 1, "update": 2, "settings": 3, "audit": 4, "auth": 5}
    models.sort(key=lambda m: (order.get(m.TYPE.split(".")[0], 9), m.TYPE))
    return event_catalogue(models, {m.TYPE: event_subject(m) for m in models})


def _shapes() -> str:
    parts = [model_section(model, model.__name__, level=4) for model in SHAPES]
    parts.append("#### Field types\n\n" + alias_table())
    return "\n\n".join(parts)


def _settings() -> str:
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    hints = UpdateSettings.model_fields
    table = fields_table(UpdateSettings).splitlines()[2:]
    by_field = {line.split("`")[1]: line for line in table}
    for key, field_name in SETTING_KEYS.items():
        cells = by_field[field_name].split(" | ")
        model = get_args(hints[field_name].annotation)[:1]
        if not cells[-1].strip(" |") and model and isinstance(model[0], type):
            cells[-1] = f"{summary(model[0])} |"  # a model value: its own docstring says
        rows.append(f"| `{key}` | " + " | ".join(cells[1:]))
    return "\n".join(rows)


def _error_classes() -> Iterator[type[errors.FleetError]]:
    for value in vars(errors).values():
        if (
            isinstance(value, type)
            and issubclass(value, errors.FleetError)
            and value.__module__ == errors.__name__
        ):
            yield value


def _exit_codes() -> str:
    rows = ["| exception | is a | exit | meaning |", "|---|---|---|---|"]
    for cls in _error_classes():
        parent = next((b.__name__ for b in cls.__bases__ if issubclass(b, Exception)), "")
        rows.append(f"| `{cls.__name__}` | {parent} | {cls.exit_code} | {summary(cls)} |")
    codes = sorted(
        (value, name)
        for name, value in vars(errors).items()
        if name.startswith("EXIT_") and isinstance(value, int)
    )
    rows += ["", "| code | constant |", "|---|---|"]
    rows += [f"| {value} | `{name}` |" for value, name in codes]
    rows += ["", f"`exit_code_for()`: {summary(errors.exit_code_for)}"]
    returns = inspect.getdoc(errors.exit_code_for) or ""
    if "Returns:" in returns:
        rows[-1] += " " + " ".join(returns.split("Returns:", 1)[1].split())
    return "\n".join(rows)


def _config(model: type[BaseModel], nested: dict[str, type[BaseModel]]) -> str:
    parts = [fields_table(model, key_header="key")]
    for table, inner in nested.items():
        parts.append(f"{table}: {summary(inner)}\n\n" + fields_table(inner, key_header="key"))
    return "\n\n".join(parts)


def _human_seconds(value: float) -> str:
    if value and value % 86_400 == 0:
        return f"{value / 86_400:g} d"
    return f"{value:g} s"


def _storage() -> str:
    rows = ["| name | kind | subjects | limits |", "|---|---|---|---|"]
    for spec in desired_streams(Subjects(), StorageSettings()):
        f = spec.fields
        limits = []
        if f.get("max_age"):
            limits.append(f"max age {_human_seconds(f['max_age'])}")
        if f.get("max_bytes", 0) > 0:
            limits.append(f"max {f['max_bytes'] // 1024**2} MiB")
        if f.get("discard"):
            limits.append(f"discard {f['discard'].value}")
        if f.get("max_consumers", 0) > 0:
            limits.append(f"max consumers {f['max_consumers']}")
        if f.get("max_msgs_per_subject", 0) > 0:
            limits.append(f"history {f['max_msgs_per_subject']}")
        if f.get("duplicate_window"):
            limits.append(f"duplicate window {_human_seconds(f['duplicate_window'])}")
        if f.get("max_msg_size"):
            limits.append(f"max message {f['max_msg_size'] // 1024} KiB")
        if f.get("subject_delete_marker_ttl"):
            limits.append("delete markers")
        for flag in ("deny_delete", "deny_purge", "allow_direct"):
            if f.get(flag):
                limits.append(flag)
        subjects = ", ".join(f"`{s}`" for s in f["subjects"])
        rows.append(f"| `{spec.name}` | {spec.kind} | {subjects} | {'; '.join(limits)} |")
    s = StorageSettings()
    rows += ["", "Defaults of `fleet ops init` (`bus.streams.StorageSettings`):", ""]
    rows += ["| setting | default | meaning |", "|---|---|---|"]
    docs = attribute_docs(StorageSettings)
    for name, value in vars(s).items():
        rows.append(f"| `{name}` | `{value!r}` | {' '.join(docs.get(name, '').split())} |")
    return "\n".join(rows)


def sections() -> dict[str, str]:
    """Every generated section of the document, by marker name."""
    return {
        "events": _events(default_registry),
        "shapes": _shapes(),
        "storage": _storage(),
        "settings": _settings(),
        "exit-codes": _exit_codes(),
        "agent-config": _config(AgentConfig, {"`[modules.NAME]`": ModuleSpec}),
        "master-config": _config(MasterConfig, {"`[agents.ID]` and `[operators.NAME]`": Principal}),
    }


def render(text: str) -> str:
    """``text`` with every generated section brought up to date."""
    return replace_sections(text, sections())


def main(argv: list[str] | None = None) -> int:
    """Check (default) or ``--write`` the generated sections; 1 when stale, 2 on errors."""
    parser = argparse.ArgumentParser(
        prog="python -m fleet.protocol_doc", description=__doc__.splitlines()[0]
    )
    parser.add_argument("path", nargs="?", type=Path, default=DOC, help=f"default: {DOC}")
    parser.add_argument("--write", action="store_true", help="rewrite the generated sections")
    args = parser.parse_args(argv)
    try:
        text = args.path.read_text(encoding="utf-8")
        fresh = render(text)
    except (OSError, ValueError) as exc:
        print(f"protocol_doc: {exc}", file=sys.stderr)
        return 2
    if fresh == text:
        return 0
    if args.write:
        args.path.write_text(fresh, encoding="utf-8")
        print(f"protocol_doc: rewrote the generated sections of {args.path}")
        return 0
    print(f"protocol_doc: {args.path} is stale; run `{REGENERATE}`", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
