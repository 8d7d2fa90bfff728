"""`parity compare`: the flags become a `parity.api.CompareConfig` and `ReportFiles`; the public API does the work.

`--what train` is the training-step comparison (parity/cli/train.py).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from parity.cli import train
from parity.cli.options import CaptureOptions, GlobalOptions
from parity.errors import ParityError

if TYPE_CHECKING:
    from parity.api import CompareConfig, ReportFiles
    from parity.capture import CaptureConfig

GITHUB_SUMMARY_FROM_ENV = "$GITHUB_STEP_SUMMARY"


# ------------------------------------------------------------------------------------------- options
class CompareOptions:
    """What is compared and how: everything a `CompareConfig` holds."""

    @staticmethod
    def add(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--reference", help="reference dump (default: the default dump for the options below)")
        parser.add_argument("--candidate", default="builtin",
                            help="builtin, package.module:factory (a PyTorch port: docs/model-adapter.md), or a "
                                 "candidate dump directory")
        parser.add_argument("--what", default="all", choices=("layers", "loss", "all", "train"))
        parser.add_argument("--layer", type=int, help="drill into one layer's sub-blocks (e.g. 23, the Detect head)")
        parser.add_argument("--inject", help="plant a known bug in the built-in candidate (see --list-injections)")
        parser.add_argument("--list-injections", action="store_true", help="list the known bugs and exit")
        parser.add_argument("--map", dest="map_file", help="YAML/JSON key map for a user candidate")
        parser.add_argument("--loss", dest="loss_candidate", help="candidate loss: builtin or package.module:factory")
        parser.add_argument("--profile", help="tolerance profile (default: from device and precision)")
        parser.add_argument("--mode", choices=("isolated", "chained", "both"), default="both")
        parser.add_argument("--json", dest="json_out", help="also write the report as JSON here")
        parser.add_argument("--streamed", action="store_true",
                            help="with a candidate dump: judge every tensor the two dumps share, one pair in memory "
                                 "at a time (memory stays about one tensor pair, whatever the dump size; no replay)")
        parser.add_argument("--stats-only", action="store_true",
                            help="with a candidate dump: judge per-tensor statistics and checksums only (automatic "
                                 "when either dump was written with --stats-only); the report lists what this "
                                 "cannot show")
        parser.add_argument("--old-reference", help="a reference dump from an older ultralytics release: what the "
                                                    "candidate matches there is reported as version drift, not a bug")

    @staticmethod
    def config(args: argparse.Namespace) -> "CompareConfig":
        from parity.api import CompareConfig

        return CompareConfig(what=args.what, profile=args.profile, layer=args.layer, mode=args.mode,
                             inject=args.inject, map_file=args.map_file, loss=args.loss_candidate,
                             device=args.device, streamed=args.streamed, stats_only=args.stats_only,
                             old_reference=args.old_reference, progress=GlobalOptions.progress(args),
                             histograms=getattr(args, "html", None) is not None)


class ReportOutputOptions:
    """`--html`, `--junit`, `--github-summary` (`--json` is defined beside the other compare options)."""

    @staticmethod
    def add(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--html", metavar="FILE",
                            help="also write the report as one self-contained HTML file (charts, drill-down; no "
                                 "network)")
        parser.add_argument("--junit", metavar="FILE",
                            help="also write JUnit XML: one test case per check section, failing rows as failures")
        parser.add_argument("--github-summary", nargs="?", const=GITHUB_SUMMARY_FROM_ENV, metavar="FILE",
                            help="append a markdown summary for a GitHub Actions job summary (without FILE: the "
                                 "file $GITHUB_STEP_SUMMARY names)")

    @staticmethod
    def files(args: argparse.Namespace) -> "ReportFiles":
        """The files the flags ask for, checked before any work is done."""
        from parity.api import ReportFiles

        summary = getattr(args, "github_summary", None)
        if summary == GITHUB_SUMMARY_FROM_ENV:
            summary = os.environ.get("GITHUB_STEP_SUMMARY")
            if not summary:
                raise ParityError("--github-summary without FILE writes to $GITHUB_STEP_SUMMARY, which is not set "
                                  "(GitHub Actions sets it inside a job): give a FILE")
        return ReportFiles(json=args.json_out, html=getattr(args, "html", None), junit=getattr(args, "junit", None),
                           github_summary=summary)


def compare_config(args: argparse.Namespace) -> "CompareConfig":
    """The typed configuration `parity compare`'s flags stand for."""
    return CompareOptions.config(args)


def report_files(args: argparse.Namespace) -> "ReportFiles":
    """The report files `parity compare`'s flags ask for."""
    return ReportOutputOptions.files(args)


def register(subparsers) -> None:
    parser = subparsers.add_parser("compare", help="compare a candidate against a reference dump")
    CompareOptions.add(parser)
    ReportOutputOptions.add(parser)
    CaptureOptions.add(parser)
    train.TrainOptions.add_candidate(parser)
    parser.set_defaults(func=cmd_compare)


# ------------------------------------------------------------------------------------------- command
def cmd_compare(args: argparse.Namespace) -> int:
    if args.what == "train":
        return train.run_train_compare(args)
    if args.list_injections:
        return list_injections()
    from parity.api import run, write_reports
    from parity.report.text import render
    from parity.runtime import check_device

    check_device(args.device)
    reference = resolve_reference(args.reference, CaptureOptions.config(args))
    _check_two_dumps(args)
    files = ReportOutputOptions.files(args)
    report = run(reference, args.candidate, CompareOptions.config(args))
    render(report, verbose=args.layer is not None and report.command.startswith("compare --what"))
    write_reports(report, files)
    return report.exit_code


def resolve_reference(reference: str | None, capture: "CaptureConfig"):
    """The reference dump: the one named, or the default dump directory of the capture configuration."""
    from parity.capture import default_dump_dir
    from parity.dump.files import MANIFEST, Dump

    path = Path(reference) if reference else default_dump_dir(capture)
    if not (path / MANIFEST).exists():
        hint = "run `make dump-reference` (or `parity dump`) with the same options first" if not reference else \
            "a reference dump is a directory holding manifest.json"
        raise ParityError(f"no reference dump at {path}: {hint}")
    return Dump(path)


def _check_two_dumps(args: argparse.Namespace) -> None:
    """The library says the same, in its own words; the CLI names its flags."""
    from parity.dump.files import MANIFEST

    if (args.streamed or args.stats_only) and not (Path(str(args.candidate)) / MANIFEST).exists():
        flag = "--stats-only" if args.stats_only else "--streamed"
        raise ParityError(f"{flag} compares two dumps: --candidate must be a dump directory (holding {MANIFEST}), "
                          f"not {args.candidate!r}")


def list_injections() -> int:
    from rich.console import Console
    from rich.table import Table

    from parity.causes import all_injections

    table = Table(title="known causes the built-in candidate can plant (--inject NAME)")
    table.add_column("name", no_wrap=True)
    table.add_column("where")
    table.add_column("what it does (the cause it plants)")
    for injection in all_injections().values():
        named = "" if injection.cause == injection.name else f" (`{injection.cause}`)"
        table.add_row(injection.name, injection.kind, injection.description + named)
    Console().print(table)
    return 0
