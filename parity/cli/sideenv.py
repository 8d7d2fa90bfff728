"""`python -m parity.cli.sideenv VERSION [-- PARITY ARGS]`: build a side environment for an ultralytics release
(parity/capture/sideenv.py) and run `parity` in it. The Makefile's `ULTRALYTICS=X.Y.Z` goes through here."""

from __future__ import annotations

import argparse
import json
import os
import sys

from parity.capture import sideenv
from parity.errors import ParityError

PROG = "python -m parity.cli.sideenv"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Build a side environment for an ultralytics release and run `parity` in it.",
        epilog=f"example: {PROG} 8.3.200 -- dump --out reference_dumps/yolo11n-u8.3.200",
    )
    parser.add_argument("version", help="exact ultralytics release, e.g. 8.3.200")
    parser.add_argument("--build", action="store_true", help="only build (or check) the environment")
    parser.add_argument("--rebuild", action="store_true", help="remove and rebuild the environment")
    parser.add_argument("--print-python", action="store_true", help="print the environment's python and exit")
    parser.add_argument("--dir", dest="root", help=f"where side environments live (default ${sideenv.ENV_VAR}, "
                                                   f"else runs/envs in the project); one takes several GB")
    parser.add_argument("--remove", action="store_true", help="delete this version's environment and exit")
    return parser


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(this command's arguments, parity's): everything after `--` belongs to parity."""
    if "--" not in argv:
        return argv, []
    at = argv.index("--")
    return argv[:at], argv[at + 1:]


def main(argv: list[str] | None = None) -> int:
    own, rest = split_argv(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(own)
    try:
        if args.remove:
            print(f"removed {sideenv.remove(args.version, args.root)}")
            return 0
        python = sideenv.build(args.version, rebuild=args.rebuild, root=args.root)
        if args.print_python:
            print(python)
            return 0
        if args.build or not rest:
            print(json.dumps(sideenv.read_stamp(args.version, args.root), indent=1))
            return 0
        # in the caller's directory: a user's own model yaml and --out paths mean what they typed
        return sideenv.run_parity(args.version, rest, build_if_missing=False, root=args.root, cwd=os.getcwd())
    except ParityError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
