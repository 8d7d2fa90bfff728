"""`parity envelope`: measure the reference's noise envelope (parity/compare/envelope.py), or show a stored one."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from parity.cli.options import CAPTURE_DEFAULTS, GlobalOptions
from parity.errors import OutputExists, ParityError

if TYPE_CHECKING:
    from parity.compare.envelope import EnvelopeConfig


class EnvelopeOptions:
    """The model, weights and batch to capture, and which harmless changes to measure."""

    @staticmethod
    def add(parser: argparse.ArgumentParser) -> None:
        d = CAPTURE_DEFAULTS
        parser.add_argument("--model", default=d["model"])
        parser.add_argument("--nc", type=int, default=d["nc"])
        parser.add_argument("--imgsz", type=int, default=d["imgsz"])
        parser.add_argument("--batch", type=int, default=d["batch"])
        parser.add_argument("--seed", type=int, default=d["seed"])
        parser.add_argument("--images", default=d["images"])
        parser.add_argument("--init", default=d["init"], choices=("perturbed", "pristine"))
        parser.add_argument("--device", default="auto",
                            help="auto (CUDA runs where CUDA exists, recorded as skipped otherwise), cpu, cuda, "
                                 "cuda:N (cuda without a CUDA device is an error)")
        parser.add_argument("--threads-list", type=int, nargs="+", default=[1, 2, 4],
                            help="CPU thread counts to compare (2 is the baseline)")
        parser.add_argument("--no-float64", action="store_true", help="leave out the float64 shadow run")
        parser.add_argument("--name", help="name stored in the file (default: the file name)")
        parser.add_argument("--out", help="output JSON (default envelopes/{cpu|cuda}-{model}-{imgsz}.json)")
        parser.add_argument("--force", action="store_true", help="replace an existing file")

    @staticmethod
    def config(args: argparse.Namespace) -> "EnvelopeConfig":
        from parity.capture import CaptureConfig
        from parity.compare.envelope import EnvelopeConfig

        capture = CaptureConfig(model=args.model, nc=args.nc, imgsz=args.imgsz, batch=args.batch, seed=args.seed,
                                images=args.images, init=args.init)
        return EnvelopeConfig(capture=capture, device=args.device, threads=tuple(args.threads_list),
                              float64=not args.no_float64, name=args.name, out=args.out, force=args.force)

    @staticmethod
    def command_line(config: "EnvelopeConfig") -> str:
        """The `parity envelope` command that measures `config` (stored in the envelope file)."""
        c = config.capture
        parts = ["parity envelope", f"--model {c.model}", f"--nc {c.nc}", f"--imgsz {c.imgsz}",
                 f"--batch {c.batch}", f"--seed {c.seed}", f"--images {c.images}", f"--init {c.init}",
                 f"--device {config.device}", "--threads-list " + " ".join(map(str, config.threads))]
        if not config.float64:
            parts.append("--no-float64")
        return " ".join(parts)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "envelope", help="measure the reference's noise envelope (itself under harmless changes)",
        description="Capture the reference several times under harmless changes (threads, float64 shadow, and "
                    "where CUDA exists CPU/CUDA, TF32, deterministic) and store the error levels per tensor, "
                    "layer, loss stage and gradient group.")
    EnvelopeOptions.add(parser)
    parser.add_argument("--show", metavar="FILE", help="print the summary of an existing envelope file and exit")
    parser.set_defaults(func=cmd_envelope)


def cmd_envelope(args: argparse.Namespace) -> int:
    if args.show:
        return cmd_envelope_show(Path(args.show))
    from rich.console import Console

    from parity.compare.envelope import plan_envelope, summary_table, write_envelope

    config = EnvelopeOptions.config(args)
    try:
        plan, out = plan_envelope(config)
    except OutputExists as error:
        raise ParityError(f"{error.path} exists; pass --force to replace it") from None
    console = Console(stderr=True)
    for skip in plan.skipped:
        console.print(f"[yellow]skipped[/yellow] {skip['run']}: {skip['reason']}", highlight=False)
    log = (lambda line: console.print(line, highlight=False)) if GlobalOptions.progress(args) else (lambda line: None)
    document = write_envelope(config, plan, out, command=EnvelopeOptions.command_line(config), log=log)
    Console().print(f"[green]envelope written[/green] to {out} ({out.stat().st_size / 1e3:.0f} kB)")
    Console().print(summary_table(document))
    return 0


def cmd_envelope_show(path: Path) -> int:
    from rich.console import Console

    from parity.compare.envelope import Envelope, read_envelope_file, summary_table

    document = read_envelope_file(path)
    console = Console()
    console.print(summary_table(document))
    for key in document["pairs"]:
        console.print(f"{key}: {Envelope(document, key, path.resolve()).citation()}", highlight=False)
    for skip in document.get("skipped", []):
        console.print(f"skipped {skip['run']}: {skip['reason']}", highlight=False)
    return 0
