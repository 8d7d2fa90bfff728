"""Benchmarks of yolo-parity on this machine: `make bench` (`python -m benchmarks.bench`) writes
docs/benchmarks.md and docs/benchmarks.json. Not part of `make test`.

What is measured (every figure a median of several runs, with min and max; spread over 20 % is flagged):

* capture: a full reference dump (`dump_reference`, written to disk) and the capture alone (`run_capture`, no
  disk) against one plain ultralytics training step (forward + loss + backward) on the same batch, with the
  capture's phases timed from its own progress callbacks and a run that does all the capture's work but keeps
  references instead of copies (`Capture.put` replaced), which isolates the cost of the copies;
* replay: `compare_layers` with the built-in candidate, isolated and chained separately, against one plain
  forward (train mode, with and without autograd), with the time split into candidate, metrics and reading;
* compare: a streamed dump-against-dump comparison (`parity.compare.stream`), in GB/s of tensor data judged
  (reference + candidate bytes), against this machine's memory-copy bandwidth measured in the same process
  (read + write bytes, the STREAM convention, so both count the bytes that cross the memory bus);
* memory: peak resident memory of a dump and of a compare, each measured in a fresh subprocess (VmHWM, reset
  per phase through /proc/self/clear_refs, cross-checked with the child's ru_maxrss from wait4);
* growth: batch, image size and model scale, with fitted exponents;
* CUDA: the same capture and replay timings with `torch.cuda.synchronize()` around timed regions, when a GPU
  is present (skipped with the reason otherwise).

Heavy work runs in worker subprocesses (`python -m benchmarks.bench --worker KIND`, benchmarks/workers/), so
each has its own memory figures and ultralytics' process-global state never leaks between model sizes. A time budget (default 14
minutes) shrinks repeats and drops the most expensive growth points when the machine is slower than planned;
anything left out is said in the output.

This module is the entry: the options and the order of the stages. The rest, by concern: stats.py (medians,
ratios, fits), system.py (/proc readings: memory, machine, contention), workers/ (what each subprocess measures),
runner.py (running a worker), analysis.py (raw series -> figures), stages.py and growth.py (one run's stages in
its budget), markdown.py (docs/benchmarks.md and .json).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from benchmarks import pipeline, runner
from benchmarks.stages import (Budget, Extra, Session, explain_stage, extra_stages, finish, new_document, run_stages,
                               run_verify_only)

# ---- extra sections ------------------------------------------------------------------------------------------
# Sections beyond the built-in ones: each runs after the built-in stages (not with --explain-only or
# --only-verify) and renders after the built-in sections.


def _pipeline_run(session: Session) -> None:
    """Capture memory against the batch, `parity map` and `parity compare` wall times (benchmarks/pipeline.py)."""
    if session.args.quick:  # a smoke run: the pipeline needs full-size yolo11n dumps (minutes)
        session.doc["pipeline"] = {"skipped": "not measured in a --quick run"}
        return
    session.progress("pipeline: capture peak memory at each batch, map and compare wall times")
    session.doc["pipeline"] = pipeline.run()


def _pipeline_markdown(doc: dict) -> list[str]:
    section = doc.get("pipeline")
    if not section:
        return []
    if "skipped" in section:
        return ["", "## Pipeline: memory and wall time", "", section["skipped"] + "."]
    return ["", *pipeline.markdown(section).splitlines()]


EXTRA_SECTIONS: list[Extra] = [Extra("pipeline", run=_pipeline_run, markdown=_pipeline_markdown)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "JSON"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="folder for benchmarks.md and benchmarks.json (default docs/)")
    parser.add_argument("--budget", type=float, default=840.0, help="seconds for the whole run (default 840)")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of the main configuration (default 5)")
    parser.add_argument("--growth-repeats", type=int, default=3, help="repeats of each growth point (default 3)")
    parser.add_argument("--template", default="yolo11{scale}.yaml", help="model yaml, {scale} is n/s/m")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--grid-batch", default="1,2,8,16")
    parser.add_argument("--grid-imgsz", default="320,640,1280")
    parser.add_argument("--grid-scale", default="n,s,m")
    parser.add_argument("--no-growth", action="store_true", help="only the main configuration")
    parser.add_argument("--no-fused", action="store_true", help="leave out the torch.compile fused-kernel probe")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and one repeat: checks the code paths (tests), numbers mean nothing")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default 2, as parity)")
    parser.add_argument("--workdir", default=None, help="scratch folder for dumps (default: a temporary folder)")
    parser.add_argument("--explain-only", action="store_true",
                        help="only the explainer's time per divergent place (the committed fixtures, no dump)")
    parser.add_argument("--only-verify", action="store_true",
                        help="measure only the checksum-verification section and merge it into benchmarks.json")
    parser.add_argument("--inprocess", action="store_true",
                        help="run the workers in this process (tests: faster; memory figures lose their meaning)")
    return parser


def _quick(args) -> None:
    """`--quick`: tiny sizes and one repeat."""
    args.imgsz, args.batch, args.repeats, args.growth_repeats = 64, 1, 1, 1
    args.grid_batch, args.grid_imgsz, args.grid_scale = "1,2", "64", "n"
    args.no_fused = True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        return runner.run_worker_main(*args.worker)
    if args.quick:
        _quick(args)
    from parity.runtime import PROJECT_ROOT, prepare

    threads = prepare(args.threads)
    out_dir = Path(args.out) if args.out else PROJECT_ROOT / "docs"
    runner.INPROCESS = args.inprocess
    try:
        if args.only_verify:
            return run_verify_only(args, out_dir, EXTRA_SECTIONS)
        return _run(args, threads, out_dir)
    finally:
        runner.INPROCESS = False


def _run(args, threads: int, out_dir: Path) -> int:
    budget = Budget(args.budget)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="parity-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    doc = new_document(args, threads)
    session = Session(args, doc, budget, workdir, out_dir,
                      common={"template": args.template, "threads": threads, "workdir": str(workdir)},
                      extras=list(EXTRA_SECTIONS))
    session.progress(f"benchmarks into {out_dir} (budget {args.budget:.0f} s, scratch {workdir})")
    session.progress(f"machine: {doc['machine']['cpu_model']}, {doc['machine']['usable_cpus']} cpus, "
                     f"{doc['machine'].get('memory_gib')} GiB, torch threads {threads}, load {doc['load_average_start']}")
    try:
        if not args.explain_only:
            run_stages(session)
        explain_stage(session)
        if not args.explain_only:
            extra_stages(session)
    finally:
        finish(session)
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    session.progress(f"done: {out_dir / 'benchmarks.md'}, {out_dir / 'benchmarks.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
