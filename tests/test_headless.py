"""``fleet-headless`` against a real server, master and agent: every return code for real."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import bcrypt
import pytest
from agents import (
    MASTER,
    AgentProcess,
    MasterProcess,
    finished,
    fleet_env,
    job_events,
    wait_presence,
)
from natsserver import NatsServer, free_port
from updates import SOURCE
from updates import fleet as fleet_cli

from bus import Bus, Signer, generate_seed, write_seed_file
from bus.log import read_log
from bus.request import control

HEADLESS = str(Path(sys.executable).parent / "fleet-headless")
PASSWORD = "correct horse battery staple"

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]


class Fleet:
    def __init__(self, url: str, tmp: Path, master: MasterProcess) -> None:
        self.url, self.tmp, self.master = url, tmp, master

    def salt(self, user: str) -> bytes:
        users = json.loads((self.master.dir / "data" / "users.json").read_text())
        return str(users[user]["salt"]).encode()

    def secret(
        self, name: str = "batch.secret", password: str = PASSWORD, user: str = "batch"
    ) -> Path:
        path = self.tmp / name
        write_seed_file(path, bcrypt.hashpw(password.encode(), self.salt(user)))
        return path

    async def run(
        self, *args: str, url: str | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        """``fleet-headless -s URL ARGS`` (without ``-s`` when ``env`` is given)."""
        server = (url or self.url).removeprefix("nats://")
        where = [] if env is not None else ["-s", server]
        proc = await asyncio.create_subprocess_exec(
            HEADLESS,
            *where,
            *args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
        )
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode is not None
        return subprocess.CompletedProcess(args, proc.returncode, out, err)


@pytest.fixture
async def fleet(tmp_path: Path, nats_server: NatsServer, bus: Bus) -> AsyncIterator[Fleet]:
    # The agent trusts the master's key to submit for headless users: made beforehand.
    master_key = tmp_path / "master.nk"
    write_seed_file(master_key, generate_seed())
    batch_key = tmp_path / "batch.nk"  # for the headless user's own nkey (no master)
    write_seed_file(batch_key, generate_seed())
    agent = AgentProcess(
        tmp_path,
        nats_server.url,
        "web-1",
        modules={"hello": {"argv": ["echo", "hello"]}},
        trusted=[Signer.from_file(k).public_key for k in (master_key, batch_key)],
    )
    # Throttling pauses an hour, so no test depends on how fast the machine is.
    master = MasterProcess(
        tmp_path, nats_server.url, auth_throttle_s=3600.0, nkey_file=str(master_key)
    )
    try:
        await agent.started(bus)
        master.start()
        add = await asyncio.to_thread(
            subprocess.run,
            [MASTER, "user", "add", "batch", "--password-stdin", "-c", str(master.config_path)],
            input=PASSWORD + "\n",
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert add.returncode == 0, add.stderr
        await master.wait_ready(bus)
        yield Fleet(nats_server.url, tmp_path, master)
    finally:
        master.stop()
        agent.stop()


def base(secret: Path, *more: str) -> list[str]:
    return ["-u", "batch", "-p", str(secret), "--agent", "web-1", *more]


async def test_success_is_quiet_and_waits_as_asked(fleet: Fleet, bus: Bus) -> None:
    secret = fleet.secret()
    done = await fleet.run(*base(secret, "-t", "-1", "-c", "echo from cron"))
    assert done.returncode == 0, done.stderr
    assert done.stdout == b""
    assert done.stderr == b""
    module = await fleet.run(*base(secret, "-t", "30", "-m", "hello"))
    assert module.returncode == 0

    # No -t: back as soon as the log holds the job, before it ends. The job waits for a
    # file the test makes only afterwards, so this holds however slow the machine is.
    release = fleet.tmp / "release-the-job"
    wait_then_print = f"while [ ! -e {release} ]; do sleep 0.1; done; echo late"
    fired = await fleet.run(*base(secret, "-v", "-c", wait_then_print))
    assert fired.returncode == 0
    job_id = fired.stderr.decode().split("job ")[1].split()[0]
    so_far = [e.type for e in await job_events(bus, job_id)]
    assert so_far[0] == "job.submitted"
    assert "job.finished" not in so_far
    release.touch()
    assert (await finished(bus, "web-1", job_id)).output_tail == "late\n"
    submitted = (await job_events(bus, job_id))[0]
    assert submitted.source == "master"
    assert submitted.data["submitted_by"] == "batch"


async def test_timeout_is_3_and_the_job_goes_on(fleet: Fleet, bus: Bus) -> None:
    result = await fleet.run(*base(fleet.secret(), "-v", "-t", "1", "-c", "sleep 4; echo done"))
    assert result.returncode == 3
    job_id = result.stderr.decode().split("job ")[1].split()[0]
    assert (await finished(bus, "web-1", job_id)).status == "succeeded"


async def test_failing_job_is_4(fleet: Fleet) -> None:
    result = await fleet.run(
        *base(fleet.secret(), "-t", "-1", "--lang", "python", "-c", "raise SystemExit(3)")
    )
    assert result.returncode == 4
    # What cron.example promises: quiet, but one line saying why when it failed.
    [line] = result.stderr.decode().splitlines()
    assert line.startswith("fleet-headless: job ")
    assert "failed (exit code 3)" in line
    quiet = await fleet.run(
        *base(fleet.secret("q"), "-q", "-t", "-1", "--lang", "python", "-c", "raise SystemExit(3)")
    )
    assert quiet.returncode == 4
    assert quiet.stderr == b""


async def test_an_unknown_module_is_a_parameter_error(fleet: Fleet) -> None:
    result = await fleet.run(*base(fleet.secret(), "-t", "-1", "-m", "no-such-module"))
    assert result.returncode == 2
    [line] = result.stderr.decode().splitlines()
    assert "rejected" in line
    assert "no-such-module" in line


async def test_fleet_server_and_server_name_the_server(fleet: Fleet) -> None:
    by_env = await fleet.run(
        *base(fleet.secret(), "-t", "-1", "-c", "true"), env={"FLEET_SERVER": fleet.url}
    )
    assert by_env.returncode == 0, by_env.stderr
    by_flag = await fleet.run(
        "--server", fleet.url, *base(fleet.secret("f"), "-t", "-1", "-c", "true"), env={}
    )
    assert by_flag.returncode == 0, by_flag.stderr


async def test_an_unsafe_secret_file_is_2_even_with_no_server(fleet: Fleet) -> None:
    secret = fleet.secret()
    secret.chmod(0o644)
    result = await fleet.run(*base(secret, "-c", "true"), url=f"127.0.0.1:{free_port()}")
    assert result.returncode == 2
    assert "0644" in result.stderr.decode()
    script = fleet.tmp / "job.py"
    script.write_text("print('python file')\n")
    ok = await fleet.run(*base(fleet.secret("s2"), "-t", "-1", "-f", str(script)))
    assert ok.returncode == 0


async def test_parameter_errors_are_2_with_one_line(fleet: Fleet) -> None:
    assert (await fleet.run("--no-such-flag")).returncode == 2
    assert (
        await fleet.run("-u", "batch", "--agent", "web-1", "-c", "true")
    ).returncode == 2  # no -p
    secret = fleet.secret()
    secret.chmod(0o440)
    loose = await fleet.run(*base(secret, "-c", "true"))
    assert loose.returncode == 2
    assert loose.stderr.decode().count("\n") == 1
    assert "has mode 0440" in loose.stderr.decode()
    if os.geteuid() == 0:
        foreign = fleet.secret("foreign")
        os.chown(foreign, 65534, 65534)
        result = await fleet.run(*base(foreign, "-c", "true"))
        assert result.returncode == 2
        assert "owned by uid 65534" in result.stderr.decode()


async def test_no_server_is_1(fleet: Fleet) -> None:
    result = await fleet.run(*base(fleet.secret(), "-c", "true"), url=f"127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert "cannot connect" in result.stderr.decode()


async def test_wrong_password_is_2_and_recorded(fleet: Fleet, bus: Bus) -> None:
    wrong = fleet.secret("wrong", password="not the password")
    result = await fleet.run(*base(wrong, "-c", "true"))
    assert result.returncode == 2
    assert result.stderr.decode().strip() == "fleet-headless: error: authentication failed"
    unknown = await fleet.run("-u", "nobody", "-p", str(wrong), "--agent", "web-1", "-c", "true")
    assert unknown.returncode == 2
    assert unknown.stderr == result.stderr  # whether the user exists is not said
    denied = await read_log(bus, bus.subjects.events_stream, bus.subjects.auth_event("denied"))
    assert len(denied) == 2


async def test_a_captured_exchange_cannot_be_replayed(fleet: Fleet, bus: Bus) -> None:
    from bus.scram import auth_message, client_proof, job_digest, new_nonce
    from schemas import ArgvCommand, JobRequest

    hashed = bcrypt.hashpw(PASSWORD.encode(), fleet.salt("batch"))
    master = bus.subjects.master_control
    nonce = new_nonce()
    challenge = (
        await control(bus, master("auth-start"), {"user": "batch", "client_nonce": nonce})
    ).data
    request = JobRequest(command=ArgvCommand(argv=["true"])).model_dump()
    message = auth_message("batch", nonce, challenge["server_nonce"], job_digest("web-1", request))
    submit = {
        "user": "batch",
        "client_nonce": nonce,
        "server_nonce": challenge["server_nonce"],
        "proof": client_proof(hashed, message),
        "agent": "web-1",
        "request": request,
    }
    assert "job_id" in (await control(bus, master("auth-submit"), submit)).data
    from bus import FleetError

    with pytest.raises(FleetError, match="authentication failed"):
        await control(bus, master("auth-submit"), submit)  # the same exchange again
    other = {
        **submit,
        "request": JobRequest(command=ArgvCommand(argv=["rm", "-rf", "/"])).model_dump(),
    }
    with pytest.raises(FleetError, match="authentication failed"):
        await control(bus, master("auth-submit"), other)  # the proof bound to another job


async def test_first_use_prompts_on_a_terminal_and_writes_a_0400_hash(fleet: Fleet) -> None:
    secret = fleet.tmp / "new.secret"
    leader, follower = pty.openpty()
    proc = await asyncio.create_subprocess_exec(
        HEADLESS,
        "-s",
        fleet.url.removeprefix("nats://"),
        *base(secret, "-t", "-1", "-c", "true"),
        stdin=follower,
        stdout=follower,
        stderr=follower,
        start_new_session=True,
    )
    os.close(follower)
    seen = b""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(60):
        while b"password" not in seen:
            seen += await loop.run_in_executor(None, os.read, leader, 1024)
    os.write(leader, (PASSWORD + "\n").encode())
    assert await asyncio.wait_for(proc.wait(), 60) == 0
    os.close(leader)
    assert secret.stat().st_mode & 0o777 == 0o400
    stored = secret.read_bytes().strip()
    assert stored.startswith(b"$2b$12$")
    assert bcrypt.checkpw(PASSWORD.encode(), stored)
    assert PASSWORD.encode() not in seen  # no echo


async def test_nkey_auth_needs_no_master(fleet: Fleet, bus: Bus) -> None:
    seed = fleet.tmp / "batch.nk"  # the agent's trust file grants it
    fleet.master.stop()
    result = await fleet.run("-a", "nkey", *base(seed, "-v", "-c", "echo signed"))
    assert result.returncode == 0, result.stderr
    job_id = result.stderr.decode().split("job ")[1].split()[0]
    assert (await finished(bus, "web-1", job_id)).output_tail == "signed\n"
    # Waiting for the end asks the master (a headless user reads nothing of the log).
    # The challenge needs the master: with none answering, that is a connection error.
    no_master = await fleet.run(*base(fleet.secret(), "--master-wait", "2", "-c", "true"))
    assert no_master.returncode == 1
    assert "no master answers" in no_master.stderr.decode()


async def test_lock_keeps_two_clients_from_overlapping(fleet: Fleet, bus: Bus) -> None:
    secret = fleet.secret()
    job = ["--lock", "nightly", "-t", "-1", "-c", "date +%s.%N; sleep 2; date +%s.%N"]
    first = asyncio.create_task(fleet.run(*base(secret, "-v", *job)))
    # Once the first holds the lock, a second client without --lock-wait gives up at once.
    kv = await bus.key_value(bus.subjects.locks_bucket)
    watcher = await kv.watch("nightly")
    async with asyncio.timeout(30):
        async for entry in watcher:
            if entry is not None and entry.value:
                break
    await watcher.stop()
    refused = await fleet.run(*base(secret, *job))
    assert refused.returncode == 3
    assert "held by another client" in refused.stderr.decode()
    silent = await fleet.run(*base(secret, "-q", *job))
    assert silent.returncode == 3
    assert silent.stderr == b""  # -q: nothing at all
    second = await fleet.run(
        *base(secret, "-v", "--lock-wait", "30", *job[2:4], "--lock", "nightly", *job[4:])
    )
    one = await first
    assert one.returncode == 0, one.stderr
    assert second.returncode == 0, second.stderr
    spans = []
    for result in (one, second):
        job_id = result.stderr.decode().split("job ")[1].split()[0]
        start, end = (await finished(bus, "web-1", job_id)).output_tail.split()
        spans.append((float(start), float(end)))
    spans.sort()
    assert spans[0][1] <= spans[1][0]  # the second began after the first ended


def test_user_management_refuses_what_bcrypt_would_weaken(tmp_path: Path) -> None:
    config = tmp_path / "master.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n')

    def user(*args: str, password: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [MASTER, "user", *args, "--password-stdin", "-c", str(config)],
            input=password + "\n",
            capture_output=True,
            text=True,
            timeout=60,
        )

    long = user("add", "batch", password="x" * 73)
    assert long.returncode == 2
    assert "73 bytes; bcrypt uses at most 72" in long.stderr
    assert user("add", "batch", "--cost", "10", password="pw").returncode == 2
    assert user("add", "batch", password="pw").returncode == 0
    assert "exists already" in user("add", "batch", password="pw").stderr
    assert user("passwd", "batch", password="new").returncode == 0
    stored = json.loads((tmp_path / "data" / "users.json").read_text())["batch"]
    assert set(stored) == {"salt", "stored_key", "server_key"}  # no hash, no password
    assert (tmp_path / "data" / "users.json").stat().st_mode & 0o777 == 0o600
    assert (
        subprocess.run([MASTER, "user", "del", "batch", "-c", str(config)], timeout=60).returncode
        == 0
    )


async def test_repeated_failures_are_throttled(fleet: Fleet, bus: Bus) -> None:
    wrong = fleet.secret("wrong", password="guess")
    # The fixture's master pauses an hour after the third failure, so the right password
    # below meets the pause however slowly this machine starts fleet-headless.
    failures = 3
    for _ in range(failures):
        assert (await fleet.run(*base(wrong, "-c", "true"))).returncode == 2
    # The right password is refused too while the user is throttled.
    right = await fleet.run(*base(fleet.secret(), "-c", "true"))
    assert right.returncode == 2
    assert right.stderr.decode().strip() == "fleet-headless: error: authentication failed"
    denied = await read_log(bus, bus.subjects.events_stream, bus.subjects.auth_event("denied"))
    assert len(denied) == failures + 1
    assert "throttled" in fleet.master.log()


async def login(bus: Bus, fleet: Fleet, subject: Callable[[str], str], password: str) -> bool:
    """One challenge login as batch through ``subject(op)``; True if the master accepted."""
    from bus import FleetError
    from bus.scram import auth_message, client_proof, job_digest, new_nonce
    from schemas import ArgvCommand, JobRequest

    hashed = bcrypt.hashpw(password.encode(), fleet.salt("batch"))
    nonce = new_nonce()
    start = {"user": "batch", "client_nonce": nonce}
    challenge = (await control(bus, subject("auth-start"), start)).data
    request = JobRequest(command=ArgvCommand(argv=["true"])).model_dump()
    message = auth_message("batch", nonce, challenge["server_nonce"], job_digest("web-1", request))
    submit = {
        **start,
        "server_nonce": challenge["server_nonce"],
        "proof": client_proof(hashed, message),
        "agent": "web-1",
        "request": request,
    }
    try:
        await control(bus, subject("auth-submit"), submit)
    except FleetError as exc:
        if "authentication failed" not in str(exc):
            raise
        return False
    return True


async def test_one_caller_cannot_lock_another_out(fleet: Fleet, bus: Bus) -> None:
    def as_mallory(op: str) -> str:
        return bus.subjects.master_control_by(op, "mallory")

    for _ in range(3):
        assert not await login(bus, fleet, as_mallory, "guess")
    # Mallory is throttled now, even with the right password...
    assert not await login(bus, fleet, as_mallory, PASSWORD)
    assert "login of batch from mallory denied (throttled" in fleet.master.log()
    # ...but batch, asking as itself, is not.
    own = await fleet.run(*base(fleet.secret(), "-t", "-1", "-c", "true"))
    assert own.returncode == 0, own.stderr
    assert await login(bus, fleet, lambda op: bus.subjects.master_control_by(op, "batch"), PASSWORD)


async def test_no_job_for_an_unsupported_agent(
    fleet: Fleet, bus: Bus, operator: tuple[Path, Signer], tmp_path: Path
) -> None:
    # The prime directive: web-1 (not run by the launcher) cannot take the fleet's new
    # target, so it is unsupported, and the master submits no headless job for it.
    env = fleet_env(fleet.url, operator[0])
    release = tmp_path / "release.nk"
    bundle = tmp_path / "b.bundle"
    for args in (
        ("keys", "gen", "release", "rel", "-o", str(release)),
        ("update", "build", "--version", "9.0.0", "--key", str(release), "--source", str(SOURCE),
         "-o", str(bundle)),
        ("update", "publish", str(bundle)),
        ("update", "announce", "9.0.0"),
    ):  # fmt: skip
        await asyncio.to_thread(fleet_cli, env, *args)
    await wait_presence(bus, "web-1", lambda p: p.state == "unsupported")
    async with asyncio.timeout(30):
        while True:  # until the master has folded the agent's agent.unsupported event
            agents = (await control(bus, bus.subjects.master_control("agents"))).data["agents"]
            if any(a["id"] == "web-1" and a["unsupported"] for a in agents):
                break
            await asyncio.sleep(0.1)  # the master is a few events behind: ask again

    refused = await fleet.run(*base(fleet.secret(), "-t", "30", "-c", "echo never"))
    assert refused.returncode == 2, refused.stderr
    assert b"agent web-1 is unsupported (" in refused.stderr
    assert b"the job was not submitted" in refused.stderr
    signed = await fleet.run("-a", "nkey", *base(fleet.tmp / "batch.nk", "-c", "echo never"))
    assert signed.returncode == 2, signed.stderr
    assert b"agent web-1 is unsupported (" in signed.stderr
    submitted = await read_log(bus, bus.subjects.events_stream, bus.subjects.job_events("web-1"))
    assert submitted == []
