"""`LossAdapter`: how to drive a user's loss callable (docs/loss-adapter.md): the layout of the predictions it
takes (a dict or per-level maps, and their level order), its targets' layout (box format, label columns,
normalised or pixels), its batch-size convention, the order of its terms and the stages it exposes."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

from parity.errors import ParityError
from parity.replay.loss.returns import CandidateResult, read_loss_return
from parity.replay.loss.spec import REPLAY_STAGES, TERMS, LossSpec

# Column layouts of a single (N, 6) label tensor, as ports pass them: `img` image index, `cls` class, then the
# box in the named format (`normalized` says fractions or pixels).
LABEL_LAYOUTS = ("img,cls,xywh", "img,cls,xyxy", "img,xywh,cls", "img,xyxy,cls")
LEVEL_ORDERS = {"fine-first": "fine-first", "p3-first": "fine-first", "coarse-first": "coarse-first",
                "p5-first": "coarse-first"}


class LossAdapter:
    """How to drive a candidate loss: docs/loss-adapter.md describes every option.

    loss          callable(preds, batch) -> any return shape of RETURN_SHAPES (`read_loss_return`)
    predictions   "dict": {"boxes": (B, 4*reg_max, A), "scores": (B, nc, A), "feats": [...]} (ultralytics 8.4);
                  "levels": a list of (B, 4*reg_max + nc, H, W) maps (ultralytics 8.3 and most ports)
    level_order   "fine-first" / "P3-first" (the reference's order) or "coarse-first" / "P5-first"
    targets       "xywh" or "xyxy" boxes in the batch dict, or a column layout of one (N, 6) label tensor
                  (LABEL_LAYOUTS, e.g. "img,xyxy,cls"); `normalized` True for fractions of the image, False for pixels
    batch_scaled  True: the loss vector is multiplied by the batch size (ultralytics); False: per-image mean
    terms         order of the returned vector's terms, names from ("box", "cls", "dfl")
    stages        {stage: fn(**inputs) -> {name: tensor}} under the dump's stage and tensor names
                  (end-to-end heads: {branch: {stage: fn}}); `assigner` is the assigner alone
    batch_fn      optional callable(converted batch) -> whatever the loss takes as its batch
    preds_fn      optional callable(head dict) -> whatever the loss takes as predictions
    with_gains    optional callable((box, cls, dfl) gains) -> the same loss built with those gains: a loss that
                  returns only a scalar still gets per-term verdicts (set automatically for a factory that
                  takes the gains)
    """

    def __init__(self, loss: Callable | None = None, *, predictions: str = "dict", level_order: str = "fine-first",
                 targets: str = "xywh", normalized: bool = True, batch_scaled: bool = True,
                 terms: Sequence[str] = TERMS, stages: Mapping | None = None, name: str | None = None,
                 batch_fn: Callable | None = None, preds_fn: Callable | None = None,
                 with_gains: Callable | None = None):
        if predictions not in ("dict", "levels"):
            raise ParityError(f"loss adapter: predictions={predictions!r}, expected 'dict' or 'levels'")
        if str(level_order).lower() not in LEVEL_ORDERS:
            raise ParityError(f"loss adapter: level_order={level_order!r}, expected 'fine-first' (P3-first) or "
                              f"'coarse-first' (P5-first)")
        layout = str(targets).replace(" ", "").lower()
        if layout not in ("xywh", "xyxy", *LABEL_LAYOUTS):
            raise ParityError(f"loss adapter: targets={targets!r}, expected 'xywh', 'xyxy' or one of "
                              f"{', '.join(repr(v) for v in LABEL_LAYOUTS)}")
        unknown = [t for t in terms if t not in TERMS]
        if unknown or len(set(terms)) != len(terms) or len(terms) != len(TERMS):
            raise ParityError(f"loss adapter: terms={list(terms)}, expected an order of {', '.join(TERMS)}")
        if not isinstance(normalized, bool):
            raise ParityError(f"loss adapter: normalized={normalized!r}, expected True (fractions of the image) "
                              f"or False (pixels)")
        self.loss = loss
        self.predictions = predictions
        self.level_order = LEVEL_ORDERS[str(level_order).lower()]
        self.targets = layout
        self.normalized = normalized
        self.batch_scaled = batch_scaled
        self.terms = tuple(terms)
        self.stages = dict(stages or {})
        self.name = name or getattr(loss, "__name__", None) or type(loss).__name__
        self.batch_fn = batch_fn
        self.preds_fn = preds_fn
        self.with_gains = with_gains

    # -- stages
    def stage(self, name: str, branch: str | None = None) -> Callable | None:
        table = self.stages.get(branch, {}) if branch is not None and branch in self.stages else self.stages
        fn = table.get(name) if isinstance(table, Mapping) else None
        return fn if callable(fn) else None

    def exposed(self, branch: str | None = None) -> list[str]:
        return [s for s in REPLAY_STAGES if self.stage(s, branch) is not None]

    # -- inputs
    def convert_preds(self, head: dict, spec: LossSpec) -> Any:
        """head: {"boxes", "scores"} (or {branch: {...}}), reference layout. Differentiable conversions only."""
        if self.preds_fn is not None:
            return self.preds_fn(head)
        if spec.end2end:
            return {b: self._one_head(head[b], spec) for b in spec.branches}
        return self._one_head(head, spec)

    def _one_head(self, head: dict, spec: LossSpec) -> Any:
        coarse_first = self.level_order == "coarse-first"
        shapes = list(spec.feat_shapes)
        if self.predictions == "dict":
            boxes, scores = head["boxes"], head["scores"]
            if coarse_first:  # the anchor axis too: coarsest level's anchors first
                boxes, scores = (torch.cat(_split_levels(t, shapes)[::-1], -1) for t in (boxes, scores))
                shapes = shapes[::-1]
            feats = [torch.zeros(spec.batch_size, 1, h, w) for h, w in shapes]
            return {"boxes": boxes, "scores": scores, "feats": feats, "feat_shapes": shapes}
        levels = []
        for (h, w), boxes, scores in zip(shapes, _split_levels(head["boxes"], shapes),
                                         _split_levels(head["scores"], shapes)):
            level = torch.cat((boxes, scores), 1)
            levels.append(level.reshape(level.shape[0], level.shape[1], h, w))
        return levels[::-1] if coarse_first else levels

    def convert_batch(self, batch: dict, spec: LossSpec) -> Any:
        """The reference batch (normalized xywh, sorted batch_idx) in the layout the candidate declared."""
        boxes = batch["bboxes"]
        if "xyxy" in self.targets:
            centre, half = boxes[:, :2], boxes[:, 2:] / 2
            boxes = torch.cat((centre - half, centre + half), 1)
        if not self.normalized:
            h, w = spec.imgsz
            boxes = boxes * torch.tensor([w, h, w, h], dtype=boxes.dtype)
        if "," in self.targets:
            columns = {"img": batch["batch_idx"].reshape(-1, 1).to(boxes.dtype),
                       "cls": batch["cls"].reshape(-1, 1).to(boxes.dtype), "xywh": boxes, "xyxy": boxes}
            out: Any = torch.cat([columns[c] for c in self.targets.split(",")], 1)
        else:
            out = {**batch, "bboxes": boxes}
        return self.batch_fn(out) if self.batch_fn is not None else out

    # -- the call
    def call(self, preds: Any, batch: Any) -> CandidateResult:
        if self.loss is None:
            raise ParityError(f"loss candidate {self.name}: the adapter has no loss callable, only stages")
        return self.parse(self.loss(preds, batch))

    def parse(self, value: Any) -> CandidateResult:
        """The candidate's return value, copied (a candidate that later changes a tensor in place cannot change
        what is compared), read by types and shapes (`read_loss_return`)."""
        return read_loss_return(value, self.terms, self.name)


def coarse_first_order(shapes: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Anchor indices in coarse-first order: position i of a P5-first candidate is reference anchor perm[i]."""
    sizes = [int(h) * int(w) for h, w in shapes]
    return torch.cat(list(torch.arange(sum(sizes)).split(sizes))[::-1])


def _split_levels(flat: torch.Tensor, shapes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """(B, C, A) -> per level (B, C, h*w), finest first."""
    out, start = [], 0
    for h, w in shapes:
        out.append(flat[..., start:start + h * w])
        start += h * w
    return out

