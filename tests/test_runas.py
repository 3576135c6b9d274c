"""Run-as in root mode with real PAM: a throwaway user and PAM service, removed after."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from agents import FLEET, AgentProcess, fleet_env, job_events
from natsserver import NatsServer
from pamuser import Throwaway

from bus import Bus, Signer
from bus.log import read_log

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="running jobs as other users needs root"),
    pytest.mark.skipif(shutil.which("useradd") is None, reason="needs useradd"),
    pytest.mark.slow,
]
Agents = Callable[..., AgentProcess]


async def fleet(
    url: str, key: Path, *args: str, stdin: str = ""
) -> subprocess.CompletedProcess[bytes]:
    proc = await asyncio.create_subprocess_exec(
        FLEET,
        *args,
        env=fleet_env(url, key),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), 60)
    assert proc.returncode is not None
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


async def run_as(
    url: str, key: Path, user: str, password: str, *cmd: str, json_out: bool = True
) -> subprocess.CompletedProcess[bytes]:
    """``fleet run -a web-1 --user USER --password-stdin [--json] -- CMD``."""
    flags = ["--json"] if json_out else []
    return await fleet(
        url,
        key,
        "run",
        "-a",
        "web-1",
        "--user",
        user,
        "--password-stdin",
        *flags,
        "--",
        *cmd,
        stdin=password + "\n",
    )


async def test_pam_decides_and_privileges_are_dropped(
    nats_server: NatsServer,
    bus: Bus,
    agent_factory: Agents,
    operator: tuple[Path, Signer],
    pam_user: Throwaway,
    tmp_path: Path,
) -> None:
    agent = agent_factory("web-1", run_as_mode="root", pam_service=pam_user.service)
    await agent.started(bus)
    url, key = nats_server.url, operator[0]
    probe = ["sh", "-c", "id -un; id -u; id -G; pwd; umask; echo $HOME $USER"]

    ok = await fleet(
        url,
        key,
        "run",
        "-a",
        "web-1",
        "--user",
        pam_user.name,
        "--password-stdin",
        "--",
        *probe,
        stdin=pam_user.password + "\n",
    )
    assert ok.returncode == 0, ok.stderr
    name, uid, groups, cwd, umask, env = ok.stdout.decode().splitlines()
    assert name == pam_user.name
    assert uid != "0"
    assert "0" not in groups.split()  # no group of root's left: groups were set first
    assert cwd == f"/home/{pam_user.name}"
    assert umask == "0022"
    assert env == f"/home/{pam_user.name} {pam_user.name}"

    marker = tmp_path / "ran"
    # Writable by the run-as user: otherwise "nothing ran" would prove nothing.
    os.chmod(tmp_path, 0o777)  # noqa: S103
    touch = ["touch", str(marker)]
    for password, why in ((pam_user.password + "x", "wrong"), ("", "empty")):
        bad = await run_as(url, key, pam_user.name, password, *touch)
        assert bad.returncode == 4, why
        assert b'"status": "rejected"' in bad.stdout, why
    assert not marker.exists()
    stranger = await run_as(url, key, "nosuchuser", "pw", "true")
    assert b'"note": "authentication failed"' in stranger.stdout  # same words as a wrong password

    await asyncio.to_thread(
        subprocess.run, ["usermod", "--expiredate", "1", pam_user.name], check=True
    )
    expired = await run_as(url, key, pam_user.name, pam_user.password, "true")
    assert b'"status": "rejected"' in expired.stdout  # the account phase said no

    # The password is nowhere: not in the log, not in the agent's log.
    records = await read_log(bus, bus.subjects.events_stream, bus.subjects.all_events)
    assert all(pam_user.password.encode() not in r.data for r in records)
    assert pam_user.password not in agent.log()


async def test_missing_pam_service_is_an_error_not_a_fallback(
    nats_server: NatsServer,
    bus: Bus,
    agent_factory: Agents,
    operator: tuple[Path, Signer],
    pam_user: Throwaway,
) -> None:
    agent = agent_factory("web-1", run_as_mode="root", pam_service="fleet-no-such-service")
    await agent.started(bus)
    result = await run_as(nats_server.url, operator[0], pam_user.name, pam_user.password, "true")
    assert result.returncode == 4
    assert b"PAM service fleet-no-such-service is not installed" in result.stdout


async def test_an_nkey_grant_runs_as_the_user_without_a_password(
    nats_server: NatsServer,
    bus: Bus,
    agent_factory: Agents,
    operator: tuple[Path, Signer],
    pam_user: Throwaway,
    tmp_path: Path,
) -> None:
    trust = tmp_path / "trust.toml"
    trust.write_text(
        f'[[grant]]\nkey = "{operator[1].public_key}"\ncommands = true\n'
        f'users = ["{pam_user.name}"]\n'
    )
    await agent_factory(
        "web-1", run_as_mode="root", pam_service=pam_user.service, trust_file=str(trust)
    ).started(bus)
    result = await fleet(
        nats_server.url,
        operator[0],
        "run",
        "-a",
        "web-1",
        "--user",
        pam_user.name,
        "--",
        "id",
        "-un",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().strip() == pam_user.name
    refused = await fleet(
        nats_server.url,
        operator[0],
        "run",
        "-a",
        "web-1",
        "--user",
        "root",
        "--json",
        "--",
        "id",
        "-un",
    )
    assert b"may not run jobs as root" in refused.stdout
    started = [e for e in await job_events(bus, "*") if e.type == "job.started"]
    assert started
    assert started[-1].data["run_as"] == pam_user.name
    assert started[-1].data["effective_user"] == pam_user.name
