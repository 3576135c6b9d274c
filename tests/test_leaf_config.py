"""What ``fleet ops server-config`` renders for remote sites, and what it refuses
(the configs at work, on real servers: tests/test_leaf_site.py)."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

import pytest
from agents import FLEET

from bus import Signer, generate_seed
from bus.subjects import js_api
from fleet.leafsite import site_permissions
from fleet.permissions import Registry, render


def key() -> str:
    return Signer(generate_seed()).public_key


def registry_text(site_agents: str = '["web-1"]') -> str:
    return (
        f'[master]\npublic_key = "{key()}"\n'
        f'[agents.web-1]\npublic_key = "{key()}"\n'
        f'[agents.web-2]\npublic_key = "{key()}"\n'
        f'[operators.alice]\npublic_key = "{key()}"\n'
        f'[sites.branch]\npublic_key = "{key()}"\nagents = {site_agents}\n'
    )


def server_config(tmp_path: Path, text: str, *args: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "registry.toml"
    path.write_text(text)
    argv = [FLEET, "ops", "server-config", "--registry", str(path), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def test_the_site_link_may_do_what_its_agents_may_and_no_more() -> None:
    registry = Registry.model_validate(tomllib.loads(registry_text()))
    perms = site_permissions(registry, "branch", "hub")
    publish = perms["publish"]["allow"]  # type: ignore[index]
    subscribe = perms["subscribe"]["allow"]  # type: ignore[index]
    assert not [s for s in publish if s.startswith("$JS.API.") or s.startswith("$KV.")]
    assert f"{js_api('hub')}.$KV.fleet-presence.web-1" in publish
    assert "fleet.evt.job.web-1.*.started" in publish
    assert not [s for s in publish + subscribe if "web-2" in s]
    assert not [s for s in publish + subscribe if s in (">", "fleet.>", "fleet.evt.>")]
    # Answers to control requests to its agent, for the principals that may ask.
    assert "_INBOX_alice.ctl.web-1.*" in publish
    assert not [s for s in publish if s.startswith("_INBOX_") and ".ctl.web-1." not in s]
    assert "allow_responses" not in perms


def test_without_sites_the_hub_config_is_unchanged() -> None:
    raw = tomllib.loads(registry_text())
    del raw["sites"]
    registry = Registry.model_validate(raw)
    assert "LEAFNODE" not in render(registry)
    assert "$JS.hub." not in render(registry)


@pytest.mark.parametrize(
    ("registry", "args", "error"),
    [
        (registry_text(), [], "give the hub's JetStream --domain"),
        (registry_text('["web-9"]'), ["--domain", "hub"], "web-9 are not in [agents]"),
        (registry_text(), ["--leaf", "branch", "--domain", "hub"], "needs --domain and --hub-url"),
        (
            registry_text(),
            ["--leaf", "other", "--domain", "hub", "--hub-url", "nats-leaf://h:7422"],
            "no site 'other'",
        ),
        (
            registry_text(),
            [
                "--leaf",
                "branch",
                "--domain",
                "hub",
                "--hub-url",
                "nats-leaf://h:7422",
                "--seed-include",
                "/etc/seed.conf",
            ],
            "relative to the leaf config's directory",
        ),
        (registry_text(), ["--domain", "h.b"], "JetStream domain"),
        (
            registry_text(),
            ["--leaf", "branch", "--domain", "hub", "--hub-url", 'x" } authorization {'],
            "may not hold quotes",
        ),
    ],
)
def test_bad_site_configs_are_refused(
    tmp_path: Path, registry: str, args: list[str], error: str
) -> None:
    done = server_config(tmp_path, registry, *args)
    assert done.returncode == 2, done.stdout + done.stderr
    assert error in done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize("domain", ["hub.>", "*", "hub API", "", "h" * 65])
def test_an_agent_refuses_a_domain_that_is_not_one_subject_token(
    tmp_path: Path, domain: str
) -> None:
    # A domain with a wildcard or a dot would aim the agent's API requests elsewhere.
    from pydantic import ValidationError

    from agentd.config import AgentConfig
    from bus import ConnectSettings

    with pytest.raises(ValidationError):
        AgentConfig(id="web-1", data_dir=tmp_path, jetstream_domain=domain)
    with pytest.raises(ValidationError):
        ConnectSettings(servers=["nats://127.0.0.1:4222"], js_domain=domain)
