"""``fleet-agentd-launcher`` directly: real launcher and agent processes, stand-in agents.

Each installed "version" is a tiny ``agentd`` package whose ``__main__`` does one thing
(exit, report healthy, ask for a restart, stay silent, die by a signal), so every path
of the launcher runs for real without a bus.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from agents import pid_alive

from updater.handoff import RESTART_EXIT
from updater.install import InstallRoot, Pending

LAUNCHER = str(Path(sys.executable).parent / "fleet-agentd-launcher")

# Every stand-in agent says which version it is and its pid, then does its part.
PROLOGUE = """\
import os, signal, sys, time
from pathlib import Path
VERSION = {version!r}
print(f"started {{VERSION}} {{os.getpid()}}", flush=True)
def ready():
    os.write(int(os.environ["FLEET_READY_FD"]), b"ready\\n")
"""

pytestmark = pytest.mark.timeout(120)


def install(root: Path, version: str, body: str) -> Path:
    """A version directory whose agent runs ``body`` (after :data:`PROLOGUE`)."""
    version_dir = root / "versions" / version
    package = version_dir / "site" / "agentd"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(PROLOGUE.format(version=version) + body)
    (version_dir / "manifest.json").write_text(json.dumps({"version": version}))
    return version_dir


def pending_update(root: Path, new: Path, previous: Path) -> None:
    """The state an agent leaves after switching to ``new``: current, pending.json."""
    install_root = InstallRoot(root)
    install_root.switch(new)
    install_root.write_pending(
        Pending(
            version=new.name,
            previous=str(previous),
            previous_version=previous.name,
            announcement="01J0000000000000000000TEST",
        )
    )


class Launched:
    """One launcher process, its stand-in agents' lines, and cleanup of both."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.agent_pids: list[int] = []

    async def started(self) -> str:
        """The version of the next agent the launcher starts."""
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 60)
        assert line, "the launcher ended without starting another agent"
        _, version, pid = line.decode().split()
        self.agent_pids.append(int(pid))
        return version

    async def exit_code(self) -> tuple[int, str]:
        """Wait for the launcher to end: its exit code and its log."""
        _, err = await asyncio.wait_for(self.proc.communicate(), 90)
        assert self.proc.returncode is not None
        return self.proc.returncode, err.decode()


@pytest.fixture
async def launch(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Launched]]]:
    made: list[Launched] = []

    async def start(health_timeout: float = 60.0) -> Launched:
        proc = await asyncio.create_subprocess_exec(
            LAUNCHER,
            "--root",
            str(tmp_path),
            "--health-timeout",
            str(health_timeout),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        made.append(Launched(proc))
        return made[-1]

    yield start
    for launched in made:
        if launched.proc.returncode is None:
            launched.proc.kill()
            await launched.proc.wait()
        for pid in launched.agent_pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


async def test_the_agents_exit_code_is_the_launchers(
    tmp_path: Path, launch: Callable[..., Awaitable[Launched]]
) -> None:
    InstallRoot(tmp_path).switch(install(tmp_path, "1.0", "sys.exit(3)\n"))
    launched = await launch()
    assert await launched.started() == "1.0"
    assert (await launched.exit_code())[0] == 3


async def test_an_agent_killed_by_signal_n_makes_it_exit_128_plus_n(
    tmp_path: Path, launch: Callable[..., Awaitable[Launched]]
) -> None:
    InstallRoot(tmp_path).switch(install(tmp_path, "1.0", "os.kill(os.getpid(), signal.SIGKILL)\n"))
    launched = await launch()
    await launched.started()
    assert (await launched.exit_code())[0] == 128 + signal.SIGKILL


async def test_the_restart_exit_starts_the_agent_again(
    tmp_path: Path, launch: Callable[..., Awaitable[Launched]]
) -> None:
    marker = tmp_path / "ran-once"
    body = (
        f"marker = Path({str(marker)!r})\n"
        f"if not marker.exists():\n"
        f"    marker.touch()\n"
        f"    sys.exit({RESTART_EXIT})\n"
        f"sys.exit(0)\n"
    )
    InstallRoot(tmp_path).switch(install(tmp_path, "1.0", body))
    launched = await launch()
    assert await launched.started() == "1.0"
    assert await launched.started() == "1.0"
    code, log = await launched.exit_code()
    assert code == 0
    assert "asked to be restarted" in log


async def test_a_healthy_new_version_keeps_running_and_the_update_is_done(
    tmp_path: Path, launch: Callable[..., Awaitable[Launched]]
) -> None:
    old = install(tmp_path, "1.0", "sys.exit(9)\n")
    new = install(tmp_path, "2.0", "ready()\nsys.exit(0)\n")
    pending_update(tmp_path, new, old)
    launched = await launch()
    assert await launched.started() == "2.0"
    code, log = await launched.exit_code()
    assert code == 0, log
    root = InstallRoot(tmp_path)
    assert root.pending() is None
    assert root.current_dir() == new.resolve()
    assert not root.rolled_back_file.exists()


async def test_a_new_version_that_exits_before_it_is_healthy_is_rolled_back(
    tmp_path: Path, launch: Callable[..., Awaitable[Launched]]
) -> None:
    old = install(tmp_path, "1.0", "sys.exit(0)\n")
    new = install(tmp_path, "2.0", "sys.exit(1)\n")
    pending_update(tmp_path, new, old)
    launched = await launch()
    assert await launched.started() == "2.0"
    assert await launched.started() == "1.0"
    code, log = await launched.exit_code()
    assert code == 0, log
    root = InstallRoot(tmp_path)
    assert root.current_dir() == old.resolve()
    assert root.pending() is None
    record = root.take_rolled_back()
    assert record is not None
    assert record["version"] == "2.0"
    assert record["previous_version"] == "1.0"
    assert record["reason"] == "the new agent exited with code 1 before it was healthy"


async def test_a_silent_new_version_is_stopped_and_rolled_back_at_the_deadline(
    tmp_path: Path, launch: Callable[..., Awaitable[Launched]]
) -> None:
    old = install(tmp_path, "1.0", "sys.exit(0)\n")
    new = install(tmp_path, "2.0", "signal.pause()\n")
    pending_update(tmp_path, new, old)
    launched = await launch(health_timeout=1)
    assert await launched.started() == "2.0"
    assert await launched.started() == "1.0"
    silent_pid = launched.agent_pids[0]
    assert (await launched.exit_code())[0] == 0
    assert not pid_alive(silent_pid)
    record = InstallRoot(tmp_path).take_rolled_back()
    assert record is not None
    assert record["reason"] == "not healthy within 1s"
    assert InstallRoot(tmp_path).current_dir() == old.resolve()


async def test_sigterm_goes_to_the_agent_and_ends_the_launcher_without_a_restart(
    tmp_path: Path, launch: Callable[..., Awaitable[Launched]]
) -> None:
    # The agent asks for a restart when stopped; a stopping launcher must not restart it.
    body = (
        f"signal.signal(signal.SIGTERM, lambda *_: sys.exit({RESTART_EXIT}))\n"
        "print('waiting', flush=True)\n"
        "signal.pause()\n"
    )
    InstallRoot(tmp_path).switch(install(tmp_path, "1.0", body))
    launched = await launch()
    await launched.started()
    assert launched.proc.stdout is not None
    # The handler is installed once the agent says it is waiting.
    assert await asyncio.wait_for(launched.proc.stdout.readline(), 60) == b"waiting\n"
    launched.proc.send_signal(signal.SIGTERM)
    code, _ = await launched.exit_code()
    assert code == RESTART_EXIT
    assert not pid_alive(launched.agent_pids[0])


def test_the_launcher_tells_its_version() -> None:
    shown = subprocess.run([LAUNCHER, "--version"], capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0
    assert shown.stdout.startswith("fleet-agentd-launcher ")
