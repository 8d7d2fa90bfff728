"""The public Python API (docs/python-api.md): what `parity compare` does, callable from a user's own code.

`compare` runs the layer replay, the loss replay, or a dump-against-dump comparison, exactly as the CLI does
(the CLI is a thin layer over this module: `parity.cli.compare.cmd_compare` turns its flags into a
`CompareConfig` and calls `run`). `assert_parity` is the `torch.testing.assert_close` of this project: one call
that raises an `AssertionError` saying where a port departs from ultralytics, and by how much.
"""

from __future__ import annotations

import os
import re
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from parity.errors import ParityError
from parity.findings import Finding, Report, Row
from parity.progress import steps
from parity.report.summary import headline, row_detail

WHATS = ("layers", "loss", "all")
MODES = ("both", "isolated", "chained")


@dataclass(frozen=True)
class CompareConfig:
    """Every choice a comparison makes, with the CLI's defaults (`parity compare --help`)."""

    what: str = "all"  # "layers", "loss" or "all"
    profile: str | None = None  # tolerance profile; None: from the reference's device and precision
    layer: int | None = None  # drill into one layer's sub-blocks
    mode: str = "both"  # "isolated", "chained" or "both"
    inject: str | None = None  # a known bug planted into the built-in candidate
    map_file: str | None = None  # YAML/JSON key map for a user candidate
    loss: Any = None  # the candidate loss: "builtin", "package.module:factory", a LossAdapter, a callable
    device: str = "cpu"
    streamed: bool = False  # two dumps: every shared tensor, one pair in memory at a time
    stats_only: bool = False  # two dumps: statistics and checksums only
    old_reference: str | None = None  # an older release's dump: what matches it is version drift
    progress: bool = False  # progress bars on stderr (only on a terminal)
    histograms: bool = False  # keep a histogram of the differences per compared tensor (the HTML drill-down)

    def __post_init__(self) -> None:
        if self.what not in WHATS:
            raise ParityError(f"what={self.what!r}: expected one of {', '.join(WHATS)}")
        if self.mode not in MODES:
            raise ParityError(f"mode={self.mode!r}: expected one of {', '.join(MODES)}")
        if self.layer is not None and (not isinstance(self.layer, int) or self.layer < 0):
            raise ParityError(f"layer={self.layer!r}: expected a layer index (an integer >= 0)")
        if self.streamed and self.stats_only:
            raise ParityError("streamed and stats_only are two ways of comparing two dumps: choose one")

    @property
    def modes(self) -> tuple[str, ...]:
        return ("isolated", "chained") if self.mode == "both" else (self.mode,)


@dataclass(frozen=True)
class ReportFiles:
    """Where a report is written besides the terminal; None: not written."""

    json: str | os.PathLike | None = None
    html: str | os.PathLike | None = None
    junit: str | os.PathLike | None = None
    github_summary: str | os.PathLike | None = None

    def paths(self) -> list[Path]:
        return [Path(p) for p in (self.json, self.html, self.junit, self.github_summary) if p is not None]


# ------------------------------------------------------------------------------------------- compare
def compare(reference, candidate: Any = "builtin", *, what: str = "all", profile: str | None = None,
            layer: int | None = None, mode: str = "both", inject: str | None = None, map_file: str | None = None,
            loss: Any = None, device: str = "cpu", streamed: bool = False, stats_only: bool = False,
            old_reference: str | None = None, progress: bool = False, histograms: bool = False) -> Report:
    """Compare `candidate` with the reference dump `reference` (a directory or a `Dump`). Returns a `Report`.

    candidate: "builtin", "package.module:factory", an `nn.Module` or a factory, or a candidate dump directory.
    Raises `ParityError` on bad input. The options are those of `parity compare` (see `CompareConfig`)."""
    config = CompareConfig(what=what, profile=profile, layer=layer, mode=mode, inject=inject, map_file=map_file,
                           loss=loss, device=device, streamed=streamed, stats_only=stats_only,
                           old_reference=old_reference, progress=progress, histograms=histograms)
    return run(reference, candidate, config)


def run(reference, candidate: Any, config: CompareConfig) -> Report:
    """`compare` with a ready `CompareConfig` (what the CLI calls)."""
    from parity.runtime import check_device

    check_device(config.device)
    reference = _open_dump(reference)
    from parity.compare.histogram import collecting

    with collecting() if config.histograms else nullcontext():
        report = _dump_against_dump(reference, candidate, config)
        if report is None:
            report = _replay(reference, candidate, config)
            if config.old_reference:
                explain_version_drift(report, reference, candidate, config)
            _explain(report, reference, candidate, config)
    _record_environment(report, reference, config)
    return report


def _explain(report: Report, reference, candidate: Any, config: CompareConfig) -> None:
    """Counterfactual diagnosis: at each divergent place, the known cause that turns the reference into the
    candidate (docs/causes.md). Does nothing on a passing report."""
    from parity.diagnose.explain import ExplainConfig, explain_report

    explain_report(report, reference, ExplainConfig(candidate=candidate, loss_candidate=config.loss,
                                                    inject=config.inject, profile=config.profile,
                                                    map_file=config.map_file, device=config.device))


def compare_layers(reference, candidate: Any = "builtin", *, profile: str | None = None, layer: int | None = None,
                   mode: str = "both", inject: str | None = None, map_file: str | None = None, device: str = "cpu",
                   progress: bool = False, histograms: bool = False) -> Report:
    """The layer replay only (`parity compare --what layers`)."""
    return compare(reference, candidate, what="layers", profile=profile, layer=layer, mode=mode, inject=inject,
                   map_file=map_file, device=device, progress=progress, histograms=histograms)


def compare_loss(reference, loss: Any = "builtin", *, profile: str | None = None, inject: str | None = None,
                 progress: bool = False, histograms: bool = False) -> Report:
    """The loss replay only (`parity compare --what loss --loss ...`): a loss factory, adapter, callable or a
    candidate dump holding the loss tensors a port recorded."""
    candidate = loss if _is_dump_dir(loss) else "builtin"
    return compare(reference, candidate, what="loss", profile=profile, inject=inject,
                   loss=None if _is_dump_dir(loss) else loss, progress=progress, histograms=histograms)


def dump_reference(out: str | os.PathLike, *, model: str = "yolo11n.yaml", nc: int = 80, imgsz: int = 640,
                   batch: int = 2, seed: int = 0, device: str = "cpu", images: str = "assets",
                   init: str = "perturbed", precision: str = "fp32", force: bool = False,
                   stats_only: bool = False, config=None) -> Path:
    """Run ultralytics once and write a reference dump to `out` (`parity dump`). Returns its path.

    `config` (a `parity.capture.CaptureConfig`) replaces the keyword options when given."""
    from parity.capture import CaptureConfig
    from parity.capture import dump_reference as write_dump
    from parity.runtime import check_device, prepare

    prepare()
    if config is None:
        config = CaptureConfig(model=model, nc=nc, imgsz=imgsz, batch=batch, seed=seed, device=device,
                               images=images, init=init, precision=precision)
    check_device(config.device)
    return write_dump(config, out, force=force, stats_only=stats_only)


# ---------------------------------------------------------------------------------------- assert_parity
def assert_parity(reference, candidate: Any = "builtin", *, what: str = "all", profile: str | None = None,
                  layer: int | None = None, mode: str = "both", inject: str | None = None,
                  map_file: str | None = None, loss: Any = None, device: str = "cpu",
                  report_dir: str | os.PathLike | None = None, html: bool = True,
                  name: str = "parity-report") -> Report:
    """Compare and raise an `AssertionError` when the candidate departs from the reference.

    The message's first line is the verdict and the first divergence, then one line per finding (signature,
    where, one sentence), and last the paths of the JSON (and HTML) report written to `report_dir` (a new
    temporary directory when None). Bad input raises `ParityError`. Returns the report when it passes."""
    __tracebackhide__ = True  # pytest shows the caller's line and this message, not this function
    report = compare(reference, candidate, what=what, profile=profile, layer=layer, mode=mode, inject=inject,
                     map_file=map_file, loss=loss, device=device, histograms=html)
    if report.verdict == "parity":
        return report
    directory = Path(report_dir) if report_dir is not None else Path(tempfile.mkdtemp(prefix="parity-"))
    files = ReportFiles(json=directory / f"{name}.json", html=directory / f"{name}.html" if html else None)
    write_reports(report, files)
    raise AssertionError(failure_message(report, files))


def failure_message(report: Report, files: ReportFiles | None = None, *, findings_shown: int = 12) -> str:
    """The text of `assert_parity`'s AssertionError (also what the pytest plugin prints): the verdict and the
    first divergence, one line per finding (errors first), the report files."""
    lines = [headline(report)]
    order = {"error": 0, "warning": 1, "info": 2}
    findings = sorted(report.findings, key=lambda f: order.get(f.severity, 3))
    for finding in findings[:findings_shown]:
        lines.append(f"  {finding.severity} {finding.signature} @ {finding.where}: {_sentence(finding.message)}")
    if len(findings) > findings_shown:
        lines.append(f"  ... {len(findings) - findings_shown} more finding(s) in the report")
    if not report.errors:
        for row in report.failed_rows[:5]:
            lines.append(f"  failed [{row.section}] {row.where} {row.name}: {_sentence(row_detail(row))}")
    for path in (files.paths() if files else []):
        lines.append(f"report: {path}")
    return "\n".join(lines)


def _sentence(text: str, width: int = 160) -> str:
    """The first sentence of a message, at most `width` characters."""
    text = " ".join(str(text).split())
    match = re.search(r"(?<=[a-z0-9)\]])\. (?=[A-Z(])", text)
    if match:
        text = text[: match.start() + 1]
    return text if len(text) <= width else text[: width - 1] + "…"


def write_reports(report: Report, files: ReportFiles) -> list[Path]:
    """Write the report to every file asked for; returns the paths written."""
    from parity.report.text import to_json

    written = []
    if files.json is not None:
        to_json(report, files.json)
        written.append(Path(files.json))
    if files.html is not None:
        from parity.report.html import write_html

        written.append(write_html(report, files.html))
    if files.junit is not None:
        from parity.report.junit import write_junit

        written.append(write_junit(report, files.junit))
    if files.github_summary is not None:
        from parity.report.junit import write_github_summary

        written.append(write_github_summary(report, files.github_summary))
    return written


# ------------------------------------------------------------------------------------------ the replays
def _open_dump(reference):
    from parity.dump.files import MANIFEST, Dump

    if isinstance(reference, Dump):
        return reference
    path = Path(reference)
    if not (path / MANIFEST).exists():
        raise ParityError(f"no reference dump at {path}: a reference dump is a directory holding {MANIFEST} "
                          f"(write one with parity.dump_reference or `parity dump`)")
    return Dump(path)


def _is_dump_dir(candidate: Any) -> bool:
    from parity.dump.files import MANIFEST, Dump

    if isinstance(candidate, Dump):
        return True
    return isinstance(candidate, (str, os.PathLike)) and (Path(candidate) / MANIFEST).exists()


def split_injection(inject: str | None) -> tuple[str | None, str | None]:
    """(model bug, loss bug): a bug name belongs to the model or to the loss, and each replay gets only its own;
    a release mode such as `as-of-8.3` has a model half and a loss half (`as-of-8.3-loss`)."""
    if not inject:
        return None, None
    from parity.causes import get

    try:
        kind = get(inject).kind
    except KeyError as error:
        raise ParityError(str(error.args[0])) from None
    try:
        loss_half = inject + "-loss" if get(inject + "-loss").kind == "loss" and kind == "model" else None
    except KeyError:
        loss_half = None
    return (inject, loss_half) if kind == "model" else (None, inject)


def _replay(reference, candidate: Any, config: CompareConfig) -> Report:
    model_inject, loss_inject = split_injection(config.inject)
    report: Report | None = None
    if config.what in ("layers", "all"):
        from parity.diagnose.layers import compare_layers as replay_layers

        report = replay_layers(reference, candidate, profile=config.profile, layer=config.layer,
                               modes=config.modes, progress=config.progress, inject=model_inject,
                               map_file=config.map_file, device=config.device)
    if config.what in ("loss", "all"):
        if not reference.manifest.get("loss", {}).get("cases"):
            if config.what == "loss":
                raise ParityError(f"{reference.path} holds no loss tensors; the loss cannot be compared")
        else:
            loss_report = _replay_loss(reference, candidate, config, loss_inject)
            report = loss_report if report is None else report.merge(loss_report)
            if config.what == "all":
                report.command = "compare --what all"
    assert report is not None
    return report


def _replay_loss(reference, candidate: Any, config: CompareConfig, loss_inject: str | None) -> Report:
    """A candidate dump's own recorded loss, unless a loss is named; otherwise the named loss or the built-in."""
    from parity.diagnose.loss import compare_loss as replay_loss

    if _is_dump_dir(candidate) and config.loss is None:
        return replay_loss(reference, candidate, profile=config.profile, progress=config.progress)
    return replay_loss(reference, config.loss or "builtin", profile=config.profile, progress=config.progress,
                       inject=loss_inject)


def _dump_against_dump(reference, candidate: Any, config: CompareConfig) -> Report | None:
    """Tensor-by-tensor comparison of two whole dumps, when asked for (streamed, stats_only) or when either
    dump is statistics-only (it has no values to replay). None: run the layer and loss replays."""
    from parity.dump.files import MANIFEST, Dump

    is_dump = _is_dump_dir(candidate)
    if (config.streamed or config.stats_only) and not is_dump:
        way = "a statistics-only compare" if config.stats_only else "a streamed compare"
        raise ParityError(f"{way} compares two dumps: the candidate must be a dump directory (holding {MANIFEST}), "
                          f"not {candidate!r}")
    if not is_dump:
        return None
    candidate = candidate if isinstance(candidate, Dump) else Dump(Path(candidate))
    if config.stats_only or reference.stats_only or candidate.stats_only:
        from parity.compare.stats import compare_stats

        return compare_stats(reference, candidate, profile=config.profile)
    if config.streamed:
        from parity.compare.stream import compare_dumps

        shared = len(set(reference.names()) & set(candidate.names()))
        with steps(config.progress, shared, "comparing dumps") as advance:
            return compare_dumps(reference, candidate, profile=config.profile, progress=advance)
    return None


def _record_environment(report: Report, reference, config: CompareConfig) -> None:
    """What the HTML report's environment panel shows: versions and device of the reference and of this run."""
    from parity.runtime import environment, versions

    manifest = reference.manifest
    report.context.setdefault("environment", {
        "reference": {"versions": manifest.get("versions") or {}, "environment": manifest.get("environment") or {},
                      "config": manifest.get("config") or {}},
        "comparison": {"versions": versions(), "device": config.device,
                       "threads": (environment("cpu") or {}).get("threads")},
    })


# -------------------------------------------------------------------------------------- version drift
def _rows_by_key(report: Report) -> dict[tuple[str, str], dict]:
    """The first compared row of each (section, tensor) as metrics: a loss tensor is judged twice, once in its
    stage on the reference's inputs and once end to end, and the two can disagree."""
    rows = {}
    for row in report.rows:
        if row.metrics is not None and (row.section, row.name) not in rows:
            rows[(row.section, row.name)] = {**row.metrics, "passed": row.passed}
    return rows


def explain_version_drift(report: Report, reference, candidate: Any, config: CompareConfig) -> None:
    """Run the same comparison against an older reference (`config.old_reference`): what matches it is release
    drift, not a bug.

    Rows that fail against the current reference but match the older one pass, with a note naming the
    release; error findings about those tensors become warnings; `version-drift` findings say why.
    """
    from parity.diagnose.drift import explain
    from parity.dump.files import Dump
    from parity.replay.loss import mark_drifted_stages

    old = Dump(config.old_reference)
    quiet = replace(config, old_reference=None, progress=False, layer=None)
    old_report = _old_release_report(report, old, candidate, quiet)
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


def _old_release_report(report: Report, old, candidate: Any, config: CompareConfig) -> Report | None:
    model_inject, loss_inject = split_injection(config.inject)
    old_report = None
    if config.what in ("layers", "all"):
        from parity.diagnose.layers import compare_layers as replay_layers

        old_report = replay_layers(old, candidate, profile=config.profile, modes=config.modes, progress=False,
                                   inject=model_inject, map_file=config.map_file, device=config.device)
    if config.what in ("loss", "all") and old.manifest.get("loss", {}).get("cases"):
        from parity.diagnose.loss import compare_loss as replay_loss

        try:
            loss_report = replay_loss(old, config.loss or "builtin", profile=config.profile, progress=False,
                                      inject=loss_inject)
            old_report = loss_report if old_report is None else old_report.merge(loss_report)
        except ParityError as error:  # an older release's layout the loss replay cannot read (8.3 head lists)
            report.coverage.setdefault("not_checked", []).append(f"loss against {old.path}: {error}")
    return old_report


def report_versions(dump) -> str:
    return (dump.manifest.get("versions") or {}).get("ultralytics") or "unknown"


__all__ = ["CompareConfig", "Finding", "Report", "ReportFiles", "Row", "assert_parity", "compare",
           "compare_layers", "compare_loss", "dump_reference", "failure_message", "headline", "row_detail", "run",
           "split_injection", "write_reports"]
