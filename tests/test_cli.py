"""The command lines, run as real processes: help, versions, keys, storage, exit codes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from natsserver import NatsServer, free_port, tls_config

from bus import read_seed_file
from bus.command import fleetbus_version

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
COMMANDS = {
    "fleet": "fleet",
    "fleet-agentd": "agentd",
    "fleet-master": "master",
    "fleet-headless": "headless",
}


def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})}
    )


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_answers_help_and_version(command: str) -> None:
    helped = run(str(BIN / command), "--help")
    assert helped.returncode == 0
    assert helped.stdout.startswith(f"usage: {command}")
    versioned = run(str(BIN / command), "--version")
    assert versioned.returncode == 0
    assert versioned.stdout.strip() == f"{command} {fleetbus_version()}"
    as_module = run(sys.executable, "-m", COMMANDS[command], "--version")
    assert as_module.stdout.strip().endswith(fleetbus_version())


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_bad_flags_are_usage_errors(command: str) -> None:
    result = run(str(BIN / command), "--no-such-flag")
    assert result.returncode == 2
    assert f"{command}: error:" in result.stderr
    assert result.stdout == ""


def test_keys_gen_writes_a_0400_seed_and_prints_the_public_key(tmp_path: Path) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path)} if os.geteuid() != 0 else {}
    out = tmp_path / "k" / "alice.nk"
    result = run(str(BIN / "fleet"), "keys", "gen", "operator", "alice", "-o", str(out), env=env)
    assert result.returncode == 0, result.stderr
    public = result.stdout.strip()
    assert re.fullmatch(r"U[A-Z2-7]{55}", public)
    assert out.stat().st_mode & 0o777 == 0o400
    seed = read_seed_file(out)
    assert seed.decode() not in result.stdout + result.stderr  # the seed is never printed

    again = run(str(BIN / "fleet"), "keys", "gen", "operator", "alice", "-o", str(out))
    assert again.returncode == 2
    assert "refusing to overwrite" in again.stderr

    forced = run(
        str(BIN / "fleet"), "keys", "gen", "operator", "alice", "-o", str(out), "--force", "--json"
    )
    doc = json.loads(forced.stdout)
    assert doc["kind"] == "operator"
    assert doc["name"] == "alice"
    assert doc["public_key"] != public
    assert doc["seed_file"] == str(out)


def test_keys_gen_refuses_unsafe_names(tmp_path: Path) -> None:
    result = run(str(BIN / "fleet"), "keys", "gen", "agent", "a.b", "-o", str(tmp_path / "x"))
    assert result.returncode == 2
    assert "'.'" in result.stderr


def test_ops_init_is_idempotent(nats_server: NatsServer) -> None:
    first = run(str(BIN / "fleet"), "ops", "init", "-s", nats_server.url, "--json")
    assert first.returncode == 0, first.stderr
    assert len(json.loads(first.stdout)["created"]) == 8
    second = run(str(BIN / "fleet"), "ops", "init", "--json", env={"FLEET_SERVER": nats_server.url})
    assert second.returncode == 0
    assert json.loads(second.stdout) == {
        "created": [],
        "unchanged": json.loads(first.stdout)["created"],
        "changed": [],
        "refused": [],
    }


def test_ops_init_without_a_server_is_exit_1() -> None:
    result = run(str(BIN / "fleet"), "ops", "init", "-s", f"nats://127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert "cannot connect" in result.stderr
    assert result.stdout == ""


def test_headless_names_what_it_misses() -> None:
    result = run(str(BIN / "fleet-headless"))
    assert result.returncode == 2
    assert "required: -u/--user, -p/--secret, --agent" in result.stderr


def test_readme_starts_with_install_demo_and_tests_and_ci_uses_them() -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```sh\n(.*?)```", readme, re.S)
    assert block is not None
    assert readme.index(block.group(0)) < readme.index("## ")  # the very first thing
    install, demo, test = block.group(1).strip().splitlines()
    assert install.startswith("pip install")
    assert demo == "fleet demo"
    ci = (ROOT / ".ci" / "run").read_text()
    assert install.replace("pip install", "pip install --quiet") in ci
    assert re.search(rf"^{re.escape(test)} \|\| status", ci, re.M)


def test_commands_speak_tls_with_a_ca(
    server_factory: Callable[..., NatsServer], tmp_path: Path
) -> None:
    from tlsutil import make_ca_and_server_cert

    tls = make_ca_and_server_cert(tmp_path / "tls")
    server = server_factory(config=tls_config(tls.cert, tls.key, tls.ca))
    url = server.url.replace("nats://", "tls://")
    ok = run(str(BIN / "fleet"), "ops", "init", "-s", url, "--tls-ca", str(tls.ca), "--json")
    assert ok.returncode == 0, ok.stderr
    assert len(json.loads(ok.stdout)["created"]) == 8
    by_env = run(str(BIN / "fleet"), "ops", "init", "-s", url, env={"FLEET_TLS_CA": str(tls.ca)})
    assert by_env.returncode == 0, by_env.stderr
    untrusted = run(str(BIN / "fleet"), "ops", "init", "-s", url)
    assert untrusted.returncode == 1
