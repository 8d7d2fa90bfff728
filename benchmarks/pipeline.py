"""What users feel of the pipeline: a capture's peak memory against ultralytics' own training step, and the wall
time of `parity map` and of `make compare` with the dump present.

    python -m benchmarks.pipeline --out FILE.json [--quick] [--markdown FILE.md]

* memory: peak resident memory (the child's `ru_maxrss`, from `wait4`) of a full reference dump
  (`parity.capture.dump_reference`, written to disk) against the plain step: the same model preparation
  (seeded build, perturbed and calibrated BatchNorm) and the same batch, then `model.loss(batch)` (ultralytics'
  forward and loss) and `backward()`. yolo11n.yaml, 640, CPU, at batch 1, 2, 8, 16 (1 and 2 with `--quick`);
  each figure in a fresh process, so neither inherits the other's allocations.
* map: `python -m parity map` end to end (a fresh CLI process), run twice, the second ("warm": OS caches warm)
  reported, with the built-in candidate and with a traced clean-room port (tests/ports/models/student_v8.py).
* compare: `python -m parity compare --what all` with the built-in candidate against the default dump
  (yolo11n.yaml nc80 640 batch 2), what `make compare` runs once the dump exists; second run reported.

The dumps these need are written under runs/bench-pipeline/ on first use and kept.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "runs" / "bench-pipeline"
MODEL = "yolo11n.yaml"
IMGSZ = 640
BATCHES = (1, 2, 8, 16)
QUICK_BATCHES = (1, 2)
# the reference `make compare` uses when the dump exists (Makefile's default OUT)
COMPARE_DUMP = ROOT / "reference_dumps" / "yolo11n-nc80-640-b2-s0-assets-perturbed-cpu"
TRACED_PORT = "tests.ports.models.student_v8:build"
TRACED_MODEL = "yolov8n.yaml"
GIB = 1 << 30


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("YOLO_OFFLINE", "1")
    env.setdefault("YOLO_CONFIG_DIR", str(ROOT / "runs" / "ultralytics-config"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


# ------------------------------------------------------------------------------------------------ memory
def _plain_step(batch: int) -> None:
    """ultralytics' own forward + loss + backward on the capture's model and batch."""
    from parity.capture.batch import load_batch
    from parity.capture.reference import CaptureConfig, prepare_model

    config = CaptureConfig(model=MODEL, imgsz=IMGSZ, batch=batch)
    data = load_batch(config.images, imgsz=config.imgsz, batch=config.batch, nc=config.nc, seed=config.seed)
    model, _ = prepare_model(config, data)
    loss, _items = model.loss(data.as_loss_batch("default"))
    loss.sum().backward()


def _capture(batch: int) -> None:
    from parity.capture import CaptureConfig, dump_reference

    WORK.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix="parity-bench-", dir=WORK)) / "dump"
    try:
        dump_reference(CaptureConfig(model=MODEL, imgsz=IMGSZ, batch=batch), out)
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)


CHILDREN = {"plain": _plain_step, "capture": _capture}


def peak_of(kind: str, batch: int) -> dict:
    """Peak resident memory and wall time of one child process running `kind` at `batch`."""
    WORK.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "benchmarks.pipeline", "--child", kind, "--batch", str(batch)],
                             cwd=ROOT, env=_environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    stderr = child.stderr.read().decode(errors="replace")
    child.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{kind} at batch {batch} failed:\n{stderr[-2000:]}")
    return {"peak_bytes": usage.ru_maxrss * 1024, "seconds": round(seconds, 2)}


def measure_memory(batches=BATCHES) -> dict:
    rows = []
    for batch in batches:
        plain, capture = peak_of("plain", batch), peak_of("capture", batch)
        rows.append({"batch": batch, "plain_peak_gib": round(plain["peak_bytes"] / GIB, 3),
                     "capture_peak_gib": round(capture["peak_bytes"] / GIB, 3),
                     "excess_gib": round((capture["peak_bytes"] - plain["peak_bytes"]) / GIB, 3),
                     "plain_seconds": plain["seconds"], "capture_seconds": capture["seconds"]})
    return {"model": MODEL, "imgsz": IMGSZ, "rows": rows, "target": "capture peak <= plain step peak + 1 GiB"}


# -------------------------------------------------------------------------------------------- wall times
def _wall(argv: list[str], runs: int = 2) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "parity", *argv], cwd=ROOT, env=_environment(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        times.append(round(time.perf_counter() - started, 2))
        if done.returncode not in (0, 1):  # 1: the comparison found something, which is an answer too
            raise RuntimeError(f"parity {' '.join(argv)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return times


def ensure_dump(path: Path, model: str, batch: int = 2) -> Path:
    if not (path / "manifest.json").exists():
        from parity.capture import CaptureConfig, dump_reference

        dump_reference(CaptureConfig(model=model, imgsz=IMGSZ, batch=batch), path)
    return path


def measure_map() -> dict:
    builtin = _wall(["map", "--reference", str(ensure_dump(COMPARE_DUMP, MODEL)), "--candidate", "builtin"])
    v8 = ensure_dump(WORK / "yolov8n-nc80-640-b2", TRACED_MODEL)
    traced = _wall(["map", "--reference", str(v8), "--candidate", TRACED_PORT])
    return {"builtin_yolo11n": {"cold_s": builtin[0], "warm_s": builtin[1]},
            "traced_yolov8n": {"port": TRACED_PORT, "cold_s": traced[0], "warm_s": traced[1]},
            "target": "warm under 3 s for yolo11n"}


def measure_compare() -> dict:
    dump = ensure_dump(COMPARE_DUMP, MODEL)
    times = _wall(["compare", "--reference", str(dump), "--candidate", "builtin", "--what", "all",
                   "--device", "cpu"])
    return {"reference": str(dump.relative_to(ROOT)), "cold_s": times[0], "warm_s": times[1],
            "target": "under 6 s end to end"}


def machine_load() -> dict:
    return {"loadavg": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count()}


def run(quick: bool = False) -> dict:
    load_before = machine_load()
    results = {"memory": measure_memory(QUICK_BATCHES if quick else BATCHES), "map": measure_map(),
               "compare": measure_compare()}
    # The load average alone cannot tell this run's own earlier work from other processes': say it, judge nothing.
    results["machine"] = {"before": load_before, "after": machine_load(),
                          "note": "the load includes this benchmark's own earlier stages when run from make bench"}
    return results


def markdown(results: dict) -> str:
    memory, mapping, compare = results["memory"], results["map"], results["compare"]
    lines = ["## Pipeline: memory and wall time", "",
             f"Peak resident memory of a reference dump (`dump_reference`, {memory['model']} {memory['imgsz']}, "
             "CPU) against ultralytics' own training step (forward, loss, backward) on the same model and batch, "
             "each in a fresh process (`ru_maxrss`). Target: " + memory["target"] + ".", "",
             "| batch | plain step peak (GiB) | capture peak (GiB) | excess (GiB) | plain (s) | capture (s) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in memory["rows"]:
        lines.append(f"| {row['batch']} | {row['plain_peak_gib']:.2f} | {row['capture_peak_gib']:.2f} | "
                     f"{row['excess_gib']:+.2f} | {row['plain_seconds']:.1f} | {row['capture_seconds']:.1f} |")
    builtin, traced = mapping["builtin_yolo11n"], mapping["traced_yolov8n"]
    lines += ["", "Wall time of the CLI process: the second run (warm, OS caches warm) and the first (cold).", "",
              "| command | warm (s) | cold (s) |", "| --- | --- | --- |",
              f"| `parity map`, built-in candidate, yolo11n 640 | {builtin['warm_s']:.1f} | {builtin['cold_s']:.1f} |",
              f"| `parity map`, traced port `{traced['port']}`, yolov8n 640 | {traced['warm_s']:.1f} | "
              f"{traced['cold_s']:.1f} |",
              f"| `parity compare --what all`, built-in, `{compare['reference']}` | {compare['warm_s']:.1f} | "
              f"{compare['cold_s']:.1f} |"]
    machine = results.get("machine", {})
    if machine:
        lines += ["", f"Load average before/after: {machine['before']['loadavg']} / {machine['after']['loadavg']} "
                      f"on {machine['before']['cpus']} CPUs; {machine['note']}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--markdown", help="write the markdown section here")
    parser.add_argument("--quick", action="store_true", help="batches 1 and 2 only")
    parser.add_argument("--only", choices=("memory", "map", "compare"), help="one measurement")
    parser.add_argument("--batches", help="comma-separated batches for the memory measurement")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        CHILDREN[args.child](args.batch)
        return 0
    if args.only:
        batches = tuple(int(b) for b in args.batches.split(",")) if args.batches else \
            (QUICK_BATCHES if args.quick else BATCHES)
        results = {"memory": lambda: measure_memory(batches), "map": measure_map,
                   "compare": measure_compare}[args.only]()
        results = {args.only: results, "machine": machine_load()}
    else:
        results = run(quick=args.quick)
    text = json.dumps(results, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.markdown and not args.only:
        Path(args.markdown).write_text(markdown(results))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
