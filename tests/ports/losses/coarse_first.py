"""A YOLOv8 loss from a port whose head emits levels coarsest first (P5, P4, P3), as many C++/Jittor ports do.

Takes the 8.3-style list of per-level maps (bs, 4*reg_max + nc, h, w), builds its anchors in that order and
returns `(loss_vector * bs, loss_vector.detach())` like `model.loss(batch)`. It exposes its anchors stage, which
makes anchors coarse first too. Faithful: expected verdict PARITY.
"""

import torch

from tests.ports.losses.yolo_utils import TaskAlignedAssigner, grid_anchors, loss_terms, pad_targets, xywh_to_xyxy

LOSS_ADAPTER = {"predictions": "levels", "level_order": "P5-first"}


class CoarseFirstLoss:
    def __init__(self, nc, reg_max=16, strides=(32, 16, 8), gains=(7.5, 0.5, 1.5)):
        self.nc, self.reg_max, self.strides, self.gains = nc, reg_max, strides, gains
        self.assigner = TaskAlignedAssigner(nc, topk=10, alpha=0.5, beta=6.0)
        self.loss_adapter = {"stages": {"anchors": self.anchors_stage}}

    def anchors_stage(self, feat_shapes):  # given coarse first, as this port's head emits them
        points, stride = grid_anchors(feat_shapes, self.strides)
        return {"anchor_points": points, "stride_tensor": stride}

    def __call__(self, feats, batch):
        bs = feats[0].shape[0]
        no = 4 * self.reg_max + self.nc
        flat = torch.cat([f.view(bs, no, -1) for f in feats], 2).permute(0, 2, 1)
        pred_dist, pred_logits = flat[..., :4 * self.reg_max], flat[..., 4 * self.reg_max:]
        anchors, stride = grid_anchors([f.shape[2:] for f in feats], self.strides)
        h, w = feats[-1].shape[2] * self.strides[-1], feats[-1].shape[3] * self.strides[-1]
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        boxes = xywh_to_xyxy(batch["bboxes"] * scale)
        gt_labels, gt_boxes, mask_gt = pad_targets(batch["batch_idx"], batch["cls"].view(-1), boxes, bs)
        box, cls, dfl, _ = loss_terms(pred_dist, pred_logits, anchors, stride, gt_labels, gt_boxes, mask_gt,
                                      self.assigner, self.reg_max)
        loss = torch.stack([box * self.gains[0], cls * self.gains[1], dfl * self.gains[2]])
        return loss * bs, loss.detach()


def build(nc, reg_max, strides):
    return CoarseFirstLoss(nc, reg_max, tuple(reversed(strides)))
