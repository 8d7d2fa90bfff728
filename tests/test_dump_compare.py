"""Whole-dump comparisons: the streamed element-wise compare (`parity.compare.stream`) and the `parity compare`
routes to it and to the statistics-only compare. Each test plants a difference the compare must find, or checks
that an identical dump passes."""

from __future__ import annotations

import math

import pytest
import torch

from parity.cli.main import main
from parity.compare.stream import TensorReader, compare_dumps
from parity.dump.files import Dump, DumpWriter

FIXTURE = "yolo11-narrow-nc80-96"


def copy_dump(reference: Dump, path, change=None, *, stats_only: bool = False) -> Dump:
    """A candidate dump holding the reference's tensors, `change(name, tensor)` applied to each."""
    with DumpWriter(path, kind="candidate", stats_only=stats_only) as writer:
        for name, tensor in reference.tensors():
            writer.add(name, change(name, tensor.clone()) if change else tensor)
        writer.commit({})
    return Dump(path)


@pytest.fixture
def reference(fixtures_dir) -> Dump:
    return Dump(fixtures_dir / FIXTURE)


def test_a_dump_against_its_copy_is_bitwise_parity(reference, tmp_path):
    report = compare_dumps(reference, copy_dump(reference, tmp_path / "same"))
    assert report.verdict == "parity"
    assert len(report.rows) == report.coverage["compared"] == len(reference.index)
    assert all(row.metrics["exact"] for row in report.rows)
    largest = max(t.numel() * t.element_size() for _, t in reference.tensors())
    assert report.context["largest_pair_bytes"] == 2 * largest


def test_a_changed_activation_is_the_first_divergence(reference, tmp_path):
    def change(name, tensor):
        return tensor + 0.5 if name == "act.23.scores" else tensor

    report = compare_dumps(reference, copy_dump(reference, tmp_path / "changed", change))
    assert report.verdict == "divergence"
    assert [row.name for row in report.failed_rows] == ["act.23.scores"]
    assert report.findings[0].signature == "tensor-divergence" and "act.23.scores" in report.findings[0].message


def test_one_ulp_passes_an_activation_but_not_a_weight(reference, tmp_path):
    def one_ulp(name, tensor):
        if name in ("act.4", "model.0.conv.weight"):
            return torch.nextafter(tensor, torch.full_like(tensor, math.inf))
        return tensor

    report = compare_dumps(reference, copy_dump(reference, tmp_path / "ulp", one_ulp), profile="cpu-fp32")
    assert [row.name for row in report.failed_rows] == ["model.0.conv.weight"]
    act = next(row for row in report.rows if row.name == "act.4")
    assert act.passed and act.metrics["max_ulp"] == 1 and not act.metrics["exact"]


def test_background_rows_of_assigned_targets_are_not_judged(reference, tmp_path):
    name = next(n for n in reference.index if n.endswith(".target_gt_idx"))
    fg = reference.get(name.rsplit(".", 1)[0] + ".fg_mask").bool()
    assert (~fg).any(), "the fixture needs background anchors for this test"

    def filler_only(tensor_name, tensor):
        if tensor_name == name:
            tensor[~fg] = tensor[~fg] + 7
        return tensor

    report = compare_dumps(reference, copy_dump(reference, tmp_path / "filler", filler_only))
    row = next(r for r in report.rows if r.name == name)
    assert row.passed and row.note.startswith("foreground anchors only")

    def foreground(tensor_name, tensor):
        if tensor_name == name:
            tensor[fg] = tensor[fg] + 1
        return tensor

    report = compare_dumps(reference, copy_dump(reference, tmp_path / "fg", foreground))
    assert [r.name for r in report.failed_rows] == [name]


def test_pread_and_mmap_readers_give_the_same_rows(reference, tmp_path):
    candidate = copy_dump(reference, tmp_path / "c", lambda n, t: t * 1.001 if n == "act.9" else t)
    rows = {backend: [(r.name, r.passed, r.note) for r in compare_dumps(reference, candidate, backend=backend).rows]
            for backend in ("pread", "mmap")}
    assert rows["pread"] == rows["mmap"]


def test_a_truncated_candidate_file_is_named(reference, tmp_path):
    candidate = copy_dump(reference, tmp_path / "broken")
    file = candidate.path / candidate.index["act.0"]["file"]
    file.write_bytes(file.read_bytes()[:1000])
    with pytest.raises(Exception) as error:
        TensorReader(Dump(candidate.path)).get("act.0")
    assert file.name in str(error.value)


def test_cli_routes_a_statistics_only_candidate_to_the_statistics_compare(reference, tmp_path, capsys):
    candidate = copy_dump(reference, tmp_path / "stats", lambda n, t: t + 0.5 if n == "act.23.scores" else t,
                          stats_only=True)
    code = main(["compare", "--reference", str(reference.path), "--candidate", str(candidate.path), "--no-progress",
                 "--json", str(tmp_path / "report.json")])
    out = capsys.readouterr().out
    assert code == 1 and "act.23.scores" in out
    text = (tmp_path / "report.json").read_text()
    assert "statistics-only" in text and "no element-wise error" in text


def test_cli_streamed_compare_and_its_input_checks(reference, tmp_path, capsys):
    candidate = copy_dump(reference, tmp_path / "same")
    assert main(["compare", "--reference", str(reference.path), "--candidate", str(candidate.path), "--streamed",
                 "--no-progress"]) == 0
    assert main(["compare", "--reference", str(reference.path), "--candidate", "builtin", "--streamed",
                 "--no-progress"]) == 2
    assert "--candidate must be a dump directory" in capsys.readouterr().err


def test_a_whole_dump_report_summarises_sections_and_lists_only_failures(reference, tmp_path, capsys):
    candidate = copy_dump(reference, tmp_path / "c", lambda n, t: t * 1.01 if n == "act.13" else t)
    code = main(["compare", "--reference", str(reference.path), "--candidate", str(candidate.path), "--streamed",
                 "--no-progress"])
    out = capsys.readouterr().out
    assert code == 1
    assert "checks by section" in out and "act.13" in out
    assert "model.0.conv.weight" not in out  # a passing tensor is counted in the summary, not listed
