"""Known model causes: transforms of one clean layer of the built-in detector, and their plants.

A transform takes a (copied) clean layer module and returns the module to run instead; it never edits
`parity.reimpl`. The same transform plants the cause in a whole built-in detector (`Plant.apply`).
"""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from parity.causes.registry import Cause, plant, register
from parity.reimpl.blocks import Bottleneck, ConvNormAct, DetectHead

CONV_LAYERS = ("Conv", "C2f", "C3k2", "SPPF", "C2PSA")


# ----------------------------------------------------------------------------------------- modules
class Interpolate(nn.Module):
    """Upsampling by another interpolation than ultralytics' nearest."""

    def __init__(self, scale: int, mode: str, align_corners: bool | None):
        super().__init__()
        self.scale, self.mode, self.align_corners = scale, mode, align_corners

    def forward(self, x):
        return F.interpolate(x, scale_factor=self.scale, mode=self.mode, align_corners=self.align_corners)


class Scaled(nn.Module):
    """The wrapped layer's output times a constant."""

    def __init__(self, inner: nn.Module, k: float):
        super().__init__()
        self.inner, self.k = inner, k

    def forward(self, x):
        return self.inner(x) * self.k


class ScaledInput(nn.Module):
    """The wrapped Concat with one of its inputs times a constant (a feature scaled before a torch.cat)."""

    def __init__(self, inner: nn.Module, slot: int, k: float):
        super().__init__()
        self.inner, self.slot, self.k = inner, slot, k

    def forward(self, xs):
        return self.inner([x * self.k if i == self.slot else x for i, x in enumerate(xs)])


class Permuted(nn.Module):
    """A Concat whose inputs arrive in another order."""

    def __init__(self, inner: nn.Module, order: tuple[int, ...]):
        super().__init__()
        self.inner, self.order = inner, tuple(order)

    def forward(self, xs):
        xs = list(xs)
        return self.inner([xs[i] for i in self.order])


class DuplicateLast(nn.Module):
    """A Concat that appends one more copy of its last input."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, xs):
        xs = list(xs)
        return self.inner(xs + [xs[-1]])


class ZeroPaddedMaxPool(nn.Module):
    """Max pooling over a zero-padded map (ultralytics pads with -inf: border maxima differ where values < 0)."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x):
        p = self.k // 2
        return F.max_pool2d(F.pad(x, (p, p, p, p), value=0.0), self.k, stride=1)


class HandWrittenSiLU(nn.Module):
    """x * sigmoid(x): SiLU as many ports write it (differs from F.silu by rounding only)."""

    def forward(self, x):
        return x * torch.sigmoid(x)


class ScaleAfterProduct(nn.Module):
    """Attention with the 1/sqrt(key_dim) scale applied to the q.k product instead of to q (rounding only)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        att = self.inner
        b, c, h, w = x.shape
        qkv = att.to_qkv(x).view(b, att.num_heads, 2 * att.key_dim + att.head_dim, h * w)
        q, k, v = qkv.split([att.key_dim, att.key_dim, att.head_dim], dim=2)
        weights = ((q.transpose(-2, -1) @ k) * att.scale).softmax(dim=-1)
        out = (v @ weights.transpose(-2, -1)).view(b, c, h, w)
        return att.out_proj(out + att.pos_conv(v.reshape(b, c, h, w)))


def attention_scale_order(module, *, order: str = "after-product"):
    from parity.reimpl.blocks import PSABlock

    module = copy.deepcopy(module)
    for unit in module.modules():
        if isinstance(unit, PSABlock):
            unit.attn = ScaleAfterProduct(unit.attn)
    return module


ACTIVATIONS = {
    "identity": nn.Identity,
    "relu": nn.ReLU,
    "leaky-relu-0.1": lambda: nn.LeakyReLU(0.1),
    "hardswish": nn.Hardswish,
    "silu-handwritten": HandWrittenSiLU,
}


# --------------------------------------------------------------------------------------- transforms
def upsample_mode(module, *, mode: str, align_corners: bool | None = None):
    return Interpolate(getattr(module, "scale", 2), mode, align_corners)


def feature_scale(module, *, k: float):
    return Scaled(module, k)


def fit_scale(place) -> list[dict]:
    """Least-squares k with candidate = k * reference, and that k rounded to a few significant digits."""
    ref, cand = place.reference_output.double().flatten(), place.candidate_output.double().flatten()
    if ref.shape != cand.shape or not bool(torch.isfinite(cand).all()):
        return []
    denominator = float((ref * ref).sum())
    if denominator == 0:
        return []
    k = float((ref * cand).sum()) / denominator
    if not math.isfinite(k) or k == 0 or abs(k - 1) < 1e-7:
        return []
    proposals = []
    for digits in (1, 2, 4):
        rounded = float(f"{k:.{digits}g}")
        if rounded not in proposals:
            proposals.append(rounded)
    return [{"k": value} for value in proposals]


def input_scale(module, *, input: int, k: float):  # noqa: A002 - the parameter is named as the finding says it
    return ScaledInput(module, input, k)


def fit_input_scale(place) -> list[dict]:
    """Per input of a Concat: the least-squares k of its slice of channels (candidate = k * reference there),
    rounded to a few significant digits; only inputs whose k is not 1."""
    inputs = list(place.inputs or [])
    ref, cand = place.reference_output.double(), place.candidate_output.double()
    if len(inputs) < 2 or ref.shape != cand.shape or ref.dim() < 2 or not bool(torch.isfinite(cand).all()):
        return []
    proposals, start = [], 0
    for slot, tensor in enumerate(inputs):
        width = tensor.shape[1]
        r, c = ref[:, start:start + width].flatten(), cand[:, start:start + width].flatten()
        start += width
        denominator = float((r * r).sum())
        k = float((r * c).sum()) / denominator if denominator else math.nan
        if not math.isfinite(k) or k == 0 or abs(k - 1) < 1e-7:
            continue
        for digits in (1, 2, 4):
            proposal = {"input": slot, "k": float(f"{k:.{digits}g}")}
            if proposal not in proposals:
                proposals.append(proposal)
    return proposals


def _blocks(module) -> list[nn.Module]:
    return list(getattr(module, "blocks", []))


def residual_shortcut(module, *, block):
    """Flip the residual of inner block `block` (an index into `m`, or "all")."""
    module = copy.deepcopy(module)
    blocks = _blocks(module)
    chosen = blocks if block == "all" else [blocks[block]]
    for inner in chosen:
        for unit in inner.modules():
            if isinstance(unit, Bottleneck):
                unit.residual = not unit.residual
    return module


def fit_shortcut(place) -> list[dict]:
    n = len(_blocks(place.layer))
    return [{"block": j} for j in range(n)] + ([{"block": "all"}] if n > 1 else [])


def bn_eps(module, *, eps: float):
    module = copy.deepcopy(module)
    for norm in module.modules():
        if isinstance(norm, nn.modules.batchnorm._BatchNorm):
            norm.eps = eps
    return module


def activation(module, *, act: str):
    module = copy.deepcopy(module)
    for unit in module.modules():
        if isinstance(unit, ConvNormAct) and isinstance(unit.act, nn.SiLU):
            unit.act = ACTIVATIONS[act]()
    return module


def concat_order(module, *, order):
    return Permuted(module, order)


def fit_concat_order(place) -> list[dict]:
    n = len(place.inputs)
    return [{"order": p} for p in itertools.permutations(range(n)) if p != tuple(range(n))]


def concat_duplicate(module):
    return DuplicateLast(module)


def sppf_padding(module, *, padding: str):
    module = copy.deepcopy(module)
    module.pool = ZeroPaddedMaxPool(module.pool.kernel_size)
    return module


# ---------------------------------------------------------------------------------------- registry
register(Cause(
    "upsample-mode", "model", ("Upsample",),
    "the upsampling uses another interpolation than ultralytics' nearest-neighbour: use "
    "F.interpolate(x, scale_factor=2, mode='nearest')",
    upsample_mode,
    params=({"mode": "bilinear", "align_corners": False}, {"mode": "bilinear", "align_corners": True},
            {"mode": "nearest-exact"}, {"mode": "bicubic", "align_corners": False},
            {"mode": "bicubic", "align_corners": True})))
register(Cause(
    "feature-scale", "model", CONV_LAYERS + ("Upsample", "Concat"),
    "the layer's output is the reference's times a constant k: look for a stray multiplier (a unit or "
    "normalisation factor) applied to this tensor and remove it",
    feature_scale, fit=fit_scale))
register(Cause(
    "input-scale", "model", ("Concat",),
    "one input of the concatenation is the reference's times a constant k: look for a stray multiplier "
    "applied to that feature before the torch.cat and remove it",
    input_scale, fit=fit_input_scale))
register(Cause(
    "residual-shortcut", "model", ("C2f", "C3k2"),
    "a bottleneck inside this block has its residual shortcut the other way round from ultralytics "
    "(the yaml's `shortcut` argument; C2f defaults to off, C3k2 to on): pass the row's shortcut flag through",
    residual_shortcut, fit=fit_shortcut))
register(Cause(
    "bn-eps", "model", CONV_LAYERS + ("Detect",),
    "the layer's BatchNorm uses another eps than ultralytics' 1e-3 (PyTorch's default is 1e-5): set "
    "eps=1e-3, momentum=0.03 on every BatchNorm2d",
    bn_eps, params=({"eps": 1e-5}, {"eps": 1e-4}, {"eps": 1e-2}, {"eps": 0.0})))
register(Cause(
    "activation", "model", CONV_LAYERS + ("Detect",),
    "the layer's convolutions use another activation than ultralytics' SiLU (or none): use SiLU after "
    "every Conv+BatchNorm",
    activation, params=({"act": "identity"}, {"act": "relu"}, {"act": "leaky-relu-0.1"}, {"act": "hardswish"})))
register(Cause(
    "silu-handwritten", "model", CONV_LAYERS,
    "SiLU written as x * sigmoid(x): equal to F.silu up to rounding, not a bug",
    activation, params=({"act": "silu-handwritten"},), benign=True))
register(Cause(
    "attention-scale-order", "model", ("C2PSA",),
    "attention scaled after the q.k product instead of before: equal up to rounding, not a bug",
    attention_scale_order, params=({"order": "after-product"},), benign=True))
register(Cause(
    "concat-order", "model", ("Concat",),
    "the layer concatenates its inputs in another order than the yaml's `from` list: concatenate them in "
    "that order",
    concat_order, fit=fit_concat_order))
register(Cause(
    "concat-duplicate", "model", ("Concat",),
    "the Concat appends an extra copy of its last input (and the next layer was widened to take it): "
    "concatenate each input once",
    lambda module, **_: concat_duplicate(module), params=({},)))
register(Cause(
    "sppf-padding", "model", ("SPPF",),
    "SPPF's max pooling pads with zeros instead of -inf (nn.MaxPool2d's padding): pad with -inf or use "
    "nn.MaxPool2d(k, 1, k // 2)",
    sppf_padding, params=({"padding": "zero"},)))
register(Cause(
    "wiring", "model", ("wiring",),
    "the layer is fed another layer's output of the same shape: fix its `from` wiring"))
register(Cause(
    "bn-momentum", "structure", ("batchnorm",),
    "BatchNorm momentum differs from ultralytics' 0.03 (PyTorch's default is 0.1): a train-mode forward is "
    "unchanged but the running statistics drift; set momentum=0.03"))
for _variant, _text in (("float32", "the Detect class bias log(5/nc/(640/stride)^2) is computed all in float32 "
                                    "(ultralytics squares and divides in float32 but takes the log in float64)"),
                        ("float64", "the Detect class bias is computed all in float64 and rounded once "
                                    "(ultralytics squares and divides in float32 first)"),
                        ("skipped", "the Detect bias init is never applied: PyTorch's default conv bias remains; "
                                    "call bias_init after building the head"),
                        ("nonfinite", "the Detect class bias is not finite: 5 / nc in integer division is 0 "
                                      "for nc > 5 and log(0) = -inf; divide in floating point"),
                        ("formula", "the Detect class bias follows another formula than "
                                    "log(5 / nc / (640 / stride) ** 2)")):
    register(Cause(f"bias-init-{_variant}", "structure", ("bias-init",), _text))


class FirstLevelWidthHead(DetectHead):
    """A Detect head whose class branch is as wide as the finest level only (the nc floor forgotten)."""

    @staticmethod
    def class_width(finest_channels: int, nc: int) -> int:
        return finest_channels


class UncappedWidthHead(DetectHead):
    """A Detect head whose class-branch width floor is nc without ultralytics' cap at 100."""

    @staticmethod
    def class_width(finest_channels: int, nc: int) -> int:
        return max(finest_channels, nc)


CLASS_WIDTH_RULES = {
    "max(c, min(nc, 100))": DetectHead,
    "c (no nc floor)": FirstLevelWidthHead,
    "max(c, nc) (no cap at 100)": UncappedWidthHead,
}
register(Cause(
    "class-branch-width", "structure", ("Detect",),
    "the Detect class branch has another width than ultralytics' max(c_P3, min(nc, 100)): use that width "
    "for every level",
    params=tuple({"rule": rule} for rule in CLASS_WIDTH_RULES if rule != "max(c, min(nc, 100))")))


# ------------------------------------------------------------------------------------------ planting
def _layers_of(detector, kind: str) -> list[int]:
    return [i for i, t in enumerate(detector.layer_types()) if t == kind]


def _first_neck(detector, kind: str) -> int:
    """The first layer of type `kind` after SPPF (the neck), else the first of that type."""
    types = detector.layer_types()
    start = types.index("SPPF") if "SPPF" in types else 0
    found = [i for i in _layers_of(detector, kind) if i > start] or _layers_of(detector, kind)
    if not found:
        raise ValueError(f"{detector.model_name} has no {kind} layer to plant the cause in")
    return found[0]


def _replace(detector, index: int, module: nn.Module) -> None:
    detector.layers[index] = module


def _plant_every(kind: str, transform, **params):
    def apply(detector):
        for i in _layers_of(detector, kind):
            _replace(detector, i, transform(detector.layers[i], **params))
    return apply


def _plant_at(index_of, transform, **params):
    def apply(detector):
        i = index_of(detector)
        _replace(detector, i, transform(detector.layers[i], **params))
    return apply


def _plant_all_conv_layers(transform, **params):
    def apply(detector):
        for i, t in enumerate(detector.layer_types()):
            if t in CONV_LAYERS:
                _replace(detector, i, transform(detector.layers[i], **params))
    return apply


def _widen_first_neck_concat(detector) -> None:
    """The Concat appends another copy of its last input; its consumers are rebuilt wider to accept it."""
    index = _first_neck(detector, "Concat")
    spec = detector.specs[index]
    extra = spec.c_in[-1]
    spec.c_out += extra
    _replace(detector, index, DuplicateLast(detector.layers[index]))
    for later in detector.specs[index + 1:]:
        if index in later.sources:
            later.c_in = [c + extra if s == index else c for c, s in zip(later.c_in, later.sources)]
            _replace(detector, later.index, detector.build_layer(later))


def _miswire(detector) -> None:
    """The first Concat input that has an earlier same-shape twin reads the twin instead (the `from` mix-up)."""
    specs = detector.specs
    for i in _layers_of(detector, "Concat"):
        for slot, source in enumerate(specs[i].sources):
            twins = [j for j in range(i) if j != source and j not in specs[i].sources
                     and specs[j].c_out == specs[source].c_out and specs[j].stride == specs[source].stride
                     and specs[j].type != "Upsample"]
            if twins:
                detector.sources[i][slot] = twins[-1]
                return
    raise ValueError(f"{detector.model_name}: no Concat input has a same-shape twin to miswire")


def _bias_variant(variant: str):
    @torch.no_grad()
    def apply(detector) -> None:
        head = detector.head
        for level in range(head.num_levels):
            if variant == "skipped":
                for conv in (head.box_final(level), head.cls_final(level)):
                    bound = 1 / math.sqrt(conv.weight[0].numel())     # PyTorch's default conv bias init
                    nn.init.uniform_(conv.bias, -bound, bound)
                continue
            head.cls_final(level).bias[: detector.nc] = class_bias_variant(detector, level, variant)
    return apply


def class_bias_variant(detector, level: int, variant: str) -> torch.Tensor:
    """The class-prior logit computed another way than ultralytics (float32 scalar tensor)."""
    nc, stride = detector.nc, detector.strides[level].cpu()
    if variant == "float32":   # every step in float32, the log too (numpy's logf)
        s = np.float32(stride.item())
        prior = np.float32(5) / np.float32(nc) / (np.float32(640) / s) ** np.float32(2)
        return torch.tensor(np.log(prior), dtype=torch.float32)
    if variant == "float64":   # every step in float64, rounded to float32 once at the end
        return torch.tensor(math.log(5.0 / nc / (640.0 / float(stride.item())) ** 2), dtype=torch.float32)
    if variant == "int-division":   # C-style 5 / nc on integers, 0 for nc > 5: log(0) = -inf
        prior = torch.tensor(float(5 // nc), dtype=torch.float32) / (640 / stride) ** 2
        return torch.log(prior)
    raise ValueError(f"unknown bias init variant {variant!r}")


def _momentum_layer4(detector) -> None:
    for norm in detector.layers[4].modules():
        if isinstance(norm, nn.modules.batchnorm._BatchNorm):
            norm.momentum = 0.1


def _narrow_class_branch(detector) -> None:
    old = detector.head
    in_channels = [detector.specs[s].c_out for s in detector.sources[detector.head_index]]
    head = FirstLevelWidthHead(detector.nc, in_channels, detector.reg_max, legacy=detector.legacy_head)
    head.dfl_bins = old.dfl_bins
    _replace(detector, detector.head_index, head)
    detector.bias_init()


plant("bias-init-float32", "bias-init-float32",
      "Detect class bias log(5/nc/(640/stride)^2) computed entirely in float32 (one ULP off at e.g. nc=12)",
      _bias_variant("float32"))
plant("bias-init-float64", "bias-init-float64",
      "Detect class bias computed entirely in float64, rounded once (one ULP off at e.g. nc=8)",
      _bias_variant("float64"))
plant("bias-init-skipped", "bias-init-skipped",
      "Detect bias_init never called: PyTorch's default uniform conv bias init remains", _bias_variant("skipped"))
plant("bias-init-int-division", "bias-init-nonfinite",
      "Detect class bias with C-style integer division 5 / nc: 0 for nc > 5, log(0) = -inf",
      _bias_variant("int-division"))
plant("concat-channels", "concat-duplicate",
      "the first neck Concat appends an extra copy of its last input; the next layer is built wider for it",
      _widen_first_neck_concat)
plant("upsample-bilinear", "upsample-mode", "Upsample layers use bilinear interpolation instead of nearest",
      _plant_every("Upsample", upsample_mode, mode="bilinear", align_corners=False))
plant("bn-eps", "bn-eps", "every BatchNorm of layer 4 uses PyTorch's default eps 1e-5 instead of ultralytics' 1e-3",
      _plant_at(lambda d: 4, bn_eps, eps=1e-5))
plant("bn-momentum", "bn-momentum",
      "every BatchNorm of layer 4 uses PyTorch's default momentum 0.1 instead of ultralytics' 0.03",
      _momentum_layer4)
plant("feature-scale", "feature-scale", "layer 6's output is multiplied by 0.01 (a stray unit factor)",
      _plant_at(lambda d: 6, feature_scale, k=0.01))
plant("input-scale", "input-scale", "the first neck Concat's second input is multiplied by 0.01 before the cat",
      _plant_at(lambda d: _first_neck(d, "Concat"), input_scale, input=1, k=0.01))
plant("shortcut-flipped", "residual-shortcut",
      "the first neck C2f/C3k2 has its first bottleneck's residual shortcut the other way round",
      lambda d: _replace(d, (i := _first_neck(d, "C3k2" if "C3k2" in d.layer_types() else "C2f")),
                         residual_shortcut(d.layers[i], block=0)))
plant("activation-relu", "activation", "layer 1's convolution uses ReLU instead of SiLU",
      _plant_at(lambda d: 1, activation, act="relu"))
plant("activation-missing", "activation", "layer 1's convolution has no activation (SiLU left out)",
      _plant_at(lambda d: 1, activation, act="identity"))
plant("silu-handwritten", "silu-handwritten",
      "every SiLU written as x * sigmoid(x) (benign: equal up to rounding, must pass)",
      _plant_all_conv_layers(activation, act="silu-handwritten"))
plant("attention-scale-order", "attention-scale-order",
      "attention scaled after the q.k product (benign: equal up to rounding, must pass)",
      _plant_every("C2PSA", attention_scale_order))
plant("concat-order", "concat-order", "the first neck Concat concatenates its two inputs in reverse order",
      _plant_at(lambda d: _first_neck(d, "Concat"), concat_order, order=(1, 0)))
plant("sppf-zero-padding", "sppf-padding", "SPPF max-pools a zero-padded map instead of a -inf padded one",
      _plant_every("SPPF", sppf_padding, padding="zero"))
plant("wiring", "wiring", "a Concat reads another layer's same-shape output instead of the one in its `from`",
      _miswire)
plant("class-branch-narrow", "class-branch-width",
      "the Detect class branch is as wide as the P3 input only (ultralytics: max(c_P3, min(nc, 100)))",
      _narrow_class_branch)
