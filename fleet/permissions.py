"""``fleet ops server-config``: least-privilege nats-server permissions from a registry.

Every principal connects with its nkey and may publish and subscribe only what its role
needs. Replies go to a per-principal inbox (``_INBOX_<id>``), never the shared
``_INBOX.>``, so no one can read another's replies. Connections with other keys are
refused, because only the keys listed here are users of the server.

The subjects below are the ones each component really uses (read off a traced server):
an agent hears only its own job subjects live, catches up only through its own
short-lived consumer pinned to them, reads single events only by subject within its
own job subjects (direct get), and publishes only its own events, output and presence.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bus import Subjects, UsageError
from bus.codec import DEFAULT_MAX_SIZE
from bus.paths import read_toml
from bus.subjects import (
    consumer_delete_subject,
    consumer_info_subject,
    consumer_next_subject,
)
from schemas.fields import PublicKey
from schemas.registry import summarize_validation_error


class Principal(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    public_key: PublicKey


class Site(BaseModel):
    """A remote site: its leaf server's key at the hub, and the agents behind it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    public_key: PublicKey
    agents: list[str] = Field(default_factory=list)


class Registry(BaseModel):
    """Who may connect, by role. Names are principal ids (agent ids, user names)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    prefix: str = "fleet"
    master: Principal | None = None
    agents: dict[str, Principal] = Field(default_factory=dict)
    operators: dict[str, Principal] = Field(default_factory=dict)
    admins: dict[str, Principal] = Field(default_factory=dict)
    headless: dict[str, Principal] = Field(default_factory=dict)
    sites: dict[str, Site] = Field(default_factory=dict)
    """Sites whose agents reach the hub through a leaf node (see :mod:`fleet.leafsite`)."""


def load_registry(path: Path) -> Registry:
    """Raises: UsageError for a missing or invalid registry."""
    try:
        return Registry.model_validate(read_toml(path))
    except ValidationError as exc:
        raise UsageError(f"{path}: invalid registry: {summarize_validation_error(exc)}") from None


def inbox_prefix(principal: str) -> str:
    """Where a principal's replies arrive; its permissions allow no other inbox."""
    return f"_INBOX_{principal}"


def _stream_reader(s: Subjects) -> list[str]:
    """Reading streams by subject: stream info, single messages, flow control."""
    return [
        "$JS.API.INFO",
        "$JS.API.STREAM.NAMES",
        "$JS.API.STREAM.INFO.>",
        "$JS.API.DIRECT.GET.>",
        "$JS.API.STREAM.MSG.GET.>",
        "$JS.FC.>",
    ]


def _consumer_reader(s: Subjects) -> list[str]:
    """Short-lived consumers for reading, never an agent's (see `_agents_consumers`).

    On the event log only the form that names the consumer and pins its one filter
    (``CREATE.<stream>.<name>.<filter>``): the unnamed ``CREATE.<stream>`` takes the
    consumer's name from the request body, so through it anyone could take an agent's
    catch-up consumer. Elsewhere (output, buckets) no consumer is anyone's queue, and
    nats-py's ordered consumers use the unnamed form. No ``DELETE``: ephemeral consumers
    go away by themselves once idle.
    """
    others = [s.output_stream, f"KV_{s.presence_bucket}", f"KV_{s.config_bucket}"]
    others += [f"KV_{s.tokens_bucket}", f"KV_{s.locks_bucket}", f"OBJ_{s.bundles_bucket}"]
    others.append(f"OBJ_{s.snapshots_bucket}")
    return [
        f"$JS.API.CONSUMER.CREATE.{s.events_stream}.*.>",
        *(f"$JS.API.CONSUMER.CREATE.{stream}" for stream in others),
        *(f"$JS.API.CONSUMER.CREATE.{stream}.*.>" for stream in others),
        "$JS.API.CONSUMER.INFO.*.*",
        "$JS.API.CONSUMER.MSG.NEXT.*.*",
    ]


def _agents_consumers(s: Subjects, agents: list[str]) -> list[str]:
    """Every API subject that touches an agent's catch-up consumer: denied to every role
    but the agent itself and the admin (a deny wins over any allow)."""
    events = s.events_stream
    out = []
    for agent in agents:
        name, _ = s.agent_catchup(agent)
        out += [
            f"$JS.API.CONSUMER.CREATE.{events}.{name}",
            f"$JS.API.CONSUMER.CREATE.{events}.{name}.>",
            f"$JS.API.CONSUMER.DURABLE.CREATE.{events}.{name}",
            consumer_delete_subject(events, name),
            consumer_next_subject(events, name),
            f"$JS.API.CONSUMER.PAUSE.{events}.{name}",
            f"$JS.API.CONSUMER.RESET.{events}.{name}",
            f"$JS.API.CONSUMER.UNPIN.{events}.{name}",
            f"$JS.API.CONSUMER.LEADER.STEPDOWN.{events}.{name}",
            f"$JS.ACK.{events}.{name}.>",
        ]
    return out


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


# What each headless principal may ask the master, naming itself as the caller.
HEADLESS_MASTER_OPS = ("auth-salt", "auth-start", "auth-submit", "job-output", "agent-state")

Permissions = dict[str, object]


def _agent(s: Subjects, agent: str) -> Permissions:
    p, events = s.prefix, s.events_stream
    name, _ = s.agent_catchup(agent)
    consumer_api = [
        # Only the subject that pins the filter: the server refuses a body asking for
        # any other, so the agent cannot widen its catch-up to others' events.
        s.agent_catchup_create(agent),
        consumer_info_subject(events, name),
        consumer_next_subject(events, name),
        consumer_delete_subject(events, name),
    ]
    return {
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
                # Its own jobs, live: what the log stores there is heard here too.
                *s.agent_job_filters(agent),
                f"{p}.ctl.{agent}.*",
                f"$KV.{s.config_bucket}.release.>",
                f"$KV.{s.config_bucket}.update.>",
            ]
        },
        "allow_responses": True,
    }


def _master(s: Subjects, agents: list[str]) -> Permissions:
    p = s.prefix
    return {
        "publish": {
            "allow": [
                *_stream_reader(s),
                *_consumer_reader(s),
                "$JS.ACK.>",
                f"$KV.{s.config_bucket}.>",
                # The master lease and each master's presence (see master.leadership).
                f"$KV.{s.locks_bucket}.master.>",
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
            ],
            "deny": _agents_consumers(s, agents),
        },
        "subscribe": {
            "allow": [
                f"{inbox_prefix('master')}.>",
                s.master_control_all,
                s.master_control_by_all,
            ]
        },
        "allow_responses": True,
    }


def _operator(s: Subjects, name: str, agents: list[str]) -> Permissions:
    p = s.prefix
    return {
        "publish": {
            "allow": [
                *_stream_reader(s),
                *_consumer_reader(s),
                f"{p}.evt.job.*.*.submitted",
                f"{p}.evt.job.*.*.cancel_requested",
                # Agent control and the master's queries; not the requests that name a
                # headless caller (`<prefix>.ctl.master.<op>.<caller>`): one more token.
                f"{p}.ctl.*.*",
                # fleet update: bundles, settings and their events.
                f"$O.{s.bundles_bucket}.>",
                f"$KV.{s.config_bucket}.>",
                f"{p}.evt.update.*.published",
                f"{p}.evt.update.*.announced",
                f"{p}.evt.settings.changed",
            ],
            "deny": _agents_consumers(s, agents),
        },
        "subscribe": {"allow": [f"{inbox_prefix(name)}.>"]},
    }


def _headless(s: Subjects, name: str) -> Permissions:
    """A batch client: submits jobs, holds locks, asks the master (as itself) for the
    logins and for its own jobs' results. It reads nothing of the log by itself."""
    p, locks = s.prefix, f"KV_{s.locks_bucket}"
    return {
        "publish": {
            "allow": [
                f"{p}.evt.job.*.*.submitted",
                f"$JS.API.STREAM.INFO.{locks}",
                f"$JS.API.STREAM.MSG.GET.{locks}",
                f"$JS.API.DIRECT.GET.{locks}.>",
                f"$KV.{s.locks_bucket}.>",
                *(s.master_control_by(op, name) for op in HEADLESS_MASTER_OPS),
            ],
            # Locks are the clients' to share, but ``master.>`` is the masters' alone: a
            # client holding the master lease would leave the fleet without a master.
            "deny": [f"$KV.{s.locks_bucket}.master.>"],
        },
        "subscribe": {"allow": [f"{inbox_prefix(name)}.>"]},
    }


def permissions(registry: Registry) -> list[tuple[str, str, Permissions]]:
    """``(role, id, permissions)`` for every principal."""
    s = Subjects(registry.prefix)
    agents = list(registry.agents)
    out: list[tuple[str, str, Permissions]] = [("agent", a, _agent(s, a)) for a in agents]
    if registry.master is not None:
        out.append(("master", "master", _master(s, agents)))
    out += [("operator", n, _operator(s, n, agents)) for n in registry.operators]
    out += [("headless", n, _headless(s, n)) for n in registry.headless]
    # Administration (`fleet ops init`, stream and consumer repair, audit): everything.
    out += [
        ("admin", n, {"publish": {"allow": [">"]}, "subscribe": {"allow": [">"]}})
        for n in registry.admins
    ]
    return out


def conf_value(value: object) -> str:
    """``value`` in nats-server's config syntax (strings quoted, lists, maps)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(conf_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k}: {conf_value(v)}" for k, v in value.items()) + " }"
    return f'"{value}"'


def user_line(public_key: str, perms: Permissions, **extra: object) -> str:
    """One ``users`` entry of an ``authorization`` block."""
    more = "".join(f", {k}: {conf_value(v)}" for k, v in extra.items())
    return f'    {{ nkey: "{public_key}", permissions: {conf_value(perms)}{more} }}'


def render(
    registry: Registry, *, max_payload: int = DEFAULT_MAX_SIZE, extra_users: list[str] | None = None
) -> str:
    """The ``authorization`` block for nats-server (include it from the server config),
    with the server's ``max_payload``: nats-server limits payloads per server or per
    account, not per user, and every principal shares the one account that holds the
    streams, so one limit applies to all (agents' events are bounded by their schema)."""
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
        f"max_payload: {max_payload}",
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
        lines.append(user_line(principal.public_key, perms))
    lines += [*(extra_users or []), "  ]", "}"]
    return "\n".join(lines) + "\n"
