"""The public API (docs/python-api.md): `from parity import assert_parity` and friends.

A planted bug makes `assert_parity` raise an AssertionError that names it (first line: the verdict and the first
divergence; then the findings; then the report path); the clean built-in passes; bad input is a ParityError; the
CLI's defaults are the API's and the CLI's report is the API's report.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import parity
from parity.api import CompareConfig
from parity.errors import ParityError

ROOT = Path(__file__).resolve().parent.parent
NC80 = "fixtures/yolo11-narrow-nc80-96"
NC12 = "fixtures/yolov8-narrow-nc12-96"


def test_the_public_names_are_importable_from_parity():
    from parity import (Finding, ParityError, Report, assert_parity, compare, compare_layers,  # noqa: F401
                        compare_loss, dump_reference)

    assert {"assert_parity", "compare", "compare_layers", "compare_loss", "dump_reference", "Report",
            "Finding"} <= set(parity.__all__)
    with pytest.raises(AttributeError):
        parity.no_such_name  # noqa: B018


@pytest.mark.slow  # 1-2 s here (a full compare or capture); make test-fast skips it
def test_clean_builtin_passes_and_returns_its_report(fixtures_dir):
    report = parity.assert_parity(fixtures_dir / NC80.split("/")[1])
    assert report.verdict == "parity"
    assert {r.section for r in report.rows} >= {"structure", "isolated", "chained", "loss/default", "loss/default gradients"}


@pytest.mark.slow  # 1-2 s here (a full compare or capture); make test-fast skips it
def test_a_planted_bug_raises_an_assertion_error_that_names_it(fixtures_dir, tmp_path):
    with pytest.raises(AssertionError) as caught:
        parity.assert_parity(fixtures_dir / "yolo11-narrow-nc80-96", inject="missing-sigmoid", report_dir=tmp_path)
    lines = str(caught.value).splitlines()
    assert lines[0].startswith("DIVERGENCE: ") and "first failed check: [loss/default] assign" in lines[0]
    finding = next(line for line in lines[1:] if "missing-sigmoid" in line)
    assert finding.startswith("  error missing-sigmoid @ loss stage assign: the assigner receives raw class logits")
    assert lines.index(finding) == 1, "errors come first, right under the verdict"
    assert lines[-2:] == [f"report: {tmp_path / 'parity-report.json'}", f"report: {tmp_path / 'parity-report.html'}"]
    assert "<h1>DIVERGENCE</h1>" in (tmp_path / "parity-report.html").read_text()
    document = json.loads((tmp_path / "parity-report.json").read_text())
    assert document["verdict"] == "divergence"
    assert any(f["signature"] == "missing-sigmoid" for f in document["findings"])


def test_a_layer_bug_names_the_first_divergent_layer(fixtures_dir, tmp_path):
    with pytest.raises(AssertionError) as caught:
        parity.assert_parity(fixtures_dir / "yolov8-narrow-nc12-96", what="layers", inject="bias-init-float32",
                             report_dir=tmp_path, html=False)
    message = str(caught.value)
    assert message.splitlines()[0].startswith("DIVERGENCE: ")
    assert "bias-init-float32 @ layer 22" in message
    assert message.splitlines()[-1] == f"report: {tmp_path / 'parity-report.json'}"


def test_bad_input_is_a_parity_error_not_an_assertion(tmp_path, fixtures_dir):
    with pytest.raises(ParityError, match="no reference dump at"):
        parity.assert_parity(tmp_path / "nowhere")
    with pytest.raises(ParityError, match="what='everything'"):
        parity.compare(fixtures_dir / "yolo11-narrow-nc80-96", what="everything")
    with pytest.raises(ParityError, match="99: the reference has layers 0..23"):
        parity.compare_layers(fixtures_dir / "yolo11-narrow-nc80-96", layer=99)
    with pytest.raises(TypeError):  # options are keyword-only
        parity.compare(fixtures_dir / "yolo11-narrow-nc80-96", "builtin", "layers")


def test_the_cli_defaults_are_the_api_defaults():
    from parity.cli.main import build_parser

    args = build_parser().parse_args(["compare"])
    from parity.cli.compare import compare_config

    cli = compare_config(args)
    api = CompareConfig()
    differing = {f.name for f in dataclasses.fields(CompareConfig) if getattr(cli, f.name) != getattr(api, f.name)}
    assert differing == {"progress"}, "the CLI shows progress bars on a terminal; a library call does not"


def test_the_cli_report_is_the_api_report(fixtures_dir, tmp_path):
    from parity.cli.main import main
    from parity.report.text import to_json

    reference = fixtures_dir / "yolov8-narrow-nc12-96"
    assert main(["--no-progress", "compare", "--reference", str(reference), "--inject", "bias-init-float32",
                 "--json", str(tmp_path / "cli.json")]) == 1
    report = parity.compare(reference, inject="bias-init-float32")
    cli = json.loads((tmp_path / "cli.json").read_text())
    api = json.loads(to_json(report))
    for document in (cli, api):
        document["context"].pop("seconds", None)
        document["context"].pop("environment", None)
        for finding in document["findings"]:  # the explainer times each place it explains
            finding["evidence"].pop("seconds", None)
    assert cli["findings"] == api["findings"] and cli["rows"] == api["rows"] and cli["verdict"] == "divergence"


def test_compare_loss_replays_only_the_loss(fixtures_dir):
    reference = fixtures_dir / "yolo11-narrow-nc80-96"
    assert parity.compare_loss(reference).verdict == "parity"
    report = parity.compare_loss(reference, inject="missing-sigmoid")
    assert report.command == "compare --what loss"
    assert not any(r.section in ("isolated", "chained") for r in report.rows)
    assert "missing-sigmoid" in {f.signature for f in report.errors}


@pytest.mark.slow  # 1-2 s here (a full compare or capture); make test-fast skips it
def test_dump_reference_writes_a_dump_the_api_reads(tmp_path):
    path = parity.dump_reference(tmp_path / "ref", model="fixtures/models/yolo11-narrow.yaml", imgsz=64)
    assert (path / "manifest.json").exists()
    report = parity.compare(path, what="layers", mode="isolated")
    assert report.verdict == "parity"
    with pytest.raises(ParityError):  # never overwrites what is there
        parity.dump_reference(path, model="fixtures/models/yolo11-narrow.yaml", imgsz=64)


# ------------------------------------------------------------------------------------------ pytest plugin
def _pytest(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """pytest in a fresh process, the plugin loaded by name (a source checkout has no installed entry point)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "parity.pytest_plugin", "-p", "no:cacheprovider",
                           *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.slow  # 2-11 s here (a subprocess, a browser or full-size builds); make test-fast skips it
def test_the_pytest_example_runs_with_the_plugin():
    proc = _pytest(["-q", "examples/pytest"], ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "3 passed" in proc.stdout


@pytest.mark.slow  # 2-11 s here (a subprocess, a browser or full-size builds); make test-fast skips it
def test_a_failing_check_prints_the_report_path_and_writes_html(tmp_path, fixtures_dir):
    (tmp_path / "test_bug.py").write_text(
        "def test_planted_bug(assert_parity):\n"
        "    assert_parity(inject='missing-sigmoid', what='loss')\n")
    html = tmp_path / "html"
    # the `=` form: pytest takes a separate option value that looks like a path into its rootdir guess
    proc = _pytest(["-q", "test_bug.py", f"--parity-reference={fixtures_dir / 'yolo11-narrow-nc80-96'}",
                    f"--parity-html={html}"], tmp_path)
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-2000:]
    written = html / "test_bug.py_test_planted_bug.html"
    assert written.exists() and "<h1>DIVERGENCE</h1>" in written.read_text()
    assert f"report: {written}" in proc.stdout
    assert "AssertionError: DIVERGENCE: " in proc.stdout and "missing-sigmoid @ loss stage assign" in proc.stdout
    assert "FAILED test_bug.py::test_planted_bug" in proc.stdout
    summary = proc.stdout[proc.stdout.index("parity reports"):]
    assert f"test_bug.py::test_planted_bug: {written}" in summary


@pytest.mark.slow  # 2-11 s here (a subprocess, a browser or full-size builds); make test-fast skips it
def test_a_missing_parity_reference_is_a_usage_error(tmp_path):
    (tmp_path / "test_any.py").write_text("def test_any(assert_parity):\n    assert_parity()\n")
    proc = _pytest(["-q", "test_any.py", "--parity-reference", str(tmp_path / "nowhere")], tmp_path)
    assert proc.returncode != 0
    assert "expected a reference dump directory holding manifest.json, found none" in proc.stdout + proc.stderr
