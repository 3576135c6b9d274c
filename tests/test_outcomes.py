"""The master's outcomes (abandoned, expired, cancelled without the agent), decided by the
server: one ``job.finished`` per job, whoever publishes first."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from agents import FLEET, MasterProcess, finished, fleet_env, job_events, job_request, submit
from faults import report, terminal_events
from natsserver import NatsServer

from bus import Bus, Signer, generate_seed, sign_envelope
from master.outcomes import Outcomes
from schemas import JobFinished, make_envelope, new_id

pytestmark = pytest.mark.timeout(120)


async def _finished_envelopes(bus: Bus, job_id: str) -> list[str]:
    return [e.source for e in await job_events(bus, job_id) if e.type == "job.finished"]


async def test_master_expires_and_cancels_queued_jobs_of_an_offline_agent(
    nats_server: NatsServer,
    bus: Bus,
    master_factory: Callable[..., MasterProcess],
    operator: tuple[Path, Signer],
) -> None:
    key, signer = operator
    master = master_factory(
        offline_grace_s=2.0, operators={"tester": {"public_key": signer.public_key}}
    ).start()
    await master.wait_ready(bus)
    soon = time.time_ns() + 1_000_000_000
    expiring = await submit(bus, signer, "ghost", job_request(["true"], expires_at=soon))
    queued = await submit(bus, signer, "ghost", job_request(["true"]))
    forever = await submit(bus, signer, "ghost", job_request(["true"]))

    # `fleet job cancel` does not wait for an agent that is not there.
    cancel = await asyncio.create_subprocess_exec(
        FLEET,
        "job",
        "cancel",
        queued,
        "--wait",
        "30",
        env=fleet_env(nats_server.url, key),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(cancel.communicate(), 60)
    assert cancel.returncode == 0, err
    assert b"cancelled" in out

    assert (await finished(bus, "ghost", expiring)).status == "expired"
    assert await _finished_envelopes(bus, expiring) == ["master"]
    terminal = await terminal_events(bus)
    report(f"FAULT offline-queue: terminal={ {j: terminal.get(j) for j in (expiring, queued)} }")
    assert terminal[expiring] == ["expired"]
    assert terminal[queued] == ["cancelled"]
    assert forever not in terminal  # neither expired nor cancelled: it waits for its agent


async def test_the_first_outcome_wins_and_a_retry_is_the_same_event(
    bus: Bus, operator: tuple[Path, Signer]
) -> None:
    master = Signer(generate_seed())
    job, agent = new_id(), "web-1"
    await submit(bus, operator[1], agent, job_request(["true"]), job_id=job)

    first = Outcomes(bus, master, "master", grace_s=1.0)
    assert await first.record(agent, job, "expired", "test") is True
    # A retry after an unknown outcome (a new master after a crash): the same event.
    again = Outcomes(bus, master, "master", grace_s=1.0)
    assert await again.record(agent, job, "expired", "retry") is True
    # A competing outcome loses, and records nothing terminal.
    assert await again.record(agent, job, "cancelled", "late") is False
    assert await _finished_envelopes(bus, job) == ["master"]
    assert (await terminal_events(bus))[job] == ["expired"]

    # The agent's result got there first: the master's abandon loses.
    other = new_id()
    subject = bus.subjects.job_event(agent, other, "finished")
    agent_signer = Signer(generate_seed())
    result = JobFinished(job_id=other, agent=agent, status="succeeded", exit_code=0)
    envelope = make_envelope(
        result, source=agent, subject=subject, event_id=agent_signer.stable_id(other, "finished")
    )
    await bus.publish_event(sign_envelope(envelope, agent_signer), expected_last_subject_seq=0)
    assert await first.record(agent, other, "abandoned", "gone") is False
    assert (await terminal_events(bus))[other] == ["succeeded"]
