"""The terminal layout of a layer report at 80, 120 and 200 columns, kept as expectations (tests/expected/).

The reports are committed as JSON (written from two ports' real comparisons) so the captures do not depend on this
machine's rounding; `PARITY_REGENERATE_EXPECTED=1` rewrites the JSON from the ports and the captures from it."""

from __future__ import annotations

import io
import json
import os

import pytest
from rich.console import Console

from parity.report.text import render, to_json
from parity.findings import Finding, Report, Row
from parity.runtime import PROJECT_ROOT

EXPECTED = PROJECT_ROOT / "tests" / "expected"
REPORTS = {"student_v8": "faithful port, no bias init", "wrong_p4_v8": "head wired to the wrong P4"}
WIDTHS = (80, 120, 200)
REGENERATE = os.environ.get("PARITY_REGENERATE_EXPECTED") == "1"


def load_report(path) -> Report:
    data = json.loads(path.read_text())
    return Report(data["command"], data["reference"], data["candidate"], data["profile"],
                  rows=[Row(**r) for r in data["rows"]], findings=[Finding(**f) for f in data["findings"]],
                  coverage=data["coverage"], context=data["context"])


def capture(report: Report, width: int) -> str:
    console = Console(file=io.StringIO(), width=width, record=True, force_terminal=False, color_system=None)
    render(report, console)
    return "\n".join(line.rstrip() for line in console.export_text().splitlines()) + "\n"


@pytest.fixture(scope="module", autouse=True)
def regenerate():
    if not REGENERATE:
        return
    from parity.diagnose.layers import compare_layers

    for port in REPORTS:
        report = compare_layers(PROJECT_ROOT / "fixtures" / "yolov8-narrow-nc12-96", f"tests.ports.models.{port}:build",
                                progress=False)
        report.reference = "fixtures/yolov8-narrow-nc12-96"
        report.context.pop("seconds", None)
        to_json(report, EXPECTED / f"{port}.report.json")
        for width in WIDTHS:
            (EXPECTED / f"{port}.{width}.txt").write_text(capture(load_report(EXPECTED / f"{port}.report.json"), width))


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("port", list(REPORTS))
def test_layout_matches_the_kept_capture(port, width):
    shown = capture(load_report(EXPECTED / f"{port}.report.json"), width)
    assert shown == (EXPECTED / f"{port}.{width}.txt").read_text()
    assert all(len(line) <= width for line in shown.splitlines())


@pytest.mark.parametrize("port", list(REPORTS))
def test_verdict_and_first_divergence_also_close_the_report(port):
    shown = capture(load_report(EXPECTED / f"{port}.report.json"), 80).splitlines()
    verdict = next(line for line in shown if line.startswith("layers: "))
    tail = shown[-6:]
    assert verdict in tail
    if port == "wrong_p4_v8":
        assert any(line.startswith("first finding: layer-wiring at layer 22") for line in tail)
    else:
        assert verdict == "layers: PARITY" and "bias init: DIVERGENCE (bias-init-skipped, strides 8, 16, 32)" in tail


def test_tensor_names_do_not_break_inside_a_name():
    shown = capture(load_report(EXPECTED / "wrong_p4_v8.report.json"), 80)
    for level in range(3):
        assert f"init.cls_bias.{level}.stored" in shown


def test_a_drill_down_lists_only_failing_sub_blocks_and_counts_the_rest():
    rows = [Row("isolated/layer 12", "layer 12", f"act.12.{name}", name != "m.0", note="")
            for name in ("cv1", "m.0", "cv2")]
    report = Report("compare --what layers --layer 12", "ref", "cand", "cpu-fp32", rows=rows)
    shown = capture(report, 80)
    assert "sub-blocks: 2 of 3 pass" in shown and "act.12.m.0" in shown
    assert "act.12.cv1" not in shown and "act.12.cv2" not in shown
