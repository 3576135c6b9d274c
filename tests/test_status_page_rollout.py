"""A real rollout watched on the status page: two launcher-run agents update from a
signed bundle, the canary first, and the page's progress moves live (no reload)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from agents import MasterProcess, fleet_env, stop_all
from natsserver import NatsServer
from observe import listening_port
from updates import LaunchedAgent, Release, fleet, make_release, wait_update_event
from webdriver import Browser, find_browser

from bus import Bus, Signer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

A, B = "1.0.0", "1.1.0"


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Release:
    rel = make_release(tmp_path_factory.mktemp("release"))
    rel.bundle(A)
    rel.bundle(B)
    return rel


@pytest.fixture
def launched(
    tmp_path: Path, nats_server: NatsServer, release: Release, request: pytest.FixtureRequest
) -> Iterator[Callable[..., LaunchedAgent]]:
    made: list[LaunchedAgent] = []

    def make(agent_id: str, **config: Any) -> LaunchedAgent:
        settings = {"release_keys": [release.public_key], "shutdown_grace_s": 2.0, **config}
        agent = LaunchedAgent(tmp_path, nats_server.url, agent_id, **settings)
        agent.install(release.bundles[A], release.public_key)
        made.append(agent)
        return agent

    yield make
    stop_all(made, request)


async def test_rollout_progress_moves_live(
    tmp_path: Path,
    nats_server: NatsServer,
    bus: Bus,
    launched: Callable[..., LaunchedAgent],
    release: Release,
    operator: tuple[Path, Signer],
) -> None:
    find_browser()
    agents = [launched(f"r{i}") for i in range(2)]
    for agent in agents:
        agent.start()
    await asyncio.gather(*(a.wait_online(bus, timeout=60) for a in agents))
    master = MasterProcess(tmp_path, nats_server.url, web_listen="127.0.0.1:0").start()
    browser = Browser(tmp_path / "chromedriver.log")
    try:
        port = await listening_port(master.log, "status page")
        await master.wait_ready(bus)
        env = fleet_env(nats_server.url, operator[0])
        fleet(env, "update", "publish", str(release.bundles[B]))
        browser.open(f"http://127.0.0.1:{port}/")
        browser.wait_for("return document.getElementById('live').className === 'on'")
        browser.js("document.querySelector('nav button[data-tab=rollouts]').click()")
        await asyncio.to_thread(
            browser.wait_for, "return document.querySelectorAll('.rollout progress').length === 1"
        )
        browser.js("window.__sameDocument = 42")
        assert browser.js("return document.querySelector('.rollout progress').value") == 0
        # Record every value the bar shows, from the page itself.
        browser.js(
            "window.__seen = [];"
            "new MutationObserver(() => { const p = document.querySelector('.rollout progress');"
            "  if (p) window.__seen.push(p.value); })"
            ".observe(document.getElementById('rollouts'), {childList: true, subtree: true});"
        )
        fleet(env, "update", "announce", B, "--canary", "1")
        for agent in agents:
            await wait_update_event(bus, B, agent.id, "applied", timeout=120)
        await asyncio.to_thread(
            browser.wait_for,
            "return document.querySelector('.rollout progress').value === 2",
            timeout=60,
        )
        seen = browser.js("return window.__seen")
        assert 1 in seen  # the canary's update showed before the rest
        assert browser.js("return window.__sameDocument") == 42
        text = browser.js("return document.querySelector('.rollout').textContent")
        assert f"{B} target" in text
        assert "applied 2/2" in text
        artifacts = Path(os.environ.get("FLEET_ARTIFACTS") or tmp_path / "artifacts")
        browser.screenshot(artifacts / "status-page-rollout.png")
    finally:
        browser.quit()
        master.stop()
