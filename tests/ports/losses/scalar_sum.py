"""A YOLOv8 loss that returns one number, `loss.sum() * batch_size`, as most ports hand their trainer. Its
factory takes the hyperparameters (the gains), so the harness can build it with one gain at a time and still
judge each term. Faithful: expected verdict PARITY, every term row saying one gain was set.
"""

import torch

from tests.ports.losses.yolo_utils import TaskAlignedAssigner, grid_anchors, loss_terms, pad_targets, xywh_to_xyxy


class SumLoss:
    def __init__(self, nc, reg_max, strides, gains):
        self.nc, self.reg_max, self.strides = nc, reg_max, strides
        self.gains = torch.tensor(gains, dtype=torch.float32)
        self.assigner = TaskAlignedAssigner(nc)

    def __call__(self, preds, batch):
        pred_dist = preds["boxes"].transpose(1, 2)
        pred_logits = preds["scores"].transpose(1, 2)
        bs = pred_dist.shape[0]
        anchors, stride = grid_anchors(preds["feat_shapes"], self.strides)
        h, w = preds["feat_shapes"][0][0] * self.strides[0], preds["feat_shapes"][0][1] * self.strides[0]
        boxes = xywh_to_xyxy(batch["bboxes"] * torch.tensor([w, h, w, h], dtype=torch.float32))
        gt_labels, gt_boxes, mask_gt = pad_targets(batch["batch_idx"], batch["cls"].view(-1), boxes, bs)
        box, cls, dfl, _ = loss_terms(pred_dist, pred_logits, anchors, stride, gt_labels, gt_boxes, mask_gt,
                                      self.assigner, self.reg_max)
        loss = torch.stack([box, cls, dfl]) * self.gains
        return loss.sum() * bs


def build(nc, reg_max, strides, hyperparameters):
    return SumLoss(nc, reg_max, strides, (hyperparameters["box"], hyperparameters["cls"], hyperparameters["dfl"]))
