"""Known loss causes: transforms of the clean built-in loss's stages, and their plants.

A transform `transform(loss, **params)` takes one clean `parity.reimpl.loss.DetectionLoss` object and replaces
or wraps its stage methods (or its configuration) on that object only: `parity.reimpl` keeps no switch for it.
Each is what a real port gets wrong, and nothing else: with the one line fixed, the stage returns the
reference's bits again.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import torch

from parity.causes.registry import Cause, plant, register
from parity.reimpl import assigner as steps
from parity.reimpl import loss as clean


def _set(loss, stage: str, fn) -> None:
    """Replace one stage method of this loss object (the class and other objects keep the clean one)."""
    setattr(loss, stage, fn)


def _branches(loss):
    """The DetectionLoss objects of a built loss (one, or both branches of an end-to-end loss)."""
    return [loss.branch(b) for b in loss.branches] if hasattr(loss, "branches") else [loss]


# -------------------------------------------------------------------------------- assigner inputs
def missing_sigmoid(loss):
    def assigner_inputs(*, scores, pred_bboxes, anchor_points, stride_tensor):
        out = clean.assigner_inputs(scores, pred_bboxes, anchor_points, stride_tensor)
        out["pd_scores"] = scores.detach().permute(0, 2, 1).contiguous()  # raw logits: score ** 0.5 of a negative
        return out
    _set(loss, "assigner_inputs", assigner_inputs)


def double_sigmoid(loss):
    def assigner_inputs(*, scores, pred_bboxes, anchor_points, stride_tensor):
        out = clean.assigner_inputs(scores, pred_bboxes, anchor_points, stride_tensor)
        out["pd_scores"] = out["pd_scores"].sigmoid()  # the head already applied one, and so does the loss
        return out
    _set(loss, "assigner_inputs", assigner_inputs)


def no_detach(loss):
    def assigner_inputs(*, scores, pred_bboxes, anchor_points, stride_tensor):
        return clean.assigner_inputs(scores, pred_bboxes, anchor_points, stride_tensor, detach=False)
    _set(loss, "assigner_inputs", assigner_inputs)


# ------------------------------------------------------------------------------------ assignment
def all_anchors_positive(loss):
    """Every anchor of an image that has ground truth counts as foreground, with a hard one-hot class target
    (as if top-k and the in-box test were skipped)."""
    assign = loss.assign

    def wrapped(*, scores, pred_bboxes, anchor_points, stride_tensor, targets, mask_gt):
        out = assign(scores=scores, pred_bboxes=pred_bboxes, anchor_points=anchor_points,
                     stride_tensor=stride_tensor, targets=targets, mask_gt=mask_gt)
        image_has_box = mask_gt.flatten(1).bool().any(1)  # (B,)
        fg_mask = image_has_box[:, None].expand_as(out["fg_mask"]).clone()
        one_hot = torch.zeros_like(out["target_scores"])
        labels = out["target_labels"].clamp(max=one_hot.shape[-1] - 1)  # filler label nc when M == 0
        one_hot.scatter_(-1, labels.unsqueeze(-1), 1.0)
        return {**out, "fg_mask": fg_mask, "target_scores": one_hot * fg_mask[..., None]}
    _set(loss, "assign", wrapped)


def assigner_setting(loss, **changes):
    """topk / alpha / beta / min_box_side of the task-aligned assigner."""
    loss.config = replace(loss.config, **changes)


def _in_box_test_differs(place) -> bool:
    """The candidate's in-box candidates differ from the reference's: top-k, alpha and beta act after that
    test and cannot explain it."""
    cand = place.candidate.get("mask_in_gts") if isinstance(place.candidate, dict) else None
    ref = place.reference.get("mask_in_gts")
    return isinstance(cand, torch.Tensor) and ref is not None and (cand.shape != ref.shape or
                                                                  not torch.equal(cand.bool(), ref.bool()))


def fit_topk(place) -> list[dict]:
    """The candidate's positives per box before conflicts are at most k: propose the largest count seen and
    its neighbours; without a stage view (a black box) the range around the reference's k, nearest first."""
    if _in_box_test_differs(place):
        return []
    reference = place.config.topk
    mask_pos = place.candidate.get("mask_pos") if isinstance(place.candidate, dict) else None
    if isinstance(mask_pos, torch.Tensor) and mask_pos.dim() == 3 and mask_pos.numel():
        seen = int(mask_pos.sum(-1).max())
        proposals = [seen, seen + 1, seen + 2, seen - 1]
    else:
        proposals = sorted(range(max(1, reference - 7), reference + 8), key=lambda k: (abs(k - reference), k))
    out = []
    for k in proposals:
        if k >= 1 and k != reference and {"topk": k} not in out:
            out.append({"topk": k})
    return out


def fit_alpha_beta(place, which: str) -> list[dict]:
    """log(metric) = alpha log(score) + beta log(ciou) over the candidate's candidate pairs: least squares on
    the candidate's own align_metric against the reference's scores and overlaps."""
    out = []
    if _in_box_test_differs(place):
        return out
    cand = place.candidate if isinstance(place.candidate, dict) else {}
    metric, overlaps, scores = cand.get("align_metric"), place.reference.get("overlaps"), place.reference.get("pd_scores")
    labels = place.reference.get("target_labels")
    if isinstance(metric, torch.Tensor) and overlaps is not None and scores is not None and metric.shape == overlaps.shape:
        pairs = (metric > 0) & (overlaps > 0)
        img, box, anc = pairs.nonzero(as_tuple=True)
        targets = place.inputs.get("targets")
        if img.numel() >= 3 and targets is not None:
            cls = targets[img, box, 0].long()
            s = scores[img, anc, cls].detach().double().log()
            o = overlaps[img, box, anc].detach().double().log()
            m = metric[img, box, anc].detach().double().log()
            design = torch.stack((s, o), 1)
            solution = torch.linalg.lstsq(design, m[:, None]).solution.flatten()
            value = float(solution[0] if which == "alpha" else solution[1])
            if math.isfinite(value):
                for digits in (1, 2, 3):
                    out.append({which: float(f"{value:.{digits}g}")})
    if not out:   # no stage view: the values ports commonly use
        out = [{which: v} for v in ((1.0, 0.25) if which == "alpha" else (4.0, 2.0))]
    reference = getattr(place.config, which)
    unique = []
    for entry in out:
        if entry[which] != reference and entry not in unique:
            unique.append(entry)
    return unique


# -------------------------------------------------------------------------------- normaliser, math
def unclamped_normalizer(loss):
    _set(loss, "normalize", lambda *, target_scores: {"target_scores_sum": target_scores.sum()})


def weights_broadcast(loss):
    def classify(*, scores, target_scores, target_scores_sum):
        out = clean.classify(scores, target_scores, target_scores_sum)
        # A per-anchor (B, A) weight meant to scale every class of its anchor, neutral here (all ones): the
        # only bug is the missing `.unsqueeze(-1)`: (B, A) against (B, A, nc) lines A up with nc.
        weight = torch.ones(out["bce"].shape[:2], dtype=out["bce"].dtype, device=out["bce"].device)
        bce = out["bce"] * weight
        return {"bce": bce, "loss": bce.sum() / target_scores_sum}
    _set(loss, "classify", classify)


def iou_weight_broadcast(loss):
    def box(*, boxes, pred_bboxes, anchor_points, stride_tensor, target_bboxes, target_scores, target_scores_sum,
            fg_mask, imgsz):
        out = clean.box_losses(boxes, pred_bboxes, anchor_points, stride_tensor, target_bboxes, target_scores,
                               target_scores_sum, fg_mask, imgsz, loss.config.reg_max)
        fg = fg_mask.nonzero(as_tuple=True)
        weight = target_scores[fg].sum(-1)  # (n,) -- keepdim forgotten
        iou = clean.complete_iou(pred_bboxes[fg], (target_bboxes / stride_tensor)[fg])  # (n, 1)
        out["loss_iou"] = ((1.0 - iou) * weight).sum() / target_scores_sum  # (n, 1) * (n,) -> (n, n)
        return out
    _set(loss, "box", box)


def _plain_iou(box1, box2, kind: str, eps: float = 1e-7):
    """IoU, GIoU or DIoU of paired x1y1x2y2 boxes, (..., 4) -> (..., 1)."""
    ax1, ay1, ax2, ay2 = box1.chunk(4, -1)
    bx1, by1, bx2, by2 = box2.chunk(4, -1)
    aw, ah = ax2 - ax1, ay2 - ay1 + eps
    bw, bh = bx2 - bx1, by2 - by1 + eps
    inter = (ax2.minimum(bx2) - ax1.maximum(bx1)).clamp(0) * (ay2.minimum(by2) - ay1.maximum(by1)).clamp(0)
    union = aw * ah + bw * bh - inter + eps
    iou = inter / union
    cw = ax2.maximum(bx2) - ax1.minimum(bx1)
    ch = ay2.maximum(by2) - ay1.minimum(by1)
    if kind == "giou":
        hull = cw * ch + eps
        return iou - (hull - union) / hull
    if kind == "diou":
        diagonal2 = cw.pow(2) + ch.pow(2) + eps
        centre2 = ((bx1 + bx2 - ax1 - ax2).pow(2) + (by1 + by2 - ay1 - ay2).pow(2)) / 4
        return iou - centre2 / diagonal2
    return iou


def iou_variant(loss, *, iou: str):
    """The box loss with IoU, GIoU or DIoU instead of CIoU (the DFL part unchanged)."""
    def box(*, boxes, pred_bboxes, anchor_points, stride_tensor, target_bboxes, target_scores, target_scores_sum,
            fg_mask, imgsz):
        out = clean.box_losses(boxes, pred_bboxes, anchor_points, stride_tensor, target_bboxes, target_scores,
                               target_scores_sum, fg_mask, imgsz, loss.config.reg_max)
        fg = fg_mask.nonzero(as_tuple=True)
        weight = target_scores[fg].sum(-1, keepdim=True)
        overlap = _plain_iou(pred_bboxes[fg], (target_bboxes / stride_tensor)[fg], iou)
        out["loss_iou"] = ((1.0 - overlap) * weight).sum() / target_scores_sum
        return out
    _set(loss, "box", box)


def reg_max_clamp(loss, *, reg_max: int):
    """The DFL targets clamped for another reg_max than the head's (an off-by-one or a hard-coded 8)."""
    def box(*, boxes, pred_bboxes, anchor_points, stride_tensor, target_bboxes, target_scores, target_scores_sum,
            fg_mask, imgsz):
        out = clean.box_losses(boxes, pred_bboxes, anchor_points, stride_tensor, target_bboxes, target_scores,
                               target_scores_sum, fg_mask, imgsz, loss.config.reg_max)
        dist = boxes.permute(0, 2, 1).contiguous()
        truth = target_bboxes / stride_tensor
        fg = fg_mask.nonzero(as_tuple=True)
        weight = target_scores[fg].sum(-1, keepdim=True)
        x1y1, x2y2 = truth.chunk(2, -1)
        sides = torch.cat((anchor_points - x1y1, x2y2 - anchor_points), -1).clamp(0, reg_max - 1 - 0.01)
        per_anchor = clean.distribution_focal_loss(dist[fg].view(-1, loss.config.reg_max), sides[fg],
                                                   loss.config.reg_max)
        out["loss_dfl"] = (per_anchor * weight).sum() / target_scores_sum
        return out
    _set(loss, "box", box)


# -------------------------------------------------------------------------------------- decode
SIDE_ORDERS = {"tlbr": (1, 0, 3, 2), "rblt": (2, 3, 0, 1), "ltrb-as-lrtb": (0, 2, 1, 3)}


def dfl_decode(loss, *, layout: str):
    """Box sides read in another order, or the (4, reg_max) logits viewed as (reg_max, 4) (a `view` where
    a permute was meant)."""
    reg_max = loss.config.reg_max

    def decode(*, boxes, anchor_points):
        if layout == "bins-sides-transposed":
            dist = boxes.permute(0, 2, 1).contiguous()
            b, a, _ = dist.shape
            bins = torch.arange(reg_max, dtype=dist.dtype, device=dist.device)
            sides = dist.view(b, a, reg_max, 4).transpose(2, 3).softmax(3).matmul(bins)
        else:
            sides = clean.expected_distances(boxes, reg_max)[..., list(SIDE_ORDERS[layout])]
        left_top, right_bottom = sides.chunk(2, -1)
        return {"pred_bboxes": torch.cat((anchor_points - left_top, anchor_points + right_bottom), -1)}
    _set(loss, "decode", decode)


def fit_decode(place) -> list[dict]:
    layouts = list(SIDE_ORDERS)
    if place.config.reg_max > 1:
        layouts = ["bins-sides-transposed"] + layouts
    return [{"layout": layout} for layout in layouts]


# ----------------------------------------------------------------------------- targets, anchors
def targets_as_xyxy(loss):
    """Ground truth taken as corners although it is centre/size (the xywh -> xyxy conversion left out)."""
    def preprocess(*, batch_idx, cls, bboxes, batch_size, imgsz):
        out = clean.preprocess(batch_idx, cls, bboxes, batch_size, imgsz)
        image = batch_idx.reshape(-1).long()
        if image.numel():
            counts = torch.bincount(image, minlength=batch_size)
            slot = clean._slot_within_image(image, counts)
            scale = imgsz.to(bboxes.dtype)[[1, 0, 1, 0]]
            out["targets"][image, slot, 1:5] = bboxes * scale
            out["mask_gt"] = (out["targets"][..., 1:5].sum(-1, keepdim=True) > 0).to(out["targets"].dtype)
        return out
    _set(loss, "preprocess", preprocess)


def anchors_coarse_first(loss):
    """Anchors of the coarsest level first (P5, P4, P3), while the head concatenates P3 first."""
    def anchors(*, feat_shapes, dtype=torch.float32, device=None):
        return clean.make_anchors(list(feat_shapes)[::-1], list(loss.config.strides)[::-1], dtype=dtype,
                                  device=device)
    _set(loss, "anchors", anchors)


# ---------------------------------------------------------------------------------- gains, output
GAIN_NAMES = ("box", "cls", "dfl")


def gain_products(gains) -> list[tuple[str, float]]:
    """Every product of at most two of the gains (and 1): the values a term's gain may wrongly take."""
    out = [("1 (no gain)", 1.0)]
    for size in (1, 2):
        for combo in itertools.combinations_with_replacement(range(3), size):
            words = " x ".join(f"{GAIN_NAMES[i]} gain {gains[i]:g}" for i in combo)
            out.append((words, math.prod(gains[i] for i in combo)))
    return out


def gain_mismatch(loss, *, multipliers, _words=""):
    _set(loss, "gains", lambda *, loss_iou, loss_cls, loss_dfl: clean.apply_gains(loss_iou, loss_cls, loss_dfl,
                                                                                    tuple(multipliers)))


def fit_gains(place) -> list[dict]:
    """Per term, the candidate's `after` over the reference's `before`, matched to a product of gains."""
    gains = place.config.gains
    cand = place.candidate.get("after") if isinstance(place.candidate, dict) else None
    before = place.reference.get("before")
    if "terms" in place.reference and isinstance(place.candidate, dict) and "terms" in place.candidate:
        # a black-box loss: terms after gains (times B) on both sides
        cand = place.candidate["terms"]
        before = place.reference["terms"] / torch.tensor(gains, dtype=place.reference["terms"].dtype)
    if not isinstance(cand, torch.Tensor) or before is None or cand.shape != before.shape:
        return []
    ratios = [float(cand[t]) / float(before[t]) / gains[t] for t in range(3) if float(before[t]) != 0]
    if len(ratios) > 1 and max(ratios) - min(ratios) <= 1e-6 * max(abs(r) for r in ratios):
        return []   # every term scaled alike: a batch scaling, not a gain
    chosen, words = [], []
    for t in range(3):
        b, c = float(before[t]), float(cand[t])
        if b == 0:
            chosen.append(gains[t])
            continue
        ratio = c / b
        best = min(gain_products(gains), key=lambda item: abs(item[1] - ratio) / max(abs(ratio), 1e-30))
        if abs(best[1] - ratio) > 1e-4 * max(abs(ratio), 1e-30):
            return []   # not a product of the gains
        chosen.append(best[1])
        if best[1] != gains[t]:
            words.append(f"{GAIN_NAMES[t]} term x {best[0]}")
    if tuple(chosen) == tuple(gains):
        return []
    return [{"multipliers": tuple(chosen), "_words": "; ".join(words)}]


def batch_scale(loss, *, factor):
    _set(loss, "output", lambda *, after, batch_size: {"loss": after * _factor(factor, batch_size),
                                                       "items": after.detach()})


def _factor(factor, batch_size: int) -> float:
    if factor == "none":
        return 1
    kind, _, world = str(factor).partition("x")
    return batch_size * int(world) if kind == "B" else float(factor)


def fit_batch_scale(place) -> list[dict]:
    """The candidate's loss over the reference's `after` (or terms): the batch size, 1, or B x a world size."""
    batch_size = place.batch_size
    options = [{"factor": "none"}] + [{"factor": f"Bx{w}"} for w in (2, 4, 8)]
    cand = place.candidate.get("loss", place.candidate.get("terms")) if isinstance(place.candidate, dict) else None
    base = place.reference.get("after")
    if base is None and "terms" in place.reference:
        base = place.reference["terms"] / batch_size
    if not isinstance(cand, torch.Tensor) or base is None or cand.shape != base.shape or not float(base.abs().sum()):
        return options
    ratio = float(cand.double().sum() / base.double().sum())
    close = [o for o in options if abs(_factor(o["factor"], batch_size) - ratio) <= 1e-3 * max(abs(ratio), 1)]
    return close


def scalar_output(loss):
    """ultralytics before 8.3.99: model.loss()[0] is the sum of the three terms times the batch size."""
    _set(loss, "output", lambda *, after, batch_size: {"loss": after.sum() * batch_size, "items": after.detach()})


# -------------------------------------------------------------------------------------- floors
def floor_variant(loss, *, threshold, floor):
    """The small-box floor of another release: sides under `threshold` px widened to `floor` px (no floor at
    all when `floor` is None: the centre strictly inside the box as given, ultralytics <= 8.3)."""
    def assigner(*, pd_scores, pd_bboxes, anc_points, targets, mask_gt):
        config = loss.config.assigner
        if floor is None:
            return assign_with(candidates_without_floor, pd_scores, pd_bboxes, anc_points, targets, mask_gt, config)

        def widened(anc, gt, mask, _side, eps=1e-9):
            cxcywh = steps.xyxy_to_cxcywh(gt)
            small = (cxcywh[..., 2:] < threshold) & mask.bool()
            size = torch.where(small, torch.tensor(float(floor), dtype=cxcywh.dtype), cxcywh[..., 2:])
            x1, y1, x2, y2 = steps.cxcywh_to_xyxy(torch.cat((cxcywh[..., :2], size), -1)).unsqueeze(2).unbind(-1)
            ax, ay = anc[:, 0], anc[:, 1]
            return (ax - x1 > eps) & (ay - y1 > eps) & (x2 - ax > eps) & (y2 - ay > eps)
        return assign_with(widened, pd_scores, pd_bboxes, anc_points, targets, mask_gt, config)
    _set(loss, "assigner", assigner)


def candidates_without_floor(anc_points, gt_bboxes, mask_gt, min_side=None, eps: float = 1e-9):
    """mask_in_gts as ultralytics up to 8.3.x computes it: the anchor centre strictly inside the box as given
    (no widening, no centre/size round trip)."""
    b, m, _ = gt_bboxes.shape
    lt, rb = gt_bboxes.view(-1, 1, 4).chunk(2, 2)
    deltas = torch.cat((anc_points[None] - lt, rb - anc_points[None]), dim=2).view(b, m, anc_points.shape[0], -1)
    return deltas.amin(3) > eps


def assign_with(in_box, pd_scores, pd_bboxes, anc_points, targets, mask_gt, config):
    """The assigner's five steps (`parity.reimpl.assigner`) with another candidate test."""
    gt_labels, gt_bboxes = targets[..., :1], targets[..., 1:5]
    if gt_bboxes.shape[1] == 0:
        return steps.assign(pd_scores, pd_bboxes, anc_points, targets, mask_gt, config)
    mask_in_gts = in_box(anc_points, gt_bboxes, mask_gt, config.min_box_side)
    pairs = mask_in_gts & mask_gt.bool()
    align_metric, overlaps = steps.alignment_metric(pd_scores, pd_bboxes, gt_labels, gt_bboxes, pairs,
                                                    config.alpha, config.beta)
    mask_pos = steps.top_candidates(align_metric, mask_gt, config.topk) * pairs.to(torch.int8)
    mask_pos, fg_mask, target_gt_idx = steps.resolve_conflicts(mask_pos, overlaps, align_metric, config.topk,
                                                               config.topk2)
    target_labels, target_bboxes, one_hot = steps.gather_targets(gt_labels, gt_bboxes, target_gt_idx, fg_mask,
                                                                 config.num_classes)
    target_scores = steps.soft_scores(one_hot, align_metric, overlaps, mask_pos, config.eps)
    return {"mask_in_gts": mask_in_gts, "align_metric": align_metric, "overlaps": overlaps, "mask_pos": mask_pos,
            "target_labels": target_labels, "target_bboxes": target_bboxes, "target_scores": target_scores,
            "fg_mask": fg_mask.bool(), "target_gt_idx": target_gt_idx}


# ---------------------------------------------------------------------------------------- registry
ASSIGN = ("assign",)
ASSIGNER = ("assign", "assigner")
register(Cause("missing-sigmoid", "loss", ASSIGN + ("loss",),
               "the assigner gets raw class logits: apply .sigmoid() to the scores before the assigner",
               lambda loss: missing_sigmoid(loss), params=({},)))
register(Cause("double-sigmoid", "loss", ASSIGN + ("loss",),
               "the assigner gets sigmoid(sigmoid(logits)): the head's train output is raw logits, apply the "
               "sigmoid once", lambda loss: double_sigmoid(loss), params=({},)))
register(Cause("no-detach", "loss", ASSIGN,
               "the assigner inputs are not detached, so gradients flow through the targets: detach the scores "
               "and boxes fed to the assigner", lambda loss: no_detach(loss), params=({},)))
register(Cause("all-anchors-positive", "loss", ASSIGN + ("loss",),
               "every anchor of an image with boxes is foreground with a hard one-hot target: keep the in-box "
               "test and the top-k selection", lambda loss: all_anchors_positive(loss), params=({},)))
register(Cause("topk", "loss", ASSIGNER + ("loss",),
               "the task-aligned assigner keeps another number of candidates per box than ultralytics' "
               "topk=10: set topk=10", lambda loss, topk: assigner_setting(loss, topk=topk), fit=fit_topk))
register(Cause("tal-alpha", "loss", ASSIGNER + ("loss",),
               "the alignment metric uses another score exponent than ultralytics' alpha=0.5: set alpha=0.5",
               lambda loss, alpha: assigner_setting(loss, alpha=alpha),
               fit=lambda place: fit_alpha_beta(place, "alpha")))
register(Cause("tal-beta", "loss", ASSIGNER + ("loss",),
               "the alignment metric uses another IoU exponent than ultralytics' beta=6.0: set beta=6.0",
               lambda loss, beta: assigner_setting(loss, beta=beta),
               fit=lambda place: fit_alpha_beta(place, "beta")))
register(Cause("small-box-floor-size", "loss", ASSIGNER + ("loss",),
               "small boxes are widened to another size than ultralytics 8.4's 16 px (stride[1]) before the "
               "in-box test: widen sides under 16 px to 16 px",
               lambda loss, side: assigner_setting(loss, min_box_side=side),
               params=({"side": 8.0}, {"side": 32.0}, {"side": 24.0})))
register(Cause("unclamped-target-scores-sum", "loss", ("normalize", "loss"),
               "target_scores.sum() is used without clamp(min=1), so a batch without boxes divides by zero "
               "(ultralytics before 8.0.12 did the same): clamp the normaliser at 1", lambda loss: unclamped_normalizer(loss), params=({},)))
register(Cause("weights-broadcast", "loss", ("classify",),
               "a per-anchor (B, A) weight is multiplied into the (B, A, nc) BCE without unsqueeze(-1): add it",
               lambda loss: weights_broadcast(loss), params=({},)))
register(Cause("iou-weight-broadcast", "loss", ("box",),
               "the CIoU weight is summed without keepdim, so (n, 1) * (n,) broadcasts to (n, n): keep the dim",
               lambda loss: iou_weight_broadcast(loss), params=({},)))
register(Cause("iou-variant", "loss", ("box", "loss"),
               "the box loss uses another overlap than ultralytics' CIoU: use CIoU",
               iou_variant, params=({"iou": "giou"}, {"iou": "diou"}, {"iou": "iou"})))
register(Cause("reg-max", "loss", ("box", "loss"),
               "the DFL targets are clamped for another reg_max than the head's: clamp at reg_max - 1 - 0.01 "
               "with the head's reg_max", reg_max_clamp,
               fit=lambda place: [{"reg_max": r} for r in (place.config.reg_max - 1, place.config.reg_max // 2, 4)
                                  if 1 < r < place.config.reg_max] if place.config.reg_max > 1 else []))
register(Cause("dfl-decode", "loss", ("decode", "loss"),
               "the box decode reads the four sides in another order or views the (4, reg_max) logits as "
               "(reg_max, 4): view as (B, A, 4, reg_max) and keep l, t, r, b order", dfl_decode, fit=fit_decode))
register(Cause("box-format", "loss", ("preprocess", "loss"),
               "the ground truth is taken as x1y1x2y2 although the batch holds normalised cx cy w h: convert "
               "xywh to xyxy after scaling", lambda loss: targets_as_xyxy(loss), params=({},)))
register(Cause("level-order", "loss", ("anchors", "loss"),
               "the anchors are laid out coarse level first while the head concatenates P3 first: generate "
               "anchors finest level first", lambda loss: anchors_coarse_first(loss), params=({},)))
register(Cause("gain-mismatch", "loss", ("gains", "loss"),
               "a loss term is multiplied by another gain than ultralytics' (box 7.5, cls 0.5, dfl 1.5): "
               "multiply each term by its own gain once", gain_mismatch, fit=fit_gains))
register(Cause("batch-scale", "loss", ("output", "loss"),
               "the loss vector is scaled by another factor than ultralytics' batch size (missing, or times the "
               "world size too): return loss * batch_size", batch_scale, fit=fit_batch_scale))


def _plant_each(transform, **params):
    def apply(loss):
        for branch in _branches(loss):
            transform(branch, **params)
    return apply


plant("missing-sigmoid", "missing-sigmoid",
      "the assigner gets raw class logits (no .sigmoid()): score ** 0.5 of a negative is NaN",
      _plant_each(missing_sigmoid), stages=("assigner_inputs",))
plant("double-sigmoid", "double-sigmoid",
      "the assigner gets sigmoid(sigmoid(logits)): every probability squeezed into (0.5, 0.73)",
      _plant_each(double_sigmoid), stages=("assigner_inputs",))
plant("unclamped-target-scores-sum", "unclamped-target-scores-sum",
      "target_scores.sum() used without clamp(min=1): a batch with no boxes divides by zero",
      _plant_each(unclamped_normalizer), stages=("normalize",))
plant("no-detach", "no-detach",
      "the assigner inputs are not detached: equal loss values, gradients through the targets",
      _plant_each(no_detach), stages=("assigner_inputs",))
plant("weights-broadcast", "weights-broadcast",
      "a per-anchor (B, A) weight multiplied into the (B, A, nc) BCE tensor without unsqueeze(-1)",
      _plant_each(weights_broadcast), stages=("classify",))
plant("iou-weight-broadcast", "iou-weight-broadcast",
      "the CIoU weight summed without keepdim: (n, 1) * (n,) silently broadcasts to (n, n)",
      _plant_each(iou_weight_broadcast), stages=("box",))
plant("all-anchors-positive", "all-anchors-positive",
      "every anchor of an image with boxes marked foreground, with hard one-hot class targets",
      _plant_each(all_anchors_positive), stages=("assign",))
plant("gain-swap", "gain-mismatch", "box and dfl gains exchanged (box 1.5, dfl 7.5 instead of 7.5 and 1.5)",
      lambda loss: [gain_mismatch(b, multipliers=(b.config.dfl, b.config.cls, b.config.box)) for b in _branches(loss)],
      stages=("gains",))
plant("gain-twice", "gain-mismatch", "the box term is multiplied by its gain twice (7.5 x 7.5)",
      lambda loss: [gain_mismatch(b, multipliers=(b.config.box ** 2, b.config.cls, b.config.dfl))
                    for b in _branches(loss)], stages=("gains",))
plant("no-batch-scale", "batch-scale",
      "the loss vector is not multiplied by the batch size (ultralytics returns loss * B)",
      _plant_each(batch_scale, factor="none"), stages=("output",))
plant("world-size-scale", "batch-scale", "the loss vector is multiplied by the batch size and a world size of 2",
      _plant_each(batch_scale, factor="Bx2"), stages=("output",))
plant("topk-13", "topk", "the assigner keeps 13 candidates per box instead of 10",
      _plant_each(assigner_setting, topk=13), stages=("assigner",))
plant("tal-alpha-1", "tal-alpha", "the alignment metric uses score ** 1.0 instead of score ** 0.5",
      _plant_each(assigner_setting, alpha=1.0), stages=("assigner",))
plant("tal-beta-4", "tal-beta", "the alignment metric uses ciou ** 4 instead of ciou ** 6",
      _plant_each(assigner_setting, beta=4.0), stages=("assigner",))
plant("small-box-floor-8", "small-box-floor-size", "small boxes widened to 8 px instead of 16 px",
      _plant_each(assigner_setting, min_box_side=8.0), stages=("assigner",))
plant("iou-giou", "iou-variant", "the box loss uses GIoU instead of CIoU", _plant_each(iou_variant, iou="giou"),
      stages=("box",))
plant("reg-max-4", "reg-max", "the DFL targets are clamped at 2.99 (reg_max 4) instead of 14.99",
      _plant_each(reg_max_clamp, reg_max=4), stages=("box",))
plant("dfl-view-transposed", "dfl-decode",
      "the DFL logits are viewed as (reg_max, 4) instead of (4, reg_max) before the softmax",
      _plant_each(dfl_decode, layout="bins-sides-transposed"), stages=("decode",))
plant("ltrb-order", "dfl-decode", "the decode reads the four sides as t, l, b, r", _plant_each(dfl_decode, layout="tlbr"),
      stages=("decode",))
plant("targets-xywh-as-xyxy", "box-format", "the ground truth's cx cy w h is used as x1 y1 x2 y2",
      _plant_each(targets_as_xyxy), stages=("preprocess",))
plant("anchors-coarse-first", "level-order", "the anchors are generated P5 first while the head is P3 first",
      _plant_each(anchors_coarse_first), stages=("anchors",))

# The loss plants that stand for porting bugs (the as-of modes and the other plants are in addition).
LOSS_INJECTIONS = ("missing-sigmoid", "double-sigmoid", "unclamped-target-scores-sum", "no-detach",
                   "weights-broadcast", "iou-weight-broadcast", "all-anchors-positive", "gain-swap",
                   "no-batch-scale")
