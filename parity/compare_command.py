"""`parity compare` and `parity map`: resolve the reference and candidate, run the replays, report."""

from __future__ import annotations

from pathlib import Path

from parity.errors import ParityError
from parity.report import Report


def resolve_reference(args):
    """The reference dump: `--reference`, or the default dump directory for the capture options given."""
    from parity.cli import default_dump_dir
    from parity.dumpfile import Dump

    path = Path(args.reference) if args.reference else default_dump_dir(args)
    if not (path / "manifest.json").exists():
        hint = "run `make dump-reference` (or `parity dump`) with the same options first" if not args.reference else \
            "a reference dump is a directory holding manifest.json"
        raise ParityError(f"no reference dump at {path}: {hint}")
    return Dump(path)


def list_injections() -> int:
    from rich.console import Console
    from rich.table import Table

    from parity.reimpl.inject import all_injections

    table = Table(title="known bugs the built-in candidate can plant (--inject NAME)")
    table.add_column("name")
    table.add_column("where")
    table.add_column("what it does")
    for injection in all_injections().values():
        table.add_row(injection.name, injection.kind, injection.description)
    Console().print(table)
    return 0


def run_compare(args) -> int:
    from parity.render import render, to_json

    if args.list_injections:
        return list_injections()
    from parity.runtime import check_device

    check_device(args.device)
    reference = resolve_reference(args)
    progress = not args.no_progress
    modes = ("isolated", "chained") if args.mode == "both" else (args.mode,)
    report: Report | None = None
    inject = args.inject
    model_inject, loss_inject = _split_injection(inject)

    if args.what in ("layers", "all"):
        from parity.replay.layers import compare_layers

        report = compare_layers(reference, args.candidate, profile=args.profile, layer=args.layer, modes=modes,
                                progress=progress, inject=model_inject, map_file=args.map_file, device=args.device)
    if args.what in ("loss", "all"):
        if not reference.manifest.get("loss", {}).get("cases"):
            if args.what == "loss":
                raise ParityError(f"{reference.path} holds no loss tensors; the loss cannot be compared")
        else:
            from parity.replay.loss import compare_loss

            loss_candidate = args.loss_candidate or "builtin"
            if not Path(str(args.candidate)).is_dir() or args.loss_candidate:
                loss_report = compare_loss(reference, loss_candidate, profile=args.profile, progress=progress,
                                           inject=loss_inject)
            else:
                loss_report = compare_loss(reference, args.candidate, profile=args.profile, progress=progress)
            report = loss_report if report is None else report.merge(loss_report)
            if args.what == "all":
                report.command = "compare --what all"
    assert report is not None
    render(report, verbose=args.layer is not None)
    if args.json_out:
        to_json(report, args.json_out)
    return report.exit_code


def _split_injection(inject: str | None) -> tuple[str | None, str | None]:
    """A bug name belongs to the model or to the loss; each replay gets only its own."""
    if not inject:
        return None, None
    from parity.reimpl.inject import get

    try:
        kind = get(inject).kind
    except KeyError as error:
        raise ParityError(str(error.args[0])) from None
    return (inject, None) if kind == "model" else (None, inject)


def run_map(args) -> int:
    from rich.console import Console

    from parity.candidates import load_candidate

    reference = resolve_reference(args)
    candidate = load_candidate(args.candidate, reference, map_file=args.map_file)
    findings = candidate.prepare(reference)
    mapping = getattr(candidate, "mapping", None)
    console = Console()
    if mapping is None:
        console.print(f"candidate {candidate.label} has no parameters to map (a dump candidate is compared by name)")
        return 0
    console.print(mapping.describe(verbose=True), highlight=False)
    for finding in findings:
        console.print(f"[red]{finding.signature}[/red] {finding.where}: {finding.message}", highlight=False)
    return 1 if any(f.severity == "error" for f in findings) else 0
