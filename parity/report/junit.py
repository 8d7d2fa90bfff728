"""A report for CI systems: JUnit XML (`--junit FILE`) and a markdown job summary (`--github-summary`).

JUnit: one test suite per report, one test case per check section: `structure`, `layers` (isolated, chained
and any drill-down), `loss <case>` per loss case (its stages and its end-to-end rows), `gradients`, and
`diagnosis` (error findings that no failing row carries). A failing row is a line of its case's failure; the
case fails when any of its rows does. Written with junitparser in its xunit2 flavour (the Jenkins xunit
`junit-10` structure that GitLab, Jenkins and GitHub test reporters read).
"""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone
from pathlib import Path

from parity.findings import Report, Row

FAILURE_LINES = 50


def section_case(section: str) -> str:
    """The JUnit test case a report section belongs to."""
    if section.startswith("loss/"):
        case, _, part = section[len("loss/"):].partition(" ")
        return "gradients" if part == "gradients" else f"loss {case}"
    if section in ("isolated", "chained") or "/" in section:
        return "layers"
    return section


def check_sections(report: Report) -> dict[str, list[Row]]:
    """Rows per test case: structure, layers, the loss cases, gradients, then anything else, in report order."""
    groups: dict[str, list[Row]] = {}
    for row in report.rows:
        groups.setdefault(section_case(row.section), []).append(row)
    rank = {"structure": 0, "layers": 1, "gradients": 3}
    return dict(sorted(groups.items(), key=lambda item: rank.get(item[0], 2 if item[0].startswith("loss ") else 4)))


def junit_xml(report: Report):
    """The report as a junitparser `JUnitXml` (xunit2 flavour)."""
    from junitparser import Failure, Property, Properties
    from junitparser.xunit2 import JUnitXml, TestCase, TestSuite

    suite = TestSuite(report.command.replace("compare --what", "parity compare --what"))
    suite.timestamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    suite.hostname = platform.node() or "localhost"
    properties = Properties()
    for name, value in (("reference", report.reference), ("candidate", report.candidate),
                        ("profile", report.profile), ("verdict", report.verdict)):
        properties.add_property(Property(name, str(value)))
    suite.append(properties)
    classname = f"parity.{_identifier(report.candidate)}"
    for name, rows in check_sections(report).items():
        case = TestCase(name, classname)
        failing = [r for r in rows if not r.passed]
        if failing:
            failure = Failure(f"{len(failing)} of {len(rows)} checks failed; first: {_row_line(failing[0])}",
                              "divergence")
            failure.text = "\n".join(_row_line(r) for r in failing[:FAILURE_LINES]) + (
                f"\n... {len(failing) - FAILURE_LINES} more" if len(failing) > FAILURE_LINES else "")
            case.result = [failure]
        suite.add_testcase(case)
    if report.errors:
        case = TestCase("diagnosis", classname)
        failure = Failure(f"{len(report.errors)} error finding(s); first: {report.errors[0].signature} @ "
                          f"{report.errors[0].where}", "finding")
        failure.text = "\n".join(f"{f.signature} @ {f.where}: {f.message}" for f in report.errors)
        case.result = [failure]
        suite.add_testcase(case)
    suite.system_out = "\n".join(f"{f.severity} {f.signature} @ {f.where}: {f.message}" for f in report.findings)
    suite.update_statistics()
    document = JUnitXml("yolo-parity")
    document.add_testsuite(suite)
    document.update_statistics()
    return document


def write_junit(report: Report, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    junit_xml(report).write(str(partial), pretty=True)
    partial.replace(path)
    return path


def _row_line(row: Row) -> str:
    from parity.report.summary import row_detail

    return f"[{row.section}] {row.where} {row.name}: {row_detail(row)[:300]}"


def _identifier(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in str(text)).strip("_") or "candidate"


# ---------------------------------------------------------------------------------------- job summary
def github_summary(report: Report) -> str:
    """Markdown for a GitHub Actions job summary: the verdict, the checks per case, the findings."""
    from parity.report.summary import headline

    mark = ":white_check_mark:" if report.verdict == "parity" else ":x:"
    lines = [f"### {mark} yolo-parity: {report.verdict.upper()}", "", f"**{_md(headline(report))}**", "",
             f"`{_md(report.command)}` · reference `{_md(report.reference)}` · candidate `{_md(report.candidate)}` · "
             f"profile `{_md(report.profile)}`", "", "| check | passed | failed | first failure |",
             "| --- | ---: | ---: | --- |"]
    for name, rows in check_sections(report).items():
        failing = [r for r in rows if not r.passed]
        first = _md(_row_line(failing[0])[:120]) if failing else ""
        lines.append(f"| {'❌' if failing else '✅'} {_md(name)} | {len(rows) - len(failing)} | {len(failing)} | "
                     f"{first} |")
    if report.findings:
        lines += ["", "| severity | signature | where | message |", "| --- | --- | --- | --- |"]
        order = {"error": 0, "warning": 1, "info": 2}
        for f in sorted(report.findings, key=lambda f: order.get(f.severity, 3)):
            lines.append(f"| {f.severity} | `{_md(f.signature)}` | {_md(f.where)} | {_md(f.message[:300])} |")
    return "\n".join(lines) + "\n"


def write_github_summary(report: Report, path: str | os.PathLike) -> Path:
    """Append (GitHub concatenates every step's summary in the one file it names)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as out:
        out.write(github_summary(report) + "\n")
    return path


def _md(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")
