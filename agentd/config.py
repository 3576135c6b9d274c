"""The agent's configuration: one pydantic model, read from TOML, written back with comments.

The model is the single source of the keys, their defaults and their documentation:
``fleet-agentd -C`` renders it as commented TOML, ``-U`` appends the keys a newer version
introduced to an existing file without touching what the user wrote.
"""

from __future__ import annotations

import json
import os
import re
import socket
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agentd.jobenv import check_env_names
from bus import ConnectSettings, UsageError
from bus.command import LogLevel
from bus.connection import default_server
from bus.paths import anchored, config_file, data_dir, read_toml
from bus.subjects import DEFAULT_PREFIX
from schemas import ids
from schemas.fields import Labels
from schemas.registry import summarize_validation_error


def default_config_path() -> Path:
    """Where the configuration is looked for when ``-c`` is not given."""
    return config_file("agentd.toml")


def default_data_dir() -> Path:
    return data_dir("agent")


def default_agent_id() -> str:
    """The short host name, if it is a valid agent id."""
    return socket.gethostname().split(".")[0]


class ModuleSpec(BaseModel):
    """A pre-approved command an operator may run by name (``fleet run -m NAME``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    argv: list[str] = Field(min_length=1, description="the command and its fixed arguments")
    allow_args: bool = Field(default=False, description="whether the operator may append arguments")
    description: str = Field(default="", description="what the module does, for operators")
    env: list[str] = Field(
        default_factory=list,
        description="environment variables a request may set for this module (never "
        "loader, shell start-up, interpreter or search-path variables)",
    )

    @field_validator("env")
    @classmethod
    def _allowed_names(cls, value: list[str]) -> list[str]:
        return check_env_names(value)


class AgentConfig(BaseModel):
    """Everything ``fleet-agentd`` reads from its config file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(
        default_factory=default_agent_id,
        description="this agent's identity on the bus; default: the short host name",
    )
    server: str = Field(
        default_factory=default_server,
        description="NATS server URL; several, comma-separated, for a cluster "
        "(default: $FLEET_SERVER, else the local server)",
    )
    jetstream_domain: str | None = Field(
        default_factory=lambda: os.environ.get("FLEET_JS_DOMAIN") or None,
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description='the hub\'s JetStream domain (e.g. "hub"), for an agent at a site '
        "whose server is a leaf node of the hub (ops/nats/leaf-site.conf); not set: the "
        "server it connects to has the JetStream (default: $FLEET_JS_DOMAIN)",
    )
    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="journal, identity key, pid file and job scratch space",
    )
    nkey_file: Path | None = Field(
        default=None,
        description="this agent's nkey seed (mode 0400); default: agent.nk in data_dir, "
        "created on first start",
    )
    labels: Labels = Field(
        default_factory=dict, description="key/value labels operators can target (-l k=v)"
    )
    max_jobs: int = Field(default=4, ge=1, le=1024, description="jobs run at the same time")
    auto_update: bool = Field(
        default=True, description="whether this agent may update itself to the fleet's target"
    )
    run_as_mode: Literal["root", "self"] = Field(
        default="self",
        description="'self': every job runs as the agent's own user; 'root': a job runs as "
        "the user it asks for if its trust grant allows it (users, or password_users and PAM)",
    )
    default_run_as: str = Field(
        default="nobody",
        description="root mode: the user a job that names none runs as (a grant naming "
        "root runs it as root instead); empty: such jobs are refused",
    )
    pam_service: str = Field(
        default="fleet-agentd",
        description="the PAM service (/etc/pam.d/NAME) that checks run-as passwords in root mode",
    )
    trust_file: Path | None = Field(
        default=None,
        description="which operator keys may run which modules or commands, as which users, "
        "with which environment, and call which control operations; without one, the "
        "agent runs no job and answers no control request",
    )
    replay_window_s: float = Field(
        default=300.0,
        gt=0,
        description="a request stored this long after it was signed is refused as a replay",
    )
    heartbeat_s: float = Field(
        default=5.0,
        gt=0,
        le=60,
        description="seconds between presence heartbeats (at most 7.5: half the "
        "presence entries' 15 s lifetime, or the agent looks offline between beats)",
    )
    job_kill_grace_s: float = Field(
        default=5.0,
        ge=0,
        description="seconds between SIGTERM and SIGKILL when a job times out or is cancelled",
    )
    shutdown_grace_s: float = Field(
        default=30.0,
        ge=0,
        description="on SIGTERM, seconds running jobs may finish before they are abandoned",
    )
    max_output_bytes: int = Field(
        default=16 * 1024 * 1024,
        ge=0,
        description="output streamed per job; beyond it, a marker and a byte count",
    )
    output_tail_bytes: int = Field(
        default=4096, ge=0, le=65536, description="output kept in the job's finished event"
    )
    log_level: LogLevel = Field(
        default="INFO", description="TRACE, DEBUG, INFO, WARN (or WARNING) or ERROR"
    )
    log_file: Path | None = Field(
        default=None, description="log here instead of stderr (default with -d: data_dir)"
    )
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="text, or json: one object per line with time, level, logger, message, ids",
    )
    metrics_listen: str = Field(
        default="",
        description="HOST:PORT for /metrics, /healthz and /readyz (e.g. 127.0.0.1:9465); "
        "empty: off",
    )
    pid_file: Path | None = Field(
        default=None, description="pid file for -d/-K/-Q; default: agentd.pid in data_dir"
    )
    prefix: str = Field(default=DEFAULT_PREFIX, description="subject prefix of the fleet")
    tls_ca: Path | None = Field(default=None, description="CA bundle to verify the server")
    tls_cert: Path | None = Field(default=None, description="client certificate for TLS")
    tls_key: Path | None = Field(default=None, description="client key for TLS")
    release_keys: list[str] = Field(
        default_factory=list,
        description="public nkeys of the release signers whose update bundles this agent "
        "accepts (fleet keys gen release NAME); empty: no self-update",
    )
    update_rate_bytes_s: int = Field(
        default=0,
        ge=0,
        description="limit bundle downloads to this many bytes per second; 0: no limit",
    )
    version: str | None = Field(
        default=None,
        description="report this version instead of the installed one (tests, staging)",
    )
    modules: dict[str, ModuleSpec] = Field(
        default_factory=dict,
        description="pre-approved commands by name: [modules.NAME] argv = [...]",
    )

    @field_validator("id")
    @classmethod
    def _valid_id(cls, value: str) -> str:
        problem = ids.agent_id_problem(value)
        if problem is not None:
            raise ValueError(f"{problem}; set `id` in the config file")
        return value

    @field_validator("default_run_as")
    @classmethod
    def _valid_user(cls, value: str) -> str:
        if value and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?", value):
            raise ValueError(f"{value!r} is not a user name")
        return value

    @field_validator("prefix")
    @classmethod
    def _valid_prefix(cls, value: str) -> str:
        problem = ids.token_problem(value, "prefix")
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("modules")
    @classmethod
    def _valid_modules(cls, value: dict[str, ModuleSpec]) -> dict[str, ModuleSpec]:
        for name in value:
            problem = ids.token_problem(name, "module name")
            if problem is not None:
                raise ValueError(problem)
        return value

    @field_validator("release_keys")
    @classmethod
    def _valid_release_keys(cls, value: list[str]) -> list[str]:
        for key in value:
            if not re.fullmatch(r"[A-Z2-7]{56}", key):
                raise ValueError(f"{key!r} is not a public nkey (56 characters, e.g. U…)")
        return value

    # --- derived paths -------------------------------------------------------------------

    @property
    def key_path(self) -> Path:
        return self.nkey_file or self.data_dir / "agent.nk"

    @property
    def pid_path(self) -> Path:
        return self.pid_file or self.data_dir / "agentd.pid"

    @property
    def journal_path(self) -> Path:
        return self.data_dir / "journal.jsonl"

    @property
    def seals_path(self) -> Path:
        return self.data_dir / "seals.jsonl"

    @property
    def cursor_path(self) -> Path:
        """Where the agent's next catch-up starts (see :mod:`agentd.cursor`)."""
        return self.data_dir / "catchup.seq"

    def connect_settings(self) -> ConnectSettings:
        """How this agent reaches the bus: its own key, its own connection name."""
        return ConnectSettings(
            servers=[s.strip() for s in self.server.split(",") if s.strip()],
            name=f"fleet-agentd {self.id}",
            prefix=self.prefix,
            nkey_file=self.key_path,
            inbox_prefix=f"_INBOX_{self.id}",
            tls_ca=self.tls_ca,
            tls_cert=self.tls_cert,
            tls_key=self.tls_key,
            js_domain=self.jetstream_domain,
        )


def load_config(path: Path | None, overrides: dict[str, Any] | None = None) -> AgentConfig:
    """Read and validate a config file; a missing default file means all defaults.

    Raises:
        UsageError: the file is unreadable, not TOML, or has invalid or unknown keys.
    """
    raw = read_toml(path, f" (create one with -C {path})") if path is not None else {}
    raw.update(overrides or {})
    try:
        config = AgentConfig.model_validate(raw)
    except ValidationError as exc:
        where = f"{path}: " if path else ""
        raise UsageError(f"{where}invalid config: {summarize_validation_error(exc)}") from None
    return anchored(config, path) if path is not None else config


# --- writing commented TOML -------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # JSON string escapes are valid TOML basic strings
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _comment(text: str) -> list[str]:
    return [f"# {line}" for line in text.splitlines()]


def _key_block(name: str, info: Any, value: Any) -> list[str]:
    lines = _comment(info.description or name)
    if value is None:
        lines.append(f"# {name} = (not set)")
    elif isinstance(value, dict):
        return []  # written as a table
    else:
        lines.append(f"{name} = {_toml_value(value)}")
    return lines


def _table_block(name: str, info: Any, value: dict[str, Any]) -> list[str]:
    lines = ["", *_comment(info.description or name), f"[{name}]"]
    if name == "modules":
        if not value:
            lines += [
                "# [modules.backup]",
                '# argv = ["/usr/local/sbin/backup", "--all"]',
                "# allow_args = false",
                '# description = "nightly backup"',
                '# env = ["BACKUP_LEVEL"]  # variables a request may set for this module',
            ]
        for mod_name, spec in value.items():
            lines.append(f"[modules.{mod_name}]")
            for key, v in spec.model_dump().items():
                lines.append(f"{key} = {_toml_value(v)}")
        return lines
    if not value:
        lines.append('# role = "web"')
    for key, v in value.items():
        lines.append(f"{key} = {_toml_value(v)}")
    return lines


def render_config(config: AgentConfig | None = None) -> str:
    """The config as commented TOML: every key, its documentation and its value."""
    config = config or AgentConfig()
    values = config.model_dump()
    head = [
        "# fleet-agentd configuration. Every key is optional; shown with its default or",
        "# current value. Reload with SIGHUP (id, server and data_dir need a restart).",
        "",
    ]
    body: list[str] = []
    tables: list[str] = []
    for name, info in AgentConfig.model_fields.items():
        value = values[name]
        if isinstance(value, dict):
            tables += _table_block(name, info, value)
        else:
            body += [*_key_block(name, info, value), ""]
    return "\n".join(head + body + tables).rstrip() + "\n"


def update_config_text(text: str) -> tuple[str, list[str]]:
    """Add the keys this version knows that ``text`` lacks, keeping everything it has.

    The user's values, comments and order stay as they are: new top-level keys go before
    the first table, new tables at the end.

    Returns:
        The new text and the names of the keys added.

    Raises:
        UsageError: ``text`` is not valid TOML.
    """
    try:
        present = set(tomllib.loads(text))
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"not valid TOML: {exc}") from None
    # A key written commented out (`# nkey_file = …`) was seen and left unset on purpose.
    present |= set(re.findall(r"^\s*#\s*([a-z_]+)\s*=", text, re.M))
    # `id` is never added (its default is the host name, which the user chose not to fix).
    values = AgentConfig(id="placeholder").model_dump()
    added: list[str] = []
    keys: list[str] = []
    tables: list[str] = []
    for name, info in AgentConfig.model_fields.items():
        if name in present or name == "id":
            continue
        added.append(name)
        if isinstance(values[name], dict):
            tables += _table_block(name, info, values[name])
        else:
            keys += ["", *_key_block(name, info, values[name])]
    if not added:
        return text, []
    lines = text.rstrip("\n").splitlines()
    first_table = next(
        (i for i, line in enumerate(lines) if line.lstrip().startswith("[")), len(lines)
    )
    gap = [""] if first_table < len(lines) else []
    merged = lines[:first_table] + keys + gap + lines[first_table:] + tables
    return "\n".join(merged).strip("\n") + "\n", added
