"""`fleet ops status`, `export` and `import` under the generated server permissions:
an operator may watch the limits and take a backup (reads only); restoring writes every
kind of event, so it takes the admin key; a headless user may do neither."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from agents import FLEET, fleet_env, job_request, submit
from natsserver import NatsServer

from bus import ConnectSettings, Signer, connect, generate_seed, write_seed_file

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


async def run(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode is not None
    return subprocess.CompletedProcess(argv, proc.returncode, out.decode(), err.decode())


async def test_ops_commands_under_the_generated_permissions(
    server_factory: Callable[..., NatsServer], tmp_path: Path
) -> None:
    keys: dict[str, tuple[Path, str]] = {}
    for name in ("tester", "batch"):
        seed = generate_seed()
        write_seed_file(tmp_path / f"{name}.nk", seed)
        keys[name] = (tmp_path / f"{name}.nk", Signer(seed).public_key)
    admin_key = tmp_path / "admin.nk"
    env = fleet_env("nats://unused", admin_key)
    made = await run(FLEET, "keys", "gen", "admin", "admin", "-o", str(admin_key), env=env)
    assert made.returncode == 0, made.stderr
    keys["admin"] = (admin_key, made.stdout.strip())
    registry = tmp_path / "registry.toml"
    registry.write_text(
        f'[operators.tester]\npublic_key = "{keys["tester"][1]}"\n'
        f'[headless.batch]\npublic_key = "{keys["batch"][1]}"\n'
        f'[admins.admin]\npublic_key = "{keys["admin"][1]}"\n'
    )
    rendered = await run(FLEET, "ops", "server-config", "--registry", str(registry), env=env)
    assert rendered.returncode == 0, rendered.stderr
    hub = server_factory(name="hub", config=rendered.stdout)
    copy = server_factory(name="copy", config=rendered.stdout)

    def as_(name: str, url: str) -> dict[str, str]:
        return {**fleet_env(url, keys[name][0]), "FLEET_USER": name}

    for server in (hub, copy):
        init = await run(FLEET, "ops", "init", env=as_("admin", server.url))
        assert init.returncode == 0, init.stderr
    # An event only an agent (or the admin) may write, first in the log.
    admin = ConnectSettings(servers=[hub.url], nkey_file=admin_key, inbox_prefix="_INBOX_admin")
    async with await connect(admin) as bus:
        await bus.js.publish("fleet.evt.agent.web-1.online", b"not the operator's to write")
    settings = ConnectSettings(
        servers=[hub.url], nkey_file=keys["tester"][0], inbox_prefix="_INBOX_tester"
    )
    async with await connect(settings) as bus:
        for _ in range(3):
            await submit(bus, Signer.from_file(keys["tester"][0]), "web-1", job_request(["true"]))

    status = await run(FLEET, "ops", "status", "--json", env=as_("tester", hub.url))
    assert status.returncode == 0, status.stderr
    events = json.loads(status.stdout)["streams"][0]
    assert (events["stream"], events["messages"]) == ("FLEET_EVENTS", 4)
    backup = tmp_path / "fleet.export"
    exported = await run(
        FLEET, "ops", "export", str(backup), "--outputs", "--bundles", env=as_("tester", hub.url)
    )
    assert exported.returncode == 0, exported.stderr

    # Restoring is administration: refused to the operator, done by the admin.
    denied = await run(FLEET, "ops", "import", str(backup), env=as_("tester", copy.url))
    assert denied.returncode == 2
    assert "permission denied publishing to 'fleet.evt.agent.web-1.online'" in denied.stderr
    async with await connect(ConnectSettings(servers=[copy.url], nkey_file=admin_key)) as bus:
        assert (await bus.js.stream_info("FLEET_EVENTS")).state.messages == 0
    restored = await run(FLEET, "ops", "import", str(backup), "--json", env=as_("admin", copy.url))
    assert restored.returncode == 0, restored.stderr
    assert json.loads(restored.stdout)["restored"]["FLEET_EVENTS"] == 4

    # A headless user reads nothing of the log: neither status nor export.
    for argv in (("status",), ("export", str(tmp_path / "nope.export"))):
        refused = await run(FLEET, "ops", *argv, env=as_("batch", hub.url))
        assert refused.returncode == 2, (argv, refused.stderr)
        assert "permission" in refused.stderr.lower() or "denied" in refused.stderr.lower()
    assert not (tmp_path / "nope.export").exists()
