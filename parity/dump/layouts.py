"""Layouts of older ultralytics releases, read in today's layout.

Up to 8.3 the Detect head returned one (B, 4*reg_max+nc, H, W) map per level; 8.4 returns the train dict
`{"boxes", "scores"}`. A dump written by an older release stores `act.{head}.{level}` and per-level head
gradients; every reader that expects the 8.4 names goes through `in_current_layout`, so it is done once."""

from __future__ import annotations

from typing import Any

from parity.dump import names
from parity.dump.files import DumpWithDerived


def _head_index(manifest: dict) -> int | None:
    model = manifest.get("model") or {}
    if "head_index" in model:
        return int(model["head_index"])
    layers = model.get("layers") or []
    return len(layers) - 1 if layers else None


def head_layout(dump) -> str | None:
    """'dict' (act.{head}.boxes/.scores), 'list' (act.{head}.{l} per level), or None when neither is stored."""
    head = _head_index(dump.manifest)
    if head is None:
        return None
    if f"act.{head}.boxes" in dump or f"act.{head}.one2many.boxes" in dump:
        return "dict"
    if f"act.{head}.0" in dump:
        return "list"
    return None


def levels_to_dict(maps: list, reg_max: int, nc: int) -> dict:
    """Per-level (B, 4*reg_max+nc, H, W) head maps (ultralytics <= 8.3) as the 8.4 train dict's tensors."""
    import torch

    b = maps[0].shape[0]
    cat = torch.cat([m.reshape(b, 4 * reg_max + nc, -1) for m in maps], -1)
    return {"boxes": cat[:, : 4 * reg_max], "scores": cat[:, 4 * reg_max:]}


def _head_views(dump, head: int, prefix: str = "act") -> dict[str, Any]:
    """The head's outputs in the dict layout, converting per-level maps where needed (None when absent)."""
    layout = head_layout(dump)
    if layout == "dict":
        return {k: dump.get(f"{prefix}.{head}.{k}") for k in ("boxes", "scores") if f"{prefix}.{head}.{k}" in dump}
    if layout == "list":
        model = dump.model
        levels = sorted(int(n.split(".")[2]) for n in dump.names(f"{prefix}.{head}.")
                        if len(n.split(".")) == 3 and n.split(".")[2].isdigit())
        maps = [dump.get(f"{prefix}.{head}.{l}") for l in levels]
        return levels_to_dict(maps, int(model.get("reg_max", 16)), int(model.get("nc")))
    return {}


def in_current_layout(dump):
    """An ultralytics <= 8.3 dump as readers of the 8.4 layout expect it: the per-level head maps and the
    per-level head gradients joined into `act.{head}.boxes/.scores` and `grad.head.{case}.{term}.boxes/.scores`.
    A dump already in the dict layout (or without a head) is returned unchanged."""
    head = _head_index(dump.manifest)
    if head is None or head_layout(dump) != "list":
        return dump
    reg_max, nc = int(dump.model.get("reg_max", 16)), int(dump.model.get("nc"))
    derived = {names.act(head, key): tensor for key, tensor in _head_views(dump, head).items()}
    levels = [str(level) for level in range(len(dump.model.get("strides") or (8, 16, 32)))]
    for case in names.LOSS_CASES:
        for term in names.LOSS_TERMS:
            per_level = [names.grad_head(case, term, level) for level in levels]
            if all(name in dump for name in per_level):
                joined = levels_to_dict([dump.get(name) for name in per_level], reg_max, nc)
                derived.update({names.grad_head(case, term, key): t for key, t in joined.items()})
    return DumpWithDerived(dump, derived)
