"""From a worker's raw series to the figures the report shows: medians and ratios of the capture, replay,
compare, verification and explainer runs, and the growth fits over the grid points."""

from __future__ import annotations

from typing import Any

from benchmarks.stats import fit_exponent, median_of, ratio_summary, summarize

_CAPTURE_PHASES = ("setup", "forward", "losses_and_head_grads", "backward_and_describe")


def _series(rows: list[dict], key: str) -> list[float]:
    return [r[key] for r in rows if r.get(key) is not None]


def analyse_step(result: dict) -> dict:
    s = result["series"]
    plain, cap = s["plain"], s["capture"]
    out = {
        "plain_step_s": summarize(_series(plain, "total")),
        "plain_forward_s": summarize(_series(plain, "forward")),
        "plain_loss_s": summarize(_series(plain, "loss")),
        "plain_backward_s": summarize(_series(plain, "backward")),
        "forward_grad_s": summarize(s.get("forward_grad", [])),
        "forward_nograd_s": summarize(s.get("forward_nograd", [])),
        "capture_s": summarize(_series(cap, "total")),
        "capture_vs_step": ratio_summary(_series(cap, "total"), _series(plain, "total")),
        "capture_phases_s": {k: summarize(_series(cap, k)) for k in _CAPTURE_PHASES},
        "captured_bytes": cap[0].get("captured_bytes") if cap else None,
        "captured_tensors": cap[0].get("captured_tensors") if cap else None,
        "capture_forward_vs_plain_forward": ratio_summary(_series(cap, "forward"), _series(plain, "forward")),
    }
    if s.get("capture_noop"):
        out.update(_noop_figures(cap, s["capture_noop"], plain))
    if s.get("capture_single"):
        out.update(_single_case_figures(s["capture_single"], plain))
    if s.get("dump"):
        out["dump_s"] = summarize(_series(s["dump"], "total"))
        out["dump_vs_step"] = ratio_summary(_series(s["dump"], "total"), _series(plain, "total"))
    return out


def _noop_figures(cap: list[dict], noop: list[dict], plain: list[dict]) -> dict:
    """The capture against the same run keeping references instead of copies: the cost of the copies."""
    return {"capture_noop_s": summarize(_series(noop, "total")),
            "capture_vs_noop": ratio_summary(_series(cap, "total"), _series(noop, "total")),
            "noop_vs_step": ratio_summary(_series(noop, "total"), _series(plain, "total")),
            "noop_phases_s": {k: summarize(_series(noop, k)) for k in _CAPTURE_PHASES},
            "copy_cost_s": summarize([a["total"] - b["total"] for a, b in zip(cap, noop)])}


def _single_case_figures(single: list[dict], plain: list[dict]) -> dict:
    """A capture of the `default` case only, and its forward-to-end phases against a plain step (like for like)."""
    like = [a["forward"] + a["losses_and_head_grads"] + a["backward_and_describe"] for a in single
            if a.get("forward") and a.get("losses_and_head_grads") and a.get("backward_and_describe")]
    return {"capture_single_s": summarize(_series(single, "total")),
            "capture_single_vs_step": ratio_summary(_series(single, "total"), _series(plain, "total")),
            "capture_single_step_phases_s": summarize(like),
            "capture_single_step_phases_vs_step": ratio_summary(like, _series(plain, "total"))}


def analyse_replay(result: dict) -> dict:
    s = result["series"]
    out = {"forward_grad_s": summarize(s["forward_grad"]), "forward_nograd_s": summarize(s["forward_nograd"]),
           "verdicts": result.get("verdicts")}
    for mode in ("isolated", "chained"):
        rows = s[mode]
        out[f"{mode}_s"] = summarize(_series(rows, "total"))
        out[f"{mode}_vs_forward_grad"] = ratio_summary(_series(rows, "total"), s["forward_grad"])
        out[f"{mode}_vs_forward_nograd"] = ratio_summary(_series(rows, "total"), s["forward_nograd"])
        out[f"{mode}_breakdown_s"] = {k: summarize(_series(rows, k)) for k in ("load_candidate", "candidate",
                                                                               "metrics", "read", "other")}
    return out


def analyse_memory(mem: dict, base: dict | None, fallback_base: float | None) -> dict:
    """Peak of one compare against the fixed base (imports + opened dumps, measured in its own process) and the
    fixed working set (peak above that base when comparing a dump of tiny tensors)."""
    mem = dict(mem)
    fixed = (base or {}).get("hwm_mb") or fallback_base
    working = (base or {}).get("fixed_working_set_mb") or 0.0
    pair_mb = mem["largest_pair_bytes"] / 2 ** 20
    mem["base_mb"] = fixed
    mem["fixed_working_set_mb"] = working
    mem["largest_pair_mb"] = pair_mb
    if fixed is not None:
        mem["above_base_mb"] = mem["peak_rss_mb"] - fixed
        mem["above_fixed_mb"] = mem["peak_rss_mb"] - fixed - working
        mem["above_base_in_pairs"] = mem["above_base_mb"] / pair_mb if pair_mb else None
        mem["above_fixed_in_pairs"] = mem["above_fixed_mb"] / pair_mb if pair_mb else None
    return mem


def analyse_compare(result: dict, base: dict | None, extra_memory: dict | None = None) -> dict:
    series = result.get("series") or []
    out: dict[str, Any] = {}
    if series:
        out.update(_throughput_figures(result, series))
    else:
        memory = next((v for k, v in result.items() if k.startswith("memory_")), None)
        if memory:
            out["total_s"] = summarize([memory["seconds"]])
            out["compare_gbs"] = summarize([memory["bytes_judged"] / memory["seconds"] / 1e9])
    for source in (result, extra_memory or {}):
        for key, value in source.items():
            if key.startswith("memory_"):
                out[key] = analyse_memory(value, base, source.get("base_rss_mb"))
    if result.get("metrics_probe"):
        out["metrics_probe"] = result["metrics_probe"]
    return out


def _throughput_figures(result: dict, series: list[dict]) -> dict:
    copy_all = result["copy"]["torch_copy_gbs"]["values"] + result["copy_after"]["torch_copy_gbs"]["values"]
    return {"compare_gbs": summarize(_series(series, "gbs")), "copy_gbs": summarize(copy_all),
            "numpy_copy_gbs": result["copy"]["numpy_copy_gbs"],
            "copy_buffer_bytes": result["copy"]["buffer_bytes"], "copy_threads": result["copy"]["torch_threads"],
            "compare_vs_copy": ratio_summary(_series(series, "gbs"), copy_all, paired=False),
            "bytes_judged": series[0]["bytes"], "tensors": series[0].get("tensors"),
            "read_s": summarize(_series(series, "read")), "metrics_s": summarize(_series(series, "metrics")),
            "total_s": summarize(_series(series, "total"))}


def analyse_verify(result: dict) -> dict:
    summary = {"sha256_gbs": result["sha256"]["gbs"], "sha256_seconds": result["sha256"]["seconds"],
               "bytes": result["sha256"]["bytes"]}
    if "xxh3_128" in result:
        summary.update({"read_hash_gbs": result["xxh3_128"]["gbs"], "read_hash_seconds": result["xxh3_128"]["seconds"]})
    for kind in ("streamed", "replay"):
        if kind in result:
            on, off = result[kind]["on"], result[kind]["off"]
            summary[kind] = {"on": summarize(on), "off": summarize(off),
                             "overhead": ratio_summary([a - b for a, b in zip(on, off)], off)}
    return summary


def explain_summary(result: dict) -> list[dict]:
    """Per (plant, place): median explain time, runs, and its ratio to one run of the place (and to one loss
    evaluation for loss places)."""
    groups: dict[tuple, list[dict]] = {}
    for row in result.get("rows", []):
        groups.setdefault((row["plant"], row["place"]), []).append(row)
    out = []
    for (plant, place), rows in groups.items():
        seconds = [r["seconds"] for r in rows]
        ratio = [r["seconds"] / r["one_run_seconds"] for r in rows if r["one_run_seconds"]]
        vs_loss = [r["seconds"] / r["loss_eval_seconds"] for r in rows if r.get("loss_eval_seconds")]
        out.append({"plant": plant, "place": place, "cause": rows[0]["cause"], "runs": rows[0]["runs"],
                    "seconds": summarize(seconds), "vs_one_run": summarize(ratio),
                    "vs_loss_eval": summarize(vs_loss) if vs_loss else None,
                    "explain_report_seconds": summarize([r["explain_report_seconds"] for r in rows])})
    return out


_GROWTH_FIGURES = {
    "plain_step_s": lambda p: median_of(p["step"].get("plain_step_s")),
    "capture_s": lambda p: median_of(p["step"].get("capture_s")),
    "capture_vs_step": lambda p: median_of(p["step"].get("capture_vs_step")),
    "plain_step_peak_rss_mb": lambda p: p.get("plain_peak_rss_mb"),
    "dump_peak_rss_mb": lambda p: p.get("dump_peak_rss_mb"),
    "capture_peak_rss_mb": lambda p: p.get("capture_peak_rss_mb"),
    "dump_bytes": lambda p: p.get("dump_bytes"),
    "compare_s": lambda p: median_of((p.get("compare") or {}).get("total_s")),
    "compare_peak_rss_mb": lambda p: ((p.get("compare") or {}).get("memory_pread") or {}).get("peak_rss_mb"),
}


def growth_fits(points: list[dict]) -> dict:
    """Exponents of each figure against batch, image size (side) and parameters, per axis of the grid."""
    fits = {}
    for axis, key in (("batch", "batch"), ("imgsz", "imgsz"), ("scale", "parameters")):
        chosen = sorted((p for p in points if axis in p["axes"]), key=lambda p: p[key] or 0)
        fits[axis] = {}
        for figure, get in _GROWTH_FIGURES.items():
            fit = fit_exponent([p[key] for p in chosen], [get(p) for p in chosen])
            if fit:
                fits[axis][figure] = fit
    return fits
