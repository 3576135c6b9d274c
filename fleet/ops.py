"""``fleet ops …``: set up the fleet's storage on a NATS server."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bus import StorageSettings, UsageError, connect
from bus.codec import DEFAULT_MAX_SIZE
from bus.command import add_connection_args, connect_settings
from bus.streams import provision_fleet
from fleet.permissions import load_registry, render


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ops = sub.add_parser("ops", help="set up the fleet's NATS side: storage and server permissions")
    ops_sub = ops.add_subparsers(dest="ops_command", required=True, metavar="COMMAND")
    init = ops_sub.add_parser(
        "init",
        help="create every stream, KV bucket and object store (idempotent)",
        description=(
            "Create the event log, output stream, KV buckets and object stores of the "
            "design. Running it again changes nothing; a resource that exists with another "
            "configuration is reported field by field and left untouched (exit 2)."
        ),
    )
    init.add_argument(
        "--replicas", type=int, default=1, choices=(1, 3, 5), help="JetStream replicas"
    )
    init.add_argument("--json", action="store_true", help="print a JSON document")
    add_connection_args(init)
    init.set_defaults(handler=init_storage, is_async=True)

    config = ops_sub.add_parser(
        "server-config",
        help="render least-privilege nats-server permissions from a registry",
        description=(
            "Render the nats-server `authorization` block for a registry (TOML) of "
            "principals: [master], [agents.ID], [operators.NAME], [headless.NAME], "
            "[admins.NAME], each with public_key. Only these keys may connect; each may "
            "publish and subscribe only what its role needs."
        ),
    )
    config.add_argument("--registry", type=Path, required=True, metavar="FILE")
    config.add_argument("-o", "--output", type=Path, metavar="FILE", help="write here, not stdout")
    config.add_argument(
        "--store-dir",
        type=Path,
        metavar="DIR",
        help="also render the jetstream block (store in DIR, fsync on every write); "
        "then the output replaces the server config's own jetstream block",
    )
    config.add_argument(
        "--max-payload",
        type=int,
        default=DEFAULT_MAX_SIZE,
        metavar="BYTES",
        help="the server's max_payload, for every principal (nats-server has no per-user "
        f"limit); default {DEFAULT_MAX_SIZE}",
    )
    config.set_defaults(handler=server_config)


def jetstream_block(store_dir: Path | None) -> str:
    """The durable ``jetstream`` block, or a reminder of its one required setting.

    nats-server keeps the last ``jetstream`` block of a file whole, so the block is only
    rendered when asked for (it would otherwise replace the one it is included after).
    """
    if store_dir is None:
        return (
            "# The server's jetstream block must say `sync_interval: always` (fsync before\n"
            "# acknowledging), as ops/nats/*.conf do; --store-dir DIR renders one.\n"
        )
    return f'jetstream {{\n  store_dir: "{store_dir}"\n  sync_interval: always\n}}\n'


def server_config(args: argparse.Namespace) -> int:
    if not 1024 <= args.max_payload <= 64 * 1024 * 1024:
        raise UsageError("--max-payload must be between 1024 and 67108864 bytes")
    registry = load_registry(args.registry)
    text = jetstream_block(args.store_dir) + render(registry, max_payload=args.max_payload)
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text)
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


async def init_storage(args: argparse.Namespace) -> int:
    settings = connect_settings(args, "fleet-ops")
    async with await connect(settings) as bus:
        report = await provision_fleet(bus, StorageSettings(replicas=args.replicas))
    if args.json:
        print(json.dumps({"created": report.created, "unchanged": report.unchanged}))
    else:
        for name in report.created:
            print(f"created   {name}")
        for name in report.unchanged:
            print(f"unchanged {name}")
        if not report.created:
            print("nothing to do: every stream and bucket is as required", file=sys.stderr)
    return 0
