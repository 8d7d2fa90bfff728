"""Reference-version drift: what changes in a reference dump from one ultralytics release to another.

`drift(A, B)` compares two reference dumps (usually the same configuration captured with two ultralytics
releases, see `parity.capture.sideenv`) and lists every difference grouped by its cause:

| cause | evidence |
| --- | --- |
| `versions` | the manifests' `versions` |
| `box-bias-init` | `init.box_bias.{l}.stored` (Detect box bias 1.0 up to 8.3.x, 2.0 from 8.4.0) |
| `cls-bias-init` | `init.cls_bias.{l}.stored` |
| `small-box-floor` | hyperparameter `small_box_floor_px` (none before 8.4.0) and the `small_box` case's `fg_mask` |
| `loss-output-shape` | shape of `loss.{case}.output.loss`: () before 8.3.99, (3,) after |
| `head-output-layout` | `act.{head}.{l}` per level (up to 8.3.x) vs `act.{head}.boxes`/`.scores` (8.4.x) |
| `model-structure` | layer types, parameter counts |
| `hyperparameters`, `environment`, `config` | the manifests' sections |
| `numerics` | tensors that differ with none of the causes above to explain them |

Tensors downstream of a cause (the head's outputs, the loss, gradients) are listed under it. Per-level head
maps are converted to the `boxes`/`scores` layout so the two layouts are compared number by number. The release
history and the cause each tensor goes under are `parity.causes.releases`'; docs/drift.md has the whole story.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import torch

from parity.causes.releases import CAUSE_TITLES, cause_of, expected_changes
from parity.dump.files import Dump
from parity.dump.layouts import _head_index, _head_views, head_layout

DRIFT_SCHEMA = "yolo-parity-drift"
DRIFT_SCHEMA_VERSION = 1


@dataclass
class CauseGroup:
    cause: str
    title: str
    evidence: list[str] = field(default_factory=list)
    tensors: list[dict] = field(default_factory=list)  # {"name", "change", ...}
    expected: list[str] = field(default_factory=list)  # release-history entries that predict it


@dataclass
class DriftReport:
    a: str
    b: str
    versions: dict[str, list]
    causes: dict[str, CauseGroup] = field(default_factory=dict)
    expected: list[dict] = field(default_factory=list)
    compared: int = 0
    identical: int = 0

    def group(self, cause: str) -> CauseGroup:
        if cause not in self.causes:
            self.causes[cause] = CauseGroup(cause, CAUSE_TITLES.get(cause, cause))
        return self.causes[cause]

    @property
    def drifted(self) -> bool:
        return bool(self.causes)

    def to_dict(self) -> dict:
        return {"schema": DRIFT_SCHEMA, "schema_version": DRIFT_SCHEMA_VERSION, "a": self.a, "b": self.b,
                "versions": self.versions, "drifted": self.drifted, "compared": self.compared,
                "identical": self.identical, "expected": self.expected,
                "causes": {k: asdict(v) for k, v in self.causes.items()}}


def drift(path_a: str | Path, path_b: str | Path, *, max_tensors_per_cause: int | None = None) -> DriftReport:
    """Everything that differs between reference dumps A and B, grouped by cause."""
    a, b = Dump(path_a), Dump(path_b)
    va, vb = a.manifest.get("versions") or {}, b.manifest.get("versions") or {}
    report = DriftReport(str(path_a), str(path_b),
                         versions={k: [va.get(k), vb.get(k)] for k in sorted(set(va) | set(vb))})
    report.expected = expected_changes(va.get("ultralytics"), vb.get("ultralytics"))
    active: set[str] = set()
    _manifest_sections(report, a.manifest, b.manifest)
    _small_box_floor(report, a, b, active)
    _bias_init(report, a, b, active)
    _loss_output_shape(report, a, b, active)
    _head_output_layout(report, a, b, active)
    _model_structure(report, a.manifest, b.manifest, active)
    _tensors(report, a, b, active)
    for item in report.expected:
        if item["cause"] in report.causes:
            report.causes[item["cause"]].expected.append(f"{item['version']}: {item['change']}")
    if max_tensors_per_cause is not None:
        for group in report.causes.values():
            group.tensors = group.tensors[:max_tensors_per_cause]
    return report


# ------------------------------------------------------------------------------------ the manifests
def _dict_diff(a: dict, b: dict, skip: Iterable[str] = ()) -> list[str]:
    skip = set(skip)
    out = []
    for key in sorted(set(a) | set(b)):
        if key in skip:
            continue
        if a.get(key, "(absent)") != b.get(key, "(absent)"):
            out.append(f"{key}: {a.get(key, '(absent)')} -> {b.get(key, '(absent)')}")
    return out


def _manifest_sections(report: DriftReport, ma: dict, mb: dict) -> None:
    """versions, config and environment: what was captured with what."""
    diff = _dict_diff(ma.get("versions") or {}, mb.get("versions") or {}, skip=("tool",))
    if diff:
        report.group("versions").evidence += diff
    ca, cb = ma.get("config") or {}, mb.get("config") or {}
    diff = _dict_diff(ca, cb, skip=("device", "precision", "deterministic"))
    if diff:
        report.group("config").evidence += diff + ["the dumps were captured with different settings: tensor "
                                                   "differences below may come from that, not from ultralytics"]
    ea, eb = dict(ma.get("environment") or {}), dict(mb.get("environment") or {})
    for key in ("device", "precision", "deterministic"):
        if ca.get(key) != cb.get(key):
            ea[f"config.{key}"], eb[f"config.{key}"] = ca.get(key), cb.get(key)
    diff = _dict_diff(ea, eb, skip=("platform", "device_name", "driver"))
    if diff:
        report.group("environment").evidence += diff


def _fg_count(dump: Dump, case: str) -> list[int] | None:
    name = f"loss.{case}.assign.fg_mask"
    if name not in dump:
        name = f"loss.{case}.one2many.assign.fg_mask"
    if name not in dump:
        return None
    return [int(v) for v in dump.get(name).reshape(dump.get(name).shape[0], -1).sum(-1).tolist()]


def _floor_words(floor, threshold) -> str:
    if floor is None:
        return "no floor"
    return f"sides under {threshold:g} px enlarged to {floor:g} px"


def _small_box_floor(report: DriftReport, a: Dump, b: Dump, active: set[str]) -> None:
    """The assigner's small-box rule, and the other loss hyperparameters."""
    ha, hb = a.manifest.get("hyperparameters") or {}, b.manifest.get("hyperparameters") or {}
    floor_a, floor_b = ha.get("small_box_floor_px"), hb.get("small_box_floor_px")
    thr_a = ha.get("small_box_threshold_px", floor_a)
    thr_b = hb.get("small_box_threshold_px", floor_b)
    if (floor_a, thr_a) != (floor_b, thr_b):
        active.add("small-box-floor")
        group = report.group("small-box-floor")
        group.evidence.append(f"hyperparameters: {_floor_words(floor_a, thr_a)} -> {_floor_words(floor_b, thr_b)}")
        fa, fb = _fg_count(a, "small_box"), _fg_count(b, "small_box")
        if fa is not None and fb is not None:
            group.evidence.append(f"small_box case: foreground anchors per image {fa} -> {fb}")
    diff = _dict_diff(ha, hb, skip=("small_box_floor_px", "small_box_threshold_px"))
    if diff:
        report.group("hyperparameters").evidence += diff


def _stored_values(dump: Dump, prefix: str) -> dict[int, list[float]]:
    out = {}
    for name in sorted(dump.names(prefix)):
        parts = name.split(".")
        if len(parts) == 4 and parts[3] == "stored" and parts[2].isdigit():
            out[int(parts[2])] = sorted(set(float(v) for v in dump.get(name).reshape(-1).tolist()))
    return out


def _fmt_values(values: list[float]) -> str:
    return f"{values[0]:g}" if len(values) == 1 else f"{len(values)} values {min(values):g}..{max(values):g}"


def _bias_init(report: DriftReport, a: Dump, b: Dump, active: set[str]) -> None:
    for kind, cause in (("box_bias", "box-bias-init"), ("cls_bias", "cls-bias-init")):
        sa, sb = _stored_values(a, f"init.{kind}."), _stored_values(b, f"init.{kind}.")
        changed = [l for l in sorted(set(sa) & set(sb)) if sa[l] != sb[l]]
        if changed:
            active.add(cause)
            report.group(cause).evidence += [f"level {l}: {_fmt_values(sa[l])} -> {_fmt_values(sb[l])}" for l in changed]


def _loss_output_shape(report: DriftReport, a: Dump, b: Dump, active: set[str]) -> None:
    oa, ob = a.index.get("loss.default.output.loss"), b.index.get("loss.default.output.loss")
    if oa and ob and oa["shape"] != ob["shape"]:
        active.add("loss-output-shape")
        report.group("loss-output-shape").evidence.append(
            f"model.loss()[0] shape {oa['shape']} -> {ob['shape']} "
            f"({'a scalar sum' if not oa['shape'] else 'a (box, cls, dfl) vector'} -> "
            f"{'a scalar sum' if not ob['shape'] else 'a (box, cls, dfl) vector'}, times the batch size)")


_LAYOUT_WORDS = {"dict": "a dict: act.{h}.boxes (B, 4*reg_max, A) and act.{h}.scores (B, nc, A)",
                 "list": "a list of per-level maps act.{h}.{{l}} (B, 4*reg_max+nc, H, W)"}


def _head_output_layout(report: DriftReport, a: Dump, b: Dump, active: set[str]) -> None:
    la, lb = head_layout(a), head_layout(b)
    if la and lb and la != lb:
        active.add("head-output-layout")
        head_a, head_b = _head_index(a.manifest), _head_index(b.manifest)
        report.group("head-output-layout").evidence.append(
            f"train-mode head output {_LAYOUT_WORDS[la].format(h=head_a)} -> {_LAYOUT_WORDS[lb].format(h=head_b)}")


def _model_structure(report: DriftReport, ma: dict, mb: dict, active: set[str]) -> None:
    model_a, model_b = ma.get("model") or {}, mb.get("model") or {}
    layers_a = [(l.get("type"), l.get("parameters")) for l in model_a.get("layers", [])]
    layers_b = [(l.get("type"), l.get("parameters")) for l in model_b.get("layers", [])]
    if layers_a == layers_b and model_a.get("parameters") == model_b.get("parameters"):
        return
    active.add("model-structure")
    group = report.group("model-structure")
    if len(layers_a) != len(layers_b):
        group.evidence.append(f"{len(layers_a)} layers -> {len(layers_b)} layers")
    for i, (x, y) in enumerate(zip(layers_a, layers_b)):
        if x != y:
            group.evidence.append(f"layer {i}: {x[0]} ({x[1]} parameters) -> {y[0]} ({y[1]} parameters)")
    group.evidence.append(f"parameters {model_a.get('parameters')} -> {model_b.get('parameters')}")


# ------------------------------------------------------------------------------------------ tensors
def _tensor_change(ta: torch.Tensor, tb: torch.Tensor) -> dict:
    if list(ta.shape) != list(tb.shape):
        return {"change": f"shape {list(ta.shape)} -> {list(tb.shape)}"}
    if ta.dtype != tb.dtype:
        if ta.dtype.is_floating_point and tb.dtype.is_floating_point:
            ta, tb = ta.double(), tb.double()
        else:
            return {"change": f"dtype {ta.dtype} -> {tb.dtype}"}
    if not ta.dtype.is_floating_point:
        differ = int((ta != tb).sum())
        return {"change": f"{differ} of {ta.numel()} elements differ", "differ": differ}
    d = (tb.double() - ta.double()).abs()
    d = torch.nan_to_num(d, nan=math.inf)
    scale = float(ta.double().abs().max()) if ta.numel() else 0.0
    max_abs = float(d.max()) if d.numel() else 0.0
    return {"change": f"max |d| {max_abs:.3g}" + (f" ({max_abs / scale:.2g} of max |A|)" if scale else ""),
            "max_abs": max_abs, "differ": int((d > 0).sum())}


def _equal(ta: torch.Tensor, tb: torch.Tensor) -> bool:
    return list(ta.shape) == list(tb.shape) and ta.dtype == tb.dtype and bool(torch.equal(ta, tb))


def _is_bias_of_head(name: str, head: int | None) -> bool:
    parts = name.split(".")
    return head is not None and len(parts) > 4 and parts[1] == str(head) and parts[2] in ("cv2", "cv3") \
        and parts[-1] == "bias"


def _is_running_stat(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")


def _tensors(report: DriftReport, a: Dump, b: Dump, active: set[str]) -> None:
    """Every tensor of both dumps, under its cause; the head's outputs also across the two layouts."""
    head_a, head_b = _head_index(a.manifest), _head_index(b.manifest)
    names_a, names_b = set(a.index), set(b.index)
    both = sorted(names_a & names_b)
    weights_differ = any(n.startswith("model.") and not _is_bias_of_head(n, head_a) and not _is_running_stat(n)
                         and not _equal(a.get(n), b.get(n)) for n in both if n.startswith("model."))
    if weights_differ and "model-structure" not in active:
        active.add("weights")
        report.group("weights").evidence.append("initial weights differ beyond the Detect biases (the seeded "
                                                "construction consumed the RNG differently)")
    for name in both:
        ta, tb = a.get(name), b.get(name)
        report.compared += 1
        if _equal(ta, tb):
            report.identical += 1
            continue
        report.group(cause_of(name, head_a, active)).tensors.append({"name": name, **_tensor_change(ta, tb)})
    if "head-output-layout" in active and head_a is not None and head_b is not None:
        _converted_head(report, a, b, head_a, head_b, active)
    for name in sorted(names_a - names_b):
        report.group(cause_of(name, head_a, active)).tensors.append({"name": name, "change": "only in A"})
    for name in sorted(names_b - names_a):
        report.group(cause_of(name, head_b, active)).tensors.append({"name": name, "change": "only in B"})


def _converted_head(report: DriftReport, a: Dump, b: Dump, head_a: int, head_b: int, active: set[str]) -> None:
    """The same numbers in the two layouts: compared after converting per-level maps."""
    views_a, views_b = _head_views(a, head_a, "act"), _head_views(b, head_b, "act")
    for key in sorted(set(views_a) & set(views_b)):
        change = _tensor_change(views_a[key], views_b[key])
        label = f"act.{head_a}.{key} (per-level maps converted)"
        cause = "box-bias-init" if key == "boxes" and "box-bias-init" in active else (
            "cls-bias-init" if key == "scores" and "cls-bias-init" in active else "numerics")
        if change.get("differ", 1) or "shape" in change["change"]:
            report.group(cause).tensors.append({"name": label, **change})
