"""Retention and limits against a real server: `fleet ops init` with custom limits, a
re-init that migrates, `fleet ops status` usage and warnings, and a full event log that
refuses (never drops) events."""

from __future__ import annotations

import asyncio
import json
import subprocess

import pytest
from agents import FLEET
from nats.js import api
from natsserver import NatsServer

from bus import Bus, ConnectSettings, StorageSettings, StoreFullError, connect, provision
from bus.publish import publish_with_retry
from fleet.quantities import parse_duration, parse_size
from schemas import new_id

pytestmark = pytest.mark.timeout(120)

DAY = 86_400


async def ops(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The real ``fleet ops`` CLI, without blocking the event loop."""
    proc = await asyncio.create_subprocess_exec(
        FLEET, "ops", *args, "-s", url, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return subprocess.CompletedProcess(args, proc.returncode, out.decode(), err.decode())


async def fill(bus: Bus, count: int, size: int = 1000) -> None:
    for _ in range(count):
        await publish_with_retry(
            bus.js,
            "fleet.evt.agent.a1.online",
            b"x" * size,
            msg_id=new_id(),
            stream="FLEET_EVENTS",
        )


def test_durations_and_sizes_parse_as_operators_type_them() -> None:
    assert parse_duration("90d") == 90 * DAY
    assert parse_duration("12h") == 12 * 3600
    assert parse_duration("0") == 0
    assert parse_size("10GiB") == 10 * 1024**3
    assert parse_size("500MB") == 500 * 1000**2
    assert parse_size("0") == 0
    for bad in ("ten days", "5y", "-1d"):
        with pytest.raises(ValueError, match="duration"):
            parse_duration(bad)
    with pytest.raises(ValueError, match="size"):
        parse_size("10 parsecs")


async def test_init_with_custom_limits_sets_them_on_the_server(nats_server: NatsServer) -> None:
    result = await ops(
        nats_server.url,
        "init",
        "--events-max-age",
        "30d",
        "--events-max-bytes",
        "1GiB",
        "--output-max-age",
        "2d",
        "--output-max-bytes",
        "100MiB",
        "--max-consumers",
        "12000",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    assert "FLEET_EVENTS" in json.loads(result.stdout)["created"]
    async with await connect(ConnectSettings(servers=[nats_server.url])) as bus:
        events = (await bus.js.stream_info("FLEET_EVENTS")).config
        output = (await bus.js.stream_info("FLEET_OUTPUT")).config
        presence = (await bus.js.stream_info("KV_fleet-presence")).config
    assert events.max_age == pytest.approx(30 * DAY)
    assert events.max_bytes == 1024**3
    assert events.discard == "new"
    assert events.max_consumers == 12000
    assert output.max_age == pytest.approx(2 * DAY)
    assert output.max_bytes == 100 * 1024**2
    assert output.max_consumers == 12000
    assert presence.max_consumers == 12000


async def test_reinit_reports_a_difference_then_migrates_it(nats_server: NatsServer) -> None:
    url = nats_server.url
    assert (await ops(url, "init", "--events-max-age", "30d")).returncode == 0
    # Different settings without --migrate: reported, nothing changed, exit 2.
    refused = await ops(url, "init", "--events-max-age", "60d", "--max-consumers", "15000")
    assert refused.returncode == 2
    assert "max_age" in refused.stderr
    assert "--migrate" in refused.stderr
    async with await connect(ConnectSettings(servers=[url])) as bus:
        assert (await bus.js.stream_info("FLEET_EVENTS")).config.max_age == pytest.approx(30 * DAY)
        await fill(bus, 3)
    migrated = await ops(
        url, "init", "--events-max-age", "60d", "--max-consumers", "15000", "--migrate", "--json"
    )
    assert migrated.returncode == 0, migrated.stderr
    changes = {(c["stream"], c["field"]) for c in json.loads(migrated.stdout)["changed"]}
    assert ("FLEET_EVENTS", "max_age") in changes
    assert ("FLEET_EVENTS", "max_consumers") in changes
    assert ("KV_fleet-config", "max_consumers") in changes
    async with await connect(ConnectSettings(servers=[url])) as bus:
        info = await bus.js.stream_info("FLEET_EVENTS")
    assert info.config.max_age == pytest.approx(60 * DAY)
    assert info.config.max_consumers == 15000
    assert info.state.messages == 3  # the events are all still there
    again = await ops(url, "init", "--events-max-age", "60d", "--max-consumers", "15000")
    assert again.returncode == 0
    assert "nothing to do" in again.stderr


async def test_migration_from_the_old_design_and_what_the_server_refuses(
    nats_server: NatsServer,
) -> None:
    """A deployment made before explicit limits (discard old, consumer limit -1) is
    migrated; replicas on a single server and a size below the log's are refused."""
    async with await connect(ConnectSettings(servers=[nats_server.url])) as bus:
        await provision(bus.js)
        old = (await bus.js.stream_info("FLEET_EVENTS")).config
        old.discard = api.DiscardPolicy.OLD
        old.max_consumers = -1
        await bus.js.update_stream(old)
        await fill(bus, 5)
        held = (await bus.js.stream_info("FLEET_EVENTS")).state.bytes
    result = await ops(
        nats_server.url,
        "init",
        "--migrate",
        "--replicas",
        "3",
        "--events-max-bytes",
        str(held // 2),
        "--json",
    )
    assert result.returncode == 2
    report = json.loads(result.stdout)
    refused = {(c["stream"], c["field"]): c["reason"] for c in report["refused"]}
    assert "replicas" in refused[("FLEET_EVENTS", "num_replicas")].lower()
    assert "would delete events" in refused[("FLEET_EVENTS", "max_bytes")]
    changed = {(c["stream"], c["field"]) for c in report["changed"]}
    assert {("FLEET_EVENTS", "discard"), ("FLEET_EVENTS", "max_consumers")} <= changed
    assert "cannot change FLEET_EVENTS num_replicas" in result.stderr
    async with await connect(ConnectSettings(servers=[nats_server.url])) as bus:
        info = await bus.js.stream_info("FLEET_EVENTS")
    assert info.state.messages == 5
    assert info.config.max_bytes == -1
    assert info.config.discard == "new"
    assert info.config.max_consumers == StorageSettings().max_consumers
    assert info.config.num_replicas == 1


async def test_status_shows_usage_and_warns_near_a_limit(nats_server: NatsServer) -> None:
    url = nats_server.url
    async with await connect(ConnectSettings(servers=[url])) as bus:
        await provision(bus.js, settings=StorageSettings(events_max_bytes=20_000))
        await fill(bus, 5)
        calm = await ops(url, "status", "--json")
        assert calm.returncode == 0, calm.stderr
        doc = json.loads(calm.stdout)
        events = next(s for s in doc["streams"] if s["stream"] == "FLEET_EVENTS")
        assert events["messages"] == 5
        assert events["limits"]["bytes"]["limit"] == 20_000
        assert 0 < events["limits"]["bytes"]["fraction"] < 0.8
        assert events["limits"]["consumers"]["limit"] == StorageSettings().max_consumers
        assert events["discard"] == "new"
        assert events["oldest_age_s"] is not None
        assert doc["warnings"] == []
        await fill(bus, 12)
    near = await ops(url, "status")
    assert near.returncode == 0
    assert "FLEET_EVENTS" in near.stdout
    assert "warning: FLEET_EVENTS: bytes at" in near.stderr
    assert "new events are refused" in near.stderr


async def test_status_warns_about_a_stream_without_an_explicit_consumer_limit(
    nats_server: NatsServer,
) -> None:
    async with await connect(ConnectSettings(servers=[nats_server.url])) as bus:
        await provision(bus.js)
        config = (await bus.js.stream_info("FLEET_OUTPUT")).config
        config.max_consumers = -1
        await bus.js.update_stream(config)
    result = await ops(nats_server.url, "status", "--json")
    warnings = json.loads(result.stdout)["warnings"]
    assert any("FLEET_OUTPUT: no explicit consumer limit" in w for w in warnings)


async def test_a_full_event_log_refuses_new_events_and_drops_none(bus: Bus) -> None:
    await provision(bus.js, bus.subjects, StorageSettings(events_max_bytes=10_000), migrate=True)
    stored = 0
    refusal: StoreFullError | None = None
    for _ in range(50):
        try:
            await fill(bus, 1)
        except StoreFullError as exc:
            refusal = exc
            break
        stored += 1
    assert refusal is not None
    assert refusal.certain  # refused outright: not stored
    assert "maximum bytes" in str(refusal)
    state = (await bus.js.stream_info("FLEET_EVENTS")).state
    assert state.messages == stored
    assert state.first_seq == 1  # nothing old was removed to make room


@pytest.mark.parametrize(
    ("replicas", "current", "lost"),
    [(3, 3, False), (3, 2, False), (3, 1, True), (3, 0, True), (1, 1, False), (1, None, False)],
)
def test_status_says_when_a_stream_has_lost_its_quorum(
    replicas: int, current: int | None, lost: bool
) -> None:
    from bus.streaminfo import StreamUsage
    from fleet.ops_status import assess

    usage = StreamUsage(
        "FLEET_EVENTS",
        10,
        1000,
        1,
        10,
        0,
        0,
        0.0,
        max_consumers=20_000,
        replicas=replicas,
        current_replicas=current,
    )
    status = assess(usage, record=True, warn_at=0.8)
    assert status.as_dict()["quorum"] is not lost
    assert any("quorum lost" in w for w in status.warnings) is lost
