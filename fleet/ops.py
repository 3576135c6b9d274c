"""``fleet ops …``: set up the fleet's storage on a NATS server, and watch its limits."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bus import ProvisioningConflictError, StorageSettings, UsageError, connect
from bus.codec import DEFAULT_MAX_SIZE
from bus.command import add_connection_args, connect_settings
from bus.errors import EXIT_USAGE
from bus.streams import provision_fleet
from fleet import backup
from fleet.leafsite import check_domain, hub_leafnodes_block, hub_site_users, render_leaf
from fleet.ops_status import status_command
from fleet.permissions import load_registry, render
from fleet.quantities import parse_duration, parse_size


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ops = sub.add_parser("ops", help="set up the fleet's NATS side: storage and server permissions")
    ops_sub = ops.add_subparsers(dest="ops_command", required=True, metavar="COMMAND")
    init = ops_sub.add_parser(
        "init",
        help="create every stream, KV bucket and object store (idempotent)",
        description=(
            "Create the event log, output stream, KV buckets and object stores of the "
            "design. Running it again changes nothing; a resource that exists with another "
            "configuration is reported field by field and left untouched (exit 2), unless "
            "--migrate: then every field the server allows is changed and the rest is "
            "reported (exit 2 if anything was refused). The event log never loses an "
            "event to a migration: a limit below what it holds now is refused. Sizes take "
            "B/KB/MB/GB/KiB/MiB/GiB suffixes, durations s/m/h/d/w; 0 means no limit."
        ),
    )
    d = StorageSettings()
    init.add_argument(
        "--replicas", type=int, default=1, choices=(1, 3, 5), help="JetStream replicas"
    )
    limits = (
        ("--events-max-age", parse_duration, d.events_max_age_s, "DURATION",
         "how long events are kept (default 90d; 0: forever)"),
        ("--events-max-bytes", parse_size, d.events_max_bytes, "SIZE",
         "event log size limit (default 0: none); when reached, new events are refused "
         "with an error, never old ones dropped"),
        ("--output-max-age", parse_duration, d.output_max_age_s, "DURATION",
         "how long job output is kept (default 7d)"),
        ("--output-max-bytes", parse_size, d.output_max_bytes, "SIZE",
         "output size limit, oldest output removed first (default 1GiB)"),
    )  # fmt: skip
    for flag, kind, default, metavar, text in limits:
        init.add_argument(flag, type=kind, default=default, metavar=metavar, help=text)
    init.add_argument(
        "--max-consumers",
        type=int,
        default=d.max_consumers,
        metavar="N",
        help=f"consumers per stream (default {d.max_consumers}: one per agent for 10,000 "
        "agents, plus readers; nats-server's own default is 1,000)",
    )
    init.add_argument(
        "--migrate",
        action="store_true",
        help="change existing streams to these settings where the server allows it",
    )
    init.add_argument("--json", action="store_true", help="print a JSON document")
    add_connection_args(init)
    init.set_defaults(handler=init_storage, is_async=True)

    status = ops_sub.add_parser(
        "status",
        help="usage of every stream against its limits, with warnings",
        description=(
            "Messages, bytes, the oldest message's age and consumers of every stream, "
            "against its limits. Warns (stderr, and in --json) at --warn-at of a limit "
            "that would refuse events or make agents unable to subscribe."
        ),
    )
    status.add_argument(
        "--warn-at",
        type=float,
        default=0.8,
        metavar="FRACTION",
        help="warn at this fraction of a limit (default 0.8)",
    )
    status.add_argument("--json", action="store_true", help="print a JSON document")
    add_connection_args(status)
    status.set_defaults(handler=status_command, is_async=True)

    backup.add_parsers(ops_sub)

    config = ops_sub.add_parser(
        "server-config",
        help="render least-privilege nats-server permissions from a registry",
        description=(
            "Render the nats-server `authorization` block for a registry (TOML) of "
            "principals: [master], [agents.ID], [operators.NAME], [headless.NAME], "
            "[admins.NAME], each with public_key, and [sites.NAME] (public_key and agents: "
            "remote sites behind leaf nodes). Only these keys may connect; each may "
            "publish and subscribe only what its role needs. With --leaf SITE: the "
            "site's leaf node config instead."
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
    config.add_argument(
        "--domain",
        metavar="NAME",
        help="the hub's JetStream domain, needed once there are [sites.NAME] (remote "
        "sites behind leaf nodes); rendered into the jetstream block with --store-dir",
    )
    config.add_argument(
        "--leaf-listen",
        metavar="HOST:PORT",
        help="also render the hub's leafnodes block: sites' leaf nodes connect here",
    )
    config.add_argument(
        "--leaf",
        metavar="SITE",
        help="render the leaf node config of this site instead of the hub's "
        "(needs --domain and --hub-url)",
    )
    config.add_argument(
        "--hub-url", metavar="URL", help="with --leaf: the hub's leafnodes URL, nats-leaf://…"
    )
    config.add_argument(
        "--seed-include",
        default="site-seed.conf",
        metavar="FILE",
        help='with --leaf: the root-only file holding the site\'s `nkey: "SU…"`, relative '
        "to the leaf config's directory (default site-seed.conf)",
    )
    config.set_defaults(handler=server_config)


def jetstream_block(store_dir: Path | None, domain: str | None = None) -> str:
    """The durable ``jetstream`` block, or a reminder of its one required setting.

    nats-server keeps the last ``jetstream`` block of a file whole, so the block is only
    rendered when asked for (it would otherwise replace the one it is included after).
    """
    if store_dir is None:
        also = f'# It must also say `domain: "{domain}"` (sites reach it as that domain).\n'
        return (
            "# The server's jetstream block must say `sync_interval: always` (fsync before\n"
            "# acknowledging), as ops/nats/*.conf do; --store-dir DIR renders one.\n"
        ) + (also if domain is not None else "")
    more = f'  domain: "{domain}"\n' if domain is not None else ""
    return f'jetstream {{\n  store_dir: "{store_dir}"\n  sync_interval: always\n{more}}}\n'


def server_config(args: argparse.Namespace) -> int:
    if not 1024 <= args.max_payload <= 64 * 1024 * 1024:
        raise UsageError("--max-payload must be between 1024 and 67108864 bytes")
    registry = load_registry(args.registry)
    domain = check_domain(args.domain) if args.domain is not None else None
    if args.leaf is not None:
        if domain is None or args.hub_url is None:
            raise UsageError("--leaf needs --domain and --hub-url")
        if any(c in args.hub_url + args.seed_include for c in '"\n'):
            raise UsageError("--hub-url and --seed-include may not hold quotes or newlines")
        if Path(args.seed_include).is_absolute():
            # nats-server joins an include to the config's directory, absolute or not.
            raise UsageError("--seed-include is relative to the leaf config's directory")
        text = render_leaf(
            registry,
            args.leaf,
            hub_url=args.hub_url,
            domain=domain,
            seed_include=args.seed_include,
            max_payload=args.max_payload,
        )
    else:
        text = jetstream_block(args.store_dir, domain) + render(
            registry,
            max_payload=args.max_payload,
            extra_users=hub_site_users(registry, domain),
        )
        if args.leaf_listen is not None:
            text += hub_leafnodes_block(args.leaf_listen)
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text)
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


def settings_from(args: argparse.Namespace) -> StorageSettings:
    """The storage settings ``fleet ops init`` was given."""
    if args.max_consumers < 1:
        raise UsageError("--max-consumers must be at least 1")
    return StorageSettings(
        replicas=args.replicas,
        events_max_age_s=args.events_max_age,
        events_max_bytes=args.events_max_bytes,
        output_max_age_s=args.output_max_age,
        output_max_bytes=args.output_max_bytes,
        max_consumers=args.max_consumers,
    )


async def init_storage(args: argparse.Namespace) -> int:
    storage = settings_from(args)
    settings = connect_settings(args, "fleet-ops")
    async with await connect(settings) as bus:
        try:
            report = await provision_fleet(bus, storage, migrate=args.migrate)
        except ProvisioningConflictError as exc:
            raise UsageError(
                f"{exc}; nothing was changed. `fleet ops init --migrate` (with the same "
                "settings) changes it where the server allows"
            ) from exc
    if args.json:
        print(
            json.dumps(
                {
                    "created": report.created,
                    "unchanged": report.unchanged,
                    "changed": [c.as_dict() for c in report.changed],
                    "refused": [c.as_dict() for c in report.refused],
                }
            )
        )
    else:
        for name in report.created:
            print(f"created   {name}")
        changed = {c.stream for c in report.changed}
        for name in report.unchanged:
            print(f"{'migrated ' if name in changed else 'unchanged'} {name}")
        for c in report.changed:
            print(f"changed   {c.stream} {c.field}: {c.old!r} -> {c.new!r}")
        if not report.created and not report.changed and not report.refused:
            print("nothing to do: every stream and bucket is as required", file=sys.stderr)
    for c in report.refused:
        print(
            f"fleet: cannot change {c.stream} {c.field} from {c.old!r} to {c.new!r}: {c.reason}",
            file=sys.stderr,
        )
    return EXIT_USAGE if report.refused else 0
