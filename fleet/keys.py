"""``fleet keys gen KIND NAME``: make an identity."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bus import KEY_KINDS, check_token, generate_seed, public_key_of, write_seed_file
from bus.keys import SEED_FILE_SUFFIX, default_key_dir


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = sub.add_parser("keys", help="make and inspect nkey identities")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    gen = keys_sub.add_parser(
        "gen",
        help="generate an nkey seed file (mode 0400) and print its public key",
        description=(
            "Generate a new nkey for a principal. The seed is written to a file with mode "
            "0400 (by default under /etc/fleetbus/keys for root, else "
            "$XDG_CONFIG_HOME/fleetbus/keys); the public key is printed on stdout. "
            "The file records NAME (a comment line after the seed): commands signing with "
            "it act as NAME, in the events' source and the reply inbox (FLEET_USER "
            "overrides). An existing file is never overwritten unless --force is given."
        ),
    )
    gen.add_argument("kind", choices=KEY_KINDS, help="the principal's role")
    gen.add_argument("name", help="the principal's id (letters, digits, '_', '-')")
    gen.add_argument("-o", "--output", type=Path, metavar="FILE", help="where to write the seed")
    gen.add_argument("--force", action="store_true", help="replace an existing seed file")
    gen.add_argument("--json", action="store_true", help="print a JSON document")
    gen.set_defaults(handler=gen_key)


def gen_key(args: argparse.Namespace) -> int:
    name = check_token(args.name, "name")
    path: Path = args.output or default_key_dir() / f"{args.kind}-{name}{SEED_FILE_SUFFIX}"
    seed = generate_seed()
    write_seed_file(path, seed, overwrite=args.force, owner=(args.kind, name))
    public = public_key_of(seed)
    if args.json:
        doc = {"kind": args.kind, "name": name, "public_key": public, "seed_file": str(path)}
        print(json.dumps(doc))
    else:
        print(public)
    return 0
