"""Reference-version drift: what changes in a reference dump from one ultralytics release to another.

`parity drift A B` compares two reference dumps (usually the same configuration captured with two ultralytics
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
maps are converted to the `boxes`/`scores` layout so the two layouts are compared number by number.

Exit code: 0 when the dumps agree (bitwise), 1 when anything drifted, 2 for bad input.

`explain(metrics_vs_current, metrics_vs_old)` turns a candidate's comparison against two references into
`version-drift` findings: "matches ultralytics X.Y on this point" instead of a bug. `as_of(version)` describes
an older release's behaviour. The release history itself, and the as-of modes the built-in candidate can plant
(`as-of-8.3` for the model: box bias 1.0; `as-of-8.3-loss` for the loss: no small-box floor), are entries of
the cause registry (`parity.causes.releases`), which the counterfactual explainer tries without an old dump.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from parity.causes.releases import RELEASE_HISTORY
from parity.dump.layouts import _head_index, _head_views, head_layout, in_current_layout, levels_to_dict  # noqa: F401
from parity.errors import ParityError
from parity.findings import Finding

# ----------------------------------------------------------------------------------- release history
# RELEASE_HISTORY is data of the cause registry (each entry is a known cause, `parity.causes.releases`).

CAUSE_TITLES = {
    "versions": "software versions",
    "config": "capture configuration",
    "environment": "capture environment (device, threads, TF32, determinism)",
    "hyperparameters": "loss hyperparameters",
    "model-structure": "model structure (layer types, parameters)",
    "box-bias-init": "Detect box-branch bias initialisation",
    "cls-bias-init": "Detect class-branch bias initialisation",
    "small-box-floor": "assigner small-box floor",
    "loss-output-shape": "what model.loss()[0] returns",
    "head-output-layout": "Detect head train-mode output layout",
    "weights": "initial weights",
    "numerics": "arithmetic (no known cause: rounding, torch, or an unlisted change)",
}


def parse_version(version: str | None) -> tuple[int, ...]:
    if not version:
        return ()
    parts = []
    for piece in str(version).split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def expected_changes(version_a: str | None, version_b: str | None) -> list[dict]:
    """Release-history entries between two versions (those a dump of one should differ from the other by)."""
    a, b = parse_version(version_a), parse_version(version_b)
    if not a or not b or a == b:
        return []
    low, high = min(a, b), max(a, b)
    return [{"version": v, "cause": c, "change": text} for v, c, text in RELEASE_HISTORY
            if low < parse_version(v) <= high]


# --------------------------------------------------------------------------------------------- as-of
@dataclass(frozen=True)
class AsOf:
    """How an ultralytics release behaves on the points where releases differ."""

    version: str
    box_bias: float
    small_box_threshold_px: float | None  # sides under this are enlarged ...
    small_box_floor_px: float | None  # ... to this (None: no floor)
    loss_output: str  # "vector" (3,) or "scalar" (sum)
    head_output: str  # "dict" or "list"

    def describe(self) -> list[str]:
        floor = ("no small-box floor" if self.small_box_floor_px is None else
                 f"sides under {self.small_box_threshold_px:g} px enlarged to {self.small_box_floor_px:g} px")
        return [f"box bias {self.box_bias:g}", floor, f"model.loss()[0] is a {self.loss_output}",
                f"train-mode head output is a {self.head_output}"]


def as_of(version: str) -> AsOf:
    """The behaviour of ultralytics `version` (e.g. '8.3.200', '8.3' or '8.3.x' for the last 8.3 releases)."""
    text = str(version).strip().lower().removeprefix("v")
    if text.endswith(".x"):
        text = text[:-2] + ".999"
    v = parse_version(text)
    if len(v) == 2:
        v = v + (999,)
    if len(v) < 3 or v < (8, 0, 0):
        raise ParityError(f"--as-of {version!r}: expected an ultralytics release such as 8.3.200 or 8.3.x (8.0 or later)")
    if v < (8, 4, 0):
        floor = (None, None)
    elif v < (8, 4, 137):
        floor = (8.0, 16.0)
    else:
        floor = (16.0, 16.0)
    return AsOf(version=str(version), box_bias=1.0 if v < (8, 4, 0) else 2.0, small_box_threshold_px=floor[0],
                small_box_floor_px=floor[1], loss_output="scalar" if v < (8, 3, 99) else "vector",
                head_output="list" if v < (8, 4, 0) else "dict")


def apply_to_detector(detector, version: str):
    """Plant an older release's Detect box-bias init in a built-in detector (`parity.reimpl.model.Detector`),
    in place; returns it. Works on any model whose head has `box_final(level)` or ultralytics' `cv2`."""
    import torch

    behaviour = as_of(version)
    head = getattr(detector, "head", None) or detector.model[-1]
    with torch.no_grad():
        if hasattr(head, "box_final"):
            for level in range(head.num_levels):
                head.box_final(level).bias.fill_(behaviour.box_bias)
        else:
            for branch in head.cv2:
                branch[-1].bias.fill_(behaviour.box_bias)
    return detector


def register_injections() -> list[str]:
    """The as-of modes (`as-of-8.3` for the model: box bias 1.0; `as-of-8.3-loss` for the loss: no small-box
    floor) are entries of the cause registry (`parity.causes.releases`), registered with it. Returns the names
    this call added: none, they are always there."""
    from parity.causes import all_injections

    return [name for name in ("as-of-8.3", "as-of-8.3-loss") if name not in all_injections()]


# ------------------------------------------------------------------------------------------- drift
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
        return {"schema": "yolo-parity-drift", "schema_version": 1, "a": self.a, "b": self.b,
                "versions": self.versions, "drifted": self.drifted, "compared": self.compared,
                "identical": self.identical, "expected": self.expected,
                "causes": {k: asdict(v) for k, v in self.causes.items()}}


def _stored_values(dump, prefix: str) -> dict[int, list[float]]:
    out = {}
    for name in sorted(dump.names(prefix)):
        parts = name.split(".")
        if len(parts) == 4 and parts[3] == "stored" and parts[2].isdigit():
            out[int(parts[2])] = sorted(set(float(v) for v in dump.get(name).reshape(-1).tolist()))
    return out


def _fmt_values(values: list[float]) -> str:
    return f"{values[0]:g}" if len(values) == 1 else f"{len(values)} values {min(values):g}..{max(values):g}"


def _tensor_change(ta, tb) -> dict:
    import torch

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


def _equal(ta, tb) -> bool:
    import torch

    return list(ta.shape) == list(tb.shape) and ta.dtype == tb.dtype and bool(torch.equal(ta, tb))


def cause_of(name: str, head: int | None, active: set[str]) -> str:
    """The cause a differing tensor is put under, given the causes found in the manifests and init tensors."""
    parts = name.split(".")
    h = str(head) if head is not None else None
    is_head_act = parts[0] == "act" and len(parts) > 1 and parts[1] == h
    if "loss-output-shape" in active and parts[0] == "loss" and parts[2:4] == ["output", "loss"]:
        return "loss-output-shape"
    if "small-box-floor" in active and (name.startswith("loss.small_box.") or name.startswith("grad.head.small_box.")):
        return "small-box-floor"
    if "box-bias-init" in active:
        if name.startswith("init.box_bias.") or (parts[0] == "model" and len(parts) > 4 and parts[1] == h
                                                 and parts[2] == "cv2" and parts[-1] == "bias"):
            return "box-bias-init"
    if "cls-bias-init" in active:
        if name.startswith("init.cls_bias.") or (parts[0] == "model" and len(parts) > 4 and parts[1] == h
                                                 and parts[2] == "cv3" and parts[-1] == "bias"):
            return "cls-bias-init"
    if "head-output-layout" in active and (is_head_act and len(parts) == 3 or parts[:2] == ["grad", "head"]):
        if parts[-1].isdigit() or parts[-1] in ("boxes", "scores"):
            return "head-output-layout"
    for cause in ("box-bias-init", "cls-bias-init"):  # downstream of a bias: the head, the loss, gradients
        if cause in active and (is_head_act or parts[0] in ("loss", "grad")):
            return cause
    if "model-structure" in active:
        return "model-structure"
    if parts[0] == "model" and "weights" in active:
        return "weights"
    return "numerics"


def _dict_diff(a: dict, b: dict, skip: Iterable[str] = ()) -> list[str]:
    skip = set(skip)
    out = []
    for key in sorted(set(a) | set(b)):
        if key in skip:
            continue
        if a.get(key, "(absent)") != b.get(key, "(absent)"):
            out.append(f"{key}: {a.get(key, '(absent)')} -> {b.get(key, '(absent)')}")
    return out


def _fg_count(dump, case: str) -> list[int] | None:
    name = f"loss.{case}.assign.fg_mask"
    if name not in dump:
        name = f"loss.{case}.one2many.assign.fg_mask"
    if name not in dump:
        return None
    return [int(v) for v in dump.get(name).reshape(dump.get(name).shape[0], -1).sum(-1).tolist()]


def drift(path_a: str | Path, path_b: str | Path, *, max_tensors_per_cause: int | None = None) -> DriftReport:
    """Everything that differs between reference dumps A and B, grouped by cause."""
    from parity.dump.files import Dump

    a, b = Dump(path_a), Dump(path_b)
    ma, mb = a.manifest, b.manifest
    va, vb = ma.get("versions") or {}, mb.get("versions") or {}
    report = DriftReport(str(path_a), str(path_b),
                         versions={k: [va.get(k), vb.get(k)] for k in sorted(set(va) | set(vb))})
    report.expected = expected_changes(va.get("ultralytics"), vb.get("ultralytics"))
    active: set[str] = set()

    diff = _dict_diff(va, vb, skip=("tool",))
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

    ha, hb = ma.get("hyperparameters") or {}, mb.get("hyperparameters") or {}
    floor_a, floor_b = ha.get("small_box_floor_px"), hb.get("small_box_floor_px")
    thr_a = ha.get("small_box_threshold_px", floor_a)
    thr_b = hb.get("small_box_threshold_px", floor_b)
    if (floor_a, thr_a) != (floor_b, thr_b):
        active.add("small-box-floor")
        group = report.group("small-box-floor")

        def words(floor, threshold):
            if floor is None:
                return "no floor"
            return f"sides under {threshold:g} px enlarged to {floor:g} px"

        group.evidence.append(f"hyperparameters: {words(floor_a, thr_a)} -> {words(floor_b, thr_b)}")
        fa, fb = _fg_count(a, "small_box"), _fg_count(b, "small_box")
        if fa is not None and fb is not None:
            group.evidence.append(f"small_box case: foreground anchors per image {fa} -> {fb}")
    diff = _dict_diff(ha, hb, skip=("small_box_floor_px", "small_box_threshold_px"))
    if diff:
        report.group("hyperparameters").evidence += diff

    for kind, cause in (("box_bias", "box-bias-init"), ("cls_bias", "cls-bias-init")):
        sa, sb = _stored_values(a, f"init.{kind}."), _stored_values(b, f"init.{kind}.")
        changed = [l for l in sorted(set(sa) & set(sb)) if sa[l] != sb[l]]
        if changed:
            active.add(cause)
            report.group(cause).evidence += [f"level {l}: {_fmt_values(sa[l])} -> {_fmt_values(sb[l])}" for l in changed]

    oa, ob = a.index.get("loss.default.output.loss"), b.index.get("loss.default.output.loss")
    if oa and ob and oa["shape"] != ob["shape"]:
        active.add("loss-output-shape")
        report.group("loss-output-shape").evidence.append(
            f"model.loss()[0] shape {oa['shape']} -> {ob['shape']} "
            f"({'a scalar sum' if not oa['shape'] else 'a (box, cls, dfl) vector'} -> "
            f"{'a scalar sum' if not ob['shape'] else 'a (box, cls, dfl) vector'}, times the batch size)")

    head_a, head_b = _head_index(ma), _head_index(mb)
    la, lb = head_layout(a), head_layout(b)
    if la and lb and la != lb:
        active.add("head-output-layout")
        words = {"dict": "a dict: act.{h}.boxes (B, 4*reg_max, A) and act.{h}.scores (B, nc, A)",
                 "list": "a list of per-level maps act.{h}.{{l}} (B, 4*reg_max+nc, H, W)"}
        report.group("head-output-layout").evidence.append(
            f"train-mode head output {words[la].format(h=head_a)} -> {words[lb].format(h=head_b)}")

    layers_a = [(l.get("type"), l.get("parameters")) for l in (ma.get("model") or {}).get("layers", [])]
    layers_b = [(l.get("type"), l.get("parameters")) for l in (mb.get("model") or {}).get("layers", [])]
    if layers_a != layers_b or (ma.get("model") or {}).get("parameters") != (mb.get("model") or {}).get("parameters"):
        active.add("model-structure")
        group = report.group("model-structure")
        if len(layers_a) != len(layers_b):
            group.evidence.append(f"{len(layers_a)} layers -> {len(layers_b)} layers")
        for i, (x, y) in enumerate(zip(layers_a, layers_b)):
            if x != y:
                group.evidence.append(f"layer {i}: {x[0]} ({x[1]} parameters) -> {y[0]} ({y[1]} parameters)")
        group.evidence.append(f"parameters {(ma.get('model') or {}).get('parameters')} -> "
                              f"{(mb.get('model') or {}).get('parameters')}")

    # -- tensors
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
        change = _tensor_change(ta, tb)
        report.group(cause_of(name, head_a, active)).tensors.append({"name": name, **change})
    if "head-output-layout" in active and head_a is not None and head_b is not None:
        # the same numbers in the two layouts: compare after converting per-level maps
        for prefix in ("act",):
            va_, vb_ = _head_views(a, head_a, prefix), _head_views(b, head_b, prefix)
            for key in sorted(set(va_) & set(vb_)):
                change = _tensor_change(va_[key], vb_[key])
                label = f"{prefix}.{head_a}.{key} (per-level maps converted)"
                cause = "box-bias-init" if key == "boxes" and "box-bias-init" in active else (
                    "cls-bias-init" if key == "scores" and "cls-bias-init" in active else "numerics")
                if change.get("differ", 1) or "shape" in change["change"]:
                    report.group(cause).tensors.append({"name": label, **change})
    for name in sorted(names_a - names_b):
        report.group(cause_of(name, head_a, active)).tensors.append({"name": name, "change": "only in A"})
    for name in sorted(names_b - names_a):
        report.group(cause_of(name, head_b, active)).tensors.append({"name": name, "change": "only in B"})

    for item in report.expected:
        if item["cause"] in report.causes:
            report.causes[item["cause"]].expected.append(f"{item['version']}: {item['change']}")
    if max_tensors_per_cause is not None:
        for group in report.causes.values():
            group.tensors = group.tensors[:max_tensors_per_cause]
    return report


def _is_bias_of_head(name: str, head: int | None) -> bool:
    parts = name.split(".")
    return head is not None and len(parts) > 4 and parts[1] == str(head) and parts[2] in ("cv2", "cv3") \
        and parts[-1] == "bias"


def _is_running_stat(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")


# --------------------------------------------------------------------------------------------- explain
def _passed(metrics) -> bool | None:
    if metrics is None:
        return None
    return bool(metrics.get("passed") if isinstance(metrics, Mapping) else getattr(metrics, "passed", None))


def _max_abs(metrics) -> float | None:
    value = metrics.get("max_abs") if isinstance(metrics, Mapping) else getattr(metrics, "max_abs", None)
    if isinstance(value, str):
        return math.inf if value in ("inf", "nan") else float(value)
    return value


def explain(candidate_metrics_vs_current: Mapping[str, Any], candidate_metrics_vs_old: Mapping[str, Any], *,
            current_version: str | None = None, old_version: str | None = None,
            head: int | None = None, closer_factor: float = 100.0) -> list[Finding]:
    """Findings for tensors where the candidate departs from the current reference but matches an older one.

    Both arguments map dump names to the candidate's metrics (`TensorMetrics` or `as_dict()`) against the
    current and the old reference. A tensor counts when it fails against the current reference and passes
    against the old one (or, failing both, is `closer_factor` times closer to the old). One `version-drift`
    finding (severity "warning": a known release difference, not a bug) per cause, naming the release.
    """
    old = old_version or "an older release"
    current = current_version or "the current release"
    matched = []
    for name, now in candidate_metrics_vs_current.items():
        then = candidate_metrics_vs_old.get(name)
        if then is None or _passed(now) is not False:
            continue
        cur_abs, old_abs = _max_abs(now), _max_abs(then)
        matches = _passed(then)
        closer = (not matches and cur_abs is not None and old_abs is not None and
                  (old_abs == 0 or cur_abs / max(old_abs, 1e-300) >= closer_factor) and cur_abs > 0)
        if matches or closer:
            matched.append({"name": name, "matches_old": bool(matches), "max_abs_vs_current": cur_abs,
                            "max_abs_vs_old": old_abs})
    # The loss replay feeds each reference's own head outputs to the loss, so a loss row that matches the older
    # release is the older loss, never the head's init. Where a case's candidate-in-box mask matches the older
    # release, its assignment (and everything the assignment feeds) is the small-box floor's doing.
    floor_cases = {item["name"].split(".")[1] for item in matched
                   if item["name"].split(".")[0] == "loss" and item["name"].split(".")[2:4] == ["assign", "mask_in_gts"]}
    active = {"box-bias-init", "small-box-floor", "loss-output-shape", "head-output-layout", "cls-bias-init"}
    by_cause: dict[str, list[dict]] = {}
    for item in matched:
        name = item["name"]
        parts = name.split(".")
        if parts[0] == "loss" or parts[:2] == ["grad", "head"]:
            case = parts[1] if parts[0] == "loss" else parts[2]
            cause = cause_of(name, None, {"loss-output-shape", "small-box-floor"})
            if cause == "numerics" and case in floor_cases:
                cause = "small-box-floor"
        else:
            cause = cause_of(name, head if head is not None else _guess_head(name), active)
        if cause == "numerics":
            cause = "version-drift"
        by_cause.setdefault(cause, []).append(item)
    findings = []
    for cause, items in sorted(by_cause.items()):
        names_ = [i["name"] for i in items]
        exact = all(i["matches_old"] for i in items)
        history = [f"{v}: {text}" for v, c, text in RELEASE_HISTORY if c == cause]
        what = CAUSE_TITLES.get(cause, "behaviour")
        message = (f"matches ultralytics {old} on this point ({what}): {len(items)} tensor(s) that differ from "
                   f"ultralytics {current} {'agree' if exact else 'come much closer'} with {old}"
                   + (f" [{'; '.join(history)}]" if history else "")
                   + ". A port of the older release, not a bug in the port.")
        findings.append(Finding(
            signature="version-drift", where=f"{cause}: {names_[0]}" + (f" and {len(names_) - 1} more" if len(names_) > 1 else ""),
            message=message, severity="warning",
            evidence={"cause": cause, "old_version": old_version, "current_version": current_version,
                      "tensors": items[:20], "count": len(items), "release_history": history}))
    return findings


def _guess_head(name: str) -> int | None:
    parts = name.split(".")
    if parts[0] in ("model", "act") and len(parts) > 2 and parts[1].isdigit() and parts[2] in (
            "cv2", "cv3", "boxes", "scores", "dfl", "one2many", "one2one"):
        return int(parts[1])
    return None


# --------------------------------------------------------------------------------------------- command
def render(report: DriftReport, limit: int = 8):
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    parts = [Text(f"A: {report.a}\nB: {report.b}")]
    versions = Table(title="versions", show_header=True)
    versions.add_column("package")
    versions.add_column("A")
    versions.add_column("B")
    for key, (x, y) in report.versions.items():
        versions.add_row(key, str(x), str(y), style="bold" if x != y else None)
    parts.append(versions)
    if not report.drifted:
        parts.append(Text(f"no drift: {report.identical} of {report.compared} tensors bitwise equal", style="green"))
        return Group(*parts)
    for group in report.causes.values():
        table = Table(title=f"{group.cause}: {group.title}", title_justify="left", show_header=False)
        table.add_column("what")
        table.add_column("detail")
        for line in group.evidence:
            table.add_row("evidence", line)
        for line in group.expected:
            table.add_row("release notes", line)
        for item in group.tensors[:limit]:
            table.add_row(item["name"], item["change"])
        if len(group.tensors) > limit:
            table.add_row("…", f"{len(group.tensors) - limit} more tensors")
        parts.append(table)
    unexplained = [e for e in report.expected if e["cause"] not in report.causes]
    if unexplained:
        parts.append(Text("release-history changes between these versions with no visible effect here: "
                          + "; ".join(f"{e['version']} {e['change']}" for e in unexplained)))
    parts.append(Text(f"{report.compared - report.identical} of {report.compared} common tensors differ"))
    return Group(*parts)


def cmd_drift(args) -> int:
    from rich.console import Console

    report = drift(args.a, args.b)
    Console().print(render(report, limit=args.limit))
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(report.to_dict(), indent=1, default=str) + "\n")
    return 1 if report.drifted else 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "drift", help="what changed between two reference dumps (e.g. two ultralytics releases), by cause",
        description="List every difference between reference dumps A and B, grouped by cause (versions, Detect "
                    "bias init, small-box floor, loss output shape, head output layout, ...). Exit 0: no drift; "
                    "1: drift; 2: bad input.")
    parser.add_argument("a", help="reference dump A (e.g. captured with ultralytics 8.3.200)")
    parser.add_argument("b", help="reference dump B (e.g. captured with the current ultralytics)")
    parser.add_argument("--json", dest="json_out", help="also write the drift report as JSON here")
    parser.add_argument("--limit", type=int, default=8, help="tensors listed per cause (default %(default)s)")
    parser.set_defaults(func=cmd_drift)
