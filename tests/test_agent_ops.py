"""Issue 15 item 4: ``fleet agent status|config get|config set|log|restart`` through the real
CLI against real agents: authorised per operation by the agent's trust file, retried with
the contract's backoff, ``config set`` kept in the file, a daemon's restart still logging."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from agents import AGENTD, FLEET, AgentProcess, fleet_env
from natsserver import NatsServer
from test_operator_day import fleet

from bus import Bus, Signer, generate_seed, write_seed_file
from fleet.agent import parse_settings

Agents = Callable[..., AgentProcess]
Operator = tuple[Path, Signer]

pytestmark = pytest.mark.timeout(180)


async def agentd(*args: str) -> int:
    proc = await asyncio.create_subprocess_exec(AGENTD, *args, stdin=subprocess.DEVNULL)
    return await asyncio.wait_for(proc.wait(), 60)


def key_file(path: Path, name: str) -> tuple[Path, Signer]:
    write_seed_file(path, seed := generate_seed(), owner=("operator", name))
    return path, Signer(seed)


def trust(path: Path, *grants: tuple[Signer, str, str]) -> Path:
    """A trust file: one ``[[grant]]`` per (key, name, control list)."""
    path.write_text(
        "".join(
            f'[[grant]]\nname = "{name}"\nkey = "{s.public_key}"\ncontrol = {control}\n'
            for s, name, control in grants
        )
    )
    return path


def test_settings_are_toml_values_or_plain_strings() -> None:
    assert parse_settings(["max_jobs=5", "log_level=INFO", 'labels={ role = "db" }']) == {
        "max_jobs": 5,
        "log_level": "INFO",
        "labels": {"role": "db"},
    }
    assert parse_settings(["auto_update=false"]) == {"auto_update": False}
    for bad in (["max_jobs"], ["=5"], ["max_jobs=1", "max_jobs=2"]):
        with pytest.raises(Exception, match=r"KEY=VALUE|twice"):
            parse_settings(bad)


async def test_every_agent_operation_through_the_cli(
    nats_server: NatsServer, bus: Bus, agent_factory: Agents, operator: Operator
) -> None:
    agent = agent_factory("web-1", max_jobs=2)
    agent.config_path.write_text(
        "# the web agent, by hand\n"
        + agent.config_path.read_text().replace("max_jobs = 2", "max_jobs = 2  # two at once")
    )
    await agent.started(bus)
    url, key = nats_server.url, operator[0]

    status = await fleet(url, key, "agent", "status", "web-1", "--json")
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert (doc["agent"], doc["max_jobs"], doc["state"]) == ("web-1", 2, "ready")
    assert "started" in doc["counters"]
    human = await fleet(url, key, "agent", "status", "web-1")
    assert "jobs:     0 running of 2" in human.stdout

    got = await fleet(url, key, "agent", "config", "get", "web-1", "--json")
    assert json.loads(got.stdout)["id"] == "web-1"
    one = await fleet(url, key, "agent", "config", "get", "web-1", "max_jobs")
    assert one.stdout == "2\n"
    missing = await fleet(url, key, "agent", "config", "get", "web-1", "max_job")
    assert missing.returncode == 2
    assert "no config key 'max_job'" in missing.stderr

    changed = await fleet(
        url, key, "agent", "config", "set", "web-1", "max_jobs=5", 'labels={ role = "db" }'
    )
    assert changed.returncode == 0, changed.stderr
    assert "web-1: changed labels, max_jobs" in changed.stdout
    text = agent.config_path.read_text()
    assert text.startswith("# the web agent, by hand\n")
    assert "max_jobs = 5  # two at once\n" in text
    refused = await fleet(url, key, "agent", "config", "set", "web-1", "server=nats://x:1")
    assert refused.returncode == 2
    assert "cannot set server at run time" in refused.stderr

    log = await fleet(url, key, "agent", "log", "web-1", "-n", "50", "--json")
    lines = json.loads(log.stdout)["lines"]
    assert 0 < len(lines) <= 50
    assert any("configuration reloaded" in line for line in lines)

    restarted = await fleet(url, key, "agent", "restart", "web-1", "--wait", "--json")
    assert restarted.returncode == 0, restarted.stderr
    assert json.loads(restarted.stdout)["restarting"] is True
    # The change survived the restart: the new process read it from the file.
    after = json.loads((await fleet(url, key, "agent", "status", "web-1", "--json")).stdout)
    assert (after["max_jobs"], after["labels"]) == (5, {"role": "db"})
    assert after["started_at"] == json.loads(restarted.stdout)["started_at"]

    nobody = await fleet(url, key, "agent", "status", "web-9", "--timeout", "2")
    assert nobody.returncode == 3
    assert "agent web-9 did not answer status within 2s" in nobody.stderr


async def test_operations_are_refused_without_the_grant(
    nats_server: NatsServer, bus: Bus, agent_factory: Agents, tmp_path: Path
) -> None:
    stranger = key_file(tmp_path / "stranger.nk", "stranger")
    nocontrol = key_file(tmp_path / "nocontrol.nk", "nocontrol")
    watcher = key_file(tmp_path / "watcher.nk", "watcher")
    grants = trust(
        tmp_path / "trust.toml",
        (nocontrol[1], "nocontrol", "[]"),
        (watcher[1], "watcher", '["status"]'),
    )
    agent = agent_factory("web-1", trust_file=str(grants))
    await agent.started(bus)
    url = nats_server.url
    ops = [
        ("status",),
        ("config", "get"),
        ("config", "set", "web-1", "max_jobs=9"),
        ("log",),
        ("restart",),
    ]

    def argv(op: tuple[str, ...]) -> list[str]:
        return ["agent", *op] if "web-1" in op else ["agent", *op, "web-1"]

    for key, why in (
        (stranger[0], "is not trusted by this agent"),
        (nocontrol[0], "nocontrol may not call"),
    ):
        for op in ops:
            done = await fleet(url, key, *argv(op), "--timeout", "5")
            assert done.returncode == 2, (op, done.stderr)
            assert "refused" in done.stderr, (op, done.stderr)
            assert why in done.stderr, (op, done.stderr)
    seen = await fleet(url, watcher[0], "agent", "status", "web-1")
    assert seen.returncode == 0, seen.stderr
    for op in ops[1:]:
        done = await fleet(url, watcher[0], *argv(op), "--timeout", "5")
        assert done.returncode == 2, (op, done.stderr)
        assert f"watcher may not call {'-'.join(op[:2]) if 'config' in op else op[0]}" in (
            done.stderr
        )
    assert "max_jobs = 9" not in agent.config_path.read_text()
    assert agent.proc is not None
    assert agent.proc.poll() is None  # not restarted either


async def test_an_unanswered_request_is_retried_with_the_backoff(
    nats_server: NatsServer, bus: Bus, agent_factory: Agents, operator: Operator
) -> None:
    agent = agent_factory("late")
    proc = await asyncio.create_subprocess_exec(
        FLEET,
        "-l",
        "INFO",
        "agent",
        "status",
        "late",
        "--timeout",
        "60",
        "--json",
        env=fleet_env(nats_server.url, operator[0]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    pauses = []
    try:
        async with asyncio.timeout(30):
            # 1 s, 2 s, 4 s: more than the three tries callers used to make.
            while "again in 4s" not in (pauses[-1] if pauses else ""):
                line = (await proc.stderr.readline()).decode()
                assert line, "fleet ended before its third retry"
                if "again in" in line:
                    pauses.append(line)
        assert [p.rsplit(" ", 1)[-1].strip() for p in pauses] == ["1s", "2s", "4s"]
        await agent.started(bus)
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
    assert json.loads(out)["agent"] == "late"


async def test_a_daemon_restarted_by_control_keeps_logging_to_its_file(
    nats_server: NatsServer, bus: Bus, operator: Operator, tmp_path: Path
) -> None:
    agent = AgentProcess(tmp_path, nats_server.url, "web-d", trusted=[operator[1].public_key])
    log_file = agent.data_dir / "agentd.log"
    config = str(agent.config_path)
    assert await agentd("-d", "-c", config) == 0
    try:
        await agent.wait_online(bus)
        url, key = nats_server.url, operator[0]
        restarted = await fleet(url, key, "agent", "restart", "web-d", "--wait")
        assert restarted.returncode == 0, restarted.stderr
        assert "web-d: restarted, online again" in restarted.stdout
        # The new process answers, and what it logs while doing so reaches the file.
        changed = await fleet(url, key, "agent", "config", "set", "web-d", "max_jobs=3")
        assert changed.returncode == 0, changed.stderr
        text = log_file.read_text()
        assert "restarting on request" in text
        assert text.count("configuration reloaded") == 1
        assert text.rindex("configuration reloaded") > text.rindex("restarting on request")
    finally:
        killed = await agentd("-K", "-c", config)
    assert killed == 0


async def test_the_budget_bounds_the_retries(bus: Bus) -> None:
    from bus import FleetTimeoutError
    from bus.request import control

    # Nobody answers: tries at 0 s and 1 s; the next pause (2 s) would pass 2.5 s.
    with pytest.raises(FleetTimeoutError, match="after 2 attempts"):
        await control(bus, bus.subjects.control("nobody", "status"), deadline=2.5)
