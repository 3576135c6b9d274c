"""The daemons as an operator drives them (issue 15, item 6): relative paths, log levels,
``--check``, truthful reload and status, a second start, ``FLEET_SERVER`` and the wait for
a server. Real ``fleet-agentd`` and ``fleet-master`` processes, real nats-server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from agents import AGENTD, MASTER, AgentProcess, MasterProcess, permissive_grant, wait_presence
from faults import wait_until
from natsserver import NatsServer, free_port

from bus import Bus, Signer, generate_seed
from bus.keys import public_key_of
from bus.reloadreport import read_reload_report

Operator = tuple[Path, Signer]


def run(
    argv: list[str],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


def wait_log(path: Path, text: str, timeout: float = 30.0) -> str:
    """The daemon's log once it holds ``text``."""
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        content = path.read_text(errors="replace") if path.exists() else ""
        if text in content:
            return content
        time.sleep(0.1)  # another process's file: nothing to await
    raise AssertionError(f"{path} never said {text!r}")


async def test_an_agent_started_with_relative_paths_keeps_them_after_detaching(
    tmp_path: Path, nats_server: NatsServer, bus: Bus, operator: Operator
) -> None:
    """``-d -c agentd.toml`` from the config's directory, with ``data_dir`` and
    ``trust_file`` relative too: the detached agent (in ``/``) finds every file, the unit
    names the absolute path, and a second ``-d`` says on the terminal that one runs."""
    (tmp_path / "trust.toml").write_text(permissive_grant(operator[1].public_key))
    (tmp_path / "agentd.toml").write_text(
        f'id = "rel-1"\nserver = "{nats_server.url}"\ndata_dir = "data"\n'
        'trust_file = "trust.toml"\nheartbeat_s = 0.5\n'
    )
    started = run([AGENTD, "-d", "-c", "agentd.toml"], cwd=tmp_path)
    assert started.returncode == 0, started.stderr
    try:
        await wait_presence(bus, "rel-1", lambda p: p.state == "ready")
        assert (tmp_path / "data" / "agent.nk").exists()
        second = run([AGENTD, "-d", "-c", "agentd.toml"], cwd=tmp_path)
        assert second.returncode == 2
        assert "already running" in second.stderr
        unit = run([AGENTD, "-S", "-", "-c", "agentd.toml"], cwd=tmp_path).stdout
        assert f"-c {tmp_path / 'agentd.toml'}" in unit
    finally:
        stopped = run([AGENTD, "-K", "-c", "agentd.toml"], cwd=tmp_path)
    assert stopped.returncode == 0, stopped.stderr


def test_log_levels_take_the_jams_names_in_any_case(tmp_path: Path) -> None:
    config = tmp_path / "agentd.toml"
    config.write_text(f'id = "l1"\ndata_dir = "{tmp_path / "data"}"\nlog_level = "warn"\n')
    for level in ("WARN", "trace", "Warning", "ERROR"):
        checked = run([AGENTD, "-l", level, "--check", "-c", str(config)])
        assert checked.returncode == 0, checked.stderr
        assert run([MASTER, "-l", level, "--check"]).returncode == 0
    bad = run([AGENTD, "-l", "loud", "--check", "-c", str(config)])
    assert bad.returncode == 2
    assert "'loud' is not a log level" in bad.stderr
    assert "TRACE, DEBUG, INFO, WARN" in bad.stderr
    config.write_text(f'id = "l1"\ndata_dir = "{tmp_path / "data"}"\nlog_level = "verbose"\n')
    bad_file = run([AGENTD, "--check", "-c", str(config)])
    assert bad_file.returncode == 2
    assert "log_level" in bad_file.stderr


def test_check_says_what_a_start_would_stop_on(tmp_path: Path) -> None:
    config = tmp_path / "agentd.toml"
    data = tmp_path / "data"
    config.write_text(f'id = "c1"\ndata_dir = "{data}"\ntrust_file = "trust.toml"\n')
    (tmp_path / "trust.toml").write_text("[[grant]]\nname = 'x'\n")
    bad_trust = run([AGENTD, "--check", "-c", str(config)])
    assert bad_trust.returncode == 2
    assert "invalid trust file" in bad_trust.stderr

    (tmp_path / "trust.toml").write_text(permissive_grant(public_key_of(generate_seed())))
    good = run([AGENTD, "--check", "-c", str(config)])
    assert good.returncode == 0, good.stderr
    assert "OK: agent c1" in good.stdout
    assert "1 grants" in good.stdout
    assert not data.exists(), "--check must not create state"

    data.mkdir()
    key = data / "agent.nk"
    key.write_bytes(generate_seed())
    key.chmod(0o644)
    unsafe = run([AGENTD, "--check", "-c", str(config)])
    assert unsafe.returncode == 2
    assert str(key) in unsafe.stderr

    master = tmp_path / "master.toml"
    master.write_text(f'data_dir = "{tmp_path / "m"}"\ntls_ca = "ca.pem"\n')
    missing = run([MASTER, "-c", str(master), "--check"])
    assert missing.returncode == 2
    assert f"tls_ca: {tmp_path / 'ca.pem'}: no such file" in missing.stderr
    master.write_text(f'data_dir = "{tmp_path / "m"}"\n')
    fine = run([MASTER, "-c", str(master), "--check"])
    assert fine.returncode == 0, fine.stderr
    assert "OK: server" in fine.stdout
    assert run([MASTER]).returncode == 2  # neither a command nor --check


def test_an_agent_without_a_server_uses_fleet_server_and_says_it_waits(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "agentd.toml"
    config.write_text(f'id = "env-1"\ndata_dir = "{tmp_path / "data"}"\n')
    log = tmp_path / "agentd.log"
    env = {**os.environ, "FLEET_SERVER": f"nats://127.0.0.1:{port}"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([AGENTD, "-c", str(config)], stdout=out, stderr=out, env=env)
    try:
        text = wait_log(log, "still trying", timeout=15)
        assert f"connecting to nats://127.0.0.1:{port}" in text
        assert f"cannot reach nats://127.0.0.1:{port}" in text
        server = NatsServer(tmp_path / "late", port=port).start()
        try:
            wait_log(log, f"connected to 127.0.0.1:{port}", timeout=30)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
            server.stop()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_master_reload_start_and_status_tell_the_truth(
    tmp_path: Path,
    bus: Bus,
    agent_factory: Callable[..., AgentProcess],
    master_factory: Callable[..., MasterProcess],
) -> None:
    await agent_factory("web-1").started(bus)
    someone_else = public_key_of(generate_seed())
    master = master_factory(agents={"web-1": {"public_key": someone_else}})
    cfg = str(master.config_path)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return run([MASTER, *args, "-c", cfg])

    down = cli("status", "--json")
    assert down.returncode == 3
    assert json.loads(down.stdout)["master"]["running"] is False
    assert cli("start").returncode == 0
    try:
        await master.wait_ready(bus)
        again = cli("start")
        assert again.returncode == 2
        assert "already running" in again.stderr

        status = cli("status", "--json")
        assert status.returncode == 0
        [row] = [a for a in json.loads(status.stdout)["agents"] if a["id"] == "web-1"]
        assert row["wrong_key"] is True
        assert row["connected"] is False
        assert "WRONG KEY" in cli("status").stdout

        reloaded = cli("reload")
        assert reloaded.returncode == 0, reloaded.stderr
        assert "reloaded; config hash" in reloaded.stderr

        # A file the daemon itself refuses (the command checks it first, so signal
        # directly, as `systemctl reload` does): its verdict says so.
        pid = int((Path(master.settings["data_dir"]) / "master.pid").read_text())
        master.config_path.write_text(master.config_path.read_text() + "bogus = 1\n")
        os.kill(pid, signal.SIGHUP)
        pid_path = Path(master.settings["data_dir"]) / "master.pid"
        await wait_until(
            lambda: (r := read_reload_report(pid_path)) is not None and not r.ok, 10, "a verdict"
        )
        report = read_reload_report(pid_path)
        assert report is not None
        assert "refused" in report.message
        assert "bogus" in report.message
        master.write_config()
    finally:
        assert cli("stop").returncode == 0


@pytest.mark.parametrize("unit", ["fleet-agentd.service", "fleet-master.service"])
def test_units_are_hardened_and_name_nothing_unshipped(unit: str) -> None:
    text = (Path(__file__).resolve().parent.parent / "ops" / "systemd" / unit).read_text()
    assert "User=" in text
    assert "NoNewPrivileges=yes" in text
    assert "man:" not in text
    if unit == "fleet-master.service":
        assert "ProtectSystem=strict" in text


def test_each_master_command_has_its_own_help() -> None:
    for command in ("run", "start", "stop", "restart", "reload", "status", "hash", "user"):
        shown = run([MASTER, command, "--help"])
        assert shown.returncode == 0
        assert shown.stdout.startswith(f"usage: fleet-master {command}")
    status = run([MASTER, "status", "--help"]).stdout
    assert "--json" in status
    assert "exit 3" in status
    assert "--password-stdin" not in status
    assert "--password-stdin" in run([MASTER, "user", "--help"]).stdout
    assert "COMMAND --help" in run([MASTER, "--help"]).stdout


async def test_a_heartbeat_slower_than_presence_lasts_is_warned_about(
    bus: Bus, agent_factory: Callable[..., AgentProcess]
) -> None:
    # 10 s between beats, entries that live 15 s: offline for 5 s of every 10.
    agent = await agent_factory("web-1", heartbeat_s=10.0).started(bus)
    line = wait_log(agent.log_path, "look offline between heartbeats")
    assert "use at most 7.5" in line
