"""A YOLOv8 loss whose assigner computes CIoU and the alignment metric for EVERY anchor-box pair, then masks
with the in-box test only where it selects (`metric * in_box` for the top k, `iou * in_box` for conflicts):
the convention of several public re-implementations. Its CIoU adds eps to the union only (not to the
heights), which moves the overlaps by float noise. It exposes its assigner with all nine outputs.
Faithful in every output the loss uses: expected verdict PARITY, the outside of the boxes a note.
"""

import math

import torch
import torch.nn.functional as F

from tests.ports.losses.yolo_utils import (TaskAlignedAssigner, anchors_in_boxes, grid_anchors, loss_terms,
                                           pad_targets, xywh_to_xyxy)


def ciou_union_eps(b1, b2, eps=1e-7):
    (ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2) = b1.unbind(-1), b2.unbind(-1)
    aw, ah, bw, bh = ax2 - ax1, ay2 - ay1, bx2 - bx1, by2 - by1
    inter = (torch.min(ax2, bx2) - torch.max(ax1, bx1)).clamp(0) * (torch.min(ay2, by2) - torch.max(ay1, by1)).clamp(0)
    iou = inter / (aw * ah + bw * bh - inter + eps)
    c2 = (torch.max(ax2, bx2) - torch.min(ax1, bx1)) ** 2 + (torch.max(ay2, by2) - torch.min(ay1, by1)) ** 2 + eps
    rho2 = ((bx1 + bx2 - ax1 - ax2) ** 2 + (by1 + by2 - ay1 - ay2) ** 2) / 4
    v = (4 / math.pi ** 2) * (torch.atan(bw / (bh + eps)) - torch.atan(aw / (ah + eps))) ** 2
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - (rho2 / c2 + v * alpha)


class AllPairsAssigner(TaskAlignedAssigner):
    def dense(self, scores, pred_boxes, anchors, gt_labels, gt_boxes, mask_gt):
        bs, n_max = gt_boxes.shape[:2]
        na = anchors.shape[0]
        if n_max == 0:
            empty = torch.zeros(bs, 0, na)
            return empty.bool(), empty, empty, empty.bool()
        in_box = anchors_in_boxes(anchors, gt_boxes, self.min_side) & mask_gt.bool()
        iou = ciou_union_eps(gt_boxes[:, :, None], pred_boxes[:, None]).clamp(0)  # (bs, n_max, na)
        cls_idx = gt_labels.long().squeeze(-1)  # (bs, n_max)
        score = scores.gather(2, cls_idx[:, None, :].expand(-1, na, -1)).transpose(1, 2)  # (bs, n_max, na)
        metric = score ** self.alpha * iou ** self.beta
        return in_box, metric, iou, mask_gt

    def __call__(self, scores, pred_boxes, anchors, gt_labels, gt_boxes, mask_gt):
        return self.assign_all(scores, pred_boxes, anchors, gt_labels, gt_boxes, mask_gt)[0]

    def assign_all(self, scores, pred_boxes, anchors, gt_labels, gt_boxes, mask_gt):
        in_box, metric, iou, mask_gt = self.dense(scores, pred_boxes, anchors, gt_labels, gt_boxes, mask_gt)
        bs, n_max, na = metric.shape
        if n_max == 0:
            out = (torch.full((bs, na), self.nc), torch.zeros(bs, na, 4), torch.zeros(bs, na, self.nc),
                   torch.zeros(bs, na, dtype=torch.bool), torch.zeros(bs, na, dtype=torch.long))
            return out, in_box, metric, iou, in_box.to(torch.int8)
        top = (metric * in_box).topk(self.topk, dim=-1).indices
        pos = torch.zeros_like(metric).scatter_(-1, top, 1.0) * in_box * mask_gt
        multi = pos.sum(1, keepdim=True) > 1
        best = F.one_hot((iou * in_box).argmax(1), n_max).permute(0, 2, 1).float()
        pos = torch.where(multi, best, pos)
        fg = pos.sum(1) > 0
        gt_idx = pos.argmax(1)
        flat = gt_idx + torch.arange(bs)[:, None] * n_max
        t_labels = gt_labels.view(-1).long()[flat]
        t_boxes = gt_boxes.view(-1, 4)[flat]
        m, o = metric * pos, iou * pos
        scale = (m * o.amax(-1, keepdim=True) / (m.amax(-1, keepdim=True) + self.eps)).amax(1)
        t_scores = F.one_hot(t_labels, self.nc).float() * fg[..., None] * scale[..., None]
        return (t_labels, t_boxes, t_scores, fg, gt_idx), in_box, metric, iou, pos.to(torch.int8)


class AllPairsLoss:
    def __init__(self, nc, reg_max, strides):
        self.nc, self.reg_max, self.strides = nc, reg_max, strides
        self.assigner = AllPairsAssigner(nc)
        self.loss_adapter = {"stages": {"assigner": self.assigner_stage}}

    def assigner_stage(self, pd_scores, pd_bboxes, anc_points, targets, mask_gt):
        (labels, boxes, scores, fg, gt_idx), in_box, metric, iou, pos = self.assigner.assign_all(
            pd_scores, pd_bboxes, anc_points, targets[..., :1], targets[..., 1:], mask_gt)
        return {"mask_in_gts": in_box, "align_metric": metric, "overlaps": iou, "mask_pos": pos,
                "target_labels": labels, "target_bboxes": boxes, "target_scores": scores, "fg_mask": fg,
                "target_gt_idx": gt_idx}

    def __call__(self, preds, batch):
        pred_dist, pred_logits = preds["boxes"].permute(0, 2, 1), preds["scores"].permute(0, 2, 1)
        bs = pred_dist.shape[0]
        anchors, stride = grid_anchors(preds["feat_shapes"], self.strides)
        h, w = preds["feat_shapes"][0][0] * self.strides[0], preds["feat_shapes"][0][1] * self.strides[0]
        boxes = xywh_to_xyxy(batch["bboxes"] * torch.tensor([w, h, w, h], dtype=torch.float32))
        gt_labels, gt_boxes, mask_gt = pad_targets(batch["batch_idx"], batch["cls"].view(-1), boxes, bs)
        box, cls, dfl, _ = loss_terms(pred_dist, pred_logits, anchors, stride, gt_labels, gt_boxes, mask_gt,
                                      self.assigner, self.reg_max)
        loss = torch.stack([box * 7.5, cls * 0.5, dfl * 1.5])
        return loss * bs, loss.detach()


def build(nc, reg_max, strides):
    return AllPairsLoss(nc, reg_max, strides)
