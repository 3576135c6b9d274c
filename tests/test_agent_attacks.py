"""Issue 11's attacks on the agent, each against real nats-server and agent processes.

Each test does what a hostile holder of a trusted-but-limited key (or of a log reader's
view) did to the agent, and shows it refused: environment injection, run-as without
the grant, a replayed sealed password, an agent without a trust file, control without
a grant.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from agents import AgentProcess, finished, job_events, job_request, wait_presence
from natsserver import NatsServer
from test_runas import Throwaway, fleet

from bus import (
    Bus,
    FleetError,
    SealBinding,
    Signer,
    decode_model,
    encode_model,
    generate_seed,
    seal_for,
    sign_envelope,
)
from bus.request import control
from bus.signing import sign_control
from schemas import (
    ControlReply,
    ControlRequest,
    JobFinished,
    JobRequest,
    JobSubmitted,
    ModuleCommand,
    make_envelope,
    new_id,
)

Agents = Callable[..., AgentProcess]
needs_root = [
    pytest.mark.skipif(os.geteuid() != 0, reason="running jobs as other users needs root"),
    pytest.mark.skipif(shutil.which("useradd") is None, reason="needs useradd"),
]


def trust_file(path: Path, *grants: tuple[Signer, str]) -> Path:
    """A trust file: one ``[[grant]]`` per (key, extra TOML lines)."""
    path.write_text("".join(f'[[grant]]\nkey = "{s.public_key}"\n{body}\n' for s, body in grants))
    return path


async def outcome(
    bus: Bus,
    signer: Signer,
    agent: str,
    request: JobRequest,
    *,
    who: str = "mallory",
    job_id: str | None = None,
) -> JobFinished:
    """Submit ``request`` signed by ``signer`` as ``who``; the job's finished event."""
    job_id = job_id or new_id()
    data = JobSubmitted(job_id=job_id, agent=agent, request=request, submitted_by=who)
    subject = bus.subjects.job_event(agent, job_id, "submitted")
    await bus.publish_event(sign_envelope(make_envelope(data, source=who, subject=subject), signer))
    return await finished(bus, agent, job_id)


# --- 1. the environment ---------------------------------------------------------------------


async def test_a_modules_only_key_cannot_run_code_through_the_environment(
    bus: Bus, agent_factory: Agents, tmp_path: Path
) -> None:
    bob = Signer(generate_seed())
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.sh"
    evil.write_text(f"touch {marker}\n")
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "bash").write_text(f"#!/bin/sh\ntouch {marker}\n")
    (fake_bin / "bash").chmod(0o755)
    trust = trust_file(tmp_path / "trust.toml", (bob, 'name = "bob"\nmodules = ["check"]'))
    await agent_factory(
        "web-1", trust_file=str(trust), modules={"check": {"argv": ["bash", "-c", "true"]}}
    ).started(bus)
    module = ModuleCommand(module="check")
    for env in ({"BASH_ENV": str(evil)}, {"PATH": f"{fake_bin}:/usr/bin:/bin"},
                {"LD_PRELOAD": str(evil)}, {"ENV": str(evil)}):  # fmt: skip
        done = await outcome(bus, bob, "web-1", JobRequest(command=module, env=env))
        name = next(iter(env))
        assert (done.status, done.reason) == (
            "rejected",
            f"bob may not set {name}: this agent never takes it from a request",
        )
    assert not marker.exists()


async def test_a_request_sets_only_the_variables_its_grant_or_module_allows(
    bus: Bus, agent_factory: Agents, tmp_path: Path
) -> None:
    bob = Signer(generate_seed())
    trust = trust_file(
        tmp_path / "trust.toml",
        (bob, 'name = "bob"\nmodules = ["show"]\ncommands = true\nenv = ["APP_*"]'),
    )
    show = {"argv": ["sh", "-c", "echo $APP_MODE $LEVEL $PATH"], "env": ["LEVEL"]}
    await agent_factory("web-1", trust_file=str(trust), modules={"show": show}).started(bus)
    env = {"APP_MODE": "fast", "LEVEL": "3"}
    done = await outcome(
        bus, bob, "web-1", JobRequest(command=ModuleCommand(module="show"), env=env)
    )
    assert done.status == "succeeded", done.reason
    assert (
        done.output_tail == "fast 3 /usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
    )
    # LEVEL is the module's, not the grant's: a plain command may not set it.
    refused = await outcome(bus, bob, "web-1", job_request(["true"], env={"LEVEL": "3"}))
    assert (refused.status, refused.reason) == (
        "rejected",
        "bob may not set the environment variable LEVEL",
    )


def test_an_agent_refuses_a_trust_file_granting_a_loader_variable(
    tmp_path: Path, operator: tuple[Path, Signer]
) -> None:
    trust = trust_file(tmp_path / "trust.toml", (operator[1], 'commands = true\nenv = ["LD_*"]'))
    agent = AgentProcess(tmp_path, "nats://127.0.0.1:1", "web-1", trust_file=str(trust)).start()
    try:
        assert agent.proc is not None
        assert agent.proc.wait(30) == 2
    finally:
        agent.kill()
    assert "LD_* can never be set by a request" in agent.log()


# --- 2. run-as ------------------------------------------------------------------------------


@pytest.fixture
def user() -> Iterator[Throwaway]:
    u = Throwaway()
    subprocess.run(["useradd", "-m", "-s", "/bin/sh", u.name], check=True)
    try:
        subprocess.run(["chpasswd"], input=f"{u.name}:{u.password}\n", text=True, check=True)
        u.pam_file.write_text("auth required pam_unix.so\naccount required pam_unix.so\n")
        yield u
    finally:
        u.pam_file.unlink(missing_ok=True)
        subprocess.run(["userdel", "-r", u.name], capture_output=True, check=False)


def sealed(agent_key: str, job_id: str, who: str, password: str) -> bytes:
    binding = SealBinding(job_id, "web-1", who, time.time_ns() + 600 * 10**9)
    return seal_for(agent_key, password.encode(), binding)


def root_only(test: Callable[..., object]) -> Callable[..., object]:
    for mark in (*needs_root, pytest.mark.slow):
        test = mark(test)
    return test


@root_only
async def test_run_as_is_decided_by_the_grant_not_by_a_credential(
    bus: Bus, agent_factory: Agents, user: Throwaway, tmp_path: Path
) -> None:
    mallory, eve = Signer(generate_seed()), Signer(generate_seed())
    trust = trust_file(
        tmp_path / "trust.toml",
        (mallory, f'name = "mallory"\ncommands = true\nusers = ["{user.name}"]\n'
                  'password_users = ["root"]'),
        (eve, f'name = "eve"\ncommands = true\nusers = ["{user.name}", "*"]'),
    )  # fmt: skip
    await agent_factory(
        "web-1", run_as_mode="root", pam_service=user.service, trust_file=str(trust)
    ).started(bus)
    key = (await wait_presence(bus, "web-1", lambda p: p.public_key is not None)).public_key
    assert key is not None
    marker = tmp_path / "ran-as-root"
    os.chmod(tmp_path, 0o777)  # noqa: S103 - so that "not created" is not for lack of rights

    # Root plus a (wrong) password: PAM decides, even though root is the agent's own user.
    job = new_id()
    as_root = job_request(
        ["touch", str(marker)], run_as="root", credential=sealed(key, job, "mallory", "guess")
    )
    done = await outcome(bus, mallory, "web-1", as_root, job_id=job)
    assert (done.status, done.reason) == ("rejected", "authentication failed")

    # A credential never stands in for a grant, and "*" never grants root.
    job = new_id()
    as_root = job_request(
        ["touch", str(marker)], run_as="root", credential=sealed(key, job, "eve", "guess")
    )
    done = await outcome(bus, eve, "web-1", as_root, who="eve", job_id=job)
    assert (done.status, done.reason) == ("rejected", "eve may not run jobs as root")
    assert not marker.exists()

    # No run_as on a root agent: the default user, not root.
    whoami = await outcome(bus, eve, "web-1", job_request(["id", "-un"]), who="eve")
    assert (whoami.status, whoami.output_tail) == ("succeeded", "nobody\n")
    granted = await outcome(
        bus, eve, "web-1", job_request(["id", "-un"], run_as=user.name), who="eve"
    )
    assert (granted.status, granted.output_tail) == ("succeeded", f"{user.name}\n")


# --- 3. sealed credentials ------------------------------------------------------------------


@root_only
async def test_a_sealed_password_copied_from_the_log_opens_no_other_job(
    nats_server: NatsServer,
    bus: Bus,
    agent_factory: Agents,
    operator: tuple[Path, Signer],
    user: Throwaway,
    tmp_path: Path,
) -> None:
    mallory = Signer(generate_seed())
    trust = trust_file(
        tmp_path / "trust.toml",
        (operator[1], f'name = "tester"\ncommands = true\npassword_users = ["{user.name}"]'),
        (mallory, f'name = "mallory"\ncommands = true\npassword_users = ["{user.name}"]'),
    )
    await agent_factory(
        "web-1", run_as_mode="root", pam_service=user.service, trust_file=str(trust)
    ).started(bus)
    ok = await fleet(
        nats_server.url, operator[0], "run", "-a", "web-1",
        "--user", user.name, "--password-stdin", "--", "id", "-un",
        stdin=user.password + "\n",
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.decode() == f"{user.name}\n"
    [submitted] = [e for e in await job_events(bus, "*") if e.type == "job.submitted"]
    stolen = submitted.data["request"]["credential"]
    assert isinstance(stolen, bytes)

    marker = tmp_path / "stolen"
    os.chmod(tmp_path, 0o777)  # noqa: S103
    replay = job_request(["touch", str(marker)], run_as=user.name, credential=stolen)
    for signer, who in ((mallory, "mallory"), (operator[1], "tester")):
        done = await outcome(bus, signer, "web-1", replay, who=who)
        assert done.status == "rejected"
        assert "the sealed credential cannot be opened here" in (done.reason or "")
    assert not marker.exists()


# --- 4. secure by default -------------------------------------------------------------------


async def test_an_agent_without_a_trust_file_runs_nothing_and_keeps_its_state_private(
    bus: Bus, agent_factory: Agents, operator: tuple[Path, Signer], tmp_path: Path
) -> None:
    agent = agent_factory("web-1", trusted=[])
    agent.data_dir.mkdir(mode=0o755)  # as an older version left it
    os.chmod(agent.data_dir, 0o755)  # noqa: S103
    await agent.started(bus)
    marker = tmp_path / "ran"
    done = await outcome(bus, operator[1], "web-1", job_request(["touch", str(marker)]))
    assert (done.status, done.reason) == (
        "rejected",
        "this agent has no trust file, so it runs no job (set trust_file in its config)",
    )
    assert not marker.exists()
    assert "no trust_file: this agent runs no job" in agent.log()
    with pytest.raises(FleetError, match="no trust file, so it accepts no control request"):
        await control(bus, bus.subjects.control("web-1", "status"), signer=operator[1])
    assert stat.S_IMODE(agent.data_dir.stat().st_mode) == 0o700
    for state in ("journal.jsonl", "seals.jsonl"):
        assert stat.S_IMODE((agent.data_dir / state).stat().st_mode) == 0o600, state


# --- 5. control -----------------------------------------------------------------------------


async def test_control_is_granted_per_operation_and_config_set_survives_a_restart(
    nats_server: NatsServer, bus: Bus, agent_factory: Agents, tmp_path: Path
) -> None:
    watcher, admin, stranger = (Signer(generate_seed()) for _ in range(3))
    trust = trust_file(
        tmp_path / "trust.toml",
        (watcher, 'name = "watcher"\ncontrol = ["status"]'),
        (admin, 'name = "admin"\ncontrol = ["*"]'),
    )
    agent = agent_factory("web-1", trust_file=str(trust), max_jobs=2)
    agent.config_path.write_text("# the web agent, by hand\n" + agent.config_path.read_text())
    await agent.started(bus)

    def ctl(op: str) -> str:
        return bus.subjects.control("web-1", op)

    status = await control(bus, ctl("status"), signer=watcher)
    assert status.data["max_jobs"] == 2
    refusals = [
        (None, "status", "status refused: control requests must be signed"),
        (stranger, "status", "is not trusted by this agent"),
        (watcher, "log", "log refused: watcher may not call log on this agent"),
        (watcher, "config-set", "watcher may not call config-set"),
        (watcher, "restart", "watcher may not call restart"),
    ]
    for signer, op, why in refusals:
        with pytest.raises(FleetError, match=why):
            await control(bus, ctl(op), {"max_jobs": 9}, signer=signer, attempts=1)

    # A signed request seen on the wire is good once.
    signed = sign_control(ControlRequest(args={"max_jobs": 5}), ctl("config-set"), admin)
    first = await bus.nc.request(ctl("config-set"), encode_model(signed), timeout=10)
    assert decode_model(first.data, ControlReply).ok
    again = decode_model(
        (await bus.nc.request(ctl("config-set"), encode_model(signed), timeout=10)).data,
        ControlReply,
    )
    assert not again.ok
    assert "already answered" in (again.error or "")

    text = agent.config_path.read_text()
    assert text.startswith("# the web agent, by hand\n")
    assert "max_jobs = 5\n" in text
    agent.stop()
    await agent.started(bus)
    status = await control(bus, ctl("status"), signer=watcher)
    assert status.data["max_jobs"] == 5
