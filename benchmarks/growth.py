"""The growth stage: batch, image size and model scale around the main configuration, each point in its own
worker, cheapest first, with repeats shrunk or the dump left out (or the point skipped) when the budget cannot
hold it; then the fitted exponents over the points."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.analysis import analyse_compare, analyse_step, growth_fits
from benchmarks.runner import run_worker
from benchmarks.stages import Session
from benchmarks.stats import median_of, memory_fit
from benchmarks.workers.common import model_yaml

# compute relative to yolo11n (parameters x FLOPs, roughly)
_SCALE_COST = {"n": 1.0, "s": 3.3, "m": 10.5, "l": 13.0, "x": 29.0}
# above this cost (relative to the main point) a point captures without writing its dump
_DUMP_COST_LIMIT = 4.5


def _cost_factor(point: dict, base: dict) -> float:
    """Rough cost of a point relative to the main configuration (compute scales with batch x pixels x model)."""
    return (point["batch"] / base["batch"]) * (point["imgsz"] / base["imgsz"]) ** 2 * \
        _SCALE_COST.get(point["scale"], 1.0) / _SCALE_COST.get(base["scale"], 1.0)


def _grid(args) -> dict[tuple, set]:
    """(scale, imgsz, batch) -> the axes it lies on; the main configuration lies on all three."""
    grid: dict[tuple, set] = {}
    for b in [int(x) for x in args.grid_batch.split(",") if x]:
        grid.setdefault(("n", args.imgsz, b), set()).add("batch")
    for s in [int(x) for x in args.grid_imgsz.split(",") if x]:
        grid.setdefault(("n", s, args.batch), set()).add("imgsz")
    for sc in [x for x in args.grid_scale.split(",") if x]:
        grid.setdefault((sc, args.imgsz, args.batch), set()).add("scale")
    return grid


@dataclass
class CostModel:
    """Seconds a point is expected to take, from the main configuration's own timings."""

    unit: float  # one plain step + one capture of the main configuration
    main_dump_s: float

    def estimate(self, factor: float, repeats: int, dump: bool) -> float:
        """Import + memory runs + repeats x (plain + capture), plus the dump and its compare."""
        return 8 + factor * (self.unit * (repeats + 1.5) + (2 * self.main_dump_s if dump else 0)) * 1.3


def run_growth(session: Session, main_step: dict, main_dump: str) -> None:
    args = session.args
    base = {"scale": "n", "imgsz": args.imgsz, "batch": args.batch}
    main_summary = analyse_step(main_step)
    costs = CostModel((median_of(main_summary["plain_step_s"]) or 1.0) + (median_of(main_summary["capture_s"]) or 1.0),
                      main_step["dump"]["first_seconds"])
    point_of = lambda key: dict(zip(("scale", "imgsz", "batch"), key))  # noqa: E731
    todo = sorted(_grid(args).items(), key=lambda kv: _cost_factor(point_of(kv[0]), base))
    factors = [_cost_factor(point_of(key), base) for key, _ in todo]
    points: list[dict] = []
    session.doc["growth"] = {"points": points, "fits": {}}
    for position, (key, axes) in enumerate(todo):
        point = point_of(key)
        is_main = point == base
        plan = _plan_point(session, costs, factors, position, point)
        if plan is None:
            continue
        repeats, write_dump, reserve = plan
        entry: dict[str, Any] = {**point, "axes": sorted(axes), "repeats": repeats, "dump_written": write_dump,
                                 "model": model_yaml({**session.common, "scale": point["scale"]})}
        if is_main:
            step = main_step
            entry["repeats"] = len(main_step["series"]["plain"])
            entry["reused_main"] = True
            dump_path = main_dump if Path(main_dump).exists() else None
        else:
            dump_path = str(session.workdir / f"growth-{point['scale']}-{point['imgsz']}-{point['batch']}") \
                if write_dump else None
            step = _measure_point(session, point, sorted(axes), repeats, dump_path, reserve, entry)
            if step is None:
                continue
        _file_step(entry, step)
        if not is_main:
            session.note_early_stop(f"growth point {_label(point)}", step, repeats)
        if dump_path and Path(dump_path).exists():
            _growth_compare(session, entry, point, dump_path)
            if not is_main:
                shutil.rmtree(dump_path, ignore_errors=True)
        points.append(entry)
        session.doc["growth"]["fits"] = growth_fits(points)
        session.doc["growth"]["compare_memory_fit"] = memory_fit(points)
        session.save()


def _label(point: dict) -> str:
    return f"{point['scale']}/{point['imgsz']}/b{point['batch']}"


def _plan_point(session: Session, costs: CostModel, factors: list[float], position: int,
                point: dict) -> tuple[int, bool, float] | None:
    """(repeats, write the dump?, seconds kept for the later points) that fit the budget, or None (skipped)."""
    budget, factor = session.budget, factors[position]
    repeats = session.args.growth_repeats
    est = lambda r, dump: costs.estimate(factor, r, dump)  # noqa: E731
    write_dump = factor <= _DUMP_COST_LIMIT
    # what the points after this one need at the least (one repeat, capture only), plus CUDA and writing
    reserve = 40.0 + sum(costs.estimate(f, 1, False) for f in factors[position + 1:]
                         if costs.estimate(f, 1, False) < budget.left())
    reserve = min(reserve, max(40.0, budget.left() - est(1, False)))
    while repeats > 1 and est(repeats, write_dump) > budget.left() - reserve:
        repeats -= 1
    if write_dump and est(repeats, True) > budget.left() - reserve:
        write_dump = False
    if est(repeats, write_dump) > budget.left() - reserve:
        session.skip(f"growth point {_label(point)}: not enough time left "
                     f"(estimated {est(repeats, write_dump):.0f} s, {budget.left():.0f} s left)")
        session.progress(f"growth {_label(point)}: skipped, not enough time left")
        return None
    return repeats, write_dump, reserve


def _measure_point(session: Session, point: dict, axes: list[str], repeats: int, dump_path: str | None,
                   reserve: float, entry: dict) -> dict | None:
    budget = session.budget
    session.progress(f"growth {model_yaml({**session.common, 'scale': point['scale']})} {point['imgsz']}px batch "
                     f"{point['batch']} ({', '.join(axes)}): "
                     f"{repeats} repeats, {'dump' if dump_path else 'capture only'}")
    step, info = run_worker("step", {**session.common, **point, "repeats": repeats, "dump": bool(dump_path),
                                     "keep_dump": dump_path, "min_repeats": 1,
                                     "deadline": time.time() + max(30.0, budget.left() - reserve)},
                            timeout=budget.left())
    entry["worker"] = info
    if step is None:
        session.skip(f"growth point {_label(point)}: {info.get('error')}")
    return step


def _file_step(entry: dict, step: dict) -> None:
    """The step worker's figures of one growth point: timings, parameters and each phase's peak memory."""
    entry["step"] = analyse_step(step)
    entry["parameters"] = step.get("parameters")
    if step.get("memory_dump"):
        entry["dump_peak_rss_mb"] = step["memory_dump"]["peak_rss_mb"]
        entry["dump_bytes"] = step["dump"]["bytes_on_disk"]
        entry["largest_tensor_bytes"] = step["dump"]["largest_tensor_bytes"]
    if step.get("memory_capture"):
        entry["capture_peak_rss_mb"] = step["memory_capture"]["peak_rss_mb"]
        entry["captured_bytes"] = step["capture_once"]["captured_bytes"]
    entry["base_rss_mb"] = step.get("base_rss_mb")
    entry["plain_peak_rss_mb"] = (step.get("memory_plain_step") or {}).get("peak_rss_mb")


def _growth_compare(session: Session, entry: dict, point: dict, dump_path: str) -> None:
    """The point's dump against itself, one run in a fresh process, if the budget holds it."""
    budget = session.budget
    rate = median_of(((session.doc.get("compare") or {}).get("summary") or {}).get("compare_gbs")) or 0.1
    compare_est = 8 + (entry.get("dump_bytes") or 0) * 2 / (rate * 1e9) * 1.3
    if compare_est >= budget.left() - 40:
        session.skip(f"growth compare {_label(point)}: not enough time left")
        return
    session.progress(f"growth compare {_label(point)} (dump against itself)")
    comp, _ = run_worker("compare", {**session.common, "reference": dump_path, "candidate": dump_path,
                                     "repeats": 0, "backend": "pread"}, timeout=budget.left())
    if comp is not None:
        entry["compare"] = analyse_compare(comp, None)

