"""Structure before numbers: parameter counts, output shapes, BatchNorm settings and the Detect bias init.

Each check adds `Row`s (section "structure") and, when something is wrong, a `Finding` with a stable signature:

    param-count-mismatch   a layer holds more or fewer parameters than ultralytics' (which layer, how many)
    shape-mismatch         a layer's output shape differs (which dimension, by what factor; NHWC vs NCHW)
    bn-eps, bn-momentum    BatchNorm settings other than ultralytics' eps 1e-3 / momentum 0.03
    bias-init-float32      class bias computed all in float32: one ULP from ultralytics' mixed arithmetic
    bias-init-float64      class bias computed all in float64: one ULP from ultralytics' mixed arithmetic
    bias-init-skipped      no Detect bias init: PyTorch's default uniform conv bias (or zeros) remains
    bias-init-nonfinite    the class bias is -inf/inf/NaN (log of 0: C integer division 5 / nc)
    bias-init-formula      finite, applied, but neither arithmetic of log(5 / nc / (640 / stride) ** 2)
    bias-init-box          the box-branch bias is not ultralytics' 2.0 (1.0 before 8.4.0)
    upsample-mode          an Upsample output that is another interpolation of its input (bilinear vs nearest)
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from parity.dump import names
from parity.replay.candidates import (REFERENCE_BN_EPS, REFERENCE_BN_MOMENTUM, Candidate, default_conv_bias_bound,
                                      final_conv_bias_key)
from parity.replay.layers import layer_where
from parity.compare.metrics import compare_tensors, shape_difference
from parity.compare.tolerances import BITWISE, Tolerance
from parity.dump.files import Dump
from parity.findings import Finding, Report, Row

SECTION = "structure"
BIAS_SECTION = "bias init"


def _ref_type(reference: Dump, index: int) -> str:
    for entry in reference.layers:
        if entry.get("index") == index:
            return entry.get("type", "?")
    return "?"


# ------------------------------------------------------------------------------------------ parameters
def _allowed_missing_by_layer(reference: Dump, candidate: Candidate) -> dict[int, list[tuple[str, int]]]:
    """Reference tensors the mapping lets the candidate lack (a DFL conv weight): [(key, numel)] per layer.
    Without a mapping (a candidate dump, which counts trainable parameters, docs/dump-format.md), the reference's
    frozen parameters: those it recorded without a gradient."""
    mapping = getattr(candidate, "mapping", None)
    if mapping is None:
        return _frozen_by_layer(reference)
    out: dict[int, list[tuple[str, int]]] = {}
    for key in mapping.missing:
        if key in mapping.missing_required or key.rsplit(".", 1)[-1] in ("running_mean", "running_var",
                                                                          "num_batches_tracked"):
            continue
        layer = names.layer_of(key)
        if layer is not None:
            out.setdefault(layer, []).append((key, int(math.prod(mapping.ref_shapes[key]))))
    return out


def _frozen_by_layer(reference: Dump) -> dict[int, list[tuple[str, int]]]:
    without_grad = (reference.manifest.get("gradients") or {}).get("parameters_without_grad") or []
    out: dict[int, list[tuple[str, int]]] = {}
    for key in without_grad:
        layer, entry = names.layer_of(key), reference.index.get(key)
        if layer is not None and entry is not None:
            out.setdefault(layer, []).append((key, int(math.prod(entry.get("shape", [])))))
    return out


def check_param_counts(reference: Dump, candidate: Candidate, report: Report) -> list[int]:
    """One row per layer (reference vs candidate parameter count). Returns the layers that differ.

    A reference layer without parameters that the candidate computes without a module of its own (an
    `F.interpolate`, a `torch.cat`) is no mismatch, and neither are non-trainable tensors the mapping allows the
    candidate to lack (ultralytics counts its frozen DFL conv weight among Detect's parameters)."""
    cand = candidate.param_counts()
    if cand is None:
        report.coverage.setdefault("not_checked", []).append(
            "parameter counts per layer (the candidate gives no layer structure: add a layer_map)")
        return []
    ref = {e["index"]: int(e.get("parameters", 0)) for e in reference.layers if "index" in e}
    allowed = _allowed_missing_by_layer(reference, candidate)
    differing = [index for index in sorted(set(ref) | set(cand))
                 if not _param_count_row(report, index, ref.get(index), cand.get(index), allowed.get(index, []))]
    totals = (sum(ref.values()), sum(cand.values()))
    report.context["parameters"] = {"reference": totals[0], "candidate": totals[1]}
    for index in differing:
        report.find(_param_count_finding(reference, candidate, index, ref.get(index), cand.get(index), totals))
    return differing


def _param_count_row(report: Report, index: int, r: int | None, c: int | None,
                     allowed: list[tuple[str, int]]) -> bool:
    """The layer's row; whether its counts agree (up to the tensors the candidate may leave out)."""
    left_out = sum(n for _, n in allowed)
    if r == 0 and c is None:
        report.add(Row(SECTION, layer_where(index), "parameters", True,
                       note="reference 0, none in the candidate (no parameters)"))
        return True
    passed = r == c or (r is not None and c is not None and left_out and r - left_out == c)
    note = f"reference {r:,}" if r is not None else "not in the reference"
    note += f", candidate {c:,}" if c is not None else ", not in the candidate"
    if r is not None and c is not None and r != c:
        note += f" ({c - r:+,})"
        if passed:
            keys = ", ".join(k.split(".", 2)[2] for k, _ in allowed)
            note += f": {left_out:,} in {keys}, not trainable, which the candidate may leave out"
    report.add(Row(SECTION, layer_where(index), "parameters", bool(passed), note=note))
    return bool(passed)


def _param_count_finding(reference: Dump, candidate: Candidate, index: int, r: int | None, c: int | None,
                         totals: tuple[int, int]) -> Finding:
    total_r, total_c = totals
    if r is None or c is None:
        message = (f"layer {index} exists only in the {'candidate' if r is None else 'reference'} "
                   f"({(c if r is None else r):,} parameters)")
    else:
        more = "more" if c > r else "fewer"
        message = (f"layer {index} ({_ref_type(reference, index)}) has {abs(c - r):,} {more} parameters than "
                   f"ultralytics' ({c:,} vs {r:,}); whole model {total_c:,} vs {total_r:,} ({total_c - total_r:+,})")
        detail = structure_difference(reference, candidate, index)
        if detail:
            message += f". {detail}"
    return Finding("param-count-mismatch", layer_where(index), message,
                   evidence={"layer": index, "reference": r, "candidate": c,
                             "difference": None if r is None or c is None else c - r,
                             "model_reference": total_r, "model_candidate": total_c})


def structure_difference(reference: Dump, candidate: Candidate, index: int) -> str:
    """Words for how a layer's tensors differ: extra or missing sub-modules and tensors of other shapes."""
    mapping = getattr(candidate, "mapping", None)
    if mapping is None:
        return ""
    from parity.replay.mapping import describe_block_difference

    return describe_block_difference(mapping, index, _ref_type(reference, index))


# -------------------------------------------------------------------------------------------- shapes
def check_output_shapes(reference: Dump, outputs: dict[str, list[int]], report: Report, *, mode: str) -> list[int]:
    """Rows for the layers whose outputs were produced (shapes only). Returns layers with a wrong shape."""
    bad = []
    for entry in reference.layers:
        index = entry["index"]
        problems = []
        seen = False
        for name, ref_shape in entry.get("outputs", {}).items():
            if name not in outputs:
                continue
            seen = True
            cand_shape = list(outputs[name])
            if list(ref_shape) != cand_shape:
                note, perm = shape_difference(list(ref_shape), cand_shape)
                problems.append((name, ref_shape, cand_shape, note, perm))
        if not seen:
            continue
        passed = not problems
        note = "; ".join(f"{n}: {note}" for n, _, _, note, _ in problems) if problems else "as the reference"
        report.add(Row(SECTION, layer_where(index), "output shape", passed, note=note))
        if problems:
            bad.append(index)
            name, ref_shape, cand_shape, note, perm = problems[0]
            hint = ""
            if entry.get("type") == "Concat" and len(ref_shape) == len(cand_shape) and ref_shape[1] and \
                    cand_shape[1] != ref_shape[1]:
                hint = f"; a Concat {cand_shape[1] / ref_shape[1]:.3g}x as wide: check which inputs it concatenates"
            report.find(Finding(
                "shape-mismatch", layer_where(index),
                f"layer {index} ({entry.get('type', '?')}) output {name} has shape {cand_shape}, ultralytics "
                f"{list(ref_shape)} ({note}){hint} [{mode}]",
                evidence={"layer": index, "tensor": name, "reference": list(ref_shape), "candidate": cand_shape,
                          "permutation": perm, "mode": mode}))
    return bad


# ------------------------------------------------------------------------------------------ batchnorm
def check_batchnorms(candidate: Candidate, report: Report) -> None:
    bns = candidate.batchnorms()
    if not bns:
        return
    by_layer: dict[Any, dict[str, list]] = {}
    for bn in bns:
        if not math.isclose(bn["eps"], REFERENCE_BN_EPS, rel_tol=1e-9):
            by_layer.setdefault(bn["layer"], {}).setdefault("eps", []).append(bn)
        if bn["momentum"] is None or not math.isclose(bn["momentum"], REFERENCE_BN_MOMENTUM, rel_tol=1e-9):
            by_layer.setdefault(bn["layer"], {}).setdefault("momentum", []).append(bn)
    report.context["batchnorm"] = {"modules": len(bns), "reference_eps": REFERENCE_BN_EPS,
                                   "reference_momentum": REFERENCE_BN_MOMENTUM}
    for layer, issues in sorted(by_layer.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
        where = layer_where(layer) if layer is not None else "model"
        for what, items in issues.items():
            values = sorted({b[what] for b in items}, key=lambda v: (v is None, v or 0))
            paths = [b["path"] for b in items]
            reference = REFERENCE_BN_EPS if what == "eps" else REFERENCE_BN_MOMENTUM
            effect = ("changes every normalised output in train and eval mode" if what == "eps" else
                      "does not change a train-mode forward, but the running statistics (and so eval results and "
                      "later steps) drift")
            report.add(Row(SECTION, where, f"batchnorm {what}", False,
                           note=f"{len(items)} BatchNorm(s) with {what} {', '.join(map(str, values))}; "
                                f"ultralytics {reference:g}"))
            report.find(Finding(
                f"bn-{what}", where,
                f"{len(items)} BatchNorm module(s) in {where} use {what} {', '.join(map(str, values))} instead of "
                f"ultralytics' {reference:g} (set by initialize_weights); this {effect}. First: {paths[0]}",
                evidence={"layer": layer, "values": values, "reference": reference, "modules": paths[:20]}))


# ------------------------------------------------------------------------------------------ bias init
def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    from parity.compare.metrics import ulp_distance

    if a.dtype != torch.float32 or b.dtype != torch.float32 or a.shape != b.shape:
        return -1
    finite = torch.isfinite(a) & torch.isfinite(b)
    if not bool(finite.all()):
        return -1
    return int(ulp_distance(a, b).max()) if a.numel() else 0


def _bitwise(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bool((a.contiguous().view(torch.int32) == b.contiguous().view(torch.int32)).all()) if a.dtype == torch.float32 \
        else torch.equal(a, b)


def diagnose_bias_init(reference: Dump, candidate: Candidate, report: Report) -> None:
    """Compare the candidate's OWN fresh Detect bias init with the reference's, bit for bit, per stride."""
    strides = reference.model.get("strides") or []
    fresh = _fresh_biases(reference, candidate, report)
    if not fresh:
        return
    all_same = True
    results = []
    for level, stride in enumerate(strides):
        stored = reference.get_optional(names.init_bias("cls_bias", level, "stored"))
        if stored is None or level not in fresh or "cls" not in fresh[level]:
            continue
        f32 = reference.get(names.init_bias("cls_bias", level, "float32"))
        f64 = reference.get(names.init_bias("cls_bias", level, "float64"))
        all_same &= _bitwise(stored, f32) and _bitwise(stored, f64)
        signatures = _judge_cls_level(reference, report, level, stride, fresh, (stored, f32, f64))
        results.append(signatures[0] if signatures else None)
        if "bias-init-skipped" not in signatures:
            _judge_box_level(reference, report, level, stride, fresh[level])
    if all_same and results:
        _say_indistinguishable(reference, report, all(s is None for s in results))


def _fresh_biases(reference: Dump, candidate: Candidate, report: Report) -> dict | None:
    """The candidate's fresh biases per level, or None (said in the coverage) when there is nothing to judge."""
    strides = reference.model.get("strides") or []
    if not strides or not any(names.init_bias("cls_bias", l, "stored") in reference for l in range(len(strides))):
        report.coverage.setdefault("not_checked", []).append("Detect bias init (the reference has no init.* tensors)")
        return None
    fresh = candidate.fresh_head_biases(reference)
    if not fresh:
        report.coverage.setdefault("not_checked", []).append(
            "Detect bias init: the candidate cannot be rebuilt without weights (a module instance, not a factory) "
            "and wrote no init.cls_bias.{level}.stored" if candidate.live else
            "Detect bias init: the candidate dump has no init.cls_bias.{level}.stored")
        return None
    return fresh


def _judge_cls_level(reference: Dump, report: Report, level: int, stride: float, fresh: dict,
                     stored_f32_f64: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> list[str]:
    """The class bias of one level: a row and its findings. Returns the findings' signatures."""
    head = reference.model.get("head_index")
    stored = stored_f32_f64[0]
    cand = fresh[level]["cls"].detach().cpu()
    where = f"layer {head}, cls bias init, stride {stride:g}"
    verdict, signature, message, evidence = _classify_cls_bias(reference, level, stride, cand, stored_f32_f64)
    signatures = signature if isinstance(signature, list) else ([signature] if signature else [])
    messages = message if isinstance(message, list) else [message]
    comparable = cand.to(stored.dtype) if cand.dtype != stored.dtype and cand.is_floating_point() else cand
    report.add(Row(BIAS_SECTION, where, names.init_bias("cls_bias", level, "stored"), not signatures,
                   metrics=compare_tensors(stored, comparable, BITWISE).as_dict(), tolerance=BITWISE.as_dict(),
                   note=verdict))
    for sig, text in zip(signatures, messages):
        report.find(Finding(sig, where, text, evidence=evidence))
    return signatures


def _judge_box_level(reference: Dump, report: Report, level: int, stride: float, fresh_level: dict) -> None:
    """The box-branch bias of one level: ultralytics 8.4 sets 2.0 (1.0 before)."""
    box_stored = reference.get_optional(names.init_bias("box_bias", level, "stored"))
    if box_stored is None or "box" not in fresh_level:
        return
    head = reference.model.get("head_index")
    cbox = fresh_level["box"].detach().cpu().float()
    bwhere = f"layer {head}, box bias init, stride {stride:g}"
    ok = cbox.shape == box_stored.shape and _bitwise(box_stored, cbox)
    note = "as ultralytics (2.0)" if ok else _describe_values(cbox)
    report.add(Row(BIAS_SECTION, bwhere, names.init_bias("box_bias", level, "stored"), ok,
                   metrics=compare_tensors(box_stored, cbox, BITWISE).as_dict(), tolerance=BITWISE.as_dict(),
                   note=note))
    if ok:
        return
    reg_max = reference.model.get("reg_max", 16)
    cancels = reg_max and reg_max > 1 and cbox.numel() and bool((cbox == cbox.flatten()[0]).all())
    report.find(Finding(
        "bias-init-box", bwhere,
        f"box-branch bias is {_describe_values(cbox)}, ultralytics {float(box_stored.flatten()[0]):g} "
        f"(1.0 before 8.4.0). "
        + ("With reg_max > 1 a constant bias cancels in the DFL softmax, so the loss barely moves."
           if cancels else "With reg_max = 1 (or a non-constant bias) it shifts the predicted distances."),
        severity="warning" if cancels else "error",
        evidence={"candidate": cbox[:8].tolist(), "reference": float(box_stored.flatten()[0])}))


def _say_indistinguishable(reference: Dump, report: Report, every_level_passed: bool) -> None:
    """At this nc the three arithmetics give the same float32 bias: the check cannot tell them apart."""
    nc = reference.model.get("nc")
    head = reference.model.get("head_index")
    if not every_level_passed:
        report.context["bias_init_note"] = (f"at nc={nc} the three arithmetics agree, so float32/float64 cannot be "
                                            f"told apart here")
        return
    report.find(Finding(
        "bias-init-indistinguishable", f"layer {head}, cls bias init",
        f"at nc={nc} ultralytics' mixed arithmetic, pure float32 and pure float64 give the same float32 class "
        f"bias at every stride, so this check cannot tell them apart (it can at e.g. nc=12 or nc=8; and one ULP "
        f"of a bias cannot move a loss anyway). The causes that do move a loss were ruled out: a bias not "
        f"applied (default conv init), a non-finite bias (log of 0 from integer division) or another formula "
        f"than log(5 / nc / (640 / stride) ** 2).", severity="info", evidence={"nc": nc}))


def _describe_values(t: torch.Tensor) -> str:
    flat = t.flatten()
    if flat.numel() == 0:
        return "empty"
    if bool((flat == flat[0]).all()):
        return f"{float(flat[0]):.9g} everywhere"
    return f"values from {float(flat.min()):.6g} to {float(flat.max()):.6g}"


# (verdict text, signature(s) or None, message(s), evidence)
Verdict = tuple[str, Any, Any, dict]


def _classify_cls_bias(reference: Dump, level: int, stride: float, cand: torch.Tensor,
                       stored_f32_f64: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> Verdict:
    """What the candidate's class bias of one level is: ultralytics', another arithmetic's, not applied, ..."""
    stored, f32, f64 = stored_f32_f64
    nc = reference.model.get("nc")
    ev: dict[str, Any] = {"level": level, "stride": stride, "nc": nc,
                          "reference": float(stored.flatten()[0]) if stored.numel() else None,
                          "float32": float(f32.flatten()[0]) if f32.numel() else None,
                          "float64": float(f64.flatten()[0]) if f64.numel() else None}
    if cand.shape != stored.shape:
        ev["candidate_shape"] = list(cand.shape)
        return (f"shape {list(cand.shape)} vs {list(stored.shape)}", "bias-init-formula",
                f"stride {stride:g}: the class bias has shape {list(cand.shape)}, ultralytics {list(stored.shape)} "
                f"(nc={nc})", ev)
    cand = cand.float()
    ev["candidate"] = _describe_values(cand)
    if bool((~torch.isfinite(cand)).any()):
        return _nonfinite_verdict(cand, stride, ev)
    if _bitwise(cand, stored):
        same = _bitwise(stored, f32) and _bitwise(stored, f64)
        return ("bitwise equal" + (" (float32/float64 indistinguishable at this nc)" if same else ""), None, "", ev)
    ev["ulp_from_reference"] = _ulps(stored, cand)
    return (_arithmetic_verdict(cand, f32, f64, stride, nc, ev) or _default_init_verdict(reference, level, stride, cand, ev)
            or _other_level_verdict(reference, level, stride, cand, ev) or _formula_verdict(cand, stride, ev))


def _nonfinite_verdict(cand: torch.Tensor, stride: float, ev: dict) -> Verdict:
    nonfinite = ~torch.isfinite(cand)
    neg_inf = bool(torch.isneginf(cand).any())
    hint = (" -inf is log(0): with C/C++ integer division 5 / nc is 0 for nc > 5; divide in floating point"
            if neg_inf else "")
    return ("non-finite", "bias-init-nonfinite",
            f"stride {stride:g}: the class bias is {_describe_values(cand)} ({int(nonfinite.sum())} of "
            f"{cand.numel()} non-finite); ultralytics {ev['reference']:.9g}.{hint} A non-finite logit makes the "
            f"class loss infinite or NaN from the first step.", ev)


def _arithmetic_verdict(cand: torch.Tensor, f32: torch.Tensor, f64: torch.Tensor, stride: float, nc,
                        ev: dict) -> Verdict | None:
    """Pure float32 or pure float64 arithmetic: one ULP from ultralytics' mixed one."""
    is32, is64 = _bitwise(cand, f32), _bitwise(cand, f64)
    if not (is32 or is64):
        return None
    ulp = ev["ulp_from_reference"]
    ev["matches"] = [v for v, hit in (("float32", is32), ("float64", is64)) if hit]
    tail = (f"ultralytics stores {ev['reference']:.9g} ({ulp} ULP apart): it divides and squares in float32 (the "
            f"stride is a float32 tensor element) but takes the log in float64 (math.log)."
            + (f" At nc={nc} and stride {stride:g} pure float32 and pure float64 give the same value, so either "
               f"arithmetic explains it." if is32 and is64 else "")
            + " One ULP of a bias cannot move a loss visibly.")
    found = [(f"bias-init-{variant}",
              f"stride {stride:g}: bias init matches {variant} arithmetic ({ev[variant]:.9g}); {tail}")
             for variant in ev["matches"]]
    verdict = "matches " + " and ".join(f"{v} arithmetic" for v in ev["matches"])
    return (verdict, [f[0] for f in found], [f[1] for f in found], ev)


def _default_init_verdict(reference: Dump, level: int, stride: float, cand: torch.Tensor, ev: dict) -> Verdict | None:
    """Not applied: PyTorch's default conv bias init (uniform within 1/sqrt(fan_in)) or zeros."""
    head = reference.model.get("head_index")
    weight_key = (final_conv_bias_key(reference, head, "cv3", level) or "")[: -len("bias")] + "weight"
    fan_in = None
    if weight_key in reference:
        shape = reference.index[weight_key]["shape"]
        fan_in = int(math.prod(shape[1:]))
    bound = default_conv_bias_bound(fan_in) if fan_in else None
    ev["default_init_bound"] = bound
    constant = bool((cand == cand.flatten()[0]).all())
    zeros = bool((cand == 0).all())
    if not (zeros or (bound is not None and not constant and float(cand.abs().max()) <= bound * (1 + 1e-6))):
        return None
    what = "zeros" if zeros else f"uniform within +-1/sqrt(fan_in) = +-{bound:.4g}"
    return ("not applied (default conv init)", "bias-init-skipped",
            f"stride {stride:g}: bias init not applied (default conv init: {what}, {_describe_values(cand)}); "
            f"ultralytics sets {ev['reference']:.9g} = log(5 / nc / (640 / stride) ** 2). The class loss at the "
            f"first step is then orders of magnitude larger than ultralytics'.", ev)


def _other_level_verdict(reference: Dump, level: int, stride: float, cand: torch.Tensor, ev: dict) -> Verdict | None:
    """Another level's value: levels or strides swapped."""
    for other, other_stride in enumerate(reference.model.get("strides") or []):
        if other == level:
            continue
        o = reference.get_optional(names.init_bias("cls_bias", other, "stored"))
        if o is not None and o.shape == cand.shape and _bitwise(o, cand):
            ev["matches_stride"] = other_stride
            return (f"stride {other_stride:g}'s value", "bias-init-formula",
                    f"stride {stride:g}: the class bias equals ultralytics' value for stride {other_stride:g} "
                    f"({float(o.flatten()[0]):.9g}): levels or strides are in another order", ev)
    return None


def _formula_verdict(cand: torch.Tensor, stride: float, ev: dict) -> Verdict:
    if bool((cand == cand.flatten()[0]).all()):
        value = float(cand.flatten()[0])
        prior = math.exp(value) if value < 50 else math.inf
        ev["implied_prior"] = prior
        return ("different formula", "bias-init-formula",
                f"stride {stride:g}: bias init follows a different formula: {value:.9g} everywhere (exp = {prior:.4g}), "
                f"ultralytics {ev['reference']:.9g} = log(5 / nc / (640 / stride) ** 2) ({ev['ulp_from_reference']} "
                f"ULP apart)", ev)
    return ("different formula", "bias-init-formula",
            f"stride {stride:g}: bias init follows a different formula ({_describe_values(cand)}); ultralytics sets "
            f"{ev['reference']:.9g} for every class", ev)


# ------------------------------------------------------------------------------------------- upsample
def diagnose_upsample(index: int, inputs: list[torch.Tensor], cand_out: torch.Tensor, ref_out: torch.Tensor,
                      tol: Tolerance) -> Finding | None:
    """Does another interpolation of the layer's (reference) input explain the candidate's output?"""
    if len(inputs) != 1 or cand_out.dim() != 4 or inputs[0].dim() != 4:
        return None
    x = inputs[0].float()
    size = tuple(cand_out.shape[-2:])
    tried = {
        "nearest": lambda: F.interpolate(x, size=size, mode="nearest"),
        "nearest-exact": lambda: F.interpolate(x, size=size, mode="nearest-exact"),
        "bilinear (align_corners=False)": lambda: F.interpolate(x, size=size, mode="bilinear", align_corners=False),
        "bilinear (align_corners=True)": lambda: F.interpolate(x, size=size, mode="bilinear", align_corners=True),
        "bicubic (align_corners=False)": lambda: F.interpolate(x, size=size, mode="bicubic", align_corners=False),
    }
    matched = None
    for mode, make in tried.items():
        try:
            guess = make()
        except RuntimeError:
            continue
        if compare_tensors(guess, cand_out.float().cpu(), tol).passed:
            matched = mode
            break
    if matched is None or matched == "nearest":
        return None
    reference_is_nearest = compare_tensors(ref_out, tried["nearest"](), tol).passed
    return Finding(
        "upsample-mode", layer_where(index),
        f"layer {index} (Upsample): the candidate's output is {matched} interpolation of the layer's input; "
        f"ultralytics uses {'nearest' if reference_is_nearest else 'another mode'} (nn.Upsample(scale_factor=2, "
        f"mode='nearest'))",
        evidence={"layer": index, "candidate_mode": matched, "reference_mode": "nearest" if reference_is_nearest else None})


# ------------------------------------------------------------------------------------------- hints
def affine_hint(ref: torch.Tensor, cand: torch.Tensor) -> str:
    """Words for a divergence that is a scale, an offset or a per-channel affine change of the reference."""
    if ref.shape != cand.shape or not ref.is_floating_point() or ref.numel() < 4:
        return ""
    r = ref.double().flatten()
    c = cand.double().flatten()
    if not (torch.isfinite(r).all() and torch.isfinite(c).all()):
        return ""
    rc = r - r.mean()
    var = float((rc * rc).sum())
    if var == 0:
        return ""
    a = float((rc * (c - c.mean())).sum()) / var
    b = float(c.mean()) - a * float(r.mean())
    resid = c - (a * r + b)
    spread = float((c - c.mean()).abs().max()) or 1.0
    if float(resid.abs().max()) <= 1e-6 * spread and (abs(a - 1) > 1e-6 or abs(b) > 1e-6 * spread):
        return f"the candidate is {a:.6g} x reference {b:+.6g} everywhere (a global scale/offset error)"
    if ref.dim() >= 2 and ref.shape[1] > 1:
        # per channel (dim 1)
        rr = ref.double().transpose(0, 1).reshape(ref.shape[1], -1)
        cc = cand.double().transpose(0, 1).reshape(ref.shape[1], -1)
        rm, cm = rr.mean(1, keepdim=True), cc.mean(1, keepdim=True)
        v = ((rr - rm) ** 2).sum(1)
        ok = v > 0
        if bool(ok.all()):
            a = ((rr - rm) * (cc - cm)).sum(1) / v
            res = cc - (a[:, None] * (rr - rm) + cm)
            if float(res.abs().max()) <= 1e-5 * spread and float((a - 1).abs().max()) > 1e-6:
                scaled = ((a - 1).abs() > 1e-4).nonzero().flatten().tolist()
                offsets = (cm.flatten() - a * rm.flatten()).abs()
                first_scale = float(a[scaled[0]])
                if scaled == list(range(scaled[0], scaled[-1] + 1)) and len(scaled) < ref.shape[1] and \
                        float((a[scaled] - first_scale).abs().max()) <= 1e-4 * abs(first_scale) and \
                        float(offsets.max()) <= 1e-5 * spread:
                    return (f"channels {scaled[0]}\u2013{scaled[-1]} of the candidate are {first_scale:.6g} x the "
                            f"reference's and the others equal it: one of the concatenated inputs is scaled")
                return (f"each channel of the candidate is an affine map of the reference's (scales "
                        f"{float(a.min()):.6g}..{float(a.max()):.6g}): a normalisation difference (BatchNorm eps, "
                        f"statistics or affine parameters)")
    return ""
