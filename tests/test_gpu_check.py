"""`make gpu-check` (benchmarks/gpu_check.py), its CPU-side logic: the plan, judging a step, the results file, and
the exit code 2 without a GPU. The CUDA run itself needs a GPU (none here); it appends to docs/cuda-results.md.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from benchmarks import gpu_check
from benchmarks.gpu_check import Step, StepResult, judge, plan, results_section

ROOT = Path(__file__).resolve().parent.parent


def test_the_plan_covers_the_whole_cuda_path(tmp_path):
    steps = plan(tmp_path)
    names = [s.name for s in steps]
    for wanted in ("dump cuda-fp32", "dump cuda-tf32", "dump cuda-bf16", "dump cpu-fp32", "envelope cuda",
                   "builtin on cuda vs cuda reference", "builtin on cuda vs cpu reference",
                   "inject bias-init-float32 on cuda", "inject bias-init-float64 on cuda",
                   "inject missing-sigmoid on cuda", "bench cuda section"):
        assert wanted in names
    by_name = {s.name: s for s in steps}
    assert by_name["builtin on cuda vs cuda reference"].expect == "parity"
    assert by_name["inject bias-init-float64 on cuda"].expect == "named:bias-init-float64"
    # every step that reads a dump comes after the step that writes it
    written = set()
    for step in steps:
        if "--reference" in step.argv:
            assert step.argv[step.argv.index("--reference") + 1] in written, step.name
        if "--out" in step.argv:
            written.add(step.argv[step.argv.index("--out") + 1])
    assert sum(s.timeout for s in steps) > gpu_check.BUDGET_S, "each step has room; the budget stops the run"


def test_every_planned_command_parses_with_parity_s_parser(tmp_path):
    from parity.cli.main import build_parser
    from parity.compare.tolerances import PROFILES

    for step in plan(tmp_path):
        if step.argv[0] == "--bench-cuda":
            continue
        args = build_parser().parse_args(step.argv)
        if getattr(args, "profile", None):
            assert args.profile in PROFILES


def test_judging_a_step():
    named = Step("inject x", ["compare"], 10, "named:bias-init-float32", "r.json")
    report = {"verdict": "divergence", "summary": {"failed": 3, "checks": 50},
              "findings": [{"signature": "bias-init-float32", "severity": "error"}]}
    result = judge(named, 1, "", "", report, 2.0)
    assert result.status == "pass" and result.detail == "divergence: 3 of 50 checks failed; errors: bias-init-float32"
    assert judge(named, 1, "", "", {**report, "findings": []}, 2.0).status == "FAIL", "a bug must be named"
    clean = Step("clean", ["compare"], 10, "parity", "r.json")
    assert judge(clean, 0, "", "", {"verdict": "parity", "summary": {"failed": 0, "checks": 50}}, 1).status == "pass"
    assert judge(clean, 1, "", "", report, 1).status == "FAIL", "a false alarm fails the check"
    dump = Step("dump", ["dump"], 10)
    assert judge(dump, 2, "", "error: no CUDA\n", None, 1).detail == "exit 2: error: no CUDA"


@pytest.mark.slow  # 2-11 s here (a subprocess, a browser or full-size builds); make test-fast skips it
def test_a_real_compare_step_runs_and_is_judged_on_cpu(tmp_path, fixtures_dir):
    report = tmp_path / "r.json"
    step = Step("inject bias-init-float32 on cpu", ["compare", "--reference", str(fixtures_dir / "yolov8-narrow-nc12-96"),
                                                    "--inject", "bias-init-float32", "--what", "layers",
                                                    "--json", str(report)], 300, "named:bias-init-float32", str(report))
    result = gpu_check.run_step(step, 300)
    assert result.status == "pass", result.detail
    assert "bias-init-float32" in result.detail


def test_results_section_and_the_results_file(tmp_path):
    facts = {"gpu": "NVIDIA Example 80GB", "capability": "9.0", "cuda": "13.0", "cudnn": 91000, "driver": "580.1",
             "versions": {"ultralytics": "8.4.190", "torch": "2.14.1+cu130", "tool": "0.1.0", "python": "3.11.7"}}
    results = [StepResult("dump cuda-fp32", "pass", 12.3, "done"),
               StepResult("inject missing-sigmoid on cuda", "FAIL", 20.0, "parity: 0 of 10 checks failed"),
               StepResult("bench cuda section", "not run", 0.0, "the 480 s budget was spent")]
    section = results_section(facts, results, model="yolo11n.yaml", imgsz=320,
                              when=datetime(2026, 12, 1, 22, 0, tzinfo=timezone.utc))
    lines = section.splitlines()
    assert lines[0] == "## NVIDIA Example 80GB — 2026-12-01 22:00 UTC"
    assert "ultralytics 8.4.190, torch 2.14.1+cu130" in section and "**1 of 3 steps passed** in 32 s." in section
    assert "| inject missing-sigmoid on cuda | FAIL | 20.0 | parity: 0 of 10 checks failed |" in lines
    path = tmp_path / "cuda-results.md"
    gpu_check.append_results(section, path)
    gpu_check.append_results(section, path)
    text = path.read_text()
    assert text.startswith("# CUDA results") and text.count("# CUDA results") == 1 and text.count("## NVIDIA") == 2


def test_without_a_gpu_it_exits_2_and_says_why(capsys, monkeypatch, tmp_path):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    results = tmp_path / "results.md"
    assert gpu_check.main(["--results", str(results), "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no CUDA device: torch ") and "make gpu-check needs an NVIDIA GPU" in err
    assert not results.exists() and not (tmp_path / "w").exists(), "nothing written"


def test_make_gpu_check_is_the_last_makefile_target():
    makefile = (ROOT / "Makefile").read_text()
    assert "\ngpu-check:" in makefile and "-m benchmarks.gpu_check" in makefile
    assert makefile.rstrip().splitlines()[-1].strip().endswith("-m benchmarks.gpu_check $(GPU_CHECK_ARGS)")


@pytest.mark.skipif(not Path(gpu_check.RESULTS).exists(), reason="docs/cuda-results.md not written yet")
def test_the_results_file_says_what_it_is():
    assert gpu_check.RESULTS.read_text().startswith("# CUDA results")
