"""Planting: put a registered cause into the clean built-in model or loss, from outside.

    detector = build_detector("yolo11n.yaml", nc=80)
    plant_detector(detector, "upsample-bilinear")     # replaces the Upsample modules
    loss = build_loss(manifest)
    plant_loss(loss, "topk-13")                       # replaces the loss object's assigner setting

`parity.reimpl.model.build_detector(..., inject=NAME)` and `parity.reimpl.loss.build_loss(..., inject=NAME)`
call these. A loss plant leaves a detector alone and a model plant cannot go into a loss (ValueError).
"""

from __future__ import annotations

from parity.causes.registry import get


def plant_detector(detector, name: str):
    """Apply plant `name` to a built detector in place (KeyError for an unknown name); returns it."""
    entry = get(name)
    if entry.kind == "model":
        entry.apply(detector)
    detector.injection = name
    return detector


def plant_loss(loss, name: str):
    """Apply loss plant `name` to a built loss (every branch of an end-to-end loss) in place; returns it."""
    entry = get(name)
    if entry.kind != "loss":
        raise ValueError(f"injection {name!r} is a {entry.kind} bug, not a loss bug")
    entry.apply(loss)
    loss.inject = name
    return loss
