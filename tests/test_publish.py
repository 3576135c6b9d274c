"""Publishing events: dedup ids, retries across an outage, refusals."""

from __future__ import annotations

import asyncio
import logging

import pytest
from busutil import LogEvent, stream_envelopes
from natsserver import NatsServer
from samples import AGENT, JOB, sample_data, sample_envelope

from bus import (
    BadMessageError,
    Bus,
    PayloadTooLargeError,
    PublishTimeoutError,
    Signer,
    SubjectTakenError,
    generate_seed,
    publish_event,
    sign_envelope,
    verify_envelope,
)
from schemas import JobFinished, make_envelope, stable_id
from schemas.ids import id_time_ns

pytestmark = pytest.mark.both_loops


async def test_event_is_stored_once_and_verifies(bus: Bus) -> None:
    signer = Signer(generate_seed())
    env = sign_envelope(sample_envelope(sample_data()[0]), signer)
    first = await bus.publish_event(env)
    again = await bus.publish_event(env)  # same id: the stream recognises it
    assert first.stream == "FLEET_EVENTS"
    assert not first.duplicate
    assert again.duplicate
    assert again.seq == first.seq
    stored = await stream_envelopes(bus.js, "FLEET_EVENTS")
    assert stored == [env]
    verify_envelope(stored[0], {signer.public_key}, subject=env.subject)
    msg = await bus.js.get_msg("FLEET_EVENTS", first.seq)
    assert msg.headers is not None
    assert msg.headers["Nats-Msg-Id"] == env.id
    assert msg.headers["Fleet-Type"] == "job.submitted"


async def test_publish_retries_with_the_same_id_across_an_outage(
    nats_server: NatsServer, bus: Bus
) -> None:
    env = sample_envelope(sample_data()[1])
    retrying = LogEvent("↻ publish")
    logging.getLogger("bus.publish").addHandler(retrying)
    try:
        await asyncio.to_thread(nats_server.stop)
        task = asyncio.create_task(
            publish_event(bus.js, env, stream="FLEET_EVENTS", timeout=0.5, deadline_s=25)
        )
        async with asyncio.timeout(20):
            await retrying.seen.wait()  # at least one attempt went unacknowledged
        await asyncio.to_thread(nats_server.start)
        result = await asyncio.wait_for(task, 30)
    finally:
        logging.getLogger("bus.publish").removeHandler(retrying)
    assert result.seq >= 1
    # However many attempts reached the server, the event is stored exactly once.
    stored = await stream_envelopes(bus.js, "FLEET_EVENTS")
    assert [e.id for e in stored] == [env.id]


async def test_gives_up_with_a_timeout_error_naming_the_message(
    nats_server: NatsServer, bus: Bus
) -> None:
    env = sample_envelope(sample_data()[2])
    await asyncio.to_thread(nats_server.stop)
    with pytest.raises(PublishTimeoutError) as info:
        await publish_event(bus.js, env, timeout=0.2, attempts=2)
    assert info.value.msg_id == env.id
    assert info.value.attempts == 2
    with pytest.raises(PublishTimeoutError):
        await publish_event(bus.js, env, timeout=0.2, deadline_s=1.0)
    assert info.value.exit_code == 3


async def test_oversized_event_is_refused_before_sending(bus: Bus) -> None:
    env = sample_envelope(sample_data()[3])
    big = env.model_copy(update={"data": {**env.data, "output_tail": "x" * 2_000_000}})
    with pytest.raises(PayloadTooLargeError):
        await bus.publish_event(big)
    assert (await bus.js.stream_info("FLEET_EVENTS")).state.messages == 0


async def test_event_on_a_subject_outside_the_log_is_refused(bus: Bus) -> None:
    env = sample_envelope(sample_data()[3]).model_copy(update={"subject": "fleet.out.a.b"})
    with pytest.raises(BadMessageError, match="refused"):
        await bus.publish_event(env)


async def test_first_outcome_wins_and_our_own_retry_is_a_duplicate(bus: Bus) -> None:
    """Two competing terminal events: the server keeps the first; a retry is not a loser."""
    agent_result = make_envelope(
        JobFinished(job_id=JOB, agent=AGENT, status="succeeded", exit_code=0),
        source=AGENT,
        subject=bus.subjects.job_event(AGENT, JOB, "finished"),
        event_id=Signer(generate_seed()).stable_id(JOB, "finished", AGENT),
    )
    abandoned = make_envelope(
        JobFinished(job_id=JOB, agent=AGENT, status="abandoned"),
        source="master",
        subject=agent_result.subject,
        event_id=Signer(generate_seed()).stable_id(JOB, "finished", "master"),
    )
    first = await bus.publish_event(agent_result, expected_last_subject_seq=0)
    again = await bus.publish_event(agent_result, expected_last_subject_seq=0)
    assert not first.duplicate
    assert again.duplicate
    assert again.seq == first.seq
    with pytest.raises(SubjectTakenError) as lost:
        await bus.publish_event(abandoned, expected_last_subject_seq=0)
    assert lost.value.seq == first.seq
    stored = await stream_envelopes(bus.js, "FLEET_EVENTS")
    assert [e.id for e in stored] == [agent_result.id]


def test_stable_ids_repeat_for_the_same_event_and_key_and_differ_otherwise() -> None:
    seed = generate_seed()
    signer, again, other = Signer(seed), Signer(seed), Signer(generate_seed())
    assert signer.stable_id(JOB, "finished") == again.stable_id(JOB, "finished")
    assert signer.stable_id(JOB, "finished") != signer.stable_id(JOB, "started")
    # Another key (a submitter who knows the job id) cannot work it out.
    assert signer.stable_id(JOB, "finished") != other.stable_id(JOB, "finished")
    assert id_time_ns(signer.stable_id(JOB, "finished")) == id_time_ns(JOB)
    with pytest.raises(ValueError, match="not a fleetbus id"):
        signer.stable_id("job-1", "finished")
    with pytest.raises(ValueError, match="secret"):
        stable_id(JOB, "finished", secret=b"")
