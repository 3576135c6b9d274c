"""Master failover with real processes: a standby takes over from a SIGKILLed active
master during a burst of jobs and headless logins, nothing lost or recorded twice."""

from __future__ import annotations

import asyncio
import collections
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from agents import (
    FLEET,
    MASTER,
    AgentProcess,
    MasterProcess,
    finished,
    fleet_env,
    job_request,
    submit,
    wait_event,
)
from natsserver import NatsServer

from bus import (
    Bus,
    ConnectSettings,
    Signer,
    StorageSettings,
    connect,
    decode_envelope,
    generate_seed,
    provision,
    write_seed_file,
)
from bus.lease import Lease
from bus.log import read_log
from bus.request import control
from bus.scram import new_nonce
from bus.subjects import Subjects
from headless.client import Submission, login
from master.auth import login_job_id
from master.leadership import read_masters
from schemas import new_id

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

HEADLESS = str(Path(sys.executable).parent / "fleet-headless")
PASSWORD = "correct horse battery staple"
TTL_S = 3
TAKEOVER_BOUND_S = TTL_S + 10  # lease_ttl + a few seconds (generous: the machine is shared)


async def wait_roles(
    bus: Bus, want: dict[str, str] | Callable[[dict[str, str]], bool], timeout: float = 60.0
) -> dict[str, str]:
    """Wait until the ready masters' presence (name → role) is ``want`` or satisfies it."""
    done = want if callable(want) else lambda roles: all(roles.get(n) == r for n, r in want.items())
    kv = await bus.kv(bus.subjects.locks_bucket)
    roles: dict[str, str] = {}
    async with asyncio.timeout(timeout), kv.watch("master.presence.*") as changes:
        async for _ in changes:
            _, present = await read_masters(bus)
            roles = {m.name: m.role for m in present if m.ready}
            if done(roles):
                return roles
    raise AssertionError(f"presence ended before {want}: {roles}")


async def active_status(bus: Bus) -> dict[str, Any]:
    """The status the active master answers (only the active one answers)."""
    reply = await control(bus, bus.subjects.master_control("status"), attempts=6)
    return reply.data


def masters(
    master_factory: Callable[..., MasterProcess], key: Path, users: Path, *names: str
) -> list[MasterProcess]:
    """Masters sharing one identity and one users' file, each with its own directory."""
    return [
        master_factory(
            home=f"master-{n}",
            name=n,
            nkey_file=str(key),
            users_file=str(users),
            lease_ttl_s=TTL_S,
            checkpoint_every=5,
            checkpoint_interval_s=1.0,
            offline_grace_s=1.0,
        )
        for n in names
    ]


async def add_user(master: MasterProcess, tmp: Path) -> Path:
    """The headless user ``batch``, and its hashed secret file."""
    added = await asyncio.to_thread(
        subprocess.run,
        [MASTER, "user", "add", "batch", "--password-stdin", "-c", str(master.config_path)],
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert added.returncode == 0, added.stderr
    secret = tmp / "batch.secret"
    write_seed_file(secret, bcrypt.hashpw(PASSWORD.encode(), salt_of(master)))
    return secret


def salt_of(master: MasterProcess) -> bytes:
    users = json.loads(Path(master.settings["users_file"]).read_text())
    return str(users["batch"]["salt"]).encode()


async def headless(url: str, secret: Path, n: int) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        HEADLESS, "-s", url.removeprefix("nats://"), "-u", "batch", "-p", str(secret),
        "--agent", "web-1", "-t", "-1", "-v", "-c", f"echo login-{n}",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


@pytest.fixture
def shared(tmp_path: Path) -> tuple[Path, Path]:
    """The masters' one key (made beforehand: the agent trusts it) and users' file."""
    key = tmp_path / "master.nk"
    write_seed_file(key, generate_seed())
    return key, tmp_path / "users.json"


@pytest.fixture
async def fast_bus(nats_server: NatsServer) -> AsyncIterator[Bus]:
    """A bus whose presence entries expire after 2 s, so crashes are noticed quickly."""
    async with await connect(ConnectSettings(servers=[nats_server.url])) as b:
        await provision(b.js, settings=StorageSettings(presence_ttl_s=2.0, marker_ttl_s=5.0))
        yield b


async def test_a_standby_takes_over_from_a_killed_master_losing_nothing(
    nats_server: NatsServer,
    fast_bus: Bus,
    tmp_path: Path,
    agent_factory: Callable[..., AgentProcess],
    master_factory: Callable[..., MasterProcess],
    operator: tuple[Path, Signer],
    shared: tuple[Path, Path],
) -> None:
    bus, (operator_key, signer) = fast_bus, operator
    key, users = shared
    agent = agent_factory(
        "web-1", max_jobs=8, trusted=[signer.public_key, Signer.from_file(key).public_key]
    )
    await agent.started(bus)
    doomed = await agent_factory("web-2").started(bus)
    a, b = masters(master_factory, key, users, "a", "b")
    a.start()
    await wait_roles(bus, {"a": "active"})
    b.start()
    await wait_roles(bus, {"a": "active", "b": "standby"})
    assert (await active_status(bus))["name"] == "a"
    secret = await add_user(a, tmp_path)
    assert (await headless(nats_server.url, secret, 0))[0] == 0  # logins work before

    # A burst of jobs and logins; the active master is killed in the middle of it.
    jobs: list[str] = []
    logins: list[asyncio.Task[tuple[int, str]]] = []
    for n in range(40):
        jobs.append(await submit(bus, signer, "web-1", job_request(["sleep", "0.2"])))
        if n % 5 == 0:
            logins.append(asyncio.create_task(headless(nats_server.url, secret, n)))
        if n == 20:
            # An agent dies with a job running, and another job of it is due to expire:
            # the master that records them abandoned and expired is the next one.
            orphan = await submit(bus, signer, "web-2", job_request(["sleep", "20"]))
            await wait_event(bus, "web-2", orphan, "started")
            doomed.kill()
            expiring = await submit(
                bus, signer, "web-2", job_request(["true"], expires_at=time.time_ns() + 10**9)
            )
            a.kill()
            killed_at = asyncio.get_running_loop().time()
    # (The killed master's last heartbeat says active until it expires, one TTL at most.)
    await wait_roles(
        bus,
        lambda roles: roles.get("b") == "active" and roles.get("a") != "active",
        timeout=TAKEOVER_BOUND_S,
    )
    took = asyncio.get_running_loop().time() - killed_at
    assert took <= TAKEOVER_BOUND_S, took
    assert (await active_status(bus))["name"] == "b"

    # Every job ends exactly once; every login ran its job, once.
    for job in jobs:  # (how it ends is the agent's business; that it ends, the log's)
        await finished(bus, "web-1", job, timeout=60)
    results = await asyncio.gather(*logins)
    for code, err in results:
        assert code == 0, err + b.log()[-3000:]
    late = await headless(nats_server.url, secret, 99)  # and after the takeover
    assert late[0] == 0, late[1]
    assert (await finished(bus, "web-2", orphan, timeout=60)).status == "abandoned"
    assert (await finished(bus, "web-2", expiring, timeout=60)).status == "expired"
    jobs += [orphan, expiring]

    records = await read_log(bus, bus.subjects.events_stream, bus.subjects.all_events)
    envelopes = [decode_envelope(r.data) for r in records]
    finished_per_job = collections.Counter(
        e.subject.split(".")[-2] for e in envelopes if e.subject.endswith(".finished")
    )
    assert all(finished_per_job[j] == 1 for j in jobs), finished_per_job
    assert set(finished_per_job.values()) == {1}
    by_batch = [e for e in envelopes if e.type == "job.submitted" and e.source == "master"]
    assert len(by_batch) == len(logins) + 2  # one job per login, none twice
    # No master event twice: by id, and no two checkpoints anchor the same events.
    mine = [e for e in envelopes if e.source == "master"]
    assert len({e.id for e in mine}) == len(mine)
    through = [e.data["through_seq"] for e in mine if e.type == "audit.checkpoint"]
    assert through, "the masters checkpointed"
    assert len(set(through)) == len(through), through

    # The log verifies, with the checkpoints of both masters, against either's witness.
    for m in (a, b):
        audit = await run(
            FLEET, "audit", "--verify", "--witness", str(m.dir / "data" / "witness"),
            env=fleet_env(nats_server.url, operator_key),
        )  # fmt: skip
        assert audit.returncode == 0, audit.stdout + audit.stderr

    # The killed master comes back as a standby; the active one stays active.
    a.start()
    await wait_roles(bus, {"a": "standby", "b": "active"})
    holder, _ = await read_masters(bus)
    assert holder == "b"
    for m, role in ((a, "standby"), (b, "active")):
        shown = await run(MASTER, "status", "--json", "-c", str(m.config_path))
        assert shown.returncode == 0, shown.stderr
        doc = json.loads(shown.stdout)
        assert doc["master"]["role"] == role, doc
        assert doc["active"] == "b"
        assert {x["name"]: x["role"] for x in doc["masters"]} == {"a": "standby", "b": "active"}
    text = await run(MASTER, "status", "-c", str(a.config_path))
    assert text.stdout.startswith("master a: "), text.stdout
    assert ", standby," in text.stdout.splitlines()[0]
    assert "the master lease is held by b" in text.stdout


async def test_two_masters_started_at_once_make_one_active(
    bus: Bus,
    master_factory: Callable[..., MasterProcess],
    shared: tuple[Path, Path],
) -> None:
    key, users = shared
    group = masters(master_factory, key, users, "a", "b", "c")
    for m in group:
        m.start()
    roles = await wait_roles(bus, lambda roles: len(roles) == 3)
    assert sorted(roles.values()) == ["active", "standby", "standby"], roles
    holder, _ = await read_masters(bus)
    assert roles[holder or ""] == "active"
    assert (await active_status(bus))["name"] == holder
    # A clean stop hands over at once: the lease is released, not left to expire.
    stopped = next(m for m in group if m.settings["name"] == holder)
    stopped.stop()
    rest = [m.settings["name"] for m in group if m is not stopped]
    roles = await wait_roles(
        bus, lambda roles: sorted(roles.get(n, "") for n in rest) == ["active", "standby"]
    )
    assert holder not in roles


async def test_no_agent_operator_or_client_can_take_the_master_lease(
    server_factory: Callable[..., NatsServer], tmp_path: Path
) -> None:
    keys: dict[str, tuple[Path, str]] = {}
    for name in ("master", "web-1", "tester", "batch"):
        path = tmp_path / f"{name}.nk"
        write_seed_file(path, generate_seed())
        keys[name] = (path, Signer.from_file(path).public_key)
    admin_key = tmp_path / "admin.nk"
    made = await run(FLEET, "keys", "gen", "admin", "admin", "-o", str(admin_key))
    assert made.returncode == 0, made.stderr
    registry = tmp_path / "registry.toml"
    registry.write_text(
        f'[master]\npublic_key = "{keys["master"][1]}"\n'
        f'[agents.web-1]\npublic_key = "{keys["web-1"][1]}"\n'
        f'[operators.tester]\npublic_key = "{keys["tester"][1]}"\n'
        f'[headless.batch]\npublic_key = "{keys["batch"][1]}"\n'
        f'[admins.admin]\npublic_key = "{made.stdout.strip()}"\n'
    )
    rendered = await run(FLEET, "ops", "server-config", "--registry", str(registry))
    assert rendered.returncode == 0, rendered.stderr
    url = server_factory(config=rendered.stdout).url
    init = await run(FLEET, "ops", "init", env=fleet_env(url, admin_key))
    assert init.returncode == 0, init.stderr

    def as_(name: str) -> ConnectSettings:
        return ConnectSettings(
            servers=[url], nkey_file=keys[name][0], inbox_prefix=f"_INBOX_{name}"
        )

    master = MasterProcess(tmp_path, url, name="m1", nkey_file=str(keys["master"][0]))
    async with await connect(as_("master")) as watcher:
        try:
            master.start()
            await wait_roles(watcher, {"m1": "active"})
            for name in ("web-1", "tester", "batch"):
                async with await connect(as_(name)) as bus:
                    for key in (Subjects.MASTER_LEASE_KEY, Subjects.master_presence_key("m1")):
                        subject = Subjects.kv_key(bus.subjects.locks_bucket, key)
                        await bus.nc.publish(subject, name.encode())
                        denial = await bus.wait_denied(subject, timeout=5)
                        assert "publishing to" in str(denial), (name, subject)
            # A client's own locks still work; it cannot name the masters' even unchecked.
            async with await connect(as_("batch")) as bus:
                lock = Lease(bus, bus.subjects.locks_bucket, "nightly", "batch", 5)
                assert await lock.try_acquire()
                await lock.release()
            holder, _ = await read_masters(watcher)
            assert holder == "m1"
            refused = await run(
                HEADLESS, "-s", url, "-a", "nkey", "-u", "batch", "-p", str(keys["batch"][0]),
                "--agent", "web-1", "--lock", "master.lease", "-c", "true",
            )  # fmt: skip
            assert refused.returncode == 2, refused.stderr
            assert "masters' own" in refused.stderr
            assert "denied" not in master.log(), master.log()[-3000:]
        finally:
            master.stop()


async def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode is not None
    return subprocess.CompletedProcess(argv, proc.returncode, out.decode(), err.decode())


async def test_a_frozen_master_stops_acting_when_it_wakes_after_losing_the_lease(
    fast_bus: Bus,
    tmp_path: Path,
    master_factory: Callable[..., MasterProcess],
    operator: tuple[Path, Signer],
    shared: tuple[Path, Path],
) -> None:
    bus, (_, signer) = fast_bus, operator
    key, users = shared
    a, b = masters(master_factory, key, users, "a", "b")
    a.start()
    await wait_roles(bus, {"a": "active"})
    b.start()
    await wait_roles(bus, {"a": "active", "b": "standby"})
    # Work for the masters: checkpoints due, and jobs for an agent that never comes,
    # whose expiry falls while a is frozen.
    soon = time.time_ns() + 2 * 10**9
    queued = [
        await submit(bus, signer, "web-9", job_request(["true"], expires_at=soon)) for _ in range(7)
    ]
    a.signal(signal.SIGSTOP)  # a pause longer than the lease: a GC, a VM migration
    try:
        await wait_roles(
            bus, lambda roles: roles.get("b") == "active" and "a" not in roles, timeout=60
        )
    finally:
        a.signal(signal.SIGCONT)
    # Awake, it finds its lease run out: it stands by without touching b's lease.
    await wait_roles(bus, {"a": "standby", "b": "active"})
    holder, _ = await read_masters(bus)
    assert holder == "b"
    assert "standing by" in a.log()
    assert (await active_status(bus))["name"] == "b"
    for job in queued:
        assert (await finished(bus, "web-9", job)).status == "expired"
    records = await read_log(bus, bus.subjects.events_stream, bus.subjects.all_events)
    envelopes = [decode_envelope(r.data) for r in records]
    assert len({e.id for e in envelopes}) == len(envelopes)
    ends = collections.Counter(e.subject for e in envelopes if e.type == "job.finished")
    assert sorted(ends.values()) == [1] * len(queued)
    through = [e.data["through_seq"] for e in envelopes if e.type == "audit.checkpoint"]
    assert len(set(through)) == len(through), through


async def test_a_login_repeated_with_its_nonce_submits_its_job_once(
    bus: Bus,
    tmp_path: Path,
    master_factory: Callable[..., MasterProcess],
    shared: tuple[Path, Path],
) -> None:
    key, users = shared
    (master,) = masters(master_factory, key, users, "a")
    master.start()
    await wait_roles(bus, {"a": "active"})
    secret = await add_user(master, tmp_path)
    job = Submission(
        user="batch",
        agent="web-1",
        request=job_request(["true"]),
        auth="challenge",
        secret=secret,
    )
    salted = secret.read_bytes().strip()
    nonce = new_id() + new_nonce()
    # As after a takeover: a new challenge (the new master never saw the first), same nonce.
    first = await login(bus, job, salted, nonce)
    again = await login(bus, job, salted, nonce)
    other = await login(bus, job, salted, new_id() + new_nonce())
    assert first == again
    assert other != first
    records = await read_log(bus, bus.subjects.events_stream, bus.subjects.all_events)
    submitted = [decode_envelope(r.data) for r in records]
    ids = [e.data["job_id"] for e in submitted if e.type == "job.submitted"]
    assert sorted(ids) == sorted([first, other])
    # Someone else's login with the same nonce and job is another job.
    signer = Signer.from_file(key)
    assert login_job_id(signer, "mallory", nonce, "d" * 64) != login_job_id(
        signer, "batch", nonce, "d" * 64
    )
