"""The building blocks of the YOLOv8 / YOLO11 detectors, one class per block type of the model yaml.

Written from scratch from what the blocks compute; nothing here imports ultralytics. Parameter names are
deliberately our own (`split_conv`, `norm`, ...): the built-in model is loaded through the same key mapping
(`parity.replay.mapping`) as a user's port, so it exercises that code path instead of bypassing it.

Where two formulations are mathematically equal but round differently (`(q * scale) @ k` versus
`q @ (k * scale)`, `x + f(x)` chains), we use the order of operations ultralytics uses, because the
point of this model is bitwise parity on CPU. Those places say so.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# ultralytics' initialize_weights() sets these on every BatchNorm2d after the model is built.
BN_EPS = 1e-3
BN_MOMENTUM = 0.03


class ConvNormAct(nn.Module):
    """yaml `Conv`: conv (no bias, 'same' padding for odd k) -> BatchNorm -> SiLU (or nothing)."""

    def __init__(self, c_in: int, c_out: int, k: int = 1, s: int = 1, groups: int = 1, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, s, padding=k // 2, groups=groups, bias=False)
        self.norm = nn.BatchNorm2d(c_out, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = nn.SiLU() if act else nn.Identity()

    def forward(self, x):
        return self.act(self.norm(self.conv(x)))


class DepthwiseConvNormAct(ConvNormAct):
    """`DWConv`: one filter per channel group; groups = gcd(c_in, c_out), which is c_in when c_in == c_out."""

    def __init__(self, c_in: int, c_out: int, k: int = 1, s: int = 1, act: bool = True):
        super().__init__(c_in, c_out, k, s, groups=math.gcd(c_in, c_out), act=act)


class Bottleneck(nn.Module):
    """Two convs, plus the input when shapes allow and `shortcut` is set (a residual unit)."""

    def __init__(self, c_in: int, c_out: int, shortcut: bool = True, k: tuple[int, int] = (3, 3),
                 expand: float = 0.5):
        super().__init__()
        hidden = int(c_out * expand)
        self.conv_a = ConvNormAct(c_in, hidden, k[0])
        self.conv_b = ConvNormAct(hidden, c_out, k[1])
        self.residual = shortcut and c_in == c_out

    def forward(self, x):
        y = self.conv_b(self.conv_a(x))
        return x + y if self.residual else y


class C2f(nn.Module):
    """CSP block with a split: one 1x1 conv makes two halves, a chain of bottlenecks grows from the second half,
    and every intermediate (both halves and each bottleneck output) is concatenated into a final 1x1 conv."""

    def __init__(self, c_in: int, c_out: int, n: int = 1, shortcut: bool = False, expand: float = 0.5):
        super().__init__()
        self.hidden = int(c_out * expand)
        h = self.hidden
        self.split_conv = ConvNormAct(c_in, 2 * h, 1)
        self.blocks = nn.ModuleList(self._make_block(h, shortcut) for _ in range(n))
        self.merge_conv = ConvNormAct((2 + n) * h, c_out, 1)

    def _make_block(self, h: int, shortcut: bool) -> nn.Module:
        # C2f's bottlenecks keep the width (expand 1.0) and use two 3x3 convs
        return Bottleneck(h, h, shortcut, k=(3, 3), expand=1.0)

    def forward(self, x):
        parts = list(self.split_conv(x).chunk(2, dim=1))
        for block in self.blocks:
            parts.append(block(parts[-1]))
        return self.merge_conv(torch.cat(parts, dim=1))


class C3k(nn.Module):
    """CSP block with three convs: a bottleneck chain on one 1x1 projection, a plain 1x1 projection beside it,
    both concatenated into a 1x1 merge. Used inside C3k2 when `c3k` is set (YOLO11 m/l/x and some rows)."""

    def __init__(self, c_in: int, c_out: int, n: int = 2, shortcut: bool = True, expand: float = 0.5, k: int = 3):
        super().__init__()
        h = int(c_out * expand)
        # Registered in reading order (chain first), which differs from ultralytics' registration order: the
        # mapping has to match these by shape sequence, not by position.
        self.main_conv = ConvNormAct(c_in, h, 1)
        self.blocks = nn.Sequential(*(Bottleneck(h, h, shortcut, k=(k, k), expand=1.0)
                                      for _ in range(n)))
        self.skip_conv = ConvNormAct(c_in, h, 1)
        self.merge_conv = ConvNormAct(2 * h, c_out, 1)

    def forward(self, x):
        return self.merge_conv(torch.cat((self.blocks(self.main_conv(x)), self.skip_conv(x)), dim=1))


class C3k2(C2f):
    """YOLO11's C2f: same split/concat skeleton, but each inner block is a C3k (c3k=True) or a Bottleneck
    that halves its width internally (expand 0.5, unlike C2f's)."""

    def __init__(self, c_in: int, c_out: int, n: int = 1, c3k: bool = False, expand: float = 0.5,
                 shortcut: bool = True):
        self.use_c3k = c3k
        super().__init__(c_in, c_out, n, shortcut, expand)

    def _make_block(self, h: int, shortcut: bool) -> nn.Module:
        if self.use_c3k:
            return C3k(h, h, 2, shortcut)
        return Bottleneck(h, h, shortcut, k=(3, 3), expand=0.5)


class SPPF(nn.Module):
    """Fast spatial pyramid pooling: project to half width, max-pool three times in a row (receptive fields 5, 9,
    13), concatenate the projection and the three pooled maps, project back."""

    def __init__(self, c_in: int, c_out: int, k: int = 5):
        super().__init__()
        h = c_in // 2
        # The v8/v11 yaml rows predate YOLO26's unactivated SPPF, so this projection keeps its SiLU.
        self.reduce = ConvNormAct(c_in, h, 1, act=True)
        self.pool = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)
        self.expand = ConvNormAct(4 * h, c_out, 1)

    def forward(self, x):
        maps = [self.reduce(x)]
        for _ in range(3):
            maps.append(self.pool(maps[-1]))
        return self.expand(torch.cat(maps, dim=1))


class Attention(nn.Module):
    """Multi-head self-attention over all H*W positions, with a depthwise 3x3 conv on the values added as a
    positional term. One 1x1 conv makes q, k and v; keys are narrower than values (attn_ratio)."""

    def __init__(self, dim: int, num_heads: int = 8, attn_ratio: float = 0.5):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.key_dim = int(self.head_dim * attn_ratio)
        self.scale = self.key_dim ** -0.5
        qkv_channels = dim + 2 * self.key_dim * num_heads
        self.to_qkv = ConvNormAct(dim, qkv_channels, 1, act=False)
        self.out_proj = ConvNormAct(dim, dim, 1, act=False)
        self.pos_conv = ConvNormAct(dim, dim, 3, groups=dim, act=False)

    def forward(self, x):
        b, c, h, w = x.shape
        n = h * w
        # qkv channels are laid out per head as [q (key_dim), k (key_dim), v (head_dim)]
        qkv = self.to_qkv(x).view(b, self.num_heads, 2 * self.key_dim + self.head_dim, n)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.head_dim], dim=2)
        # Scale q before the product (not the product itself): that is the rounding ultralytics has.
        weights = ((q * self.scale).transpose(-2, -1) @ k).softmax(dim=-1)      # (b, heads, n, n)
        out = (v @ weights.transpose(-2, -1)).view(b, c, h, w)
        out = out + self.pos_conv(v.reshape(b, c, h, w))
        return self.out_proj(out)


class PSABlock(nn.Module):
    """Attention then a 2x-wide 1x1 feed-forward, each as a residual."""

    def __init__(self, c: int, attn_ratio: float = 0.5, num_heads: int = 4):
        super().__init__()
        self.attn = Attention(c, num_heads=num_heads, attn_ratio=attn_ratio)
        self.ffn = nn.Sequential(ConvNormAct(c, 2 * c, 1),
                                 ConvNormAct(2 * c, c, 1, act=False))

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.ffn(x)


class C2PSA(nn.Module):
    """Split in two halves, run PSA blocks on the second, concatenate back and project (YOLO11 layer 10)."""

    def __init__(self, c_in: int, c_out: int, n: int = 1, expand: float = 0.5):
        super().__init__()
        if c_in != c_out:
            raise ValueError(f"C2PSA keeps its width, got {c_in} -> {c_out}")
        self.hidden = int(c_in * expand)
        h = self.hidden
        self.split_conv = ConvNormAct(c_in, 2 * h, 1)
        self.blocks = nn.Sequential(*(PSABlock(h, attn_ratio=0.5, num_heads=max(h // 64, 1))
                                      for _ in range(n)))
        self.merge_conv = ConvNormAct(2 * h, c_in, 1)

    def forward(self, x):
        a, b = self.split_conv(x).split((self.hidden, self.hidden), dim=1)
        return self.merge_conv(torch.cat((a, self.blocks(b)), dim=1))


class Concat(nn.Module):
    """Concatenate the inputs along channels."""

    def __init__(self, dim: int = 1):
        super().__init__()
        self.dim = dim

    def forward(self, xs: list[torch.Tensor]):
        return torch.cat(list(xs), dim=self.dim)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling by an integer factor (ultralytics' `nn.Upsample(None, 2, "nearest")`)."""

    def __init__(self, scale: int = 2):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return F.interpolate(x, scale_factor=self.scale, mode="nearest")


def dfl(boxes: torch.Tensor, reg_max: int = 16, bins: torch.Tensor | None = None) -> torch.Tensor:
    """Expected distance per box side from the raw DFL logits.

    boxes: (B, 4 * reg_max, A), channels side-major [l0..l15, t0..t15, r0..r15, b0..b15].
    Returns (B, 4, A): sum_k k * softmax(logits)_k for each side.

    The weighted sum is done as a 1x1 convolution with weights 0..reg_max-1 (`bins`, shape (1, reg_max, 1, 1);
    made on the fly when not given), because that is how ultralytics computes it and a plain
    `(p * bins).sum()` rounds differently.
    """
    b, _, a = boxes.shape
    probs = boxes.view(b, 4, reg_max, a).transpose(2, 1).softmax(dim=1)        # (B, reg_max, 4, A)
    if bins is None:
        bins = torch.arange(reg_max, dtype=boxes.dtype, device=boxes.device).view(1, reg_max, 1, 1)
    return F.conv2d(probs, bins).view(b, 4, a)


class DetectHead(nn.Module):
    """yaml `Detect`: per level, a box branch (two 3x3 convs, then 1x1 to 4*reg_max DFL logits) and a class branch
    (legacy: two 3x3 convs; YOLO11: depthwise 3x3 + 1x1, twice), then 1x1 to nc logits. Train mode returns the
    raw logits with anchors concatenated level-major."""

    def __init__(self, nc: int, in_channels: list[int], reg_max: int = 16, legacy: bool = False):
        super().__init__()
        self.nc = nc
        self.reg_max = reg_max
        self.legacy = legacy
        self.num_levels = len(in_channels)
        # Branch widths are set by the finest level's channels, so every level has the same branch width.
        box_c = max(16, in_channels[0] // 4, 4 * reg_max)
        cls_c = self.class_width(in_channels[0], nc)
        # Per level: box branch then class branch. ultralytics registers all box branches, then all class
        # branches; the mapping matches them by shape, so our reading order is fine.
        self.levels = nn.ModuleList()
        for c in in_channels:
            box = nn.Sequential(ConvNormAct(c, box_c, 3), ConvNormAct(box_c, box_c, 3),
                                nn.Conv2d(box_c, 4 * reg_max, 1))
            if legacy:
                cls = nn.Sequential(ConvNormAct(c, cls_c, 3),
                                    ConvNormAct(cls_c, cls_c, 3),
                                    nn.Conv2d(cls_c, nc, 1))
            else:
                cls = nn.Sequential(
                    nn.Sequential(DepthwiseConvNormAct(c, c, 3),
                                  ConvNormAct(c, cls_c, 1)),
                    nn.Sequential(DepthwiseConvNormAct(cls_c, cls_c, 3),
                                  ConvNormAct(cls_c, cls_c, 1)),
                    nn.Conv2d(cls_c, nc, 1))
            self.levels.append(nn.ModuleDict({"box": box, "cls": cls}))
        # The DFL integral weights 0..reg_max-1, frozen. Kept as a (non-trainable) parameter so the parameter
        # count per layer equals ultralytics' (its DFL conv weight counts as a parameter).
        # (reg_max == 1 means no distribution at all: ultralytics then has no DFL module.)
        self.dfl_bins = (nn.Parameter(torch.arange(reg_max, dtype=torch.float32).view(1, reg_max, 1, 1),
                                      requires_grad=False) if reg_max > 1 else None)

    @staticmethod
    def class_width(finest_channels: int, nc: int) -> int:
        """Width of the class branch: at least the finest level's channels, and at least nc up to 100."""
        return max(finest_channels, min(nc, 100))

    def box_final(self, level: int) -> nn.Conv2d:
        return self.levels[level]["box"][-1]

    def cls_final(self, level: int) -> nn.Conv2d:
        return self.levels[level]["cls"][-1]

    def forward(self, feats: list[torch.Tensor]) -> dict:
        bs = feats[0].shape[0]
        boxes = torch.cat([lvl["box"](x).view(bs, 4 * self.reg_max, -1) for lvl, x in zip(self.levels, feats)], -1)
        scores = torch.cat([lvl["cls"](x).view(bs, self.nc, -1) for lvl, x in zip(self.levels, feats)], -1)
        return {"boxes": boxes, "scores": scores, "feats": feats}

    def stages(self, feats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every sub-stage output, keyed by the path of the same sub-module in ultralytics' Detect
        (`cv2.{l}.{s}` box branch, `cv3.{l}.{s}[.{k}]` class branch, `dfl`)."""
        out: dict[str, torch.Tensor] = {}
        bs = feats[0].shape[0]
        boxes, scores = [], []
        for l, (lvl, x) in enumerate(zip(self.levels, feats)):
            y = x
            for s, stage in enumerate(lvl["box"]):
                y = stage(y)
                out[f"cv2.{l}.{s}"] = y
            boxes.append(y.view(bs, 4 * self.reg_max, -1))
            y = x
            for s, stage in enumerate(lvl["cls"]):
                if isinstance(stage, nn.Sequential):  # depthwise head: two sub-stages per stage
                    for k, sub in enumerate(stage):
                        y = sub(y)
                        out[f"cv3.{l}.{s}.{k}"] = y
                else:
                    y = stage(y)
                out[f"cv3.{l}.{s}"] = y
            scores.append(y.view(bs, self.nc, -1))
        boxes = torch.cat(boxes, -1)
        out["dfl"] = dfl(boxes, self.reg_max, self.dfl_bins) if self.reg_max > 1 else boxes
        return out
