"""A fleet deployed the way ops/README.md says, for attacks that must hold under it.

One cast of principals, each with its own nkey seed (written as ``fleet keys gen`` writes
them): the master, agents ``web-1`` and ``web-2``, operators ``tester``, ``watcher`` and
``stranger``, headless users ``batch``, ``mallory`` and ``eve`` (attackers get the least
role there is), and the NATS ``admin``. A :class:`Deployment` either

- renders the server's permissions from that registry with ``fleet ops server-config``,
  starts nats-server with them and provisions it as the admin, as ``fleet ops init``
  does (``generated``): every principal then connects as itself, through its own inbox,
  and the server refuses it everything its role does not need; or
- starts the open test server (anyone may do anything) and provisions it the same way,
  so that the defences behind the permissions (the agent's trust file, the master's
  policy, ``fleet audit --verify``) are tested on their own too.

The keys and the rendered config (a :class:`Cast`) are made once per session: each test
still has its own server, agents and master. Agents and the master are real processes
with the cast's keys; the deployment stops them.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
from agents import FLEET, AgentProcess, MasterProcess, stop_all
from natsserver import NatsServer

from bus import (
    Bus,
    ConnectSettings,
    PermissionDeniedError,
    Signer,
    StorageSettings,
    connect,
    generate_seed,
    write_seed_file,
)
from bus.streams import provision_fleet

ROLES = {
    "master": "master",
    "web-1": "agent",
    "web-2": "agent",
    "tester": "operator",
    "watcher": "operator",
    "stranger": "operator",
    "batch": "headless",
    "mallory": "headless",
    "eve": "headless",
    "admin": "admin",
}
"""Every principal of a deployment and its role in the registry."""

_SECTIONS = {"agent": "agents", "operator": "operators", "headless": "headless", "admin": "admins"}


@dataclass(frozen=True)
class Principal:
    """One member of the cast: its name, role, seed file and signer."""

    name: str
    role: str
    key_file: Path
    signer: Signer

    @property
    def public_key(self) -> str:
        return self.signer.public_key


async def run_cli(
    *argv: str, env: dict[str, str] | None = None, stdin: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run a command line (``fleet …``, ``fleet-headless …``) to its end; text out."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin and stdin.encode()), timeout)
    except TimeoutError:
        proc.kill()  # never leave a command running behind a failed test
        await proc.wait()
        raise
    assert proc.returncode is not None
    return subprocess.CompletedProcess(argv, proc.returncode, out.decode(), err.decode())


async def refused(bus: Bus, *subjects: str) -> None:
    """Each subject is refused to this principal by the server itself."""
    for subject in subjects:
        await bus.nc.publish(subject, b"{}")
        denial = await bus.wait_denied(subject, timeout=5)
        assert isinstance(denial, PermissionDeniedError)
        assert "publishing to" in str(denial), subject


class Cast:
    """Every principal of :data:`ROLES` with a key, their registry, and the server
    configs ``fleet ops server-config`` renders from it (per ``max_payload``)."""

    def __init__(self, base: Path) -> None:
        self.principals: dict[str, Principal] = {}
        base.mkdir(parents=True, exist_ok=True)
        for name, role in ROLES.items():
            seed, path = generate_seed(), base / f"{role}-{name}.nk"
            write_seed_file(path, seed, owner=(role, name))
            self.principals[name] = Principal(name, role, path, Signer(seed))
        self.registry = base / "registry.toml"
        lines = [f'[master]\npublic_key = "{self.principals["master"].public_key}"']
        for p in self.principals.values():
            if p.role != "master":
                lines.append(f'[{_SECTIONS[p.role]}.{p.name}]\npublic_key = "{p.public_key}"')
        self.registry.write_text("\n".join(lines) + "\n")
        self._configs: dict[int | None, str] = {}

    async def server_config(self, max_payload: int | None = None) -> str:
        """What ``fleet ops server-config --registry … [--max-payload N]`` renders."""
        if max_payload not in self._configs:
            args = ["--registry", str(self.registry)]
            if max_payload is not None:
                args += ["--max-payload", str(max_payload)]
            rendered = await run_cli(FLEET, "ops", "server-config", *args)
            assert rendered.returncode == 0, rendered.stderr
            self._configs[max_payload] = rendered.stdout
        return self._configs[max_payload]


class Deployment:
    """A server, the cast's principals, and the agents and master started on it.

    Use as ``async with Deployment(...) as d:`` (or the ``deployment`` fixture); leaving
    the block stops every agent and master it made and closes its connections.
    ``ops_init_cli``: provision with ``fleet ops init`` itself rather than in-process.
    """

    def __init__(
        self,
        base: Path,
        server_factory: Callable[..., NatsServer],
        cast: Cast,
        *,
        generated: bool,
        max_payload: int | None = None,
        ops_init_cli: bool = False,
        request: pytest.FixtureRequest | None = None,
    ) -> None:
        self.base = base
        self.cast = cast
        self.generated = generated
        self.mode = "generated" if generated else "open"
        self.max_payload = max_payload
        self.ops_init_cli = ops_init_cli
        self._server_factory = server_factory
        self._request = request
        self.principals = cast.principals
        self.server: NatsServer | None = None
        self.agents: list[AgentProcess] = []
        self.masters: list[MasterProcess] = []
        self._buses: list[Bus] = []
        self._as: dict[str, Bus] = {}

    def __getitem__(self, name: str) -> Principal:
        return self.principals[name]

    @property
    def url(self) -> str:
        assert self.server is not None, "start the deployment first"
        return self.server.url

    async def start(self) -> Deployment:
        """Start the server (with the generated permissions, or open) and provision it."""
        config = await self.cast.server_config(self.max_payload) if self.generated else ""
        self.server = self._server_factory(config=config)
        if self.ops_init_cli:
            init = await run_cli(FLEET, "ops", "init", env=self.env("admin"))
            assert init.returncode == 0, init.stderr
        self.bus = await self.connect("admin")  # reads everything, to watch what happens
        if not self.ops_init_cli:
            await provision_fleet(self.bus, StorageSettings())
        return self

    def settings(self, name: str) -> ConnectSettings:
        """How ``name`` connects: with its key and inbox under the generated permissions;
        as anyone on the open server."""
        if not self.generated:
            return ConnectSettings(servers=[self.url], name=name)
        return ConnectSettings(
            servers=[self.url],
            name=name,
            nkey_file=self[name].key_file,
            inbox_prefix=f"_INBOX_{name}",
        )

    async def connect(self, name: str) -> Bus:
        """A connection as ``name``, closed with the deployment."""
        bus = await connect(self.settings(name))
        self._buses.append(bus)
        return bus

    async def as_(self, name: str) -> Bus:
        """``name``'s one shared connection (made on first use)."""
        if name not in self._as:
            self._as[name] = await self.connect(name)
        return self._as[name]

    def env(self, name: str) -> dict[str, str]:
        """The environment for ``fleet`` commands run as ``name``."""
        return {
            **os.environ,
            "FLEET_SERVER": self.url,
            "FLEET_NKEY": str(self[name].key_file),
            "FLEET_USER": name,
        }

    def agent(self, agent_id: str, **config: Any) -> AgentProcess:
        """An agent with the cast's key for ``agent_id``. Unless ``config`` names a
        ``trust_file`` or ``trusted`` keys, it trusts the operator ``tester`` with
        everything (secure agents run nothing without a trust file)."""
        config.setdefault("trusted", [self["tester"].public_key])
        made = AgentProcess(
            self.base, self.url, agent_id, nkey_file=str(self[agent_id].key_file), **config
        )
        self.agents.append(made)
        return made

    def master(self, **config: Any) -> MasterProcess:
        """The master with its key and the registry of every agent, operator and headless
        user (``config`` overrides any of it)."""

        def section(role: str) -> dict[str, dict[str, str]]:
            return {
                p.name: {"public_key": p.public_key}
                for p in self.principals.values()
                if p.role == role
            }

        settings: dict[str, Any] = {
            "nkey_file": str(self["master"].key_file),
            "agents": section("agent"),
            "operators": section("operator"),
            "headless": section("headless"),
            **config,
        }
        made = MasterProcess(self.base, self.url, **settings)
        self.masters.append(made)
        return made

    async def stop(self) -> None:
        """Stop every master and agent this deployment made; close its connections."""
        try:
            for master in self.masters:
                try:
                    master.stop()
                except Exception:
                    master.kill()
            stop_all(self.agents, self._request)  # prints their logs if the test failed
        finally:
            for bus in self._buses:
                await bus.close()

    async def __aenter__(self) -> Deployment:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
