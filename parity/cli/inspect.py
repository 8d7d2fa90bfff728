"""`parity inspect`: summarise a dump (layers, shapes, parameters, loss terms), optionally checking every tensor."""

from __future__ import annotations

import argparse
from pathlib import Path

from parity.errors import ParityError


def register(subparsers) -> None:
    parser = subparsers.add_parser("inspect", help="summarise a dump: layers, shapes, parameters, loss terms")
    parser.add_argument("dump")
    parser.add_argument("--verify", action="store_true", help="also check every tensor's checksum")
    parser.set_defaults(func=cmd_inspect)


def cmd_inspect(args: argparse.Namespace) -> int:
    return inspect_dump(Path(args.dump), verify=args.verify)


def inspect_dump(path: Path, *, verify: bool) -> int:
    from parity.dump.files import Dump
    from parity.dump.inspect import render_inspect

    dump = Dump(path)
    if verify:
        bad = dump.verify()
        if bad:
            raise ParityError(f"{len(bad)} tensor(s) do not match their checksum, first: {bad[0]}")
    render_inspect(dump)
    return 0
