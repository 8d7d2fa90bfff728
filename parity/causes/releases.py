"""Release drift as known causes: every entry of ultralytics' release history that changes a number.

A port that follows an older release differs from the current reference exactly where a release changed
something. Each such change is a cause whose finding is `version-drift`, naming the release; the explainer
tries it like any other cause, with no `--old-reference` dump (an old reference then confirms it, see
docs/drift.md). Entries that cannot be replayed from one dump carry no transform: they are listed, not tried.

Beside the history: what each drift cause is called (`CAUSE_TITLES`), which entries lie between two releases
(`expected_changes`), and which cause a tensor that differs between two releases' dumps is put under
(`cause_of`), shared by the drift between two dumps (`parity.compare.drift`) and the diagnosis of a candidate
that matches an older release (`parity.diagnose.drift`).
"""

from __future__ import annotations

import torch
from packaging.version import InvalidVersion, Version

from parity.causes import loss_causes
from parity.causes.registry import Cause, plant, register

# (first release with the change, cause, what changed). From shared/notes/ultralytics-facts.md, checked
# against the released wheels' source (8.3.200, 8.4.0, 8.4.125, 8.4.137).
RELEASE_HISTORY: list[tuple[str, str, str]] = [
    ("8.0.12", "target-scores-sum-clamp", "target_scores_sum clamped to at least 1"),
    ("8.0.52", "assigner-inside-only", "assigner metrics only for anchors inside the box"),
    ("8.3.0", "model-structure", "yolov8 yaml built with the YOLO11 depthwise class head (until 8.3.16)"),
    ("8.3.17", "model-structure", "`legacy` flag: yolov8 yaml builds the legacy class head again"),
    ("8.3.99", "loss-output-shape", "model.loss()[0]: scalar sum*B -> 3-vector (box, cls, dfl) *B"),
    ("8.4.0", "box-bias-init", "Detect box bias 1.0 -> 2.0"),
    ("8.4.0", "head-output-layout", "train-mode head output: list of per-level maps -> dict boxes/scores/feats"),
    ("8.4.0", "small-box-floor", "assigner: box sides under 8 px (stride[0]) enlarged to 16 px (stride[1])"),
    ("8.4.0", "model-structure", "YOLO26 and E2ELoss"),
    ("8.4.100", "numerics", "vectorized target preprocessing (needs sorted batch_idx)"),
    ("8.4.137", "small-box-floor", "small-box threshold 8 px -> 16 px (sides under 16 px enlarged to 16 px)"),
    ("8.4.142", "model-structure", "end-to-end models default to the one2many head in eval"),
    ("8.4.170", "numerics", "CIoU alpha rewritten (last-bit differences)"),
]


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


def history_of(cause: str) -> list[str]:
    return [f"{v}: {text}" for v, c, text in RELEASE_HISTORY if c == cause]


def parse_version(version: str | None) -> Version | None:
    """An ultralytics version as PEP 440 orders it (local labels such as `+cu128` do not count); None when there
    is none or it is not a version."""
    if not version:
        return None
    try:
        return Version(str(version).split("+")[0])
    except InvalidVersion:
        return None


def expected_changes(version_a: str | None, version_b: str | None) -> list[dict]:
    """Release-history entries between two versions (those a dump of one should differ from the other by)."""
    a, b = parse_version(version_a), parse_version(version_b)
    if a is None or b is None or a == b:
        return []
    low, high = min(a, b), max(a, b)
    return [{"version": v, "cause": c, "change": text} for v, c, text in RELEASE_HISTORY
            if low < Version(v) <= high]


def cause_of(name: str, head: int | None, active: set[str]) -> str:
    """The cause a differing tensor is put under, given the causes found in the manifests and init tensors."""
    parts = name.split(".")
    h = str(head) if head is not None else None
    is_head_act = parts[0] == "act" and len(parts) > 1 and parts[1] == h
    if "loss-output-shape" in active and parts[0] == "loss" and parts[2:4] == ["output", "loss"]:
        return "loss-output-shape"
    if "small-box-floor" in active and (name.startswith("loss.small_box.") or name.startswith("grad.head.small_box.")):
        return "small-box-floor"
    for cause, branch, kind in (("box-bias-init", "cv2", "box_bias"), ("cls-bias-init", "cv3", "cls_bias")):
        if cause in active and (name.startswith(f"init.{kind}.") or _is_head_bias(parts, h, branch)):
            return cause
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


def _is_head_bias(parts: list[str], head: str | None, branch: str) -> bool:
    """`model.{head}.{branch}.….bias`: a Detect branch's bias."""
    return parts[0] == "model" and len(parts) > 4 and parts[1] == head and parts[2] == branch and parts[-1] == "bias"


# Release causes the explainer can replay on one dump. Their signatures are `release-{cause}-{version}`.
register(Cause(
    "release-small-box-floor-8.4.0", "loss", ("assign", "assigner", "loss"),
    "matches ultralytics up to 8.3.x: no small-box floor (boxes under 16 px are not widened before the in-box "
    "test); a port of the older release, not a bug: add the 16 px floor to follow 8.4",
    lambda loss: loss_causes.floor_variant(loss, threshold=None, floor=None), params=({},), release="8.4.0"))
register(Cause(
    "release-small-box-floor-8.4.137", "loss", ("assign", "assigner", "loss"),
    "matches ultralytics 8.4.0 to 8.4.136: only sides under 8 px are widened to 16 px; a port of the older "
    "release, not a bug: widen sides under 16 px",
    lambda loss: loss_causes.floor_variant(loss, threshold=8.0, floor=16.0), params=({},), release="8.4.137"))
register(Cause(
    "release-loss-output-shape-8.3.99", "loss", ("output", "loss"),
    "matches ultralytics before 8.3.99: model.loss()[0] is the scalar sum of the terms times B; return the "
    "(box, cls, dfl) vector times B to follow 8.3.99 and later",
    lambda loss: loss_causes.scalar_output(loss), params=({},), release="8.3.99"))
# Not tried: its transform is the bug cause `unclamped-target-scores-sum`, which is named instead (a batch
# without boxes divides by zero whatever release a port follows).
register(Cause(
    "release-target-scores-sum-clamp-8.0.12", "structure", ("release",),
    "ultralytics before 8.0.12: the normaliser target_scores.sum() is not clamped at 1 (the explainer names "
    "the bug cause `unclamped-target-scores-sum` for it)", release="8.0.12"))
register(Cause(
    "release-box-bias-init-8.4.0", "structure", ("bias-init-box",),
    "matches ultralytics up to 8.3.x: Detect box bias 1.0 (2.0 from 8.4.0); with reg_max > 1 a constant box "
    "bias cancels in the DFL softmax", release="8.4.0"))
register(Cause(
    "release-model-structure-8.3.0", "structure", ("Detect",),
    "matches ultralytics 8.3.0 to 8.3.16: the yolov8 yaml built with YOLO11's depthwise class head",
    release="8.3.0"))
# The rest of the history is listed so that every entry is a cause; none changes a number that one dump can
# replay (they are layouts, defaults or last-bit arithmetic), so they carry no transform and are not tried.
for _version, _cause, _text in RELEASE_HISTORY:
    _signature = f"release-{_cause}-{_version}"
    if _signature not in ("release-small-box-floor-8.4.0", "release-small-box-floor-8.4.137",
                          "release-loss-output-shape-8.3.99", "release-target-scores-sum-clamp-8.0.12",
                          "release-box-bias-init-8.4.0", "release-model-structure-8.3.0"):
        register(Cause(_signature, "structure", ("release",), f"ultralytics {_version}: {_text} (not replayable "
                                                              f"from one dump: confirm with --old-reference)",
                       release=_version))


def _box_bias_one(detector) -> None:
    with torch.no_grad():
        for level in range(detector.head.num_levels):
            detector.head.box_final(level).bias.fill_(1.0)


plant("as-of-8.3", "release-box-bias-init-8.4.0", "ultralytics 8.3.x Detect init: box bias 1.0 instead of 2.0",
      _box_bias_one)
plant("as-of-8.3-loss", "release-small-box-floor-8.4.0",
      "ultralytics 8.3.x assigner: no small-box floor (boxes under 16 px are not widened)",
      loss_causes._plant_each(loss_causes.floor_variant, threshold=None, floor=None), stages=("assigner",))
plant("as-of-8.4.0-loss", "release-small-box-floor-8.4.137",
      "ultralytics 8.4.0-8.4.136 assigner: only sides under 8 px widened to 16 px",
      loss_causes._plant_each(loss_causes.floor_variant, threshold=8.0, floor=16.0), stages=("assigner",))
plant("loss-output-scalar", "release-loss-output-shape-8.3.99",
      "ultralytics < 8.3.99 output: model.loss()[0] is the scalar sum of the terms times B",
      loss_causes._plant_each(loss_causes.scalar_output), stages=("output",))


def _depthwise_head(detector) -> None:
    """The yolov8 yaml's head as ultralytics 8.3.0-8.3.16 built it: YOLO11's depthwise class branch."""
    from parity.reimpl.blocks import DetectHead

    if not detector.legacy_head:
        raise ValueError(f"{detector.model_name} already has the depthwise class head")
    old = detector.head
    in_channels = [detector.specs[s].c_out for s in detector.sources[detector.head_index]]
    head = DetectHead(detector.nc, in_channels, detector.reg_max, legacy=False)
    head.dfl_bins = old.dfl_bins
    detector.layers[detector.head_index] = head
    detector.bias_init()


plant("as-of-8.3.0-head", "release-model-structure-8.3.0",
      "ultralytics 8.3.0-8.3.16 yolov8 head: the depthwise (YOLO11) class branch instead of the legacy one",
      _depthwise_head)
