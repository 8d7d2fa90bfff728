"""`parity` command line: dump, inspect, compare, map, export-layer, check-layer, envelope, drift.

Exit codes: 0 parity (or success), 1 divergence found, 2 bad input, 3 internal error (a bug: one line on the
terminal, the traceback in a file under runs/crashes/). No traceback ever reaches the terminal.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path

from parity.cli.compare import add_report_output_options
from parity.errors import ParityError
from parity.cli.options import UsageError, validate_numbers
from parity.runtime import PROJECT_ROOT, prepare

EXIT_INTERNAL_ERROR = 3
CRASH_DIR = PROJECT_ROOT / "runs" / "crashes"


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a usage error raised as exit-2 bad input (one line) instead of printed and exited on."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")

DEFAULTS = dict(model="yolo11n.yaml", nc=80, imgsz=640, batch=2, seed=0, device="cpu", images="assets",
                init="perturbed", precision="fp32")


def default_dump_dir(args: argparse.Namespace) -> Path:
    model = Path(args.model).stem
    return PROJECT_ROOT / "reference_dumps" / (
        f"{model}-nc{args.nc}-{args.imgsz}-b{args.batch}-s{args.seed}-{Path(args.images).name}-{args.init}-"
        f"{args.device.replace(':', '')}"
    )


# ------------------------------------------------------------------------------------------- progress
@contextmanager
def step_progress(enabled: bool, total: int, title: str):
    """A progress bar that advances one step per call of the yielded function; silent when disabled."""
    if not enabled:
        yield lambda step: None
        return
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[step]}"),
                  TimeElapsedColumn(), transient=True, stderr=True) as bar:
        task = bar.add_task(title, total=total, step="")
        started = [False]

        def advance(step: str) -> None:
            if started[0]:
                bar.advance(task)
            started[0] = True
            bar.update(task, step=step)

        yield advance
        bar.update(task, completed=total)


def progress_enabled(args) -> bool:
    return not getattr(args, "no_progress", False) and sys.stderr.isatty()


# ---------------------------------------------------------------------------------------------- dump
def cmd_dump(args) -> int:
    from rich.console import Console

    from parity.capture import CaptureConfig, dump_reference
    from parity.runtime import check_device

    check_device(args.device)
    out = Path(args.out) if args.out else default_dump_dir(args)
    config = CaptureConfig(model=args.model, nc=args.nc, imgsz=args.imgsz, batch=args.batch, seed=args.seed,
                           device=args.device, images=args.images, init=args.init, precision=args.precision)
    steps = 4 + len(config.cases)
    with step_progress(progress_enabled(args), steps, f"dumping {config.model}") as advance:
        path = dump_reference(config, out, force=args.force, stats_only=args.stats_only, progress=advance)
    Console(stderr=False).print(f"[green]reference dump written[/green] to {path}")
    if args.summary:
        return cmd_inspect(argparse.Namespace(dump=str(path), verify=False))
    return 0


# -------------------------------------------------------------------------------------------- inspect
def cmd_inspect(args) -> int:
    from parity.dump.files import Dump
    from parity.dump.inspect import render_inspect

    dump = Dump(args.dump)
    if args.verify:
        bad = dump.verify()
        if bad:
            raise ParityError(f"{len(bad)} tensor(s) do not match their checksum, first: {bad[0]}")
    render_inspect(dump)
    return 0


# -------------------------------------------------------------------------------------------- compare
def cmd_compare(args) -> int:
    from parity.cli.compare import run_compare

    return run_compare(args)


def cmd_map(args) -> int:
    from parity.cli.compare import run_map

    return run_map(args)


def _add_capture_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULTS["model"], help="ultralytics model yaml (default %(default)s)")
    parser.add_argument("--nc", type=int, default=DEFAULTS["nc"], help="number of classes (default %(default)s)")
    parser.add_argument("--imgsz", type=int, default=DEFAULTS["imgsz"], help="image size (default %(default)s)")
    parser.add_argument("--batch", type=int, default=DEFAULTS["batch"], help="batch size (default %(default)s)")
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="seed for weights and data")
    parser.add_argument("--device", default=DEFAULTS["device"], help="cpu, cuda or cuda:N")
    parser.add_argument("--images", default=DEFAULTS["images"],
                        help="'assets' (bus.jpg, zidane.jpg), 'synthetic', or a folder of images with YOLO .txt labels")
    parser.add_argument("--init", default=DEFAULTS["init"], choices=("perturbed", "pristine"),
                        help="perturbed: BatchNorm perturbed and calibrated so every layer carries signal")
    parser.add_argument("--precision", default=DEFAULTS["precision"], choices=("fp32", "tf32", "fp16", "bf16"))


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="parity", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 2, recorded in dumps)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--no-verify", action="store_true",
                        help="do not check tensors against their manifest checksums as they are read (the report "
                             "says so)")
    sub = parser.add_subparsers(dest="command", required=True)
    # The global options are accepted after the command too; SUPPRESS keeps a sub-parser from resetting them.
    common = ArgumentParser(add_help=False)
    common.add_argument("--threads", type=int, default=argparse.SUPPRESS)
    common.add_argument("--no-progress", action="store_true", default=argparse.SUPPRESS)
    common.add_argument("--no-verify", action="store_true", default=argparse.SUPPRESS)
    original_add_parser = sub.add_parser
    sub.add_parser = lambda *a, **k: original_add_parser(*a, parents=[common, *k.pop("parents", [])], **k)

    dump = sub.add_parser("dump", help="capture a reference dump from ultralytics")
    _add_capture_options(dump)
    dump.add_argument("--out", help="output directory (default reference_dumps/<config>)")
    dump.add_argument("--force", action="store_true", help="replace an existing output directory")
    dump.add_argument("--summary", action="store_true", help="print the inspect summary afterwards")
    dump.add_argument("--stats-only", action="store_true",
                      help="keep per-tensor statistics and checksums instead of values (for very large runs)")
    dump.set_defaults(func=cmd_dump)

    inspect = sub.add_parser("inspect", help="summarise a dump: layers, shapes, parameters, loss terms")
    inspect.add_argument("dump")
    inspect.add_argument("--verify", action="store_true", help="also check every tensor's checksum")
    inspect.set_defaults(func=cmd_inspect)

    compare = sub.add_parser("compare", help="compare a candidate against a reference dump")
    compare.add_argument("--reference", help="reference dump (default: the default dump for the options below)")
    compare.add_argument("--candidate", default="builtin",
                         help="builtin, package.module:factory (a PyTorch port: docs/model-adapter.md), or a "
                              "candidate dump directory")
    compare.add_argument("--what", default="all", choices=("layers", "loss", "all"))
    compare.add_argument("--layer", type=int, help="drill into one layer's sub-blocks (e.g. 23, the Detect head)")
    compare.add_argument("--inject", help="plant a known bug in the built-in candidate (see --list-injections)")
    compare.add_argument("--list-injections", action="store_true", help="list the known bugs and exit")
    compare.add_argument("--map", dest="map_file", help="YAML/JSON key map for a user candidate")
    compare.add_argument("--loss", dest="loss_candidate", help="candidate loss: builtin or package.module:factory")
    compare.add_argument("--profile", help="tolerance profile (default: from device and precision)")
    compare.add_argument("--mode", choices=("isolated", "chained", "both"), default="both")
    compare.add_argument("--json", dest="json_out", help="also write the report as JSON here")
    compare.add_argument("--streamed", action="store_true",
                         help="with a candidate dump: judge every tensor the two dumps share, one pair in memory at a "
                              "time (memory stays about one tensor pair, whatever the dump size; no replay)")
    compare.add_argument("--stats-only", action="store_true",
                         help="with a candidate dump: judge per-tensor statistics and checksums only (automatic when "
                              "either dump was written with --stats-only); the report lists what this cannot show")
    compare.add_argument("--old-reference", help="a reference dump from an older ultralytics release: what the "
                                                 "candidate matches there is reported as version drift, not a bug")
    add_report_output_options(compare)
    _add_capture_options(compare)
    compare.set_defaults(func=cmd_compare)

    mapping = sub.add_parser("map", help="print how a candidate's parameters map onto ultralytics' names")
    mapping.add_argument("--reference", help="reference dump")
    mapping.add_argument("--candidate", default="builtin")
    mapping.add_argument("--map", dest="map_file")
    _add_capture_options(mapping)
    mapping.set_defaults(func=cmd_map)

    from parity.cli.train import add_train_options  # dump --steps, compare --what train, overfit

    add_train_options(sub, dump=dump, compare=compare)
    _add_optional_commands(sub)
    return parser


def _add_optional_commands(sub) -> None:
    """Commands whose modules register their own arguments (porting harness, envelopes, drift)."""
    for module_name in ("parity.cli.porting", "parity.compare.envelope", "parity.drift", "parity.replay.scaffold"):
        try:
            module = __import__(module_name, fromlist=["register"])
        except ImportError:
            continue
        module.register(sub)


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code (0 parity/success, 1 divergence, 2 bad input, 3 internal error)."""
    try:
        args = build_parser().parse_args(argv)
        validate_numbers(vars(args))
        prepare(args.threads)
        from parity.dump.files import verify_reads

        with verify_reads(not getattr(args, "no_verify", False)):
            return int(args.func(args) or 0)
    except ParityError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit as exit_:  # --help, --version
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    except Exception as error:  # noqa: BLE001 - anything else is a bug in the tool: report it, never show it raw
        return report_internal_error(error, argv)


def report_internal_error(error: BaseException, argv: list[str] | None) -> int:
    """One line on stderr; the traceback in runs/crashes/ (or the temp directory when runs/ is not writable)."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    text = (f"parity {' '.join(sys.argv[1:] if argv is None else argv)}\n"
            + "".join(traceback.format_exception(type(error), error, error.__traceback__)))
    path = None
    for folder in (CRASH_DIR, Path(os.environ.get("TMPDIR", "/tmp"))):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"crash-{stamp}-{os.getpid()}.txt"
            path.write_text(text)
            break
        except OSError:
            path = None
    where = f"traceback in {path}" if path else "the traceback could not be written"
    summary = " ".join(f"{type(error).__name__}: {error}".split())[:200]
    print(f"internal error (a bug in yolo-parity, not in your input): {summary}; {where}; please report it with "
          f"that file", file=sys.stderr)
    return EXIT_INTERNAL_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
