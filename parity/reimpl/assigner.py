"""Task-aligned assignment (TOOD) as ultralytics 8.4.190's detection loss uses it, written from its behaviour.

The assigner decides, for every anchor of every image, whether it learns from a ground-truth box and how much:

1. candidates   anchors whose centre lies inside a ground-truth box (sides under `min_box_side` pixels are
                first widened to it, so a tiny box still owns anchors);
2. metric       for each candidate pair, `score ** alpha * ciou ** beta`, where `score` is the predicted
                probability of the box's class and `ciou` the (non-negative) CIoU of predicted and true box;
3. top-k        each box keeps its `topk` best candidates;
4. conflicts    an anchor claimed by several boxes keeps the box it overlaps most;
5. targets      the box, class and a soft score: the one-hot class scaled so that each box's best anchor
                gets that box's best CIoU (alignment-normalised).

Every tensor is named as in docs/dump-format.md (stage `assign`). Floating-point operations are written in the
order that gives bitwise the reference's values on CPU; comments say where the order is what matters.
Nothing here imports ultralytics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Shapes: B images, M boxes per image (padded), A anchors, C classes.


@dataclass(frozen=True)
class AssignerConfig:
    num_classes: int
    topk: int = 10
    topk2: int | None = None  # a second per-box top-k after conflicts (end-to-end one-to-one branch: 1)
    alpha: float = 0.5  # exponent of the class score in the alignment metric
    beta: float = 6.0  # exponent of the CIoU in the alignment metric
    eps: float = 1e-9
    min_box_side: float = 16.0  # pixels; the second stride of the model (stride[0] for single-level models)


# ------------------------------------------------------------------------------------------ box geometry
def xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), -1)


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    centre, half = boxes[..., :2], boxes[..., 2:] / 2
    return torch.cat((centre - half, centre + half), -1)


def complete_iou(box1: torch.Tensor, box2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """CIoU of paired `x1 y1 x2 y2` boxes, (..., 4) each -> (..., 1).

    CIoU = IoU - centre_distance² / enclosing_diagonal² - v * a, with v the aspect-ratio disagreement and
    a = v / (1 - IoU + v) treated as a constant (no gradient), as in the CIoU paper. `eps` is added to the
    heights (so w/h never divides by zero) and to every denominator. The argument order matters for the bits:
    the assigner passes (truth, prediction), the box loss (prediction, truth).
    """
    ax1, ay1, ax2, ay2 = box1.chunk(4, -1)
    bx1, by1, bx2, by2 = box2.chunk(4, -1)
    aw, ah = ax2 - ax1, ay2 - ay1 + eps
    bw, bh = bx2 - bx1, by2 - by1 + eps

    overlap_w = (ax2.minimum(bx2) - ax1.maximum(bx1)).clamp(0)
    overlap_h = (ay2.minimum(by2) - ay1.maximum(by1)).clamp(0)
    inter = overlap_w * overlap_h
    union = aw * ah + bw * bh - inter + eps
    iou = inter / union

    enclose_w = ax2.maximum(bx2) - ax1.minimum(bx1)
    enclose_h = ay2.maximum(by2) - ay1.minimum(by1)
    diagonal2 = enclose_w.pow(2) + enclose_h.pow(2) + eps
    # Centre distance from doubled centres, divided by 4 at the end (one rounding fewer than halving first).
    centre2 = ((bx1 + bx2 - ax1 - ax2).pow(2) + (by1 + by2 - ay1 - ay2).pow(2)) / 4
    v = (4 / math.pi**2) * ((bw / bh).atan() - (aw / ah).atan()).pow(2)
    with torch.no_grad():
        trade_off = v / (1 - iou + v + eps)
    return iou - (centre2 / diagonal2 + v * trade_off)


# --------------------------------------------------------------------------------------- the five steps
def candidates_in_boxes(anc_points: torch.Tensor, gt_bboxes: torch.Tensor, mask_gt: torch.Tensor,
                        min_side: float, eps: float = 1e-9) -> torch.Tensor:
    """mask_in_gts (B, M, A) bool: the anchor centre lies strictly inside the (widened) box.

    Real boxes with a side under `min_side` pixels are widened to it about their centre. Every box, widened or
    not, goes through centre/size form and back: that round trip rounds, and the reference does it too.
    """
    cxcywh = xyxy_to_cxcywh(gt_bboxes)
    too_small = (cxcywh[..., 2:] < min_side) & mask_gt.bool()
    size = torch.where(too_small, torch.tensor(min_side, dtype=cxcywh.dtype, device=cxcywh.device), cxcywh[..., 2:])
    x1, y1, x2, y2 = cxcywh_to_xyxy(torch.cat((cxcywh[..., :2], size), -1)).unsqueeze(2).unbind(-1)  # (B, M, 1)
    ax, ay = anc_points[:, 0], anc_points[:, 1]  # (A,)
    return (ax - x1 > eps) & (ay - y1 > eps) & (x2 - ax > eps) & (y2 - ay > eps)


def alignment_metric(pd_scores: torch.Tensor, pd_bboxes: torch.Tensor, gt_labels: torch.Tensor,
                     gt_bboxes: torch.Tensor, pairs: torch.Tensor, alpha: float, beta: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """align_metric and overlaps, (B, M, A) each, zero outside `pairs` (the candidate pairs).

    Only candidate pairs are evaluated (gathered into a flat list), so the CIoU runs on (N, 4) tensors.
    """
    b, m, a = pairs.shape
    img, box, anc = pairs.nonzero(as_tuple=True)
    score = pd_scores[img, anc, gt_labels[img, box, 0].long()]  # probability of the box's own class
    ciou = complete_iou(gt_bboxes[img, box], pd_bboxes[img, anc]).squeeze(-1).clamp(0)
    metric = score.pow(alpha) * ciou.pow(beta)

    overlaps = torch.zeros((b, m, a), dtype=pd_bboxes.dtype, device=pd_bboxes.device)
    align_metric = torch.zeros((b, m, a), dtype=metric.dtype, device=pd_scores.device)
    overlaps[img, box, anc] = ciou
    align_metric[img, box, anc] = metric
    return align_metric, overlaps


def top_candidates(align_metric: torch.Tensor, mask_gt: torch.Tensor, topk: int) -> torch.Tensor:
    """(B, M, A) int8: 1 on each real box's `topk` highest-metric anchors.

    Ties among equal metrics are broken by `torch.topk` on the whole (B, M, A) tensor; calling it on the same
    tensor as the reference is what makes the tie-break agree (the order itself is implementation-defined).
    """
    chosen = torch.topk(align_metric, topk, dim=-1, largest=True).indices  # (B, M, topk)
    selected = torch.zeros(align_metric.shape, dtype=torch.int8, device=align_metric.device)
    selected.scatter_(-1, chosen, 1)
    return selected * mask_gt.to(torch.int8)  # padding rows select nothing


def resolve_conflicts(mask_pos: torch.Tensor, overlaps: torch.Tensor, align_metric: torch.Tensor,
                      topk: int, topk2: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An anchor positive for several boxes keeps only the box with the highest CIoU among ALL its candidate
    boxes (not only those that chose it). With `topk2`, each box then keeps its `topk2` best anchors.

    Returns mask_pos (B, M, A) int8, fg_mask (B, A) int8 and target_gt_idx (B, A) int64.
    """
    claimed = mask_pos.sum(-2, keepdim=True) > 1  # (B, 1, A)
    best_box = overlaps.max(-2, keepdim=True).indices  # (B, 1, A); ties go to whatever torch.max picks
    best = torch.zeros_like(mask_pos).scatter_(-2, best_box, 1)
    mask_pos = torch.where(claimed, best, mask_pos)

    if topk2 is not None and topk2 != topk:
        keep = torch.topk(align_metric * mask_pos, topk2, dim=-1, largest=True).indices
        mask_pos = mask_pos * torch.zeros_like(mask_pos).scatter_(-1, keep, 1)

    fg_mask, target_gt_idx = mask_pos.max(-2)  # the positive box of each anchor (box 0 for background)
    return mask_pos, fg_mask, target_gt_idx


def gather_targets(gt_labels: torch.Tensor, gt_bboxes: torch.Tensor, target_gt_idx: torch.Tensor,
                   fg_mask: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """target_labels (B, A) int64, target_bboxes (B, A, 4), and the hard one-hot class target (B, A, C) int8
    (zero on background anchors). Background anchors carry box 0's label and box as filler."""
    b, m = gt_labels.shape[:2]
    flat = target_gt_idx + torch.arange(b, device=gt_labels.device)[:, None] * m  # index into (B*M,)
    target_labels = gt_labels.long().flatten()[flat].clamp(0)
    target_bboxes = gt_bboxes.reshape(-1, gt_bboxes.shape[-1])[flat]
    one_hot = torch.zeros((*target_labels.shape, num_classes), dtype=torch.int8, device=gt_labels.device)
    one_hot.scatter_(-1, target_labels.unsqueeze(-1), 1)
    return target_labels, target_bboxes, one_hot * (fg_mask[..., None] > 0)


def soft_scores(one_hot: torch.Tensor, align_metric: torch.Tensor, overlaps: torch.Tensor,
                mask_pos: torch.Tensor, eps: float) -> torch.Tensor:
    """target_scores (B, A, C): each positive pair's metric rescaled so the box's best anchor gets the box's
    best CIoU; an anchor takes the largest value over boxes (it has one box by now)."""
    align_metric = align_metric * mask_pos
    overlaps = overlaps * mask_pos
    best_metric = align_metric.amax(-1, keepdim=True)  # (B, M, 1)
    best_overlap = overlaps.amax(-1, keepdim=True)
    # (metric * best_overlap) / (best_metric + eps): multiply first, as the reference does
    normalised = align_metric * best_overlap / (best_metric + eps)
    return one_hot * normalised.amax(-2).unsqueeze(-1)


# ------------------------------------------------------------------------------------------- the stage
def assign(pd_scores: torch.Tensor, pd_bboxes: torch.Tensor, anc_points: torch.Tensor, targets: torch.Tensor,
           mask_gt: torch.Tensor, config: AssignerConfig) -> dict[str, torch.Tensor]:
    """The assigner proper: probabilities, pixel boxes and pixel anchors in, the `assign` tensors out.

    pd_scores (B, A, C) probabilities, pd_bboxes (B, A, 4) pixels, anc_points (A, 2) pixels,
    targets (B, M, 5) `class x1 y1 x2 y2` in pixels, mask_gt (B, M, 1).
    Returns mask_in_gts, align_metric, overlaps, mask_pos, target_labels, target_bboxes, target_scores,
    fg_mask, target_gt_idx (docs/dump-format.md). Gradients flow only if the inputs carry them: the caller
    detaches (the reference runs the whole assigner without autograd).
    """
    gt_labels, gt_bboxes = targets[..., :1], targets[..., 1:5]
    b, m = gt_bboxes.shape[:2]
    a = pd_scores.shape[1]
    if m == 0:
        return _no_boxes(pd_scores, pd_bboxes, config.num_classes, b, a)

    mask_in_gts = candidates_in_boxes(anc_points, gt_bboxes, mask_gt, config.min_box_side)
    pairs = mask_in_gts & mask_gt.bool()
    align_metric, overlaps = alignment_metric(pd_scores, pd_bboxes, gt_labels, gt_bboxes, pairs,
                                              config.alpha, config.beta)
    mask_pos = top_candidates(align_metric, mask_gt, config.topk) * pairs.to(torch.int8)
    mask_pos, fg_mask, target_gt_idx = resolve_conflicts(mask_pos, overlaps, align_metric, config.topk, config.topk2)
    target_labels, target_bboxes, one_hot = gather_targets(gt_labels, gt_bboxes, target_gt_idx, fg_mask,
                                                           config.num_classes)
    target_scores = soft_scores(one_hot, align_metric, overlaps, mask_pos, config.eps)
    return {
        "mask_in_gts": mask_in_gts, "align_metric": align_metric, "overlaps": overlaps, "mask_pos": mask_pos,
        "target_labels": target_labels, "target_bboxes": target_bboxes, "target_scores": target_scores,
        "fg_mask": fg_mask.bool(), "target_gt_idx": target_gt_idx,
    }


def _no_boxes(pd_scores, pd_bboxes, num_classes: int, b: int, a: int) -> dict[str, torch.Tensor]:
    """No image has a box (M = 0): nothing is foreground. Filler labels are `num_classes`, filler boxes 0."""
    empty = dict(device=pd_scores.device)
    return {
        "mask_in_gts": torch.zeros((b, 0, a), dtype=torch.bool, **empty),
        "align_metric": torch.zeros((b, 0, a), dtype=pd_scores.dtype, **empty),
        "overlaps": torch.zeros((b, 0, a), dtype=pd_bboxes.dtype, **empty),
        "mask_pos": torch.zeros((b, 0, a), dtype=torch.int8, **empty),
        "target_labels": torch.full((b, a), num_classes, dtype=torch.int64, **empty),
        "target_bboxes": torch.zeros_like(pd_bboxes),
        "target_scores": torch.zeros_like(pd_scores),
        "fg_mask": torch.zeros((b, a), dtype=torch.bool, **empty),
        "target_gt_idx": torch.zeros((b, a), dtype=torch.int64, **empty),
    }
