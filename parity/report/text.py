"""Show a `parity.findings.Report`: a rich terminal table, or the versioned JSON document (docs/report-format.md).

Terminal layout, top to bottom: a verdict line, a summary line that puts failures first (how many checks
failed, the first divergent layer per mode), the findings (signature, where, message; errors first), then one
row per layer (type, parameters, output shape, isolated and chained results) or, for a drill-down or a loss
report, one row per tensor, and finally what the comparison could not cover.

Exit codes (`exit_code`): 0 parity, 1 divergence, 2 bad input (raised as `ParityError`, handled by the CLI).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from parity.jsonio import plain
from parity.findings import Report, Row

EXIT_PARITY, EXIT_DIVERGENCE, EXIT_BAD_INPUT = 0, 1, 2
_LAYER = re.compile(r"^layer (\d+)$")
_SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}
_SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def exit_code(report: Report) -> int:
    return EXIT_PARITY if report.verdict == "parity" else EXIT_DIVERGENCE


# ------------------------------------------------------------------------------------------------ JSON
def report_json(report: Report) -> dict:
    document = plain(report.to_dict())
    document["summary"] = summary_counts(report)
    return document


def to_json(report: Report, path: str | os.PathLike | None = None) -> str:
    """The report as strict JSON (docs/report-format.md); written to `path` when given. Returns the text."""
    text = json.dumps(report_json(report), indent=1, allow_nan=False) + "\n"
    if path is not None:
        path = Path(path)
        if path.parent and not path.parent.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return text


def summary_counts(report: Report) -> dict:
    failed = report.failed_rows
    first = (report.context or {}).get("first_divergent_layer") or {}
    return {
        "checks": len(report.rows),
        "failed": len(failed),
        "errors": len(report.errors),
        "warnings": sum(1 for f in report.findings if f.severity == "warning"),
        "first_divergent_layer": first,
        "sections": {s: {"checks": sum(1 for r in report.rows if r.section == s),
                         "failed": sum(1 for r in failed if r.section == s)}
                     for s in dict.fromkeys(r.section for r in report.rows)},
    }


# -------------------------------------------------------------------------------------------- terminal
def verdict_lines(report: Report) -> list[str]:
    """The verdict of each part that was judged on its own (the layers, the Detect bias init), one line each;
    empty for reports without parts (a loss or dump comparison)."""
    parts = (report.context or {}).get("verdicts")
    if not parts:
        return []
    lines = []
    first = (report.context or {}).get("first_divergent_layer") or {}
    types = {e.get("index"): e.get("type") for e in (report.context.get("layers") or [])}
    layers = parts.get("layers")
    if layers == "parity":
        lines.append("layers: PARITY")
    elif layers:
        where = ", ".join(f"{mode} layer {i} ({types.get(i, '?')})" for mode, i in first.items() if i is not None)
        row = report.first_divergence()
        text = "layers: DIVERGENCE"
        if where:
            text += f"; first divergent: {where}"
        elif row is not None and row.section != "bias init":
            text += f"; first failed check: [{row.section}] {row.where} {row.name}"
        lines.append(text)
    bias = parts.get("bias_init")
    if bias == "divergence":
        found = [f for f in report.findings if f.signature.startswith("bias-init") and f.severity == "error"]
        strides = [str(f.evidence.get("stride")).rstrip("0").rstrip(".") for f in found if "stride" in f.evidence]
        sig = found[0].signature if found else "bias init differs"
        lines.append(f"bias init: DIVERGENCE ({sig}" + (f", stride{'s' if len(strides) > 1 else ''} "
                                                         f"{', '.join(strides)}" if strides else "") + ")")
    elif bias == "parity":
        lines.append("bias init: PARITY")
    return lines


def summary_line(report: Report) -> str:
    counts = summary_counts(report)
    if report.verdict == "parity":
        text = f"PARITY: all {counts['checks']} checks passed under profile {report.profile}"
        if counts["warnings"]:
            text += f" ({counts['warnings']} warning(s))"
        return text
    parts = [f"DIVERGENCE: {counts['failed']} of {counts['checks']} checks failed",
             f"{counts['errors']} error finding(s)"]
    first = counts["first_divergent_layer"]
    where = ", ".join(f"{mode} layer {i}" for mode, i in first.items() if i is not None)
    if where:
        parts.append(f"first divergent: {where}")
    failed = report.failed_rows
    row = next((r for r in failed if r.section != "bias init"), None)
    if row is not None:
        parts.append(f"first failed check: [{row.section}] {row.where} {row.name}")
    elif failed:
        parts[0] += ", all of them in the bias init"
    return "; ".join(parts)


def _e(text) -> str:
    from rich.markup import escape

    return escape(str(text))


def _param_cell(row: Row | None) -> str:
    if row is None:
        return ""
    if row.passed:
        match = re.search(r"reference (\d[\d,]*\d|\d)", row.note)
        return f"[green]{match.group(1) if match else 'ok'}[/green]"
    return f"[bold red]{_e(_short(row.note, 44))}[/bold red]"


def _cell(row: Row | None) -> str:
    if row is None:
        return ""
    m = row.metrics or {}
    if row.passed:
        if m.get("exact"):
            return "[green]bitwise[/green]"
        if m.get("max_abs") is not None:
            return f"[green]ok[/green] {_num(m.get('max_abs'))}"
        return "[green]ok[/green]"
    if m and m.get("ref_shape") != m.get("cand_shape"):
        return f"[bold red]shape[/bold red] {_e(m.get('cand_shape'))}"
    if m.get("max_abs") is not None:
        frac = m.get("mismatched_fraction")
        extra = f" {frac:.1%} out" if isinstance(frac, float) else ""
        return f"[bold red]FAIL[/bold red] {_num(m.get('max_abs'))}{extra}"
    return f"[bold red]FAIL[/bold red] {_e(_short(row.note, 40))}"


def _num(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return "0" if value == 0 else f"{value:.2g}"


def _short(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _worst(rows: list[Row]) -> Row | None:
    if not rows:
        return None
    failing = [r for r in rows if not r.passed]
    return failing[0] if failing else rows[0]


LOSS_ROWS_SHOWN = 20
# Beyond this many plain checks (a whole-dump compare has one per tensor) they are summarised per section and only
# the failing ones are listed.
CHECKS_LISTED = 60


def _render_section_summary(rows: list[Row], console) -> None:
    from rich.table import Table

    table = Table(title="checks by section", expand=False)
    for column in ("section", "tensors", "bitwise", "within tolerance", "failed", "first failure"):
        table.add_column(column, no_wrap=column != "first failure")
    for section in dict.fromkeys(r.section for r in rows):
        group = [r for r in rows if r.section == section]
        bitwise = sum(1 for r in group if r.passed and (r.metrics or {}).get("exact"))
        failed = [r for r in group if not r.passed]
        table.add_row(_e(section), str(len(group)), str(bitwise), str(len(group) - bitwise - len(failed)),
                      f"[bold red]{len(failed)}[/bold red]" if failed else "0",
                      _e(failed[0].name) if failed else "")
    console.print(table)


def _render_loss_stages(report: Report, console) -> None:
    """One row per loss stage, one column per case: which stage is wrong, at a glance. Cells stay short so the
    table fits 80 columns; what a short cell abbreviates is spelled out under the table."""
    from rich.table import Table

    loss = report.context["loss"]
    stages_by_case = loss["stages"]
    categories = loss.get("categories") or {}
    cases = list(stages_by_case)
    stages = list(dict.fromkeys(stage for case in cases for stage in stages_by_case[case]))
    first = loss.get("first_wrong_stage") or {}
    title = "loss stages" + (f": first wrong stage [bold red]{_e(first.get('stage'))}[/bold red] "
                             f"({_e(first.get('category'))}) in {_e(first.get('name'))}" if first else "")
    table = Table(title=title, expand=False)
    table.add_column("stage", no_wrap=True)
    table.add_column("part", no_wrap=True)
    for case in cases:
        table.add_column(case, no_wrap=True)
    cell = {"pass": "[green]ok[/green]", "fail": "[bold red]FAIL[/bold red]", "drift": "[yellow]drift[/yellow]",
            "not exposed": "-"}
    spelled: dict[str, list[str]] = {}  # what a shortened cell stands for -> the stages it applies to
    for stage in stages:
        row = []
        for case in cases:
            verdict = str(stages_by_case[case].get(stage, "-"))
            if verdict.startswith("partial"):
                applies = spelled.setdefault(verdict, [])
                if stage not in applies:
                    applies.append(stage)
                row.append("[green]partial[/green]")
            else:
                row.append(cell.get(verdict, _e(verdict)))
        table.add_row(_e(stage), _e(categories.get(stage, "")), *row)
    console.print(table)
    legend = ["-: not exposed by the candidate"] if any(
        v == "not exposed" for case in cases for v in stages_by_case[case].values()) else []
    legend += [f"partial: {', '.join(s)} {v}; the rest not exposed" for v, s in spelled.items()]
    for line in legend:
        console.print(_e(line), highlight=False)


def render(report: Report, console=None, *, verbose: bool = False) -> None:
    """Print the report to a rich console (stdout by default)."""
    from rich.console import Console

    console = console or Console()
    style = "bold green" if report.verdict == "parity" else "bold red"
    console.print(f"[bold]{_e(report.command)}[/bold]  reference {_e(report.reference)}  candidate "
                  f"{_e(report.candidate)}  profile {_e(report.profile)}", highlight=False)
    console.print(f"[{style}]{_e(summary_line(report))}[/{style}]", highlight=False)
    _render_verdict_lines(report, console)
    if report.findings:
        _render_findings(report, console)
    layer_rows, other, drill = _split_rows(report)
    if layer_rows:
        _render_layers(report, layer_rows, console, verbose)
    if (report.context.get("loss") or {}).get("stages"):
        _render_loss_stages(report, console)
        drill = _with_loss_rows(drill, console, verbose)
    if not verbose and len(other) > CHECKS_LISTED:
        _render_section_summary(other, console)
        failing = [r for r in other if not r.passed]
        if len(failing) > CHECKS_LISTED:
            console.print(f"{len(failing) - CHECKS_LISTED} more failing checks (--json for all)")
        other = failing[:CHECKS_LISTED]
    for title, rows in (("checks", other), ("sub-blocks", drill)):
        if rows:
            _render_row_table(report, title, rows, console, verbose)
    _render_not_covered(report, console)
    _render_closing(report, console)


def _render_verdict_lines(report: Report, console) -> None:
    for line in verdict_lines(report):
        console.print(f"[{_line_style(line)}]{_e(line)}[/{_line_style(line)}]", highlight=False)


def _render_findings(report: Report, console) -> None:
    from rich.table import Table

    findings = _grouped_findings(report)
    if console.width < 100:
        # narrow terminals: one block per finding, the message over the whole width
        console.print("[bold]findings[/bold]")
        for f in findings:
            st = _SEVERITY_STYLE.get(f.severity, "")
            console.print(f"[{st}]{f.severity}[/{st}] [bold]{_e(f.signature)}[/bold]  {_e(f.where)}",
                          highlight=False)
            console.print(_indented(f.message, console.width), highlight=False)
        return
    table = Table(title="findings", show_lines=False, expand=True)
    # the message is what a person reads: it keeps at least half the width; a long `where` wraps instead
    table.add_column("severity", no_wrap=True)
    table.add_column("signature", no_wrap=True)
    table.add_column("where", ratio=1)
    table.add_column("message", ratio=2)
    for f in findings:
        st = _SEVERITY_STYLE.get(f.severity, "")
        table.add_row(f"[{st}]{f.severity}[/{st}]", _e(f.signature), _e(f.where), _e(f.message))
    console.print(table)


def _split_rows(report: Report) -> tuple[dict[int, list[Row]], list[Row], list[Row]]:
    """(rows per layer index, other checks, drill-down rows), each in report order."""
    layer_rows: dict[int, list[Row]] = {}
    other: list[Row] = []
    drill: list[Row] = []
    for row in report.rows:
        match = _LAYER.match(row.where)
        if "/" in row.section:
            drill.append(row)
        elif match and row.section in ("structure", "isolated", "chained"):
            layer_rows.setdefault(int(match.group(1)), []).append(row)
        else:
            other.append(row)
    return layer_rows, other, drill


def _render_layers(report: Report, layer_rows: dict[int, list[Row]], console, verbose: bool) -> None:
    """One line per layer: type, parameters, output shape, isolated and chained verdicts, structure notes."""
    from rich.table import Table

    types = {e.get("index"): e.get("type") for e in (report.context.get("layers") or [])}
    table = Table(title="layers", expand=False)
    for column in ("#", "type", "parameters", "shape", "isolated", "chained", "notes"):
        table.add_column(column, no_wrap=column != "notes")
    for index in sorted(layer_rows):
        rows = layer_rows[index]
        if not verbose and all(r.passed for r in rows) and len(layer_rows) > 40:
            continue
        params = next((r for r in rows if r.name == "parameters"), None)
        shape = next((r for r in rows if r.name == "output shape"), None)
        iso = _worst([r for r in rows if r.section == "isolated"])
        ch = _worst([r for r in rows if r.section == "chained"])
        notes = [r.note for r in rows if r.section == "structure" and not r.passed
                 and r.name not in ("parameters", "output shape")]
        table.add_row(
            str(index), _e(types.get(index, "")), _param_cell(params),
            "" if shape is None else ("[green]ok[/green]" if shape.passed
                                      else f"[bold red]{_e(_short(shape.note, 44))}[/bold red]"),
            _cell(iso), _cell(ch), _e(_short("; ".join(notes), 60)))
    console.print(table)


def _with_loss_rows(drill: list[Row], console, verbose: bool) -> list[Row]:
    """The drill-down rows with the loss rows moved last: all of them when verbose, else the first failing."""
    loss_rows = [r for r in drill if r.section.startswith("loss/")]
    drill = [r for r in drill if not r.section.startswith("loss/")]
    failing = [r for r in loss_rows if not r.passed]
    if verbose:
        return drill + loss_rows
    if len(failing) > LOSS_ROWS_SHOWN:
        console.print(f"{len(failing) - LOSS_ROWS_SHOWN} more failing loss rows (--json for all)")
    return drill + failing[:LOSS_ROWS_SHOWN]


def _render_row_table(report: Report, title: str, rows: list[Row], console, verbose: bool) -> None:
    """A table of check or sub-block rows, failing rows first (at most 60 passing ones unless verbose)."""
    from rich.table import Table

    if title == "sub-blocks" and report.command.startswith("compare"):
        # a drill-down lists the sub-blocks that fail; the passing ones are counted
        passing = [r for r in rows if r.passed]
        rows = [r for r in rows if not r.passed]
        if passing:
            console.print(f"sub-blocks: {len(passing)} of {len(passing) + len(rows)} pass"
                          + (" (--json lists them)" if rows else ""), highlight=False)
        if not rows:
            return
    shown = rows if verbose else [r for r in rows if not r.passed] + [r for r in rows if r.passed][:60]
    name_width = max(len(r.name) for r in shown)
    table = Table(title=title, expand=False)
    narrow = console.width < 100       # the section is said by the where of a row, or by the title
    columns = ("where", "tensor / check", "result", "detail") if narrow else \
        ("section", "where", "tensor / check", "result", "detail")
    for column in columns:
        # a tensor name and the verdict stay on one line; where and detail wrap at spaces
        table.add_column(column, no_wrap=column in ("result", "tensor / check"),
                         min_width=name_width if column == "tensor / check" else None)
    for row in sorted(shown, key=lambda r: rows.index(r)):
        cells = [_e(row.where), _e(row.name), _cell(row), _e(_short(row.note, 80))]
        if narrow:
            if row.section not in row.where and row.section not in ("structure", "bias init"):
                cells[0] = _e(f"{row.section}: {row.where}")
        else:
            cells.insert(0, _e(row.section))
        table.add_row(*cells)
    console.print(table)


def _render_not_covered(report: Report, console) -> None:
    not_checked = (report.coverage or {}).get("not_checked") or []
    left = []
    for mode in ("isolated", "chained"):
        cov = (report.coverage or {}).get(mode) or {}
        if cov.get("left_out"):
            left.append(f"{mode}: {len(cov['left_out'])} of {cov.get('reference_tensors')} reference tensors not "
                        f"compared (first: {', '.join(cov['left_out'][:4])})")
    sub = (report.coverage or {}).get("sub_blocks") or {}
    if sub.get("left_out"):
        left.append(f"layer {sub.get('layer')} sub-blocks: {len(sub['left_out'])} of {sub.get('reference')} not "
                    f"provided by the candidate (first: {', '.join(sub['left_out'][:4])})")
    for line in list(not_checked) + left:
        console.print(f"[yellow]not covered:[/yellow] {_e(line)}", highlight=False)


def _render_closing(report: Report, console) -> None:
    """The verdict and the first divergence close the report too: they are what is left on the screen."""
    closing = verdict_lines(report) or [summary_line(report)]
    first = _first_finding(report)
    style = "bold green" if report.verdict == "parity" else "bold red"
    console.rule(style=style)
    for line in closing:
        console.print(f"[{_line_style(line)}]{_e(line)}[/{_line_style(line)}]", highlight=False)
    if first is not None:
        console.print(f"first finding: {_e(first.signature)} at {_e(first.where)}: {_e(_short(first.message, 160))}",
                      highlight=False)


def _line_style(line: str) -> str:
    return "bold green" if "PARITY" in line else "bold red"


def _first_finding(report: Report):
    """The first error finding that is not the bias init (judged on its own), else the first error."""
    errors = [f for f in report.findings if f.severity == "error"]
    return next((f for f in errors if not f.signature.startswith("bias-init")), errors[0] if errors else None)


def _indented(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(_e(text), width=max(20, width - 2), initial_indent="  ",
                                    subsequent_indent="  ", break_long_words=False, break_on_hyphens=False))


def _grouped_findings(report: Report) -> list:
    """Findings, errors first; one finding per stride of the same signature and layer is shown once."""
    from parity.findings import Finding

    ordered = sorted(report.findings, key=lambda f: _SEVERITY_ORDER.get(f.severity, 3))
    out: list = []
    groups: dict[tuple, int] = {}
    for f in ordered:
        base, _, stride = f.where.partition(", stride ")
        key = (f.signature, base)
        if stride and key in groups:
            first = out[groups[key]]
            where = first.where.replace(", stride ", ", strides ") + f", {stride}"
            out[groups[key]] = Finding(first.signature, where, first.message, first.severity, first.evidence)
            continue
        if stride:
            groups[key] = len(out)
        out.append(f)
    return out
