"""The master's configuration: its settings and the registry of configured agents.

After Kernun icamd: the file lists every agent the fleet should have, with its public
nkey and labels; ``fleet-master hash`` prints a hash of the whole configuration, so a
deployment tool can tell whether the running master has what it shipped.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from bus import ConnectSettings, UsageError
from bus.command import LogLevel
from bus.connection import default_server
from bus.httpd import Listen
from bus.paths import anchored, config_file, data_dir, read_toml
from bus.subjects import DEFAULT_PREFIX
from ledger.policy import Principals, Role, Speaker
from schemas import ids
from schemas.fields import Labels, PublicKey
from schemas.registry import summarize_validation_error

DEFAULT_METRICS_LISTEN = "127.0.0.1:9464"
"""Loopback: Prometheus scrapes through a local agent or a tunnel unless told otherwise."""


def default_config_path() -> Path:
    """Where the configuration is looked for when ``-c`` is not given."""
    return config_file("master.toml")


def default_data_dir() -> Path:
    return data_dir("master")


_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def default_name() -> str:
    """This machine's short host name, as a master name (other characters become ``-``)."""
    host = socket.gethostname().split(".", 1)[0]
    return re.sub(r"[^A-Za-z0-9_-]", "-", host)[:64] or "master"


class Principal(BaseModel):
    """A configured identity: its public key and, for agents, its labels."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    public_key: PublicKey
    labels: Labels = Field(default_factory=dict)
    previous_keys: tuple[PublicKey, ...] = Field(
        default=(),
        description="keys held before a rotation: events signed with them still verify",
    )


class MasterConfig(BaseModel):
    """Everything ``fleet-master`` reads from its config file."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str = Field(default="master", description="the master's principal id")
    name: str = Field(
        default_factory=default_name,
        description="this master among its standbys (default: the host name); "
        "letters, digits, _ and -",
    )
    lease_ttl_s: int = Field(
        default=10,
        ge=3,
        le=300,
        description="the active master's lease: a standby takes over at most this long "
        "(and a few seconds) after the active one died; the active one stops acting "
        "before its lease could expire unrenewed",
    )
    server: str = Field(
        default_factory=default_server,
        description="NATS server URL(s), comma-separated (default: $FLEET_SERVER, else local)",
    )
    prefix: str = Field(default=DEFAULT_PREFIX, description="subject prefix of the fleet")
    data_dir: Path = Field(
        default_factory=default_data_dir, description="key, pid file, log, witness file"
    )
    nkey_file: Path | None = Field(default=None, description="the master's nkey seed (0400)")
    previous_keys: tuple[PublicKey, ...] = Field(
        default=(),
        description="the master's public keys before a key rotation: the events it signed "
        "with them still verify (keep each for as long as its events must)",
    )
    tls_ca: Path | None = Field(default=None, description="CA bundle to verify the server")
    tls_cert: Path | None = Field(default=None, description="client certificate for TLS")
    tls_key: Path | None = Field(default=None, description="client key for TLS")
    snapshot_every: int = Field(default=10_000, ge=1, description="snapshot after N events")
    snapshot_interval_s: float = Field(default=300.0, gt=0, description="or after T seconds")
    checkpoint_every: int = Field(
        default=100,
        ge=1,
        description="sign a checkpoint of the log's hash chain after N events: events after "
        "the newest checkpoint are what `fleet audit --verify` reports as unanchored",
    )
    checkpoint_interval_s: float = Field(
        default=10.0,
        gt=0,
        description="or T seconds after the first event it does not cover yet (never when idle)",
    )
    offline_grace_s: float = Field(
        default=60.0, ge=0, description="an agent offline this long has its jobs abandoned"
    )
    hash_file: Path | None = Field(default=None, description="write the config hash here")
    users_file: Path | None = Field(
        default=None, description="headless users (default: users.json in data_dir)"
    )
    auth_throttle_s: float = Field(
        default=1.0,
        gt=0,
        description="pause after 3 failed headless logins of a user from one caller; "
        "doubles per failure, at most 300 s",
    )
    log_level: LogLevel = Field(
        default="INFO", description="TRACE, DEBUG, INFO, WARN (or WARNING) or ERROR"
    )
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="text, or json: one object per line with time, level, logger, message, ids",
    )
    log_file: Path | None = None
    pid_file: Path | None = None
    metrics_listen: str = Field(
        default=DEFAULT_METRICS_LISTEN,
        description="HOST:PORT for /metrics, /healthz and /readyz; empty: off",
    )
    web_listen: str = Field(
        default="",
        description="HOST:PORT of the read-only status page (no host: 127.0.0.1); empty: off. "
        "Beyond loopback it needs web_tls_cert, web_tls_key and web_token_file",
    )
    web_tls_cert: Path | None = Field(default=None, description="the status page's certificate")
    web_tls_key: Path | None = Field(default=None, description="the status page's key")
    web_token_file: Path | None = Field(
        default=None, description="file (mode 0600) holding the status page's access token"
    )
    agents: dict[str, Principal] = Field(default_factory=dict, description="[agents.ID]")
    operators: dict[str, Principal] = Field(default_factory=dict, description="[operators.NAME]")
    headless: dict[str, Principal] = Field(
        default_factory=dict,
        description="[headless.NAME]: users whose fleet-headless -a nkey jobs they sign themselves",
    )

    @field_validator("agents")
    @classmethod
    def _agent_ids(cls, value: dict[str, Principal]) -> dict[str, Principal]:
        for agent in value:
            problem = ids.agent_id_problem(agent)
            if problem:
                raise ValueError(problem)
        return value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"name {value!r}: use 1 to 64 letters, digits, _ or -")
        return value

    @field_validator("metrics_listen", "web_listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        if value.strip():
            try:
                Listen.parse(value)
            except UsageError as exc:
                raise ValueError(str(exc)) from None
        return value.strip()

    @model_validator(mode="after")
    def _web_safety(self) -> MasterConfig:
        if (self.web_tls_cert is None) != (self.web_tls_key is None):
            raise ValueError("web_tls_cert and web_tls_key go together")
        if self.web_listen and not Listen.parse(self.web_listen).loopback:
            missing = [
                key
                for key in ("web_tls_cert", "web_tls_key", "web_token_file")
                if getattr(self, key) is None
            ]
            if missing:
                raise ValueError(
                    f"web_listen {self.web_listen} is reachable beyond this machine: "
                    f"it needs TLS and a token; set {', '.join(missing)}"
                )
        return self

    @property
    def key_path(self) -> Path:
        return self.nkey_file or self.data_dir / "master.nk"

    @property
    def pid_path(self) -> Path:
        return self.pid_file or self.data_dir / "master.pid"

    @property
    def users_path(self) -> Path:
        return self.users_file or self.data_dir / "users.json"

    def connect_settings(self) -> ConnectSettings:
        return ConnectSettings(
            servers=[s.strip() for s in self.server.split(",") if s.strip()],
            name="fleet-master",
            prefix=self.prefix,
            nkey_file=self.key_path,
            inbox_prefix="_INBOX_master",
            tls_ca=self.tls_ca,
            tls_cert=self.tls_cert,
            tls_key=self.tls_key,
        )

    def trusted_keys(self) -> dict[str, str]:
        """Public key → principal, for checking who signed what."""
        keys = {p.public_key: agent for agent, p in self.agents.items()}
        keys.update({p.public_key: name for name, p in self.operators.items()})
        keys.update({p.public_key: name for name, p in self.headless.items()})
        return keys

    def principals(self, master_key: str | None = None, *, strict: bool = False) -> Principals:
        """The registry :mod:`ledger.policy` checks events against.

        Args:
            master_key: the master's public key, when known.
            strict: refuse every signer the configuration does not name.
        """
        return Principals(
            master_id=self.id,
            # After a rotation the master's earlier events carry its earlier keys.
            master_keys=frozenset({master_key} if master_key else ()) | set(self.previous_keys),
            agents={a: p.public_key for a, p in self.agents.items()},
            operators={n: p.public_key for n, p in self.operators.items()},
            headless={n: p.public_key for n, p in self.headless.items()},
            strict=strict,
            prefix=self.prefix,
            previous=self._previous_keys(),
        )

    def _previous_keys(self) -> dict[str, Speaker]:
        tables: tuple[tuple[Role, dict[str, Principal]], ...] = (
            ("agent", self.agents),
            ("operator", self.operators),
            ("headless", self.headless),
        )
        return {
            key: Speaker(role, name)
            for role, table in tables
            for name, principal in table.items()
            for key in principal.previous_keys
        }

    def config_hash(self) -> str:
        """sha256 of the configuration's canonical JSON (defaults included)."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def load_master_config(path: Path | None) -> MasterConfig:
    """Read and validate; no file means every default.

    Raises:
        UsageError: unreadable, not TOML, or invalid.
    """
    raw: dict[str, Any] = read_toml(path) if path is not None else {}
    try:
        config = MasterConfig.model_validate(raw)
    except ValidationError as exc:
        raise UsageError(f"{path}: invalid config: {summarize_validation_error(exc)}") from None
    return anchored(config, path) if path is not None else config
