"""``fleet-agentd``'s command line, run as real processes."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

import pytest
from agents import AGENTD
from natsserver import free_port

from agentd.config import AgentConfig


def agentd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([AGENTD, *args], capture_output=True, text=True, timeout=timeout)


def test_create_config_is_commented_valid_toml(tmp_path: Path) -> None:
    printed = agentd("-C", "-")
    assert printed.returncode == 0
    parsed = tomllib.loads(printed.stdout)
    AgentConfig.model_validate(parsed)
    for key in (
        "id",
        "server",
        "data_dir",
        "nkey_file",
        "labels",
        "max_jobs",
        "auto_update",
        "run_as_mode",
        "trust_file",
    ):
        assert f"{key} =" in printed.stdout or f"[{key}]" in printed.stdout, key
    assert printed.stdout.count("\n# ") > 15  # every key has its comment

    path = tmp_path / "agentd.toml"
    assert agentd("-C", str(path)).returncode == 0
    assert path.stat().st_mode & 0o777 == 0o640
    again = agentd("-C", str(path))
    assert again.returncode == 2
    assert "exists already" in again.stderr


def test_update_config_adds_keys_and_keeps_values(tmp_path: Path) -> None:
    path = tmp_path / "agentd.toml"
    path.write_text('# mine\nid = "web-9"\nmax_jobs = 9\n\n[labels]\nrole = "db"\n')
    result = agentd("-U", str(path))
    assert result.returncode == 0
    assert "added" in result.stderr
    text = path.read_text()
    assert text.startswith("# mine\n")
    config = AgentConfig.model_validate(tomllib.loads(text))
    assert (config.id, config.max_jobs, config.labels) == ("web-9", 9, {"role": "db"})
    assert "heartbeat_s = 5.0" in text
    assert "already has every key" in agentd("-U", str(path)).stderr


def test_pam_file_has_auth_and_account_only() -> None:
    result = agentd("-P", "-")
    lines = [ln.split()[0] for ln in result.stdout.splitlines() if ln and not ln.startswith("#")]
    assert lines == ["auth", "account"]
    assert "nullok" not in result.stdout.replace("No nullok", "")


def test_service_file(tmp_path: Path) -> None:
    unit = agentd("-S", "-", "-c", str(tmp_path / "a.toml")).stdout
    assert f"-m updater.launcher --root /opt/fleetbus -- -c {tmp_path / 'a.toml'}" in unit
    assert "KillMode=mixed" in unit
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit


@pytest.mark.skipif(Path("/run/systemd/system").is_dir(), reason="would really install")
@pytest.mark.parametrize("flag", ["-I", "-R"])
def test_install_without_systemd_says_so(flag: str) -> None:
    result = agentd(flag)
    assert result.returncode == 2
    assert "systemd is not running" in result.stderr


def test_bad_config_is_a_clear_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('id = "a.b"\nmax_job = 3\n')
    result = agentd("-c", str(path))
    assert result.returncode == 2
    assert "agent id 'a.b' contains '.'" in result.stderr
    assert "max_job" in result.stderr
    missing = agentd("-c", str(tmp_path / "none.toml"))
    assert missing.returncode == 2
    assert "no such config file" in missing.stderr


def test_daemon_query_and_kill(tmp_path: Path) -> None:
    path = tmp_path / "agentd.toml"
    # No server listens there: the daemon waits for one, which is all this test needs.
    path.write_text(
        f'id = "d1"\nserver = "nats://127.0.0.1:{free_port()}"\ndata_dir = "{tmp_path / "data"}"\n'
    )
    assert agentd("-Q", "-c", str(path)).returncode == 3
    started = agentd("-d", "-c", str(path))
    assert started.returncode == 0, started.stderr
    try:
        query = agentd("-Q", "-c", str(path))
        assert query.returncode == 0
        assert "is running (pid" in query.stdout
        second = agentd("-c", str(path))
        assert second.returncode == 2
        assert "already running" in (tmp_path / "data" / "agentd.log").read_text() + second.stderr
    finally:
        killed = agentd("-K", "-c", str(path))
    assert killed.returncode == 0, killed.stderr
    assert agentd("-Q", "-c", str(path)).returncode == 3
    assert agentd("-K", "-c", str(path)).returncode == 3


def test_ops_files_match_what_the_agent_generates() -> None:
    import sys

    from agentd.service import pam_service, systemd_unit

    ops = Path(__file__).resolve().parent.parent / "ops"
    assert (ops / "pam" / "fleet-agentd").read_text() == pam_service()
    generated = systemd_unit(Path("/etc/fleetbus/agentd.toml")).replace(
        f"{sys.executable} -m updater.launcher", "/usr/bin/python3 -m updater.launcher"
    )
    assert (ops / "systemd" / "fleet-agentd.service").read_text() == generated
