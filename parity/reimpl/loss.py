"""A clean-room re-implementation of ultralytics 8.4.190's detection loss (`v8DetectionLoss`, `E2ELoss`).

The loss is a pipeline of named stages; each stage is one function whose keyword inputs and dict outputs are
the tensor names of docs/dump-format.md (stage `loss`). That lets a comparison feed any stage the reference's
inputs for that stage and compare its outputs on their own (stage cross-replay):

    anchors     feat_shapes                                    -> anchor_points, stride_tensor
    preprocess  batch_idx, cls, bboxes, batch_size, imgsz      -> targets, mask_gt
    decode      boxes, anchor_points                           -> pred_bboxes
    assign      scores, pred_bboxes, anchor_points, stride_tensor, targets, mask_gt
                                                               -> pd_scores, pd_bboxes, anc_points, mask_in_gts,
                                                                  align_metric, overlaps, mask_pos, target_labels,
                                                                  target_bboxes, target_scores, fg_mask,
                                                                  target_gt_idx
      (its second half, the assigner proper, is the stage function `assigner`:
                pd_scores, pd_bboxes, anc_points, targets, mask_gt -> mask_in_gts ... target_gt_idx)
    normalize   target_scores                                  -> target_scores_sum
    classify    scores, target_scores, target_scores_sum       -> bce, loss
    box         boxes, pred_bboxes, anchor_points, stride_tensor, target_bboxes, target_scores,
                target_scores_sum, fg_mask, imgsz              -> loss_iou, loss_dfl
    gains       loss_iou, loss_cls, loss_dfl                   -> before, after
    output      after, batch_size                              -> loss, items

`boxes` (B, 4*reg_max, A) and `scores` (B, nc, A) are the Detect head's raw train outputs; `imgsz` is the
(H, W) image size in pixels as a float tensor. `DetectionLoss.run(preds, batch)` runs the whole pipeline and
returns the loss like `model.loss(batch)` (the loss vector times the batch size, and the detached items) plus
every intermediate under its `{stage}.{name}` name.

Floating-point operations follow the reference's order so that CPU results agree bitwise; comments say where
that order is the point. No ultralytics code is imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from parity.reimpl.assigner import AssignerConfig, complete_iou, cxcywh_to_xyxy
from parity.reimpl.assigner import assign as run_assigner

STAGES = ("anchors", "preprocess", "decode", "assign", "normalize", "classify", "box", "gains", "output")

# Keyword inputs of every stage function (see the module docstring).
STAGE_INPUTS: dict[str, tuple[str, ...]] = {
    "anchors": ("feat_shapes",),
    "preprocess": ("batch_idx", "cls", "bboxes", "batch_size", "imgsz"),
    "decode": ("boxes", "anchor_points"),
    "assign": ("scores", "pred_bboxes", "anchor_points", "stride_tensor", "targets", "mask_gt"),
    "assigner": ("pd_scores", "pd_bboxes", "anc_points", "targets", "mask_gt"),
    "normalize": ("target_scores",),
    "classify": ("scores", "target_scores", "target_scores_sum"),
    "box": ("boxes", "pred_bboxes", "anchor_points", "stride_tensor", "target_bboxes", "target_scores",
            "target_scores_sum", "fg_mask", "imgsz"),
    "gains": ("loss_iou", "loss_cls", "loss_dfl"),
    "output": ("after", "batch_size"),
}
# Where each stage input comes from: an earlier stage's output (dump name without the `loss.{case}` prefix),
# or the head / batch (`head.*`, `batch.*`: the caller supplies those).
INPUT_SOURCES: dict[str, str] = {
    "feat_shapes": "head.feat_shapes", "boxes": "head.boxes", "scores": "head.scores",
    "batch_idx": "batch.batch_idx", "cls": "batch.cls", "bboxes": "batch.bboxes",
    "batch_size": "batch.batch_size", "imgsz": "batch.imgsz",
    "anchor_points": "anchors.anchor_points", "stride_tensor": "anchors.stride_tensor",
    "targets": "preprocess.targets", "mask_gt": "preprocess.mask_gt", "pred_bboxes": "decode.pred_bboxes",
    "pd_scores": "assign.pd_scores", "pd_bboxes": "assign.pd_bboxes", "anc_points": "assign.anc_points",
    "target_bboxes": "assign.target_bboxes", "target_scores": "assign.target_scores",
    "fg_mask": "assign.fg_mask", "target_scores_sum": "normalize.target_scores_sum",
    "loss_iou": "box.loss_iou", "loss_cls": "classify.loss", "loss_dfl": "box.loss_dfl", "after": "gains.after",
}
TERMS = ("box", "cls", "dfl")  # order of the loss vector


@dataclass(frozen=True)
class LossConfig:
    """Everything the loss needs to know about the model and the training hyperparameters."""

    nc: int
    reg_max: int = 16
    strides: tuple[float, ...] = (8.0, 16.0, 32.0)
    box: float = 7.5  # gains
    cls: float = 0.5
    dfl: float = 1.5
    topk: int = 10  # task-aligned assigner
    topk2: int | None = None
    alpha: float = 0.5
    beta: float = 6.0
    eps: float = 1e-9
    min_box_side: float | None = None  # pixels; None: the second stride (the first for one level)

    @property
    def assigner(self) -> AssignerConfig:
        side = self.min_box_side
        if side is None:
            side = self.strides[1] if len(self.strides) > 1 else self.strides[0]
        return AssignerConfig(num_classes=self.nc, topk=self.topk, topk2=self.topk2, alpha=self.alpha,
                              beta=self.beta, eps=self.eps, min_box_side=float(side))

    @property
    def gains(self) -> tuple[float, float, float]:
        return (self.box, self.cls, self.dfl)

    @classmethod
    def from_manifest(cls, manifest: dict) -> "LossConfig":
        """The configuration a reference dump was captured with (its `model` and `hyperparameters`)."""
        model, hyp = manifest.get("model", {}), manifest.get("hyperparameters", {})
        kwargs: dict[str, Any] = {"nc": int(model["nc"]), "reg_max": int(model.get("reg_max", 16)),
                                  "strides": tuple(float(s) for s in model.get("strides", (8, 16, 32)))}
        for key, name, kind in (("box", "box", float), ("cls", "cls", float), ("dfl", "dfl", float),
                                ("tal_topk", "topk", int), ("tal_alpha", "alpha", float),
                                ("tal_beta", "beta", float), ("tal_eps", "eps", float),
                                ("small_box_floor_px", "min_box_side", float)):
            if hyp.get(key) is not None:
                kwargs[name] = kind(hyp[key])
        return cls(**kwargs)


# ------------------------------------------------------------------------------------------- the stages
def make_anchors(feat_shapes: Sequence[Sequence[int]], strides: Sequence[float], *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
                 ) -> dict[str, torch.Tensor]:
    """Anchor centres in grid units, (x + 0.5, y + 0.5), finest level first, row-major within a level."""
    points, stride_of = [], []
    for (h, w), stride in zip(feat_shapes, strides):
        xs = torch.arange(int(w), device=device).to(dtype) + 0.5
        ys = torch.arange(int(h), device=device).to(dtype) + 0.5
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack((xx, yy), -1).view(-1, 2))
        stride_of.append(torch.full((int(h) * int(w), 1), float(stride), dtype=dtype, device=device))
    return {"anchor_points": torch.cat(points), "stride_tensor": torch.cat(stride_of)}


def preprocess(batch_idx: torch.Tensor, cls: torch.Tensor, bboxes: torch.Tensor, batch_size: int,
               imgsz: torch.Tensor) -> dict[str, torch.Tensor]:
    """Ground truth per image, padded: targets (B, M, 5) `class x1 y1 x2 y2` in pixels, mask_gt (B, M, 1).

    Boxes keep their order within an image. `bboxes` are normalized `cx cy w h`; they are scaled to pixels
    first and converted to corners after (the reference's order: scale, then halve the size).
    """
    image = batch_idx.reshape(-1).long()
    n = image.shape[0]
    if n and (int(image.min()) < 0 or int(image.max()) >= batch_size):
        raise ValueError(f"batch_idx holds image {int(image.max())}, outside a batch of {batch_size} images")
    counts = torch.bincount(image, minlength=batch_size) if n else torch.zeros(batch_size, dtype=torch.long)
    m = int(counts.max()) if n else 0
    targets = torch.zeros((batch_size, m, 5), dtype=bboxes.dtype, device=bboxes.device)
    if n:
        slot = _slot_within_image(image, counts)
        scale = imgsz.to(bboxes.dtype)[[1, 0, 1, 0]]  # (W, H, W, H)
        targets[image, slot] = torch.cat((cls.reshape(-1, 1).to(bboxes.dtype), cxcywh_to_xyxy(bboxes * scale)), -1)
    # A row is a real box when its corner coordinates sum to more than zero (padding rows are all zero).
    mask_gt = (targets[..., 1:5].sum(-1, keepdim=True) > 0).to(targets.dtype)
    return {"targets": targets, "mask_gt": mask_gt}


def _slot_within_image(image: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """For every box, how many boxes of the same image come before it (works for unsorted `batch_idx` too)."""
    order = torch.argsort(image, stable=True)
    first = torch.cumsum(counts, 0) - counts  # index of each image's first box in sorted order
    slot = torch.empty_like(image)
    slot[order] = torch.arange(image.shape[0], device=image.device) - first[image[order]]
    return slot


def expected_distances(boxes: torch.Tensor, reg_max: int) -> torch.Tensor:
    """(B, A, 4) box-side distances in grid units from the head's (B, 4*reg_max, A) output.

    With reg_max > 1 each side is a distribution over 0..reg_max-1 (DFL): its mean, computed as a matmul with
    the bin values (a plain weighted sum rounds differently). With reg_max == 1 the head regresses directly.
    """
    dist = boxes.permute(0, 2, 1).contiguous()  # (B, A, 4*reg_max)
    if reg_max <= 1:
        return dist
    b, a, _ = dist.shape
    bins = torch.arange(reg_max, dtype=torch.float, device=dist.device).type(dist.dtype)
    return dist.view(b, a, 4, reg_max).softmax(3).matmul(bins)


def decode(boxes: torch.Tensor, anchor_points: torch.Tensor, reg_max: int) -> dict[str, torch.Tensor]:
    """pred_bboxes (B, A, 4): `x1 y1 x2 y2` in grid units, the anchor minus left/top, plus right/bottom."""
    left_top, right_bottom = expected_distances(boxes, reg_max).chunk(2, -1)
    return {"pred_bboxes": torch.cat((anchor_points - left_top, anchor_points + right_bottom), -1)}


def assigner_inputs(scores: torch.Tensor, pred_bboxes: torch.Tensor, anchor_points: torch.Tensor,
                    stride_tensor: torch.Tensor, *, detach: bool = True) -> dict[str, torch.Tensor]:
    """What the assigner sees: class probabilities, pixel boxes and pixel anchors, cut from autograd.

    The assignment is a target, not a prediction: gradients must not flow through it (`detach`).
    """
    probs = scores.permute(0, 2, 1).contiguous()
    boxes = pred_bboxes
    if detach:
        probs, boxes = probs.detach(), boxes.detach()
    return {"pd_scores": probs.sigmoid(), "pd_bboxes": boxes * stride_tensor, "anc_points": anchor_points * stride_tensor}


def normalize(target_scores: torch.Tensor) -> dict[str, torch.Tensor]:
    """The loss normaliser: the total soft target, at least 1 (so an empty batch does not divide by zero)."""
    return {"target_scores_sum": target_scores.sum().clamp(min=1)}


def classify(scores: torch.Tensor, target_scores: torch.Tensor, target_scores_sum: torch.Tensor
             ) -> dict[str, torch.Tensor]:
    """BCE-with-logits over every anchor and class (background anchors learn 0), over the normaliser."""
    logits = scores.permute(0, 2, 1).contiguous()  # (B, A, nc)
    bce = F.binary_cross_entropy_with_logits(logits, target_scores.to(logits.dtype), reduction="none")
    return {"bce": bce, "loss": bce.sum() / target_scores_sum}


def box_losses(boxes: torch.Tensor, pred_bboxes: torch.Tensor, anchor_points: torch.Tensor,
               stride_tensor: torch.Tensor, target_bboxes: torch.Tensor, target_scores: torch.Tensor,
               target_scores_sum: torch.Tensor, fg_mask: torch.Tensor, imgsz: torch.Tensor, reg_max: int
               ) -> dict[str, torch.Tensor]:
    """CIoU loss and DFL (L1 distance loss when reg_max == 1) on foreground anchors, in grid units.

    Each foreground anchor is weighted by its soft target (summed over classes), and both sums are divided by
    the normaliser. With no foreground both are 0 and still depend on the predictions (empty sums).
    """
    dist = boxes.permute(0, 2, 1).contiguous()  # (B, A, 4*reg_max)
    truth = target_bboxes / stride_tensor  # pixels -> grid units
    fg = fg_mask.nonzero(as_tuple=True)
    weight = target_scores[fg].sum(-1, keepdim=True)  # (n_fg, 1)
    iou = complete_iou(pred_bboxes[fg], truth[fg])
    loss_iou = ((1.0 - iou) * weight).sum() / target_scores_sum

    x1y1, x2y2 = truth.chunk(2, -1)
    sides = torch.cat((anchor_points - x1y1, x2y2 - anchor_points), -1)  # true l, t, r, b distances
    if reg_max > 1:
        per_anchor = distribution_focal_loss(dist[fg].view(-1, reg_max), sides.clamp(0, reg_max - 1 - 0.01)[fg],
                                             reg_max)
    else:
        per_anchor = distance_l1_loss(dist[fg], sides[fg], stride_tensor.expand(*fg_mask.shape, 1)[fg], imgsz)
    loss_dfl = (per_anchor * weight).sum() / target_scores_sum
    return {"loss_iou": loss_iou, "loss_dfl": loss_dfl}


def distribution_focal_loss(logits: torch.Tensor, target: torch.Tensor, reg_max: int) -> torch.Tensor:
    """DFL (Generalized Focal Loss): cross-entropy against the two bins around each true distance, weighted by
    closeness; logits (n*4, reg_max), target (n, 4) -> (n, 1), the mean over the four sides."""
    target = target.clamp(0, reg_max - 1 - 0.01)  # the right bin must exist
    left = target.long()
    right = left + 1
    w_left = right - target
    w_right = 1 - w_left
    logp = F.log_softmax(logits, dim=1)
    picked_left = logp.gather(1, left.view(-1, 1)).view(left.shape)
    picked_right = logp.gather(1, right.view(-1, 1)).view(left.shape)
    return -(picked_left * w_left + picked_right * w_right).mean(-1, keepdim=True)


def distance_l1_loss(pred: torch.Tensor, target: torch.Tensor, stride: torch.Tensor, imgsz: torch.Tensor
                     ) -> torch.Tensor:
    """reg_max == 1 heads: L1 between predicted and true side distances as fractions of the image size,
    (n, 4) each -> (n, 1). Scaled to pixels first, then divided by the width (l, r) or height (t, b)."""
    size = imgsz.to(pred.dtype)[[1, 0, 1, 0]]
    pred = pred * stride / size
    target = target * stride / size
    return F.l1_loss(pred, target, reduction="none").mean(-1, keepdim=True)


def apply_gains(loss_iou: torch.Tensor, loss_cls: torch.Tensor, loss_dfl: torch.Tensor,
                gains: Sequence[float]) -> dict[str, torch.Tensor]:
    before = torch.stack((loss_iou, loss_cls, loss_dfl))
    return {"before": before, "after": before * torch.tensor(gains, dtype=before.dtype, device=before.device)}


def batch_output(after: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    """ultralytics' convention: the loss vector times the batch size (the trainer sums it), and the items
    (the vector itself, detached) for logging."""
    return {"loss": after * batch_size, "items": after.detach()}


# ------------------------------------------------------------------------------------------ the pipeline
@dataclass
class LossRun:
    """One evaluation of the loss: what `model.loss(batch)` returns, and every intermediate by name."""

    loss: torch.Tensor  # (3,) box, cls, dfl after gains, times the batch size
    items: torch.Tensor  # (3,) detached
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # "{stage}.{name}" (end-to-end: "{branch}.…")

    def __iter__(self):  # `loss, items = criterion.run(...)`
        return iter((self.loss, self.items))


class DetectionLoss:
    """`v8DetectionLoss`: each stage is a method taking and returning contract names.

    A stage is looked up on the instance (`stage(name)`), so a known cause (`parity.causes`) can replace or wrap
    one stage of one loss object from outside without touching this code."""

    def __init__(self, config: LossConfig):
        self.config = config

    # Stage methods: keyword inputs and outputs as in STAGE_INPUTS.
    def anchors(self, *, feat_shapes, dtype=torch.float32, device=None):
        return make_anchors(feat_shapes, self.config.strides, dtype=dtype, device=device)

    def preprocess(self, *, batch_idx, cls, bboxes, batch_size, imgsz):
        return preprocess(batch_idx, cls, bboxes, batch_size, imgsz)

    def decode(self, *, boxes, anchor_points):
        return decode(boxes, anchor_points, self.config.reg_max)

    def assigner_inputs(self, *, scores, pred_bboxes, anchor_points, stride_tensor):
        return assigner_inputs(scores, pred_bboxes, anchor_points, stride_tensor)

    def assigner(self, *, pd_scores, pd_bboxes, anc_points, targets, mask_gt):
        return run_assigner(pd_scores, pd_bboxes, anc_points, targets, mask_gt, self.config.assigner)

    def assign(self, *, scores, pred_bboxes, anchor_points, stride_tensor, targets, mask_gt):
        inputs = self.assigner_inputs(scores=scores, pred_bboxes=pred_bboxes, anchor_points=anchor_points,
                                      stride_tensor=stride_tensor)
        return {**inputs, **self.assigner(targets=targets, mask_gt=mask_gt, **inputs)}

    def normalize(self, *, target_scores):
        return normalize(target_scores)

    def classify(self, *, scores, target_scores, target_scores_sum):
        return classify(scores, target_scores, target_scores_sum)

    def box(self, *, boxes, pred_bboxes, anchor_points, stride_tensor, target_bboxes, target_scores,
            target_scores_sum, fg_mask, imgsz):
        return box_losses(boxes, pred_bboxes, anchor_points, stride_tensor, target_bboxes, target_scores,
                          target_scores_sum, fg_mask, imgsz, self.config.reg_max)

    def gains(self, *, loss_iou, loss_cls, loss_dfl):
        return apply_gains(loss_iou, loss_cls, loss_dfl, self.config.gains)

    def output(self, *, after, batch_size):
        return batch_output(after, batch_size)

    def stage(self, name: str) -> Callable[..., dict[str, torch.Tensor]]:
        """The function of stage `name` (or `assigner`), called with the keyword inputs of STAGE_INPUTS."""
        if name not in STAGE_INPUTS:
            raise KeyError(f"no loss stage {name!r}; stages: {', '.join(STAGE_INPUTS)}")
        return getattr(self, name)

    # The whole loss.
    def run(self, preds: dict[str, Any], batch: dict[str, torch.Tensor], *,
            reuse: dict[str, torch.Tensor] | None = None) -> LossRun:
        """preds: the head's train dict (`boxes`, `scores`, and `feats` or `feat_shapes`); batch: `cls`,
        `bboxes`, `batch_idx` as `model.loss(batch)` takes them (normalized xywh, batch_idx sorted).

        `reuse` holds `{stage}.{name}` outputs of an earlier run on the same inputs: those stages are not run
        again (a partial re-run from the first stage it lacks)."""
        reuse = reuse or {}
        done = {key.split(".", 1)[0] for key in reuse}
        values: dict[str, torch.Tensor] = {}
        head = {"boxes": preds["boxes"], "scores": preds["scores"]}
        feat_shapes = feature_shapes(preds)
        batch_size = head["scores"].shape[0]
        imgsz = image_size(feat_shapes, self.config.strides, head["scores"])
        given = {"feat_shapes": feat_shapes, "batch_size": batch_size, "imgsz": imgsz, **head,
                 "batch_idx": batch["batch_idx"], "cls": batch["cls"], "bboxes": batch["bboxes"]}

        def inputs_of(stage: str) -> dict[str, Any]:
            out = {}
            for name in STAGE_INPUTS[stage]:
                source = INPUT_SOURCES[name]
                out[name] = values[source] if source in values else given[name]
            return out

        for stage in STAGES:
            if stage in done:
                values.update({k: v for k, v in reuse.items() if k.startswith(stage + ".")})
                continue
            kwargs = inputs_of(stage)
            if stage == "anchors":
                kwargs.update(dtype=head["scores"].dtype, device=head["scores"].device)
            for name, tensor in self.stage(stage)(**kwargs).items():
                values[f"{stage}.{name}"] = tensor
        return LossRun(values["output.loss"], values["output.items"], values)

    def __call__(self, preds, batch) -> tuple[torch.Tensor, torch.Tensor]:
        run = self.run(preds, batch)
        return run.loss, run.items


class EndToEndLoss:
    """`E2ELoss`: a one-to-many branch (top-k 10) and a one-to-one branch (top-k 7, then 1 per box), each a
    DetectionLoss on its own head outputs; the loss is their weighted sum (0.8 / 0.2 before any
    `update()`), the items are the one-to-one branch's."""

    branches = ("one2many", "one2one")

    def __init__(self, config: LossConfig, o2m: float = 0.8):
        self.config = config
        self.one2many = DetectionLoss(replace(config, topk=10, topk2=None))
        self.one2one = DetectionLoss(replace(config, topk=7, topk2=1))
        self.o2m = o2m
        self.o2o = 1.0 - o2m  # the reference computes it this way; 0.19999999999999996 rounds to 0.2f

    def branch(self, name: str) -> DetectionLoss:
        return getattr(self, name)

    def run(self, preds: dict[str, Any], batch: dict[str, torch.Tensor], *,
            reuse: dict[str, torch.Tensor] | None = None) -> LossRun:
        reuse = reuse or {}

        def own(branch: str) -> dict[str, torch.Tensor]:
            return {k[len(branch) + 1:]: v for k, v in reuse.items() if k.startswith(branch + ".")}

        many = self.one2many.run(preds["one2many"], batch, reuse=own("one2many"))
        one = self.one2one.run(preds["one2one"], batch, reuse=own("one2one"))
        tensors = {f"one2many.{k}": v for k, v in many.tensors.items() if not k.startswith("output.")}
        tensors.update({f"one2one.{k}": v for k, v in one.tensors.items() if not k.startswith("output.")})
        loss = many.loss * self.o2m + one.loss * self.o2o
        tensors["output.loss"], tensors["output.items"] = loss, one.items
        return LossRun(loss, one.items, tensors)

    def __call__(self, preds, batch) -> tuple[torch.Tensor, torch.Tensor]:
        run = self.run(preds, batch)
        return run.loss, run.items


def feature_shapes(preds: dict[str, Any]) -> list[tuple[int, int]]:
    if "feat_shapes" in preds:
        return [tuple(int(v) for v in s) for s in preds["feat_shapes"]]
    return [tuple(f.shape[2:]) for f in preds["feats"]]


def image_size(feat_shapes, strides, like: torch.Tensor) -> torch.Tensor:
    """(H, W) in pixels, as a float tensor: the finest level's size times its stride."""
    h, w = feat_shapes[0]
    return torch.tensor([h, w], dtype=like.dtype, device=like.device) * float(strides[0])


def build_loss(config: LossConfig | dict, *, end2end: bool | None = None) -> DetectionLoss | EndToEndLoss:
    """The built-in loss for a configuration (or a dump manifest). Known causes are planted into it from outside
    (`parity.causes.plant`)."""
    if isinstance(config, dict):
        if end2end is None:
            end2end = bool(config.get("model", {}).get("end2end", False))
        weights = (config.get("loss") or {}).get("branch_weights") or {}
        config = LossConfig.from_manifest(config)
        loss = EndToEndLoss(config, o2m=float(weights.get("one2many", 0.8))) if end2end else DetectionLoss(config)
    else:
        loss = EndToEndLoss(config) if end2end else DetectionLoss(config)
    return loss
