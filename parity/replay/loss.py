"""Loss replay: compare a candidate detection loss with a reference dump's, stage by stage and end to end.

Three passes per loss case in the dump (`manifest.loss.cases`):

1. stage cross-replay (section `loss/{case}`): every stage the candidate exposes is fed the REFERENCE's inputs
   for that stage and its outputs are compared with the reference's. A wrong stage shows up on its own row,
   however wrong the stages before it are; every stage after the assignment runs on the reference
   assignment, so a tie-break flip in the assigner cannot turn later numbers red.
2. end to end (section `loss/{case} end-to-end`): the reference head outputs and ground truth go through the
   whole candidate loss; each term (box, cls, dfl) gets its own verdict, under the batch-size convention the
   candidate declares (stated on the row), plus every intermediate the candidate returns.
3. gradients (section `loss/{case} gradients`): per term, the gradient w.r.t. the head outputs, end to end
   and (when the candidate exposes the stages) conditioned on the reference assignment.

Discrete outputs are judged as discrete: foreground anchors and their ground-truth index per image and per
box (positives on both sides, anchors added and removed), each flip classified as a near-tie (its alignment
metric within tolerance of the top-k boundary, or equal overlaps in a conflict: a harmless tie-break) or real.

A candidate loss is a `LossAdapter` (docs/loss-adapter.md): `builtin` (the clean-room loss, optionally with an
injected bug), `package.module:factory`, or an adapter object; or a candidate DUMP, whose recorded stages are
checked against ultralytics' arithmetic on the candidate's own inputs. `parity.diagnose.loss` turns what the replay saw
into findings.
"""

from __future__ import annotations

import inspect
import sys
import sysconfig
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from parity.dump import names
from parity.compare.metrics import compare_tensors
from parity.compare.tolerances import BITWISE, Profile, Tolerance, get_profile, profile_for_environment
from parity.diagnose.loss import (BroadcastWatch, CaseEvidence, LossEvidence, StageEvidence, diagnose_loss)
from parity.dump.files import Dump
from parity.errors import ParityError
from parity.reimpl.loss import INPUT_SOURCES, STAGE_INPUTS, LossConfig, build_loss
from parity.findings import Report, Row

TERMS = names.LOSS_TERMS
# Stage replay order: `assigner` (the assigner proper, fed the reference's assigner inputs) follows `assign`.
REPLAY_STAGES = ("anchors", "preprocess", "decode", "assign", "assigner", "normalize", "classify", "box", "gains",
                 "output")
ASSIGNER_INPUT_NAMES = ("pd_scores", "pd_bboxes", "anc_points")
REFERENCE_STAGE = {"assigner": "assign"}  # where the reference keeps a replay stage's outputs
STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {
    **names.LOSS_STAGES,
    "assigner": tuple(n for n in names.LOSS_STAGES["assign"] if n not in ASSIGNER_INPUT_NAMES),
    "output": names.LOSS_OUTPUT,
}
# What a wrong stage means, in the words of the summary table.
CATEGORY = {"head": "head outputs", "anchors": "anchors", "preprocess": "targets", "decode": "head decode", "assign": "assigner",
            "assigner": "assigner", "normalize": "normalizer", "classify": "loss math", "box": "loss math",
            "gains": "gain", "output": "batch scaling"}
DISCRETE = ("mask_in_gts", "mask_pos", "fg_mask", "target_gt_idx", "target_labels")
AFTER_ASSIGNMENT = ("normalize", "classify", "box", "gains", "output")
# The assignment's outputs that the loss uses: when they are equal, its intermediates changed nothing.
SUMMARY_EXTRAS = ("intermediates", "return_shape")  # per-case facts kept beside the stage table, not in it
DECISIVE = ("fg_mask", "target_gt_idx", "target_scores", "target_bboxes")
# Defined by ultralytics only for anchor-box pairs with the anchor inside the box (zero elsewhere).
PAIR_DEFINED = ("align_metric", "overlaps")
# Intermediates that may differ by float noise when the decisive outputs are equal.
NOISE_TOLERANT = ("align_metric", "overlaps", "pd_bboxes")


# ------------------------------------------------------------------------------------------- the spec
@dataclass
class LossSpec:
    """What a candidate loss factory is told about the reference it will be compared with."""

    nc: int
    reg_max: int
    strides: tuple[float, ...]
    end2end: bool
    branches: tuple[str, ...]
    batch_size: int
    imgsz: tuple[int, int]
    feat_shapes: list[tuple[int, int]]
    hyperparameters: dict
    branch_weights: dict
    config: LossConfig
    manifest: dict = field(repr=False, default_factory=dict)

    @classmethod
    def from_dump(cls, dump: Dump) -> "LossSpec":
        model = dump.model
        if "nc" not in model or "head_index" not in model:
            raise ParityError(f"{dump.path}: the manifest's `model` section lacks nc/head_index; a loss comparison "
                              f"needs a reference dump (docs/dump-format.md)")
        head = int(model["head_index"])
        end2end = bool(model.get("end2end", False))
        branches = tuple((dump.manifest.get("loss") or {}).get("branches") or (names.E2E_BRANCHES if end2end else ()))
        scores = names.act(head, branches[0], "scores") if end2end else names.act(head, "scores")
        if scores not in dump:
            raise ParityError(f"{dump.path}: no {scores}: the loss replay needs the head's train outputs")
        batch_size = int(dump.index[scores]["shape"][0])
        feat_shapes = _feature_shapes(dump, head)
        strides = tuple(float(s) for s in model.get("strides", (8, 16, 32)))
        if names.batch_img() in dump:
            imgsz = tuple(int(v) for v in dump.index[names.batch_img()]["shape"][2:])
        else:
            imgsz = (int(feat_shapes[0][0] * strides[0]), int(feat_shapes[0][1] * strides[0]))
        loss = dump.manifest.get("loss") or {}
        return cls(nc=int(model["nc"]), reg_max=int(model.get("reg_max", 16)), strides=strides, end2end=end2end,
                   branches=branches, batch_size=batch_size, imgsz=imgsz, feat_shapes=feat_shapes,
                   hyperparameters=dict(dump.manifest.get("hyperparameters") or {}),
                   branch_weights=dict(loss.get("branch_weights") or {}),
                   config=LossConfig.from_manifest(dump.manifest), manifest=dump.manifest)

    @property
    def gains(self) -> tuple[float, float, float]:
        return self.config.gains

    def branch_weight(self, branch: str | None) -> float | None:
        if branch is None:
            return None
        default = {"one2many": 0.8, "one2one": 1.0 - 0.8}
        return float(self.branch_weights.get(branch, default[branch]))


def _feature_shapes(dump: Dump, head: int) -> list[tuple[int, int]]:
    """(H, W) of each level: the outputs of the layers feeding the head (feats are not stored)."""
    layers = dump.layers
    if head < len(layers) and layers[head].get("from"):
        shapes = []
        for source in layers[head]["from"]:
            shape = (layers[source].get("outputs") or {}).get(names.act(source))
            if shape is None and names.act(source) in dump:
                shape = dump.index[names.act(source)]["shape"]
            if shape is None:
                break
            shapes.append((int(shape[2]), int(shape[3])))
        else:
            return shapes
    # Fall back: square levels at the strides, from the image size.
    img = dump.index.get(names.batch_img())
    if img is None:
        raise ParityError(f"{dump.path}: cannot tell the head's feature map sizes (no layer table, no batch.img)")
    h, w = img["shape"][2:]
    return [(int(h // s), int(w // s)) for s in dump.model.get("strides", (8, 16, 32))]


# -------------------------------------------------------------------------------------------- adapter
@dataclass
class CandidateResult:
    terms: torch.Tensor | None  # (3,) box, cls, dfl as returned, or None when only a total was returned
    total: torch.Tensor
    items: torch.Tensor | None
    tensors: dict[str, torch.Tensor]
    form: str = ""  # how the return value was read, in words ("a tuple of three scalars (box, cls, dfl)")
    per_gain: bool = False  # terms come from calls with one gain at a time (a scalar-only loss)


# Column layouts of a single (N, 6) label tensor, as ports pass them: `img` image index, `cls` class, then the
# box in the named format (`normalized` says fractions or pixels).
LABEL_LAYOUTS = ("img,cls,xywh", "img,cls,xyxy", "img,xywh,cls", "img,xyxy,cls")
LEVEL_ORDERS = {"fine-first": "fine-first", "p3-first": "fine-first", "coarse-first": "coarse-first",
                "p5-first": "coarse-first"}
# Names a loss may give its terms in a returned dict or object (ultralytics' own `loss_names` included).
TERM_ALIASES = {"box": ("box", "box_loss", "loss_box", "iou", "loss_iou", "lbox"),
                "cls": ("cls", "cls_loss", "loss_cls", "lcls"),
                "dfl": ("dfl", "dfl_loss", "loss_dfl", "ldfl")}
RETURN_SHAPES = ("a (3,) loss vector; a tuple/list of three scalars (box, cls, dfl); (vector or scalar, items); "
                 "(vector or scalar, items, {name: tensor}); a dict or object with box/cls/dfl or loss/items/"
                 "tensors; a scalar (docs/loss-adapter.md)")


class LossAdapter:
    """How to drive a candidate loss: docs/loss-adapter.md describes every option.

    loss          callable(preds, batch) -> any return shape of RETURN_SHAPES (`read_loss_return`)
    predictions   "dict": {"boxes": (B, 4*reg_max, A), "scores": (B, nc, A), "feats": [...]} (ultralytics 8.4);
                  "levels": a list of (B, 4*reg_max + nc, H, W) maps (ultralytics 8.3 and most ports)
    level_order   "fine-first" / "P3-first" (the reference's order) or "coarse-first" / "P5-first"
    targets       "xywh" or "xyxy" boxes in the batch dict, or a column layout of one (N, 6) label tensor
                  (LABEL_LAYOUTS, e.g. "img,xyxy,cls"); `normalized` True for fractions of the image, False for pixels
    batch_scaled  True: the loss vector is multiplied by the batch size (ultralytics); False: per-image mean
    terms         order of the returned vector's terms, names from ("box", "cls", "dfl")
    stages        {stage: fn(**inputs) -> {name: tensor}} under the dump's stage and tensor names
                  (end-to-end heads: {branch: {stage: fn}}); `assigner` is the assigner alone
    batch_fn      optional callable(converted batch) -> whatever the loss takes as its batch
    preds_fn      optional callable(head dict) -> whatever the loss takes as predictions
    with_gains    optional callable((box, cls, dfl) gains) -> the same loss built with those gains: a loss that
                  returns only a scalar still gets per-term verdicts (set automatically for a factory that
                  takes the gains)
    """

    def __init__(self, loss: Callable | None = None, *, predictions: str = "dict", level_order: str = "fine-first",
                 targets: str = "xywh", normalized: bool = True, batch_scaled: bool = True,
                 terms: Sequence[str] = TERMS, stages: Mapping | None = None, name: str | None = None,
                 batch_fn: Callable | None = None, preds_fn: Callable | None = None,
                 with_gains: Callable | None = None):
        if predictions not in ("dict", "levels"):
            raise ParityError(f"loss adapter: predictions={predictions!r}, expected 'dict' or 'levels'")
        if str(level_order).lower() not in LEVEL_ORDERS:
            raise ParityError(f"loss adapter: level_order={level_order!r}, expected 'fine-first' (P3-first) or "
                              f"'coarse-first' (P5-first)")
        layout = str(targets).replace(" ", "").lower()
        if layout not in ("xywh", "xyxy", *LABEL_LAYOUTS):
            raise ParityError(f"loss adapter: targets={targets!r}, expected 'xywh', 'xyxy' or one of "
                              f"{', '.join(repr(v) for v in LABEL_LAYOUTS)}")
        unknown = [t for t in terms if t not in TERMS]
        if unknown or len(set(terms)) != len(terms) or len(terms) != len(TERMS):
            raise ParityError(f"loss adapter: terms={list(terms)}, expected an order of {', '.join(TERMS)}")
        if not isinstance(normalized, bool):
            raise ParityError(f"loss adapter: normalized={normalized!r}, expected True (fractions of the image) "
                              f"or False (pixels)")
        self.loss = loss
        self.predictions = predictions
        self.level_order = LEVEL_ORDERS[str(level_order).lower()]
        self.targets = layout
        self.normalized = normalized
        self.batch_scaled = batch_scaled
        self.terms = tuple(terms)
        self.stages = dict(stages or {})
        self.name = name or getattr(loss, "__name__", None) or type(loss).__name__
        self.batch_fn = batch_fn
        self.preds_fn = preds_fn
        self.with_gains = with_gains

    # -- stages
    def stage(self, name: str, branch: str | None = None) -> Callable | None:
        table = self.stages.get(branch, {}) if branch is not None and branch in self.stages else self.stages
        fn = table.get(name) if isinstance(table, Mapping) else None
        return fn if callable(fn) else None

    def exposed(self, branch: str | None = None) -> list[str]:
        return [s for s in REPLAY_STAGES if self.stage(s, branch) is not None]

    # -- inputs
    def convert_preds(self, head: dict, spec: LossSpec) -> Any:
        """head: {"boxes", "scores"} (or {branch: {...}}), reference layout. Differentiable conversions only."""
        if self.preds_fn is not None:
            return self.preds_fn(head)
        if spec.end2end:
            return {b: self._one_head(head[b], spec) for b in spec.branches}
        return self._one_head(head, spec)

    def _one_head(self, head: dict, spec: LossSpec) -> Any:
        coarse_first = self.level_order == "coarse-first"
        shapes = list(spec.feat_shapes)
        if self.predictions == "dict":
            boxes, scores = head["boxes"], head["scores"]
            if coarse_first:  # the anchor axis too: coarsest level's anchors first
                boxes, scores = (torch.cat(_split_levels(t, shapes)[::-1], -1) for t in (boxes, scores))
                shapes = shapes[::-1]
            feats = [torch.zeros(spec.batch_size, 1, h, w) for h, w in shapes]
            return {"boxes": boxes, "scores": scores, "feats": feats, "feat_shapes": shapes}
        levels = []
        for (h, w), boxes, scores in zip(shapes, _split_levels(head["boxes"], shapes),
                                         _split_levels(head["scores"], shapes)):
            level = torch.cat((boxes, scores), 1)
            levels.append(level.reshape(level.shape[0], level.shape[1], h, w))
        return levels[::-1] if coarse_first else levels

    def convert_batch(self, batch: dict, spec: LossSpec) -> Any:
        """The reference batch (normalized xywh, sorted batch_idx) in the layout the candidate declared."""
        boxes = batch["bboxes"]
        if "xyxy" in self.targets:
            centre, half = boxes[:, :2], boxes[:, 2:] / 2
            boxes = torch.cat((centre - half, centre + half), 1)
        if not self.normalized:
            h, w = spec.imgsz
            boxes = boxes * torch.tensor([w, h, w, h], dtype=boxes.dtype)
        if "," in self.targets:
            columns = {"img": batch["batch_idx"].reshape(-1, 1).to(boxes.dtype),
                       "cls": batch["cls"].reshape(-1, 1).to(boxes.dtype), "xywh": boxes, "xyxy": boxes}
            out: Any = torch.cat([columns[c] for c in self.targets.split(",")], 1)
        else:
            out = {**batch, "bboxes": boxes}
        return self.batch_fn(out) if self.batch_fn is not None else out

    # -- the call
    def call(self, preds: Any, batch: Any) -> CandidateResult:
        if self.loss is None:
            raise ParityError(f"loss candidate {self.name}: the adapter has no loss callable, only stages")
        return self.parse(self.loss(preds, batch))

    def parse(self, value: Any) -> CandidateResult:
        """The candidate's return value, copied (a candidate that later changes a tensor in place cannot change
        what is compared), read by types and shapes (`read_loss_return`)."""
        return read_loss_return(value, self.terms, self.name)


def _coarse_first_order(shapes: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Anchor indices in coarse-first order: position i of a P5-first candidate is reference anchor perm[i]."""
    sizes = [int(h) * int(w) for h, w in shapes]
    return torch.cat(list(torch.arange(sum(sizes)).split(sizes))[::-1])


def _split_levels(flat: torch.Tensor, shapes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """(B, C, A) -> per level (B, C, h*w), finest first."""
    out, start = [], 0
    for h, w in shapes:
        out.append(flat[..., start:start + h * w])
        start += h * w
    return out


# ------------------------------------------------------------------------------------- return values
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_scalar(value: Any) -> bool:
    return _is_number(value) or (isinstance(value, torch.Tensor) and value.numel() == 1)


def _is_vector(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.numel() == 3 and value.dim() <= 2


def _describe(value: Any, depth: int = 0) -> str:
    """What a candidate returned, in a few words: `tuple(tensor (3,), dict{box, cls})`."""
    if isinstance(value, torch.Tensor):
        return f"tensor {tuple(value.shape)}"
    if _is_number(value):
        return type(value).__name__
    if isinstance(value, Mapping):
        keys = list(value)[:6]
        return "dict{" + ", ".join(str(k) for k in keys) + (", ..." if len(value) > 6 else "") + "}"
    if isinstance(value, (tuple, list)):
        if depth:
            return f"{type(value).__name__} of {len(value)}"
        return f"{type(value).__name__}(" + ", ".join(_describe(v, 1) for v in value[:5]) + (
            ", ..." if len(value) > 5 else "") + ")"
    return type(value).__name__


def _copy(value: Any) -> Any:
    """A tensor the comparison owns: the candidate may change its own tensor in place after returning it.
    Autograd history is kept (the gradient rows differentiate the copy)."""
    if isinstance(value, torch.Tensor):
        return value.clone() if value.requires_grad else value.detach().clone()
    return torch.tensor(float(value), dtype=torch.float32) if _is_number(value) else value


def _term_lookup(get: Callable[[str], Any]) -> dict[str, Any] | None:
    found = {}
    for term, aliases in TERM_ALIASES.items():
        for alias in aliases:
            value = get(alias)
            if value is not None:
                found[term] = value
                break
    return found if len(found) == len(TERMS) else None


def _as_items(items: Any, order: Sequence[str]) -> torch.Tensor | None:
    """The detached items (what the loss logs), in box, cls, dfl order when there are three."""
    if items is None:
        return None
    if isinstance(items, Mapping):
        terms = _term_lookup(items.get)
        values = [terms[t] for t in TERMS] if terms else list(items.values())
        if not values or not all(_is_scalar(v) for v in values):
            return None
        return torch.stack([torch.as_tensor(v).detach().reshape(()).float() for v in values]).clone()
    if isinstance(items, (tuple, list)) and items and all(_is_scalar(v) for v in items):
        items = torch.stack([torch.as_tensor(v).detach().reshape(()).float() for v in items])
    if not isinstance(items, torch.Tensor):
        return None
    items = items.detach().clone()
    if items.numel() == 3:
        flat = items.reshape(3)
        return torch.stack([flat[order.index(t)] for t in TERMS])
    return items


def _loss_value(value: Any, order: Sequence[str]) -> tuple[torch.Tensor | None, torch.Tensor, str] | None:
    """(terms in box, cls, dfl order, total, words) of a loss value, or None when it is not one."""
    if _is_vector(value):
        flat = _copy(value).reshape(3)
        terms = torch.stack([flat[order.index(t)] for t in TERMS])
        return terms, terms.sum(), f"a (3,) loss vector ({', '.join(order)})"
    if _is_scalar(value):
        total = _copy(value).reshape(())
        return None, total, "a scalar (the total only)"
    getter = value.get if isinstance(value, Mapping) else None
    if getter is None and not isinstance(value, (tuple, list, torch.Tensor)) and not _is_number(value):
        getter = lambda key: getattr(value, key, None)  # noqa: E731 - an object with term attributes
    if getter is not None:
        terms = _term_lookup(getter)
        if terms and all(_is_scalar(v) for v in terms.values()):
            stacked = torch.stack([_copy(terms[t]).reshape(()) for t in TERMS])
            kind = "a dict" if isinstance(value, Mapping) else f"a {type(value).__name__} object"
            return stacked, stacked.sum(), f"{kind} of the terms box, cls, dfl"
    return None


def read_loss_return(value: Any, order: Sequence[str] = TERMS, label: str = "loss") -> CandidateResult:
    """Read a candidate loss's return value by types and shapes, never by position alone:

    * a tensor of 3 elements: the loss vector, in `order`; a one-element tensor or a number: the total only;
    * a tuple/list of three scalars: (box, cls, dfl) in `order`;
    * (loss, items) and (loss, items, {name: tensor}) with `loss` a vector, scalar or dict of terms;
    * a dict or object with the three terms (also `box_loss`, `loss_cls`, ...), or with `loss` (and `items`,
      `tensors`/`intermediates`), like ultralytics' `LossRun`.

    Anything else, or a tuple that fits no reading on its own, is a ParityError that says what was received.
    Every tensor is copied first: a candidate that changes its tensors in place later cannot change the verdict.
    """
    received = _describe(value)

    def fail(why: str) -> ParityError:
        return ParityError(f"loss candidate {label}: returned {received}: {why}; a loss may return {RETURN_SHAPES}")

    direct = _loss_value(value, order)
    if direct is not None:
        terms, total, words = direct
        if isinstance(value, Mapping) or not isinstance(value, (torch.Tensor, tuple, list)) and not _is_number(value):
            get = value.get if isinstance(value, Mapping) else (lambda k: getattr(value, k, None))
            items = _as_items(get("items"), order)
            tensors = {k: _copy(v) for k, v in dict(get("tensors") or get("intermediates") or {}).items()}
            return CandidateResult(terms, total, items, tensors, words)
        return CandidateResult(terms, total, None, {}, words)
    if isinstance(value, torch.Tensor):
        raise fail("a loss tensor must hold 3 elements (box, cls, dfl) or one (the total)")
    if isinstance(value, Mapping) or not isinstance(value, (tuple, list)):
        get = value.get if isinstance(value, Mapping) else (lambda k: getattr(value, k, None))
        if get("loss") is None:
            raise fail("no terms box, cls, dfl and no `loss` in it")
        inner = _loss_value(get("loss"), order)
        if inner is None:
            raise fail(f"its `loss` is {_describe(get('loss'))}, not a loss vector, scalar or dict of terms")
        tensors = get("tensors")
        tensors = tensors if tensors is not None else get("intermediates")
        if tensors is not None and not isinstance(tensors, Mapping):
            raise fail(f"its intermediates are {_describe(tensors)}, expected a dict {{name: tensor}}")
        terms, total, words = inner
        kind = "a dict" if isinstance(value, Mapping) else f"a {type(value).__name__} object"
        return CandidateResult(terms, total, _as_items(get("items"), order),
                               {k: _copy(v) for k, v in dict(tensors or {}).items()}, f"{kind} with loss = {words}")
    # a tuple or list
    n = len(value)
    if n == 3 and all(_is_scalar(v) for v in value):
        terms = torch.stack([_copy(value[order.index(t)]).reshape(()) for t in TERMS])
        return CandidateResult(terms, terms.sum(), None, {}, f"a {type(value).__name__} of three scalars "
                                                            f"({', '.join(order)})")
    if n in (2, 3):
        inner = _loss_value(value[0], order)
        if inner is None:
            raise fail(f"its first element ({_describe(value[0], 1)}) is not a loss vector, scalar or dict of terms, "
                       f"so it is not (loss, items{', intermediates' if n == 3 else ''})")
        items = value[1]
        if items is not None and not (isinstance(items, (torch.Tensor, Mapping)) or _is_number(items) or (
                isinstance(items, (tuple, list)) and all(_is_scalar(v) for v in items))):
            raise fail(f"its second element ({_describe(items, 1)}) is not items (a tensor, numbers or a dict)")
        tensors = value[2] if n == 3 else None
        if n == 3 and not isinstance(tensors, Mapping):
            raise fail(f"its third element ({_describe(tensors, 1)}) is neither a scalar (for (box, cls, dfl)) "
                       f"nor a dict of intermediates (for (loss, items, intermediates))")
        terms, total, words = inner
        shape = "(loss, items, intermediates)" if n == 3 else "(loss, items)"
        return CandidateResult(terms, total, _as_items(items, order),
                               {k: _copy(v) for k, v in dict(tensors or {}).items()}, f"{shape} with loss = {words}")
    raise fail(f"a {type(value).__name__} of {n} fits no reading")


# ----------------------------------------------------------------------------- candidate code, defensively
def _copy_input(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, list):
        return [tuple(v) if isinstance(v, tuple) else v for v in value]
    return value


def _mutated_inputs(originals: Mapping[str, Any], given: Mapping[str, Any]) -> list[str]:
    """Inputs the candidate changed in place (it was given copies, so nothing of the reference moved)."""
    out = []
    for key, original in originals.items():
        copy = given.get(key)
        if isinstance(original, torch.Tensor) and isinstance(copy, torch.Tensor) and copy.shape == original.shape:
            same = (copy.detach() == original) | (torch.isnan(copy.detach()) & torch.isnan(original)) \
                if original.is_floating_point() else copy.detach() == original
            if not bool(same.all()):
                out.append(key)
    return out


_HARNESS_PATHS = tuple(str(p) for p in (Path(torch.__file__).resolve().parent, Path(__file__).resolve().parents[1],
                                        Path(sysconfig.get_paths()["stdlib"]).resolve()))


def _own_frame(error: BaseException) -> str | None:
    """`file:line (in function)` of the innermost traceback frame in the candidate's own code (not torch, not
    the harness, not the standard library)."""
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        path = str(Path(frame.filename).resolve())
        if path.startswith(_HARNESS_PATHS) or frame.filename.startswith("<"):
            continue
        try:
            shown = str(Path(path).relative_to(Path.cwd()))
        except ValueError:
            shown = path
        return f"{shown}:{frame.lineno} (in {frame.name})"
    return None


def _own_frame_suffix(error: BaseException) -> str:
    at = _own_frame(error)
    return f" at {at}" if at else ""


def candidate_exception(error: BaseException, call: str) -> dict:
    """What a finding needs of an exception raised by candidate code: the call, type, message, own frame."""
    message = " ".join(str(error).split())
    return {"call": call, "type": type(error).__name__, "message": message[:300], "at": _own_frame(error)}


def _exception_words(exception: dict) -> str:
    text = f"{exception['type']}: {exception['message']}"
    return text + (f" at {exception['at']}" if exception.get("at") else "")


def builtin_loss_adapter(spec: LossSpec, inject: str | None = None) -> LossAdapter:
    """The clean-room loss (`parity.reimpl.loss`), every stage exposed; `inject` plants a known cause
    (`parity.causes`) into it from outside."""
    try:
        loss = build_loss(spec.manifest)
        if inject:
            from parity.causes import plant_loss

            plant_loss(loss, inject)
    except KeyError as error:
        raise ParityError(str(error).strip("'\"")) from None
    except ValueError as error:
        raise ParityError(str(error)) from None
    if spec.end2end:
        stages = {b: {s: loss.branch(b).stage(s) for s in STAGE_INPUTS if s != "output"} for b in spec.branches}
    else:
        stages = {s: loss.stage(s) for s in STAGE_INPUTS}
    return LossAdapter(loss.run, predictions="dict", stages=stages,
                       name="builtin" + (f" (inject {inject})" if inject else ""))


def load_loss_candidate(candidate: Any, spec: LossSpec, *, inject: str | None = None) -> LossAdapter:
    """`builtin`, `package.module:factory` (factory(spec) or factory(nc=..., reg_max=..., strides=...)),
    a LossAdapter, or a plain callable loss."""
    if isinstance(candidate, LossAdapter):
        return candidate
    if candidate is None or candidate == "builtin":
        return builtin_loss_adapter(spec, inject)
    if inject:
        raise ParityError("--inject plants a bug in the built-in candidate; it cannot be combined with a user loss")
    if isinstance(candidate, str):
        factory, module = _import(candidate)
        made = _call_factory(factory, spec, candidate)
        options = getattr(module, "LOSS_ADAPTER", None) or {}
        adapter = _as_adapter(made, options, candidate)
        if adapter.with_gains is None and _takes_gains(factory):
            adapter.with_gains = _rebuild_with_gains(factory, spec, options, candidate)
        return adapter
    if callable(candidate):
        return _as_adapter(candidate, {}, getattr(candidate, "__name__", type(candidate).__name__))
    raise ParityError(f"loss candidate {candidate!r}: expected 'builtin', 'package.module:factory' or a LossAdapter")


def _import(spec: str):
    from parity.replay.candidates import import_factory

    return import_factory(spec, "loss candidate", "'builtin' or 'package.module:factory'")


# Factory parameters filled from the reference: the spec itself, or these of its fields (gains by term name).
FACTORY_PARAMETERS = ("nc", "reg_max", "strides", "hyperparameters", "end2end", "gains", "box", "cls", "dfl")
GAIN_PARAMETERS = ("spec", "hyperparameters", "gains", "box", "cls", "dfl")


def _parameters(factory: Callable) -> Mapping:
    try:
        return inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return {}


def _takes_gains(factory: Callable) -> bool:
    params = _parameters(factory)
    required = [p for p in params.values() if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY,
                                                                                  p.POSITIONAL_OR_KEYWORD)]
    return any(p in params for p in GAIN_PARAMETERS) or (not any(k in params for k in FACTORY_PARAMETERS)
                                                         and len(required) == 1)


def _call_factory(factory: Callable, spec: LossSpec, label: str) -> Any:
    params = _parameters(factory)
    values = {"nc": spec.nc, "reg_max": spec.reg_max, "strides": spec.strides, "end2end": spec.end2end,
              "hyperparameters": spec.hyperparameters, "gains": spec.gains, "box": spec.gains[0],
              "cls": spec.gains[1], "dfl": spec.gains[2]}
    kwargs = {k: values[k] for k in FACTORY_PARAMETERS if k in params}
    try:
        if "spec" in params:
            return factory(spec=spec, **kwargs)
        if kwargs:
            return factory(**kwargs)
        required = [p for p in params.values() if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY,
                                                                                      p.POSITIONAL_OR_KEYWORD)]
        return factory(spec) if required else factory()
    except ParityError:
        raise
    except Exception as error:  # noqa: BLE001 - a user factory may raise anything; say whose it was
        raise ParityError(f"loss candidate {label}: the factory raised {type(error).__name__}: {error}"
                          f"{_own_frame_suffix(error)}") from None


def _rebuild_with_gains(factory: Callable, spec: LossSpec, options: Mapping, label: str) -> Callable:
    """gains -> the candidate's loss built by its own factory with those gains (spec, hyperparameters and the
    manifest's hyperparameters all carry them)."""
    def build(gains: Sequence[float]) -> Callable:
        box, cls, dfl = (float(g) for g in gains)
        hyp = {**spec.hyperparameters, "box": box, "cls": cls, "dfl": dfl}
        manifest = {**spec.manifest, "hyperparameters": {**(spec.manifest.get("hyperparameters") or {}), **hyp}}
        other = replace(spec, hyperparameters=hyp, config=replace(spec.config, box=box, cls=cls, dfl=dfl),
                        manifest=manifest)
        return _as_adapter(_call_factory(factory, other, label), options, label).loss

    return build


ADAPTER_OPTIONS = tuple(p for p in inspect.signature(LossAdapter.__init__).parameters if p not in ("self", "loss"))


def _as_adapter(made: Any, options: Mapping, label: str) -> LossAdapter:
    if isinstance(made, LossAdapter):
        if made.name in (None, "", "function"):
            made.name = label
        return made
    options = {**dict(options), **dict(getattr(made, "loss_adapter", None) or {})}
    if not callable(made):
        raise ParityError(f"loss candidate {label}: the factory returned {type(made).__name__}, not a callable loss")
    unknown = [k for k in options if k not in ADAPTER_OPTIONS]
    if unknown:
        raise ParityError(f"loss candidate {label}: unknown adapter option(s) {', '.join(map(repr, unknown))} in "
                          f"LOSS_ADAPTER / loss_adapter; options: {', '.join(ADAPTER_OPTIONS)}")
    options = dict(options)
    return LossAdapter(made, name=options.pop("name", label), **options)


class RecordedLoss:
    """A candidate DUMP (docs/dump-format.md; a port in any language): its own loss tensors, recorded under the
    dump's names, instead of code to run. `manifest.loss.batch_scaled: false` declares a per-image-mean
    `output.loss`."""

    level_order = "fine-first"  # a recorded dump stores the reference's layout
    with_gains = None

    def __init__(self, dump: Dump):
        self.dump = dump
        self.name = str(dump.path)
        self.batch_scaled = bool((dump.manifest.get("loss") or {}).get("batch_scaled", True))
        self.loss = None

    def exposed(self, branch: str | None = None) -> list[str]:
        """Stages with at least one recorded output (in any case)."""
        recorded = set()
        for name in self.dump.names("loss."):
            parts = name.split(".")[2:]
            if branch and parts and parts[0] == branch:
                parts = parts[1:]
            elif parts and parts[0] in names.E2E_BRANCHES:
                continue
            if parts:
                recorded.add(parts[0])
        return [s for s in REPLAY_STAGES if REFERENCE_STAGE.get(s, s) in recorded]


def _as_candidate_dump(candidate: Any) -> Dump | None:
    if isinstance(candidate, Dump):
        return candidate
    if isinstance(candidate, (str, Path)) and Path(candidate).is_dir() and (Path(candidate) / "manifest.json").exists():
        return Dump(candidate)
    return None


# ---------------------------------------------------------------------------------------- reference view
class _Case:
    """One dump's tensors for one loss case, by stage and name (the reference's, or a candidate dump's, whose
    missing batch tensors and head index come from `fallback`, the reference)."""

    def __init__(self, dump: Dump, spec: LossSpec, case: str, fallback: Dump | None = None):
        self.dump, self.spec, self.case, self.fallback = dump, spec, case, fallback
        self.head_index = int((fallback or dump).model["head_index"])

    def _get(self, name: str) -> torch.Tensor:
        if name not in self.dump and self.fallback is not None and name.startswith("batch."):
            return self.fallback.get(name)
        return self.dump.get(name)

    def name(self, stage: str, tensor: str, branch: str | None = None) -> str:
        if stage == "output":
            return names.loss_output(self.case, tensor)
        return names.loss(self.case, stage, tensor, branch)

    def ref(self, stage: str, tensor: str, branch: str | None = None) -> torch.Tensor | None:
        return self.dump.get_optional(self.name(stage, tensor, branch))

    def head(self, branch: str | None) -> dict[str, torch.Tensor]:
        path = (branch,) if branch else ()
        return {o: self.dump.get(names.act(self.head_index, *path, o)) for o in names.HEAD_OUTPUTS}

    def has_head(self, branch: str | None) -> bool:
        path = (branch,) if branch else ()
        return all(names.act(self.head_index, *path, o) in self.dump for o in names.HEAD_OUTPUTS)

    def batch(self) -> dict[str, torch.Tensor]:
        out = {f: self._get(names.batch_target(self.case, f)) for f in ("cls", "bboxes", "batch_idx")}
        if names.batch_img() in self.dump or (self.fallback is not None and names.batch_img() in self.fallback):
            out["img"] = self._get(names.batch_img())
        return out

    def given(self, branch: str | None) -> dict[str, Any]:
        """Stage inputs that come from the head and the batch rather than from an earlier stage."""
        batch = self.batch()
        h, w = self.spec.imgsz
        return {"feat_shapes": list(self.spec.feat_shapes), "batch_size": self.spec.batch_size,
                "imgsz": torch.tensor([h, w], dtype=torch.float32), **self.head(branch),
                "batch_idx": batch["batch_idx"], "cls": batch["cls"], "bboxes": batch["bboxes"]}

    def stage_inputs(self, stage: str, branch: str | None) -> dict[str, Any]:
        given = self.given(branch)
        out = {}
        for name in STAGE_INPUTS[stage]:
            source = INPUT_SOURCES[name]
            group, tensor = source.split(".", 1)
            if group in ("head", "batch"):
                out[name] = given[name]
                continue
            value = self.ref(group, tensor, branch)
            if value is None:
                raise KeyError(self.name(group, tensor, branch))
            out[name] = value
        return out


# --------------------------------------------------------------------------------------------- compare
def compare_loss(reference: Dump | str | Path, candidate_loss: Any = "builtin", *,
                 profile: str | Profile | None = None, cases: Sequence[str] | None = None, progress: bool = True,
                 inject: str | None = None) -> Report:
    """Compare a candidate loss with the reference dump's loss: stage cross-replay, end to end, gradients.

    candidate_loss: "builtin", "package.module:factory", a LossAdapter, a callable loss, or a candidate dump
    (directory or Dump) holding the loss tensors a port recorded. Returns a Report (rows per case and stage, findings from `parity.diagnose.loss`).
    """
    from parity.dump.layouts import in_current_layout

    # an ultralytics <= 8.3 reference stores the head per level: read it in the 8.4 boxes/scores layout
    dump = in_current_layout(reference if isinstance(reference, Dump) else Dump(reference))
    spec = LossSpec.from_dump(dump)
    recorded = _as_candidate_dump(candidate_loss)
    if recorded is not None and inject:
        raise ParityError("--inject plants a bug in the built-in candidate; a candidate dump is compared as recorded")
    adapter = RecordedLoss(recorded) if recorded is not None else load_loss_candidate(candidate_loss, spec,
                                                                                       inject=inject)
    profile = get_profile(profile or profile_for_environment(dump.manifest.get("environment"),
                                                             dump.config.get("precision")))
    present = [c["name"] if isinstance(c, Mapping) else str(c) for c in (dump.manifest.get("loss") or {}).get("cases", [])]
    if not present:
        raise ParityError(f"{dump.path}: the manifest lists no loss cases (manifest.loss.cases)")
    chosen = list(cases) if cases else present
    missing = [c for c in chosen if c not in present]
    if missing:
        raise ParityError(f"loss case(s) {', '.join(missing)} not in {dump.path} (it has {', '.join(present)})")

    report = Report(command="compare --what loss", reference=str(dump.path), candidate=adapter.name,
                    profile=profile.name)
    evidence = LossEvidence(gains=spec.gains, batch_scaled=adapter.batch_scaled,
                            tolerance=profile.for_kind("loss"))
    summary: dict[str, dict[str, str]] = {}
    with _progress(progress, len(chosen)) as advance:
        for case in chosen:
            advance(f"loss case {case}")
            kind = _RecordedCaseReplay if isinstance(adapter, RecordedLoss) else _CaseReplay
            replay = kind(dump, spec, adapter, profile, report, case)
            evidence.cases.append(replay.run())
            summary[case] = replay.summary
    diagnose_loss(evidence, report)

    branches = list(spec.branches) or [None]
    report.coverage["loss"] = {
        "cases": chosen,
        "stages_exposed": {str(b or "all"): adapter.exposed(b) for b in branches},
        "stages_not_exposed": {str(b or "all"): [s for s in REPLAY_STAGES if s not in adapter.exposed(b)]
                               for b in branches},
        "intermediates_returned": sorted(set().union(*[set(s.get("intermediates", [])) for s in summary.values()]))
        if summary else [],
        "batch_convention": _convention(adapter, spec),
        "return_shape": sorted({s["return_shape"] for s in summary.values() if s.get("return_shape")}),
    }
    report.context["loss"] = {
        "criterion": (dump.manifest.get("loss") or {}).get("criterion"),
        "end2end": spec.end2end,
        "stages": {case: {k: v for k, v in s.items() if k not in SUMMARY_EXTRAS} for case, s in summary.items()},
        "first_wrong_stage": first_wrong_stage(report),
        "categories": CATEGORY,
    }
    return report


def _convention(adapter: "LossAdapter | RecordedLoss", spec: LossSpec) -> str:
    if adapter.batch_scaled:
        return f"loss vector multiplied by the batch size (B = {spec.batch_size}), as ultralytics returns it"
    return (f"candidate declares the per-image mean (batch_scaled=False); its values and gradients are multiplied "
            f"by B = {spec.batch_size} before comparison, and every such row says so")


def first_wrong_stage(report: Report) -> dict | None:
    for row in report.rows:
        if not row.passed and row.section.startswith("loss/"):
            stage = row.where.split(" (")[0].split()[-1]
            return {"section": row.section, "stage": stage, "category": CATEGORY.get(stage, stage), "name": row.name}
    return None


def stage_table_key(row) -> tuple[str, str] | None:
    """(case, key in the stage table) of a loss row: rows read `loss/{case}[ end-to-end]` and `[{branch} ]{stage}
    ({category})` (`_CaseReplay.where`); end-to-end rows all count under `end-to-end`."""
    if not row.section.startswith("loss/"):
        return None
    case, _, part = row.section[len("loss/"):].partition(" ")
    if part == "end-to-end":
        return case, "end-to-end"
    return case, ".".join(row.where.split(" (")[0].split())


def mark_drifted_stages(report: Report) -> None:
    """After rows were explained as release drift (`compare --old-reference`), a stage that failed only through
    such rows reads `drift` in the stage table, and the first wrong stage is found again."""
    loss = report.context.get("loss")
    if not loss:
        return
    still_failing = {stage_table_key(row) for row in report.failed_rows}
    for case, stages in (loss.get("stages") or {}).items():
        for key, verdict in stages.items():
            if verdict == "fail" and (case, key) not in still_failing:
                stages[key] = "drift"
    loss["first_wrong_stage"] = first_wrong_stage(report)


class _progress:
    def __init__(self, enabled: bool, total: int):
        self.enabled = enabled and sys.stderr.isatty()
        self.total = total
        self.bar = None

    def __enter__(self):
        if not self.enabled:
            return lambda step: None
        from rich.progress import Progress

        self.bar = Progress(transient=True)
        self.bar.__enter__()
        task = self.bar.add_task("loss replay", total=self.total)

        def advance(step: str) -> None:
            self.bar.update(task, description=step)
            self.bar.advance(task)

        return advance

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)


# ------------------------------------------------------------------------------------------- one case
class _CaseReplay:
    def __init__(self, dump: Dump, spec: LossSpec, adapter: LossAdapter, profile: Profile, report: Report,
                 case: str):
        self.dump, self.spec, self.adapter, self.profile, self.report = dump, spec, adapter, profile, report
        self.case = case
        self.ref = _Case(dump, spec, case)
        self.evidence = CaseEvidence(case, spec.batch_size)
        self.branches = list(spec.branches) or [None]
        self.summary: dict[str, Any] = {}
        self.section = f"loss/{case}"
        # stages whose conditioned replay passed, per branch (decides whether near-tie explanations hold)
        self.conditioned_ok: dict[tuple[str | None, str], bool] = {}
        # the end-to-end run's assignment against the reference's, per branch
        self.evidence_diff: dict[str | None, AssignmentDiff | None] = {}

    def run(self) -> CaseEvidence:
        for branch in self.branches:
            for stage in REPLAY_STAGES:
                if stage == "output" and self.spec.end2end:
                    continue  # the end-to-end output combines both branches: compared in the whole run
                self.replay_stage(stage, branch)
        self.whole_run()
        self.conditioned_gradients()
        return self.evidence

    # -- tolerances
    def tol(self, name: str) -> Tolerance:
        return self.profile.for_name(name)

    def where(self, stage: str, branch: str | None) -> str:
        text = f"{branch} {stage}" if branch else stage
        return f"{text} ({CATEGORY.get(stage, stage)})"

    def _mark(self, stage: str, branch: str | None, verdict: str) -> None:
        key = f"{branch}.{stage}" if branch else stage
        previous = self.summary.get(key)
        if previous in (None, "pass") or verdict == "fail":
            self.summary[key] = verdict

    # -- 1. stage cross-replay
    def replay_stage(self, stage: str, branch: str | None) -> None:
        fn = self.adapter.stage(stage, branch)
        if fn is None:
            self._mark(stage, branch, "not exposed")
            return
        ref_stage = REFERENCE_STAGE.get(stage, stage)
        out_branch = None if stage == "output" else branch
        outputs_ref = {n: self.ref.ref(ref_stage, n, out_branch) for n in STAGE_OUTPUTS[stage]}
        outputs_ref = {n: t for n, t in outputs_ref.items() if t is not None}
        try:
            inputs = self.ref.stage_inputs(stage, branch)
        except KeyError as missing:
            self._row(stage, branch, f"{self.ref.name(stage, '*', branch)}", True,
                      note=f"not replayed: the reference lacks {missing.args[0]}")
            self._mark(stage, branch, "no reference")
            return
        ev = StageEvidence(self.case, branch, stage, reference=outputs_ref, inputs=inputs)
        # the candidate gets copies: a stage that changes its inputs in place must not change the reference
        call_inputs = {k: _copy_input(v) for k, v in inputs.items()}
        if stage == "assign":
            # fed head outputs that carry gradients: the assignment must come out as constants
            for key in ("scores", "pred_bboxes"):
                if key in call_inputs and call_inputs[key].is_floating_point():
                    call_inputs[key] = call_inputs[key].detach().requires_grad_(True)
        coarse_anchors = stage == "anchors" and self.adapter.level_order == "coarse-first"
        if coarse_anchors:  # the candidate's own level order in, the reference's anchor order out
            call_inputs["feat_shapes"] = list(call_inputs["feat_shapes"])[::-1]
        watch = BroadcastWatch()
        try:
            with watch:
                produced = fn(**call_inputs)
            if coarse_anchors and isinstance(produced, Mapping):
                back = torch.argsort(_coarse_first_order(self.spec.feat_shapes))
                produced = {k: v[back] if isinstance(v, torch.Tensor) and v.shape[:1] == back.shape else v
                            for k, v in produced.items()}
        except ParityError:
            raise
        except Exception as error:  # noqa: BLE001 - a candidate stage may raise anything; that is the finding
            ev.exception = candidate_exception(error, f"{stage} stage")
            ev.error = f"{type(error).__name__}: {error}"
            ev.broadcasts = watch.events
            ev.failed = list(outputs_ref)
            self._row(stage, branch, self.ref.name(ref_stage, "*", out_branch), False,
                      note=f"the candidate's {stage} stage raised {_exception_words(ev.exception)}")
            self.evidence.stages.append(ev)
            self._mark(stage, branch, "fail")
            self.conditioned_ok[(branch, stage)] = False
            return
        if not isinstance(produced, Mapping):
            raise ParityError(f"loss candidate {self.adapter.name}: stage {stage} returned {_describe(produced)}, "
                              f"expected a dict {{name: tensor}} under the names of docs/loss-adapter.md")
        # copied before anything else of the candidate runs (a later call may change them in place)
        ev.carries_grad = [k for k, v in produced.items() if isinstance(v, torch.Tensor) and v.requires_grad
                           and k not in ASSIGNER_INPUT_NAMES] if stage == "assign" else []
        ev.outputs = {k: v.detach().clone() for k, v in produced.items() if isinstance(v, torch.Tensor)}
        ev.broadcasts = watch.events
        ev.mutated = _mutated_inputs(inputs, call_inputs)
        if stage == "assign":
            self._row(stage, branch, f"{stage}: outputs are constants", not ev.carries_grad,
                      note=("assignment outputs carry gradients: " + ", ".join(ev.carries_grad)) if ev.carries_grad
                      else "assignment outputs carry no gradient (assigner inputs detached)")
        diff = None
        if "fg_mask" in outputs_ref and "fg_mask" in ev.outputs:
            diff = self._assignment(branch, ev.outputs, lambda n: outputs_ref.get(n) if n in outputs_ref
                                    else self.ref.ref("assign", n, branch))
        ok = self._compare_stage_outputs(stage, branch, outputs_ref, ev, diff)
        self._exposure_row(stage, branch, outputs_ref, ev)
        self.evidence.stages.append(ev)
        self.conditioned_ok[(branch, stage)] = ok and not ev.carries_grad
        returned = [n for n in outputs_ref if n in ev.outputs]
        verdict = "fail" if not ok or ev.carries_grad else (
            "pass" if len(returned) == len(outputs_ref) else f"partial ({len(returned)} of {len(outputs_ref)} outputs)")
        self._mark(stage, branch, verdict)

    def _compare_stage_outputs(self, stage: str, branch: str | None, outputs_ref: Mapping[str, torch.Tensor],
                               ev: StageEvidence, diff: "AssignmentDiff | None", *, section: str | None = None,
                               end_to_end: bool = False, extra_note: str = "") -> bool:
        """Every returned output against the reference; what the stage does not return is not exposed, never a
        failure. The assignment's decisive outputs go first: when they are equal, an intermediate that differs
        only by float noise (align_metric, overlaps) cannot have changed anything, and its row says so."""
        ordered = sorted(outputs_ref, key=lambda n: (n not in DECISIVE, list(outputs_ref).index(n)))
        decisive_ok: bool | None = None
        ok = True
        for name in ordered:
            cand = ev.outputs.get(name)
            if cand is None:
                continue
            if name not in DECISIVE and decisive_ok is None:
                shown = [n for n in DECISIVE if n in ev.outputs and n in outputs_ref]
                decisive_ok = ok and {"fg_mask", "target_gt_idx", "target_scores"} <= set(shown)
            passed = self._compare(stage, branch, name, outputs_ref[name], cand, ev, diff, section=section,
                                   end_to_end=end_to_end, extra_note=extra_note,
                                   batch_note=(stage == "output" and name == "loss"),
                                   assignment_equal=bool(decisive_ok))
            ok &= passed
        return ok

    def _exposure_row(self, stage: str, branch: str | None, outputs_ref: Mapping, ev: StageEvidence) -> None:
        """One row for what a stage did not return (not exposed) and returned under names the contract lacks."""
        missing = [n for n in outputs_ref if n not in ev.outputs]
        known = set(STAGE_OUTPUTS[stage]) | (set(ASSIGNER_INPUT_NAMES) if stage == "assigner" else set())
        unknown = sorted(k for k in ev.outputs if k not in known)
        notes = []
        if missing:
            notes.append(f"partial ({len(outputs_ref) - len(missing)} of {len(outputs_ref)} outputs): not exposed "
                         + ", ".join(missing))
        if unknown:
            notes.append(f"not compared, no such {stage} output in docs/dump-format.md: " + ", ".join(unknown))
        if ev.mutated:
            notes.append(f"the candidate's {stage} stage changed its input(s) {', '.join(ev.mutated)} in place "
                         f"(it was given copies; the comparison used the reference's)")
        if notes:
            ref_stage = REFERENCE_STAGE.get(stage, stage)
            self._row(stage, branch, self.ref.name(ref_stage, "*", None if stage == "output" else branch), True,
                      note="; ".join(notes))

    def _compare(self, stage: str, branch: str | None, name: str, ref: torch.Tensor, cand: Any,
                 ev: StageEvidence, diff: "AssignmentDiff | None", *, batch_note: bool = False,
                 section: str | None = None, end_to_end: bool = False, extra_note: str = "",
                 assignment_equal: bool = False) -> bool:
        full = self.ref.name(REFERENCE_STAGE.get(stage, stage), name, None if stage == "output" else branch)
        tol = BITWISE if name in DISCRETE else self.tol(full)
        if cand is None:  # not exposed: said once per stage (`_exposure_row`), never a failure
            return True
        if not isinstance(cand, torch.Tensor):
            cand = torch.as_tensor(cand)
        cand_d = cand.detach()
        note = ""
        if batch_note and not self.adapter.batch_scaled:
            cand_d = cand_d * self.spec.batch_size
            note = f"candidate declares the per-image mean: its value x B={self.spec.batch_size} is compared"
        fg_names = ("fg_mask", "target_gt_idx", "mask_pos", "target_labels", "target_bboxes", "target_scores")
        pairs = self._pairs(branch) if name in PAIR_DEFINED and stage in ("assign", "assigner") else None
        if diff is not None and name in fg_names:
            passed, metrics, note2 = self._compare_assignment_tensor(name, ref, cand_d, diff, tol)
            note = "; ".join(filter(None, [note, note2]))
        elif name in names.FOREGROUND_ONLY and stage in ("assign", "assigner") and self._ref_fg(branch) is not None \
                and cand_d.shape == ref.shape:
            fg = self._ref_fg(branch)  # without the candidate's fg_mask: judged on the reference's foreground
            metrics = compare_tensors(ref[fg], cand_d[fg], tol)
            passed = metrics.passed
            note = "; ".join(filter(None, [note, f"compared on the reference's {int(fg.sum())} foreground anchors "
                                                 f"(background rows are filler)"]))
        elif pairs is not None and pairs.shape == ref.shape == cand_d.shape:
            passed, metrics, note2 = self._compare_inside_boxes(name, ref, cand_d, pairs, tol, assignment_equal)
            note = "; ".join(filter(None, [note, note2]))
        else:
            metrics = compare_tensors(ref, cand_d, tol)
            passed = metrics.passed
            if not passed and assignment_equal and name in NOISE_TOLERANT:
                passed, note2 = self._float_noise(ref, cand_d, metrics)
                note = "; ".join(filter(None, [note, note2]))
            if not passed and end_to_end and self._explained_by_ties(stage, branch):
                passed = True
                note = "; ".join(filter(None, [note, self._tie_note(branch)]))
        if not passed:
            ev.failed.append(name)
        note = "; ".join(filter(None, [note, extra_note]))
        self._row(stage, branch, full, passed, metrics=metrics.as_dict(), tolerance=tol.as_dict(), note=note,
                  section=section)
        return passed

    # -- conventions that are not bugs
    def _pairs(self, branch: str | None) -> torch.Tensor | None:
        """(B, M, A) bool: the anchor-box pairs where ultralytics defines align_metric and overlaps (the anchor
        inside the box, a real box); it leaves them zero elsewhere."""
        inside = self.ref.ref("assign", "mask_in_gts", branch)
        mask_gt = self.ref.ref("preprocess", "mask_gt", branch)
        if inside is None or mask_gt is None or mask_gt.shape[:2] != inside.shape[:2]:
            return None
        return inside.bool() & mask_gt.bool()

    def _ref_fg(self, branch: str | None) -> torch.Tensor | None:
        fg = self.ref.ref("assign", "fg_mask", branch)
        return None if fg is None else fg.bool()

    def _compare_inside_boxes(self, name: str, ref: torch.Tensor, cand: torch.Tensor, pairs: torch.Tensor,
                              tol: Tolerance, assignment_equal: bool):
        """align_metric / overlaps where ultralytics defines them; the outside is a note, not a verdict."""
        metrics = compare_tensors(ref[pairs], cand[pairs], tol)
        passed, notes = metrics.passed, [f"compared on the {int(pairs.sum())} anchor-box pairs inside the boxes"]
        if not passed and assignment_equal:
            passed, noise = self._float_noise(ref[pairs], cand[pairs], metrics)
            notes.append(noise)
        outside = ~pairs
        nonzero = int((cand[outside] != 0).sum())
        if nonzero:
            what = "CIoU" if name == "overlaps" else "the alignment metric"
            effect = ("no effect on the assignment" if assignment_equal else
                      "whether it changes the assignment is for fg_mask and target_gt_idx to say")
            notes.append(f"the candidate computes {what} for every pair ({nonzero} of {int(outside.sum())} pairs "
                         f"outside the boxes are nonzero); ultralytics zeroes it outside the boxes: {effect}")
        return passed, metrics, "; ".join(filter(None, notes))

    def _float_noise(self, ref: torch.Tensor, cand: torch.Tensor, metrics) -> tuple[bool, str]:
        """An intermediate of an assignment whose decisive outputs are equal: a difference within the chained
        loss tolerance (rounding of a differently ordered computation, docs/tolerances.md) is float noise."""
        chained = self.profile.for_kind("loss-chained")
        # relative parts only: the absolute floor is larger than a whole alignment metric (~1e-6 at init)
        noise = Tolerance(0.0, chained.rtol, source=chained.source, atol_absmax=chained.atol_absmax)
        if not compare_tensors(ref, cand, noise).passed:
            return False, ""
        worst = float((ref.double() - cand.double()).abs().max()) if ref.numel() else 0.0
        return True, (f"differs by float noise only (max |d| {worst:.2g}, within the loss-chained tolerance's "
                      f"relative part, {noise.describe()}); {', '.join(DECISIVE)} are equal: not a failure")

    # -- assignment as discrete data
    def _assignment(self, branch: str | None, cand: Mapping, ref_of: Callable[[str], torch.Tensor | None]
                    ) -> "AssignmentDiff | None":
        ref_fg, ref_idx = ref_of("fg_mask"), ref_of("target_gt_idx")
        metric, overlaps = ref_of("align_metric"), ref_of("overlaps")
        cand_fg, cand_idx = cand.get("fg_mask"), cand.get("target_gt_idx")
        if ref_fg is None or ref_idx is None or cand_fg is None or cand_idx is None:
            return None
        if cand_fg.shape != ref_fg.shape or cand_idx.shape != ref_idx.shape:
            return None
        tol = self.tol(self.ref.name("assign", "align_metric", branch))
        return compare_assignment(ref_fg, ref_idx, cand_fg.detach(), cand_idx.detach(), metric, overlaps, tol,
                                  self.tol(self.ref.name("assign", "overlaps", branch)))

    def _compare_assignment_tensor(self, name: str, ref: torch.Tensor, cand: torch.Tensor, diff: "AssignmentDiff",
                                   tol: Tolerance):
        """fg_mask and target_gt_idx are judged per box (AssignmentDiff); the others on the anchors whose
        assignment both sides agree on (background rows are filler, flipped anchors are the diff's business)."""
        if name == "fg_mask":
            metrics = compare_tensors(ref.bool(), cand.bool(), BITWISE)
            return not diff.real, metrics, diff.summary()
        if cand.shape != ref.shape:
            return False, compare_tensors(ref, cand, tol), ""
        if name == "target_gt_idx":
            common = diff.common_mask  # foreground on both sides: the box index is no filler there
            metrics = compare_tensors(ref[common], cand[common], BITWISE)
            moved_real = [f for f in diff.real if f.kind == "moved"]
            return not moved_real, metrics, (f"compared on the {int(common.sum())} anchors foreground on both "
                                             f"sides; {len(diff.flips) - len(diff.real)} near-tie flip(s)"
                                             if diff.flips else f"compared on the {int(common.sum())} foreground "
                                                                f"anchors")
        if name in names.FOREGROUND_ONLY:
            agree = diff.agree_mask  # same box on both sides: label and box must match
            metrics = compare_tensors(ref[agree], cand[agree], tol)
            return metrics.passed, metrics, f"compared on the {int(agree.sum())} anchors assigned the same box"
        if not diff.flips:
            metrics = compare_tensors(ref, cand, tol)
            return metrics.passed, metrics, ""
        # mask_pos (B, M, A) and target_scores (B, A, C): leave the flipped anchors out
        keep = ~diff.flipped_mask
        r, c = (ref.transpose(1, 2)[keep], cand.transpose(1, 2)[keep]) if name == "mask_pos" else (ref[keep], cand[keep])
        metrics = compare_tensors(r, c, tol)
        note = f"compared outside the {int(diff.flipped_mask.sum())} flipped anchor(s)"
        if diff.real:
            note += f"; {len(diff.real)} real flip(s) (see fg_mask)"
        return metrics.passed and not diff.real, metrics, note

    def _explained_by_ties(self, stage: str, branch: str | None) -> bool:
        """An end-to-end number after the assignment that differs only because of near-tie flips: the flips are
        all near-ties, and the stage(s) behind the number match when fed the reference assignment."""
        if stage not in AFTER_ASSIGNMENT:
            return False
        diffs = self.evidence_diff
        relevant = [diffs.get(b) for b in (self.branches if stage == "output" else [branch])]
        relevant = [d for d in relevant if d is not None]
        if not relevant or not any(d.flips for d in relevant) or any(d.real for d in relevant):
            return False
        needed = [(b, s) for b in self.branches for s in ("normalize", "classify", "box", "gains")] \
            if stage == "output" else [(branch, stage)]
        return all(self.conditioned_ok.get(key, False) for key in needed)

    def _tie_note(self, branch: str | None) -> str:
        count = sum(len(d.flips) for d in self.evidence_diff.values() if d is not None)
        return (f"differs only through {count} near-tie assignment flip(s); the stages match when fed the "
                f"reference assignment")

    # -- 2. the whole candidate loss
    def whole_run(self) -> None:
        section = f"{self.section} end-to-end"
        if self.adapter.loss is None:
            self._row("output", None, names.loss_output(self.case, "loss"), True, section=section,
                      note="not run: the candidate exposes stages only")
            return
        leaves = self._head_leaves()
        head = leaves if self.spec.end2end else leaves[None]
        batch = self.ref.batch()
        watch = BroadcastWatch()
        try:
            with watch:
                result = self._call(self.adapter, head, batch)
        except ParityError:
            raise
        except Exception as error:  # noqa: BLE001 - a candidate loss may raise anything; that is the finding
            self.evidence.run_exception = candidate_exception(error, "loss call")
            self.evidence.run_error = f"{type(error).__name__}: {error}"
            self.evidence.run_broadcasts = watch.events
            self.evidence.values_passed = False
            self._row("output", None, names.loss_output(self.case, "loss"), False, section=section,
                      where="end-to-end (candidate exception)",
                      note=f"the candidate loss raised {_exception_words(self.evidence.run_exception)}")
            self._mark("end-to-end", None, "fail")
            return
        self.evidence.run_broadcasts = watch.events
        if result.terms is None and self.adapter.with_gains is not None:
            result = self._per_gain_terms(result, head, batch, section)
        self._leaves, self._result = leaves, result
        self.summary["intermediates"] = sorted(result.tensors)
        self.summary["return_shape"] = result.form

        values_ok = self._compare_intermediates(result.tensors, section)
        scale = 1 if self.adapter.batch_scaled else self.spec.batch_size
        values_ok &= self._compare_terms(result, scale, section)
        self.evidence.values_passed = values_ok
        self._mark("end-to-end", None, "pass" if values_ok else "fail")
        ref_loss, cand = self.evidence.ref_loss, self.evidence.cand_loss
        if not bool(torch.isfinite(cand).all()) and ref_loss is not None and bool(torch.isfinite(ref_loss).all()):
            self.evidence.positive_logits_finite = self._probe_positive_logits(head, batch)
        self.end_to_end_gradients(section.replace("end-to-end", "gradients"))

    def _call(self, adapter: "LossAdapter", head: Any, batch: dict, loss: Callable | None = None) -> CandidateResult:
        """The candidate loss on copies of the batch (the head leaves are this case's own)."""
        batch = {k: _copy_input(v) for k, v in batch.items()}
        preds, converted = adapter.convert_preds(head, self.spec), adapter.convert_batch(batch, self.spec)
        if loss is None:
            return adapter.call(preds, converted)
        return adapter.parse(loss(preds, converted))

    def _per_gain_terms(self, result: CandidateResult, head: Any, batch: dict, section: str) -> CandidateResult:
        """A loss returning only its total, built again by its own factory with one gain at a time: each call
        gives one term. Used only when the three parts add up to the total (a factory that ignores the gains
        gives three totals)."""
        gains = self.spec.gains
        if not hasattr(self.adapter, "_per_gain_losses"):
            self.adapter._per_gain_losses = [self.adapter.with_gains(tuple(g if k == t else 0.0
                                                                           for k, g in enumerate(gains)))
                                             for t in range(len(TERMS))]
        parts = []
        try:
            for loss in self.adapter._per_gain_losses:
                part = self._call(self.adapter, head, batch, loss)
                parts.append(part.total.reshape(()))
        except ParityError:
            raise
        except Exception as error:  # noqa: BLE001
            exception = candidate_exception(error, "loss call with one gain")
            self._row("output", None, names.loss_output(self.case, "loss") + "[sum]", True, section=section,
                      where="output (one gain at a time)",
                      note=f"no per-term verdict: a call with one gain at a time raised {_exception_words(exception)}")
            return result
        terms = torch.stack(parts)
        tol = self.tol(names.loss_output(self.case, "loss"))
        metrics = compare_tensors(result.total.detach().reshape(1), terms.detach().sum().reshape(1), tol)
        values = ", ".join(f"{t} {float(v):.6g}" for t, v in zip(TERMS, terms.detach()))
        if not metrics.passed:
            self._row("output", None, names.loss_output(self.case, "loss") + "[sum]", True, section=section,
                      where="output (one gain at a time)", metrics=metrics.as_dict(), tolerance=tol.as_dict(),
                      note=(f"no per-term verdict: the calls with one gain at a time ({values}) do not add up to the "
                            f"total {float(result.total):.6g}, so the factory does not pass the gains on"))
            return result
        self._row("output", None, names.loss_output(self.case, "loss") + "[sum]", True, section=section,
                  where="output (one gain at a time)", metrics=metrics.as_dict(), tolerance=tol.as_dict(),
                  note=f"the three calls with one gain at a time ({values}) add up to the candidate's total")
        return CandidateResult(terms, result.total, result.items, result.tensors,
                               result.form + "; terms from one call per gain", per_gain=True)

    def _compare_intermediates(self, tensors: Mapping[str, torch.Tensor], section: str, note: str = "") -> bool:
        """Every intermediate the candidate returned, per branch, against the reference (unconditioned)."""
        values_ok = True
        for branch in self.branches:
            prefix = f"{branch}." if branch else ""
            mine = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)} if branch else dict(tensors)
            ev = StageEvidence(self.case, branch, "end-to-end")
            ev.outputs = {k: v for k, v in mine.items() if isinstance(v, torch.Tensor)}
            ev.carries_grad = [k for k, v in ev.outputs.items() if k.startswith("assign.") and v.requires_grad
                               and k.split(".", 1)[1] not in ASSIGNER_INPUT_NAMES]
            diff = None
            if "assign.fg_mask" in ev.outputs and "assign.target_gt_idx" in ev.outputs:
                diff = self._assignment(branch, {"fg_mask": ev.outputs["assign.fg_mask"],
                                                 "target_gt_idx": ev.outputs["assign.target_gt_idx"]},
                                        lambda n, b=branch: self.ref.ref("assign", n, b))
            self.evidence_diff[branch] = diff
            by_stage: dict[str, dict[str, torch.Tensor]] = {}
            for key in sorted(ev.outputs, key=_pipeline_key):
                stage, _, name = key.partition(".")
                if stage not in names.LOSS_STAGES or stage == "output":
                    continue
                ref = self.ref.ref(stage, name, branch)
                if ref is not None:
                    ev.reference[key] = ref
                    by_stage.setdefault(stage, {})[name] = ref
            for stage, refs in by_stage.items():
                sub = StageEvidence(self.case, branch, stage, reference=refs,
                                    outputs={n: ev.outputs[f"{stage}.{n}"] for n in refs})
                if not self._compare_stage_outputs(stage, branch, refs, sub, diff if stage == "assign" else None,
                                                   section=section, end_to_end=True, extra_note=note):
                    ev.failed += [f"{stage}.{n}" for n in sub.failed]
                    values_ok = False
            self.evidence.run[branch] = ev
        return values_ok

    def _compare_terms(self, result: CandidateResult, scale: int, section: str, note: str = "") -> bool:
        """The loss itself: one verdict per term (or on the total), and the items."""
        values_ok = True
        ref_loss = self.ref.ref("output", "loss")
        in_order = self._order_equivalent() if ref_loss is not None else None
        # the diagnosis reads the reference a coarse-first candidate should equal (the same, without order ties)
        self.evidence.ref_loss = in_order["loss"] if in_order is not None else ref_loss
        cand = result.terms if result.terms is not None else result.total
        self.evidence.cand_loss = cand.detach() * scale  # in the reference's convention, as the rows compare it
        convention = ("" if scale == 1 else
                      f"candidate declares the per-image mean: its value x B={self.spec.batch_size} is compared")
        convention = "; ".join(filter(None, [convention, note]))
        if ref_loss is not None and result.terms is not None:
            for t, term in enumerate(TERMS):
                name = f"{names.loss_output(self.case, 'loss')}[{term}]"
                tol = self.tol(names.loss_output(self.case, "loss"))
                metrics = compare_tensors(ref_loss[t:t + 1], result.terms[t:t + 1].detach() * scale, tol)
                passed, row_note = metrics.passed, "; ".join(filter(None, [convention, _per_gain_note(result, term,
                                                                                                self.spec.gains)]))
                if not passed and self._explained_by_ties("output", None):
                    passed, row_note = True, "; ".join(filter(None, [row_note, self._tie_note(None)]))
                if not passed and self._in_candidate_order(result.terms[t:t + 1].detach() * scale, tol,
                                                           lambda alt, t=t: alt["loss"][t:t + 1]):
                    passed, row_note = True, "; ".join(filter(None, [row_note, self._order_note()]))
                values_ok &= passed
                self._row("output", None, name, passed, metrics=metrics.as_dict(), tolerance=tol.as_dict(),
                          note=row_note, section=section, where=f"output ({term} term)")
        elif ref_loss is not None:
            tol = self.tol(names.loss_output(self.case, "loss"))
            metrics = compare_tensors(ref_loss.sum().reshape(1), result.total.detach().reshape(1) * scale, tol)
            values_ok &= metrics.passed
            self._row("output", None, names.loss_output(self.case, "loss") + "[sum]", metrics.passed,
                      metrics=metrics.as_dict(), tolerance=tol.as_dict(), section=section,
                      note="; ".join(filter(None, [convention, "the candidate returns only a total: no per-term "
                                                               "verdict (return (box, cls, dfl), or let the factory "
                                                               "take the gains, to get one)"])))
        ref_items = self.ref.ref("output", "items")
        if ref_items is not None and result.items is not None and result.items.numel() == 3:
            tol = self.tol(names.loss_output(self.case, "items"))
            metrics = compare_tensors(ref_items, result.items.detach().reshape(3).to(ref_items.dtype), tol)
            passed = metrics.passed or self._explained_by_ties("output", None)
            if not passed and self._in_candidate_order(result.items.detach().reshape(3).to(ref_items.dtype), tol,
                                                       lambda alt: alt["loss"] / self.spec.batch_size):
                passed, note = True, "; ".join(filter(None, [note, self._order_note()]))
            values_ok &= passed
            self._row("output", None, names.loss_output(self.case, "items"), passed, metrics=metrics.as_dict(),
                      tolerance=tol.as_dict(), section=section,
                      note="; ".join(filter(None, [note, "" if metrics.passed or not passed else self._tie_note(None)])))
        return values_ok

    # -- a candidate whose anchors run coarsest level first
    def _in_candidate_order(self, value: torch.Tensor, tol: Tolerance, pick: Callable[[dict], torch.Tensor]) -> bool:
        alt = self._order_equivalent()
        return alt is not None and compare_tensors(pick(alt), value, tol).passed

    def _order_note(self) -> str:
        flips = self._order_equivalent()["flips"]
        return (f"differs from the reference only through {flips} anchor flip(s) from top-k ties that the anchor "
                f"order breaks: ultralytics' arithmetic (built-in loss) run in the candidate's coarse-first anchor "
                f"order gives this value")

    def _order_equivalent(self) -> dict | None:
        """The reference's loss and head gradients recomputed in a coarse-first candidate's anchor order.

        `topk` breaks ties among equal alignment metrics (all zero for a box no prediction overlaps yet) by
        anchor index, so a port that orders anchors P5 first may pick other tied anchors than ultralytics; a
        tied zero-metric anchor that enters a box's top k can then win a conflict and move others. Every other
        operation is the same in either order, so a candidate equal to this is ultralytics' arithmetic."""
        if hasattr(self, "_order_reference"):
            return self._order_reference
        self._order_reference = None
        if self.adapter.level_order != "coarse-first" or self.spec.end2end:
            return None
        shapes = list(self.spec.feat_shapes)
        perm = _coarse_first_order(shapes)
        back = torch.argsort(perm)
        config = replace(self.spec.config, strides=tuple(reversed(self.spec.strides)),
                         min_box_side=self.spec.config.assigner.min_box_side)
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in self.ref.head(None).items()}
        run = build_loss(config).run({"boxes": leaves["boxes"][..., perm], "scores": leaves["scores"][..., perm],
                                      "feat_shapes": shapes[::-1]}, self.ref.batch())
        ref_fg, ref_idx = self.ref.ref("assign", "fg_mask"), self.ref.ref("assign", "target_gt_idx")
        if ref_fg is None or ref_idx is None:
            return None
        diff = compare_assignment(ref_fg, ref_idx, run.tensors["assign.fg_mask"][:, back],
                                  run.tensors["assign.target_gt_idx"][:, back],
                                  self.ref.ref("assign", "align_metric"), self.ref.ref("assign", "overlaps"),
                                  self.tol(self.ref.name("assign", "align_metric")),
                                  self.tol(self.ref.name("assign", "overlaps")))
        if not diff.flips:  # the same assignment in either order: the order explains nothing
            return None
        grads = {}
        for t, term in enumerate(TERMS):
            values = torch.autograd.grad(run.loss[t], list(leaves.values()), retain_graph=True, allow_unused=True)
            for (output, leaf), grad in zip(leaves.items(), values):
                grads[(term, output)] = torch.zeros_like(leaf) if grad is None else grad.detach()
        self._order_reference = {"loss": run.loss.detach(), "grads": grads, "flips": len(diff.flips)}
        return self._order_reference

    def _probe_positive_logits(self, head: Any, batch: dict) -> bool | None:
        """Rerun the candidate with |logits| instead of the (negative, at initialisation) class logits: a loss that
        turns finite was taking a fractional power of raw logits. None when the probe itself fails."""
        def positive(h):
            return {"boxes": h["boxes"].detach(), "scores": h["scores"].detach().abs()}

        probe = {b: positive(head[b]) for b in self.spec.branches} if self.spec.end2end else positive(head)
        try:
            with torch.no_grad():
                result = self._call(self.adapter, probe, batch)
        except Exception:  # noqa: BLE001 - a probe that fails proves nothing
            return None
        value = result.terms if result.terms is not None else result.total
        return bool(torch.isfinite(value).all())

    def _head_leaves(self) -> dict[str | None, dict[str, torch.Tensor]]:
        leaves: dict[str | None, dict[str, torch.Tensor]] = {}
        for branch in self.branches:
            leaves[branch] = {k: v.detach().clone().requires_grad_(True) for k, v in self.ref.head(branch).items()}
        return leaves

    # -- 3. gradients
    def end_to_end_gradients(self, section: str) -> None:
        result, leaves = self._result, self._leaves
        if result.terms is None:
            self._total_gradients(section)
            return
        if not result.terms.requires_grad:
            self._row("gradients", None, f"grad.head.{self.case}.*", False, section=section, where="end-to-end",
                      note="the candidate's loss carries no gradient to the head outputs")
            self.evidence.grads_passed = False
            return
        wanted = [(b, o) for b in self.branches for o in names.HEAD_OUTPUTS
                  if self.dump.get_optional(names.grad_head(self.case, TERMS[0], o, b)) is not None]
        if not wanted:
            return
        ok = True
        failures = []
        scale = 1 if self.adapter.batch_scaled else self.spec.batch_size
        for t, term in enumerate(TERMS):
            tensors = [leaves[b][o] for b, o in wanted]
            grads = torch.autograd.grad(result.terms[t] * scale if scale != 1 else result.terms[t], tensors,
                                        retain_graph=True, allow_unused=True)
            for (branch, output), grad, leaf in zip(wanted, grads, tensors):
                ref = self.dump.get(names.grad_head(self.case, term, output, branch))
                grad = torch.zeros_like(leaf) if grad is None else grad
                name = names.grad_head(self.case, term, output, branch)
                tol = self.tol(name)
                metrics = compare_tensors(ref, grad.detach(), tol)
                passed = metrics.passed
                note = "; ".join(filter(None, [
                    "" if scale == 1 else f"candidate gradient x B={self.spec.batch_size} (per-image mean)",
                    _per_gain_note(result, term, self.spec.gains)]))
                if not passed and self._explained_by_ties("output", None):
                    passed, note = True, "; ".join(filter(None, [note, self._tie_note(None)]))
                if not passed and self._in_candidate_order(grad.detach(), tol,
                                                           lambda alt, k=(term, output): alt["grads"][k]):
                    passed, note = True, "; ".join(filter(None, [note, self._order_note()]))
                if not passed:
                    failures.append(name)
                ok &= passed
                self._row("gradients", branch, name, passed, metrics=metrics.as_dict(), tolerance=tol.as_dict(),
                          note=note, section=section, where=f"end-to-end ({term} term)")
        self.evidence.grads_passed = ok
        self.evidence.grad_failures = failures

    def _total_gradients(self, section: str) -> None:
        """A candidate returning only a total: its gradient against the sum of the reference's term gradients."""
        result, leaves = self._result, self._leaves
        if not result.total.requires_grad:
            self._row("gradients", None, f"grad.head.{self.case}.*", False, section=section, where="end-to-end",
                      note="the candidate's loss carries no gradient to the head outputs")
            self.evidence.grads_passed = False
            return
        wanted = [(b, o) for b in self.branches for o in names.HEAD_OUTPUTS
                  if all(self.dump.get_optional(names.grad_head(self.case, t, o, b)) is not None for t in TERMS)]
        if not wanted:
            return
        scale = 1 if self.adapter.batch_scaled else self.spec.batch_size
        grads = torch.autograd.grad(result.total * scale, [leaves[b][o] for b, o in wanted], retain_graph=True,
                                    allow_unused=True)
        ok = True
        for (branch, output), grad in zip(wanted, grads):
            ref = sum(self.dump.get(names.grad_head(self.case, t, output, branch)) for t in TERMS)
            grad = torch.zeros_like(ref) if grad is None else grad.detach()
            name = names.grad_head(self.case, "total", output, branch)
            tol = self.tol(names.grad_head(self.case, TERMS[0], output, branch))
            metrics = compare_tensors(ref, grad, tol)
            ok &= metrics.passed
            self._row("gradients", branch, name, metrics.passed, metrics=metrics.as_dict(), tolerance=tol.as_dict(),
                      section=section, where="end-to-end (total)",
                      note="the candidate returns only a total: compared with the sum of the reference's term "
                           "gradients (not bitwise by construction)")
        self.evidence.grads_passed = ok

    def conditioned_gradients(self) -> None:
        """Per term, d(stage loss)/d(head output) with the reference assignment fed in, scaled like the full
        graph scales it (branch weight, batch size, gain): isolates the loss math's gradients."""
        section = f"{self.section} gradients"
        results = []
        for branch in self.branches:
            weight = self.spec.branch_weight(branch)
            for stage, terms in (("classify", ("cls",)), ("box", ("box", "dfl"))):
                fn = self.adapter.stage(stage, branch)
                if fn is None or (stage == "box" and self.adapter.stage("decode", branch) is None):
                    continue
                if not self.conditioned_ok.get((branch, stage), False):
                    continue  # values already differ: the gradient row would only repeat that
                try:
                    inputs = self.ref.stage_inputs(stage, branch)
                except KeyError:
                    continue
                output = "scores" if stage == "classify" else "boxes"
                leaf = inputs[output].detach().clone().requires_grad_(True)
                inputs[output] = leaf
                try:  # the candidate's stages once more: an exception was reported by the stage replay
                    if stage == "box":
                        decoded = self.adapter.stage("decode", branch)(boxes=leaf,
                                                                       anchor_points=inputs["anchor_points"])
                        inputs["pred_bboxes"] = decoded["pred_bboxes"]
                    produced = fn(**inputs)
                except Exception:  # noqa: BLE001
                    continue
                for term in terms:
                    ref = self.dump.get_optional(names.grad_head(self.case, term, output, branch))
                    key = {"cls": "loss", "box": "loss_iou", "dfl": "loss_dfl"}[term]
                    if ref is None or key not in produced or not produced[key].requires_grad:
                        continue
                    seed = torch.ones((), dtype=produced[key].dtype)
                    if weight is not None:
                        seed = seed * weight
                    seed = seed * self.spec.batch_size * self.spec.gains[TERMS.index(term)]
                    (grad,) = torch.autograd.grad(produced[key], leaf, grad_outputs=seed, retain_graph=True)
                    name = names.grad_head(self.case, term, output, branch)
                    tol = self.tol(name)
                    metrics = compare_tensors(ref, grad.detach(), tol)
                    results.append(metrics.passed)
                    self._row(stage, branch, name, metrics.passed, metrics=metrics.as_dict(), tolerance=tol.as_dict(),
                              section=section, where=f"{branch + ' ' if branch else ''}{stage} ({term} term, "
                                                     f"conditioned)",
                              note="fed the reference assignment (conditioned)")
        if results:
            self.evidence.conditioned_grads_passed = all(results)

    # -- rows
    def _row(self, stage: str, branch: str | None, name: str, passed: bool, *, metrics=None, tolerance=None,
             note: str = "", section: str | None = None, where: str | None = None) -> Row:
        return self.report.add(Row(section=section or self.section, where=where or self.where(stage, branch),
                                   name=name, passed=bool(passed), metrics=metrics, tolerance=tolerance, note=note))


class _RecordedCaseReplay(_CaseReplay):
    """A candidate dump: nothing to run, so each recorded stage is checked against ultralytics' arithmetic (the
    built-in loss, bitwise equal to it on CPU) fed the CANDIDATE's own recorded inputs, the recorded
    intermediates and loss against the reference's, and the recorded head gradients against the reference's."""

    ORACLE_NOTE = "checked against ultralytics' arithmetic (built-in loss) on the candidate's own inputs"

    def __init__(self, dump: Dump, spec: LossSpec, adapter: RecordedLoss, profile: Profile, report: Report,
                 case: str):
        super().__init__(dump, spec, adapter, profile, report, case)
        self.cand = _Case(adapter.dump, spec, case, fallback=dump)
        self.oracle = builtin_loss_adapter(spec)

    def run(self) -> CaseEvidence:
        for branch in self.branches:
            self.head_rows(branch)
            for stage in REPLAY_STAGES:
                if not (stage == "output" and self.spec.end2end):
                    self.replay_recorded(stage, branch)
        self.whole_recorded()
        return self.evidence

    def head_rows(self, branch: str | None) -> None:
        """The head outputs the candidate's loss ran on: a loss difference may start here."""
        if not self.cand.has_head(branch):
            return
        mine, ref = self.cand.head(branch), self.ref.head(branch)
        ok = True
        for output in names.HEAD_OUTPUTS:
            path = (branch,) if branch else ()
            name = names.act(self.ref.head_index, *path, output)
            tol = self.profile.for_name(name)
            metrics = compare_tensors(ref[output], mine[output], tol)
            ok &= metrics.passed
            self._row("head", branch, name, metrics.passed, metrics=metrics.as_dict(), tolerance=tol.as_dict(),
                      where=self.where("head", branch),
                      note="the head outputs the candidate's loss was computed on")
        self._mark("head", branch, "pass" if ok else "fail")

    def replay_recorded(self, stage: str, branch: str | None) -> None:
        ref_stage = REFERENCE_STAGE.get(stage, stage)
        out_branch = None if stage == "output" else branch
        produced = {n: self.cand.ref(ref_stage, n, out_branch) for n in STAGE_OUTPUTS[stage]}
        produced = {n: t for n, t in produced.items() if t is not None}
        if not produced:
            self._mark(stage, branch, "not recorded")
            return
        try:
            inputs = self.cand.stage_inputs(stage, branch)
        except KeyError as missing:
            self._row(stage, branch, self.ref.name(ref_stage, "*", out_branch), True,
                      note=f"not checked: the candidate dump lacks {missing.args[0]}, an input of this stage")
            self._mark(stage, branch, "not checked")
            return
        expected = self.oracle.stage(stage, branch)(**inputs)
        expected = {n: t.detach() for n, t in expected.items() if n in produced and isinstance(t, torch.Tensor)}
        ev = StageEvidence(self.case, branch, stage, reference=expected, inputs=inputs, outputs=produced)
        diff = None
        if "fg_mask" in expected:
            ref_of = (lambda n: expected[n] if n in expected else self.oracle_assign(branch, inputs).get(n))
            diff = self._assignment(branch, produced, ref_of)
        ok = True
        for name, value in expected.items():
            ok &= self._compare(stage, branch, name, value, produced.get(name), ev, diff,
                                batch_note=(stage == "output" and name == "loss"), extra_note=self.ORACLE_NOTE)
        self.evidence.stages.append(ev)
        self.conditioned_ok[(branch, stage)] = ok
        self._mark(stage, branch, "pass" if ok else "fail")

    def oracle_assign(self, branch: str | None, inputs: dict) -> dict:
        """All assigner outputs (align_metric and overlaps decide near-ties) on the candidate's inputs."""
        if "pd_scores" in inputs:
            return self.oracle.stage("assigner", branch)(**inputs)
        return self.oracle.stage("assign", branch)(**inputs)

    def whole_recorded(self) -> None:
        section = f"{self.section} end-to-end"
        prefix = f"loss.{self.case}."
        tensors = {n[len(prefix):]: self.adapter.dump.get(n) for n in self.adapter.dump.names(prefix)}
        scale = 1 if self.adapter.batch_scaled else self.spec.batch_size
        if tensors:
            values_ok = self._compare_intermediates(tensors, section, note="as recorded by the candidate")
            loss = tensors.get("output.loss")
            if loss is not None:
                items = tensors.get("output.items")
                result = (CandidateResult(loss.reshape(3), loss.sum(), items, tensors) if loss.numel() == 3 else
                          CandidateResult(None, loss.reshape(()), items, tensors))
                values_ok &= self._compare_terms(result, scale, section, note="as recorded by the candidate")
            self.evidence.values_passed = values_ok
            self._mark("end-to-end", None, "pass" if values_ok else "fail")
            self.recorded_gradients()
            return
        # Nothing recorded: ultralytics' loss applied to the candidate's head outputs, which is what its loss
        # would be if it were right -- a difference here starts in the head.
        if not all(self.cand.has_head(b) for b in self.branches):
            self._row("output", None, names.loss_output(self.case, "loss"), True, section=section,
                      note="not compared: the candidate dump holds neither loss tensors nor head outputs")
            return
        head = {b: self.cand.head(b) for b in self.branches}
        head = head if self.spec.end2end else head[None]
        result = self.oracle.call(self.oracle.convert_preds(head, self.spec),
                                  self.oracle.convert_batch(self.ref.batch(), self.spec))
        values_ok = self._compare_terms(result, 1, section, note=(
            "the candidate dump holds no loss tensors: ultralytics' loss (built-in) applied to the candidate's "
            "head outputs"))
        self.evidence.values_passed = values_ok
        self._mark("end-to-end", None, "pass" if values_ok else "fail")

    def recorded_gradients(self) -> None:
        section = f"{self.section} gradients"
        scale = 1 if self.adapter.batch_scaled else self.spec.batch_size
        ok, failures, seen = True, [], False
        for term in TERMS:
            for branch in self.branches:
                for output in names.HEAD_OUTPUTS:
                    name = names.grad_head(self.case, term, output, branch)
                    mine, ref = self.adapter.dump.get_optional(name), self.dump.get_optional(name)
                    if mine is None or ref is None:
                        continue
                    seen = True
                    tol = self.tol(name)
                    metrics = compare_tensors(ref, mine * scale, tol)
                    ok &= metrics.passed
                    if not metrics.passed:
                        failures.append(name)
                    self._row("gradients", branch, name, metrics.passed, metrics=metrics.as_dict(),
                              tolerance=tol.as_dict(), section=section, where=f"end-to-end ({term} term)",
                              note="as recorded by the candidate" + (
                                  "" if scale == 1 else f"; x B={self.spec.batch_size} (per-image mean)"))
        if seen:
            self.evidence.grads_passed = ok
            self.evidence.grad_failures = failures


def _per_gain_note(result: CandidateResult, term: str, gains: Sequence[float]) -> str:
    if not result.per_gain:
        return ""
    others = ", ".join(f"{t}=0" for t in TERMS if t != term)
    return (f"{term} term: the candidate's loss called with only the {term} gain "
            f"({term}={gains[TERMS.index(term)]:g}, {others}); it returns a scalar")


def _pipeline_key(name: str) -> tuple[int, int]:
    stage, _, tensor = name.partition(".")
    order = list(REPLAY_STAGES)
    s = order.index(stage) if stage in order else len(order)
    outputs = STAGE_OUTPUTS.get(stage, ())
    return s, outputs.index(tensor) if tensor in outputs else len(outputs)


# ---------------------------------------------------------------------------------- assignment differences
@dataclass
class Flip:
    image: int
    anchor: int
    kind: str  # "added" (candidate only), "removed" (reference only), "moved" (another box)
    ref_box: int | None
    cand_box: int | None
    gap: float  # distance of the deciding value from the boundary it crossed (metric, or overlap)
    near_tie: bool


@dataclass
class AssignmentDiff:
    boxes: list[dict]  # per image and box: positives on both sides, anchors added and removed
    flips: list[Flip]
    agree_mask: torch.Tensor  # (B, A) foreground on both sides, same box
    flipped_mask: torch.Tensor  # (B, A)
    common_mask: torch.Tensor  # (B, A) foreground on both sides

    @property
    def real(self) -> list[Flip]:
        return [f for f in self.flips if not f.near_tie]

    @property
    def near_ties(self) -> list[Flip]:
        return [f for f in self.flips if f.near_tie]

    def summary(self) -> str:
        if not self.flips:
            total = sum(b["reference"] for b in self.boxes)
            return f"same foreground anchors and boxes ({total} positives over {len(self.boxes)} boxes)"
        changed = [b for b in self.boxes if b["added"] or b["removed"]]
        parts = [f"image {b['image']} box {b['box']}: {b['reference']} -> {b['candidate']} positives "
                 f"(+{len(b['added'])} -{len(b['removed'])})" for b in changed[:4]]
        more = f", and {len(changed) - 4} more boxes" if len(changed) > 4 else ""
        return (f"{len(self.flips)} anchor flip(s): {len(self.real)} real, {len(self.near_ties)} near-tie; "
                + "; ".join(parts) + more)

    def as_dict(self) -> dict:
        return {"boxes": self.boxes, "flips": [f.__dict__ for f in self.flips[:50]], "real": len(self.real),
                "near_tie": len(self.near_ties)}


def compare_assignment(ref_fg: torch.Tensor, ref_idx: torch.Tensor, cand_fg: torch.Tensor, cand_idx: torch.Tensor,
                       align_metric: torch.Tensor | None, overlaps: torch.Tensor | None,
                       metric_tol: Tolerance, overlap_tol: Tolerance | None = None) -> AssignmentDiff:
    """Foreground anchors and their boxes, reference against candidate, per image and per box.

    A tie-break never changes how many anchors a box gets; it exchanges anchors the reference's own numbers
    cannot tell apart. So, per box, the anchors the candidate added and removed are paired strongest with
    strongest: a pair is a near-tie when the two alignment metrics are equal within tolerance. A box whose count
    of positives changed has real flips. An anchor moved to another box is a near-tie when it overlaps both
    boxes equally within tolerance (the conflict rule keeps the larger overlap).
    """
    overlap_tol = overlap_tol or metric_tol
    ref_fg, cand_fg = ref_fg.bool(), cand_fg.bool()
    ref_idx, cand_idx = ref_idx.long(), cand_idx.long()
    b, a = ref_fg.shape
    agree = ref_fg & cand_fg & (ref_idx == cand_idx)
    flipped = (ref_fg | cand_fg) & ~agree
    moved = ref_fg & cand_fg & (ref_idx != cand_idx)
    if align_metric is not None:
        m = align_metric.shape[1]
    else:
        m = int(max(ref_idx.max(), cand_idx.max())) + 1 if a else 0
    flips: list[Flip] = []
    for image, anchor in moved.nonzero().tolist():
        r_box, c_box = int(ref_idx[image, anchor]), int(cand_idx[image, anchor])
        gap, near = float("nan"), False
        if overlaps is not None:
            o_ref, o_cand = float(overlaps[image, r_box, anchor]), float(overlaps[image, c_box, anchor])
            gap, near = abs(o_cand - o_ref), _within(o_cand, o_ref, overlap_tol)
        flips.append(Flip(image, anchor, "moved", r_box, c_box, gap, near))

    boxes: list[dict] = []
    for image in range(b):
        for box in range(m):
            ref_pos = set((ref_fg[image] & (ref_idx[image] == box)).nonzero().flatten().tolist())
            cand_pos = set((cand_fg[image] & (cand_idx[image] == box)).nonzero().flatten().tolist())
            if not ref_pos and not cand_pos:
                continue
            added, removed = sorted(cand_pos - ref_pos), sorted(ref_pos - cand_pos)
            boxes.append({"image": image, "box": box, "reference": len(ref_pos), "candidate": len(cand_pos),
                          "added": added, "removed": removed})
            flips += _swaps(image, box, [x for x in added if not bool(moved[image, x])],
                            [x for x in removed if not bool(moved[image, x])], align_metric, metric_tol)
    return AssignmentDiff(boxes, flips, agree, flipped, ref_fg & cand_fg)


def _swaps(image: int, box: int, added: list[int], removed: list[int], metric: torch.Tensor | None,
           tol: Tolerance) -> list[Flip]:
    """Flips of one box: paired strongest-with-strongest by the reference's alignment metric."""
    if metric is None:
        return ([Flip(image, x, "added", None, box, float("nan"), False) for x in added]
                + [Flip(image, x, "removed", box, None, float("nan"), False) for x in removed])
    row = metric[image, box]
    added = sorted(added, key=lambda x: -float(row[x]))
    removed = sorted(removed, key=lambda x: -float(row[x]))
    balanced = len(added) == len(removed)  # a tie-break swaps anchors; it never changes the count
    out = []
    for k in range(max(len(added), len(removed))):
        a_val = float(row[added[k]]) if k < len(added) else None
        r_val = float(row[removed[k]]) if k < len(removed) else None
        near = balanced and _within(a_val, r_val, tol)
        gap = abs(a_val - r_val) if a_val is not None and r_val is not None else float("inf")
        if a_val is not None:
            out.append(Flip(image, added[k], "added", None, box, gap, near))
        if r_val is not None:
            out.append(Flip(image, removed[k], "removed", box, None, gap, near))
    return out


def _within(value: float, boundary: float, tol: Tolerance) -> bool:
    """Relative closeness only: alignment metrics are products of small powers (1e-6 is a typical size at
    initialisation), so an absolute tolerance would call anything a tie. A bitwise profile admits exact ties."""
    return value == boundary or abs(value - boundary) <= tol.rtol * max(abs(value), abs(boundary))
