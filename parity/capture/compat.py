"""What reference capture needs to know about older ultralytics releases (8.3.x and 8.4.0-8.4.136).

The capture in `parity.capture.reference` is written against ultralytics 8.4.190. Releases before differ on
points that matter for capture (checked against the released wheels' source, 8.3.200 / 8.4.0 / 8.4.125):

| point | 8.3.x | 8.4.190 |
| --- | --- | --- |
| Detect train output | list of per-level (B, 4*reg_max+nc, H, W) maps | dict boxes / scores / feats |
| `model.loss()[0]` | (3,) vector * B from 8.3.99, a scalar sum * B before | (3,) vector * B |
| `v8DetectionLoss` | no `get_assigned_targets_and_loss`, `loss_names`; `bbox_loss` takes 7 arguments (no imgsz, stride_tensor) and is skipped when there is no foreground; `target_scores_sum = max(sum, 1)` (a Python int 1 when the sum is under 1) | all of these |
| assigner | `select_candidates_in_gts` static, no small-box floor, no `stride_val` | floor: sides under `stride_val` (16 px) enlarged to 16 px |
| `LetterBox` | no `get_params` | `get_params` |

(8.4.0-8.4.136: sides under stride[0] = 8 px enlarged to stride[1] = 16 px, `stride_val` present from some
8.4 release but not the threshold.) This module gives the capture version-independent answers; each function
works on 8.4.190 unchanged, so the capture can call them unconditionally.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from parity.dump import names


def ultralytics_version() -> tuple[int, ...]:
    try:
        from importlib.metadata import version

        text = version("ultralytics")
    except Exception:  # noqa: BLE001
        return ()
    return tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in text.split(".")[:3])


# ------------------------------------------------------------------------------------------ the batch
def letterbox_params(letterbox, bgr) -> dict:
    """`LetterBox.get_params` where it exists (8.4); the same numbers computed as 8.3's `__call__` does."""
    if hasattr(letterbox, "get_params"):
        return letterbox.get_params({"img": bgr})
    shape = bgr.shape[:2]
    new_shape = letterbox.new_shape
    if isinstance(new_shape, int):
        new_shape = (new_shape, new_shape)
    r = min(new_shape[0] / shape[0], new_shape[1] / shape[1])
    if not letterbox.scaleup:
        r = min(r, 1.0)
    new_unpad = int(round(shape[1] * r)), int(round(shape[0] * r))
    dw, dh = new_shape[1] - new_unpad[0], new_shape[0] - new_unpad[1]
    if getattr(letterbox, "auto", False):
        dw, dh = dw % letterbox.stride, dh % letterbox.stride
    center = getattr(letterbox, "center", True)
    if center:
        dw /= 2
        dh /= 2
    top = int(round(dh - 0.1)) if center else 0
    left = int(round(dw - 0.1)) if center else 0
    return {"ratio": (r, r), "top": top, "left": left, "new_unpad": new_unpad}


# ------------------------------------------------------------------------------------------- the head
def is_level_list(preds: Any) -> bool:
    return isinstance(preds, (list, tuple)) and bool(preds) and all(
        isinstance(p, torch.Tensor) and p.dim() == 4 for p in preds)


def train_preds(preds: Any) -> Any:
    """The train-mode part of a head output (8.3's eval tuple `(y, x)` holds it second)."""
    if isinstance(preds, tuple) and len(preds) == 2 and not isinstance(preds[0], (list, dict)) and \
            is_level_list(preds[1]):
        return preds[1]
    return preds


def head_outputs(preds: Any, end2end: bool) -> dict[str, torch.Tensor]:
    """The tensors head gradients are taken with respect to, under their dump suffixes:
    8.4 dict -> `boxes`, `scores` (end-to-end: `{branch}.boxes` ...); 8.3 list -> `0`, `1`, `2` (per level)."""
    preds = train_preds(preds)
    if isinstance(preds, dict):
        if end2end:
            return {f"{b}.{o}": preds[b][o] for b in names.E2E_BRANCHES for o in names.HEAD_OUTPUTS}
        return {o: preds[o] for o in names.HEAD_OUTPUTS}
    if end2end and isinstance(preds, dict) is False and isinstance(preds, (list, tuple)) and len(preds) == 2 \
            and all(isinstance(p, (list, tuple)) for p in preds):  # yolov10 in 8.3: (one2many, one2one) lists
        return {f"{b}.{l}": m for b, maps in zip(names.E2E_BRANCHES, preds) for l, m in enumerate(maps)}
    if is_level_list(preds):
        return {str(level): m for level, m in enumerate(preds)}
    raise TypeError(f"unrecognised Detect train output: {type(preds).__name__}")


def head_boxes(preds: Any, head, end2end: bool) -> torch.Tensor:
    """(B, 4*reg_max, A): the box distributions the head's DFL decodes, in either layout."""
    preds = train_preds(preds)
    if isinstance(preds, dict):
        return preds["one2many"]["boxes"] if end2end else preds["boxes"]
    maps = preds[0] if end2end and isinstance(preds[0], (list, tuple)) else preds
    b = maps[0].shape[0]
    no = 4 * head.reg_max + head.nc
    return torch.cat([m.reshape(b, no, -1) for m in maps], -1)[:, : 4 * head.reg_max]


def head_layout(preds: Any) -> str:
    return "dict" if isinstance(train_preds(preds), dict) else "list"


# ------------------------------------------------------------------------------------------- the loss
def small_box_rule(assigner) -> dict:
    """The assigner's small-box floor, measured by calling `select_candidates_in_gts` on probe boxes (so it
    is right for every release, whatever its attributes say): {'small_box_floor_px': F or None} and, where
    the threshold differs from the floor, 'small_box_threshold_px': T: sides under T (default F) are enlarged
    to F about their centre."""
    import inspect

    step = 0.25
    coords = torch.arange(-40.0, 40.0 + step, step)
    xy = torch.stack((coords, torch.zeros_like(coords)), -1)  # anchors along the x axis, through the centre

    def extent(side: float) -> float:
        box = torch.tensor([[[-side / 2, -20.0, side / 2, 20.0]]])  # tall, so only the width can be floored
        method = assigner.select_candidates_in_gts
        params = list(inspect.signature(method).parameters)
        if "mask_gt" in params:
            mask = method(xy, box, torch.ones(1, 1, 1))
        else:
            mask = method(xy, box)
        inside = coords[mask.reshape(-1).bool()]
        return float(inside.max() - inside.min()) + step if inside.numel() else 0.0

    sides = [1.0, 2.0, 4.0, 6.0, 7.0, 7.5, 8.0, 10.0, 12.0, 15.0, 15.5, 16.0, 20.0, 24.0, 30.0]
    grown = [(s, extent(s)) for s in sides]
    enlarged = [(s, e) for s, e in grown if e > s + 2 * step]
    if not enlarged:
        return {"small_box_floor_px": None}
    floor = float(round(max(e for _, e in enlarged)))  # the floor is a whole number of pixels in every release
    # The threshold lies above the largest side that was enlarged; every release uses a stride (or the floor).
    largest_enlarged = max(s for s, _ in enlarged)
    strides = [float(s) for s in getattr(assigner, "stride", None) or [8, 16, 32]]
    threshold = min(s for s in [*strides, floor] if s > largest_enlarged)
    rule = {"small_box_floor_px": floor}
    if threshold != floor:  # 8.4.0-8.4.136: under 8 px -> 16 px; otherwise the floor is the threshold too
        rule["small_box_threshold_px"] = threshold
    return rule


def loss_names(criterion) -> list[str]:
    value = getattr(criterion, "loss_names", None)
    if value:
        return list(value)
    return ["box_loss", "cls_loss", "dfl_loss" if getattr(criterion, "use_dfl", True) else "l1_loss"]


def hyperparameters(model, criterion) -> dict:
    """The manifest's `hyperparameters` section, on any release."""
    hyp = model.args
    assigner = criterion.assigner
    return {"box": float(hyp.box), "cls": float(hyp.cls), "dfl": float(hyp.dfl),
            "tal_topk": assigner.topk, "tal_alpha": assigner.alpha, "tal_beta": assigner.beta,
            "tal_eps": assigner.eps, **small_box_rule(assigner)}


_ANCHOR_LISTENERS: list[Callable] = []


def _tap_make_anchors(loss_module, listener: Callable) -> None:
    """One shared wrapper around the loss module's `make_anchors`, however many recorders listen (end-to-end
    models have two); removed when the last listener goes, whatever the order of removal."""
    current = loss_module.make_anchors
    if not getattr(current, "_parity_tap", False):
        def tap(*args, **kwargs):
            result = current(*args, **kwargs)
            for each in list(_ANCHOR_LISTENERS):
                each(result)
            return result

        tap._parity_tap = True
        tap._original = current
        loss_module.make_anchors = tap
    _ANCHOR_LISTENERS.append(listener)


def _untap_make_anchors(loss_module, listener: Callable) -> None:
    if listener in _ANCHOR_LISTENERS:
        _ANCHOR_LISTENERS.remove(listener)
    current = loss_module.make_anchors
    if not _ANCHOR_LISTENERS and getattr(current, "_parity_tap", False):
        loss_module.make_anchors = current._original


def install_recorder(recorder) -> None:
    """Install a `parity.capture.reference.LossRecorder` on any release: wrap only the methods that exist,
    take `stride_tensor` from `make_anchors` when `bbox_loss` does not receive it, and let `finish_case`
    fill in what an 8.3 loss computes inline (or skips on an empty foreground)."""
    import ultralytics.utils.loss as loss_module

    recorder._stage_seen = set()

    def put(stage: str, name: str, tensor) -> None:
        recorder._stage_seen.add(f"{stage}.{name}")
        recorder.put(stage, name, tensor)

    recorder._put_compat = put
    _wrap_stage_methods(recorder, put)

    # stride_tensor: from make_anchors, as the loss module calls it (a module-level name in both releases)
    def on_anchors(result) -> None:
        recorder._stride_tensor = result[1]

    _tap_make_anchors(loss_module, on_anchors)
    recorder._undo.append(lambda: _untap_make_anchors(loss_module, on_anchors))
    _hook_stage_modules(recorder, put)


def _wrap_stage_methods(recorder, put: Callable) -> None:
    """The loss's and the assigner's own methods, each recording what it returns."""
    crit, assigner = recorder.criterion, recorder.criterion.assigner
    recorder._wrap(crit, "preprocess", lambda a, r: put("preprocess", "targets", r))
    recorder._wrap(crit, "bbox_decode", lambda a, r: (put("anchors", "anchor_points", a[0]),
                                                      put("decode", "pred_bboxes", r)))
    recorder._wrap(assigner, "select_candidates_in_gts", lambda a, r: put("assign", "mask_in_gts", r))
    recorder._wrap(assigner, "get_pos_mask", lambda a, r: (put("assign", "align_metric", r[1]),
                                                           put("assign", "overlaps", r[2])))
    recorder._wrap(assigner, "select_highest_overlaps", lambda a, r: put("assign", "mask_pos", r[2]))
    if hasattr(crit, "get_assigned_targets_and_loss"):
        recorder._wrap(crit, "get_assigned_targets_and_loss", lambda a, r: put("gains", "after", r[1]))


def _hook_stage_modules(recorder, put: Callable) -> None:
    """Forward hooks on the assigner, the BCE and the box loss: their inputs and outputs are stages too."""
    crit, assigner = recorder.criterion, recorder.criterion.assigner
    hooks = _AssignHooks(recorder, put)
    handles = [assigner.register_forward_pre_hook(hooks.before_assign),
               assigner.register_forward_hook(hooks.after_assign),
               crit.bce.register_forward_hook(hooks.after_bce),
               crit.bbox_loss.register_forward_pre_hook(hooks.before_bbox_loss),
               crit.bbox_loss.register_forward_hook(hooks.after_bbox_loss)]
    recorder._undo.extend(h.remove for h in handles)


class _AssignHooks:
    """What the assigner, the BCE and the box loss receive and return, recorded under their stage names; the
    values later stages derive from (BCE, target scores, their sum) are kept on the recorder."""

    def __init__(self, recorder, put: Callable):
        self.recorder = recorder
        self.put = put

    def before_assign(self, _module, args) -> None:
        pd_scores, pd_bboxes, anc_points, _labels, gt_bboxes, mask_gt = args[:6]
        self.put("preprocess", "mask_gt", mask_gt)
        self.put("assign", "pd_scores", pd_scores)
        self.put("assign", "pd_bboxes", pd_bboxes)
        self.put("assign", "anc_points", anc_points)
        self.recorder._empty_shape = (pd_scores.shape[0], gt_bboxes.shape[1], pd_scores.shape[1])

    def after_assign(self, _module, _args, result) -> None:
        recorder = self.recorder
        # an assigner that returned early (no boxes at all) never called its pair stages: store them empty
        for name in ("mask_in_gts", "align_metric", "overlaps", "mask_pos"):
            key = names.loss(recorder.case, "assign", name, recorder.branch)
            if key not in recorder.capture:
                dtype = {"mask_in_gts": torch.bool, "mask_pos": torch.int8}.get(name, torch.float32)
                recorder.capture.put(key, torch.zeros(recorder._empty_shape, dtype=dtype))
        for name, tensor in zip(("target_labels", "target_bboxes", "target_scores", "fg_mask", "target_gt_idx"), result):
            self.put("assign", name, tensor)
        recorder._target_scores = result[2]

    def after_bce(self, _module, _args, output) -> None:
        self.put("classify", "bce", output)
        self.recorder._bce = output

    def before_bbox_loss(self, _module, args) -> None:
        if len(args) > 8:
            self.put("anchors", "stride_tensor", args[8])
        self.put("normalize", "target_scores_sum", torch.as_tensor(args[5]))
        self.recorder._target_scores_sum = args[5]

    def after_bbox_loss(self, _module, _args, output) -> None:
        recorder = self.recorder
        loss_iou, loss_dfl = output
        recorder._graph_terms = (loss_iou, loss_dfl)
        cls = recorder._bce.detach().sum() / recorder._target_scores_sum
        self.put("classify", "loss", cls)
        self.put("box", "loss_iou", loss_iou)
        self.put("box", "loss_dfl", loss_dfl)
        self.put("gains", "before", torch.stack([loss_iou.detach(), cls, loss_dfl.detach()]))


def start_case(recorder, case: str) -> None:
    recorder.case = case
    recorder._stage_seen = set()
    recorder._stride_tensor = None
    recorder._bce = None
    recorder._target_scores = None
    recorder._graph_terms = None


def finish_case(recorder, loss: torch.Tensor, items) -> None:
    """After `model.loss()`: record what this release computed inline or skipped (8.3: no bbox_loss call on
    an empty foreground, no `get_assigned_targets_and_loss`, no stride_tensor argument)."""
    seen = recorder._stage_seen
    put = recorder._put_compat
    if "anchors.stride_tensor" not in seen and recorder._stride_tensor is not None:
        put("anchors", "stride_tensor", recorder._stride_tensor)
    if "normalize.target_scores_sum" not in seen and recorder._target_scores is not None:
        # 8.3: max(target_scores.sum(), 1) -- the tensor, or the Python int 1; stored as the float it acts as
        total = recorder._target_scores.sum()
        recorder._target_scores_sum = total if bool(total >= 1) else torch.ones((), dtype=total.dtype,
                                                                                 device=total.device)
        put("normalize", "target_scores_sum", recorder._target_scores_sum)
    if "classify.loss" not in seen and recorder._bce is not None:
        cls = recorder._bce.detach().sum() / recorder._target_scores_sum
        zero = torch.zeros((), dtype=cls.dtype, device=cls.device)
        put("classify", "loss", cls)
        put("box", "loss_iou", zero)  # 8.3 leaves loss[0] and loss[2] at 0 with no foreground
        put("box", "loss_dfl", zero)
        put("gains", "before", torch.stack([zero, cls, zero]))
    if "gains.after" not in seen:
        values = list(items.values()) if isinstance(items, dict) else list(items)
        put("gains", "after", torch.stack([torch.as_tensor(v) for v in values]))


def items_vector(items) -> torch.Tensor:
    """`model.loss()[1]` as a (3,) tensor: a dict of items (8.4) or a tensor (8.3)."""
    if isinstance(items, dict):
        return torch.stack(list(items.values()))
    return items.detach() if isinstance(items, torch.Tensor) else torch.stack([torch.as_tensor(v) for v in items])


def loss_terms(loss: torch.Tensor, recorder, model) -> list[torch.Tensor]:
    """The three terms of `model.loss()[0]` to differentiate: its elements (from 8.3.99), or, where the loss
    was a scalar sum (before 8.3.99), the same terms rebuilt from the graph tensors the recorder saw
    (`loss_iou * box * B`, `bce.sum() / tss * cls * B`, `loss_dfl * dfl * B`; a term ultralytics left at 0
    for an empty foreground is `bce.sum() * 0`, so its gradient is zeros)."""
    if loss.dim() == 1 and loss.numel() == 3:
        return [loss[i] for i in range(3)]
    hyp = model.args
    bce = recorder._bce
    batch = bce.shape[0]
    cls = bce.sum() / recorder._target_scores_sum * hyp.cls * batch
    if recorder._graph_terms is None:
        zero = bce.sum() * 0
        return [zero, cls, zero]
    loss_iou, loss_dfl = recorder._graph_terms
    return [loss_iou * hyp.box * batch, cls, loss_dfl * hyp.dfl * batch]


def loss_output_note(loss_dims: int) -> str:
    """What `model.loss(batch)[0]` is, from its number of dimensions."""
    return ("loss vector (box, cls, dfl) after gains, multiplied by the batch size" if loss_dims == 1 else
            "scalar: the sum of (box, cls, dfl) after gains, multiplied by the batch size (ultralytics < 8.3.99)")


CAPTURE_CHANGES: dict[str, Callable] = {}  # reserved: nothing registers here yet
