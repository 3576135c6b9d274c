"""Fixtures: real nats-server processes, connected buses, both event loops.

No test depends on a server it did not start: every server here lives in the test's own
temporary directory on a random loopback port and is stopped by pid afterwards.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import uvloop
from agents import AgentProcess, MasterProcess, stop_all
from deployment import Cast, Deployment
from natsserver import NatsCluster, NatsServer
from pamuser import Throwaway, throwaway_user

from bus import Bus, ConnectSettings, Signer, connect, generate_seed, provision, write_seed_file


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Every async test runs on the stock loop; ``both_loops`` tests on uvloop as well."""
    if item.get_closest_marker("both_loops"):
        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., NatsServer]]:
    """Start servers on demand (``server_factory(name="b")``); all stopped at the end."""
    started: list[NatsServer] = []

    def start(name: str = "test", config: str = "") -> NatsServer:
        server = NatsServer(tmp_path / f"nats-{name}-{len(started)}", name=name, config=config)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def nats_server(server_factory: Callable[..., NatsServer]) -> NatsServer:
    """One JetStream server of this test's own."""
    return server_factory()


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """A 3-node JetStream cluster on loopback, with a metadata leader elected."""
    cluster = NatsCluster(tmp_path / "cluster")
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture
def settings(nats_server: NatsServer) -> ConnectSettings:
    return ConnectSettings(servers=[nats_server.url], name="pytest")


@pytest.fixture
async def bus(settings: ConnectSettings) -> AsyncIterator[Bus]:
    """A connected bus on a provisioned server."""
    async with await connect(settings) as b:
        await provision(b.js)
        yield b


@pytest.fixture
def operator(tmp_path: Path) -> tuple[Path, Signer]:
    """An operator's key file (mode 0400) and its signer."""
    path = tmp_path / "operator.nk"
    write_seed_file(path, generate_seed())
    return path, Signer.from_file(path)


@pytest.fixture
def agent_factory(
    tmp_path: Path,
    nats_server: NatsServer,
    operator: tuple[Path, Signer],
    request: pytest.FixtureRequest,
) -> Iterator[Callable[..., AgentProcess]]:
    """Make agent processes (``agent_factory("web-1", max_jobs=2)``); all stopped after.

    Unless a test passes its own ``trust_file`` (or ``trusted`` keys), the agent trusts
    the ``operator`` key with everything: secure agents run nothing without a trust file.
    """
    made: list[AgentProcess] = []

    def make(agent_id: str, **config: Any) -> AgentProcess:
        config.setdefault("trusted", [operator[1].public_key])
        agent = AgentProcess(tmp_path, nats_server.url, agent_id, **config)
        made.append(agent)
        return agent

    yield make
    stop_all(made, request)


@pytest.fixture
def master_factory(
    tmp_path: Path, nats_server: NatsServer
) -> Iterator[Callable[..., MasterProcess]]:
    """Make ``fleet-master run`` processes on this test's server; all stopped after."""
    made: list[MasterProcess] = []

    def make(**config: object) -> MasterProcess:
        m = MasterProcess(tmp_path, nats_server.url, **config)
        made.append(m)
        return m

    yield make
    for m in made:
        try:
            m.stop()
        except Exception:
            m.kill()
            raise


@pytest.fixture(scope="session")
def cast(tmp_path_factory: pytest.TempPathFactory) -> Cast:
    """The principals of every deployment this session, with their keys (made once)."""
    return Cast(tmp_path_factory.mktemp("cast"))


@pytest.fixture(params=["open", "generated"])
async def deployment(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    server_factory: Callable[..., NatsServer],
    cast: Cast,
) -> AsyncIterator[Deployment]:
    """A whole deployment (tests/deployment.py), once on the open test server and once
    under the permissions ``fleet ops server-config`` generates. A test that makes sense
    under one only says so: ``@pytest.mark.parametrize("deployment", ["generated"],
    indirect=True)``."""
    async with Deployment(
        tmp_path, server_factory, cast, generated=request.param == "generated", request=request
    ) as d:
        yield d


@pytest.fixture
def pam_user() -> Iterator[Throwaway]:
    """A throwaway user with a password and its own PAM service, removed after."""
    with throwaway_user() as u:
        yield u


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    # Lets fixtures see whether the test failed, to print the agents' logs then.
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The fault scenarios' counts (tests/faults.py), shown even when they pass."""
    from faults import REPORT

    if REPORT:
        terminalreporter.section("fault scenario counts")
        for line in REPORT:
            terminalreporter.write_line(line)
