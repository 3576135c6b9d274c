"""Issue 11's attacks on the agent, each against real nats-server and agent processes.

Each test does what a hostile holder of a trusted-but-limited key (or of a log reader's
view) did to the agent, and shows it refused: environment injection, run-as without
the grant, a replayed sealed password, an agent without a trust file, control without
a grant. Each runs twice (the ``deployment`` fixture): on the open test server, where the
agent's own checks are all that stands in the way, and under the permissions ``fleet ops
server-config`` generates, with every principal connected as itself. The attackers
(``mallory``, ``eve``) hold the least role there is, headless.
"""

from __future__ import annotations

import os
import shutil
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from agents import FLEET, AgentProcess, finished, job_events, job_request, wait_presence
from deployment import Deployment, refused, run_cli
from pamuser import Throwaway

from bus import (
    FleetError,
    PermissionDeniedError,
    SealBinding,
    Signer,
    decode_model,
    encode_model,
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

needs_root = [
    pytest.mark.skipif(os.geteuid() != 0, reason="running jobs as other users needs root"),
    pytest.mark.skipif(shutil.which("useradd") is None, reason="needs useradd"),
]


def trust_file(path: Path, *grants: tuple[Signer, str]) -> Path:
    """A trust file: one ``[[grant]]`` per (key, extra TOML lines)."""
    path.write_text("".join(f'[[grant]]\nkey = "{s.public_key}"\n{body}\n' for s, body in grants))
    return path


async def outcome(
    d: Deployment, who: str, agent: str, request: JobRequest, *, job_id: str | None = None
) -> JobFinished:
    """``who`` submits ``request``, signed with its key, over its own connection; the
    job's finished event, as the admin reads it."""
    job_id = job_id or new_id()
    data = JobSubmitted(job_id=job_id, agent=agent, request=request, submitted_by=who)
    subject = d.bus.subjects.job_event(agent, job_id, "submitted")
    envelope = sign_envelope(make_envelope(data, source=who, subject=subject), d[who].signer)
    await (await d.as_(who)).publish_event(envelope)
    return await finished(d.bus, agent, job_id)


# --- 1. the environment ---------------------------------------------------------------------


async def test_a_modules_only_key_cannot_run_code_through_the_environment(
    deployment: Deployment, tmp_path: Path
) -> None:
    d, bob = deployment, deployment["mallory"].signer
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.sh"
    evil.write_text(f"touch {marker}\n")
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "bash").write_text(f"#!/bin/sh\ntouch {marker}\n")
    (fake_bin / "bash").chmod(0o755)
    trust = trust_file(tmp_path / "trust.toml", (bob, 'name = "bob"\nmodules = ["check"]'))
    await d.agent(
        "web-1", trust_file=str(trust), modules={"check": {"argv": ["bash", "-c", "true"]}}
    ).started(d.bus)
    module = ModuleCommand(module="check")
    for env in ({"BASH_ENV": str(evil)}, {"PATH": f"{fake_bin}:/usr/bin:/bin"},
                {"LD_PRELOAD": str(evil)}, {"ENV": str(evil)}):  # fmt: skip
        done = await outcome(d, "mallory", "web-1", JobRequest(command=module, env=env))
        name = next(iter(env))
        assert (done.status, done.reason) == (
            "rejected",
            f"bob may not set {name}: this agent never takes it from a request",
        )
    assert not marker.exists()


async def test_a_request_sets_only_the_variables_its_grant_or_module_allows(
    deployment: Deployment, tmp_path: Path
) -> None:
    d, bob = deployment, deployment["mallory"].signer
    trust = trust_file(
        tmp_path / "trust.toml",
        (bob, 'name = "bob"\nmodules = ["show"]\ncommands = true\nenv = ["APP_*"]'),
    )
    show = {"argv": ["sh", "-c", "echo $APP_MODE $LEVEL $PATH"], "env": ["LEVEL"]}
    await d.agent("web-1", trust_file=str(trust), modules={"show": show}).started(d.bus)
    env = {"APP_MODE": "fast", "LEVEL": "3"}
    done = await outcome(
        d, "mallory", "web-1", JobRequest(command=ModuleCommand(module="show"), env=env)
    )
    assert done.status == "succeeded", done.reason
    assert (
        done.output_tail == "fast 3 /usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
    )
    # LEVEL is the module's, not the grant's: a plain command may not set it.
    level = await outcome(d, "mallory", "web-1", job_request(["true"], env={"LEVEL": "3"}))
    assert (level.status, level.reason) == (
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


def sealed(agent_key: str, job_id: str, who: str, password: str) -> bytes:
    binding = SealBinding(job_id, "web-1", who, time.time_ns() + 600 * 10**9)
    return seal_for(agent_key, password.encode(), binding)


def root_only(test: Callable[..., object]) -> Callable[..., object]:
    for mark in (*needs_root, pytest.mark.slow):
        test = mark(test)
    return test


@root_only
async def test_run_as_is_decided_by_the_grant_not_by_a_credential(
    deployment: Deployment, pam_user: Throwaway, tmp_path: Path
) -> None:
    d, user = deployment, pam_user
    mallory, eve = d["mallory"].signer, d["eve"].signer
    trust = trust_file(
        tmp_path / "trust.toml",
        (mallory, f'name = "mallory"\ncommands = true\nusers = ["{user.name}"]\n'
                  'password_users = ["root"]'),
        (eve, f'name = "eve"\ncommands = true\nusers = ["{user.name}", "*"]'),
    )  # fmt: skip
    await d.agent(
        "web-1", run_as_mode="root", pam_service=user.service, trust_file=str(trust)
    ).started(d.bus)
    key = d["web-1"].public_key
    marker = tmp_path / "ran-as-root"
    os.chmod(tmp_path, 0o777)  # noqa: S103 - so that "not created" is not for lack of rights

    # Root plus a (wrong) password: PAM decides, even though root is the agent's own user.
    job = new_id()
    as_root = job_request(
        ["touch", str(marker)], run_as="root", credential=sealed(key, job, "mallory", "guess")
    )
    done = await outcome(d, "mallory", "web-1", as_root, job_id=job)
    assert (done.status, done.reason) == ("rejected", "authentication failed")

    # A credential never stands in for a grant, and "*" never grants root.
    job = new_id()
    as_root = job_request(
        ["touch", str(marker)], run_as="root", credential=sealed(key, job, "eve", "guess")
    )
    done = await outcome(d, "eve", "web-1", as_root, job_id=job)
    assert (done.status, done.reason) == ("rejected", "eve may not run jobs as root")
    assert not marker.exists()

    # No run_as on a root agent: the default user, not root.
    whoami = await outcome(d, "eve", "web-1", job_request(["id", "-un"]))
    assert (whoami.status, whoami.output_tail) == ("succeeded", "nobody\n")
    granted = await outcome(d, "eve", "web-1", job_request(["id", "-un"], run_as=user.name))
    assert (granted.status, granted.output_tail) == ("succeeded", f"{user.name}\n")


# --- 3. sealed credentials ------------------------------------------------------------------


@root_only
async def test_a_sealed_password_copied_from_the_log_opens_no_other_job(
    deployment: Deployment, pam_user: Throwaway, tmp_path: Path
) -> None:
    d, user = deployment, pam_user
    trust = trust_file(
        tmp_path / "trust.toml",
        *(
            (d[who].signer, f'name = "{who}"\ncommands = true\npassword_users = ["{user.name}"]')
            for who in ("tester", "mallory")
        ),
    )
    await d.agent(
        "web-1", run_as_mode="root", pam_service=user.service, trust_file=str(trust)
    ).started(d.bus)
    # `fleet run` seals the password to the key the agent's heartbeat shows.
    key = d["web-1"].public_key
    await wait_presence(d.bus, "web-1", lambda p: p.public_key == key, timeout=30)
    ok = await run_cli(
        FLEET, "run", "-a", "web-1", "--user", user.name, "--password-stdin", "--", "id", "-un",
        env=d.env("tester"), stdin=user.password + "\n",
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == f"{user.name}\n"
    [submitted] = [
        e for e in await job_events(await d.as_("watcher"), "*") if e.type == "job.submitted"
    ]  # any operator reads the log
    stolen = submitted.data["request"]["credential"]
    assert isinstance(stolen, bytes)
    if d.generated:  # a headless user does not even see it
        events = d.bus.subjects.events_stream
        await refused(
            await d.as_("mallory"),
            f"$JS.API.CONSUMER.CREATE.{events}.peek.{d.bus.subjects.job_events('*', '*')}",
            f"$JS.API.DIRECT.GET.{events}.{submitted.subject}",
        )

    marker = tmp_path / "stolen"
    os.chmod(tmp_path, 0o777)  # noqa: S103
    replay = job_request(["touch", str(marker)], run_as=user.name, credential=stolen)
    for who in ("mallory", "tester"):
        done = await outcome(d, who, "web-1", replay)
        assert done.status == "rejected"
        assert "the sealed credential cannot be opened here" in (done.reason or "")
    assert not marker.exists()


# --- 4. secure by default -------------------------------------------------------------------


async def test_an_agent_without_a_trust_file_runs_nothing_and_keeps_its_state_private(
    deployment: Deployment, tmp_path: Path
) -> None:
    d = deployment
    agent = d.agent("web-1", trusted=[])
    agent.data_dir.mkdir(mode=0o755)  # as an older version left it
    os.chmod(agent.data_dir, 0o755)  # noqa: S103
    await agent.started(d.bus)
    marker = tmp_path / "ran"
    done = await outcome(d, "tester", "web-1", job_request(["touch", str(marker)]))
    assert (done.status, done.reason) == (
        "rejected",
        "this agent has no trust file, so it runs no job (set trust_file in its config)",
    )
    assert not marker.exists()
    assert "no trust_file: this agent runs no job" in agent.log()
    tester = await d.as_("tester")
    with pytest.raises(FleetError, match="no trust file, so it accepts no control request"):
        await control(tester, tester.subjects.control("web-1", "status"), signer=d["tester"].signer)
    assert stat.S_IMODE(agent.data_dir.stat().st_mode) == 0o700
    for state in ("journal.jsonl", "seals.jsonl"):
        assert stat.S_IMODE((agent.data_dir / state).stat().st_mode) == 0o600, state


# --- 5. control -----------------------------------------------------------------------------


async def test_control_is_granted_per_operation_and_config_set_survives_a_restart(
    deployment: Deployment, tmp_path: Path
) -> None:
    d = deployment
    watcher, admin = d["watcher"].signer, d["tester"].signer
    trust = trust_file(
        tmp_path / "trust.toml",
        (watcher, 'name = "watcher"\ncontrol = ["status"]'),
        (admin, 'name = "admin"\ncontrol = ["*"]'),
    )
    agent = d.agent("web-1", trust_file=str(trust), max_jobs=2)
    agent.config_path.write_text("# the web agent, by hand\n" + agent.config_path.read_text())
    await agent.started(d.bus)

    def ctl(op: str) -> str:
        return d.bus.subjects.control("web-1", op)

    status = await control(await d.as_("watcher"), ctl("status"), signer=watcher)
    assert status.data["max_jobs"] == 2
    refusals = [
        ("stranger", None, "status", "status refused: control requests must be signed"),
        ("stranger", "stranger", "status", "is not trusted by this agent"),
        ("watcher", "watcher", "log", "log refused: watcher may not call log on this agent"),
        ("watcher", "watcher", "config-set", "watcher may not call config-set"),
        ("watcher", "watcher", "restart", "watcher may not call restart"),
    ]
    # A headless key may not even ask; on the open server the agent does not trust it.
    for op in ("status", "config-set"):
        refusals.append(("mallory", "mallory", op, "is not trusted by this agent"))
    for caller, signer, op, why in refusals:
        bus, key = await d.as_(caller), signer and d[signer].signer
        if d.generated and d[caller].role == "headless":
            with pytest.raises(PermissionDeniedError, match=f"publishing to '{ctl(op)}'"):
                await control(bus, ctl(op), {"max_jobs": 9}, signer=key, attempts=1)
            continue
        with pytest.raises(FleetError, match=why):
            await control(bus, ctl(op), {"max_jobs": 9}, signer=key, attempts=1)

    # A signed request seen on the wire is good once.
    tester = await d.as_("tester")
    signed = sign_control(ControlRequest(args={"max_jobs": 5}), ctl("config-set"), admin)
    first = await tester.nc.request(ctl("config-set"), encode_model(signed), timeout=10)
    assert decode_model(first.data, ControlReply).ok
    again = decode_model(
        (await tester.nc.request(ctl("config-set"), encode_model(signed), timeout=10)).data,
        ControlReply,
    )
    assert not again.ok
    assert "already answered" in (again.error or "")

    text = agent.config_path.read_text()
    assert text.startswith("# the web agent, by hand\n")
    assert "max_jobs = 5\n" in text
    agent.stop()
    await agent.started(d.bus)
    status = await control(await d.as_("watcher"), ctl("status"), signer=watcher)
    assert status.data["max_jobs"] == 5
