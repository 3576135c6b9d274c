"""``fleet ops server-config``: least-privilege nats-server permissions from a registry.

Every principal connects with its nkey and may publish and subscribe only what its role
needs. Replies go to a per-principal inbox (``_INBOX_<id>``), never the shared
``_INBOX.>``, so no one can read another's replies. Connections with other keys are
refused, because only the keys listed here are users of the server.

The subjects below are the ones each component really uses (read off a traced server):
an agent consumes only its own durable consumers, reads single events only by subject
within its own job subjects (direct get), and publishes only its own events, output and
presence.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bus import Subjects, UsageError
from bus.paths import read_toml
from schemas.fields import PublicKey
from schemas.registry import summarize_validation_error


class Principal(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    public_key: PublicKey


class Registry(BaseModel):
    """Who may connect, by role. Names are principal ids (agent ids, user names)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    prefix: str = "fleet"
    master: Principal | None = None
    agents: dict[str, Principal] = Field(default_factory=dict)
    operators: dict[str, Principal] = Field(default_factory=dict)
    admins: dict[str, Principal] = Field(default_factory=dict)
    headless: dict[str, Principal] = Field(default_factory=dict)


def load_registry(path: Path) -> Registry:
    """Raises: UsageError for a missing or invalid registry."""
    try:
        return Registry.model_validate(read_toml(path))
    except ValidationError as exc:
        raise UsageError(f"{path}: invalid registry: {summarize_validation_error(exc)}") from None


def inbox_prefix(principal: str) -> str:
    """Where a principal's replies arrive; its permissions allow no other inbox."""
    return f"_INBOX_{principal}"


def _reader(s: Subjects) -> list[str]:
    """JetStream reads: stream info, ephemeral consumers, direct gets, flow control."""
    return [
        "$JS.API.INFO",
        "$JS.API.STREAM.NAMES",
        "$JS.API.STREAM.INFO.>",
        "$JS.API.CONSUMER.CREATE.>",
        "$JS.API.CONSUMER.INFO.>",
        "$JS.API.CONSUMER.DELETE.>",
        "$JS.API.CONSUMER.MSG.NEXT.>",
        "$JS.API.DIRECT.GET.>",
        "$JS.API.STREAM.MSG.GET.>",
        "$JS.FC.>",
    ]


def _update_reader(s: Subjects) -> list[str]:
    """What an agent needs to follow updates: read the settings, take download slots,
    read bundles. (It hears them change by subscribing to their keys' subjects.)"""
    config, tokens, bundles = (
        f"KV_{s.config_bucket}",
        f"KV_{s.tokens_bucket}",
        (f"OBJ_{s.bundles_bucket}"),
    )
    return [
        f"$JS.API.STREAM.INFO.{config}",
        f"$JS.API.DIRECT.GET.{config}.>",
        f"$JS.API.STREAM.MSG.GET.{config}",
        f"$JS.API.STREAM.INFO.{tokens}",
        f"$JS.API.STREAM.MSG.GET.{tokens}",
        f"$JS.API.DIRECT.GET.{tokens}.>",
        f"$KV.{s.tokens_bucket}.>",
        f"$JS.API.STREAM.INFO.{bundles}",
        f"$JS.API.STREAM.MSG.GET.{bundles}",
        f"$JS.API.DIRECT.GET.{bundles}.>",
        f"$JS.API.CONSUMER.CREATE.{bundles}",
        f"$JS.API.CONSUMER.CREATE.{bundles}.>",
        f"$JS.API.CONSUMER.INFO.{bundles}.>",
        f"$JS.API.CONSUMER.DELETE.{bundles}.>",
        f"$JS.FC.{bundles}.>",
    ]


def permissions(registry: Registry) -> list[tuple[str, str, dict[str, object]]]:
    """``(role, id, permissions)`` for every principal."""
    s = Subjects(registry.prefix)
    p, events = s.prefix, s.events_stream
    out: list[tuple[str, str, dict[str, object]]] = []
    for agent in registry.agents:
        # Wildcards match whole tokens only: each durable consumer is named outright.
        durables = [f"agent_{agent}_jobs", f"agent_{agent}_cancels"]
        consumer_api = [
            api
            for d in durables
            for api in (
                f"$JS.API.CONSUMER.DURABLE.CREATE.{events}.{d}",
                f"$JS.API.CONSUMER.CREATE.{events}.{d}.>",
                f"$JS.API.CONSUMER.INFO.{events}.{d}",
                f"$JS.API.CONSUMER.MSG.NEXT.{events}.{d}",
                f"$JS.ACK.{events}.{d}.>",
            )
        ]
        out.append(
            (
                "agent",
                agent,
                {
                    "publish": {
                        "allow": [
                            f"$JS.API.STREAM.INFO.{events}",
                            f"$JS.API.STREAM.INFO.KV_{s.presence_bucket}",
                            *consumer_api,
                            f"$JS.API.DIRECT.GET.{events}.{p}.evt.job.{agent}.>",
                            f"$KV.{s.presence_bucket}.{agent}",
                            f"{p}.evt.job.{agent}.*.started",
                            f"{p}.evt.job.{agent}.*.finished",
                            f"{p}.evt.job.{agent}.*.late_result",
                            f"{p}.evt.agent.{agent}.>",
                            f"{p}.evt.update.*.{agent}.*",
                            f"{p}.out.{agent}.>",
                            *_update_reader(s),
                        ]
                    },
                    "subscribe": {
                        "allow": [
                            f"{inbox_prefix(agent)}.>",
                            f"{p}.ctl.{agent}.*",
                            f"$KV.{s.config_bucket}.release.>",
                            f"$KV.{s.config_bucket}.update.>",
                        ]
                    },
                    "allow_responses": True,
                },
            )
        )
    if registry.master is not None:
        out.append(
            (
                "master",
                "master",
                {
                    "publish": {
                        "allow": [
                            *_reader(s),
                            "$JS.ACK.>",
                            f"$KV.{s.config_bucket}.>",
                            f"$O.{s.snapshots_bucket}.>",
                            # Replacing the snapshot object purges its old chunks.
                            f"$JS.API.STREAM.PURGE.OBJ_{s.snapshots_bucket}",
                            f"{p}.evt.agent.*.*",
                            f"{p}.evt.audit.>",
                            f"{p}.evt.auth.>",
                            f"{p}.evt.job.*.*.submitted",
                            f"{p}.evt.job.*.*.finished",
                            f"{p}.evt.job.*.*.late_result",
                            f"{p}.evt.update.*.rollout_halted",
                            f"{p}.evt.settings.changed",
                        ]
                    },
                    "subscribe": {"allow": [f"{inbox_prefix('master')}.>", s.master_control_all]},
                    "allow_responses": True,
                },
            )
        )
    for name in registry.operators:
        out.append(
            (
                "operator",
                name,
                {
                    "publish": {
                        "allow": [
                            *_reader(s),
                            f"{p}.evt.job.*.*.submitted",
                            f"{p}.evt.job.*.*.cancel_requested",
                            f"{p}.ctl.>",
                            # fleet update: bundles, settings and their events.
                            f"$O.{s.bundles_bucket}.>",
                            f"$KV.{s.config_bucket}.>",
                            f"{p}.evt.update.*.published",
                            f"{p}.evt.update.*.announced",
                            f"{p}.evt.settings.changed",
                        ]
                    },
                    "subscribe": {"allow": [f"{inbox_prefix(name)}.>"]},
                },
            )
        )
    for name in registry.headless:
        out.append(
            (
                "headless",
                name,
                {
                    "publish": {
                        "allow": [
                            *_reader(s),
                            f"{p}.evt.job.*.*.submitted",
                            f"$KV.{s.locks_bucket}.>",
                            s.master_control("auth-salt"),
                            s.master_control("auth-start"),
                            s.master_control("auth-submit"),
                        ]
                    },
                    "subscribe": {"allow": [f"{inbox_prefix(name)}.>"]},
                },
            )
        )
    for name in registry.admins:
        out.append(("admin", name, {"publish": {"allow": [">"]}, "subscribe": {"allow": [">"]}}))
    return out


def _conf(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_conf(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k}: {_conf(v)}" for k, v in value.items()) + " }"
    return f'"{value}"'


def render(registry: Registry) -> str:
    """The ``authorization`` block for nats-server (include it from the server config)."""
    keys = {
        "master": registry.master,
        **{f"agent {a}": p for a, p in registry.agents.items()},
        **{f"operator {o}": p for o, p in registry.operators.items()},
        **{f"headless {h}": p for h, p in registry.headless.items()},
        **{f"admin {a}": p for a, p in registry.admins.items()},
    }
    lines = [
        "# Generated by `fleet ops server-config`: least-privilege permissions per principal.",
        "# Only these keys may connect. Regenerate whenever the registry changes.",
        "authorization {",
        "  users: [",
    ]
    by_role = {(role, name): perms for role, name, perms in permissions(registry)}
    for label, principal in keys.items():
        if principal is None:
            continue
        role, _, name = label.partition(" ")
        perms = by_role[(role, name or "master")]
        lines.append(f"    # {label}")
        lines.append(f'    {{ nkey: "{principal.public_key}", permissions: {_conf(perms)} }}')
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"
