"""The job request: what an operator asks an agent to run.

Three ways to say what runs, after the JAMS execution methods: an argv run without a
shell, a script fed to an interpreter, or a module the agent's own config defines (a
pre-approved command, the only kind an operator may be limited to).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from schemas.fields import Labels, TimestampNs, Token, UserName

_STRICT = ConfigDict(strict=True, frozen=True, extra="forbid")

MAX_ARGS = 4096
MAX_ENV = 1024


def _no_nul(values: list[str]) -> list[str]:
    if any("\0" in v for v in values):
        raise ValueError("arguments must not contain NUL bytes")
    return values


def _check_env(env: dict[str, str]) -> dict[str, str]:
    for key, value in env.items():
        if not key or "=" in key or "\0" in key or not (key[0].isalpha() or key[0] == "_"):
            raise ValueError(f"environment name {key!r} is not valid")
        if "\0" in value:
            raise ValueError(f"environment value of {key!r} contains a NUL byte")
    return env


Args = Annotated[list[str], Field(max_length=MAX_ARGS), AfterValidator(_no_nul)]


class ArgvCommand(BaseModel):
    """Run ``argv[0]`` with the given arguments, no shell involved."""

    model_config = _STRICT
    kind: Literal["argv"] = "argv"
    argv: Annotated[Args, Field(min_length=1)]


class ScriptCommand(BaseModel):
    """Feed ``script`` to ``interpreter`` (JAMS UnixScript); ``/bin/sh`` by default."""

    model_config = _STRICT
    kind: Literal["script"] = "script"
    script: str
    interpreter: Annotated[Args, Field(min_length=1)] = ["/bin/sh"]
    args: Args = []


class ModuleCommand(BaseModel):
    """Run a command the agent's config defines under this name, with extra arguments."""

    model_config = _STRICT
    kind: Literal["module"] = "module"
    module: Token
    args: Args = []


Command = Annotated[ArgvCommand | ScriptCommand | ModuleCommand, Field(discriminator="kind")]


class JobRequest(BaseModel):
    """Everything an agent needs to run one job, as the submitter signed it.

    ``timeout_s`` bounds the run once started (the agent enforces it); ``expires_at``
    bounds how long the job may wait to start (a job not started by then is
    ``expired`` and never runs).
    """

    model_config = _STRICT
    command: Command
    env: Annotated[dict[str, str], Field(max_length=MAX_ENV), AfterValidator(_check_env)] = {}
    cwd: str | None = None
    run_as: UserName | None = None
    credential: Annotated[bytes, Field(max_length=512)] | None = None
    """The run-as user's password, sealed to the agent's key (never in clear)."""
    timeout_s: Annotated[float, Field(gt=0)] | None = None
    expires_at: TimestampNs | None = None
    labels: Labels = {}
