"""Self-update end to end: real launchers, real agents installed from bundles, a real server.

Every agent here runs under ``fleet-agentd-launcher`` from its own install root, starting
on version 1.0.0 installed from a signed bundle built from this source tree.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from agents import AgentProcess, MasterProcess, fleet_env, nth_event, stop_all, wait_presence
from updates import (
    LaunchedAgent,
    Release,
    fleet,
    make_release,
    put_raw_bundle,
    tamper,
    update_events,
    wait_update_event,
)

from bus import Bus, Signer
from bus.embedded import NatsServer
from schemas import (
    AgentUnsupported,
    UpdateApplied,
    UpdateFailed,
    UpdateRolledBack,
    UpdateRolloutHalted,
    UpdateTokenAcquired,
    UpdateTokenReleased,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

A, B, BROKEN, SILENT = "1.0.0", "1.1.0", "1.2.0", "1.2.1"


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Release:
    rel = make_release(tmp_path_factory.mktemp("release"))
    rel.bundle(A)
    rel.bundle(B)
    broken = rel.broken_source("broken", "import sys\nsys.exit('this build cannot start')\n")
    rel.bundle(BROKEN, broken)
    rel.bundle(SILENT, rel.broken_source("silent", "import time\ntime.sleep(3600)\n"))
    return rel


@pytest.fixture
def launched(
    tmp_path: Path,
    nats_server: NatsServer,
    release: Release,
    operator: tuple[Path, Signer],
    request: pytest.FixtureRequest,
) -> Iterator[Callable[..., LaunchedAgent]]:
    """Agents on 1.0.0 under a launcher; stopped (launcher and agent) after the test."""
    made: list[LaunchedAgent] = []

    def make(agent_id: str, **config: Any) -> LaunchedAgent:
        settings = {
            "release_keys": [release.public_key],
            "shutdown_grace_s": 2.0,
            "trusted": [operator[1].public_key],
            **config,
        }
        agent = LaunchedAgent(tmp_path, nats_server.url, agent_id, **settings)
        agent.install(release.bundles[A], release.public_key)
        made.append(agent)
        return agent

    yield make
    stop_all(made, request)


@pytest.fixture
async def master(bus: Bus, tmp_path: Path, nats_server: NatsServer) -> AsyncIterator[MasterProcess]:
    """A running master: it promotes canary rollouts and halts failing ones."""
    process = MasterProcess(tmp_path, nats_server.url).start()
    try:
        await process.wait_ready(bus)
        yield process
    finally:
        process.stop()


@pytest.fixture
def env(nats_server: NatsServer, operator: tuple[Path, Signer]) -> dict[str, str]:
    return fleet_env(nats_server.url, operator[0])


async def start_all(bus: Bus, agents: list[LaunchedAgent]) -> None:
    for agent in agents:
        agent.start()
    await asyncio.gather(*(a.wait_online(bus, timeout=60) for a in agents))
    for agent in agents:
        presence = await wait_presence(bus, agent.id, lambda p: p.version == A)
        assert presence.version == A


def peak_holders(events: list[Any]) -> int:
    """The most download tokens held at once, as the log tells it."""
    holding: set[str] = set()
    peak = 0
    for event in events:
        if isinstance(event.data, UpdateTokenAcquired):
            holding.add(event.data.agent)
            peak = max(peak, len(holding))
        elif isinstance(event.data, UpdateTokenReleased):
            holding.discard(event.data.agent)
    return peak


async def test_five_agents_update_with_two_tokens(
    bus: Bus, launched: Callable[..., LaunchedAgent], release: Release, env: dict[str, str]
) -> None:
    # ~180 KB at 150 KB/s: downloads overlap, so the slots are really contended.
    agents = [launched(f"u{i}", update_rate_bytes_s=150_000) for i in range(5)]
    await start_all(bus, agents)
    keys_before = {
        a.id: (await wait_presence(bus, a.id, lambda p: True)).public_key for a in agents
    }
    fleet(env, "update", "publish", str(release.bundles[B]))
    fleet(env, "update", "set", "retry_after_s", "0.3")
    fleet(env, "update", "announce", B, "--max-concurrent", "2")

    for agent in agents:
        await wait_update_event(bus, B, agent.id, "applied", timeout=120)
    for agent in agents:
        presence = await wait_presence(bus, agent.id, lambda p: p.version == B)
        assert presence.state == "ready", presence
        # identity (and with it config and data_dir) carried over
        assert presence.public_key == keys_before[agent.id]

    events = await update_events(bus)
    acquired = [e for e in events if isinstance(e.data, UpdateTokenAcquired)]
    assert sorted(e.data.agent for e in acquired) == sorted(a.id for a in agents)
    assert peak_holders(events) == 2, "two slots, five contenders: the log shows two at once"
    assert not [e for e in events if isinstance(e.data, UpdateFailed | UpdateRolledBack)]
    applied = [e.data for e in events if isinstance(e.data, UpdateApplied)]
    assert {(d.agent, d.previous) for d in applied} == {(a.id, A) for a in agents}

    status = json.loads(fleet(env, "update", "status", "--json").stdout)
    assert status["target"]["version"] == B
    assert all(a["on_target"] for a in status["agents"]), status
    assert {a["rollout"] for a in status["agents"]} == {"applied"}

    # The updated agent still runs jobs.
    result = fleet(env, "run", "-a", "u0", "--json", "--", "echo", "hello from B")
    assert json.loads(result.stdout)["jobs"][0]["status"] == "succeeded"

    # An agent that is down is still listed, with the version it last ran.
    agents[4].stop()
    status = json.loads(fleet(env, "update", "status", "--json").stdout)
    gone = next(a for a in status["agents"] if a["id"] == "u4")
    assert (gone["online"], gone["state"], gone["version"]) == (False, "offline", B)


async def test_tampered_and_unsigned_bundles_are_rejected(
    bus: Bus,
    launched: Callable[..., LaunchedAgent],
    release: Release,
    env: dict[str, str],
    tmp_path: Path,
) -> None:
    agent = launched("guard")
    await start_all(bus, [agent])

    tampered = tamper(release.bundle("1.3.0"), tmp_path / "tampered.bundle")
    refused = fleet(env, "update", "publish", str(tampered), check=False)
    assert refused.returncode == 5, refused.stderr
    assert "digest" in refused.stderr

    async def offer(version: str, bundle: Path) -> UpdateFailed:
        """Store and announce a bundle past the CLI's checks (an attacker with write
        access to the store); the agent's answer."""
        await put_raw_bundle(bus, version, bundle)
        fleet(env, "update", "announce", version)
        failed = await wait_update_event(bus, version, agent.id, "failed")
        assert isinstance(failed.data, UpdateFailed)
        return failed.data

    failed = await offer("1.3.0", tampered)
    assert failed.stage == "verify"
    assert "does not match its digest" in failed.reason
    presence = await wait_presence(bus, agent.id, lambda p: p.state == "unsupported")
    assert presence.version == A
    assert "1.3.0 failed here" in (presence.update or "")

    failed = await offer("1.4.0", release.bundle("1.4.0", signed=False))
    assert failed.reason == "bundle is unsigned"

    # Signed, but by a key the agent does not trust.
    stranger = make_release(tmp_path / "stranger")
    failed = await offer("1.5.0", stranger.bundle("1.5.0"))
    assert "not a trusted release key" in failed.reason

    presence = await wait_presence(bus, agent.id, lambda p: "1.5.0" in (p.update or ""))
    assert presence.version == A
    result = fleet(env, "run", "-a", agent.id, "--force", "--json", "--", "true")
    assert json.loads(result.stdout)["jobs"][0]["status"] == "succeeded"


async def test_a_bundle_that_cannot_start_is_rolled_back_and_halts_the_rollout(
    bus: Bus,
    launched: Callable[..., LaunchedAgent],
    release: Release,
    env: dict[str, str],
    master: MasterProcess,
) -> None:
    canary, other = launched("canary-a", health_timeout=20), launched("canary-b")
    await start_all(bus, [canary, other])
    fleet(env, "update", "publish", str(release.bundles[BROKEN]))
    fleet(env, "update", "announce", BROKEN, "--canary", "1", "--max-failures", "0")

    rolled = await wait_update_event(bus, BROKEN, canary.id, "rolled_back", timeout=90)
    assert isinstance(rolled.data, UpdateRolledBack)
    assert rolled.data.restored == A
    assert "exited with code 1 before it was healthy" in rolled.data.reason
    back = await wait_presence(bus, canary.id, lambda p: p.state == "unsupported")
    assert back.version == A
    assert "failed here" in (back.update or "")

    halted = await wait_update_event(bus, BROKEN, None, "rollout_halted", timeout=30)
    assert isinstance(halted.data, UpdateRolloutHalted)
    assert halted.data.failures == 1
    waiting = await wait_presence(bus, other.id, lambda p: "halted" in (p.update or ""))
    assert waiting.version == A
    events = await update_events(bus)
    assert not [e for e in events if getattr(e.data, "agent", None) == other.id], (
        "the rollout must not reach beyond the canary"
    )
    # The restored agent works, and does not loop on the bad version.
    result = fleet(env, "run", "-a", canary.id, "--force", "--json", "--", "true")
    assert json.loads(result.stdout)["jobs"][0]["status"] == "succeeded"
    rollbacks = [e for e in await update_events(bus) if isinstance(e.data, UpdateRolledBack)]
    assert len(rollbacks) == 1
    assert canary.proc is not None
    assert canary.proc.poll() is None, "the launcher keeps running"

    # Resumed on command: the rest of the fleet tries, fails the same way, and the
    # rollout halts again; the failed canary does not try a second time.
    fleet(env, "update", "resume")
    again = await wait_update_event(bus, BROKEN, other.id, "rolled_back", timeout=90)
    assert again.data.restored == A
    subject = bus.subjects.update_event(BROKEN, "rollout_halted")
    second = await nth_event(bus, subject, 2, timeout=30)
    assert "canary-b" in second.data.reason
    assert len([e for e in await update_events(bus) if isinstance(e.data, UpdateRolledBack)]) == 2


async def test_server_restart_during_download_still_ends_on_b(
    bus: Bus,
    launched: Callable[..., LaunchedAgent],
    release: Release,
    env: dict[str, str],
    nats_server: NatsServer,
) -> None:
    # ~180 KB at 40 KB/s: about 4.5 s per download, so the restart lands inside one.
    agents = [launched(f"r{i}", update_rate_bytes_s=40_000) for i in range(2)]
    await start_all(bus, agents)
    fleet(env, "update", "publish", str(release.bundles[B]))
    fleet(env, "update", "set", "retry_after_s", "0.5")
    fleet(env, "update", "announce", B, "--max-concurrent", "2")
    first = await wait_update_event(bus, B, agents[0].id, "token_acquired")
    assert isinstance(first.data, UpdateTokenAcquired)

    restarted_ns = time.time_ns()
    nats_server.restart(kill=True)
    await bus.wait_reconnected(0, timeout=30)

    for agent in agents:
        await wait_update_event(bus, B, agent.id, "applied", timeout=150)
        presence = await wait_presence(bus, agent.id, lambda p: p.version == B, timeout=60)
        assert presence.state == "ready"
    events = await update_events(bus)
    assert not [e for e in events if isinstance(e.data, UpdateFailed | UpdateRolledBack)]
    held: dict[str, int] = {}
    spans = []
    for e in events:
        if isinstance(e.data, UpdateTokenAcquired):
            held[e.data.agent] = e.envelope.ts
        elif isinstance(e.data, UpdateTokenReleased):
            spans.append((held.pop(e.data.agent), e.envelope.ts))
    assert any(start < restarted_ns < end for start, end in spans), (
        "the server went down while no download was under way"
    )


async def test_updates_stop_visibly_and_unsupported_agents_are_refused(
    bus: Bus,
    launched: Callable[..., LaunchedAgent],
    agent_factory: Callable[..., AgentProcess],
    release: Release,
    env: dict[str, str],
) -> None:
    willing = launched("willing")
    unwilling = launched("unwilling", auto_update=False)
    await start_all(bus, [willing, unwilling])
    stamped = await agent_factory("stamped", version="0.9.0", auto_update=False).started(bus)

    fleet(env, "update", "publish", str(release.bundles[B]))
    fleet(env, "update", "set", "max_concurrent", "0")
    fleet(env, "update", "announce", B)

    refused = await wait_presence(bus, willing.id, lambda p: p.update is not None)
    assert refused.update == f"downloads of {B} refused: update.max_concurrent = 0"
    assert (refused.state, refused.version) == ("ready", A)
    off = await wait_presence(bus, unwilling.id, lambda p: p.state == "unsupported")
    assert off.version == A
    assert "auto_update = false" in (off.update or "")
    old = await wait_presence(bus, stamped.id, lambda p: p.state == "unsupported")
    assert old.version == "0.9.0"

    said = [e.data for e in await _agent_events(bus) if isinstance(e.data, AgentUnsupported)]
    assert {d.agent for d in said} == {unwilling.id, stamped.id}
    status = json.loads(fleet(env, "update", "status", "--json").stdout)
    states = {a["id"]: (a["version"], a["state"]) for a in status["agents"]}
    assert states == {
        "willing": (A, "ready"),
        "unwilling": (A, "unsupported"),
        "stamped": ("0.9.0", "unsupported"),
    }

    no = fleet(env, "run", "-a", stamped.id, "--", "true", check=False)
    assert no.returncode == 2
    assert "unsupported" in no.stderr
    assert "--force" in no.stderr
    yes = fleet(env, "run", "-a", stamped.id, "--force", "--json", "--", "true")
    assert json.loads(yes.stdout)["jobs"][0]["status"] == "succeeded"

    # Slots again: the willing agent updates, the unwilling one stays where it is.
    fleet(env, "update", "set", "max_concurrent", "1")
    await wait_update_event(bus, B, willing.id, "applied", timeout=90)
    assert (await wait_presence(bus, unwilling.id, lambda p: True)).version == A

    # A fleet-wide disable makes the willing ones unsupported too, on the next target.
    fleet(env, "update", "disable")
    fleet(env, "update", "publish", str(release.bundles[A]))
    fleet(env, "update", "announce", A, "--allow-downgrade")
    disabled = await wait_presence(bus, willing.id, lambda p: p.state == "unsupported")
    assert "disabled fleet-wide" in (disabled.update or "")


async def _agent_events(bus: Bus) -> list[Any]:
    from bus import decode_event
    from bus.log import read_log

    records = await read_log(bus, bus.subjects.events_stream, f"{bus.subjects.prefix}.evt.agent.>")
    return [decode_event(r.data) for r in records]


async def test_a_version_that_never_reports_healthy_is_rolled_back_at_the_deadline(
    bus: Bus, launched: Callable[..., LaunchedAgent], release: Release, env: dict[str, str]
) -> None:
    agent = launched("patient", health_timeout=3)
    await start_all(bus, [agent])
    fleet(env, "update", "publish", str(release.bundles[SILENT]))
    fleet(env, "update", "announce", SILENT)
    rolled = await wait_update_event(bus, SILENT, agent.id, "rolled_back", timeout=60)
    assert rolled.data.reason == "not healthy within 3s"
    assert rolled.data.restored == A
    presence = await wait_presence(bus, agent.id, lambda p: p.state == "unsupported")
    assert presence.version == A
    assert agent.root.joinpath("current").resolve().name == A


async def test_canaries_first_then_the_master_lets_everyone_update(
    bus: Bus,
    launched: Callable[..., LaunchedAgent],
    release: Release,
    env: dict[str, str],
    master: MasterProcess,
) -> None:
    agents = [launched(f"c{i}") for i in range(3)]
    await start_all(bus, agents)
    fleet(env, "update", "publish", str(release.bundles[B]))
    fleet(env, "update", "announce", B, "--canary", "1")
    for agent in agents:
        await wait_update_event(bus, B, agent.id, "applied", timeout=90)
    events = await update_events(bus)
    order = [
        (type(e.data).__name__, e.data.agent)
        for e in events
        if isinstance(e.data, UpdateTokenAcquired | UpdateApplied)
    ]
    canary_applied = order.index(("UpdateApplied", "c0"))
    others_started = min(order.index(("UpdateTokenAcquired", a)) for a in ("c1", "c2"))
    assert canary_applied < others_started, order
    stage = json.loads(fleet(env, "update", "status", "--json").stdout)["stage"]
    assert stage == "all"
