"""Shapes of self-update: the bundle manifest and the fleet's update settings.

The settings live in KV ``fleet-config``, one JSON value per key, so an operator can read
them with ``nats kv get`` and a reader of an older version skips keys it does not know.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from schemas.fields import AgentId, EventId, PrincipalId, PublicKey

Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Version = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._+-]+$")]
BundlePath = Annotated[str, Field(pattern=r"^[A-Za-z0-9._+-]+(/[A-Za-z0-9._+-]+)*$")]
"""A relative path inside a bundle: no ``..``, no absolute paths, no odd characters."""


def _check_purge_glob(value: str) -> str:
    if any(part in (".", "..") for part in value.split("/")):
        raise ValueError(f"{value!r}: a purge glob stays inside data_dir (no '.' or '..')")
    return value


PurgeGlob = Annotated[
    str,
    Field(max_length=256, pattern=r"^[A-Za-z0-9._+*?!\[\]-]+(/[A-Za-z0-9._+*?!\[\]-]+)*$"),
    AfterValidator(_check_purge_glob),
]
"""A glob relative to the agent's ``data_dir`` (``fnmatch``: ``*``, ``?``, ``[…]``), matched
against each path under it; no ``..``, no absolute paths."""


class BundleManifest(BaseModel):
    """What a bundle holds and how to install it. Signed by a release key."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    format: Literal[1] = 1
    name: Literal["fleetbus"] = "fleetbus"
    version: Version
    build: str = Field(max_length=128, description="e.g. the source commit")
    created_ns: int = Field(ge=0)
    python_requires: str = Field(max_length=64, description="e.g. '>=3.11'")
    requires: list[Annotated[str, Field(max_length=256)]] = []
    """The fleetbus wheel's dependencies (PEP 508); those not bundled must be installed."""
    files: dict[BundlePath, Sha256]
    """Every other member of the bundle (wheels), with its SHA-256."""
    purge: list[PurgeGlob] = []
    """Globs under the agent's data_dir that this version no longer wants, removed once
    it is healthy (never before: a rollback must find them)."""

    def canonical(self) -> bytes:
        """The exact bytes that are signed."""
        return json.dumps(
            self.model_dump(mode="json"), sort_keys=True, separators=(",", ":")
        ).encode()


class BundleSignature(BaseModel):
    """The detached signature over :meth:`BundleManifest.canonical`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    release_key: PublicKey
    sig: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+={0,2}$", max_length=200)]
    """base64url of the ed25519 signature."""


class ReleaseTarget(BaseModel):
    """``release.target``: the version every agent should run, set by ``fleet update announce``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    version: Version
    object_name: str = Field(max_length=255)
    sha256: Sha256
    size: int = Field(ge=0)
    announcement: EventId
    """The ``update.announced`` event's id: a failure is remembered per announcement."""
    canaries: list[AgentId] = []
    max_failures: int = Field(default=0, ge=0)
    allow_downgrade: bool = False
    announced_by: PrincipalId


Stage = Literal["canary", "all", "halted"]


class RolloutStage(BaseModel):
    """``release.stage``: which agents of the target's rollout may start updating."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    version: Version
    stage: Stage


class UpdateSettings(BaseModel):
    """Every update setting, with its default when the key is absent."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    target: ReleaseTarget | None = None
    stage: RolloutStage | None = None
    enabled: bool = True
    """``update.enabled``: the fleet-wide switch (``fleet update disable|enable``)."""
    paused: bool = False
    """``update.paused``: no agent starts an update (``fleet update pause|resume``)."""
    max_concurrent: int = Field(default=5, ge=0, le=10_000)
    """``update.max_concurrent``: download slots; 0 refuses every download."""
    retry_after_s: float = Field(default=10.0, gt=0, le=3600)
    """``update.retry_after_s``: how long an agent without a slot waits (plus jitter)."""

    def stage_of(self, version: str) -> Stage:
        """The stage of ``version``'s rollout ("all" unless the master said otherwise)."""
        if self.stage is not None and self.stage.version == version:
            return self.stage.stage
        if self.target is not None and self.target.version == version and self.target.canaries:
            return "canary"
        return "all"


SETTING_KEYS: dict[str, str] = {
    "release.target": "target",
    "release.stage": "stage",
    "update.enabled": "enabled",
    "update.paused": "paused",
    "update.max_concurrent": "max_concurrent",
    "update.retry_after_s": "retry_after_s",
}
"""KV key → :class:`UpdateSettings` field."""


def parse_settings(entries: Mapping[str, bytes | None]) -> tuple[UpdateSettings, list[str]]:
    """Build the settings from KV entries; returns them and a problem per bad key.

    A bad value is reported and its default used: one corrupt key must not stop every
    agent from reading the rest.
    """
    values: dict[str, Any] = {}
    problems: list[str] = []
    for key, raw in entries.items():
        field = SETTING_KEYS.get(key)
        if field is None or raw is None or raw == b"":
            continue
        try:
            value = json.loads(raw)
            UpdateSettings.model_validate({field: value})
        except (ValueError, ValidationError) as exc:
            problems.append(f"{key}: {str(exc).splitlines()[0]}")
            continue
        values[field] = value
    return UpdateSettings.model_validate(values), problems


def encode_setting(value: BaseModel | str | int | float | bool) -> bytes:
    """A setting's KV value: JSON."""
    if isinstance(value, BaseModel):
        return value.model_dump_json().encode()
    return json.dumps(value).encode()
