"""`parity drift A B` shown: the drift between two reference dumps as rich tables, and as strict JSON."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from parity.compare.drift import DriftReport, drift
from parity.jsonio import dumps


@dataclass(frozen=True)
class DriftConfig:
    a: Path  # reference dump A (e.g. captured with ultralytics 8.3.200)
    b: Path  # reference dump B (e.g. captured with the current ultralytics)
    limit: int = 8  # tensors listed per cause
    json_out: Path | None = None  # also write the drift report as JSON here


def show_drift(config: DriftConfig, console: Console | None = None) -> DriftReport:
    """Compute the drift between the two dumps, print it, write its JSON where asked; returns the report."""
    report = drift(config.a, config.b)
    (console or Console()).print(render(report, limit=config.limit))
    if config.json_out is not None:
        write_json(report, config.json_out)
    return report


def write_json(report: DriftReport, out: Path) -> None:
    """The report as strict JSON (non-finite numbers as strings, parity.jsonio)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dumps(report.to_dict(), indent=1) + "\n")


def render(report: DriftReport, limit: int = 8) -> Group:
    parts = [Text(f"A: {report.a}\nB: {report.b}"), _versions_table(report)]
    if not report.drifted:
        parts.append(Text(f"no drift: {report.identical} of {report.compared} tensors bitwise equal", style="green"))
        return Group(*parts)
    parts += [_cause_table(group, limit) for group in report.causes.values()]
    unexplained = [e for e in report.expected if e["cause"] not in report.causes]
    if unexplained:
        parts.append(Text("release-history changes between these versions with no visible effect here: "
                          + "; ".join(f"{e['version']} {e['change']}" for e in unexplained)))
    parts.append(Text(f"{report.compared - report.identical} of {report.compared} common tensors differ"))
    return Group(*parts)


def _versions_table(report: DriftReport) -> Table:
    versions = Table(title="versions", show_header=True)
    versions.add_column("package")
    versions.add_column("A")
    versions.add_column("B")
    for key, (x, y) in report.versions.items():
        versions.add_row(key, str(x), str(y), style="bold" if x != y else None)
    return versions


def _cause_table(group, limit: int) -> Table:
    table = Table(title=f"{group.cause}: {group.title}", title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("detail")
    for line in group.evidence:
        table.add_row("evidence", line)
    for line in group.expected:
        table.add_row("release notes", line)
    for item in group.tensors[:limit]:
        table.add_row(item["name"], item["change"])
    if len(group.tensors) > limit:
        table.add_row("…", f"{len(group.tensors) - limit} more tensors")
    return table
