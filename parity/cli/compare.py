"""`parity compare` and `parity map`: resolve the reference and candidate, run the replays, report."""

from __future__ import annotations

from pathlib import Path

from parity.errors import ParityError


def resolve_reference(args):
    """The reference dump: `--reference`, or the default dump directory for the capture options given."""
    from parity.cli.main import default_dump_dir
    from parity.dump.files import Dump

    path = Path(args.reference) if args.reference else default_dump_dir(args)
    if not (path / "manifest.json").exists():
        hint = "run `make dump-reference` (or `parity dump`) with the same options first" if not args.reference else \
            "a reference dump is a directory holding manifest.json"
        raise ParityError(f"no reference dump at {path}: {hint}")
    return Dump(path)


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


def run_compare(args) -> int:
    """`parity compare`: the flags become a `parity.api.CompareConfig`; the public API does the work."""
    from parity.api import run, write_reports
    from parity.report.text import render

    if args.list_injections:
        return list_injections()
    from parity.runtime import check_device

    check_device(args.device)
    reference = resolve_reference(args)
    _check_two_dumps(args)
    files = report_files(args)
    report = run(reference, args.candidate, compare_config(args))
    render(report, verbose=args.layer is not None and report.command.startswith("compare --what"))
    write_reports(report, files)
    return report.exit_code


def compare_config(args):
    """The typed configuration `parity compare`'s flags stand for."""
    from parity.api import CompareConfig

    return CompareConfig(what=args.what, profile=args.profile, layer=args.layer, mode=args.mode, inject=args.inject,
                         map_file=args.map_file, loss=args.loss_candidate, device=args.device,
                         streamed=args.streamed, stats_only=args.stats_only, old_reference=args.old_reference,
                         progress=not args.no_progress, histograms=getattr(args, "html", None) is not None)


def _check_two_dumps(args) -> None:
    """The library says the same, in its own words; the CLI names its flags."""
    from parity.dump.files import MANIFEST

    if (args.streamed or args.stats_only) and not (Path(str(args.candidate)) / MANIFEST).exists():
        flag = "--stats-only" if args.stats_only else "--streamed"
        raise ParityError(f"{flag} compares two dumps: --candidate must be a dump directory (holding {MANIFEST}), "
                          f"not {args.candidate!r}")


# ------------------------------------------------------------------------------------ report outputs
GITHUB_SUMMARY_FROM_ENV = "$GITHUB_STEP_SUMMARY"


def add_report_output_options(parser) -> None:
    """`--html`, `--junit`, `--github-summary` on `parity compare` (`--json` is defined beside the others)."""
    parser.add_argument("--html", metavar="FILE",
                        help="also write the report as one self-contained HTML file (charts, drill-down; no network)")
    parser.add_argument("--junit", metavar="FILE",
                        help="also write JUnit XML: one test case per check section, failing rows as failures")
    parser.add_argument("--github-summary", nargs="?", const=GITHUB_SUMMARY_FROM_ENV, metavar="FILE",
                        help="append a markdown summary for a GitHub Actions job summary (without FILE: the file "
                             "$GITHUB_STEP_SUMMARY names)")


def report_files(args):
    """The files the flags ask for, checked before any work is done."""
    import os

    from parity.api import ReportFiles

    summary = getattr(args, "github_summary", None)
    if summary == GITHUB_SUMMARY_FROM_ENV:
        summary = os.environ.get("GITHUB_STEP_SUMMARY")
        if not summary:
            raise ParityError("--github-summary without FILE writes to $GITHUB_STEP_SUMMARY, which is not set "
                              "(GitHub Actions sets it inside a job): give a FILE")
    return ReportFiles(json=args.json_out, html=getattr(args, "html", None), junit=getattr(args, "junit", None),
                       github_summary=summary)


def _split_injection(inject: str | None) -> tuple[str | None, str | None]:
    """A bug name belongs to the model or to the loss; each replay gets only its own."""
    if not inject:
        return None, None
    from parity.causes import get

    try:
        kind = get(inject).kind
    except KeyError as error:
        raise ParityError(str(error.args[0])) from None
    try:  # a release mode such as `as-of-8.3` has a model half and a loss half (`as-of-8.3-loss`)
        loss_half = inject + "-loss" if get(inject + "-loss").kind == "loss" and kind == "model" else None
    except KeyError:
        loss_half = None
    return (inject, loss_half) if kind == "model" else (None, inject)


def run_map(args) -> int:
    import time

    from rich.console import Console

    from parity.replay.candidates import load_candidate
    from parity.runtime import check_device

    check_device(args.device)
    reference = resolve_reference(args)
    started = time.perf_counter()
    candidate = load_candidate(args.candidate, reference, map_file=args.map_file)
    findings = candidate.prepare(reference)
    mapping = getattr(candidate, "mapping", None)
    console = Console()
    if mapping is None:
        console.print(f"candidate {candidate.label} has no parameters to map (a dump candidate is compared by name)")
        return 0
    inference = getattr(candidate, "inference", None)
    if inference is not None:
        types = {e["index"]: e.get("type") for e in reference.layers}
        console.print(f"layers inferred from one traced forward ({len(inference.layers)} of {len(types)}):",
                      highlight=False)
        for index, layer in sorted(inference.layers.items()):
            how = ("module" if layer.kind == "module" else
                   "one call of a parameterless module" if layer.module_call else "an operation in a parent's forward")
            call = f", called with {layer.arity} positional tensors" if layer.call == "positional" else ""
            console.print(f"  {index:>3} {types.get(index, '?'):<9} {layer.describe()} ({how}{call})",
                          highlight=False)
        for problem in inference.problems:
            console.print(f"  [yellow]{problem.index:>3} not inferred[/yellow]: {problem.message}. Fix: {problem.fix}",
                          highlight=False)
    console.print(mapping.describe(verbose=True), highlight=False)
    for finding in findings:
        style = {"error": "red", "warning": "yellow"}.get(finding.severity, "cyan")
        console.print(f"[{style}]{finding.signature}[/{style}] {finding.where}: {finding.message}", highlight=False)
    console.print(f"mapped in {time.perf_counter() - started:.1f} s", highlight=False)
    return 1 if any(f.severity == "error" for f in findings) else 0
