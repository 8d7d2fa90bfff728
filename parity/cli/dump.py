"""`parity dump`: capture a reference dump from ultralytics (with `--steps N`, also N training steps)."""

from __future__ import annotations

import argparse
from pathlib import Path

from parity.cli.options import CaptureOptions, GlobalOptions
from parity.cli.train import TrainOptions


def register(subparsers) -> None:
    parser = subparsers.add_parser("dump", help="capture a reference dump from ultralytics")
    CaptureOptions.add(parser)
    parser.add_argument("--out", help="output directory (default reference_dumps/<config>)")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    parser.add_argument("--summary", action="store_true", help="print the inspect summary afterwards")
    parser.add_argument("--stats-only", action="store_true",
                        help="keep per-tensor statistics and checksums instead of values (for very large runs)")
    TrainOptions.add_steps(parser)
    parser.set_defaults(func=cmd_dump)


def cmd_dump(args: argparse.Namespace) -> int:
    from rich.console import Console

    from parity.capture import default_dump_dir, dump_reference
    from parity.progress import steps
    from parity.runtime import check_device

    config = CaptureOptions.config(args, steps=args.steps, train=TrainOptions.train_args(args))
    check_device(config.device)
    out = Path(args.out) if args.out else default_dump_dir(config)
    title = f"dumping {config.model}" + (f", {config.steps} steps" if config.steps else "")
    with steps(GlobalOptions.progress(args), 4 + len(config.cases) + config.steps, title) as advance:
        path = dump_reference(config, out, force=args.force, stats_only=args.stats_only, progress=advance)
    if config.steps:
        Console().print(f"[green]reference dump with {config.steps} training steps written[/green] to {path}")
        return 0
    Console(stderr=False).print(f"[green]reference dump written[/green] to {path}")
    if args.summary:
        from parity.cli.inspect import inspect_dump

        return inspect_dump(path, verify=False)
    return 0
