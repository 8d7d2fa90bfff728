"""A clean-room YOLOv8 / YOLO11 detection model, built from ultralytics' model yaml files.

The yaml files are data (the architecture tables shipped with ultralytics); this module reads them with
`yaml.safe_load` and builds its own blocks (`blocks.py`). No ultralytics code is imported or called.

    model = build_detector("yolo11n.yaml", nc=80)
    out = model(img)                       # {"boxes": (B, 4*16, A), "scores": (B, nc, A), "feats": [P3, P4, P5]}
    every = model.forward_layers(img)      # the output of every yaml row, in order

Layer `i` of `model.layers` is row `i` of the yaml (backbone rows, then head rows), the same index as
ultralytics' `model.model[i]`; `model.sources[i]` lists the absolute indices it reads (`[-1]` for layer 0: the
image). Parameter names are our own; `parity.replay.mapping` maps them onto ultralytics' `model.{i}.…` names by
order and shape (see `Detector.layer_map`).
"""

from __future__ import annotations

import importlib.util
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import yaml

from .blocks import C2PSA, C2f, C3k2, Concat, ConvNormAct, DetectHead, SPPF, Upsample, dfl

__all__ = ["Detector", "LayerSpec", "build_detector", "build_layer", "dfl", "find_model_yaml", "parse_model_yaml"]

# Rows that take the repeat count as an argument (the others must have n == 1 here).
_REPEATED = {"C2f", "C3k2", "C2PSA"}
# Rows whose presence makes ultralytics build the depthwise (non-legacy) class branch in Detect.
_NON_LEGACY = {"C3k2", "A2C2f", "C2fCIB"}
_SUPPORTED = {"Conv", "C2f", "C3k2", "SPPF", "C2PSA", "Upsample", "Concat", "Detect"}


# --------------------------------------------------------------------------------------------------------------
# yaml

def _models_dir() -> Path:
    # find_spec locates the installed package without importing it (and nothing under ultralytics.nn).
    spec = importlib.util.find_spec("ultralytics")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the ultralytics package is not installed: its model yaml files are needed")
    return Path(list(spec.submodule_search_locations)[0]) / "cfg" / "models"


def find_model_yaml(model: str) -> tuple[Path, str]:
    """`yolo11n.yaml` -> (`.../cfg/models/11/yolo11.yaml`, "n"). A path to an existing file is used as is, its
    scale taken from the name when it carries one (`my-yolov8s.yaml` -> "s"), else the yaml's first scale."""
    p = Path(model if str(model).endswith((".yaml", ".yml")) else f"{model}.yaml")
    m = re.search(r"yolo(?:e-)?v?\d+([nslmx])", p.stem)
    scale = m.group(1) if m else ""
    if p.is_file():
        return p, scale
    # the scale letter is not part of the file name: yolov8n -> yolov8, yolo11x -> yolo11
    unified = re.sub(r"(\d+)([nslmx])(.+)?$", r"\1\3", p.stem) + p.suffix
    hits = sorted(_models_dir().rglob(unified))
    if not hits:
        raise FileNotFoundError(f"no model yaml named {unified!r} (from {model!r}) under {_models_dir()}")
    return hits[0], scale


@dataclass
class LayerSpec:
    """One yaml row after scaling: what to build and where its inputs come from."""
    index: int
    type: str                 # yaml module name without "nn." ("Conv", "C2f", "Upsample", ...)
    sources: list[int]        # absolute indices; [-1] for layer 0 (the image)
    repeats: int              # depth-scaled repeat count
    args: list[Any]           # yaml args with "nc" and "None" resolved, channels not yet scaled
    c_in: list[int] = field(default_factory=list)
    c_out: int = 0
    stride: float = 1.0       # total downsampling of this layer's output


def _make_divisible(x: float, divisor: int = 8) -> int:
    return math.ceil(x / divisor) * divisor


def parse_model_yaml(model: str = "yolo11n.yaml", nc: int = 80) -> dict:
    """Read a detection yaml and resolve every row: scaled repeats and channels, absolute sources, strides."""
    path, scale = find_model_yaml(model)
    cfg = yaml.safe_load(path.read_text())
    scales = cfg.get("scales")
    if scales:
        scale = scale or next(iter(scales))
        depth, width, max_channels = scales[scale]
    else:
        depth, width, max_channels = cfg.get("depth_multiple", 1.0), cfg.get("width_multiple", 1.0), float("inf")
    reg_max = cfg.get("reg_max", 16)
    if cfg.get("end2end"):
        raise NotImplementedError(f"{model}: end-to-end heads are not part of the built-in model")
    rows = cfg["backbone"] + cfg["head"]
    types = [r[2].removeprefix("nn.") for r in rows]
    unsupported = sorted(set(types) - _SUPPORTED)
    if unsupported:
        raise NotImplementedError(f"{model}: the built-in model has no {', '.join(unsupported)}")
    specs: list[LayerSpec] = []
    for i, (frm, n, _, args) in enumerate(rows):
        spec = _resolve_row(model, i, types[i], frm, n, args, specs, nc=nc, depth=depth)
        spec.c_out = _channels_out(spec, width, max_channels)
        spec.stride = _output_stride(model, spec, specs)
        specs.append(spec)
    if types[-1] != "Detect":
        raise NotImplementedError(f"{model}: the last row must be Detect")
    return {"path": str(path), "scale": scale, "nc": nc, "reg_max": reg_max, "layers": specs,
            "legacy": not (set(types) & _NON_LEGACY),
            "head_strides": [specs[s].stride for s in specs[-1].sources]}


def _resolve_row(model: str, i: int, t: str, frm, n: int, args: list, earlier: list[LayerSpec], *, nc: int,
                 depth: float) -> LayerSpec:
    """Row `i` with "nc" and "None" resolved, absolute sources, the depth-scaled repeat count and the input
    channels (from the `earlier` rows)."""
    args = [nc if a == "nc" else None if a == "None" else a for a in args]
    froms = [frm] if isinstance(frm, int) else list(frm)
    sources = [-1] if i == 0 else [i - 1 if f == -1 else (f % i if f < 0 else f) for f in froms]
    c_in = [3] if i == 0 else [earlier[s].c_out for s in sources]
    reps = max(round(n * depth), 1) if n > 1 else n
    if t not in _REPEATED and reps != 1:
        raise NotImplementedError(f"{model} row {i}: repeated {t} rows are not supported")
    return LayerSpec(i, t, sources, reps, args, c_in)


def _channels_out(spec: LayerSpec, width: float, max_channels: float) -> int:
    t = spec.type
    if t in {"Conv", "C2f", "C3k2", "SPPF", "C2PSA"}:
        return _make_divisible(min(spec.args[0], max_channels) * width, 8)
    if t == "Concat":
        return sum(spec.c_in)
    if t == "Upsample":
        return spec.c_in[0]
    return 0


def _output_stride(model: str, spec: LayerSpec, earlier: list[LayerSpec]) -> float:
    """Total downsampling of the row's output, from its inputs' (the image's is 1)."""
    s_in = [1.0] if spec.index == 0 else [earlier[s].stride for s in spec.sources]
    if spec.type == "Conv":
        return s_in[0] * (spec.args[2] if len(spec.args) > 2 else 1)
    if spec.type == "Upsample":
        return s_in[0] / spec.args[1]
    if spec.type == "Concat" and len(set(s_in)) != 1:
        raise ValueError(f"{model} row {spec.index}: Concat of maps at different strides {s_in}")
    return s_in[0]


# --------------------------------------------------------------------------------------------------------------
# the model

def build_layer(spec: LayerSpec, *, scale: str, nc: int, reg_max: int, legacy: bool) -> nn.Module:
    """The module for one yaml row."""
    t, a, c1, c2, n = spec.type, spec.args, spec.c_in[0], spec.c_out, spec.repeats
    if t == "Conv":
        return ConvNormAct(c1, c2, a[1] if len(a) > 1 else 1, a[2] if len(a) > 2 else 1)
    if t == "C2f":
        return C2f(c1, c2, n, shortcut=bool(a[1]) if len(a) > 1 else False)
    if t == "C3k2":
        c3k = bool(a[1]) if len(a) > 1 else False
        if scale in {"m", "l", "x"}:      # the larger YOLO11 scales use C3k inner blocks on every row
            c3k = True
        return C3k2(c1, c2, n, c3k=c3k, expand=a[2] if len(a) > 2 else 0.5)
    if t == "SPPF":
        return SPPF(c1, c2, a[1] if len(a) > 1 else 5)
    if t == "C2PSA":
        return C2PSA(c1, c2, n)
    if t == "Upsample":
        return Upsample(a[1])
    if t == "Concat":
        return Concat(a[0] if a else 1)
    if t == "Detect":
        return DetectHead(nc, spec.c_in, reg_max, legacy=legacy)
    raise NotImplementedError(t)


class Detector(nn.Module):
    """The detector: `layers[i]` is yaml row `i`; `forward` runs the rows in order, feeding each the outputs
    named by `sources[i]`, and returns the head's train-mode dict."""

    def __init__(self, model: str = "yolo11n.yaml", nc: int = 80):
        super().__init__()
        parsed = parse_model_yaml(model, nc)
        specs: list[LayerSpec] = parsed["layers"]
        self.model_name = model
        self.scale = parsed["scale"]
        self.nc = nc
        self.reg_max = parsed["reg_max"]
        self.head_index = len(specs) - 1
        self.legacy_head = parsed["legacy"]
        self.specs = specs
        self.sources = [list(s.sources) for s in specs]
        self._types = [s.type for s in specs]
        self.layers = nn.ModuleList(self.build_layer(s) for s in specs)
        # A non-persistent buffer: it follows .to(device) but is not in the state_dict (ultralytics has no such
        # tensor under model.*, so it would be an unexpected key for the mapping).
        self.register_buffer("strides", torch.tensor(parsed["head_strides"], dtype=torch.float32),
                             persistent=False)
        self.bias_init()

    def build_layer(self, spec: LayerSpec) -> nn.Module:
        """A fresh module for one row of this model (after `spec`'s widths changed, say)."""
        return build_layer(spec, scale=self.scale, nc=self.nc, reg_max=self.reg_max, legacy=self.legacy_head)

    # ---- structure ------------------------------------------------------------------------------------------
    def layer_types(self) -> list[str]:
        """ultralytics' class name for each layer ("Conv", "C2f", ..., "Detect")."""
        return list(self._types)

    @property
    def layer_map(self) -> dict[str, int]:
        """Our key prefix of each layer -> ultralytics layer index (what `parity.replay.mapping` groups blocks by)."""
        return {f"layers.{i}.": i for i in range(len(self.layers))}

    @property
    def head(self) -> DetectHead:
        return self.layers[self.head_index]

    # ---- forward --------------------------------------------------------------------------------------------
    def run_layer(self, i: int, inputs: list[torch.Tensor]) -> Any:
        """Run layer `i` alone on the given inputs (one tensor per entry of `sources[i]`)."""
        layer = self.layers[i]
        if self._types[i] in ("Concat", "Detect"):
            return layer(list(inputs))
        if len(inputs) != 1:
            raise ValueError(f"layer {i} ({self._types[i]}) takes one input, got {len(inputs)}")
        return layer(inputs[0])

    def forward_layers(self, img: torch.Tensor) -> list:
        outs: list = []
        for i in range(len(self.layers)):
            inputs = [img] if i == 0 else [outs[j] for j in self.sources[i]]
            outs.append(self.run_layer(i, inputs))
        return outs

    def forward(self, img: torch.Tensor) -> dict:
        # Keep only outputs that a later layer still reads; the rest can be freed as we go.
        last_use = {}
        for i, srcs in enumerate(self.sources):
            for j in srcs:
                last_use[j] = i
        outs: dict[int, Any] = {}
        x: Any = img
        for i in range(len(self.layers)):
            inputs = [img] if i == 0 else [outs[j] for j in self.sources[i]]
            x = self.run_layer(i, inputs)
            outs[i] = x
            for j in self.sources[i]:
                if last_use.get(j) == i:
                    outs.pop(j, None)
        return x

    def head_stages(self, feats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Detect internals keyed like the dump's `act.{head}.{path}` without that prefix:
        `cv2.{l}.{s}`, `cv3.{l}.{s}` (and `cv3.{l}.{s}.{k}` for the depthwise head), `dfl`."""
        return self.head.stages(feats)

    def dfl(self, boxes: torch.Tensor) -> torch.Tensor:
        """Expected box-side distances (B, 4, A) from the head's raw `boxes` (B, 4*reg_max, A)."""
        return dfl(boxes, self.reg_max, self.head.dfl_bins) if self.reg_max > 1 else boxes

    def layer_stages(self, i: int, inputs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Outputs of the direct children of layer `i`, under ultralytics' child names (`conv`, `bn`, `act` of a
        Conv; `cv1`, `m.{j}`, `cv2` of a C2f/C3k2; `cv1`, `cv2` of SPPF; `cv1`, `m`, `cv2` of C2PSA).
        The Detect head gives `head_stages`. SPPF's pool is called three times, so it has no single output."""
        layer = self.layers[i]
        out: dict[str, torch.Tensor] = {}
        if isinstance(layer, DetectHead):
            return layer.stages(list(inputs))
        x = inputs[0] if len(inputs) == 1 else None
        if isinstance(layer, ConvNormAct):
            out["conv"] = y = layer.conv(x)
            out["bn"] = y = layer.norm(y)
            out["act"] = layer.act(y)
        elif isinstance(layer, C2f):       # C3k2 too
            out["cv1"] = y = layer.split_conv(x)
            parts = list(y.chunk(2, dim=1))
            for j, block in enumerate(layer.blocks):
                parts.append(block(parts[-1]))
                out[f"m.{j}"] = parts[-1]
            out["cv2"] = layer.merge_conv(torch.cat(parts, 1))
        elif isinstance(layer, SPPF):
            out["cv1"] = y = layer.reduce(x)
            maps = [y]
            for _ in range(3):
                maps.append(layer.pool(maps[-1]))
            out["cv2"] = layer.expand(torch.cat(maps, 1))
        elif isinstance(layer, C2PSA):
            out["cv1"] = y = layer.split_conv(x)
            a, b = y.split((layer.hidden, layer.hidden), dim=1)
            out["m"] = b = layer.blocks(b)
            out["cv2"] = layer.merge_conv(torch.cat((a, b), 1))
        return out

    # ---- Detect bias initialisation -------------------------------------------------------------------------
    def class_prior_logit(self, level: int) -> torch.Tensor:
        """Initial class logit: log of a prior of 5 objects per 640x640 image spread over nc classes and the
        (640/stride)^2 cells of the level. Returned as a float32 scalar tensor.

        ultralytics' arithmetic: 640 / stride and the square run in float32 (stride is a float32 tensor), the
        quotient too; math.log then takes that float32 value as a double, and the store rounds back."""
        stride = self.strides[level].cpu()          # a float32 tensor element, as in ultralytics
        prior = 5 / self.nc / (640 / stride) ** 2
        return torch.tensor(math.log(prior), dtype=torch.float32)

    @torch.no_grad()
    def bias_init(self) -> None:
        """Detect biases: box logits 2.0 (a flat start that cancels in the DFL softmax), class logits at the prior
        above. Needs `strides`."""
        for level in range(self.head.num_levels):
            self.head.box_final(level).bias.fill_(2.0)
            self.head.cls_final(level).bias[: self.nc] = self.class_prior_logit(level)

    def extra_repr(self) -> str:
        return f"model={self.model_name!r}, scale={self.scale!r}, nc={self.nc}, reg_max={self.reg_max}"


def build_detector(model: str = "yolo11n.yaml", nc: int = 80) -> Detector:
    """Build the built-in detector. Known causes are planted into it from outside (`parity.causes.plant`)."""
    return Detector(model, nc=nc)
