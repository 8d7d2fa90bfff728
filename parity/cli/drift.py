"""`parity drift A B`: what changed between two reference dumps (e.g. two ultralytics releases), by cause."""

from __future__ import annotations

import argparse
from pathlib import Path

from parity.report.drift import DriftConfig, show_drift


class DriftOptions:
    """The arguments of `parity drift`, and the DriftConfig they make."""

    @staticmethod
    def add(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("a", help="reference dump A (e.g. captured with ultralytics 8.3.200)")
        parser.add_argument("b", help="reference dump B (e.g. captured with the current ultralytics)")
        parser.add_argument("--json", dest="json_out", help="also write the drift report as JSON here")
        parser.add_argument("--limit", type=int, default=8, help="tensors listed per cause (default %(default)s)")

    @staticmethod
    def config(args: argparse.Namespace) -> DriftConfig:
        return DriftConfig(a=Path(args.a), b=Path(args.b), limit=args.limit,
                           json_out=Path(args.json_out) if args.json_out else None)


def cmd_drift(args: argparse.Namespace) -> int:
    """Exit 0: the dumps agree bitwise; 1: anything drifted (bad input raises ParityError: exit 2)."""
    return 1 if show_drift(DriftOptions.config(args)).drifted else 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "drift", help="what changed between two reference dumps (e.g. two ultralytics releases), by cause",
        description="List every difference between reference dumps A and B, grouped by cause (versions, Detect "
                    "bias init, small-box floor, loss output shape, head output layout, ...). Exit 0: no drift; "
                    "1: drift; 2: bad input.")
    DriftOptions.add(parser)
    parser.set_defaults(func=cmd_drift)
