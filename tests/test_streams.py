"""Provisioning against a real server: idempotent, conflicts reported, properties real."""

from __future__ import annotations

import asyncio

import nats.js.errors
import pytest
from nats.js import api

from bus import Bus, ProvisioningConflictError, StorageSettings, Subjects, provision
from bus.streams import desired_streams

ALL_NAMES = [
    "FLEET_EVENTS",
    "FLEET_OUTPUT",
    "KV_fleet-presence",
    "KV_fleet-config",
    "KV_fleet-tokens",
    "KV_fleet-locks",
    "OBJ_fleet-bundles",
    "OBJ_fleet-snapshots",
]


async def test_provisioning_twice_changes_nothing(bus: Bus) -> None:
    # The fixture provisioned once already.
    before = {n: (await bus.js.stream_info(n)).config.as_dict() for n in ALL_NAMES}
    again = await provision(bus.js)
    assert again.created == []
    assert sorted(again.unchanged) == sorted(ALL_NAMES)
    after = {n: (await bus.js.stream_info(n)).config.as_dict() for n in ALL_NAMES}
    assert after == before


async def test_first_run_creates_everything_of_the_design(bus: Bus) -> None:
    report = await provision(bus.js, Subjects("other"))
    assert sorted(report.created) == sorted(
        [
            "OTHER_EVENTS",
            "OTHER_OUTPUT",
            "KV_other-presence",
            "KV_other-config",
            "KV_other-tokens",
            "KV_other-locks",
            "OBJ_other-bundles",
            "OBJ_other-snapshots",
        ]
    )
    events = (await bus.js.stream_info("FLEET_EVENTS")).config
    assert events.subjects == ["fleet.evt.>"]
    assert events.storage == api.StorageType.FILE
    assert events.duplicate_window is not None
    assert events.duplicate_window >= 120
    assert events.max_age == pytest.approx(90 * 86400)
    # The handles daemons use open on what was provisioned.
    await bus.key_value("fleet-presence")
    await bus.object_store("fleet-bundles")


async def test_conflicting_existing_stream_is_reported_and_left_alone(bus: Bus) -> None:
    await bus.js.add_stream(
        api.StreamConfig(name="ALT_EVENTS", subjects=["alt.evt.>"], max_age=3600.0)
    )
    with pytest.raises(ProvisioningConflictError) as info:
        await provision(bus.js, Subjects("alt"))
    assert info.value.stream == "ALT_EVENTS"
    fields = {f for f, _, _ in info.value.differences}
    assert {"max_age", "deny_delete", "deny_purge"} <= fields
    assert "max_age is 3600000000000" in str(info.value)
    # Nothing was changed on the existing stream.
    assert (await bus.js.stream_info("ALT_EVENTS")).config.max_age == pytest.approx(3600)


async def test_event_log_denies_purge_and_delete(bus: Bus) -> None:
    await bus.js.publish("fleet.evt.agent.a1.online", b"x")
    with pytest.raises(nats.js.errors.APIError):
        await bus.js.purge_stream("FLEET_EVENTS")
    with pytest.raises(nats.js.errors.APIError):
        await bus.js.delete_msg("FLEET_EVENTS", 1)
    assert (await bus.js.stream_info("FLEET_EVENTS")).state.messages == 1


async def test_token_leases_expire_by_themselves_and_watchers_see_it(bus: Bus) -> None:
    kv = await bus.key_value("fleet-tokens")
    watcher = await kv.watchall(include_history=False)
    await kv.create("slot-0", b"agent-a", msg_ttl=1)
    # A second holder cannot take the same slot while the lease lives.
    with pytest.raises(nats.js.errors.KeyWrongLastSequenceError):
        await kv.create("slot-0", b"agent-b")
    marker = None
    async with asyncio.timeout(10):
        async for entry in watcher:
            if entry is not None and entry.operation is not None:
                marker = entry  # the server's expiry marker: the lease ran out
                break
    await watcher.stop()
    assert marker is not None
    assert marker.key == "slot-0"
    assert marker.operation == "PURGE"
    # nats-py's create() only recognises deletions by their KV-Operation header, not the
    # server's Nats-Marker-Reason markers, so retaking an expired slot updates the marker.
    assert await kv.update("slot-0", b"agent-b", last=marker.revision) > marker.revision


def test_desired_config_matches_the_design() -> None:
    specs = {s.name: s for s in desired_streams(Subjects(), StorageSettings(replicas=3))}
    assert set(specs) == set(ALL_NAMES)
    assert all(s.fields["num_replicas"] == 3 for s in specs.values())
    assert specs["FLEET_EVENTS"].fields["deny_purge"] is True
    assert specs["KV_fleet-presence"].fields["max_age"] == 15.0
