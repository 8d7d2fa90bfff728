"""Release drift as known causes: every entry of ultralytics' release history that changes a number.

A port that follows an older release differs from the current reference exactly where a release changed
something. Each such change is a cause whose finding is `version-drift`, naming the release; the explainer
tries it like any other cause, with no `--old-reference` dump (an old reference then confirms it, see
docs/drift.md). Entries that cannot be replayed from one dump carry no transform: they are listed, not tried.
"""

from __future__ import annotations

import torch

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


def history_of(cause: str) -> list[str]:
    return [f"{v}: {text}" for v, c, text in RELEASE_HISTORY if c == cause]


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
