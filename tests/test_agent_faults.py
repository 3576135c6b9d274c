"""The agent through faults: a deleted consumer, a log it cannot read, an outcome that
lost, a queue that waited while it was away. Real server, real agent processes."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from agents import (
    AgentProcess,
    finished,
    first_event,
    job_events,
    job_request,
    permissive_grant,
    submit,
    wait_event,
)
from natsserver import NatsServer

from agentd.admit import Admit
from agentd.agent import Agent
from agentd.beforestart import NotNow
from agentd.config import AgentConfig
from agentd.context import RunningJob
from agentd.identity import ensure_identity
from bus import Bus, Signer, generate_seed, sign_envelope
from bus.request import control
from schemas import (
    JobCancelRequested,
    JobFinished,
    JobLateResult,
    make_envelope,
)

Agents = Callable[..., AgentProcess]
Operator = tuple[Path, Signer]

pytestmark = pytest.mark.timeout(180)

TERMINAL = "job.finished"


async def terminal_events(bus: Bus, job_id: str) -> list[JobFinished]:
    events = await job_events(bus, job_id)
    return [JobFinished.model_validate(e.data) for e in events if e.type == TERMINAL]


async def wait_log(agent: AgentProcess, pattern: str, timeout: float = 30.0) -> str:
    """Until the agent's log has a line matching ``pattern``; returns that line."""
    regex = re.compile(pattern)
    async with asyncio.timeout(timeout):
        while True:
            for line in agent.log().splitlines():
                if regex.search(line):
                    return line
            await asyncio.sleep(0.05)  # the log is a file: look again


async def wait_file(path: Path, timeout: float = 30.0) -> None:
    """Until a job's side effect (a file) exists."""
    async with asyncio.timeout(timeout):
        while True:
            if await asyncio.to_thread(path.exists):
                return
            await asyncio.sleep(0.05)  # a file has no event to wait on: look again


async def set_stream(bus: Bus, **changes: object) -> None:
    info = await bus.js.stream_info(bus.subjects.events_stream)
    config = info.config
    for key, value in changes.items():
        setattr(config, key, value)
    await bus.js.update_stream(config)


async def master_says(bus: Bus, master: Signer, agent: str, job_id: str, status: str) -> None:
    """What the master publishes when it ends a job without the agent."""
    data = JobFinished(job_id=job_id, agent=agent, status=status, reason=f"master: {status}")  # type: ignore[arg-type]
    subject = bus.subjects.job_event(agent, job_id, "finished")
    envelope = sign_envelope(make_envelope(data, source="master", subject=subject), master)
    await bus.publish_event(envelope, expected_last_subject_seq=0)


async def test_a_deleted_consumer_is_recreated_and_the_next_jobs_run(
    bus: Bus, agent_factory: Agents, operator: Operator
) -> None:
    agent = await agent_factory("web-1").started(bus)
    first = await submit(bus, operator[1], "web-1", job_request(["true"]))
    assert (await finished(bus, "web-1", first)).status == "succeeded"

    # An admin (or an attacker with the old reader role) deletes both consumers.
    stream = bus.subjects.events_stream
    for kind in ("jobs", "cancels"):
        name, _ = bus.subjects.agent_consumer("web-1", kind)
        assert await bus.js.delete_consumer(stream, name)

    job = await submit(bus, operator[1], "web-1", job_request(["echo", "again"]))
    result = await finished(bus, "web-1", job, timeout=60)
    assert result.status == "succeeded"
    assert result.output_tail == "again\n"
    line = await wait_log(agent, r"consumer agent_web-1_jobs .* was deleted; created it again")
    assert "WARNING" in line

    # Cancels flow again too.
    slow = await submit(bus, operator[1], "web-1", job_request(["sleep", "60"]))
    await wait_event(bus, "web-1", slow, "started")
    data = JobCancelRequested(job_id=slow, agent="web-1", requested_by="tester")
    subject = bus.subjects.job_event("web-1", slow, "cancel_requested")
    await bus.publish_event(
        sign_envelope(make_envelope(data, source="tester", subject=subject), operator[1])
    )
    assert (await finished(bus, "web-1", slow, timeout=60)).status == "cancelled"
    status = await control(bus, bus.subjects.control("web-1", "status"), signer=operator[1])
    assert status.data["counters"]["consumers_recreated"] == 2


async def test_a_log_it_cannot_read_leaves_the_job_queued_not_failed(
    bus: Bus, agent_factory: Agents, operator: Operator, tmp_path: Path
) -> None:
    agent = await agent_factory("web-1").started(bus)
    runs = tmp_path / "runs"
    # The agent's look-ups before a start (an outcome or cancel already recorded?) are
    # direct gets: with those switched off the log cannot be read, as in an outage.
    await set_stream(bus, allow_direct=False)
    job = await submit(bus, operator[1], "web-1", job_request(script=f"echo ran >> {runs}"))
    await wait_log(agent, rf"job {job} left queued")
    assert await terminal_events(bus, job) == []
    assert not runs.exists()

    await set_stream(bus, allow_direct=True)
    result = await finished(bus, "web-1", job, timeout=90)
    assert result.status == "succeeded"
    assert runs.read_text() == "ran\n"
    assert [t.status for t in await terminal_events(bus, job)] == ["succeeded"]
    assert "internal error" not in agent.log()


async def test_a_start_it_cannot_record_does_not_leave_the_process_unwatched(
    bus: Bus, agent_factory: Agents, operator: Operator, tmp_path: Path
) -> None:
    agent = await agent_factory("web-1").started(bus)
    ran = tmp_path / "ran"
    # The log stops taking `started` events (as if the server were away for them alone).
    info = await bus.js.stream_info(bus.subjects.events_stream)
    everything = list(info.config.subjects or [])
    p = bus.subjects.prefix
    await set_stream(
        bus,
        subjects=[
            *(f"{p}.evt.job.*.*.{e}" for e in ("submitted", "cancel_requested", "finished")),
            f"{p}.evt.job.*.*.late_result",
            f"{p}.evt.agent.>",
        ],
    )
    job = await submit(bus, operator[1], "web-1", job_request(script=f"echo done > {ran}"))
    # The agent gives a publish 30 s before it says it failed: wait longer than that.
    await wait_log(agent, rf"job {job}: recording job.started failed", timeout=75)
    # The job ran to its end meanwhile, and nothing called it failed.
    await wait_file(ran)
    assert await terminal_events(bus, job) == []

    await set_stream(bus, subjects=everything)
    result = await finished(bus, "web-1", job, timeout=90)
    assert result.status == "succeeded"
    types = [e.type for e in await job_events(bus, job)]
    assert types == ["job.submitted", "job.started", "job.finished"]


async def test_an_outcome_that_lost_is_recorded_as_a_late_result(
    bus: Bus, agent_factory: Agents, operator: Operator, tmp_path: Path
) -> None:
    await agent_factory("web-1").started(bus)
    go = tmp_path / "go"
    script = f"while [ ! -e {go} ]; do sleep 0.05; done; echo finished anyway"
    job = await submit(bus, operator[1], "web-1", job_request(script=script))
    await wait_event(bus, "web-1", job, "started")
    # The master gave up on it first (the agent looked dead past its grace).
    await master_says(bus, Signer(generate_seed()), "web-1", job, "abandoned")
    go.touch()

    late = await first_event(bus, bus.subjects.job_event("web-1", job, "late_result"))
    assert isinstance(late.data, JobLateResult)
    assert late.data.status == "succeeded"
    assert late.data.output_tail == "finished anyway\n"
    assert [t.status for t in await terminal_events(bus, job)] == ["abandoned"]
    status = await control(bus, bus.subjects.control("web-1", "status"), signer=operator[1])
    assert status.data["counters"]["late_results"] == 1


async def test_back_from_offline_the_agent_respects_expiry_cancel_and_recorded_ends(
    bus: Bus, agent_factory: Agents, operator: Operator, tmp_path: Path
) -> None:
    agent = agent_factory("web-1", max_jobs=1)  # one at a time: the queue's order holds
    signer = operator[1]

    def touching(name: str) -> str:
        return f"touch {tmp_path / name}"

    expires_at = time.time_ns() + 500_000_000
    expiring = await submit(
        bus, signer, "web-1", job_request(script=touching("expired"), expires_at=expires_at)
    )
    cancelled = await submit(bus, signer, "web-1", job_request(script=touching("cancelled")))
    data = JobCancelRequested(job_id=cancelled, agent="web-1", requested_by="tester")
    subject = bus.subjects.job_event("web-1", cancelled, "cancel_requested")
    await bus.publish_event(
        sign_envelope(make_envelope(data, source="tester", subject=subject), signer)
    )
    ended = await submit(bus, signer, "web-1", job_request(script=touching("ended")))
    await master_says(bus, Signer(generate_seed()), "web-1", ended, "expired")
    last = await submit(bus, signer, "web-1", job_request(script=touching("last")))
    await asyncio.sleep(max(0.0, (expires_at - time.time_ns()) / 1e9))  # past its expiry

    await agent.started(bus)
    assert (await finished(bus, "web-1", last)).status == "succeeded"
    for job, status in ((expiring, "expired"), (cancelled, "cancelled"), (ended, "expired")):
        assert [t.status for t in await terminal_events(bus, job)] == [status], job
        types = [e.type for e in await job_events(bus, job)]
        assert "job.started" not in types
        assert "job.late_result" not in types
    for name in ("expired", "cancelled", "ended"):
        assert not (tmp_path / name).exists(), name
    assert (tmp_path / "last").exists()
    await wait_log(agent, rf"job {ended} already ended expired in the log")


async def test_an_outcome_the_log_could_not_take_before_a_stop_is_recorded_after_it(
    bus: Bus, agent_factory: Agents, operator: Operator, tmp_path: Path
) -> None:
    agent = await agent_factory("web-1").started(bus)
    info = await bus.js.stream_info(bus.subjects.events_stream)
    everything = list(info.config.subjects or [])
    p = bus.subjects.prefix
    # The log stops taking outcomes (as if the server were away for them alone).
    await set_stream(
        bus,
        subjects=[
            *(f"{p}.evt.job.*.*.{e}" for e in ("submitted", "cancel_requested", "started")),
            f"{p}.evt.agent.>",
        ],
    )
    job = await submit(bus, operator[1], "web-1", job_request(["sh", "-c", "exit 3"]))
    # The agent gives a publish 30 s before it says it failed: wait longer than that.
    await wait_log(agent, rf"job {job}: recording job.finished failed", timeout=75)
    assert await asyncio.to_thread(agent.stop) == 0
    assert await terminal_events(bus, job) == []

    await set_stream(bus, subjects=everything)
    agent.start()
    result = await finished(bus, "web-1", job, timeout=60)
    # What the job did, not "abandoned": the journal kept it across the stop.
    assert (result.status, result.exit_code) == ("failed", 3)
    assert len(await terminal_events(bus, job)) == 1


async def test_a_server_outage_mid_job_loses_nothing_and_fails_nothing(
    nats_server: NatsServer, bus: Bus, agent_factory: Agents, operator: Operator, tmp_path: Path
) -> None:
    agent = await agent_factory("web-1", max_jobs=1).started(bus)
    go = tmp_path / "go"
    runs = tmp_path / "runs"
    first = await submit(
        bus,
        operator[1],
        "web-1",
        job_request(script=f"while [ ! -e {go} ]; do sleep 0.05; done; echo first >> {runs}"),
    )
    await wait_event(bus, "web-1", first, "started")
    queued = await submit(bus, operator[1], "web-1", job_request(script=f"echo q >> {runs}"))

    await asyncio.to_thread(nats_server.stop)  # SIGTERM: the store survives
    go.touch()  # the job ends while the server is away
    await wait_log(agent, rf"↻ publish \S+\.{first}\.finished")  # trying, not failing
    await asyncio.to_thread(nats_server.start)

    assert (await finished(bus, "web-1", first, timeout=90)).status == "succeeded"
    assert (await finished(bus, "web-1", queued, timeout=90)).status == "succeeded"
    assert runs.read_text() == "first\nq\n"
    for job in (first, queued):
        assert len(await terminal_events(bus, job)) == 1
    assert "internal error" not in agent.log()


async def test_a_job_redelivered_while_it_is_being_checked_is_neither_lost_nor_run_twice(
    bus: Bus, tmp_path: Path, operator: tuple[Path, Signer], caplog: pytest.LogCaptureFixture
) -> None:
    """The server forgets a delivery while the agent still checks that job (a restart
    lost the consumer's state; here: the consumer is deleted and made again), redelivers
    it, and the check then fails as in an outage. The job must be left queued on the
    delivery the server now waits on, and run once: acking the redelivery as a
    duplicate lost the job (seen under load in the server-SIGKILL fault scenario)."""
    trust = tmp_path / "trust.toml"
    trust.write_text(permissive_grant(operator[1].public_key))
    config = AgentConfig(id="web-1", data_dir=tmp_path / "web-1", heartbeat_s=5.0, trust_file=trust)
    agent = Agent(bus, config, ensure_identity(config))
    checking, handed_over, redelivered = asyncio.Event(), asyncio.Event(), asyncio.Event()
    checks = 0
    prepare = agent.runner._prepare

    class HandOver(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "redelivered while it is being prepared" in record.getMessage():
                handed_over.set()

    async def held_check(running: RunningJob, admitted: Admit) -> object:
        nonlocal checks
        checks += 1
        if checks == 1:
            checking.set()
            async with asyncio.timeout(30):
                await handed_over.wait()
            redelivered.set()
            raise NotNow("the log could not be read (an outage)")
        return await prepare(running, admitted)

    caplog.set_level(logging.INFO, logger="agentd.consumer")
    consumer_log = logging.getLogger("agentd.consumer")
    consumer_log.addHandler(hand_over := HandOver())

    agent.runner._prepare = held_check  # type: ignore[method-assign]
    runs = tmp_path / "runs"
    async with asyncio.TaskGroup() as tg:
        tg.create_task(agent.run())
        async with asyncio.timeout(30):
            await agent.ready.wait()
        job = await submit(
            bus, operator[1], "web-1", job_request(["sh", "-c", f'echo run >> "{runs}"'])
        )
        async with asyncio.timeout(30):
            await checking.wait()
        name, _ = bus.subjects.agent_consumer("web-1", "jobs")
        assert await bus.js.delete_consumer(bus.subjects.events_stream, name)
        async with asyncio.timeout(60):
            await redelivered.wait()
        result = await finished(bus, "web-1", job, timeout=60)
        agent.stop()
    consumer_log.removeHandler(hand_over)
    assert result.status == "succeeded"
    assert runs.read_text() == "run\n"
    assert checks == 2


async def test_a_restarting_agent_leaves_its_neighbours_jobs_alone(
    bus: Bus, agent_factory: Agents, operator: tuple[Path, Signer], tmp_path: Path
) -> None:
    """Two agents in one cgroup (one host without a unit each, or ``--simulate``): when
    one restarts and sweeps what its crash left behind, the other's running job lives on."""
    gate = tmp_path / "gate"
    await agent_factory("web-1").started(bus)
    restarting = await agent_factory("web-2").started(bus)
    job = await submit(
        bus,
        operator[1],
        "web-1",
        job_request(["sh", "-c", f'while [ ! -e "{gate}" ]; do sleep 0.05; done; echo out']),
    )
    await wait_event(bus, "web-1", job, "started")
    restarting.kill()
    await restarting.started(bus)
    gate.touch()
    result = await finished(bus, "web-1", job, timeout=60)
    assert result.status == "succeeded", result.reason
    assert result.output_tail == "out\n"
