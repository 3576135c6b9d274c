"""Every server config fleetbus ships fsyncs before acknowledging (``sync_interval: always``)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from agents import FLEET
from natsserver import NatsServer

OPS = Path(__file__).resolve().parent.parent / "ops" / "nats"


def test_shipped_configs_sync_always() -> None:
    configs = sorted(OPS.glob("*.conf"))
    assert configs
    stores = 0
    for conf in configs:
        lines = [line.split("#", 1)[0].strip() for line in conf.read_text().splitlines()]
        if "jetstream: disabled" in lines:
            continue  # a leaf site's server stores nothing: the hub's JetStream does
        stores += 1
        assert "sync_interval: always" in lines, conf
    assert stores >= 3  # single, cluster node, the hub's block


def test_embedded_server_syncs_always(nats_server: NatsServer) -> None:
    conf = (nats_server.store_dir / f"{nats_server.name}.conf").read_text()
    assert "sync_interval: always" in conf


def test_server_config_renders_a_durable_jetstream_block(tmp_path: Path) -> None:
    registry = tmp_path / "registry.toml"
    registry.write_text(
        '[master]\npublic_key = "UAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"\n'
    )
    plain = subprocess.run(
        [FLEET, "ops", "server-config", "--registry", str(registry)],
        capture_output=True,
        text=True,
        check=False,
    )
    with_store = subprocess.run(
        [FLEET, "ops", "server-config", "--registry", str(registry), "--store-dir", "/srv/js"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert plain.returncode == 0, plain.stderr
    assert "sync_interval: always" in plain.stdout  # as a reminder: it is included elsewhere
    assert with_store.returncode == 0, with_store.stderr
    assert 'store_dir: "/srv/js"\n  sync_interval: always' in with_store.stdout
