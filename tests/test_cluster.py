"""A 3-node JetStream cluster: replicated provisioning, publishing through a node's loss."""

from __future__ import annotations

import asyncio

import pytest
from busutil import stream_envelopes
from natsserver import NatsCluster
from samples import sample_data, sample_envelope

from bus import ConnectSettings, StorageSettings, connect, provision

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


async def test_replicated_log_survives_losing_its_leader(nats_cluster: NatsCluster) -> None:
    settings = ConnectSettings(servers=nats_cluster.urls, request_timeout_s=10)
    async with await connect(settings) as bus:
        report = await provision(bus.js, settings=StorageSettings(replicas=3))
        assert "FLEET_EVENTS" in report.created
        info = await bus.js.stream_info("FLEET_EVENTS")
        assert info.config.num_replicas == 3
        assert info.cluster is not None
        assert info.cluster.leader is not None

        first = sample_envelope(sample_data()[0])
        await bus.publish_event(first)

        leader = next(s for s in nats_cluster.servers if s.name == info.cluster.leader)
        await asyncio.to_thread(leader.kill)

        # The remaining two elect a new leader; the publish helper retries meanwhile.
        second = sample_envelope(sample_data()[3])
        result = await bus.publish_event(second, timeout=2.0)
        assert not result.duplicate
        new_info = await bus.js.stream_info("FLEET_EVENTS")
        assert new_info.cluster is not None
        assert new_info.cluster.leader != leader.name
        assert [e.id for e in await stream_envelopes(bus.js, "FLEET_EVENTS")] == [
            first.id,
            second.id,
        ]

        # Provisioning the cluster again is still a no-op.
        again = await provision(bus.js, settings=StorageSettings(replicas=3))
        assert again.created == []
