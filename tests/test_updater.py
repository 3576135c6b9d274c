"""Bundles, install roots, the version policy and the rollout policy, without a server."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest
from samples import sample_envelope
from updates import make_release, tamper

from bus import BundleError, Signer, generate_seed
from ledger.projection import Projection
from ledger.rollout import next_step
from schemas import (
    AgentOnline,
    AgentUnsupported,
    SettingsChanged,
    UpdateAnnounced,
    UpdateApplied,
    UpdateFailed,
    UpdateRolledBack,
    UpdateTokenAcquired,
    UpdateTokenReleased,
)
from schemas.update import ReleaseTarget, RolloutStage, UpdateSettings, parse_settings
from updater.agent import Updater, UpdaterOptions
from updater.bundle import Bundle, build_bundle, inspect_bundle, open_bundle
from updater.install import InstallRoot, check_requirements, purge
from updater.wheel import build_wheel

ANNOUNCEMENT = "01JB3Z0000000000000000000A"


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Any:
    rel = make_release(tmp_path_factory.mktemp("release"))
    rel.bundle("1.1.0")
    return rel


def test_a_signed_bundle_opens_with_its_key_only(release: Any) -> None:
    data = release.bundles["1.1.0"].read_bytes()
    bundle = open_bundle(data, {release.public_key})
    assert bundle.version == "1.1.0"
    assert list(bundle.wheels()) == ["wheels/fleetbus-1.1.0-py3-none-any.whl"]
    assert "pydantic>=2.6,<3" in bundle.manifest.requires
    stranger = Signer(generate_seed()).public_key
    with pytest.raises(BundleError, match="not a trusted release key"):
        open_bundle(data, {stranger})
    assert inspect_bundle(data).release_key == release.public_key


def test_tampered_unsigned_padded_and_garbage_bundles_are_refused(
    release: Any, tmp_path: Path
) -> None:
    trusted = {release.public_key}
    tampered = tamper(release.bundles["1.1.0"], tmp_path / "t.bundle").read_bytes()
    with pytest.raises(BundleError, match="does not match its digest"):
        open_bundle(tampered, trusted)

    wheel = build_wheel(Path(__file__).resolve().parents[1], "1.1.0", tmp_path)
    unsigned = build_bundle("1.1.0", [wheel], None)
    with pytest.raises(BundleError, match="unsigned"):
        open_bundle(unsigned, trusted)

    # A member the manifest does not list (smuggled in after signing).
    buf = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(release.bundles["1.1.0"].read_bytes())) as src,
        tarfile.open(fileobj=buf, mode="w") as dst,
    ):
        for info in src.getmembers():
            dst.addfile(info, src.extractfile(info))
        extra = tarfile.TarInfo("wheels/evil-1.0-py3-none-any.whl")
        extra.size = 3
        dst.addfile(extra, io.BytesIO(b"bad"))
    with pytest.raises(BundleError, match="does not list"):
        open_bundle(buf.getvalue(), trusted)

    with pytest.raises(BundleError, match="not a bundle"):
        open_bundle(b"\x00garbage" * 100, trusted)

    # A signature by the right key over another manifest.
    other = make_release(tmp_path / "other")
    other.signer = release.signer
    forged = other.bundle("1.1.1").read_bytes()
    assert open_bundle(forged, trusted).version == "1.1.1"  # a real signature verifies


def test_install_switch_and_state_files(release: Any, tmp_path: Path) -> None:
    root = InstallRoot(tmp_path / "root")
    assert root.current_dir() is None  # the base installation
    bundle = open_bundle(release.bundles["1.1.0"].read_bytes(), {release.public_key})
    version_dir = root.install(bundle)
    assert (version_dir / "site" / "agentd" / "__main__.py").is_file()
    assert (version_dir / "site" / "fleetbus-1.1.0.dist-info" / "METADATA").is_file()
    root.switch(version_dir)
    assert os.readlink(root.current) == "versions/1.1.0"  # relative: the root can move
    assert root.version_of(root.current_dir()) == "1.1.0"
    with pytest.raises(BundleError, match="running version"):
        root.install(bundle)
    root.switch(None)
    assert root.current_dir() is None

    root.remember_failure("1.2.0", ANNOUNCEMENT, "bad")
    assert root.failed() == {"1.2.0": {"announcement": ANNOUNCEMENT, "reason": "bad"}}
    (root.root / "failed.json").write_text("{not json")
    assert root.failed() == {}, "a corrupt state file is ignored, not fatal"


def test_requirements_and_python_version_are_checked(release: Any) -> None:
    bundle = open_bundle(release.bundles["1.1.0"].read_bytes(), {release.public_key})
    check_requirements(bundle)  # this environment runs the agent

    def variant(**changes: Any) -> Bundle:
        manifest = bundle.manifest.model_copy(update=changes)
        return Bundle(manifest=manifest, release_key=bundle.release_key, files=bundle.files)

    with pytest.raises(BundleError, match="neither in the bundle nor installed"):
        check_requirements(variant(requires=["no-such-package-fleetbus>=1"]))
    with pytest.raises(BundleError, match=r"pydantic .* is what there is"):
        check_requirements(variant(requires=["pydantic>=99"]))
    with pytest.raises(BundleError, match="needs Python >=99"):
        check_requirements(variant(python_requires=">=99"))
    check_requirements(variant(requires=["nothing-here; sys_platform == 'win32'"]))


def test_purge_removes_only_what_matches(tmp_path: Path) -> None:
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "old.bin").write_text("x")
    (tmp_path / "journal.jsonl").write_text("{}")
    assert purge(tmp_path, ["cache"]) == ["cache"]
    assert (tmp_path / "journal.jsonl").exists()
    assert not (tmp_path / "cache").exists()


def test_a_bad_setting_falls_back_to_its_default() -> None:
    settings, problems = parse_settings(
        {"update.max_concurrent": b"-3", "update.paused": b"true", "other.key": b"x"}
    )
    assert settings.max_concurrent == 5
    assert settings.paused is True
    assert len(problems) == 1
    assert problems[0].startswith("update.max_concurrent")


def target(version: str = "1.1.0", **kw: Any) -> ReleaseTarget:
    return ReleaseTarget(
        version=version,
        object_name=f"fleetbus-{version}.bundle",
        sha256="ab" * 32,
        size=1,
        announcement=ANNOUNCEMENT,
        announced_by="alice",
        **kw,
    )


def updater(tmp_path: Path, agent: str = "a1", **kw: Any) -> Updater:
    options: dict[str, Any] = {
        "version": "1.0.0",
        "stamped": False,
        "auto_update": True,
        "release_keys": {"X"},
        "data_dir": tmp_path,
        "root": tmp_path / "root",
        **kw,
    }

    async def emit(_: Any) -> None:
        return None

    return Updater(
        None,  # type: ignore[arg-type]  # decide() needs no bus
        agent,
        UpdaterOptions(**options),
        emit=emit,
        show=lambda state, text: None,
        restart=lambda: None,
    )


@pytest.mark.parametrize(
    ("settings", "options", "expected"),
    [
        ({}, {}, ("ready", None, False)),
        ({"target": target("1.0.0")}, {}, ("ready", None, False)),
        ({"target": target()}, {}, ("updating", "updating to 1.1.0", True)),
        ({"target": target()}, {"auto_update": False}, ("unsupported", "auto_update", False)),
        ({"target": target()}, {"stamped": True}, ("unsupported", "stamped", False)),
        ({"target": target()}, {"root": None}, ("unsupported", "launcher", False)),
        ({"target": target()}, {"release_keys": set()}, ("unsupported", "release_keys", False)),
        ({"target": target(), "enabled": False}, {}, ("unsupported", "disabled", False)),
        ({"target": target("0.9")}, {}, ("unsupported", "downgrade", False)),
        ({"target": target("0.9", allow_downgrade=True)}, {}, ("updating", None, True)),
        ({"target": target(), "paused": True}, {}, ("ready", "paused", False)),
        ({"target": target(), "max_concurrent": 0}, {}, ("ready", "max_concurrent = 0", False)),
        ({"target": target(canaries=["a2"])}, {}, ("ready", "canaries", False)),
        ({"target": target(canaries=["a1"])}, {}, ("updating", None, True)),
        (
            {"target": target(), "stage": RolloutStage(version="1.1.0", stage="halted")},
            {},
            ("ready", "halted", False),
        ),
    ],
)
def test_version_policy(
    tmp_path: Path,
    settings: dict[str, Any],
    options: dict[str, Any],
    expected: tuple[str, str | None, bool],
) -> None:
    decision = updater(tmp_path, **options).decide(UpdateSettings(**settings))
    state, text, go = expected
    assert decision.state == state
    assert decision.go is go
    if text is None:
        assert decision.text is None or decision.go
    else:
        assert text in (decision.text or "")


def test_a_failed_version_waits_for_a_new_announcement(tmp_path: Path) -> None:
    u = updater(tmp_path)
    assert u.root is not None
    u.root.remember_failure("1.1.0", ANNOUNCEMENT, "bad digest")
    decision = u.decide(UpdateSettings(target=target()))
    assert decision.state == "unsupported"
    assert "1.1.0 failed here (bad digest)" in (decision.text or "")
    again = target().model_copy(update={"announcement": "01JB3Z0000000000000000000B"})
    assert u.decide(UpdateSettings(target=again)).go


def fold(*datas: Any) -> Projection:
    projection = Projection()
    for seq, data in enumerate(datas, 1):
        from bus.codec import decode_data

        projection.apply(seq, decode_data(sample_envelope(data)))
    return projection


def test_rollout_fold_and_steps() -> None:
    v = "1.1.0"
    t = target(v, canaries=["a1"], max_failures=0)
    p = fold(
        UpdateAnnounced(version=v, canary=1, canaries=["a1"]),
        UpdateTokenAcquired(version=v, agent="a1", slot=0),
        UpdateTokenReleased(version=v, agent="a1", slot=0),
    )
    assert p.target == v
    assert p.rollouts[v].agents == {"a1": "downloaded"}
    assert next_step(t, "canary", p.rollouts[v]) is None

    p.apply(4, _decoded(UpdateApplied(version=v, agent="a1", previous="1.0.0")))
    step = next_step(t, "canary", p.rollouts[v])
    assert step is not None
    assert (step.stage, step.halt_reason) == ("all", None)

    p.apply(5, _decoded(UpdateFailed(version=v, agent="a2", stage="verify", reason="x")))
    step = next_step(t, "all", p.rollouts[v])
    assert step is not None
    assert step.stage == "halted"
    assert "a2" in (step.halt_reason or "")
    assert next_step(t, "halted", p.rollouts[v]) is None

    # resume: earlier failures no longer count against the limit
    p.apply(
        6, _decoded(SettingsChanged(key="update.paused", value=False, changed_by="b", version=v))
    )
    assert p.rollouts[v].failures_since_resume == 0
    assert next_step(t, "all", p.rollouts[v]) is None
    p.apply(7, _decoded(UpdateRolledBack(version=v, agent="a3", restored="1.0.0", reason="x")))
    assert next_step(t, "all", p.rollouts[v]) is not None

    # a new announcement starts over, keeping who already applied
    p.apply(8, _decoded(UpdateAnnounced(version=v)))
    assert p.rollouts[v].agents == {"a1": "applied"}
    assert p.rollouts[v].failures == 0

    p.apply(9, _decoded(AgentUnsupported(agent="a9", version="0.1", target=v, reason="off")))
    assert p.agents["a9"].unsupported == "off"
    p.apply(10, _decoded(AgentOnline(agent="a9", version="0.1", host="h")))
    assert p.agents["a9"].unsupported is None

    again = Projection.from_state(p.to_state())
    assert again.to_state() == p.to_state()


def _decoded(data: Any) -> Any:
    from bus.codec import decode_data

    return decode_data(sample_envelope(data))


async def test_a_dead_agents_download_token_expires_by_itself(bus: Any) -> None:
    from bus.lease import Lease

    bucket = bus.subjects.tokens_bucket
    dead = Lease(bus, bucket, "slot-0", "dead-agent", ttl_s=1)
    assert await dead.try_acquire()
    alive = Lease(bus, bucket, "slot-0", "alive-agent", ttl_s=30)
    assert not await alive.try_acquire()
    # Nobody renews the dead agent's lease: the server's TTL frees the slot.
    assert await alive.acquire(wait_s=15)
    assert not await dead.renew()
    await alive.release()


def test_a_purge_of_everything_keeps_what_the_agent_stands_on(tmp_path: Path) -> None:
    """A signed bundle saying ``purge = ["*"]`` (a release key's mistake, or its
    abuse) must not take the identity, the journal or the used seals: without them the
    agent would run jobs twice and accept sealed passwords again."""
    from agentd.agent import updater_options
    from agentd.config import AgentConfig

    data = tmp_path / "data"
    config = AgentConfig(id="a1", data_dir=data)
    keep = updater_options(config, "1.0.0", None).keep
    for path in (config.key_path, config.journal_path, config.seals_path, data / "old.cache"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    removed = purge(data, ["*"], keep=keep)
    assert removed == ["old.cache"]
    assert config.key_path.exists()
    assert config.journal_path.exists()
    assert config.seals_path.exists()
