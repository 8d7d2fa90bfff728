"""A YOLOv8 loss from a port that keeps labels as one (n, 6) tensor `image, x1, y1, x2, y2, class` in pixels
(class last), takes the 8.4-style head dict and returns the tuple `(box, cls, dfl)` of three scalars, each
already multiplied by the batch size. It exposes its assigner, which returns four tensors (box targets,
soft scores, foreground mask, box index). Faithful: expected verdict PARITY, the assigner stage partial.
"""

from tests.ports.losses.yolo_utils import TaskAlignedAssigner, grid_anchors, loss_terms, pad_targets

LOSS_ADAPTER = {"targets": "img,xyxy,cls", "normalized": False}


class LabelsLastLoss:
    def __init__(self, nc, reg_max, strides, hyp):
        self.nc, self.reg_max, self.strides = nc, reg_max, strides
        self.box_gain, self.cls_gain, self.dfl_gain = hyp["box"], hyp["cls"], hyp["dfl"]
        self.assigner = TaskAlignedAssigner(nc, topk=hyp.get("tal_topk", 10),
                                            min_side=hyp.get("small_box_floor_px", 16))
        self.loss_adapter = {"stages": {"assigner": self.assigner_stage}}

    def assigner_stage(self, pd_scores, pd_bboxes, anc_points, targets, mask_gt):
        labels, boxes, scores, fg, gt_idx = self.assigner(pd_scores, pd_bboxes, anc_points, targets[..., :1],
                                                          targets[..., 1:], mask_gt)
        return {"target_bboxes": boxes, "target_scores": scores, "fg_mask": fg, "target_gt_idx": gt_idx}

    def __call__(self, preds, labels):
        pred_dist = preds["boxes"].permute(0, 2, 1)
        pred_logits = preds["scores"].permute(0, 2, 1)
        bs = pred_logits.shape[0]
        anchors, stride = grid_anchors(preds["feat_shapes"], self.strides)
        gt_labels, gt_boxes, mask_gt = pad_targets(labels[:, 0], labels[:, 5], labels[:, 1:5], bs)
        box, cls, dfl, _ = loss_terms(pred_dist, pred_logits, anchors, stride, gt_labels, gt_boxes, mask_gt,
                                      self.assigner, self.reg_max)
        return box * self.box_gain * bs, cls * self.cls_gain * bs, dfl * self.dfl_gain * bs


def build(nc, reg_max, strides, hyperparameters):
    return LabelsLastLoss(nc, reg_max, strides, hyperparameters)
