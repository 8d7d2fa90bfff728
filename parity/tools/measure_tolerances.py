"""Measure how far ultralytics drifts from ITSELF when only the CPU thread count changes.

This is where the numbers in `parity/compare/tolerances.py` (profile `cpu-fp32`) and docs/tolerances.md come
from. For each model and image size, in a fresh process:

1. the reference capture (`parity.capture.reference.run_capture`: seeded build, perturbed BatchNorm, the
   `assets` batch, train-mode forward, every loss case, backward) runs with torch threads 1, 2 and 4;
2. every captured tensor of the 1- and 4-thread runs is compared with the 2-thread run (2 is the default
   thread count of a reference dump), giving the *chained* spread (errors accumulated through the network);
3. every layer is re-run on its own at 1, 2 and 4 threads on the 2-thread run's inputs, giving the
   *isolated* spread (one layer's rounding only); at 2 threads this must be bitwise, which checks the replay;
4. the loss is re-evaluated at 1 and 4 threads on the 2-thread run's head outputs (loss arithmetic only).

For every group of tensors it records the largest |d|, the largest relative error, the largest float32 ULP
distance and the smallest atol that would have passed at rtol 0, 1e-6, 1e-5 and 1e-4 (over all elements:
max(|d| - rtol*|ref|)), and per layer the spread in units of float32 epsilon of the tensor's largest value
(its growth with depth is what the GPU profiles are scaled by).

Usage (about 10 minutes for the default set on this 2-core machine):

    YOLO_OFFLINE=1 python -m parity.tools.measure_tolerances --out runs/tolerances/measurements.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RTOLS = (0.0, 1e-6, 1e-5, 1e-4)
FP32_EPS = 2.0 ** -23


def _stats(ref, cand) -> dict:
    import torch

    from parity.compare.metrics import compare_tensors
    from parity.compare.tolerances import Tolerance

    m = compare_tensors(ref, cand, Tolerance(0.0, 0.0, source="measurement"))
    out = {"max_abs": m.max_abs, "max_rel": m.max_rel, "max_ulp": m.max_ulp, "exact": m.exact,
           "numel": m.numel, "shape": m.ref_shape}
    if ref.dtype.is_floating_point and ref.shape == cand.shape and ref.numel():
        r = ref.double()
        d = (cand.double() - r).abs()
        d = torch.nan_to_num(d, nan=0.0)
        out["min_atol"] = {str(rt): max(0.0, float((d - rt * r.abs()).max())) for rt in RTOLS}
        scale = float(r.abs().max())
        out["ref_absmax"] = scale
        out["eps_of_absmax"] = (m.max_abs / (scale * FP32_EPS)) if scale else 0.0
        # relative error of the elements that are not tiny (|ref| above 1e-3 of the tensor's largest value)
        big = r.abs() > 1e-3 * scale
        out["max_rel_nontiny"] = float((d[big] / r.abs()[big]).max()) if bool(big.any()) else 0.0
    elif not ref.dtype.is_floating_point:
        out["min_atol"] = {str(rt): (0.0 if m.passed else None) for rt in RTOLS}
    return out


def _group(name: str) -> str:
    from parity.dump import names

    parts = name.split(".")
    if parts[0] == "act":
        index = parts[1]
        rest = parts[2:]
        if not rest or rest[0].isdigit() or rest[-1] in names.HEAD_OUTPUTS:
            return "activation"
        if rest == ["dfl"]:
            return "activation"
        return "activation-submodule"
    if parts[0] == "loss":
        return "loss"
    if parts[:2] == ["grad", "param"]:
        return "grad-param"
    if parts[:2] == ["grad", "head"]:
        return "grad-head"
    if parts[0] == "model":
        return "weights-after-calibration"
    return parts[0]


def measure_one(model_yaml: str, imgsz: int, threads: list[int], batch: int) -> dict:
    from parity import runtime

    runtime.prepare(2)
    import torch

    from parity.capture.batch import load_batch
    from parity.capture.reference import CaptureConfig, prepare_model, run_capture

    config = CaptureConfig(model=model_yaml, nc=80, imgsz=imgsz, batch=batch, images="assets")
    captures = {}
    timings = {}
    for t in threads:
        torch.set_num_threads(t)
        start = time.perf_counter()
        captures[t] = run_capture(config)
        timings[t] = time.perf_counter() - start
    base_t = 2 if 2 in threads else threads[0]
    base = captures[base_t].tensors
    layers = captures[base_t].manifest["model"]["layers"]
    result = {"model": model_yaml, "imgsz": imgsz, "batch": batch, "baseline_threads": base_t,
              "capture_seconds": timings, "chained": {}, "isolated": {}, "loss_only": {}, "per_layer": {}}
    for t in threads:
        if t != base_t:
            result["chained"][str(t)], result["per_layer"][str(t)] = _chained_spread(base, captures[t].tensors)
    batch_obj = load_batch("assets", imgsz=imgsz, batch=batch, nc=80, seed=config.seed)
    for t in threads:
        torch.set_num_threads(base_t)
        model, _ = prepare_model(config, batch_obj)
        model.train()
        torch.set_num_threads(t)
        result["isolated"][str(t)] = _isolated_spread(model, layers, base)
        loss_only = _loss_only_spread(model, layers, base, batch_obj)
        if loss_only is not None:
            result["loss_only"][str(t)] = loss_only
    torch.set_num_threads(2)
    return result


def _chained_spread(base: dict, captured: dict) -> tuple[dict, dict]:
    """A whole capture against the baseline's: (reduced statistics per group, per-layer spread in eps)."""
    from parity.dump import names

    groups: dict[str, list] = {}
    per_layer = {}
    for name, ref in base.items():
        cand = captured.get(name)
        if cand is None or name.startswith("batch.") or name.startswith("init."):
            continue
        s = _stats(ref, cand)
        s["name"] = name
        groups.setdefault(_group(name), []).append(s)
        layer = names.layer_of(name)
        if name.startswith("act.") and _group(name) == "activation":
            per_layer.setdefault(layer, []).append(s.get("eps_of_absmax", 0.0))
    return ({g: _reduce(v) for g, v in groups.items()},
            {str(k): max(v) for k, v in sorted(per_layer.items())})


def _isolated_spread(model, layers: list[dict], base: dict) -> dict:
    """Each layer re-run on its own on the baseline's inputs, at the current thread count."""
    import torch

    from parity.dump import names

    stats = []
    for entry in layers:
        i = entry["index"]
        inputs = [base[n] for n in entry["inputs"]]
        layer = model.model[i]
        arg = inputs[0] if len(inputs) == 1 else inputs
        with torch.no_grad():
            out = layer(arg)
        outs = {}
        if isinstance(out, dict):
            for key in names.HEAD_OUTPUTS:
                outs[names.act(i, key)] = out[key]
        else:
            outs[names.act(i)] = out
        for name, tensor in outs.items():
            if name in base:
                s = _stats(base[name], tensor)
                s["name"] = name
                stats.append(s)
    return _reduce(stats)


def _loss_only_spread(model, layers: list[dict], base: dict, batch_obj) -> dict | None:
    """The loss of the baseline's head outputs at the current thread count (None for end-to-end heads, which
    are not part of the default measurement)."""
    import torch

    from parity.capture.reference import Capture, head_of, loss_recorders
    from parity.dump import names

    head = head_of(model)
    last = len(model.model) - 1
    feats = [base[names.act(j)] for j in layers[last]["from"]]
    preds = {"boxes": base[names.act(last, "boxes")].clone().requires_grad_(True),
             "scores": base[names.act(last, "scores")].clone().requires_grad_(True), "feats": feats}
    if getattr(head, "one2one_cv2", None) is not None:
        return None
    model.criterion = model.init_criterion()
    staged = Capture()
    recorders = loss_recorders(model, staged)
    loss_stats = []
    try:
        for case in names.LOSS_CASES:
            for recorder in recorders:
                recorder.case = case
            loss, items = model.loss({k: v for k, v in batch_obj.as_loss_batch(case).items()}, preds)
            for key, value in (("loss", loss), ("items", torch.stack(list(items.values())))):
                name = names.loss_output(case, key)
                s = _stats(base[name], value.detach())
                s["name"] = name
                loss_stats.append(s)
            grads = torch.autograd.grad(loss.sum(), [preds["boxes"], preds["scores"]])
            for key, g in zip(("boxes", "scores"), grads):
                # the baseline's grad of the summed loss = sum of the per-term head grads
                ref = sum(base[f"grad.head.{case}.{term}.{key}"] for term in names.LOSS_TERMS)
                s = _stats(ref, g)
                s["name"] = f"grad.head.{case}.sum.{key}"
                loss_stats.append(s)
    finally:
        for recorder in recorders:
            recorder.remove()
    for name, tensor in staged.tensors.items():
        if name in base:
            s = _stats(base[name], tensor)
            s["name"] = name
            loss_stats.append(s)
    return _reduce(loss_stats)


def _reduce(stats: list[dict]) -> dict:
    """The worst value of each statistic over a group, and which tensor it came from."""
    out = {"tensors": len(stats), "exact": sum(1 for s in stats if s.get("exact"))}
    ranked = sorted((s for s in stats if s.get("min_atol") and s["min_atol"].get("1e-05") is not None),
                    key=lambda s: -s["min_atol"]["1e-05"])
    out["worst"] = [{"name": s["name"], "min_atol_1e-5": s["min_atol"]["1e-05"], "max_abs": s["max_abs"],
                     "ref_absmax": s.get("ref_absmax"), "max_rel_nontiny": s.get("max_rel_nontiny")}
                    for s in ranked[:8]]
    inexact = [s["name"] for s in stats if not s.get("exact") and s.get("min_atol") and
               s["min_atol"].get("0.0") is None]
    out["exact_compare_failures"] = inexact
    # every tensor, compactly: name, |ref| max, max |d|, min atol at each rtol (for fitting atol + scale*|ref|max)
    out["all"] = [[s["name"], s.get("ref_absmax"), s.get("max_abs"),
                   [s["min_atol"].get(str(rt)) for rt in RTOLS] if s.get("min_atol") else None] for s in stats]
    for key in ("max_abs", "max_rel", "max_ulp", "max_rel_nontiny", "eps_of_absmax"):
        values = [(s.get(key), s["name"]) for s in stats if s.get(key) is not None]
        if values:
            worst = max(values, key=lambda v: v[0])
            out[key] = worst[0]
            out[f"{key}_at"] = worst[1]
    for rt in RTOLS:
        values = [(s["min_atol"][str(rt)], s["name"]) for s in stats
                  if s.get("min_atol") and s["min_atol"].get(str(rt)) is not None]
        if values:
            worst = max(values, key=lambda v: v[0])
            out.setdefault("min_atol", {})[str(rt)] = worst[0]
            out.setdefault("min_atol_at", {})[str(rt)] = worst[1]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["yolo11n.yaml", "yolov8n.yaml"])
    parser.add_argument("--imgsz", nargs="+", type=int, default=[160, 320, 640])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--out", default="runs/tolerances/measurements.json")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "IMGSZ"), help=argparse.SUPPRESS)
    parser.add_argument("--from-json", help="summarise an earlier measurement instead of measuring again")
    args = parser.parse_args(argv)
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())["results"]
        print(summary(results))
        print()
        print(fit_table(results))
        return 0
    if args.one:
        print(json.dumps(measure_one(args.one[0], int(args.one[1]), args.threads, args.batch)))
        return 0
    results = []
    for model in args.models:
        for imgsz in args.imgsz:
            # a fresh process per model: parse_model sets class-level state (Detect.legacy)
            start = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-m", "parity.tools.measure_tolerances", "--one", model, str(imgsz),
                 "--threads", *map(str, args.threads), "--batch", str(args.batch)],
                capture_output=True, text=True, check=False,
            )
            if proc.returncode:
                sys.stderr.write(proc.stderr)
                return proc.returncode
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            result["seconds"] = time.perf_counter() - start
            results.append(result)
            print(f"{model} imgsz {imgsz}: {result['seconds']:.0f} s", file=sys.stderr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from parity.runtime import versions

    out.write_text(json.dumps({"versions": versions(), "threads": args.threads, "results": results}, indent=1))
    print(summary(results))
    print()
    print(fit_table(results))
    return 0


FIT_RTOL = "1e-05"
SMALL = 0.01  # tensors whose max|ref| is below this are fitted by an absolute floor, the rest per max|ref|


def fit_groups(results: list[dict]) -> dict[str, list[tuple]]:
    """Per-tensor records (run, name, max|ref|, min atol at each rtol) grouped as the tolerance kinds use them."""
    groups: dict[str, list[tuple]] = {}
    for res in results:
        tag = f"{Path(res['model']).stem} {res['imgsz']}"
        for t, by_group in res["chained"].items():
            for group, s in by_group.items():
                key = {"activation": "activation", "activation-submodule": "activation", "loss": "loss-chained",
                       "grad-head": "grad (head, chained)", "grad-param": "grad",
                       "weights-after-calibration": "weights after calibration"}.get(group, group)
                for name, absmax, max_abs, mins in s.get("all", []):
                    groups.setdefault(key, []).append((f"{tag} t{t}", name, absmax, mins))
        for t, s in res["isolated"].items():
            for name, absmax, max_abs, mins in s.get("all", []):
                groups.setdefault("activation-isolated", []).append((f"{tag} t{t}", name, absmax, mins))
        for t, s in res["loss_only"].items():
            for name, absmax, max_abs, mins in s.get("all", []):
                key = "grad-isolated" if name.startswith("grad") else "loss"
                groups.setdefault(key, []).append((f"{tag} t{t}", name, absmax, mins))
    return groups


def fit_table(results: list[dict]) -> str:
    """The numbers behind parity/compare/tolerances.py: at rtol 1e-5, the worst min-atol per max|ref| (tensors with
    max|ref| >= 0.01) and the worst absolute min-atol (the others); the tolerance is 10x, rounded up."""
    from parity.compare.tolerances import _round_up

    index = [str(r) for r in RTOLS].index(str(float(FIT_RTOL)))
    lines = [f"fit at rtol {FIT_RTOL}: |d| <= floor + scale * max|ref| (+ rtol |ref|); proposed = 10x, rounded up",
             "| kind | tensors | worst scale (max|ref| >= 0.01) | at | worst floor (max|ref| < 0.01) | proposed |",
             "| --- | --- | --- | --- | --- | --- |"]
    for key, items in sorted(fit_groups(results).items()):
        items = [i for i in items if i[3] is not None and i[3][index] is not None and i[2] is not None]
        big = [i for i in items if i[2] >= SMALL]
        small = [i for i in items if i[2] < SMALL]
        worst = max(big, key=lambda i: i[3][index] / i[2], default=None)
        scale = worst[3][index] / worst[2] if worst else 0.0
        floor = max((i[3][index] for i in small), default=0.0)
        proposed = f"atol {_round_up(10 * floor):g} + {_round_up(10 * scale):g}*max|ref|"
        lines.append(f"| {key} | {len(items)} | {scale:.3g} | {worst[0] + ' ' + worst[1] if worst else '-'} | "
                     f"{floor:.3g} | {proposed} |")
    return "\n".join(lines)


def summary(results: list[dict]) -> str:
    """A markdown table of the worst value per group over every model, size and thread count."""
    rows = {}
    for res in results:
        for mode in ("chained", "isolated", "loss_only"):
            for t, groups in res[mode].items():
                if mode != "chained":
                    groups = {mode: groups}
                for group, s in groups.items():
                    key = f"{mode}:{group}" if mode == "chained" else mode
                    row = rows.setdefault(key, {"max_abs": 0.0, "max_rel_nontiny": 0.0, "max_ulp": 0,
                                                "min_atol": {str(r): 0.0 for r in RTOLS}, "where": {}})
                    row["max_abs"] = max(row["max_abs"], s.get("max_abs") or 0.0)
                    row["max_rel_nontiny"] = max(row["max_rel_nontiny"], s.get("max_rel_nontiny") or 0.0)
                    row["max_ulp"] = max(row["max_ulp"], s.get("max_ulp") or 0)
                    for r in RTOLS:
                        v = (s.get("min_atol") or {}).get(str(r))
                        if v is not None and v >= row["min_atol"][str(r)]:
                            row["min_atol"][str(r)] = v
                            row["where"][str(r)] = f"{res['model']} {res['imgsz']} t{t}: {(s.get('min_atol_at') or {}).get(str(r))}"
    lines = ["| group | max abs | max rel (non-tiny) | max ulp | min atol @rtol 0 | @1e-6 | @1e-5 | @1e-4 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key, row in sorted(rows.items()):
        m = row["min_atol"]
        lines.append(f"| {key} | {row['max_abs']:.3g} | {row['max_rel_nontiny']:.3g} | {row['max_ulp']} | "
                     f"{m['0.0']:.3g} | {m['1e-06']:.3g} | {m['1e-05']:.3g} | {m['0.0001']:.3g} |")
    lines.append("")
    lines.append("per-layer spread (chained, |d|max / (eps32 * |ref|max)), worst over runs:")
    per_layer: dict[str, dict[str, float]] = {}
    for res in results:
        key = f"{res['model']} {res['imgsz']}"
        for t, layers in res["per_layer"].items():
            for layer, value in layers.items():
                per_layer.setdefault(key, {})[layer] = max(per_layer.get(key, {}).get(layer, 0.0), value)
    for key, layers in per_layer.items():
        lines.append(f"  {key}: " + " ".join(f"{k}:{v:.0f}" for k, v in sorted(layers.items(), key=lambda kv: int(kv[0]))))
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
