"""The agent's own trust file: which keys may run what here, and as whom.

After the ``authorized_keys`` idea of JAMS's PUBLIC-KEY option. The agent decides: a
master cannot grant itself rights, because only this file (on this machine) says what
the master's key may do, including for which headless users it may submit::

    # /etc/fleetbus/trust.toml
    [[grant]]
    name = "alice"
    key = "UABC…"                 # an operator's public key
    commands = true              # arbitrary argv and scripts
    modules = ["*"]              # module names (globs)
    users = ["deploy", "www-*"]  # OS users it may ask to run as (globs)

    [[grant]]
    name = "master"
    key = "UDEF…"                 # the master, submitting for headless users
    modules = ["backup"]
    on_behalf_of = ["batch"]     # the headless users it may speak for

With a trust file, every request must be signed by a granted key and fit its grant;
anything else ends ``rejected`` with the reason, and nothing runs.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bus import UsageError
from bus.paths import read_toml
from schemas import Envelope, JobSubmitted, ModuleCommand
from schemas.fields import PublicKey
from schemas.registry import summarize_validation_error


class Grant(BaseModel):
    """What one key may do on this agent."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    key: PublicKey
    name: str = ""
    commands: bool = False
    modules: list[str] = Field(default_factory=list)
    users: list[str] = Field(default_factory=list)
    on_behalf_of: list[str] = Field(default_factory=list)


class TrustFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    grant: list[Grant] = Field(default_factory=list)

    def for_key(self, key: str) -> Grant | None:
        return next((g for g in self.grant if g.key == key), None)


def load_trust(path: Path) -> TrustFile:
    """Read and validate a trust file.

    Raises:
        UsageError: missing, not TOML, or not a trust file.
    """
    try:
        return TrustFile.model_validate(read_toml(path))
    except ValidationError as exc:
        raise UsageError(f"{path}: invalid trust file: {summarize_validation_error(exc)}") from None


def _any(patterns: list[str], value: str) -> bool:
    return any(fnmatch.fnmatchcase(value, p) for p in patterns)


def refusal(trust: TrustFile, envelope: Envelope, job: JobSubmitted) -> str | None:
    """Why this agent must not run the job, or None when the trust file allows it.

    The envelope's signature has been verified already; this decides whether the signer
    may ask for this.
    """
    if envelope.signer is None:
        return "the request is not signed, and this agent only runs signed requests"
    grant = trust.for_key(envelope.signer)
    if grant is None:
        return f"key {envelope.signer[:12]}… is not trusted by this agent"
    who = grant.name or envelope.signer[:12] + "…"
    if job.submitted_by != envelope.source and not _any(grant.on_behalf_of, job.submitted_by):
        return f"{who} may not submit jobs on behalf of {job.submitted_by}"
    command = job.request.command
    if isinstance(command, ModuleCommand):
        if not _any(grant.modules, command.module):
            return f"{who} may not run module {command.module}"
    elif not grant.commands:
        return f"{who} may run modules only, not commands or scripts"
    run_as = job.request.run_as
    if run_as is not None and not _any(grant.users, run_as) and job.request.credential is None:
        # Without a grant for the user, only the user's own password (PAM) can allow it.
        return f"{who} may not run jobs as {run_as}"
    return None


def grants_user(trust: TrustFile | None, envelope: Envelope, user: str) -> bool:
    """Whether the signer holds an nkey grant to run jobs as ``user``."""
    if trust is None or envelope.signer is None:
        return False
    grant = trust.for_key(envelope.signer)
    return grant is not None and _any(grant.users, user)
