"""Metrics, health and JSON logs of real master and agent processes on a real nats-server.

What an operator's ``curl`` of ``/metrics`` shows after a few jobs, checked value by value.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from agents import AgentProcess, MasterProcess, finished, job_request, submit
from natsserver import NatsServer
from observe import aget, listening_port, scrape_until, until_status

from bus import Bus, FleetError, Signer, public_key_of, read_seed_file
from bus.log import last_seq
from bus.metrics import sample
from bus.request import control

pytestmark = [pytest.mark.timeout(120)]


def agent_key(agent: AgentProcess) -> str:
    return public_key_of(read_seed_file(agent.data_dir / "agent.nk"))


async def deny_a_login(bus: Bus) -> None:
    """A headless login with a made-up nonce and proof: the master records auth.denied."""
    bogus = {
        "user": "nobody",
        "client_nonce": "c" * 16,
        "server_nonce": "s" * 24,
        "proof": b"\0" * 32,
        "agent": "web-1",
        "request": job_request(["true"]).model_dump(),
    }
    with pytest.raises(FleetError, match="authentication failed"):
        await control(bus, bus.subjects.master_control("auth-submit"), bogus)


async def test_metrics_and_health_after_a_few_jobs(
    nats_server: NatsServer,
    bus: Bus,
    agent_factory: Callable[..., AgentProcess],
    master_factory: Callable[..., MasterProcess],
    operator: tuple[Path, Signer],
) -> None:
    _, signer = operator
    web1 = await agent_factory("web-1", metrics_listen="127.0.0.1:0", max_jobs=3).started(bus)
    master = master_factory(
        metrics_listen="127.0.0.1:0",
        agents={
            "web-1": {"public_key": agent_key(web1)},
            "db-9": {"public_key": signer.public_key},  # configured, never online
        },
        operators={"tester": {"public_key": signer.public_key}},
    ).start()
    port = await listening_port(master.log, "metrics and health")
    base = f"http://127.0.0.1:{port}"
    status, _, body = await aget(base + "/healthz")
    assert (status, body) == (200, b"ok\n")
    await master.wait_ready(bus)

    jobs = [
        await submit(bus, signer, "web-1", job_request(["true"])),
        await submit(bus, signer, "web-1", job_request(["sh", "-c", "sleep 0.3"])),
        await submit(bus, signer, "web-1", job_request(["false"])),
    ]
    outcomes = [await finished(bus, "web-1", job) for job in jobs]
    assert [o.status for o in outcomes] == ["succeeded", "succeeded", "failed"]
    await deny_a_login(bus)
    stored = await last_seq(bus, bus.subjects.events_stream)

    def caught_up(s: dict[str, dict[tuple[tuple[str, str], ...], float]]) -> bool:
        return sample(s, "fleet_master_folded_seq") >= stored

    s = await scrape_until(base + "/metrics", caught_up)
    assert sample(s, "fleet_jobs_submitted_total", agent="web-1") == 3
    assert sample(s, "fleet_jobs_finished_total", agent="web-1", status="succeeded") == 2
    assert sample(s, "fleet_jobs_finished_total", agent="web-1", status="failed") == 1
    assert sample(s, "fleet_job_duration_seconds_count") == 3
    assert sample(s, "fleet_job_duration_seconds_bucket", le="+Inf") == 3
    assert sample(s, "fleet_job_duration_seconds_sum") >= 0.3
    assert sample(s, "fleet_job_duration_seconds_bucket", le="0.1") <= 2  # the sleep is not in it
    assert sample(s, "fleet_jobs_running") == 0
    assert sample(s, "fleet_agents_configured") == 2
    assert sample(s, "fleet_agents_online") == 1
    assert sample(s, "fleet_agents_unsupported") == 0
    assert sample(s, "fleet_auth_denials_total") == 1
    assert sample(s, "fleet_master_ready") == 1
    assert sample(s, "fleet_master_events_folded_total") >= stored
    events = bus.subjects.events_stream
    assert sample(s, "fleet_stream_messages", stream=events) >= stored
    assert sample(s, "fleet_events_stream_last_seq") >= stored
    assert sample(s, "fleet_master_fold_lag_events") == (
        sample(s, "fleet_events_stream_last_seq") - sample(s, "fleet_master_folded_seq")
    )
    assert 0 <= sample(s, "fleet_master_snapshot_age_seconds") < 600
    assert 0 <= sample(s, "fleet_master_checkpoint_age_seconds") < 600
    assert 0 <= sample(s, "fleet_master_events_since_checkpoint") <= stored
    assert sample(s, "fleet_bus_connected") == 1
    assert sample(s, "fleet_scrape_collector_success", collector="master") == 1
    assert (await aget(base + "/readyz"))[:3:2] == (200, b"ready\n")
    assert (await aget(base + "/nope"))[0] == 404

    # The agent's own listener.
    agent_port = await listening_port(web1.log, "metrics and health")
    a = await scrape_until(f"http://127.0.0.1:{agent_port}/metrics", lambda _: True)
    assert sample(a, "fleet_agent_job_slots", agent="web-1") == 3
    assert sample(a, "fleet_agent_jobs_running", agent="web-1") == 0
    assert sample(a, "fleet_agent_jobs_started_total", agent="web-1") == 3
    assert sample(a, "fleet_agent_jobs_finished_total", agent="web-1", status="failed") == 1
    assert sample(a, "fleet_agent_journal_bytes", agent="web-1") > 0
    # Where each job's time went, step by step: every started job passed every step once.
    steps = "fleet_agent_job_step_seconds"
    for step in ("journal", "spawn", "run", "started", "finished"):
        assert sample(a, f"{steps}_count", agent="web-1", step=step) == 3, step
        assert sample(a, f"{steps}_sum", agent="web-1", step=step) > 0, step
    assert sample(a, f"{steps}_count", agent="web-1", step="before_start") >= 3
    assert sample(a, "fleet_agent_publish_retries_total", agent="web-1") == 0
    assert sample(a, "fleet_bus_reconnects_total", agent="web-1") == 0
    assert (await aget(f"http://127.0.0.1:{agent_port}/readyz"))[0] == 200

    # Without NATS both stay alive and say they are not ready.
    nats_server.stop()
    for url in (base, f"http://127.0.0.1:{agent_port}"):
        assert b"not connected" in await until_status(url + "/readyz", 503)
        assert (await aget(url + "/healthz"))[0] == 200
    nats_server.start()


async def test_json_logs_one_object_per_line_with_ids(
    bus: Bus,
    agent_factory: Callable[..., AgentProcess],
    master_factory: Callable[..., MasterProcess],
    operator: tuple[Path, Signer],
) -> None:
    _, signer = operator
    web1 = await agent_factory("web-1", log_format="json").started(bus)
    master = master_factory(log_format="json").start()
    await master.wait_ready(bus)
    job = await submit(bus, signer, "web-1", job_request(["echo", "hi"]))
    await finished(bus, "web-1", job)
    web1.stop()
    master.stop()
    for log in (web1.log(), master.log()):
        lines = [line for line in log.splitlines() if line.strip()]
        assert lines
        docs = [json.loads(line) for line in lines]  # every line is one object
        for doc in docs:
            assert {"time", "level", "logger", "message"} <= set(doc)
    agent_docs = [json.loads(line) for line in web1.log().splitlines() if line.strip()]
    assert any(d.get("job") == job and d.get("agent") == "web-1" for d in agent_docs)
    assert all(d.get("agent") == "web-1" for d in agent_docs if d["logger"].startswith("agentd"))
