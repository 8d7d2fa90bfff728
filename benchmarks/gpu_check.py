"""`make gpu-check`: the whole CUDA path in one command, on whatever GPU is present, in under 8 minutes.

It dumps the reference on CUDA (float32 deterministic, TF32, bf16 autocast) and on the CPU, measures the CUDA
noise envelope, compares the built-in candidate on CUDA against the CUDA and the CPU references (and the TF32
and bf16 ones under their profiles), plants `bias-init-float32`, `bias-init-float64` and `missing-sigmoid` on
CUDA and demands that each is named, and times the bench's CUDA section. The results are appended to
docs/cuda-results.md, one section per run (GPU model, date, versions); the reports and dumps stay in
runs/gpu-check/. Without a GPU it exits 2 and says why. Every step is a subprocess with its own time limit;
steps the budget no longer allows are listed as not run.

It lives beside the benchmarks, outside the wheel, because its last step runs the bench's CUDA worker.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from parity.runtime import PROJECT_ROOT

RESULTS = PROJECT_ROOT / "docs" / "cuda-results.md"
WORKDIR = PROJECT_ROOT / "runs" / "gpu-check"
BUDGET_S = 480.0
NARROW = "fixtures/models/yolo11-narrow.yaml"
# pure float32 bias arithmetic is one ULP off ultralytics' at nc=12, pure float64 at nc=8 (docs/causes of
# parity.reimpl.inject): each injection needs the class count where it is visible
INJECTIONS = (("bias-init-float32", 12), ("bias-init-float64", 8), ("missing-sigmoid", 80))


@dataclass
class Step:
    name: str
    argv: list[str]  # `python -m parity ...` arguments, or ["--bench-cuda", ...] for the bench worker
    timeout: float
    expect: str = "ok"  # "ok": exit 0; "parity": exit 0 and verdict parity; "named:SIG": exit 1 naming SIG; "any"
    report: str | None = None  # the JSON report it writes


@dataclass
class StepResult:
    name: str
    status: str  # "pass", "FAIL", "not run"
    seconds: float
    detail: str
    data: dict[str, Any] = field(default_factory=dict)


def plan(workdir: Path = WORKDIR, *, model: str = "yolo11n.yaml", imgsz: int = 320, device: str = "cuda") -> list[Step]:
    """Every step, in order; the dumps of the first steps feed the later ones."""
    ref = {name: str(workdir / f"ref-{name}") for name in ("cuda-fp32", "cuda-tf32", "cuda-bf16", "cpu-fp32")}
    capture = ["--model", model, "--imgsz", str(imgsz)]
    steps = [Step(f"dump {name}", ["dump", *capture, "--device", device if name != "cpu-fp32" else "cpu",
                                   "--precision", name.split("-")[1], "--out", path, "--force"], 150)
             for name, path in ref.items()]
    steps.append(Step("envelope cuda", ["envelope", "--device", device, *capture, "--threads-list", "2", "--no-float64",
                                        "--out", str(workdir / f"envelope-cuda-{Path(model).stem}-{imgsz}.json"),
                                        "--force"], 200))

    def compare(name: str, reference: str, *extra: str, expect: str = "parity") -> Step:
        report = str(workdir / f"{name.replace(' ', '-')}.json")
        return Step(name, ["compare", "--reference", reference, "--candidate", "builtin", "--device", device,
                           *extra, "--json", report], 150, expect, report)

    steps += [compare("builtin on cuda vs cuda reference", ref["cuda-fp32"]),
              compare("builtin on cuda vs cpu reference", ref["cpu-fp32"], "--profile", "cuda-fp32"),
              compare("builtin on cuda vs tf32 reference", ref["cuda-tf32"], "--profile", "cuda-tf32", expect="any"),
              compare("builtin on cuda vs bf16 reference", ref["cuda-bf16"], "--profile", "amp-bf16", expect="any")]
    for injection, nc in INJECTIONS:
        if nc == 80:
            reference = ref["cuda-fp32"]
        else:
            reference = str(workdir / f"ref-narrow-nc{nc}")
            steps.append(Step(f"dump narrow nc{nc} cuda", ["dump", "--model", NARROW, "--nc", str(nc), "--imgsz", "96",
                                                           "--device", device, "--out", reference, "--force"], 90))
        steps.append(compare(f"inject {injection} on cuda", reference, "--inject", injection,
                             expect=f"named:{injection}"))
    steps.append(Step("bench cuda section", ["--bench-cuda", model, str(imgsz), str(workdir / "bench-cuda-ref")], 240))
    return steps


# ------------------------------------------------------------------------------------------------ run
def run_step(step: Step, timeout: float) -> StepResult:
    started = time.perf_counter()
    if step.argv[0] == "--bench-cuda":
        command = [sys.executable, "-m", "benchmarks.gpu_check", *step.argv]
    else:
        command = [sys.executable, "-m", "parity", "--no-progress", *step.argv]
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=PROJECT_ROOT, env=env,
                              check=False)
    except subprocess.TimeoutExpired:
        return StepResult(step.name, "FAIL", time.perf_counter() - started, f"timed out after {timeout:.0f} s")
    seconds = time.perf_counter() - started
    report = json.loads(Path(step.report).read_text()) if step.report and Path(step.report).exists() else None
    return judge(step, proc.returncode, proc.stdout, proc.stderr, report, seconds)


def judge(step: Step, code: int, stdout: str, stderr: str, report: dict | None, seconds: float) -> StepResult:
    """Whether a step did what the check demands, and one line saying what it found."""
    last = (stderr.strip().splitlines() or stdout.strip().splitlines() or [""])[-1][:200]
    if step.argv[0] == "--bench-cuda":
        data = json.loads(stdout.strip().splitlines()[-1]) if code == 0 and stdout.strip() else {}
        ok = code == 0 and "summary" in data
        return StepResult(step.name, "pass" if ok else "FAIL", seconds, bench_line(data) if ok else f"exit {code}: {last}",
                          data)
    if report is None:
        ok = code == 0 and step.expect in ("ok", "any")
        return StepResult(step.name, "pass" if ok else "FAIL", seconds, "done" if code == 0 else f"exit {code}: {last}")
    findings = [f["signature"] for f in report.get("findings", []) if f.get("severity") == "error"]
    summary = report.get("summary") or {}
    detail = (f"{report.get('verdict')}: {summary.get('failed', '?')} of {summary.get('checks', '?')} checks failed"
              + (f"; errors: {', '.join(findings[:4])}" if findings else ""))
    if step.expect == "parity":
        ok = code == 0 and report.get("verdict") == "parity"
    elif step.expect.startswith("named:"):
        ok = code == 1 and step.expect.split(":", 1)[1] in findings
    else:
        ok = code in (0, 1)
    return StepResult(step.name, "pass" if ok else "FAIL", seconds, detail, {"verdict": report.get("verdict")})


def bench_line(data: dict) -> str:
    step, replay = (data.get("summary") or {}).get("step") or {}, (data.get("summary") or {}).get("replay") or {}

    def median(entry) -> str:
        value = (entry or {}).get("median") if isinstance(entry, dict) else entry
        return f"{value:.3g}" if isinstance(value, (int, float)) else "-"

    return (f"plain step {median(step.get('plain_step_s'))} s, capture {median(step.get('capture_s'))} s "
            f"({median(step.get('capture_vs_step'))}x), isolated replay {median(replay.get('isolated_vs_forward_nograd'))}x"
            f" / chained {median(replay.get('chained_vs_forward_nograd'))}x a no-grad forward")


def run_all(steps: list[Step], budget: float = BUDGET_S, log=print) -> list[StepResult]:
    deadline = time.perf_counter() + budget
    results = []
    for step in steps:
        left = deadline - time.perf_counter()
        if left < 10:
            results.append(StepResult(step.name, "not run", 0.0, f"the {budget:.0f} s budget was spent"))
            continue
        log(f"[gpu-check] {step.name} (at most {min(step.timeout, left):.0f} s)")
        results.append(run_step(step, min(step.timeout, left)))
        log(f"[gpu-check]   {results[-1].status}: {results[-1].detail}")
    return results


def bench_cuda(model: str, imgsz: int, keep_dump: str) -> int:
    """The bench's CUDA section (`benchmarks.workers.cuda.worker_cuda`), its summary on stdout's last line."""
    from benchmarks.analysis import analyse_replay, analyse_step
    from benchmarks.workers.cuda import worker_cuda

    raw = worker_cuda({"template": model, "model": model, "scale": "n", "imgsz": imgsz, "batch": 2,
                             "threads": 2, "workdir": str(Path(keep_dump).parent), "repeats": 3,
                             "keep_dump": keep_dump})
    if "skipped" in raw:
        print(json.dumps(raw))
        return 2
    raw["summary"] = {"step": analyse_step(raw["step"]), "replay": analyse_replay(raw["replay"])}
    print(json.dumps({"summary": raw["summary"], "device_name": raw.get("device_name"), "cuda": raw.get("cuda")},
                     default=str))
    return 0


# ------------------------------------------------------------------------------------------- results
def gpu_facts() -> dict[str, Any]:
    import torch

    from parity.runtime import _nvidia_driver, versions

    return {"gpu": torch.cuda.get_device_name(0), "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "driver": _nvidia_driver(),
            "versions": versions()}


def results_section(facts: dict[str, Any], results: list[StepResult], *, model: str, imgsz: int,
                    when: datetime | None = None) -> str:
    """One markdown section of docs/cuda-results.md."""
    when = when or datetime.now(timezone.utc)
    v = facts.get("versions") or {}
    passed = sum(r.status == "pass" for r in results)
    lines = [f"## {facts.get('gpu')} — {when:%Y-%m-%d %H:%M} UTC", "",
             f"compute capability {facts.get('capability')}, driver {facts.get('driver')}, CUDA {facts.get('cuda')}, "
             f"cuDNN {facts.get('cudnn')}; ultralytics {v.get('ultralytics')}, torch {v.get('torch')}, "
             f"yolo-parity {v.get('tool')}, python {v.get('python')}. Model {model} at {imgsz} px, batch 2.", "",
             f"**{passed} of {len(results)} steps passed** in {sum(r.seconds for r in results):.0f} s.", "",
             "| step | result | seconds | what it found |", "| --- | --- | ---: | --- |"]
    for r in results:
        lines.append(f"| {r.name} | {r.status} | {r.seconds:.1f} | {r.detail.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


HEADER = """# CUDA results

Written by `make gpu-check` (`benchmarks/gpu_check.py`), one section per run, newest last: what the whole CUDA path
gave on that GPU. docs/cuda.md says what each step means. Nothing here is measured on a machine without a GPU.

"""


def append_results(section: str, path: Path = RESULTS) -> Path:
    text = path.read_text() if path.exists() else HEADER
    path.write_text(text.rstrip("\n") + "\n\n" + section)
    return path


def no_gpu_reason() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return (f"no CUDA device: torch {torch.__version__} (CUDA build {torch.version.cuda}) sees none "
                f"(torch.cuda.is_available() is False); make gpu-check needs an NVIDIA GPU and driver")
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--bench-cuda"]:
        return bench_cuda(argv[1], int(argv[2]), argv[3])
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="yolo11n.yaml")
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all steps (default %(default)s)")
    parser.add_argument("--results", default=str(RESULTS), help="markdown file the results are appended to")
    parser.add_argument("--workdir", default=str(WORKDIR))
    args = parser.parse_args(argv)
    from parity.runtime import prepare

    prepare()
    reason = no_gpu_reason()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    results = run_all(plan(workdir, model=args.model, imgsz=args.imgsz, device=args.device), args.budget)
    section = results_section(gpu_facts(), results, model=args.model, imgsz=args.imgsz)
    print(section)
    print(f"appended to {append_results(section, Path(args.results))}")
    return 0 if all(r.status == "pass" for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
