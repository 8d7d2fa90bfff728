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
    whole_dump = _dump_against_dump(reference, args)
    if whole_dump is not None:
        render(whole_dump)
        if args.json_out:
            to_json(whole_dump, args.json_out)
        return whole_dump.exit_code
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
    if args.old_reference:
        explain_version_drift(report, reference, args, modes, model_inject, loss_inject)
    render(report, verbose=args.layer is not None)
    if args.json_out:
        to_json(report, args.json_out)
    return report.exit_code


def _dump_against_dump(reference, args) -> Report | None:
    """Tensor-by-tensor comparison of two whole dumps, when asked for (`--streamed`, `--stats-only`) or when
    either dump is statistics-only (it has no values to replay). None: run the layer and loss replays."""
    from parity.dumpfile import MANIFEST, Dump

    candidate_path = Path(str(args.candidate))
    is_dump = (candidate_path / MANIFEST).exists()
    wanted = args.streamed or args.stats_only
    if wanted and not is_dump:
        flag = "--stats-only" if args.stats_only else "--streamed"
        raise ParityError(f"{flag} compares two dumps: --candidate must be a dump directory (holding {MANIFEST}), "
                          f"not {args.candidate!r}")
    if not is_dump:
        return None
    candidate = Dump(candidate_path)
    if args.stats_only or reference.stats_only or candidate.stats_only:
        from parity.compare.stats import compare_stats

        return compare_stats(reference, candidate, profile=args.profile)
    if args.streamed:
        from parity.cli import progress_enabled, step_progress
        from parity.compare.stream import compare_dumps

        shared = len(set(reference.names()) & set(candidate.names()))
        with step_progress(progress_enabled(args), shared, "comparing dumps") as advance:
            return compare_dumps(reference, candidate, profile=args.profile, progress=advance)
    return None


def _rows_by_key(report: Report) -> dict[tuple[str, str], dict]:
    """The first compared row of each (section, tensor) as metrics: a loss tensor is judged twice, once in its
    stage on the reference's inputs and once end to end, and the two can disagree."""
    rows = {}
    for row in report.rows:
        if row.metrics is not None and (row.section, row.name) not in rows:
            rows[(row.section, row.name)] = {**row.metrics, "passed": row.passed}
    return rows


def explain_version_drift(report: Report, reference, args, modes, model_inject, loss_inject) -> None:
    """Run the same comparison against an older reference: what matches it is release drift, not a bug.

    Rows that fail against the current reference but match the older one pass, with a note naming the
    release; error findings about those tensors become warnings; `version-drift` findings say why.
    """
    from parity.drift import explain
    from parity.dumpfile import Dump
    from parity.replay.loss import mark_drifted_stages

    old = Dump(args.old_reference)
    old_report = None
    if args.what in ("layers", "all"):
        from parity.replay.layers import compare_layers

        old_report = compare_layers(old, args.candidate, profile=args.profile, modes=modes, progress=False,
                                    inject=model_inject, map_file=args.map_file, device=args.device)
    if args.what in ("loss", "all") and old.manifest.get("loss", {}).get("cases"):
        from parity.replay.loss import compare_loss

        try:
            loss_report = compare_loss(old, args.loss_candidate or "builtin", profile=args.profile, progress=False,
                                       inject=loss_inject)
            old_report = loss_report if old_report is None else old_report.merge(loss_report)
        except ParityError as error:  # an older release's layout the loss replay cannot read (8.3 head lists)
            report.coverage.setdefault("not_checked", []).append(f"loss against {old.path}: {error}")
    if old_report is None:
        return
    versions = (report_versions(reference), report_versions(old))
    now, then = _rows_by_key(report), _rows_by_key(old_report)
    failing = [key for key, metrics in now.items() if not metrics["passed"] and key in then]
    # explain() reads one row per tensor: the first failing one, beside the old reference's row of that section
    first_failing = {}
    for key in failing:
        first_failing.setdefault(key[1], key)
    findings = explain({name: now[key] for name, key in first_failing.items()},
                       {name: then[key] for name, key in first_failing.items()},
                       current_version=versions[0], old_version=versions[1])
    named = {item["name"] for f in findings for item in f.evidence.get("tensors", [])}
    explained_keys = {key for key in failing if then[key]["passed"] or key[1] in named}
    explained = {name for _, name in explained_keys}
    for row in report.rows:
        if not row.passed and (row.section, row.name) in explained_keys:
            row.passed = True
            row.note = f"matches ultralytics {versions[1]} (version drift). " + row.note
    for finding in report.findings:
        mentioned = " ".join([finding.where, finding.message, str(finding.evidence)])
        if finding.severity == "error" and any(name in mentioned for name in explained):
            finding.severity = "warning"
            finding.message += f" [matches ultralytics {versions[1]}: release drift, not a port bug]"
    for finding in findings:
        report.find(finding)
    mark_drifted_stages(report)
    report.context["old_reference"] = {"path": str(old.path), "ultralytics": versions[1],
                                       "explained_tensors": sorted(explained)}


def report_versions(dump) -> str:
    return (dump.manifest.get("versions") or {}).get("ultralytics") or "unknown"


def _split_injection(inject: str | None) -> tuple[str | None, str | None]:
    """A bug name belongs to the model or to the loss; each replay gets only its own."""
    if not inject:
        return None, None
    from parity.reimpl.inject import get

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

    from parity.candidates import load_candidate
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
