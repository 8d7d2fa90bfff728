"""`parity scaffold`: write a starter adapter file for a PyTorch port (parity/replay/scaffold.py)."""

from __future__ import annotations

import argparse

from parity.errors import OutputExists, ParityError


class ScaffoldOptions:
    @staticmethod
    def add(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--candidate", required=True, help="package.module:factory returning an nn.Module")
        parser.add_argument("--reference", required=True, help="reference dump directory")
        parser.add_argument("--out", help="adapter file to write (default <module>_adapter.py)")
        parser.add_argument("--force", action="store_true", help="replace an existing file")

    @staticmethod
    def config(args: argparse.Namespace):
        from parity.replay.scaffold import ScaffoldConfig

        return ScaffoldConfig(args.candidate, args.reference, args.out, args.force)


def register(subparsers) -> None:
    parser = subparsers.add_parser("scaffold", help="write a starter adapter file for a PyTorch port "
                                                    "(docs/model-adapter.md)")
    ScaffoldOptions.add(parser)
    parser.set_defaults(func=cmd_scaffold)


def cmd_scaffold(args: argparse.Namespace) -> int:
    from rich.console import Console

    from parity.replay.scaffold import write_scaffold

    try:
        path = write_scaffold(ScaffoldOptions.config(args))
    except OutputExists as error:
        raise ParityError(f"{error.path} exists: pass --force to replace it, or --out another path") from None
    Console().print(f"adapter written to {path} (docs/model-adapter.md explains each part)", highlight=False)
    return 0
