"""The stages of one `make bench` run, in order, inside one time budget: capture on the main configuration (its
dump feeds the rest), replay, compare (with the fused-kernel probe and the checksum verification), growth,
CUDA, the explainer, then any extra sections. Each stage runs its workers, files their analysis in the document
and writes the outputs, so a run stopped half-way still leaves what it measured."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from benchmarks.analysis import analyse_compare, analyse_replay, analyse_step, analyse_verify, explain_summary
from benchmarks.markdown import TARGETS, write_outputs
from benchmarks.runner import ROOT, run_worker
from benchmarks.system import Contention, load_average, machine_info, versions_and_threads
from benchmarks.workers.common import model_yaml
from benchmarks.workers.explain import EXPLAIN_PLANTS

SCHEMA = "yolo-parity-benchmarks"
SCHEMA_VERSION = 1
SMALL_DUMP = ROOT / "fixtures" / "yolo11-narrow-nc80-96"


class Budget:
    def __init__(self, seconds: float):
        self.t0 = time.perf_counter()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def deadline(self, share: float) -> float:
        """Epoch seconds by which a stage given `share` of the whole budget should end (never past the budget)."""
        return time.time() + max(0.0, min(self.left(), share * self.seconds))


@dataclass(frozen=True)
class Extra:
    """A section beyond the built-in ones: `run(session)` measures and files its figures in `session.doc[name]`
    (after the built-in stages), `markdown(doc)` renders them (after the built-in sections)."""

    name: str
    run: Callable[["Session"], None]
    markdown: Callable[[dict], list[str]]


@dataclass
class Session:
    """One run: its options, the document it fills, the budget, and where it writes."""

    args: Any  # the parsed options of benchmarks.bench
    doc: dict
    budget: Budget
    workdir: Path
    out_dir: Path
    common: dict  # worker parameters every stage passes: model template, threads, scratch folder
    extras: list[Extra] = field(default_factory=list)
    contention: Contention = field(default_factory=Contention)

    def progress(self, message: str) -> None:
        self.contention.mark(message)
        print(f"[{self.budget.elapsed():6.1f}s] {message}", file=sys.stderr, flush=True)

    def save(self) -> None:
        write_outputs(self.doc, self.out_dir, [extra.markdown for extra in self.extras])

    def skip(self, what: str) -> None:
        self.doc["skipped"].append(what)

    def note_early_stop(self, what: str, result: dict, planned: int) -> None:
        if result.get("stopped_early") is not None:
            self.skip(f"{what}: {result['stopped_early']} of {planned} planned repeats (time budget)")


def new_document(args, threads: int) -> dict:
    return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "quick": args.quick,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "machine": {**machine_info(), **versions_and_threads()},
            "load_average_start": load_average(), "targets": TARGETS, "skipped": [],
            "settings": {k: v for k, v in vars(args).items() if k != "worker"}, "threads": threads}


def run_stages(session: Session) -> None:
    """Every built-in stage but the explainer, on the main configuration, then the growth grid and CUDA."""
    from benchmarks.growth import run_growth

    args = session.args
    main_point = {**session.common, "scale": "n", "imgsz": args.imgsz, "batch": args.batch}
    ref_dump = str(session.workdir / "reference")
    step = capture_stage(session, main_point, ref_dump)
    if step is None:
        return
    replay_stage(session, ref_dump)
    compare_stage(session, main_point, ref_dump, str(session.workdir / "candidate"))
    if not args.no_growth:
        run_growth(session, step, ref_dump)
    shutil.rmtree(ref_dump, ignore_errors=True)
    cuda_stage(session, main_point)


def capture_stage(session: Session, main_point: dict, ref_dump: str) -> dict | None:
    """Capture overhead on the main configuration; keeps its dump for the replay and the compare."""
    args, budget = session.args, session.budget
    session.progress(f"capture vs plain step: {model_yaml(main_point)} {args.imgsz}px batch {args.batch}, "
                     f"{args.repeats} repeats")
    step, info = run_worker("step", {**main_point, "repeats": args.repeats, "dump": True, "keep_dump": ref_dump,
                                     "noop": True, "single_case": True, "dump_each": True, "contiguity": True,
                                     "min_repeats": 2, "deadline": budget.deadline(0.30)},
                            timeout=budget.left())
    session.doc["capture"] = {"worker": info}
    if step is None:
        session.skip(f"capture: {info.get('error')}")
        return None
    session.doc["capture"].update({"raw": step, "summary": analyse_step(step)})
    session.note_early_stop("capture", step, args.repeats)
    session.save()
    return step


def replay_stage(session: Session, ref_dump: str) -> None:
    args, budget = session.args, session.budget
    session.progress(f"replay (built-in candidate), isolated and chained, {args.repeats} repeats")
    replay, info = run_worker("replay", {**session.common, "dump": ref_dump, "repeats": args.repeats,
                                         "warmup": not args.quick, "min_repeats": 2,
                                         "deadline": budget.deadline(0.12)},
                              timeout=budget.left())
    session.doc["replay"] = {"worker": info}
    if replay is not None:
        session.doc["replay"].update({"raw": replay, "summary": analyse_replay(replay)})
        session.note_early_stop("replay", replay, args.repeats)
    else:
        session.skip(f"replay: {info.get('error')}")
    session.save()


def compare_stage(session: Session, main_point: dict, ref_dump: str, cand_dump: str) -> None:
    """Throughput, memory, copy bandwidth and the metric probe against a 1-ULP candidate, then the fused-kernel
    probe and the checksum verification on the same pair."""
    budget = session.budget
    session.progress("candidate dump (reference + 1 ULP on every third element)")
    made, info = run_worker("make-candidate", {**session.common, "dump": ref_dump, "out": cand_dump},
                            timeout=budget.left())
    if made is None:
        session.skip(f"compare: candidate dump failed: {info.get('error')}")
        session.save()
        return
    pair = {**session.common, "reference": ref_dump, "candidate": cand_dump}
    _streamed_compare(session, pair, made)
    _fused_probe(session, pair)
    verify_stage(session, pair, main_point)
    shutil.rmtree(cand_dump, ignore_errors=True)
    session.save()


def _streamed_compare(session: Session, pair: dict, made: dict) -> None:
    budget, repeats = session.budget, max(3, session.args.repeats - 2)
    session.progress("compare: fixed base and working set")
    base, _ = run_worker("compare-base", {**pair, "small_dump": str(SMALL_DUMP)}, timeout=budget.left())
    session.progress(f"streamed compare (pread), {repeats} repeats, copy bandwidth, metric probe")
    comp, info = run_worker("compare", {**pair, "repeats": repeats, "backend": "pread", "metrics_probe": True,
                                        "min_repeats": 2, "deadline": budget.deadline(0.08)}, timeout=budget.left())
    session.progress("compare memory through Dump.get (mmap)")
    mmap, _ = run_worker("compare", {**pair, "repeats": 0, "backend": "mmap"}, timeout=budget.left())
    session.doc["compare"] = {"worker": info, "base": base, "candidate_seconds": made["seconds"], "mmap": mmap}
    if comp is not None:
        session.doc["compare"].update({"raw": comp, "summary": analyse_compare(comp, base, mmap)})
        session.note_early_stop("compare", comp, repeats)
    else:
        session.skip(f"compare: {info.get('error')}")


def _fused_probe(session: Session, pair: dict) -> None:
    budget = session.budget
    if session.args.no_fused or budget.left() <= 420:
        session.skip("fused-kernel probe: not enough time left")
        return
    session.progress("fused-kernel probe (torch.compile of the metric set)")
    fused, info = run_worker("fused", {**pair, "repeats": 3}, timeout=min(budget.left(), 240))
    session.doc["compare"]["fused"] = fused or {"skipped": info.get("error")}


def verify_stage(session: Session, pair: dict, main_point: dict) -> None:
    args, budget = session.args, session.budget
    session.progress("checksum verification on read: streamed compare and replay, on vs off")
    ver, info = run_worker("verify", {**pair, "repeats": 3 if not args.quick else 1, "min_repeats": 1,
                                      "deadline": budget.deadline(0.08)}, timeout=budget.left())
    session.doc["verify"] = {"worker": info, "point": {"model": model_yaml(main_point), "imgsz": args.imgsz,
                                                       "batch": args.batch}}
    if ver is not None:
        session.doc["verify"].update({"raw": ver, "summary": analyse_verify(ver)})


def cuda_stage(session: Session, main_point: dict) -> None:
    session.progress("CUDA")
    cuda, info = run_worker("cuda", {**main_point, "repeats": session.args.repeats,
                                     "keep_dump": str(session.workdir / "cuda-ref")},
                            timeout=max(5.0, session.budget.left()))
    session.doc["cuda"] = cuda if cuda is not None else {"skipped": info.get("error")}
    if cuda and "step" in cuda:
        session.doc["cuda"]["summary"] = {"step": analyse_step(cuda["step"]), "replay": analyse_replay(cuda["replay"])}


def explain_stage(session: Session) -> None:
    session.progress(f"explainer time per divergent place, {len(EXPLAIN_PLANTS)} plants")
    explained, info = run_worker("explain", {**session.common, "repeats": 1 if session.args.quick else 3},
                                 timeout=max(5.0, session.budget.left()))
    session.doc["explain"] = {"worker": info}
    if explained is not None:
        session.doc["explain"].update({"raw": explained, "summary": explain_summary(explained)})
    else:
        session.skip(f"explain: {info.get('error')}")


def extra_stages(session: Session) -> None:
    for extra in session.extras:
        session.progress(f"extra section: {extra.name}")
        extra.run(session)
        session.save()


def finish(session: Session) -> None:
    """What the document says about the whole run, written whether or not every stage ran."""
    session.contention.mark("end")
    session.doc["contention"] = session.contention.stages
    session.doc["load_average_end"] = load_average()
    session.doc["wall_seconds"] = session.budget.elapsed()
    session.save()


def run_verify_only(args, out_dir: Path, extras: list[Extra]) -> int:
    """`--only-verify`: measure the verification section alone and merge it into the existing benchmarks.json
    (the other sections keep their figures)."""
    from parity.capture import CaptureConfig, dump_reference

    path = out_dir / "benchmarks.json"
    doc = json.loads(path.read_text()) if path.exists() else {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "quick": args.quick,
        "machine": {**machine_info(), **versions_and_threads()}, "skipped": [], "settings": {}, "threads": None}
    workdir = Path(tempfile.mkdtemp(prefix="parity-bench-verify-"))
    try:
        model = args.template.format(scale="n")
        ref, cand = workdir / "reference", workdir / "candidate"
        dump_reference(CaptureConfig(model=model, imgsz=args.imgsz, batch=args.batch), ref)
        made, info = run_worker("make-candidate", {"dump": str(ref), "out": str(cand)}, timeout=600)
        if made is None:
            raise SystemExit(f"candidate dump failed: {info.get('error')}")
        result, info = run_worker("verify", {"reference": str(ref), "candidate": str(cand),
                                             "repeats": args.repeats, "threads": args.threads}, timeout=1200)
        doc["verify"] = {"worker": info, "point": {"model": model, "imgsz": args.imgsz, "batch": args.batch,
                                                   "repeats": args.repeats, "load_average": load_average()}}
        if result is not None:
            doc["verify"].update({"raw": result, "summary": analyse_verify(result)})
        write_outputs(doc, out_dir, [extra.markdown for extra in extras])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0
