"""Known loss bugs that can be planted in the built-in loss, to show what the comparison reports for each.

Each bug is registered in the shared registry (`parity.reimpl.inject.register(..., kind="loss", ...)`) with
hooks that replace stage methods of `parity.reimpl.loss.DetectionLoss`: a hook is `hook(loss, **inputs)`
with the stage's keyword inputs (`parity.reimpl.loss.STAGE_INPUTS`) and returns the stage's outputs, or, for
`post_assign`, rewrites the finished assignment. Each bug is what a real port gets wrong, and nothing else:
with the bug's one line fixed, the stage returns the reference's bits again.

    loss = build_loss(manifest, inject="missing-sigmoid")
"""

from __future__ import annotations

import torch

from parity.reimpl import loss as clean
from parity.reimpl.inject import register


# --- assigner inputs ----------------------------------------------------------------------------------------
def _missing_sigmoid(loss, *, scores, pred_bboxes, anchor_points, stride_tensor):
    out = clean.assigner_inputs(scores, pred_bboxes, anchor_points, stride_tensor)
    out["pd_scores"] = scores.detach().permute(0, 2, 1).contiguous()  # raw logits: score ** 0.5 of a negative
    return out


def _double_sigmoid(loss, *, scores, pred_bboxes, anchor_points, stride_tensor):
    out = clean.assigner_inputs(scores, pred_bboxes, anchor_points, stride_tensor)
    out["pd_scores"] = out["pd_scores"].sigmoid()  # the head already applied one, and so does the loss
    return out


def _no_detach(loss, *, scores, pred_bboxes, anchor_points, stride_tensor):
    return clean.assigner_inputs(scores, pred_bboxes, anchor_points, stride_tensor, detach=False)


# --- assignment -------------------------------------------------------------------------------------------
def _all_anchors_positive(loss, outputs, *, mask_gt):
    """Every anchor of an image that has ground truth counts as foreground, with a hard one-hot class target
    (as if top-k and the in-box test were skipped)."""
    image_has_box = mask_gt.flatten(1).bool().any(1)  # (B,)
    fg_mask = image_has_box[:, None].expand_as(outputs["fg_mask"]).clone()
    one_hot = torch.zeros_like(outputs["target_scores"])
    labels = outputs["target_labels"].clamp(max=one_hot.shape[-1] - 1)  # filler label nc when M == 0
    one_hot.scatter_(-1, labels.unsqueeze(-1), 1.0)
    return {**outputs, "fg_mask": fg_mask, "target_scores": one_hot * fg_mask[..., None]}


# --- normaliser and loss math -------------------------------------------------------------------------------
def _unclamped_sum(loss, *, target_scores):
    return {"target_scores_sum": target_scores.sum()}  # no clamp(min=1): zero when there are no boxes


def _weights_broadcast(loss, *, scores, target_scores, target_scores_sum):
    out = clean.classify(scores, target_scores, target_scores_sum)
    # A per-anchor weight, (B, A), meant to scale every class of its anchor. Neutral here (all ones), so the only
    # bug is the missing `.unsqueeze(-1)`: (B, A) against (B, A, nc) lines A up with nc.
    weight = torch.ones(out["bce"].shape[:2], dtype=out["bce"].dtype, device=out["bce"].device)
    bce = out["bce"] * weight
    return {"bce": bce, "loss": bce.sum() / target_scores_sum}


def _iou_weight_broadcast(loss, *, boxes, pred_bboxes, anchor_points, stride_tensor, target_bboxes, target_scores,
                          target_scores_sum, fg_mask, imgsz):
    out = clean.box_losses(boxes, pred_bboxes, anchor_points, stride_tensor, target_bboxes, target_scores,
                           target_scores_sum, fg_mask, imgsz, loss.config.reg_max)
    fg = fg_mask.nonzero(as_tuple=True)
    weight = target_scores[fg].sum(-1)  # (n,) -- keepdim forgotten
    iou = clean.complete_iou(pred_bboxes[fg], (target_bboxes / stride_tensor)[fg])  # (n, 1)
    out["loss_iou"] = ((1.0 - iou) * weight).sum() / target_scores_sum  # (n, 1) * (n,) -> (n, n)
    return out


# --- gains and batch scaling --------------------------------------------------------------------------------
def _gain_swap(loss, *, loss_iou, loss_cls, loss_dfl):
    box, cls, dfl = loss.config.gains
    return clean.apply_gains(loss_iou, loss_cls, loss_dfl, (dfl, cls, box))  # box and dfl gains exchanged


def _no_batch_scale(loss, *, after, batch_size):
    return {"loss": after * 1, "items": after.detach()}  # the per-image mean; ultralytics multiplies by B


register("missing-sigmoid", "the assigner gets raw class logits (no .sigmoid()): score ** 0.5 of a negative is NaN",
         kind="loss", assigner_inputs=_missing_sigmoid)
register("double-sigmoid", "the assigner gets sigmoid(sigmoid(logits)): every probability squeezed into (0.5, 0.73)",
         kind="loss", assigner_inputs=_double_sigmoid)
register("unclamped-target-scores-sum",
         "target_scores.sum() used without clamp(min=1): a batch with no boxes divides by zero",
         kind="loss", normalize=_unclamped_sum)
register("no-detach", "the assigner inputs are not detached: equal loss values, gradients through the targets",
         kind="loss", assigner_inputs=_no_detach)
register("weights-broadcast",
         "a per-anchor (B, A) weight multiplied into the (B, A, nc) BCE tensor without unsqueeze(-1)",
         kind="loss", classify=_weights_broadcast)
register("iou-weight-broadcast",
         "the CIoU weight summed without keepdim: (n, 1) * (n,) silently broadcasts to (n, n)",
         kind="loss", box=_iou_weight_broadcast)
register("all-anchors-positive",
         "every anchor of an image with boxes marked foreground, with hard one-hot class targets",
         kind="loss", post_assign=_all_anchors_positive)
register("gain-swap", "box and dfl gains exchanged (box 1.5, dfl 7.5 instead of 7.5 and 1.5)",
         kind="loss", gains=_gain_swap)
register("no-batch-scale", "the loss vector is not multiplied by the batch size (ultralytics returns loss * B)",
         kind="loss", output=_no_batch_scale)

LOSS_INJECTIONS = ("missing-sigmoid", "double-sigmoid", "unclamped-target-scores-sum", "no-detach",
                   "weights-broadcast", "iou-weight-broadcast", "all-anchors-positive", "gain-swap",
                   "no-batch-scale")
