"""A YOLOv8 loss from a course port: YOLOv5-style targets `(n, 6) image, class, cx, cy, w, h` normalized, the
8.3-style list of per-level maps (finest first), and a return of per-image means `[box, cls, dfl]` (a list,
not multiplied by the batch size: the trainer of that port averages over images). It declares it
(`batch_scaled=False`). Faithful: expected verdict PARITY, every term row saying it was multiplied by B.
"""

import torch

from tests.ports.losses.yolo_utils import TaskAlignedAssigner, grid_anchors, loss_terms, pad_targets, xywh_to_xyxy


class MeanLoss:
    loss_adapter = {"predictions": "levels", "targets": "img,cls,xywh", "batch_scaled": False}

    def __init__(self, nc, reg_max=16, strides=(8, 16, 32)):
        self.nc, self.reg_max, self.strides = nc, reg_max, strides
        self.assigner = TaskAlignedAssigner(nc)

    def __call__(self, outputs, targets):
        bs = outputs[0].shape[0]
        channels = outputs[0].shape[1]
        x = torch.cat([o.reshape(bs, channels, -1) for o in outputs], -1).transpose(1, 2)
        pred_dist, pred_logits = x.split((4 * self.reg_max, self.nc), -1)
        anchors, stride = grid_anchors([o.shape[-2:] for o in outputs], self.strides)
        img_h, img_w = outputs[0].shape[2] * self.strides[0], outputs[0].shape[3] * self.strides[0]
        boxes = xywh_to_xyxy(targets[:, 2:6] * torch.tensor([img_w, img_h, img_w, img_h], dtype=torch.float32))
        gt_labels, gt_boxes, mask_gt = pad_targets(targets[:, 0], targets[:, 1], boxes, bs)
        box, cls, dfl, _ = loss_terms(pred_dist, pred_logits, anchors, stride, gt_labels, gt_boxes, mask_gt,
                                      self.assigner, self.reg_max)
        return [box * 7.5, cls * 0.5, dfl * 1.5]


def build(nc, reg_max, strides):
    return MeanLoss(nc, reg_max, strides)
