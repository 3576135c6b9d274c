"""Issue 15, the operator's day, through the real ``fleet`` CLI against real processes:
typos refused, the key's name as the principal, job ids everywhere, shell niceties."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from agents import FLEET, AgentProcess, MasterProcess, fleet_env
from natsserver import NatsServer

from bus import Bus, Signer, read_seed_file
from bus.command import principal_name
from bus.keys import read_key_owner
from fleet.cli import build_parser
from fleet.run import DEFAULT_WAIT_S, default_wait

Agents = Callable[..., AgentProcess]
Operator = tuple[Path, Signer]

pytestmark = pytest.mark.timeout(180)


async def fleet(
    url: str,
    key: Path,
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    proc = await asyncio.create_subprocess_exec(
        FLEET,
        *args,
        env={**fleet_env(url, key), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return subprocess.CompletedProcess(args, proc.returncode, out.decode(), err.decode())


async def test_a_typo_is_refused_at_once_unless_queued(
    nats_server: NatsServer, bus: Bus, agent_factory: Agents, operator: Operator
) -> None:
    late = agent_factory("late")
    await late.started(bus)
    late.stop()
    # No agent online at all: the check is a lookup, so this returns, never waits.
    typo = await fleet(nats_server.url, operator[0], "run", "-a", "web-9", "--", "true", timeout=20)
    assert typo.returncode == 2, typo.stderr
    assert "no agent matches web-9; use --queue" in typo.stderr
    assert typo.stdout == ""
    # An agent seen before (offline now) is queued for, as always.
    seen = await fleet(nats_server.url, operator[0], "run", "-a", "late", "--async", "--", "true")
    assert seen.returncode == 0, seen.stderr
    queued = await fleet(
        nats_server.url, operator[0], "run", "-a", "web-9", "--queue", "--async", "--", "true"
    )
    assert queued.returncode == 0, queued.stderr
    shown = await fleet(nats_server.url, operator[0], "job", "show", queued.stdout.strip())
    assert "agent:        web-9" in shown.stdout
    # The default wait is bounded; running out says which jobs go on and how to follow.
    gave_up = await fleet(
        nats_server.url, operator[0], "run", "-a", "late", "--wait", "1", "--", "true"
    )
    assert gave_up.returncode == 3
    assert "--wait ran out after 1s; the jobs go on" in gave_up.stderr
    assert "late: fleet job wait " in gave_up.stderr
    helped = await fleet(nats_server.url, operator[0], "run", "--help")
    assert "default 600" in helped.stdout
    zero = await fleet(
        nats_server.url, operator[0], "run", "--wait", "0", "-a", "late", "--", "true"
    )
    assert zero.returncode == 2
    assert "must be a positive number of seconds, or 'inf'" in zero.stderr


def test_the_default_wait_covers_the_jobs_own_bounds() -> None:
    parser = build_parser()
    plain = parser.parse_args(["run", "-a", "x", "--", "true"])
    assert default_wait(plain) == DEFAULT_WAIT_S
    long = parser.parse_args(
        ["run", "-a", "x", "--timeout", "3600", "--expire", "60", "--", "true"]
    )
    assert default_wait(long) == 3600 + 60 + 30


async def test_the_key_file_names_the_principal(
    tmp_path: Path, nats_server: NatsServer, bus: Bus, agent_factory: Agents
) -> None:
    key = tmp_path / "operator-ux.nk"
    made = await fleet(
        nats_server.url, key, "keys", "gen", "operator", "operator-ux", "-o", str(key)
    )
    assert made.returncode == 0, made.stderr
    assert read_key_owner(key) == "operator-ux"
    assert Signer(read_seed_file(key)).public_key == made.stdout.strip()
    agent = await agent_factory("web-1", trusted=[made.stdout.strip()]).started(bus)
    # Logged in as root, no FLEET_USER: the key says who acts.
    env = {k: v for k, v in fleet_env(nats_server.url, key).items() if k != "FLEET_USER"}
    env["USER"] = env["LOGNAME"] = "root"
    proc = await asyncio.create_subprocess_exec(
        FLEET,
        "run",
        "-a",
        "web-1",
        "--json",
        "--",
        "true",
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err
    [job] = json.loads(out)["jobs"]
    shown = await fleet(nats_server.url, key, "job", "show", job["job_id"], "--json")
    assert json.loads(shown.stdout)["submitted_by"] == "operator-ux"
    audit = await fleet(nats_server.url, key, "audit", "--json", "--job", job["job_id"])
    sources = {json.loads(line)["source"] for line in audit.stdout.splitlines()}
    assert "operator-ux" in sources
    assert "root" not in sources
    assert "tester" not in sources

    registry = MasterProcess(
        tmp_path,
        nats_server.url,
        agents={
            "web-1": {"public_key": Signer(read_seed_file(agent.data_dir / "agent.nk")).public_key}
        },
        operators={"operator-ux": {"public_key": made.stdout.strip()}},
    )
    verified = await fleet(
        nats_server.url, key, "audit", "--verify", "--trust", str(registry.config_path), env=env
    )
    assert "impersonation" not in verified.stderr
    assert verified.returncode == 0, verified.stderr
    # FLEET_USER still overrides, as documented.
    override = await fleet(
        nats_server.url, key, "run", "-a", "web-1", "--json", "--", "true", env={"FLEET_USER": "x"}
    )
    [other] = json.loads(override.stdout)["jobs"]
    again = await fleet(nats_server.url, key, "job", "show", other["job_id"], "--json")
    assert json.loads(again.stdout)["submitted_by"] == "x"


async def test_job_ids_are_printed_and_prefixes_resolve(
    nats_server: NatsServer, bus: Bus, agent_factory: Agents, operator: Operator
) -> None:
    await agent_factory("web-1").started(bus)
    url, key = nats_server.url, operator[0]
    ok = await fleet(url, key, "run", "-a", "web-1", "--", "echo", "hi")
    assert ok.returncode == 0
    assert ok.stdout == "hi\n"
    assert "fleet: web-1: job " in ok.stderr  # even a single success says its id

    async_run = await fleet(url, key, "run", "--async", "-a", "web-1", "--", "seq", "3")
    job = async_run.stdout.strip()
    assert len(job) == 26
    assert "\t" not in async_run.stdout
    waited = await fleet(url, key, "job", "wait", job[:12], "--wait", "30")
    assert waited.returncode == 0, waited.stderr
    logs = await fleet(url, key, "job", "logs", job[:12].lower())
    assert logs.stdout == "1\n2\n3\n"
    shown = await fleet(url, key, "job", "show", job[:12], "--json")
    assert json.loads(shown.stdout)["job_id"] == job
    # Every id shares its first characters (the time): a short prefix is ambiguous.
    ambiguous = await fleet(url, key, "job", "show", job[:2])
    assert ambiguous.returncode == 2
    assert "ambiguous" in ambiguous.stderr
    assert job in ambiguous.stderr
    cancelled = await fleet(url, key, "job", "cancel", job[:12])
    assert cancelled.returncode == 0
    assert "already ended" in cancelled.stderr

    as_json = await fleet(url, key, "run", "-a", "web-1", "--json", "--", "echo", "tail")
    [done] = json.loads(as_json.stdout)["jobs"]
    assert done["output_tail"] == "tail\n"
    assert done["output_complete"] is True
    big = await fleet(url, key, "run", "-a", "web-1", "--json", "--", "seq", "200000")
    [long] = json.loads(big.stdout)["jobs"]
    assert long["output_complete"] is False
    assert long["output_rest"] == f"fleet job logs {long['job_id']}"
    assert long["output_tail"].endswith("200000\n")

    # Ctrl-C: the id and how to follow the job that goes on.
    proc = await asyncio.create_subprocess_exec(
        FLEET,
        "run",
        "-a",
        "web-1",
        "--",
        "sleep",
        "30",
        env=fleet_env(url, key),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    line = await asyncio.wait_for(proc.stderr.readline(), 30)
    assert line.startswith(b"fleet: web-1: job ")
    running = line.split()[-1].decode()
    proc.send_signal(signal.SIGINT)
    rest = (await asyncio.wait_for(proc.communicate(), 30))[1].decode()
    assert proc.returncode == 130
    assert f"web-1: fleet job wait {running}" in rest
    await fleet(url, key, "job", "cancel", running)


async def test_shell_niceties(
    nats_server: NatsServer, bus: Bus, agent_factory: Agents, operator: Operator
) -> None:
    await agent_factory("web-1").started(bus)
    url, key = nats_server.url, operator[0]
    for n in range(3):
        await fleet(url, key, "run", "-a", "web-1", "--", "echo", str(n))
    # A reader that goes away ends the command quietly.
    piped = await asyncio.to_thread(
        subprocess.run,
        ["/bin/bash", "-c", f"{FLEET} audit --json | head -2; echo status=${{PIPESTATUS[0]}}"],
        env={**fleet_env(url, key), "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert len(piped.stdout.splitlines()) == 3
    assert piped.stderr == ""
    assert "status=141" in piped.stdout or "status=0" in piped.stdout

    typo = await fleet(url, key, "jobs", "--status", "runing")
    assert typo.returncode == 2
    assert "invalid choice: 'runing'" in typo.stderr
    assert "succeeded" in typo.stderr
    mine = await fleet(url, key, "jobs", "--user", "tester", "--since", "1h", "--json")
    assert len(json.loads(mine.stdout)["jobs"]) == 3
    others = await fleet(url, key, "jobs", "--user", "nobody", "--json")
    assert json.loads(others.stdout)["jobs"] == []
    future = await fleet(url, key, "jobs", "--since", "2999-01-01T00:00:00Z", "--json")
    assert json.loads(future.stdout)["jobs"] == []

    bad_cwd = await fleet(
        url, key, "run", "-a", "web-1", "--cwd", "/nonexistent", "--json", "--", "true"
    )
    assert bad_cwd.returncode == 4
    [job] = json.loads(bad_cwd.stdout)["jobs"]
    assert job["note"].startswith("cannot start working directory /nonexistent")

    five = await fleet(url, key, "update", "set", "max_concurrent", "five")
    assert five.returncode == 2
    assert "max_concurrent must be a whole number, not 'five'" in five.stderr


def test_old_key_files_fall_back_to_fleet_user_then_the_login_name(
    operator: Operator, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert read_key_owner(operator[0]) is None
    monkeypatch.setenv("FLEET_USER", "tester")
    assert principal_name(operator[0]) == "tester"
    monkeypatch.delenv("FLEET_USER")
    for var in ("LOGNAME", "USER", "LNAME", "USERNAME"):
        monkeypatch.setenv(var, "alice")
    assert principal_name(operator[0]) == "alice"


async def test_under_least_privilege_the_key_name_opens_the_right_inbox(
    tmp_path: Path, server_factory: Callable[..., NatsServer], agent_factory: Agents
) -> None:
    async def cli(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        proc = await asyncio.create_subprocess_exec(
            FLEET, *argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return subprocess.CompletedProcess(argv, proc.returncode, out.decode(), err.decode())

    keys: dict[str, tuple[Path, str]] = {}
    for kind, name in (("admin", "admin"), ("operator", "operator-ux"), ("agent", "web-1")):
        path = tmp_path / f"{name}.nk"
        made = await cli("keys", "gen", kind, name, "-o", str(path), env=dict(os.environ))
        assert made.returncode == 0, made.stderr
        keys[name] = (path, made.stdout.strip())
    registry = tmp_path / "registry.toml"
    registry.write_text(
        f'[agents.web-1]\npublic_key = "{keys["web-1"][1]}"\n'
        f'[operators.operator-ux]\npublic_key = "{keys["operator-ux"][1]}"\n'
        f'[admins.admin]\npublic_key = "{keys["admin"][1]}"\n'
    )
    rendered = await cli("ops", "server-config", "--registry", str(registry), env=dict(os.environ))
    assert rendered.returncode == 0, rendered.stderr
    server = server_factory(config=rendered.stdout)
    init = await cli("ops", "init", env=fleet_env(server.url, keys["admin"][0]))
    assert init.returncode == 0, init.stderr
    # Logged in as root, no FLEET_USER: only the key's name opens _INBOX_operator-ux.
    env = {k: v for k, v in fleet_env(server.url, keys["operator-ux"][0]).items()}
    env.pop("FLEET_USER")
    env["USER"] = env["LOGNAME"] = "root"
    agents = await cli("agents", "--json", env=env)
    assert agents.returncode == 0, agents.stderr
    assert json.loads(agents.stdout) == {"agents": []}
    typo = await cli("run", "-a", "web-9", "--", "true", env=env)
    assert typo.returncode == 2, typo.stderr
    assert "no agent matches web-9" in typo.stderr


async def test_script_arguments_and_a_refused_user_are_shown(
    nats_server: NatsServer, bus: Bus, agent_factory: Agents, operator: Operator, tmp_path: Path
) -> None:
    """``--script FILE a b`` passes a and b to the script; ``--user`` that a self-mode
    agent cannot honour is refused, and the human output says why."""
    await agent_factory("web-1").started(bus)
    script = tmp_path / "s.sh"
    script.write_text('echo "args: $*"\n')
    ran = await fleet(
        nats_server.url, operator[0], "run", "-a", "web-1", "--script", str(script), "a", "b"
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == "args: a b\n"
    other = await fleet(
        nats_server.url, operator[0], "run", "-a", "web-1", "--user", "nobody", "--", "true"
    )
    assert other.returncode == 4, other.stderr
    assert "rejected" in other.stderr
    assert "nobody" in other.stderr


async def test_tables_fit_the_terminal_and_pipes_get_every_byte(
    nats_server: NatsServer, bus: Bus, agent_factory: Agents, operator: Operator
) -> None:
    """On a 50-column terminal no line of ``fleet jobs`` or ``fleet agents`` is wider;
    into a pipe nothing is cut."""
    await agent_factory("web-1", labels={"role": "web", "zone": "eu-west-1a"}).started(bus)
    ran = await fleet(nats_server.url, operator[0], "run", "-a", "web-1", "--", "echo", "x" * 80)
    assert ran.returncode == 0, ran.stderr

    def on_a_terminal(*args: str) -> str:
        import pty

        leader, follower = pty.openpty()
        env = {**fleet_env(nats_server.url, operator[0]), "COLUMNS": "50", "LINES": "40"}
        proc = subprocess.Popen([FLEET, *args], stdout=follower, stderr=subprocess.DEVNULL, env=env)
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(leader)
        assert proc.wait(60) == 0
        return b"".join(chunks).decode()

    for command in ("jobs", "agents"):
        shown = await asyncio.to_thread(on_a_terminal, command)
        lines = [line for line in shown.replace("\r", "").splitlines() if line]
        assert len(lines) >= 2
        assert max(len(line) for line in lines) <= 50, lines
        assert any(line.endswith("…") for line in lines), lines
        piped = await fleet(nats_server.url, operator[0], command)
        assert "…" not in piped.stdout
    assert "x" * 80 in (await fleet(nats_server.url, operator[0], "jobs")).stdout
    assert "zone=eu-west-1a" in (await fleet(nats_server.url, operator[0], "agents")).stdout
