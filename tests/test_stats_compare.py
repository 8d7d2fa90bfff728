"""Statistics-only comparison (`parity.compare.stats.compare_stats`): it must catch a changed tensor, never fail a
tensor that is within the element-wise tolerance, and say plainly what it cannot conclude."""

from __future__ import annotations

import json
import math

import pytest
import torch

from parity.compare.stats import LIMITATIONS, compare_stats, judge, stat_bounds
from parity.compare.tolerances import BITWISE, Profile, Tolerance
from parity.dump.files import Dump, DumpWriter, tensor_stats

TOL = Tolerance(1e-5, 1e-4, source="test")
PROFILE = Profile("test-stats", "tolerances for these tests", True, {
    "activation": TOL, "activation-isolated": TOL, "weight": BITWISE, "init": BITWISE, "input": BITWISE,
    "loss": TOL, "grad": TOL,
})


def base_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.0.conv.weight": torch.randn(8, 3, 3, 3, generator=g),
        "batch.img": torch.rand(1, 3, 16, 16, generator=g),
        "act.0": torch.randn(1, 8, 8, 8, generator=g),
        "act.1": torch.randn(1, 16, 4, 4, generator=g) * 3 + 1,
        "loss.default.assign.fg_mask": torch.rand(1, 64, generator=g) > 0.7,
        "loss.default.assign.target_labels": torch.randint(0, 5, (1, 64), generator=g),
        "grad.param.model.0.conv.weight": torch.randn(8, 3, 3, 3, generator=g) * 1e-3,
    }


def write(path, tensors: dict[str, torch.Tensor], *, stats_only: bool = True, kind: str = "reference"):
    with DumpWriter(path, kind=kind, stats_only=stats_only) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
        writer.commit({"config": {"precision": "fp32"}, "environment": {"device": "cpu"}})
    return Dump(path)


def pair(tmp_path, change=None, **kwargs):
    ref = base_tensors()
    cand = {k: v.clone() for k, v in ref.items()}
    if change:
        change(cand)
    return (write(tmp_path / "ref", ref, **kwargs),
            write(tmp_path / "cand", cand, kind="candidate", **kwargs))


def row(report, name):
    return next(r for r in report.rows if r.name == name)


def test_identical_dumps_are_parity_and_say_what_they_cannot_conclude(tmp_path):
    ref, cand = pair(tmp_path)
    assert ref.stats_only and cand.stats_only
    report = compare_stats(ref, cand, profile=PROFILE)
    assert report.verdict == "parity"
    assert len(report.rows) == len(base_tensors())
    assert all(r.metrics["exact"] for r in report.rows)
    assert report.context["limitations"] == LIMITATIONS
    text = " ".join(LIMITATIONS)
    for phrase in ("no element-wise error", "no localisation inside a tensor", "no ULP", "no replay"):
        assert phrase in text
    assert any(f.signature == "stats-only-limits" and f.severity == "info" for f in report.findings)
    assert report.coverage["not_checked"] == LIMITATIONS


def test_a_changed_activation_is_caught(tmp_path):
    def change(t):
        t["act.1"][0, 3, 2, 2] += 5.0

    report = compare_stats(*pair(tmp_path, change), profile=PROFILE)
    assert report.verdict == "divergence"
    bad = report.first_divergence()
    assert bad.name == "act.1" and bad.where == "layer 1"
    assert "statistics outside tolerance" in bad.note
    assert [r.name for r in report.failed_rows] == ["act.1"]
    assert any(f.signature == "stats-divergence" and "act.1" in f.message for f in report.errors)


def test_a_small_offset_that_keeps_min_and_max_is_caught_by_the_mean(tmp_path):
    ref = base_tensors()["act.0"]
    interior = (ref > ref.min()) & (ref < ref.max())

    def change(t):
        t["act.0"] = torch.where(interior, t["act.0"] + 1e-2, t["act.0"])

    report = compare_stats(*pair(tmp_path, change), profile=PROFILE)
    bad = row(report, "act.0")
    assert not bad.passed
    over = {k for k, d in bad.metrics["stat_deltas"].items() if d["ratio"] > 1}
    assert "mean" in over and "min" not in over and "max" not in over


def test_a_change_within_tolerance_passes_but_is_not_called_bitwise(tmp_path):
    def change(t):
        t["act.1"] = torch.nextafter(t["act.1"], torch.tensor(math.inf))

    report = compare_stats(*pair(tmp_path, change), profile=PROFILE)
    ok = row(report, "act.1")
    assert ok.passed and not ok.metrics["exact"] and ok.metrics["checksum_equal"] is False
    assert "not bitwise equal" in ok.note
    assert report.verdict == "parity"


def test_bitwise_kinds_fail_on_one_ulp(tmp_path):
    def change(t):
        w = t["model.0.conv.weight"].view(-1)
        w[0] = torch.nextafter(w[0], torch.tensor(math.inf))

    report = compare_stats(*pair(tmp_path, change), profile=PROFILE)
    bad = row(report, "model.0.conv.weight")
    assert not bad.passed and "checksum differs" in bad.note


def test_nan_count_shape_and_bool_changes_fail(tmp_path):
    def change(t):
        t["act.0"][0, 0, 0, 0] = float("nan")
        t["grad.param.model.0.conv.weight"] = t["grad.param.model.0.conv.weight"].reshape(8, 27)
        t["loss.default.assign.fg_mask"][0, 0] = ~t["loss.default.assign.fg_mask"][0, 0]

    report = compare_stats(*pair(tmp_path, change), profile=PROFILE)
    assert "NAN count 1 != reference 0" in row(report, "act.0").note
    assert "shape" in row(report, "grad.param.model.0.conv.weight").note
    assert not row(report, "loss.default.assign.fg_mask").passed


def test_filler_tensor_difference_is_inconclusive_not_a_failure(tmp_path):
    def change(t):
        t["loss.default.assign.target_labels"][0, 0] += 1

    report = compare_stats(*pair(tmp_path, change), profile=PROFILE)
    r = row(report, "loss.default.assign.target_labels")
    assert r.passed and r.metrics["inconclusive"] and "inconclusive" in r.note
    assert report.coverage["inconclusive"] == ["loss.default.assign.target_labels"]


def test_coverage_lists_left_out_and_extra_tensors(tmp_path):
    def change(t):
        del t["act.1"]
        t["act.9"] = torch.zeros(2)

    report = compare_stats(*pair(tmp_path, change), profile=PROFILE)
    assert report.coverage["left_out"] == ["act.1"]
    assert report.coverage["extra_in_candidate"] == ["act.9"]
    assert report.verdict == "parity"


def test_full_dump_against_statistics_only_dump(tmp_path):
    """Dump.stats computes statistics for a dump with values: the two kinds of dump compare with each other."""
    ref = write(tmp_path / "ref", base_tensors(), stats_only=False)
    changed = base_tensors()
    changed["act.0"] = changed["act.0"] * 1.01
    cand = write(tmp_path / "cand", changed, stats_only=True, kind="candidate")
    report = compare_stats(ref, cand, profile=PROFILE)
    assert [r.name for r in report.failed_rows] == ["act.0"]
    same = compare_stats(ref, write(tmp_path / "same", base_tensors(), stats_only=True), profile=PROFILE)
    assert same.verdict == "parity" and all(r.metrics["exact"] for r in same.rows)


def test_fixture_against_its_own_statistics(tmp_path, fixtures_dir):
    ref = Dump(fixtures_dir / "yolo11-narrow-nc80-96")
    with DumpWriter(tmp_path / "stats", stats_only=True, kind="candidate") as writer:
        for name, tensor in ref.tensors():
            if name == "act.23.scores":
                tensor = tensor + 0.5
            writer.add(name, tensor)
        writer.commit({})
    report = compare_stats(ref, tmp_path / "stats", profile="cpu-fp32")
    assert [r.name for r in report.failed_rows] == ["act.23.scores"]
    assert len(report.rows) == len(ref.index)


@pytest.mark.parametrize("seed", range(6))
def test_bounds_never_fail_a_tensor_that_passes_element_wise(seed):
    """The statistic bounds are necessary conditions: any candidate inside the element-wise tolerance passes."""
    g = torch.Generator().manual_seed(seed)
    tol = Tolerance(1e-4 * seed, 1e-3, atol_absmax=1e-4 * (seed % 2), source="test")
    r = (torch.randn(4000, generator=g, dtype=torch.float64) * 10 ** (seed - 3)).float()
    absmax = float(r.abs().max())
    allowed = tol.atol + tol.atol_absmax * absmax + tol.rtol * r.double().abs()
    # worst cases: every element pushed to the edge of its tolerance, all the same way or at random
    for sign in (torch.ones_like(r), -torch.ones_like(r), torch.randint(0, 2, r.shape, generator=g) * 2.0 - 1):
        c = (r.double() + 0.999 * sign.double() * allowed).float()
        assert ((c.double() - r.double()).abs() <= allowed).all()
        entry = {"shape": [4000], "dtype": "F32"}
        passed, note, metrics = judge("act.5", entry, entry, tensor_stats(r), tensor_stats(c), "a", "b", tol)
        assert passed, note


def test_stat_bounds_formula():
    tol = Tolerance(1e-3, 1e-2, source="test")
    bounds = stat_bounds({"min": -2.0, "max": 1.0, "l2": 10.0, "n": 100}, tol)
    assert bounds["max"] == pytest.approx(1e-3 + 1e-2 * 2.0)
    assert bounds["mean"] == pytest.approx(1e-3 + 1e-2 * 1.0)
    assert bounds["l2"] == pytest.approx(10 * 1e-3 + 1e-2 * 10.0)


def test_report_is_strict_json(tmp_path):
    render = pytest.importorskip("parity.report.text")
    report = compare_stats(*pair(tmp_path, lambda t: t["act.0"].mul_(2)), profile=PROFILE)
    document = json.loads(render.to_json(report))
    assert document["verdict"] == "divergence"
    assert document["context"]["mode"] == "statistics-only"
