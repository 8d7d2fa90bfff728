"""Planting: put a registered cause into the clean built-in model or loss, from outside.

    detector = build_detector("yolo11n.yaml", nc=80)
    plant_detector(detector, "upsample-bilinear")     # replaces the Upsample modules
    loss = build_loss(manifest)
    plant_loss(loss, "topk-13")                       # replaces the loss object's assigner setting

`planted_detector(model, nc, NAME)` and `planted_loss(config, NAME)` build and plant in one call; the built-in
itself has no switch for any cause. A loss plant leaves a detector alone and a model plant cannot go into a loss
(ValueError).
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


def planted_detector(model: str = "yolo11n.yaml", nc: int = 80, name: str | None = None):
    """The built-in detector with cause `name` planted (none when `name` is empty)."""
    from parity.reimpl.model import build_detector

    detector = build_detector(model, nc=nc)
    return plant_detector(detector, name) if name else detector


def planted_loss(config, name: str | None = None, *, end2end: bool | None = None):
    """The built-in loss for `config` (a LossConfig or a dump manifest) with loss cause `name` planted."""
    from parity.reimpl.loss import build_loss

    loss = build_loss(config, end2end=end2end)
    return plant_loss(loss, name) if name else loss
