"""Least privilege for real: a server with the generated config, violations observed."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from agents import FLEET, AgentProcess, MasterProcess, fleet_env
from natsserver import NatsServer
from observe import listening_port, scrape_until
from samples import sample_envelope

from bus import (
    AuthError,
    Bus,
    ConnectSettings,
    PermissionDeniedError,
    Signer,
    connect,
    generate_seed,
    write_seed_file,
)
from bus.metrics import sample
from schemas import JobFinished

pytestmark = pytest.mark.slow


def key(tmp: Path, name: str) -> tuple[Path, str]:
    path = tmp / f"{name}.nk"
    seed = generate_seed()
    write_seed_file(path, seed)
    return path, Signer(seed).public_key


async def denied(bus: Bus, subject: str) -> str:
    return str(await bus.wait_denied(subject, timeout=5))


async def test_each_principal_gets_only_what_its_role_needs(
    server_factory: Callable[..., NatsServer], tmp_path: Path
) -> None:
    keys = {n: key(tmp_path, n) for n in ("admin", "tester", "web-1", "web-2", "master")}
    registry = tmp_path / "registry.toml"
    registry.write_text(
        f'[master]\npublic_key = "{keys["master"][1]}"\n'
        + "".join(f'[agents.{a}]\npublic_key = "{keys[a][1]}"\n' for a in ("web-1", "web-2"))
        + f'[operators.tester]\npublic_key = "{keys["tester"][1]}"\n'
        + f'[admins.admin]\npublic_key = "{keys["admin"][1]}"\n'
    )
    rendered = await asyncio.to_thread(
        subprocess.run,
        [FLEET, "ops", "server-config", "--registry", str(registry)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert rendered.returncode == 0, rendered.stderr
    server = server_factory(config=rendered.stdout)

    admin = ConnectSettings(
        servers=[server.url], nkey_file=keys["admin"][0], inbox_prefix="_INBOX_admin"
    )
    init = await asyncio.create_subprocess_exec(
        FLEET, "ops", "init", env=fleet_env(server.url, keys["admin"][0])
    )
    assert await init.wait() == 0

    async with await connect(admin) as admin_bus:
        agents = []
        for agent_id in ("web-1", "web-2"):
            agent = AgentProcess(
                tmp_path,
                server.url,
                agent_id,
                nkey_file=str(keys[agent_id][0]),
                trusted=[keys["tester"][1]],
            )
            agents.append(await agent.started(admin_bus))
        try:
            master = MasterProcess(
                tmp_path,
                server.url,
                nkey_file=str(keys["master"][0]),
                snapshot_every=2,
                checkpoint_every=2,
            )
            master.start()
            await master.wait_ready(admin_bus)
            # The whole round trip works under least privilege, the master folding it.
            run = await asyncio.create_subprocess_exec(
                FLEET,
                "run",
                "-a",
                "web-1",
                "--",
                "echo",
                "allowed",
                env=fleet_env(server.url, keys["tester"][0]),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(run.communicate(), 60)
            assert run.returncode == 0, err.decode() + agents[0].log()[-3000:]
            assert out == b"allowed\n"
            jobs = await asyncio.create_subprocess_exec(
                FLEET,
                "jobs",
                "--json",
                env=fleet_env(server.url, keys["tester"][0]),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            listed, err = await asyncio.wait_for(jobs.communicate(), 60)
            assert jobs.returncode == 0, err.decode()
            assert b'"status": "succeeded"' in listed
            # Its metrics need nothing beyond the master's grants (a denial would be logged).
            port = await listening_port(master.log, "metrics and health")
            scraped = await scrape_until(f"http://127.0.0.1:{port}/metrics", lambda _: True)
            assert sample(scraped, "fleet_scrape_collector_success", collector="master") == 1
            assert sample(scraped, "fleet_stream_messages", stream="FLEET_OUTPUT") >= 1
            master.stop()
            assert "denied" not in master.log(), master.log()[-3000:]

            # Agent web-1's key against everything of web-2's.
            a = ConnectSettings(
                servers=[server.url], nkey_file=keys["web-1"][0], inbox_prefix="_INBOX_web-1"
            )
            async with await connect(a) as bus:
                forged = sample_envelope(
                    JobFinished(
                        job_id="01JB3Z0000000000000000000A", agent="web-2", status="succeeded"
                    )
                )
                with pytest.raises(
                    PermissionDeniedError, match=r"publishing to 'fleet\.evt\.job\.web-2"
                ):
                    await bus.publish_event(forged, timeout=1.0)
                for subject in (
                    "$KV.fleet-presence.web-2",  # speak for web-2's presence
                    # catch up on its jobs:
                    "$JS.API.CONSUMER.DURABLE.CREATE.FLEET_EVENTS.agent_web-2_catchup",
                    "$JS.API.CONSUMER.CREATE.FLEET_EVENTS.agent_web-2_catchup.fleet.evt.job.web-2.>",
                    "$JS.API.DIRECT.GET.FLEET_EVENTS.fleet.evt.job.web-2.x.submitted",  # read them
                    "fleet.evt.job.web-1.x.submitted",  # submit jobs to itself
                ):
                    await bus.nc.publish(subject, b"{}")
                    assert "publishing to" in await denied(bus, subject)
                for subject in (
                    "fleet.ctl.web-2.*",  # answer web-2's control
                    "_INBOX_tester.>",  # read others' replies
                    "_INBOX.>",
                    "fleet.evt.job.web-2.*.submitted",  # hear web-2's jobs live
                    "fleet.evt.job.web-2.*.cancel_requested",
                    "fleet.evt.job.*.*.submitted",
                ):
                    await bus.nc.subscribe(subject)
                    assert "subscribing to" in await denied(bus, subject)
        finally:
            for agent in agents:
                agent.stop()

    stranger = tmp_path / "stranger.nk"
    write_seed_file(stranger, generate_seed())
    with pytest.raises(AuthError):
        await connect(
            ConnectSettings(servers=[server.url], nkey_file=stranger, connect_timeout_s=1)
        )


@pytest.mark.timeout(180)
async def test_self_update_works_under_least_privilege(
    server_factory: Callable[..., NatsServer], tmp_path: Path
) -> None:
    from updates import LaunchedAgent, fleet, make_release, wait_update_event

    release = make_release(tmp_path / "release")
    keys = {n: key(tmp_path, n) for n in ("admin", "tester", "web-1", "master")}
    registry = tmp_path / "registry.toml"
    registry.write_text(
        f'[master]\npublic_key = "{keys["master"][1]}"\n'
        f'[agents.web-1]\npublic_key = "{keys["web-1"][1]}"\n'
        f'[operators.tester]\npublic_key = "{keys["tester"][1]}"\n'
        f'[admins.admin]\npublic_key = "{keys["admin"][1]}"\n'
    )
    rendered = fleet(dict(os.environ), "ops", "server-config", "--registry", str(registry))
    server = server_factory(config=rendered.stdout)
    fleet(fleet_env(server.url, keys["admin"][0]), "ops", "init")
    operator = fleet_env(server.url, keys["tester"][0])
    admin = ConnectSettings(
        servers=[server.url], nkey_file=keys["admin"][0], inbox_prefix="_INBOX_admin"
    )
    agent = LaunchedAgent(
        tmp_path,
        server.url,
        "web-1",
        nkey_file=str(keys["web-1"][0]),
        release_keys=[release.public_key],
        trusted=[keys["tester"][1]],
    ).install(release.bundle("1.0.0"), release.public_key)
    async with await connect(admin) as admin_bus:
        try:
            await agent.started(admin_bus)
            fleet(operator, "update", "publish", str(release.bundle("1.1.0")))
            fleet(operator, "update", "announce", "1.1.0")
            try:
                await wait_update_event(admin_bus, "1.1.0", "web-1", "applied", timeout=60)
            except Exception:
                raise AssertionError(agent.log()[-4000:]) from None
            assert "denied" not in agent.log(), agent.log()[-3000:]
        finally:
            agent.stop()
