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

# Limits of what a request may carry. Every field has one, so no submitter can make an
# agent, the master or a reader of the log hold more than it must; the whole event is
# also bounded by the server's max_payload (1 MiB by default).
MAX_ARGS = 4096
"""Arguments per command."""
MAX_ARG_CHARS = 128 * 1024
"""Characters per argument: Linux's own limit for one argument (MAX_ARG_STRLEN)."""
MAX_SCRIPT_CHARS = 256 * 1024
"""Characters of a script fed to its interpreter."""
MAX_ENV = 1024
"""Environment variables a request may set."""
MAX_ENV_NAME = 255
MAX_ENV_VALUE = 32 * 1024
MAX_PATH_CHARS = 4096
"""Characters of a working directory: Linux's PATH_MAX."""


def _no_nul(values: list[str]) -> list[str]:
    if any("\0" in v for v in values):
        raise ValueError("arguments must not contain NUL bytes")
    return values


def _check_env(env: dict[str, str]) -> dict[str, str]:
    for key, value in env.items():
        if len(key) > MAX_ENV_NAME or len(value) > MAX_ENV_VALUE:
            raise ValueError(
                f"environment variable {key[:40]!r}: names are at most {MAX_ENV_NAME} "
                f"characters, values at most {MAX_ENV_VALUE}"
            )
        if not key or "=" in key or "\0" in key or not (key[0].isalpha() or key[0] == "_"):
            raise ValueError(f"environment name {key!r} is not valid")
        if "\0" in value:
            raise ValueError(f"environment value of {key!r} contains a NUL byte")
    return env


Arg = Annotated[str, Field(max_length=MAX_ARG_CHARS)]
Args = Annotated[list[Arg], Field(max_length=MAX_ARGS), AfterValidator(_no_nul)]
"""At most 4096 arguments of at most 128 KiB characters each, no NUL."""


class ArgvCommand(BaseModel):
    """Run ``argv[0]`` with the given arguments, no shell involved."""

    model_config = _STRICT
    kind: Literal["argv"] = "argv"
    argv: Annotated[Args, Field(min_length=1)]


class ScriptCommand(BaseModel):
    """Feed ``script`` to ``interpreter`` (JAMS UnixScript); ``/bin/sh`` by default."""

    model_config = _STRICT
    kind: Literal["script"] = "script"
    script: Annotated[str, Field(max_length=MAX_SCRIPT_CHARS)]
    """At most 256 KiB characters."""
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
    """At most 1024 variables; names at most 255 characters, values at most 32 KiB."""
    cwd: Annotated[str, Field(max_length=MAX_PATH_CHARS)] | None = None
    run_as: UserName | None = None
    credential: Annotated[bytes, Field(max_length=512)] | None = None
    """The run-as user's password, sealed to the agent's key (never in clear)."""
    timeout_s: Annotated[float, Field(gt=0)] | None = None
    expires_at: TimestampNs | None = None
    labels: Labels = {}
