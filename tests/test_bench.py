"""Smoke tests of the benchmark code (`benchmarks/`, `make bench`) at tiny sizes.

No timing is asserted here: timings are claims of docs/benchmarks.md only. These tests check that every code
path runs, that the statistics helpers are right, and that the report says what it measured and left out.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import bench, markdown, runner, stats, system
from benchmarks.workers.compare import fused_metrics

NARROW = "fixtures/models/yolo11-narrow.yaml"


def test_summarize_median_spread_and_flag():
    s = stats.summarize([1.0, 1.1, 0.95, 1.05, 1.0])
    assert s["median"] == 1.0 and s["min"] == 0.95 and s["max"] == 1.1 and s["n"] == 5
    assert s["spread"] == pytest.approx(0.15) and not s["flag"]
    assert stats.summarize([1.0, 1.3])["flag"]
    assert not stats.summarize([1.0])["flag"]
    assert stats.summarize([])["median"] is None
    assert stats.summarize([1.0, float("nan")])["n"] == 1


def test_ratio_summary_pairs_interleaved_runs_and_else_uses_extreme_pairings():
    paired = stats.ratio_summary([2.0, 2.2, 1.8], [1.0, 1.1, 0.9])
    assert paired["paired"] and paired["median"] == pytest.approx(2.0) and paired["max"] == pytest.approx(2.0)
    # one stalled denominator spoils one pair only
    stalled = stats.ratio_summary([2.0, 2.0, 2.0], [1.0, 1.0, 20.0])
    assert stalled["median"] == pytest.approx(2.0) and stalled["min"] == pytest.approx(0.1)
    r = stats.ratio_summary([2.0, 2.2, 1.8], [1.0, 1.1, 0.9], paired=False)
    assert r["median"] == pytest.approx(2.0)
    assert r["min"] == pytest.approx(1.8 / 1.1) and r["max"] == pytest.approx(2.2 / 0.9)
    assert stats.ratio_summary([], [1.0])["median"] is None


def test_memory_fit_recovers_base_and_slope():
    points = [{"compare": {"memory_pread": {"largest_pair_bytes": x * 2 ** 20, "peak_rss_mb": 500 + 1.5 * x}}}
              for x in (10, 40, 100)]
    fit = stats.memory_fit(points)
    assert fit["slope_pairs"] == pytest.approx(1.5) and fit["fixed_mb"] == pytest.approx(500)


def test_fit_exponent_recovers_a_power_law():
    xs = [1, 2, 8, 16]
    fit = stats.fit_exponent(xs, [3.0 * x ** 1.5 for x in xs])
    assert fit["exponent"] == pytest.approx(1.5)
    assert fit["per_doubling"] == pytest.approx(2 ** 1.5)
    assert fit["max_log_residual"] == pytest.approx(0.0, abs=1e-12)
    assert stats.fit_exponent([1], [1]) is None
    assert stats.fit_exponent([1, 2], [0, 1]) is None  # a zero cannot be fitted in log space


def test_peak_memory_mark_resets():
    big = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB touched
    big.add_(1)
    before = system.hwm_mb()
    del big
    with system.Phase() as phase:
        pass
    assert phase.peak_mb is not None
    if phase.reset:
        assert phase.peak_mb < before


def test_markdown_states_targets_load_and_left_out():
    doc = {"machine": {"cpu_model": "test cpu", "usable_cpus": 2, "versions": {"torch": "x"}},
           "threads": 2, "load_average_start": [3.0, 2.0, 1.0], "load_average_end": [1.0, 1.0, 1.0],
           "skipped": ["growth point m/640/b2: not enough time left"], "wall_seconds": 1.0,
           "cuda": {"skipped": "CUDA is not available"}}
    text = markdown.render_markdown(doc)
    for heading in ("## Machine", "## Headline", "## Capture", "## Replay", "## Compare", "## Growth", "## CUDA",
                    "## Left out of this run"):
        assert heading in text
    assert "Taken under load" in text
    assert "≤ 1.3x" in text and "≤ 2x" in text and "≥ 0.33x" in text
    assert "not enough time left" in text and "CUDA is not available" in text


def test_cell_marks_spread_over_twenty_percent():
    assert "**±" in markdown.cell(stats.summarize([1.0, 2.0]))
    assert "**±" not in markdown.cell(stats.summarize([1.0, 1.1]))


def test_fused_metrics_agree_with_compare_tensors():
    from parity.compare.metrics import compare_tensors
    from parity.compare.tolerances import Tolerance

    r = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    c = r.clone()
    c[::3] = torch.nextafter(c[::3], torch.tensor(math.inf))
    values = [float(v) for v in fused_metrics(r, c, 1e-5, 1e-5, 4)]
    metrics = compare_tensors(r, c, Tolerance(1e-5, 1e-5, max_ulp=4))
    assert values[0] == pytest.approx(metrics.max_abs)
    assert int(values[8]) == metrics.max_ulp == 1
    assert int(values[9]) == metrics.mismatched == 0


@pytest.mark.slow  # 2-11 s here (a subprocess, a browser or full-size builds); make test-fast skips it
def test_worker_subprocess_round_trip(fixtures_dir):
    """The subprocess runner: a worker's result comes back through stdout, its peak memory through wait4."""
    dump = str(fixtures_dir / "yolo11-narrow-nc80-96")
    result, info = runner.run_worker("compare-base", {"reference": dump, "candidate": dump, "threads": 1},
                                    timeout=300)
    assert info.get("error") is None, info
    assert result["rss_mb"] > 0 and info["maxrss_mb"] >= result["rss_mb"] * 0.5


@pytest.mark.slow
def test_quick_bench_end_to_end(tmp_path):
    """`python -m benchmarks.bench --quick`: every section runs at tiny sizes and is written to md and json."""
    out = tmp_path / "docs"
    code = bench.main(["--quick", "--inprocess", "--template", NARROW, "--out", str(out), "--budget", "900",
                       "--workdir", str(tmp_path / "work")])
    assert code == 0
    doc = json.loads((out / "benchmarks.json").read_text())
    text = (out / "benchmarks.md").read_text()
    assert doc["quick"] and "Quick mode" in text
    assert doc["machine"]["usable_cpus"] >= 1 and doc["machine"]["torch_threads"] >= 1
    cap = doc["capture"]["summary"]
    for key in ("plain_step_s", "capture_s", "capture_vs_step", "capture_vs_noop", "dump_vs_step",
                "capture_single_step_phases_vs_step"):
        assert cap[key]["median"] > 0, key
    assert doc["capture"]["raw"]["dump"]["tensors"] > 100
    rep = doc["replay"]["summary"]
    assert rep["verdicts"]["isolated"]["verdict"] == "parity"
    assert rep["isolated_vs_forward_nograd"]["median"] > 0 and rep["chained_vs_forward_nograd"]["median"] > 0
    comp = doc["compare"]["summary"]
    assert comp["compare_gbs"]["median"] > 0 and comp["copy_gbs"]["median"] > 0
    assert comp["memory_pread"]["largest_pair_mb"] > 0 and "memory_mmap" in comp
    assert comp["memory_pread"]["verdict"] == "parity"  # one ULP is inside every tolerance
    assert comp["metrics_probe"]["by_size"] and comp["metrics_probe"]["dot"]["dot_us"]["median"] > 0
    assert comp["metrics_probe"]["bitwise_equal_gbs"]["median"] > 0
    assert doc["capture"]["raw"]["memory_plain_step"]["peak_rss_mb"] > 0
    points = doc["growth"]["points"]
    assert {p["batch"] for p in points} <= {1, 2} and points
    if len(points) == 2:
        assert "batch" in doc["growth"]["fits"] and doc["growth"]["fits"]["batch"]
    if not torch.cuda.is_available():
        assert "CUDA is not available" in doc["cuda"]["skipped"]
    assert not runner.INPROCESS
