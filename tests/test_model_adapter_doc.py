"""docs/model-adapter.md: its worked examples are excerpts of the ports the tests compare, and its scaffold
walkthrough works as written."""

from __future__ import annotations

import importlib
import re
import sys

import pytest

from parity.cli.main import main
from parity.dump.files import Dump
from parity.diagnose.layers import compare_layers
from parity.runtime import PROJECT_ROOT
from parity.replay.scaffold import scaffold_text

DOC = PROJECT_ROOT / "docs" / "model-adapter.md"
V8 = PROJECT_ROOT / "fixtures" / "yolov8-narrow-nc12-96"


def test_every_worked_example_is_an_excerpt_of_its_port():
    text = DOC.read_text()
    examples = re.findall(r"<!-- example: (\S+) -->\n```python\n(.*?)```", text, re.S)
    assert len(examples) == 3
    for path, code in examples:
        assert code in (PROJECT_ROOT / path).read_text(), path


def test_the_docs_are_linked_from_the_readme_and_compare_help(capsys):
    assert "docs/model-adapter.md" in (PROJECT_ROOT / "README.md").read_text()
    assert main(["compare", "--help"]) == 0  # help is printed and main returns (it never raises SystemExit)
    assert "docs/model-adapter.md" in capsys.readouterr().out


def test_scaffold_walkthrough_writes_an_adapter_that_is_a_candidate(tmp_path, monkeypatch):
    monkeypatch.chdir(PROJECT_ROOT)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "split_v8_adapter.py"
    assert main(["scaffold", "--candidate", "tests.ports.models.split_v8:build", "--reference", str(V8),
                 "--out", str(out)]) == 0
    text = out.read_text()
    assert "'c2f_n4.': 18,  # C2f" in text and "'detect.': 22,  # Detect" in text
    assert "layer 10 Upsample: up" in text                       # a module serving two layers
    assert "model.18.cv1.conv.weight <- c2f_n4.left.conv.weight + c2f_n4.right.conv.weight" in text
    assert main(["scaffold", "--candidate", "tests.ports.models.split_v8:build", "--reference", str(V8),
                 "--out", str(out)]) == 2                         # an existing file is not replaced
    try:
        report = compare_layers(Dump(V8), "split_v8_adapter:build", progress=False)
    finally:
        sys.modules.pop("split_v8_adapter", None)
    assert report.verdict == "parity", [(f.signature, f.message) for f in report.errors]


def test_scaffold_says_what_could_not_be_inferred_with_the_fix():
    text = scaffold_text("tests.ports.models.prealloc_v8:build", str(V8))
    assert "# NOT inferred" in text and "layer 10 (Upsample, no parameters)" in text
    assert "fix: give it a module of its own" in text
    namespace = {}
    exec(compile(text, "adapter", "exec"), namespace)       # the file is valid Python as written
    assert namespace["layer_map"]["neck.td_p4."] == 12
