"""The agent's own trust file: which keys may run what here, as whom, and control it.

After the ``authorized_keys`` idea of JAMS's PUBLIC-KEY option. The agent decides: a
master cannot grant itself rights, because only this file (on this machine) says what
the master's key may do, including for which headless users it may submit::

    # /etc/fleetbus/trust.toml
    [[grant]]
    name = "alice"
    key = "UABC…"                 # an operator's public key
    commands = true              # arbitrary argv and scripts
    modules = ["*"]              # module names (globs)
    users = ["deploy", "www-*"]  # OS users it may run as by this key alone (globs)
    password_users = ["*"]       # OS users it may run as with their password (PAM)
    env = ["APP_*", "LANG"]      # environment variables its requests may set (globs)
    control = ["status", "log"]  # agent control operations it may call ("*": all)

    [[grant]]
    name = "master"
    key = "UDEF…"                 # the master, submitting for headless users
    modules = ["backup"]
    on_behalf_of = ["batch"]     # the headless users it may speak for

Every request must be signed by a granted key and fit its grant; anything else ends
``rejected`` with the reason, and nothing runs. An agent without a trust file runs
nothing. The decisions are pure functions of the grant and the request (:func:`refusal`,
:func:`resolve_identity`, :func:`control_refusal`), so they are tested without a server.

Globs never match ``root``: a grant runs as root only if it names ``root`` itself. A
trust file that lists a variable the agent never takes from a request (``LD_PRELOAD``,
``PATH``…; see :mod:`agentd.jobenv`) is refused as a whole, so a mistake is loud.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agentd.jobenv import check_env_names, never_from_request
from bus import UsageError
from bus.paths import read_toml
from schemas import Envelope, JobRequest, JobSubmitted, ModuleCommand
from schemas.fields import PublicKey
from schemas.registry import summarize_validation_error

CONTROL_OPS = ("status", "config-get", "config-set", "log", "restart")
"""The agent's control operations, each granted separately."""

RunAsMode = Literal["root", "self"]


class Grant(BaseModel):
    """What one key may do on this agent."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    key: PublicKey
    name: str = ""
    commands: bool = False
    modules: list[str] = Field(default_factory=list)
    users: list[str] = Field(default_factory=list)
    password_users: list[str] = Field(default_factory=list)
    on_behalf_of: list[str] = Field(default_factory=list)
    env: list[str] = Field(default_factory=list)
    control: list[str] = Field(default_factory=list)

    @field_validator("env")
    @classmethod
    def _allowed_names(cls, value: list[str]) -> list[str]:
        return check_env_names(value)

    @field_validator("control")
    @classmethod
    def _known_ops(cls, value: list[str]) -> list[str]:
        unknown = [op for op in value if op != "*" and op not in CONTROL_OPS]
        if unknown:
            raise ValueError(
                f"unknown control operation {', '.join(unknown)}; "
                f"known: {', '.join(CONTROL_OPS)} or *"
            )
        return value

    @property
    def who(self) -> str:
        """How refusals name this grant: its name, or the start of its key."""
        return self.name or self.key[:12] + "…"


class TrustFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    grant: list[Grant] = Field(default_factory=list)

    def for_key(self, key: str) -> Grant | None:
        return next((g for g in self.grant if g.key == key), None)


def load_trust(path: Path) -> TrustFile:
    """Read and validate a trust file.

    Raises:
        UsageError: missing, not TOML, or not a trust file (including one that lets a
            request set a forbidden variable).
    """
    try:
        return TrustFile.model_validate(read_toml(path))
    except ValidationError as exc:
        raise UsageError(f"{path}: invalid trust file: {summarize_validation_error(exc)}") from None


def _any(patterns: Collection[str], value: str) -> bool:
    return any(fnmatch.fnmatchcase(value, p) for p in patterns)


def _names_user(patterns: Collection[str], user: str) -> bool:
    # Root is too much to grant by accident with "*": it must be named.
    if user == "root":
        return "root" in patterns
    return _any(patterns, user)


NO_TRUST_FILE = "this agent has no trust file, so it runs no job (set trust_file in its config)"


def refusal(
    trust: TrustFile | None,
    envelope: Envelope,
    job: JobSubmitted,
    *,
    module_env: Collection[str] = (),
) -> str | None:
    """Why this agent must not run the job, or None when the trust file allows it.

    The envelope's signature has been verified already; this decides whether the signer
    may ask for this. ``module_env`` holds the names the requested module declares it
    accepts. Who the job runs as is :func:`resolve_identity`'s decision.
    """
    if trust is None:
        return NO_TRUST_FILE
    if envelope.signer is None:
        return "the request is not signed, and this agent only runs signed requests"
    grant = trust.for_key(envelope.signer)
    if grant is None:
        return f"key {envelope.signer[:12]}… is not trusted by this agent"
    who = grant.who
    if job.submitted_by != envelope.source and not _any(grant.on_behalf_of, job.submitted_by):
        return f"{who} may not submit jobs on behalf of {job.submitted_by}"
    command = job.request.command
    if isinstance(command, ModuleCommand):
        if not _any(grant.modules, command.module):
            return f"{who} may not run module {command.module}"
    elif not grant.commands:
        return f"{who} may run modules only, not commands or scripts"
    return env_refusal(grant, job.request, module_env)


def env_refusal(grant: Grant, request: JobRequest, module_env: Collection[str] = ()) -> str | None:
    """Why the request's environment is refused, or None: every name must be allowed."""
    for name in sorted(request.env):
        if never_from_request(name):
            return f"{grant.who} may not set {name}: this agent never takes it from a request"
        if not (_any(grant.env, name) or name in module_env):
            return f"{grant.who} may not set the environment variable {name}"
    return None


@dataclass(frozen=True)
class RunAs:
    """Who a job runs as, and what must happen first."""

    user: str
    switch: bool
    """Drop privileges to ``user`` (root mode, a user other than the agent's)."""
    password: bool
    """PAM ``auth`` then ``account`` must accept the request's credential for ``user``."""


@dataclass(frozen=True)
class Refused:
    reason: str


def resolve_identity(
    grant: Grant,
    request: JobRequest,
    *,
    mode: RunAsMode,
    agent_user: str,
    default_user: str | None,
) -> RunAs | Refused:
    """Decide the job's OS user from the trust grant alone.

    - A ``run_as`` user must be named by the grant: in ``users`` (the key is enough) or,
      with a credential, in ``users`` or ``password_users``. A credential never makes up
      for a missing grant, and a job carrying one always goes through PAM, even for the
      agent's own user.
    - In ``self`` mode every job runs as the agent's user; asking for another is refused.
    - In ``root`` mode a job without ``run_as`` runs as ``default_user`` (refused when
      that is unset), or as root if the grant names ``root``.
    """
    requested = request.run_as
    has_password = request.credential is not None
    if requested is None:
        if has_password:
            return Refused("a credential without a run_as user")
        if mode == "self" or (mode == "root" and "root" in grant.users):
            return RunAs(agent_user, switch=False, password=False)
        if default_user is None:
            return Refused(
                "the request names no user to run as, and this agent has no default_run_as"
            )
        return RunAs(default_user, switch=default_user != agent_user, password=False)
    allowed = _names_user(grant.users, requested) or (
        has_password and _names_user(grant.password_users, requested)
    )
    if not allowed:
        return Refused(f"{grant.who} may not run jobs as {requested}")
    if mode == "self" and requested != agent_user:
        return Refused(
            f"this agent runs every job as its own user {agent_user} (run_as_mode = self), "
            f"not as {requested}"
        )
    return RunAs(requested, switch=requested != agent_user, password=has_password)


def control_refusal(trust: TrustFile | None, signer: str | None, op: str) -> str | None:
    """Why ``signer`` may not call control operation ``op`` here, or None if it may.

    ``signer`` is the verified key of the request (None: unsigned).
    """
    if trust is None:
        return "this agent has no trust file, so it accepts no control request"
    if signer is None:
        return "control requests must be signed by a key this agent trusts"
    grant = trust.for_key(signer)
    if grant is None:
        return f"key {signer[:12]}… is not trusted by this agent"
    if "*" not in grant.control and op not in grant.control:
        return f"{grant.who} may not call {op} on this agent"
    return None
