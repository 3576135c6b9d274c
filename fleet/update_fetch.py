"""``fleet update fetch VERSION [-o FILE]``: a published bundle, for manual provisioning.

The bytes come from the object store; what they must be comes from the signed
``update.published`` event in the log, so a bundle swapped in the store is refused
here, before anyone installs it (``fleet update install`` then checks its signature).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from bus import BadMessageError, UsageError, connect, decode_event
from bus.command import add_connection_args, connect_settings
from bus.errors import EXIT_OK, BundleError
from bus.log import last_message
from schemas import Event, UpdatePublished
from updater.bundle import inspect_bundle
from updater.download import download
from updater.wheel import normalized_version


def add_parser(cmds: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    fetch = cmds.add_parser(
        "fetch",
        help="download a published bundle (to provision a machine by hand)",
        description="Download the bundle of a published VERSION, check it against the "
        "SHA-256 its signed update.published event records, and write it to FILE "
        "(default fleetbus-VERSION.bundle); then `fleet update install FILE`.",
    )
    fetch.add_argument("version", metavar="VERSION")
    fetch.add_argument("-o", "--output", type=Path, metavar="FILE", help="where to write it")
    fetch.add_argument("--force", action="store_true", help="replace an existing FILE")
    fetch.add_argument("--json", action="store_true", help="print a JSON document")
    add_connection_args(fetch)
    fetch.set_defaults(handler=fetch_cmd, is_async=True)


async def fetch_cmd(args: argparse.Namespace) -> int:
    version = normalized_version(args.version)
    out: Path = args.output or Path(f"fleetbus-{version}.bundle")
    _refuse_existing(out, args.force)  # before downloading, not after
    async with await connect(connect_settings(args, "fleet update fetch")) as bus:
        subject = bus.subjects.update_event(version, "published")
        record = await last_message(bus, bus.subjects.events_stream, subject)
        if record is None:
            raise UsageError(f"{version} is not published (see `fleet update status`)")
        try:
            event = decode_event(record.data)
        except BadMessageError as exc:
            raise BundleError(
                f"the update.published event of {version} is unreadable: {exc}"
            ) from None
        if not isinstance(event, Event) or not isinstance(event.data, UpdatePublished):
            raise BundleError(f"the log's update.published of {version} is not one")
        published = event.data
        data = await download(bus, published.object_name, published.sha256)
    bundle = inspect_bundle(data)
    if bundle.version != version:
        raise BundleError(f"the bundle published as {version} is version {bundle.version}")
    _write_atomically(out, data)
    doc = {
        "path": str(out),
        "version": version,
        "sha256": published.sha256,
        "size": len(data),
        "release_key": published.release_key,
    }
    if args.json:
        print(json.dumps(doc))
    else:
        print(f"{out}: fleetbus {version}, {len(data)} bytes, SHA-256 {published.sha256}")
    return EXIT_OK


def _refuse_existing(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise UsageError(f"{path} exists already; --force replaces it")


def _write_atomically(path: Path, data: bytes) -> None:
    """``data`` at ``path``, never a partial file: a temporary file renamed over it."""
    tmp = path.with_name(f".{path.name}.part")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None
