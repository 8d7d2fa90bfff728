"""Tensor names in a dump: the one place that spells them (docs/dump-format.md is their documentation)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

LOSS_CASES = ("default", "small_box", "empty_image", "no_boxes")
LOSS_TERMS = ("box", "cls", "dfl")
HEAD_OUTPUTS = ("boxes", "scores")
E2E_BRANCHES = ("one2many", "one2one")

# Stage -> the tensors it produces, in pipeline order. The loss replay walks this table.
LOSS_STAGES: dict[str, tuple[str, ...]] = {
    "anchors": ("anchor_points", "stride_tensor"),
    "preprocess": ("targets", "mask_gt"),
    "decode": ("pred_bboxes",),
    "assign": (
        "pd_scores", "pd_bboxes", "anc_points", "mask_in_gts", "align_metric", "overlaps", "mask_pos",
        "target_labels", "target_bboxes", "target_scores", "fg_mask", "target_gt_idx",
    ),
    "normalize": ("target_scores_sum",),
    "classify": ("bce", "loss"),
    "box": ("loss_iou", "loss_dfl"),
    "gains": ("before", "after"),
}
# Produced once per case, also for end-to-end models (the branches combined).
LOSS_OUTPUT = ("loss", "items")
# Assigner outputs whose background-anchor rows are filler: they are judged on the reference's fg_mask only.
FOREGROUND_ONLY = ("target_labels", "target_bboxes", "target_gt_idx")


# A candidate dump's outputs computed on the reference's own inputs (one layer at a time) carry this prefix in
# front of their `act.*` name; the bare `act.*` names are one end-to-end forward.
ISOLATED = "isolated."


def isolated(name: str) -> str:
    return ISOLATED + name


def weight(key: str) -> str:
    return key


def batch_img() -> str:
    return "batch.img"


def batch_target(case: str, field: str) -> str:
    return f"batch.{case}.{field}"


def act(layer: int, *path: str | int) -> str:
    return ".".join(["act", str(layer), *map(str, path)])


def init_bias(kind: str, level: int, variant: str) -> str:
    """kind: 'cls_bias' or 'box_bias'; variant: 'stored', 'float32' or 'float64'."""
    return f"init.{kind}.{level}.{variant}"


def loss(case: str, stage: str, name: str, branch: str | None = None) -> str:
    return ".".join(p for p in ("loss", case, branch, stage, name) if p)


def loss_output(case: str, name: str) -> str:
    return f"loss.{case}.output.{name}"


def grad_param(key: str) -> str:
    return f"grad.param.{key}"


def grad_head(case: str, term: str, output: str, branch: str | None = None) -> str:
    return ".".join(p for p in ("grad.head", case, term, branch, output) if p)


def layer_of(name: str) -> int | None:
    """The layer index a weight (`model.{i}.…`), activation (`act.{i}…`) or gradient belongs to."""
    parts = name.split(".")
    if parts[:2] == ["grad", "param"]:
        parts = parts[2:]
    if len(parts) > 1 and parts[0] in ("model", "act") and parts[1].isdigit():
        return int(parts[1])
    return None


def nth_call(name: str, call: int) -> str:
    """A module called more than once (SPPF's pooling) names its later outputs `name#1`, `name#2`, …"""
    return name if call == 0 else f"{name}#{call}"


def flatten_output(name: str, value: Any) -> dict[str, torch.Tensor]:
    """Dump names of a module's output: a tensor under `name`, a list/tuple's items under `name.{k}`, a dict's
    under `name.{key}` (the Detect head's `feats` left out: they are its inputs, stored already)."""
    if isinstance(value, torch.Tensor):
        return {name: value}
    out: dict[str, torch.Tensor] = {}
    if isinstance(value, Mapping):
        for key, item in value.items():
            if key != "feats":
                out.update(flatten_output(f"{name}.{key}", item))
    elif isinstance(value, (list, tuple)):
        for k, item in enumerate(value):
            out.update(flatten_output(f"{name}.{k}", item))
    return out


def foreground_mask_for(name: str) -> str | None:
    """For an assigner output judged on foreground anchors only, the name of the fg_mask beside it."""
    parts = name.split(".")
    if parts[0] == "loss" and parts[-1] in FOREGROUND_ONLY:
        return ".".join(parts[:-1] + ["fg_mask"])
    return None


def place_of(name: str) -> str:
    """Where a tensor belongs, in a report's words: `layer 23`, `loss/default assign`, or its section."""
    layer = layer_of(name)
    if layer is not None:
        return f"layer {layer}"
    parts = name.split(".")
    if parts[0] == "loss" and len(parts) > 3:
        return f"loss/{parts[1]} {'.'.join(parts[2:-1])}"
    return parts[0]


# ---- training steps (`parity dump --steps N`; docs/dump-format.md, "Training steps")
TRAIN_HYPER = ("lr", "momentum", "weight_decay")  # float64, one value per optimizer parameter group


def train(step: int, quantity: str, *path: str) -> str:
    """`train.{step}.{quantity}` (`train.3.lr`), `train.{step}.weights.{key}`, `train.{step}.optim.{key}.{buffer}`."""
    return ".".join(["train", str(step), quantity, *path])


def train_step_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "train" and len(parts) > 2 and parts[1].isdigit() else None
