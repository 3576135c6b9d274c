"""``fleet-agentd --simulate N``: a few hundred agents in one process, under the generated
least-privilege permissions, through the real delivery path, including jobs submitted
while the whole simulated fleet is away."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from agents import AGENTD, FLEET, fleet_env, job_request, permissive_grant, submit, toml_value
from deployment import run_cli as run
from natsserver import NatsServer

from agentd.config import AgentConfig
from agentd.identity import ensure_identity
from agentd.simulate import simulated_configs
from bus import (
    Bus,
    ConnectSettings,
    Signer,
    UsageError,
    connect,
    generate_seed,
    write_seed_file,
)
from bus.log import read_log
from bus.tasks import first_of
from fleet.follow import JobsReader

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

AGENTS = int(os.environ.get("FLEET_TEST_SIMULATED", "300"))


def key(tmp: Path, name: str) -> tuple[Path, str]:
    """A new seed file and its public key."""
    path = tmp / f"{name}.nk"
    seed = generate_seed()
    write_seed_file(path, seed)
    return path, Signer(seed).public_key


def test_simulated_identities_are_numbered_each_with_its_own_directory(tmp_path: Path) -> None:
    base = AgentConfig(id="sim", data_dir=tmp_path)
    configs = simulated_configs(base, 3)
    assert [c.id for c in configs] == ["sim-0001", "sim-0002", "sim-0003"]
    assert [c.data_dir for c in configs] == [tmp_path / c.id for c in configs]
    assert len({ensure_identity(c).public_key for c in configs}) == 3
    with pytest.raises(UsageError, match="own key"):
        simulated_configs(base.model_copy(update={"nkey_file": tmp_path / "k.nk"}), 2)
    with pytest.raises(UsageError, match="1 to"):
        simulated_configs(base, 0)


async def _alive(proc: subprocess.Popen[bytes], waiting: Awaitable[object]) -> None:
    """Await ``waiting``, failing at once if the simulated fleet's process dies first."""
    died = asyncio.ensure_future(asyncio.to_thread(proc.wait))
    try:
        done = await first_of(waiting, died)
    finally:
        died.cancel()
    assert done is not None
    assert done is not died, f"the simulated fleet's process exited ({proc.returncode})"
    done.result()


async def _all_online(bus: Bus, ids: set[str], timeout: float) -> None:
    kv = await bus.key_value(bus.subjects.presence_bucket)
    watcher = await kv.watch(">")
    seen: set[str] = set()
    try:
        async with asyncio.timeout(timeout):
            async for entry in watcher:
                if entry is not None and entry.value:
                    seen.add(entry.key)
                if ids <= seen:
                    return
    except TimeoutError:
        raise AssertionError(f"{len(ids - seen)} simulated agents never came online") from None
    finally:
        await watcher.stop()


async def _run_one_job_each(bus: Bus, signer_key: Path, ids: list[str]) -> dict[str, str]:
    """Submit one job per agent and wait until every one has finished; agent → job id."""
    signer = Signer.from_file(signer_key)
    reader = await JobsReader.for_new_jobs(bus, None)
    try:
        watches = []
        jobs = {}
        for agent in ids:
            jobs[agent] = await submit(bus, signer, agent, job_request(["true"]))
            watches.append(reader.watch(agent, jobs[agent]))
        async with asyncio.timeout(300):
            await asyncio.gather(*(w.done.wait() for w in watches))
        assert Counter(w.view.status for w in watches if w.view) == {"succeeded": len(ids)}
    finally:
        await reader.close()
    return jobs


async def test_hundreds_of_simulated_agents_run_jobs_and_catch_up_after_an_outage(
    server_factory: Callable[..., NatsServer], tmp_path: Path
) -> None:
    operator_key, operator_pub = key(tmp_path, "tester")
    admin_key = tmp_path / "admin.nk"
    made = await run(FLEET, "keys", "gen", "admin", "admin", "-o", str(admin_key))
    assert made.returncode == 0, made.stderr
    trust = tmp_path / "trust.toml"
    trust.write_text(permissive_grant(operator_pub))
    data = tmp_path / "sim"
    base = AgentConfig(id="sim", data_dir=data, trust_file=trust)
    configs = simulated_configs(base, AGENTS)
    ids = [c.id for c in configs]
    # Each simulated identity has its own key, registered like a real agent's.
    agents = "".join(
        f'[agents.{c.id}]\npublic_key = "{ensure_identity(c).public_key}"\n' for c in configs
    )
    registry = tmp_path / "registry.toml"
    registry.write_text(
        agents
        + f'[operators.tester]\npublic_key = "{operator_pub}"\n'
        + f'[admins.admin]\npublic_key = "{made.stdout.strip()}"\n'
    )
    rendered = await run(FLEET, "ops", "server-config", "--registry", str(registry))
    assert rendered.returncode == 0, rendered.stderr
    server = server_factory(config=rendered.stdout)
    init = await run(FLEET, "ops", "init", env=fleet_env(server.url, admin_key))
    assert init.returncode == 0, init.stderr
    config = tmp_path / "agentd.toml"
    settings = {
        "id": "sim",
        "server": server.url,
        "data_dir": str(data),
        "trust_file": str(trust),
        "heartbeat_s": 5.0,
        "shutdown_grace_s": 5.0,
        "log_level": "INFO",
    }
    config.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in settings.items()))
    log_path = tmp_path / "simulated.log"

    def start() -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as log:
            return subprocess.Popen(
                [AGENTD, "-c", str(config), "--simulate", str(AGENTS)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )

    def stop(proc: subprocess.Popen[bytes]) -> int:
        proc.terminate()
        try:
            return proc.wait(120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)

    admin_settings = ConnectSettings(
        servers=[server.url], nkey_file=admin_key, inbox_prefix="_INBOX_admin"
    )
    async with await connect(admin_settings) as admin:
        proc = start()
        try:
            await _alive(proc, _all_online(admin, set(ids), 240))
            await _alive(proc, _run_one_job_each(admin, operator_key, ids))
            # Each has run a job, so each has caught up once: idle now, none of them
            # keeps a consumer on the server.
            infos = await admin.js.consumers_info(admin.subjects.events_stream)
            assert [c.name for c in infos if c.name.startswith("agent_")] == []
        finally:
            code = stop(proc)
        assert code == 0, log_path.read_text()[-3000:]
        assert all((data / a / "journal.jsonl").exists() for a in ids)

        # Submitted while the whole simulated fleet is away: each runs once on its return.
        signer = Signer.from_file(operator_key)
        reader = await JobsReader.for_new_jobs(admin, None)
        try:
            watches = []
            for agent in ids:
                job_id = await submit(admin, signer, agent, job_request(["true"]))
                watches.append(reader.watch(agent, job_id))
            proc = start()
            try:
                async with asyncio.timeout(300):
                    await _alive(proc, asyncio.gather(*(w.done.wait() for w in watches)))
            finally:
                code = stop(proc)
        finally:
            await reader.close()
        assert Counter(w.view.status for w in watches if w.view) == {"succeeded": AGENTS}
        assert code == 0, log_path.read_text()[-3000:]
        records = await read_log(admin, admin.subjects.events_stream, "fleet.evt.job.>")
        ends = Counter(
            (r.subject.split(".")[3], r.subject.split(".")[4])
            for r in records
            if r.subject.endswith((".started", ".finished"))
        )
        # Exactly one started and one finished per job, none twice after the restart.
        assert set(ends.values()) == {2}
        assert len(ends) == 2 * AGENTS
