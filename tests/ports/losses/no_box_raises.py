"""A student's YOLOv8 loss with a real bug in its no-box path: when no image of the batch has a box it
returns early from the assigner with a float box index (the way ultralytics' own early return builds it)
and then indexes the labels with it, which raises `IndexError`. Every batch with a box is right.
Expected verdict DIVERGENCE, first finding `candidate-exception` "only in case no_boxes".
"""

import torch

from tests.ports.losses.yolo_utils import TaskAlignedAssigner, grid_anchors, loss_terms, pad_targets, xywh_to_xyxy


class StudentAssigner(TaskAlignedAssigner):
    def __call__(self, scores, pred_boxes, anchors, gt_labels, gt_boxes, mask_gt):
        bs, n_max = gt_boxes.shape[:2]
        if n_max == 0:
            gt_idx = torch.zeros_like(scores[..., 0])
            labels = gt_labels.view(-1)[gt_idx]
            return (labels, torch.zeros_like(pred_boxes), torch.zeros_like(scores), gt_idx.bool(), gt_idx)
        return super().__call__(scores, pred_boxes, anchors, gt_labels, gt_boxes, mask_gt)


class StudentLoss:
    def __init__(self, nc, reg_max, strides):
        self.nc, self.reg_max, self.strides = nc, reg_max, strides
        self.assigner = StudentAssigner(nc)
        self.loss_adapter = {"stages": {"assigner": self.assigner_stage}}

    def assigner_stage(self, pd_scores, pd_bboxes, anc_points, targets, mask_gt):
        labels, boxes, scores, fg, gt_idx = self.assigner(pd_scores, pd_bboxes, anc_points, targets[..., :1],
                                                          targets[..., 1:], mask_gt)
        return {"target_labels": labels, "target_bboxes": boxes, "target_scores": scores, "fg_mask": fg,
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
        return torch.stack([box * 7.5, cls * 0.5, dfl * 1.5]) * bs


def build(nc, reg_max, strides):
    return StudentLoss(nc, reg_max, strides)
