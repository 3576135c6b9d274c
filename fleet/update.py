"""``fleet update build|publish|announce|status|pause|resume|disable|enable|set|install``."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from packaging.version import InvalidVersion, Version
from pydantic import TypeAdapter, ValidationError

from bus import Bus, ConnectionFailedError, Signer, UsageError, connect
from bus.command import add_connection_args, connect_settings
from bus.errors import EXIT_OK, BundleError
from fleet import update_fetch, update_status
from fleet.common import operator_signer, presence, publish_signed
from schemas import Presence, UpdateAnnounced, UpdatePublished
from schemas.registry import summarize_validation_error
from schemas.update import PurgeGlob, ReleaseTarget, RolloutStage, UpdateSettings
from updater.bundle import build_bundle, inspect_bundle, open_bundle, sha256_hex
from updater.download import store_digest
from updater.install import InstallRoot
from updater.launcher import default_root
from updater.settings import put_setting, read_settings, write_setting
from updater.wheel import build_wheel, normalized_version

_SETTABLE = {"max_concurrent": int, "retry_after_s": float}


def object_name(version: str) -> str:
    """The object store name of a version's bundle."""
    return f"fleetbus-{version}.bundle"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    update = sub.add_parser(
        "update",
        help="agent self-update: build, publish and announce signed bundles",
        description="Build signed bundles, publish them to the object store, announce the "
        "fleet's target version and steer the rollout. Agents download with at most "
        "update.max_concurrent at once, verify, install, restart and roll back by themselves.",
    )
    cmds = update.add_subparsers(dest="update_command", required=True, metavar="COMMAND")

    build = cmds.add_parser("build", help="make a signed bundle from the source tree or wheels")
    build.add_argument("--version", required=True, help="the release version (PEP 440)")
    build.add_argument(
        "--key", type=Path, required=True, metavar="SEED_FILE", help="release nkey to sign with"
    )
    build.add_argument(
        "--source",
        type=Path,
        default=Path(),
        metavar="DIR",
        help="fleetbus source tree to build the wheel from (default: the current directory)",
    )
    build.add_argument(
        "--wheel",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="a wheel to include (dependencies; or the fleetbus wheel itself, then --source "
        "is not used); repeatable",
    )
    build.add_argument("--build", default="", help="build id recorded in the manifest")
    build.add_argument(
        "--purge",
        action="append",
        default=[],
        metavar="GLOB",
        help="data_dir files this version no longer wants (removed once it is healthy)",
    )
    build.add_argument("-o", "--output", type=Path, metavar="FILE", help="where to write it")
    build.add_argument("--json", action="store_true", help="print a JSON document")
    build.set_defaults(handler=build_cmd)

    publish = cmds.add_parser("publish", help="store a bundle in the object store")
    publish.add_argument("bundle", type=Path, metavar="BUNDLE")
    publish.add_argument("--json", action="store_true", help="print a JSON document")
    publish.set_defaults(handler=publish_cmd, is_async=True)

    announce = cmds.add_parser("announce", help="make a published version the fleet's target")
    announce.add_argument("version", metavar="VERSION")
    announce.add_argument(
        "--canary", type=int, default=0, metavar="N", help="N agents update first (default 0)"
    )
    announce.add_argument(
        "--max-failures",
        type=int,
        default=0,
        metavar="K",
        help="halt the rollout when more than K agents fail (default 0)",
    )
    announce.add_argument(
        "--max-concurrent", type=int, metavar="N", help="also set update.max_concurrent"
    )
    announce.add_argument(
        "--allow-downgrade", action="store_true", help="let agents on newer versions go back"
    )
    announce.add_argument("--json", action="store_true", help="print a JSON document")
    announce.set_defaults(handler=announce_cmd, is_async=True)

    update_status.add_parser(cmds)

    for name, helptext in (
        ("pause", "no agent starts an update until resume"),
        ("resume", "continue a paused or halted rollout"),
        ("disable", "turn updates off fleet-wide (agents off target become unsupported)"),
        ("enable", "turn updates back on"),
    ):
        p = cmds.add_parser(name, help=helptext)
        p.set_defaults(handler=switch_cmd, is_async=True)

    setp = cmds.add_parser("set", help="set max_concurrent or retry_after_s")
    setp.add_argument("key", choices=sorted(_SETTABLE))
    setp.add_argument("value")
    setp.set_defaults(handler=set_cmd, is_async=True)

    update_fetch.add_parser(cmds)

    install = cmds.add_parser(
        "install",
        help="install a bundle into a local agent install root (provisioning)",
        description="Verify a bundle against the given release keys and install it as the "
        "current version of an install root run by fleet-agentd-launcher.",
    )
    install.add_argument("bundle", type=Path, metavar="BUNDLE")
    install.add_argument("--root", type=Path, help="install root (default as the launcher's)")
    install.add_argument(
        "--release-key",
        action="append",
        required=True,
        metavar="KEY",
        help="a trusted release public key; repeatable",
    )
    install.set_defaults(handler=install_cmd)

    for p in (publish, announce, setp, *[cmds.choices[n] for n in ("pause", "resume")]):
        add_connection_args(p)
    for n in ("disable", "enable"):
        add_connection_args(cmds.choices[n])


# --- build, install (local) -------------------------------------------------------------


def build_cmd(args: argparse.Namespace) -> int:
    version = normalized_version(args.version)
    for glob in args.purge:
        try:
            TypeAdapter(PurgeGlob).validate_python(glob)
        except ValidationError:
            raise UsageError(
                f"--purge {glob!r}: a glob relative to the agent's data_dir, of letters, "
                "digits, '._+-', '/' between parts and '*?[]!' (no '.' or '..' part, no "
                "leading '/')"
            ) from None
    signer = Signer.from_file(args.key)
    wheels: list[Path] = list(args.wheel)
    with tempfile.TemporaryDirectory() as tmp:
        if not any(w.name.startswith("fleetbus-") for w in wheels):
            wheels.insert(0, build_wheel(args.source, version, Path(tmp)))
        try:
            data = build_bundle(version, wheels, signer, build=args.build, purge=args.purge)
        except ValidationError as exc:
            raise UsageError(f"bad bundle manifest: {summarize_validation_error(exc)}") from None
    out: Path = args.output or Path(object_name(version))
    out.write_bytes(data)
    doc = {"path": str(out), "version": version, "sha256": sha256_hex(data), "size": len(data)}
    print(json.dumps(doc) if args.json else f"{out}: fleetbus {version}, {len(data)} bytes")
    return EXIT_OK


def install_cmd(args: argparse.Namespace) -> int:
    try:
        data = args.bundle.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {args.bundle}: {exc.strerror}") from None
    bundle = open_bundle(data, set(args.release_key))
    root = InstallRoot(args.root or default_root())
    version_dir = root.install(bundle)
    root.switch(version_dir)
    print(f"installed fleetbus {bundle.version} in {version_dir}; current → {bundle.version}")
    return EXIT_OK


# --- publish, announce ------------------------------------------------------------------


async def publish_cmd(args: argparse.Namespace) -> int:
    try:
        data = args.bundle.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {args.bundle}: {exc.strerror}") from None
    try:
        bundle = inspect_bundle(data)
    except BundleError as exc:
        raise BundleError(f"{args.bundle}: {exc.reason}; not published") from None
    name = object_name(bundle.version)
    digest = sha256_hex(data)
    source, signer = operator_signer(args.nkey)
    async with await connect(connect_settings(args, "fleet update")) as bus:
        store = await bus.objects(bus.subjects.bundles_bucket)
        stored = await _stored(bus, name)
        existing = stored[0] if stored else None
        if existing is not None and existing != digest:
            raise UsageError(
                f"{bundle.version} is already published with other content; releases are "
                "immutable, build a new version"
            )
        if existing is None:
            await store.put(name, data, description=f"fleetbus {bundle.version}")
            event = UpdatePublished(
                version=bundle.version,
                object_name=name,
                sha256=digest,
                size=len(data),
                release_key=bundle.release_key,
            )
            subject = bus.subjects.update_event(bundle.version, "published")
            await publish_signed(bus, event, source, signer, subject)
    doc = {"version": bundle.version, "object": name, "sha256": digest, "size": len(data)}
    if args.json:
        print(json.dumps({**doc, "already_published": existing is not None}))
    else:
        again = " (already published, unchanged)" if existing is not None else ""
        print(f"published fleetbus {bundle.version} as {name}{again}")
    return EXIT_OK


async def _stored(bus: Bus, name: str) -> tuple[str, int] | None:
    """SHA-256 (hex) and size of a stored bundle; None if there is none by that name."""
    store = await bus.objects(bus.subjects.bundles_bucket)
    info = await store.info(name)
    if info is None:
        return None
    digest = store_digest(info.digest or "")
    if digest is None:
        raise ConnectionFailedError(f"object store: {name} has an unreadable digest")
    return digest.hex(), info.size


async def announce_cmd(args: argparse.Namespace) -> int:
    version = normalized_version(args.version)
    if args.canary < 0 or args.max_failures < 0:
        raise UsageError("--canary and --max-failures cannot be negative")
    if args.max_concurrent is not None and args.max_concurrent < 0:
        raise UsageError("--max-concurrent cannot be negative")
    name = object_name(version)
    source, signer = operator_signer(args.nkey)
    async with await connect(connect_settings(args, "fleet update")) as bus:
        stored = await _stored(bus, name)
        if stored is None:
            raise UsageError(f"{version} is not published (fleet update publish BUNDLE first)")
        sha, size = stored
        online = await presence(bus)
        if not args.allow_downgrade:
            current = (await read_settings(bus)).target
            newer = newer_than(version, current.version if current else None, online)
            if newer:
                raise UsageError(
                    f"{version} would be a downgrade: {'; '.join(newer)}. Agents on newer "
                    "versions go back only with --allow-downgrade"
                )
        behind = sorted(a for a, p in online.items() if p.version != version)
        canaries = behind[: args.canary]
        if args.canary > len(canaries):
            print(
                f"fleet: {len(canaries)} online agents are not on {version}, fewer than "
                f"--canary {args.canary}; canaries: {', '.join(canaries) or 'none'}",
                file=sys.stderr,
            )
        event = UpdateAnnounced(
            version=version,
            canary=len(canaries),
            max_failures=args.max_failures,
            canaries=canaries,
        )
        subject = bus.subjects.update_event(version, "announced")
        announcement = await publish_signed(bus, event, source, signer, subject)
        target = ReleaseTarget(
            version=version,
            object_name=name,
            sha256=sha,
            size=size,
            announcement=announcement,
            canaries=canaries,
            max_failures=args.max_failures,
            allow_downgrade=args.allow_downgrade,
            announced_by=source,
        )
        if args.max_concurrent is not None:
            await write_setting(
                bus, "update.max_concurrent", args.max_concurrent, signer=signer, source=source
            )
        stage = RolloutStage(version=version, stage="canary" if canaries else "all")
        await write_setting(
            bus,
            "release.stage",
            stage,
            signer=signer,
            source=source,
            version=version,
            shown=stage.stage,
        )
        # Recorded by the update.announced event above.
        await put_setting(bus, "release.target", target)
    if args.json:
        print(target.model_dump_json())
    else:
        first = f"; canaries first: {', '.join(canaries)}" if canaries else ""
        print(f"announced fleetbus {version} as the target{first}")
    return EXIT_OK


def newer_than(version: str, target: str | None, online: dict[str, Presence]) -> list[str]:
    """What runs or is targeted at a version newer than ``version``, said for a person."""

    def older(a: str, b: str) -> bool:
        try:
            return Version(a) < Version(b)
        except InvalidVersion:
            return False  # not comparable: not known to be a downgrade

    found = [f"the current target is {target}"] if target and older(version, target) else []
    ahead = sorted(a for a, p in online.items() if older(version, p.version))
    if ahead:
        shown = ", ".join(f"{a} ({online[a].version})" for a in ahead[:5])
        more = f" and {len(ahead) - 5} more" if len(ahead) > 5 else ""
        found.append(f"{shown}{more} run newer")
    return found


# --- switches ---------------------------------------------------------------------------


async def switch_cmd(args: argparse.Namespace) -> int:
    command = args.update_command
    source, signer = operator_signer(args.nkey)
    async with await connect(connect_settings(args, "fleet update")) as bus:
        settings = await read_settings(bus)
        target = settings.target.version if settings.target else None
        if command in ("pause", "resume"):
            await write_setting(
                bus,
                "update.paused",
                command == "pause",
                signer=signer,
                source=source,
                version=target,
            )
        else:
            await write_setting(
                bus, "update.enabled", command == "enable", signer=signer, source=source
            )
        t = settings.target
        if command == "resume" and t is not None and settings.stage_of(t.version) == "halted":
            # An operator resuming a halted rollout means "go on": to every agent, even
            # if a canary failed (it stays on its version until a new announcement).
            stage = "all"
            await write_setting(
                bus,
                "release.stage",
                RolloutStage(version=t.version, stage=stage),
                signer=signer,
                source=source,
                version=target,
                shown=stage,
            )
    print(f"updates {command}d" if command.endswith("e") else f"updates {command}ed")
    return EXIT_OK


async def set_cmd(args: argparse.Namespace) -> int:
    kind = _SETTABLE[args.key]
    try:
        value = kind(args.value)
        UpdateSettings.model_validate({args.key: value})
    except ValidationError as exc:
        raise UsageError(summarize_validation_error(exc)) from None
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise UsageError(f"{args.key} must be {what}, not {args.value!r}") from None
    source, signer = operator_signer(args.nkey)
    async with await connect(connect_settings(args, "fleet update")) as bus:
        await write_setting(bus, f"update.{args.key}", value, signer=signer, source=source)
    print(f"update.{args.key} = {value}")
    return EXIT_OK
