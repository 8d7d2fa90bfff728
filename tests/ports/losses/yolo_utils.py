"""Box maths and a task-aligned assigner the way ports carry them: one utils file, plain functions.

Written from the TOOD paper and from how a YOLOv8 loss behaves (docs/loss-adapter.md), not from ultralytics'
source. Shapes: bs images, n_max boxes per image (padded), na anchors, nc classes.
"""

import math

import torch
import torch.nn.functional as F


def grid_anchors(feat_shapes, strides, offset=0.5):
    """Anchor centres in grid units and each anchor's stride, level by level in the order given."""
    points, stride_list = [], []
    for (h, w), s in zip(feat_shapes, strides):
        sy, sx = torch.meshgrid(torch.arange(h, dtype=torch.float32) + offset,
                                torch.arange(w, dtype=torch.float32) + offset, indexing="ij")
        points.append(torch.stack([sx.flatten(), sy.flatten()], 1))
        stride_list.append(torch.full((h * w, 1), float(s)))
    return torch.cat(points), torch.cat(stride_list)


def xywh_to_xyxy(b):
    xy, wh = b[..., :2], b[..., 2:4]
    return torch.cat([xy - wh / 2, xy + wh / 2], -1)


def dist_to_box(dist, points):
    """ltrb distances -> x1y1x2y2."""
    lt, rb = dist[..., :2], dist[..., 2:]
    return torch.cat([points - lt, points + rb], -1)


def dfl_expectation(pred_dist, reg_max):
    """(bs, na, 4*reg_max) -> (bs, na, 4): the mean of each side's distribution over bins 0..reg_max-1."""
    bs, na, _ = pred_dist.shape
    prob = pred_dist.view(bs, na, 4, reg_max).softmax(-1)
    return prob @ torch.arange(reg_max, dtype=prob.dtype)


def ciou(b1, b2, eps=1e-7):
    """Complete IoU of x1y1x2y2 boxes, broadcasting over leading dims; returns (...,)."""
    x1a, y1a, x2a, y2a = b1.unbind(-1)
    x1b, y1b, x2b, y2b = b2.unbind(-1)
    wa, ha = x2a - x1a, y2a - y1a + eps
    wb, hb = x2b - x1b, y2b - y1b + eps
    iw = (torch.minimum(x2a, x2b) - torch.maximum(x1a, x1b)).clamp(min=0)
    ih = (torch.minimum(y2a, y2b) - torch.maximum(y1a, y1b)).clamp(min=0)
    inter = iw * ih
    iou = inter / (wa * ha + wb * hb - inter + eps)
    cw = torch.maximum(x2a, x2b) - torch.minimum(x1a, x1b)
    ch = torch.maximum(y2a, y2b) - torch.minimum(y1a, y1b)
    diag = cw ** 2 + ch ** 2 + eps
    centre = ((x1b + x2b - x1a - x2a) ** 2 + (y1b + y2b - y1a - y2a) ** 2) / 4
    v = (4 / math.pi ** 2) * (torch.atan(wb / hb) - torch.atan(wa / ha)) ** 2
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - (centre / diag + v * alpha)


def pad_targets(img_idx, labels, boxes_xyxy, bs):
    """Per-image padding: (bs, n_max, 1) labels, (bs, n_max, 4) boxes, (bs, n_max, 1) mask."""
    counts = [int((img_idx == i).sum()) for i in range(bs)]
    n_max = max(counts) if counts else 0
    gt_labels = torch.zeros(bs, n_max, 1)
    gt_boxes = torch.zeros(bs, n_max, 4)
    for i in range(bs):
        sel = img_idx == i
        gt_labels[i, :counts[i], 0] = labels[sel]
        gt_boxes[i, :counts[i]] = boxes_xyxy[sel]
    mask_gt = (gt_boxes.sum(-1, keepdim=True) > 0).float()
    return gt_labels, gt_boxes, mask_gt


def anchors_in_boxes(anchors, gt_boxes, min_side=16.0, eps=1e-9):
    """(bs, n_max, na): anchor centre strictly inside the box, boxes with a side under `min_side` px grown to it."""
    centre = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2
    size = gt_boxes[..., 2:] - gt_boxes[..., :2]
    size = torch.where(size < min_side, torch.full_like(size, min_side), size)
    grown = torch.cat([centre - size / 2, centre + size / 2], -1)
    lt = anchors[None, None] - grown[:, :, None, :2]
    rb = grown[:, :, None, 2:] - anchors[None, None]
    return torch.cat([lt, rb], -1).amin(-1) > eps


class TaskAlignedAssigner:
    """TOOD assignment: candidates inside the box, metric score^alpha * iou^beta, top-k, one box per anchor."""

    def __init__(self, nc, topk=10, alpha=0.5, beta=6.0, eps=1e-9, min_side=16.0):
        self.nc, self.topk, self.alpha, self.beta, self.eps, self.min_side = nc, topk, alpha, beta, eps, min_side

    def pair_metrics(self, scores, pred_boxes, gt_labels, gt_boxes, candidates):
        """Metric and CIoU on the candidate pairs only; zero elsewhere."""
        bs, n_max, na = candidates.shape
        b, g, a = candidates.nonzero(as_tuple=True)
        iou = torch.zeros(bs, n_max, na)
        metric = torch.zeros(bs, n_max, na)
        pair_iou = ciou(gt_boxes[b, g], pred_boxes[b, a]).clamp(min=0)
        pair_score = scores[b, a, gt_labels[b, g, 0].long()]
        iou[b, g, a] = pair_iou
        metric[b, g, a] = pair_score ** self.alpha * pair_iou ** self.beta
        return metric, iou

    def __call__(self, scores, pred_boxes, anchors, gt_labels, gt_boxes, mask_gt):
        bs, n_max = gt_boxes.shape[:2]
        na = anchors.shape[0]
        if n_max == 0:
            return (torch.zeros(bs, na, dtype=torch.long), torch.zeros(bs, na, 4), torch.zeros(bs, na, self.nc),
                    torch.zeros(bs, na, dtype=torch.bool), torch.zeros(bs, na, dtype=torch.long))
        inside = anchors_in_boxes(anchors, gt_boxes, self.min_side)
        candidates = inside & mask_gt.bool()
        metric, iou = self.pair_metrics(scores, pred_boxes, gt_labels, gt_boxes, candidates)
        return self.finish(metric, iou, candidates, gt_labels, gt_boxes, mask_gt)

    def finish(self, metric, iou, candidates, gt_labels, gt_boxes, mask_gt):
        bs, n_max, na = metric.shape
        top = metric.topk(self.topk, dim=-1).indices
        chosen = torch.zeros_like(metric).scatter_(-1, top, 1.0) * mask_gt
        pos = chosen * candidates.float()
        # an anchor chosen by several boxes goes to the box it overlaps best
        multi = pos.sum(1, keepdim=True) > 1
        best = F.one_hot(iou.argmax(1), n_max).permute(0, 2, 1).float()
        pos = torch.where(multi, best, pos)
        fg = pos.sum(1) > 0
        gt_idx = pos.argmax(1)
        flat = gt_idx + torch.arange(bs)[:, None] * n_max
        t_labels = gt_labels.view(-1).long()[flat]
        t_boxes = gt_boxes.view(-1, 4)[flat]
        onehot = F.one_hot(t_labels.clamp(min=0), self.nc).float() * fg[..., None]
        metric, iou = metric * pos, iou * pos
        scale = (metric * iou.amax(-1, keepdim=True) / (metric.amax(-1, keepdim=True) + self.eps)).amax(1)
        return t_labels, t_boxes, onehot * scale[..., None], fg, gt_idx


def side_targets(anchors, boxes, reg_max):
    lt = anchors - boxes[..., :2]
    rb = boxes[..., 2:] - anchors
    return torch.cat([lt, rb], -1).clamp(0, reg_max - 1 - 0.01)


def dfl(pred_logits, target):
    """Distribution focal loss, (n, 4, reg_max) logits and (n, 4) targets -> (n,) mean over the sides."""
    left = target.long()
    w_right = target - left
    w_left = 1 - w_right
    n, sides, bins = pred_logits.shape
    logits = pred_logits.reshape(-1, bins)
    ce_l = F.cross_entropy(logits, left.view(-1), reduction="none").view(n, sides)
    ce_r = F.cross_entropy(logits, (left + 1).view(-1), reduction="none").view(n, sides)
    return (ce_l * w_left + ce_r * w_right).mean(-1)


def loss_terms(pred_dist, pred_logits, anchors, stride, gt_labels, gt_boxes, mask_gt, assigner, reg_max):
    """The three normalised terms (box CIoU, class BCE, DFL) before gains.

    pred_dist (bs, na, 4*reg_max) raw, pred_logits (bs, na, nc) raw, anchors (na, 2) grid units, stride (na, 1),
    ground truth in pixels. Also returns what the assigner produced, for ports that expose it.
    """
    bs, na, _ = pred_dist.shape
    pred_boxes = dist_to_box(dfl_expectation(pred_dist, reg_max), anchors)
    with torch.no_grad():
        assigned = assigner(pred_logits.detach().sigmoid(), pred_boxes.detach() * stride, anchors * stride,
                            gt_labels, gt_boxes, mask_gt)
    t_labels, t_boxes, t_scores, fg, gt_idx = assigned
    norm = max(t_scores.sum(), 1)
    cls = F.binary_cross_entropy_with_logits(pred_logits, t_scores, reduction="none").sum() / norm
    box = pred_logits.new_zeros(())
    dfl_term = pred_logits.new_zeros(())
    if fg.any():
        weight = t_scores.sum(-1)[fg]
        t_grid = t_boxes / stride
        box = ((1 - ciou(pred_boxes[fg], t_grid[fg])) * weight).sum() / norm
        sides = side_targets(anchors[None].expand(bs, -1, -1)[fg], t_grid[fg], reg_max)
        dfl_term = (dfl(pred_dist[fg].view(-1, 4, reg_max), sides) * weight).sum() / norm
    return box, cls, dfl_term, assigned
