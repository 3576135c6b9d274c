"""Jobs end to end: real server, real agent processes, the real ``fleet`` CLI."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from agents import (
    FLEET,
    AgentProcess,
    finished,
    fleet_env,
    job_events,
    job_request,
    pid_alive,
    submit,
    wait_event,
)
from natsserver import NatsServer

from bus import Bus, Signer, encode_envelope
from bus.codec import HEADER_OUTPUT_STREAM, pack
from bus.log import read_log
from bus.request import control
from schemas import JobSubmitted, make_envelope, new_id

Agents = Callable[..., AgentProcess]
Operator = tuple[Path, Signer]

pytestmark = pytest.mark.timeout(120)


async def fleet(
    url: str, key: Path, *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[bytes]:
    """Run the real ``fleet`` CLI without blocking the test's event loop."""
    proc = await asyncio.create_subprocess_exec(
        FLEET, *args, env=fleet_env(url, key), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


async def test_round_trip_and_exit_codes(
    nats_server: NatsServer, bus: Bus, agent_factory: Agents, operator: Operator
) -> None:
    await agent_factory("web-1").started(bus)
    key = operator[0]

    ok = await fleet(nats_server.url, key, "run", "-a", "web-1", "--", "echo", "hello")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == b"hello\n"

    bad = await fleet(
        nats_server.url,
        key,
        "run",
        "-a",
        "web-1",
        "--json",
        "--",
        "sh",
        "-c",
        "echo oops >&2; exit 3",
    )
    assert bad.returncode == 4
    doc = json.loads(bad.stdout)
    [job] = doc["jobs"]
    assert job["agent"] == "web-1"
    assert job["status"] == "failed"
    assert job["exit_code"] == 3

    show = await fleet(nats_server.url, key, "job", "show", job["job_id"], "--json")
    shown = json.loads(show.stdout)
    assert shown["status"] == "failed"
    assert shown["exit_code"] == 3
    assert shown["submitted_by"] == "tester"
    assert shown["output_tail"] == "oops\n"
    for field in ("submitted_at", "started_at", "finished_at", "run_as", "agent"):
        assert field in shown

    events = [e.type for e in await job_events(bus, job["job_id"])]
    assert events == ["job.submitted", "job.started", "job.finished"]

    missing = await fleet(nats_server.url, key, "job", "show", new_id())
    assert missing.returncode == 2
    nobody = await fleet(nats_server.url, key, "run", "-g", "db-*", "--", "true")
    assert nobody.returncode == 2
    assert b"no online agent matches -g db-*" in nobody.stderr


async def test_timeout_kills_the_whole_process_group(
    bus: Bus, agent_factory: Agents, operator: Operator
) -> None:
    await agent_factory("web-1").started(bus)
    # The job forks a grandchild that would outlive a kill of the job's own pid.
    script = "sleep 300 & echo $! ; wait"
    job = await submit(bus, operator[1], "web-1", job_request(script=script, timeout_s=1.0))
    result = await finished(bus, "web-1", job)
    assert result.status == "timed_out"
    assert "timed out after 1s" in (result.reason or "")
    grandchild = int(result.output_tail.split()[0])
    assert not pid_alive(grandchild)


async def test_cancel_a_running_job(
    nats_server: NatsServer, bus: Bus, agent_factory: Agents, operator: Operator
) -> None:
    await agent_factory("web-1", max_jobs=1).started(bus)
    job = await submit(bus, operator[1], "web-1", job_request(["sleep", "300"]))
    started = await wait_event(bus, "web-1", job, "started")
    # Every slot is busy; the cancel must still get through.
    result = await fleet(
        nats_server.url, operator[0], "job", "cancel", job, "--reason", "test", "--wait", "30"
    )
    assert result.returncode == 0, result.stderr
    done = await finished(bus, "web-1", job)
    assert done.status == "cancelled"
    assert "tester" in (done.reason or "")
    assert not pid_alive(started.data.pid)


async def test_expired_jobs_never_run(
    bus: Bus, agent_factory: Agents, operator: Operator, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    past = time.time_ns() - 1_000_000_000
    job = await submit(
        bus, operator[1], "late", job_request(["touch", str(marker)], expires_at=past)
    )
    await agent_factory("late").started(bus)
    result = await finished(bus, "late", job)
    assert result.status == "expired"
    assert not marker.exists()
    assert [e.type for e in await job_events(bus, job)] == ["job.submitted", "job.finished"]


async def test_job_for_an_offline_agent_waits_and_runs_when_it_returns(
    nats_server: NatsServer, bus: Bus, agent_factory: Agents, operator: Operator
) -> None:
    agent = agent_factory("late")
    await agent.started(bus)
    agent.stop()
    queued = await fleet(
        nats_server.url, operator[0], "run", "-a", "late", "--async", "--json", "--", "echo", "back"
    )
    assert queued.returncode == 0
    [job] = json.loads(queued.stdout)["jobs"]
    shown = await fleet(nats_server.url, operator[0], "job", "show", job["job_id"])
    assert b"submitted (agent offline since" in shown.stdout

    waited = await fleet(nats_server.url, operator[0], "job", "wait", job["job_id"], "--wait", "1")
    assert waited.returncode == 3
    assert b"still submitted (agent offline since" in waited.stderr
    # The CLI's own wait is not the job's timeout: it gives up, the job stays queued.
    gave_up = await fleet(
        nats_server.url, operator[0], "run", "-a", "late", "--wait", "1", "--json", "--", "true"
    )
    assert gave_up.returncode == 3
    [second] = json.loads(gave_up.stdout)["jobs"]
    assert second["status"] == "queued"
    assert second["note"].startswith("agent offline since")

    await agent.started(bus)
    result = await finished(bus, "late", job["job_id"])
    assert result.status == "succeeded"
    assert result.output_tail == "back\n"
    assert (await finished(bus, "late", second["job_id"])).status == "succeeded"


async def test_logs_follow_streams_until_the_end(
    nats_server: NatsServer, bus: Bus, agent_factory: Agents, operator: Operator, tmp_path: Path
) -> None:
    await agent_factory("web-1").started(bus)
    gate = tmp_path / "gate"
    script = f"echo first; while [ ! -e {gate} ]; do sleep 0.05; done; echo second >&2; echo third"
    job = await submit(bus, operator[1], "web-1", job_request(script=script))
    await wait_event(bus, "web-1", job, "started")
    follow = await asyncio.create_subprocess_exec(
        FLEET,
        "job",
        "logs",
        "--follow",
        job,
        env=fleet_env(nats_server.url, operator[0]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert follow.stdout is not None
    assert await asyncio.wait_for(follow.stdout.readline(), 30) == b"first\n"
    gate.touch()  # only now does the job go on: the follower saw it live
    out, err = await asyncio.wait_for(follow.communicate(), 30)
    assert out == b"third\n"
    assert err == b"second\n"
    assert follow.returncode == 0


@pytest.mark.slow
async def test_kill_9_mid_job_is_abandoned_not_rerun_and_leaves_no_orphan(
    bus: Bus, agent_factory: Agents, operator: Operator, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    agent = await agent_factory("web-1").started(bus)
    job = await submit(
        bus, operator[1], "web-1", job_request(script=f"echo run >> {runs}; sleep 300")
    )
    started = await wait_event(bus, "web-1", job, "started")
    job_pid = started.data.pid
    agent.kill()  # SIGKILL: no cleanup, the job's processes orphaned
    assert pid_alive(job_pid)

    await agent.started(bus)
    result = await finished(bus, "web-1", job)
    assert result.status == "abandoned"
    assert "leftover processes killed" in (result.reason or "")
    assert not pid_alive(job_pid)
    # Run once, never again; and exactly one ending.
    assert runs.read_text() == "run\n"
    types = [e.type for e in await job_events(bus, job)]
    assert types == ["job.submitted", "job.started", "job.finished"]


async def test_one_mib_of_output_arrives_byte_exact_and_in_order(
    nats_server: NatsServer, bus: Bus, agent_factory: Agents, operator: Operator
) -> None:
    await agent_factory("web-1").started(bus)
    expected = bytes(range(256)) * 4096  # 1 MiB, every byte value
    code = "import sys; sys.stdout.buffer.write(bytes(range(256)) * 4096)"
    result = await fleet(
        nats_server.url, operator[0], "run", "-a", "web-1", "--", "python3", "-c", code
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected

    jobs = json.loads((await fleet(nats_server.url, operator[0], "jobs", "--json")).stdout)["jobs"]
    job_id = jobs[-1]["job_id"]
    logs = await fleet(nats_server.url, operator[0], "job", "logs", job_id)
    assert logs.stdout == expected
    records = await read_log(bus, bus.subjects.output_stream, bus.subjects.output("web-1", job_id))
    assert [int(r.headers["Fleet-Seq"]) for r in records] == list(range(1, len(records) + 1))
    assert {r.headers[HEADER_OUTPUT_STREAM] for r in records} == {"stdout"}

    # A chunk gone from the store (expired, or removed by an admin): said, never a
    # silently short output.
    assert await bus.js.delete_msg(bus.subjects.output_stream, records[1].seq)
    short = await fleet(nats_server.url, operator[0], "job", "logs", job_id)
    assert len(short.stdout) < len(expected)
    assert f"only {len(records) - 1} of the {len(records)} output chunks" in short.stderr.decode()


async def test_output_beyond_the_cap_is_truncated_with_a_marker(
    bus: Bus, agent_factory: Agents, operator: Operator
) -> None:
    await agent_factory("web-1", max_output_bytes=1000, output_tail_bytes=16).started(bus)
    job = await submit(
        bus, operator[1], "web-1", job_request(["python3", "-c", "print('x' * 100000)"])
    )
    result = await finished(bus, "web-1", job)
    assert result.status == "succeeded"
    assert result.truncated
    assert result.stdout_bytes == 100001
    assert result.output_tail == "x" * 15 + "\n"
    records = await read_log(bus, bus.subjects.output_stream, bus.subjects.output("web-1", job))
    streamed = b"".join(r.data for r in records if r.headers[HEADER_OUTPUT_STREAM] == "stdout")
    assert streamed == b"x" * 1000
    assert records[-1].headers[HEADER_OUTPUT_STREAM] == "marker"
    assert b"99001 more bytes not streamed" in records[-1].data


async def test_max_jobs_holds(bus: Bus, agent_factory: Agents, operator: Operator) -> None:
    await agent_factory("web-1", max_jobs=2).started(bus)
    jobs = [
        await submit(bus, operator[1], "web-1", job_request(["sleep", "0.3"])) for _ in range(5)
    ]
    for job in jobs:
        assert (await finished(bus, "web-1", job)).status == "succeeded"
    spans = []
    for job in jobs:
        times = {e.type: e.ts for e in await job_events(bus, job)}
        spans.append((times["job.started"], times["job.finished"]))
    # At no instant were more than two jobs between started and finished.
    edges = sorted([(s, 1) for s, _ in spans] + [(f, -1) for _, f in spans])
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    assert peak == 2


async def test_fan_out_by_glob_and_label(
    nats_server: NatsServer, bus: Bus, agent_factory: Agents, operator: Operator
) -> None:
    for agent_id, role in (("web-1", "web"), ("web-2", "web"), ("db-1", "db")):
        await agent_factory(agent_id, labels={"role": role}).started(bus)
    by_glob = await fleet(
        nats_server.url, operator[0], "run", "-g", "web-*", "--", "sh", "-c", "echo one; echo two"
    )
    assert by_glob.returncode == 0, by_glob.stderr
    lines = sorted(by_glob.stdout.decode().splitlines())
    assert lines == ["web-1: one", "web-1: two", "web-2: one", "web-2: two"]

    by_label = await fleet(
        nats_server.url, operator[0], "run", "-l", "role=db", "--json", "--", "true"
    )
    assert [j["agent"] for j in json.loads(by_label.stdout)["jobs"]] == ["db-1"]

    rolling = await fleet(
        nats_server.url,
        operator[0],
        "run",
        "-g",
        "*",
        "--batch-size",
        "1",
        "--fail-fast",
        "--json",
        "--",
        "sh",
        "-c",
        'test "$(hostname)" = never',
    )
    assert rolling.returncode == 4
    statuses = [j["status"] for j in json.loads(rolling.stdout)["jobs"]]
    assert statuses == ["failed", "skipped", "skipped"]

    agents = json.loads((await fleet(nats_server.url, operator[0], "agents", "--json")).stdout)[
        "agents"
    ]
    assert {a["id"]: a["labels"]["role"] for a in agents} == {
        "db-1": "db",
        "web-1": "web",
        "web-2": "web",
    }
    assert all(a["online"] for a in agents)


async def test_malformed_messages_are_reported_and_do_not_stop_the_agent(
    bus: Bus, agent_factory: Agents, operator: Operator
) -> None:
    await agent_factory("web-1").started(bus)
    subject = bus.subjects.job_event("web-1", new_id(), "submitted")
    await bus.js.publish(subject, b"\xc1 garbage")
    await bus.js.publish(subject, pack({"id": 1, "type": ["wrong"]}))
    # A job of a version newer than this agent: rejected, with a named end state.
    future_job = new_id()
    valid = JobSubmitted(
        job_id=future_job, agent="web-1", request=job_request(["true"]), submitted_by="x"
    )
    future = make_envelope(
        valid, source="x", subject=bus.subjects.job_event("web-1", future_job, "submitted")
    )
    await bus.js.publish(future.subject, encode_envelope(future.model_copy(update={"v": 99})))

    rejected = await finished(bus, "web-1", future_job)
    assert rejected.status == "rejected"
    assert "v99 is newer" in (rejected.reason or "")

    ok = await submit(bus, operator[1], "web-1", job_request(["true"]))
    assert (await finished(bus, "web-1", ok)).status == "succeeded"
    status = await control(bus, bus.subjects.control("web-1", "status"), signer=operator[1])
    assert status.data["counters"]["malformed"] == 2
    log = await control(
        bus, bus.subjects.control("web-1", "log"), {"lines": 500}, signer=operator[1]
    )
    assert any("malformed message" in line for line in log.data["lines"])


async def test_duplicate_submission_of_a_job_is_not_run_twice(
    bus: Bus, agent_factory: Agents, operator: Operator, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    await agent_factory("web-1").started(bus)
    request = job_request(script=f"echo run >> {runs}")
    job = await submit(bus, operator[1], "web-1", request)
    await finished(bus, "web-1", job)
    await submit(bus, operator[1], "web-1", request, job_id=job)  # same job, new event
    marker = await submit(bus, operator[1], "web-1", job_request(["true"]))
    await finished(bus, "web-1", marker)  # processed after the duplicate
    assert runs.read_text() == "run\n"
    status = await control(bus, bus.subjects.control("web-1", "status"), signer=operator[1])
    assert status.data["counters"]["duplicates_skipped"] == 1


async def test_sigterm_drains_then_abandons_and_withdraws_presence(
    bus: Bus, agent_factory: Agents, operator: Operator
) -> None:
    agent = await agent_factory("web-1", shutdown_grace_s=0.5).started(bus)
    job = await submit(bus, operator[1], "web-1", job_request(["sleep", "300"]))
    started = await wait_event(bus, "web-1", job, "started")
    assert await asyncio.to_thread(agent.stop) == 0
    result = await finished(bus, "web-1", job)
    assert result.status == "abandoned"
    assert "shut down" in (result.reason or "")
    assert not pid_alive(started.data.pid)
    kv = await bus.key_value(bus.subjects.presence_bucket)
    import nats.js.errors

    with pytest.raises(nats.js.errors.KeyNotFoundError):
        await kv.get("web-1")
    offline = await read_log(
        bus, bus.subjects.events_stream, bus.subjects.agent_event("web-1", "offline")
    )
    assert len(offline) == 1


async def test_sighup_reloads_and_control_ops(
    bus: Bus, agent_factory: Agents, operator: Operator
) -> None:
    agent = await agent_factory("web-1", labels={"role": "web"}).started(bus)
    kv = await bus.key_value(bus.subjects.presence_bucket)
    watcher = await kv.watch("web-1")
    text = agent.config_path.read_text().replace('role = "web"', 'role = "api"')
    agent.config_path.write_text(text)
    agent.signal(signal.SIGHUP)
    async with asyncio.timeout(20):
        async for entry in watcher:
            if entry is not None and entry.value and b"api" in entry.value:
                break
    await watcher.stop()

    changed = await control(
        bus, bus.subjects.control("web-1", "config-set"), {"max_jobs": 7}, signer=operator[1]
    )
    assert changed.data == {"changed": ["max_jobs"]}
    status = await control(bus, bus.subjects.control("web-1", "status"), signer=operator[1])
    assert status.data["max_jobs"] == 7
    assert status.data["labels"] == {"role": "api"}
    config = await control(bus, bus.subjects.control("web-1", "config-get"), signer=operator[1])
    assert config.data["id"] == "web-1"

    from bus import FleetError

    with pytest.raises(FleetError, match="cannot set id at run time"):
        await control(
            bus, bus.subjects.control("web-1", "config-set"), {"id": "other"}, signer=operator[1]
        )
    with pytest.raises(FleetError, match="unknown operation"):
        await control(bus, bus.subjects.control("web-1", "fly"), signer=operator[1])


async def test_modules_and_rejections(bus: Bus, agent_factory: Agents, operator: Operator) -> None:
    modules = {"hello": {"argv": ["echo", "hi"], "allow_args": False}}
    await agent_factory("web-1", modules=modules).started(bus)
    from schemas import JobRequest, ModuleCommand

    ok = await submit(bus, operator[1], "web-1", JobRequest(command=ModuleCommand(module="hello")))
    result = await finished(bus, "web-1", ok)
    assert result.status == "succeeded"
    assert result.output_tail == "hi\n"
    extra = await submit(
        bus, operator[1], "web-1", JobRequest(command=ModuleCommand(module="hello", args=["x"]))
    )
    assert "takes no arguments" in ((await finished(bus, "web-1", extra)).reason or "")
    unknown = await submit(
        bus, operator[1], "web-1", JobRequest(command=ModuleCommand(module="nope"))
    )
    assert (await finished(bus, "web-1", unknown)).status == "rejected"
    missing = await submit(bus, operator[1], "web-1", job_request(["/no/such/program"]))
    failed = await finished(bus, "web-1", missing)
    assert failed.status == "failed"
    assert "cannot start /no/such/program" in (failed.reason or "")


def test_fleet_demo_runs_on_a_fresh_default() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    result = subprocess.run([FLEET, "demo"], capture_output=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr.decode()
    out = result.stdout.decode()
    assert "hello from fleetbus" in out
    assert "result: succeeded, exit code 0" in out
    assert "the master's projection agrees: job succeeded" in out
    for event in ("agent.online", "job.submitted", "job.started", "job.finished"):
        assert event in out
    assert "NOT VERIFIED" not in out


async def test_restart_control_op_reexecs_in_place(
    bus: Bus, agent_factory: Agents, operator: Operator
) -> None:
    agent = await agent_factory("web-1").started(bus)
    assert agent.proc is not None
    pid = agent.proc.pid
    agent.started_ns = time.time_ns()
    reply = await control(bus, bus.subjects.control("web-1", "restart"), signer=operator[1])
    assert reply.data == {"restarting": True}
    await agent.wait_online(bus)  # a new incarnation's heartbeat
    assert agent.proc.poll() is None
    assert agent.proc.pid == pid  # re-executed in place: the pid file stays right


async def test_control_requests_retry_then_time_out(bus: Bus) -> None:
    from bus import FleetTimeoutError
    from bus.request import retry_delays

    assert retry_delays(9) == [1, 2, 4, 8, 16, 32, 60, 60]
    with pytest.raises(FleetTimeoutError, match="after 2 attempts"):
        await control(bus, bus.subjects.control("nobody", "status"), timeout=0.5, attempts=2)
