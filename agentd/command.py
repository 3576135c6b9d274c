"""What actually runs for a job request: argv, a script file, or a configured module."""

from __future__ import annotations

import contextlib
import os
import shlex
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from agentd.config import AgentConfig
from schemas import ArgvCommand, Command, ModuleCommand, ScriptCommand


class CommandRejected(Exception):
    """The request cannot be run here; the message is the ``rejected`` reason."""


@dataclass
class ResolvedCommand:
    """The argv to execute, and any file made for it (removed by :meth:`cleanup`)."""

    argv: list[str]
    display: str
    files: list[Path] = field(default_factory=list)

    def cleanup(self) -> None:
        for path in self.files:
            with contextlib.suppress(FileNotFoundError):
                path.rmdir() if path.is_dir() else path.unlink()


def resolve_command(
    command: Command, config: AgentConfig, job_id: str, owner: tuple[int, int] | None = None
) -> ResolvedCommand:
    """Turn a request's command into an argv.

    Raises:
        CommandRejected: an unknown module, or arguments to a module that takes none.
    """
    if isinstance(command, ArgvCommand):
        return ResolvedCommand(list(command.argv), shlex.join(command.argv))
    if isinstance(command, ModuleCommand):
        spec = config.modules.get(command.module)
        if spec is None:
            known = ", ".join(sorted(config.modules)) or "none"
            raise CommandRejected(f"no module {command.module!r} on this agent (known: {known})")
        if command.args and not spec.allow_args:
            raise CommandRejected(f"module {command.module!r} takes no arguments")
        argv = [*spec.argv, *command.args]
        return ResolvedCommand(argv, f"module {command.module}: {shlex.join(argv)}")
    assert isinstance(command, ScriptCommand)
    if owner is None:
        scripts = config.data_dir / "scripts"
        scripts.mkdir(mode=0o700, parents=True, exist_ok=True)
    else:
        # The run-as user must read the script, and nobody else: a private temp dir.
        scripts = Path(tempfile.mkdtemp(prefix=f"fleet-job-{job_id}-"))
        os.chown(scripts, *owner)
    path = scripts / f"{job_id}.script"
    # Readable only by the agent's user: a script may hold things others should not read.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o700)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(command.script)
    if owner is not None:
        os.chown(path, *owner)
    argv = [*command.interpreter, str(path), *command.args]
    made = [path] if owner is None else [path, scripts]
    return ResolvedCommand(argv, f"script via {shlex.join(command.interpreter)}", made)
