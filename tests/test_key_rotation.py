"""Rotating the master's key: the events it signed before still verify, and only with
the old key declared (``previous_keys``), never by accident."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from agents import FLEET, AgentProcess, MasterProcess, finished, fleet_env, job_request, submit
from deployment import run_cli
from natsserver import NatsServer

from bus import Bus, Signer, decode_envelope, generate_seed, public_key_of, read_seed_file
from bus.keys import write_seed_file
from schemas import Envelope

pytestmark = pytest.mark.timeout(180)


async def until_event(
    bus: Bus, subject: str, wanted: Callable[[Envelope], bool], timeout: float = 60.0
) -> None:
    """Until the log holds an event on ``subject`` that is ``wanted``."""
    sub = await bus.js.subscribe(subject, ordered_consumer=True)
    try:
        async with asyncio.timeout(timeout):
            while not wanted(decode_envelope((await sub.next_msg(timeout=timeout)).data)):
                pass
    finally:
        await sub.unsubscribe()


async def checkpoint_by(bus: Bus, key: str) -> None:
    """Until the log holds an ``audit.checkpoint`` signed with ``key``."""
    await until_event(bus, bus.subjects.audit_event("checkpoint"), lambda e: e.signer == key)


async def agent_and_master(
    bus: Bus,
    agent_factory: Callable[..., AgentProcess],
    master_factory: Callable[..., MasterProcess],
    signer: Signer,
) -> tuple[AgentProcess, MasterProcess]:
    """Agent web-1 and a master that knows it and the operator, checkpointing often."""
    web1 = await agent_factory("web-1").started(bus)
    master = master_factory(
        checkpoint_every=2,
        agents={"web-1": {"public_key": public_key_of(read_seed_file(web1.data_dir / "agent.nk"))}},
        operators={"tester": {"public_key": signer.public_key}},
    ).start()
    await master.wait_ready(bus)
    return web1, master


async def audit(url: str, key: Path, master: MasterProcess) -> subprocess.CompletedProcess[str]:
    return await run_cli(
        FLEET, "audit", "--verify", "--trust", str(master.config_path), env=fleet_env(url, key)
    )


async def test_a_rotated_master_key_verifies_old_and_new_events_only_when_declared(
    nats_server: NatsServer,
    bus: Bus,
    agent_factory: Callable[..., AgentProcess],
    master_factory: Callable[..., MasterProcess],
    operator: tuple[Path, Signer],
) -> None:
    key, signer = operator
    _, master = await agent_and_master(bus, agent_factory, master_factory, signer)
    key_file = master.dir / "data" / "master.nk"
    old = public_key_of(read_seed_file(key_file))
    for _ in range(2):
        await finished(bus, "web-1", await submit(bus, signer, "web-1", job_request(["true"])))
    await checkpoint_by(bus, old)
    master.stop()

    # The rotation: a new seed where the old one was, the master started on it.
    new_seed = generate_seed()
    write_seed_file(key_file, new_seed, overwrite=True)
    new = public_key_of(new_seed)
    master.start()
    await master.wait_ready(bus)
    for _ in range(2):
        await finished(bus, "web-1", await submit(bus, signer, "web-1", job_request(["true"])))
    await checkpoint_by(bus, new)

    undeclared = await audit(nats_server.url, key, master)
    assert undeclared.returncode != 0, undeclared.stdout
    assert old[:12] in undeclared.stdout + undeclared.stderr

    master.settings["previous_keys"] = [old]
    master.write_config()
    declared = await audit(nats_server.url, key, master)
    assert declared.returncode == 0, declared.stdout + declared.stderr


async def registered_with(bus: Bus, agent: str, key: str) -> None:
    """Until the log records ``agent`` registered with ``key``."""
    subject = bus.subjects.agent_event(agent, "registered")
    await until_event(bus, subject, lambda e: e.data.get("public_key") == key)


async def test_a_rotated_agent_key_is_registered_and_both_keys_events_verify(
    nats_server: NatsServer,
    bus: Bus,
    agent_factory: Callable[..., AgentProcess],
    master_factory: Callable[..., MasterProcess],
    operator: tuple[Path, Signer],
) -> None:
    key, signer = operator
    web1, master = await agent_and_master(bus, agent_factory, master_factory, signer)
    agent_key = web1.data_dir / "agent.nk"
    old = public_key_of(read_seed_file(agent_key))
    await finished(bus, "web-1", await submit(bus, signer, "web-1", job_request(["true"])))

    # The runbook's steps: the new key registered first (master reload), then the agent
    # switched to it by a restart.
    new_seed = generate_seed()
    new = public_key_of(new_seed)
    master.settings["agents"] = {"web-1": {"public_key": new}}
    master.write_config()
    master.signal(signal.SIGHUP)
    await registered_with(bus, "web-1", new)
    web1.stop()
    write_seed_file(agent_key, new_seed, overwrite=True)
    await web1.started(bus)
    after = await finished(bus, "web-1", await submit(bus, signer, "web-1", job_request(["true"])))
    assert after.status == "succeeded"

    # Until the old key is declared, the agent's events signed with it do not verify.
    undeclared = await audit(nats_server.url, key, master)
    assert undeclared.returncode != 0, undeclared.stdout
    assert "✗ job.finished" in undeclared.stdout

    master.settings["agents"] = {"web-1": {"public_key": new, "previous_keys": [old]}}
    master.write_config()
    verified = await audit(nats_server.url, key, master)
    assert verified.returncode == 0, verified.stdout + verified.stderr
