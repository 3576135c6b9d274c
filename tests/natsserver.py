"""Test servers: the embedded single node from ``bus.embedded``, plus a 3-node cluster.

No test depends on a server it did not start: each lives in the test's temporary
directory on loopback ports and is stopped by pid.
"""

from __future__ import annotations

import re
from pathlib import Path

from bus.embedded import NatsServer, free_port

__all__ = ["NatsCluster", "NatsServer", "free_port", "nkey_user_config", "tls_config"]

_LEADER_RE = re.compile(
    r"JetStream cluster new metadata leader|Self is new JetStream cluster metadata leader"
)


class NatsCluster:
    """Three JetStream servers routed to each other on loopback."""

    def __init__(self, base_dir: Path, size: int = 3, cluster_name: str = "fleet-test") -> None:
        self.cluster_name = cluster_name
        client_ports = [free_port() for _ in range(size)]
        route_ports = [free_port() for _ in range(size)]
        routes = ", ".join(f'"nats://127.0.0.1:{p}"' for p in route_ports)
        self.servers = [
            NatsServer(
                base_dir / f"n{i}",
                name=f"n{i}",
                port=client_ports[i],
                config=(
                    f'cluster {{ name: "{cluster_name}", '
                    f'listen: "127.0.0.1:{route_ports[i]}", routes: [{routes}] }}'
                ),
            )
            for i in range(size)
        ]

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def start(self, timeout: float = 30.0) -> NatsCluster:
        for server in self.servers:
            server.start(timeout)
        # Ready is not enough for JetStream in a cluster: wait for a metadata leader.
        for server in self.servers:
            if not server.wait_for_log(_LEADER_RE.pattern, timeout):
                raise RuntimeError(
                    f"no JetStream metadata leader seen by {server.name}:\n"
                    + "\n".join(server.log[-30:])
                )
        return self

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


def nkey_user_config(public_key: str, permissions: str = "") -> str:
    """Server config letting one nkey in, with optional ``permissions { … }`` text."""
    extra = f", permissions: {permissions}" if permissions else ""
    return f'authorization {{ users: [ {{ nkey: "{public_key}"{extra} }} ] }}'


def tls_config(cert: Path, key: Path, ca: Path) -> str:
    """Server config for TLS on the client port."""
    return f'tls {{ cert_file: "{cert}", key_file: "{key}", ca_file: "{ca}" }}'
