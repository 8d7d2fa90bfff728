#!/usr/bin/env python3
"""A Jittor port of YOLOv8n (train-mode forward and the Detect bias init), driven by yolo-parity files.

It never imports torch or yolo-parity. It reads one file written by `parity export-layers` (every layer's
reference inputs, parameters and expected-output shapes) and writes a candidate dump (docs/dump-format.md):

* `act.{i}` and sub-block outputs `act.{i}.{path}`: one end-to-end train-mode forward on the reference image;
* `isolated.act.{i}` …: each layer run alone on the reference's own inputs (the harness then judges every layer
  on its own, the way its live replay does);
* `init.cls_bias.{l}.stored` / `init.box_bias.{l}.stored`: the biases of a freshly built head after `bias_init`;
* `model.layers`: per layer the trainable parameter count and, apart, the buffer count.

    python examples/jittor/yp_jittor.py --layers-file layers.safetensors --out jittor_dump/ \\
        [--bias clean|intdiv] [--bn-eps 1e-3] [--bn two-pass|stock]

Planted variants (each a real Jittor port's mistake): `--bias intdiv` computes the class prior with integer
division (`5 // nc` is 0 for nc > 5, so the log is -inf); `--bn-eps 1e-5` keeps Jittor's BatchNorm default eps
instead of ultralytics' 1e-3. `--bn stock` uses Jittor's own BatchNorm (float32 one-pass variance), whose
reduction rounding differs from torch's in the last bits: not a bug, and the harness must not call it one.

Jittor must import offline: set `nvcc_path=""` and `use_mkl=0` in the environment (the Makefile target does).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

import jittor as jt
from jittor import nn

REFERENCE_BN_EPS = 1e-3  # ultralytics' initialize_weights(); Jittor's BatchNorm defaults to 1e-5
REG_MAX = 16


# ------------------------------------------------------------------------------------------------ blocks
class TwoPassBatchNorm(nn.Module):
    """Train-mode BatchNorm whose statistics are accumulated in float64 over two passes (mean, then the centred
    variance). A one-pass float32 variance loses the last bits on large feature maps; for a parity check the
    port's normalisation should be at least as exact as torch's."""

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = jt.ones(channels)
        self.bias = jt.zeros(channels)
        self.running_mean = jt.zeros(channels).stop_grad()
        self.running_var = jt.ones(channels).stop_grad()

    def execute(self, x):
        x64 = x.float64()
        mean = x64.mean(dims=(0, 2, 3), keepdims=True)
        var = ((x64 - mean) ** 2).mean(dims=(0, 2, 3), keepdims=True)
        scale = self.weight.float64().reshape(1, -1, 1, 1) / jt.sqrt(var + self.eps)
        y = (x64 - mean) * scale + self.bias.float64().reshape(1, -1, 1, 1)
        return y.float32()


def silu(x):
    return x * jt.sigmoid(x)


class ConvBNSiLU(nn.Module):
    def __init__(self, c_in: int, c_out: int, k: int = 1, s: int = 1, *, norm):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, s, k // 2, bias=False)
        self.bn = norm(c_out)

    def execute(self, x):
        return silu(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool, *, norm):
        super().__init__()
        self.cv1 = ConvBNSiLU(c, c, 3, norm=norm)
        self.cv2 = ConvBNSiLU(c, c, 3, norm=norm)
        self.add = shortcut

    def execute(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    def __init__(self, c_in: int, c_out: int, n: int, shortcut: bool, *, norm):
        super().__init__()
        self.c = c_out // 2
        self.cv1 = ConvBNSiLU(c_in, 2 * self.c, 1, norm=norm)
        self.cv2 = ConvBNSiLU((2 + n) * self.c, c_out, 1, norm=norm)
        self.m = nn.ModuleList([Bottleneck(self.c, shortcut, norm=norm) for _ in range(n)])

    def execute(self, x, record=None):
        first = self.cv1(x)
        _record(record, "cv1", first)
        ys = [first[:, :self.c], first[:, self.c:]]
        for k, block in enumerate(self.m):
            ys.append(block(ys[-1]))
            _record(record, f"m.{k}", ys[-1])
        out = self.cv2(jt.concat(ys, dim=1))
        _record(record, "cv2", out)
        return out


def max_pool_same(x, k: int):
    """k x k max pool, stride 1, 'same' size. Jittor's MaxPool2d refuses a padded window larger than a small map
    (SPPF's P5 map is 4 x 4 at imgsz 128), so the -inf padding is explicit and the pool itself unpadded."""
    p = k // 2
    padded = nn.pad(x, (p, p, p, p), mode="constant", value=-math.inf)
    return nn.pool(padded, k, "maximum", padding=0, stride=1)


class SPPF(nn.Module):
    def __init__(self, c_in: int, c_out: int, k: int = 5, *, norm):
        super().__init__()
        hidden = c_in // 2
        self.cv1 = ConvBNSiLU(c_in, hidden, 1, norm=norm)  # SiLU: yolov8 yaml rows keep cv1's activation
        self.cv2 = ConvBNSiLU(hidden * 4, c_out, 1, norm=norm)
        self.k = k

    def execute(self, x, record=None):
        ys = [self.cv1(x)]
        _record(record, "cv1", ys[0])
        for call in range(3):
            ys.append(max_pool_same(ys[-1], self.k))
            _record(record, "m" if call == 0 else f"m#{call}", ys[-1])
        out = self.cv2(jt.concat(ys, dim=1))
        _record(record, "cv2", out)
        return out


class DetectV8(nn.Module):
    """YOLOv8's head (the legacy class branch): per level a box branch and a class branch, train outputs
    (B, 4 * reg_max, A) and (B, nc, A) with anchors level-major."""

    def __init__(self, nc: int, channels: list[int], *, norm):
        super().__init__()
        self.nc = nc
        box_c = max(16, channels[0] // 4, REG_MAX * 4)
        cls_c = max(channels[0], min(nc, 100))
        self.cv2 = nn.ModuleList([nn.Sequential(ConvBNSiLU(c, box_c, 3, norm=norm), ConvBNSiLU(box_c, box_c, 3, norm=norm),
                                                nn.Conv2d(box_c, 4 * REG_MAX, 1)) for c in channels])
        self.cv3 = nn.ModuleList([nn.Sequential(ConvBNSiLU(c, cls_c, 3, norm=norm), ConvBNSiLU(cls_c, cls_c, 3, norm=norm),
                                                nn.Conv2d(cls_c, nc, 1)) for c in channels])

    def execute(self, feats, record=None):
        boxes, scores = [], []
        for branch, out in (("cv2", boxes), ("cv3", scores)):
            for level, x in enumerate(feats):
                for j, op in enumerate(getattr(self, branch)[level]):
                    x = op(x)
                    _record(record, f"{branch}.{level}.{j}", x)
                _record(record, f"{branch}.{level}", x)
                out.append(x.reshape(x.shape[0], x.shape[1], -1))
        return {"boxes": jt.concat(boxes, dim=2), "scores": jt.concat(scores, dim=2)}


def class_prior_bias(nc: int, stride: float, variant: str) -> np.float32:
    """log(5 / nc / (640 / stride) ** 2) with ultralytics' float32 steps (torch evaluates `x / tensor` as
    reciprocal(tensor) * x; the log is taken in double), or the planted integer division."""
    one = np.float32(1.0)
    grid = (one / np.float32(stride)) * np.float32(640.0)
    area = grid * grid
    prior_num = np.float32(5 // nc) if variant == "intdiv" else np.float32(5.0 / nc)
    with np.errstate(divide="ignore"):
        return np.float32(np.log(np.float64((one / area) * prior_num)))


# ------------------------------------------------------------------------------------------------ model
class Functional(nn.Module):
    """A placeholder that keeps layer indices aligned with ultralytics' for the functional layers."""
# yolov8n: (type, from, args). Channels after width 0.25, repeats after depth 0.33.
YOLOV8N = [
    ("Conv", [-1], (3, 16, 3, 2)), ("Conv", [-1], (16, 32, 3, 2)), ("C2f", [-1], (32, 32, 1, True)),
    ("Conv", [-1], (32, 64, 3, 2)), ("C2f", [-1], (64, 64, 2, True)), ("Conv", [-1], (64, 128, 3, 2)),
    ("C2f", [-1], (128, 128, 2, True)), ("Conv", [-1], (128, 256, 3, 2)), ("C2f", [-1], (256, 256, 1, True)),
    ("SPPF", [-1], (256, 256, 5)), ("Upsample", [-1], ()), ("Concat", [10, 6], ()),
    ("C2f", [-1], (384, 128, 1, False)), ("Upsample", [-1], ()), ("Concat", [13, 4], ()),
    ("C2f", [-1], (192, 64, 1, False)), ("Conv", [-1], (64, 64, 3, 2)), ("Concat", [16, 12], ()),
    ("C2f", [-1], (192, 128, 1, False)), ("Conv", [-1], (128, 128, 3, 2)), ("Concat", [19, 9], ()),
    ("C2f", [-1], (384, 256, 1, False)), ("Detect", [15, 18, 21], ()),
]


class YOLOv8(nn.Module):
    def __init__(self, nc: int, *, norm):
        super().__init__()
        self.layers = nn.ModuleList()
        self.sources: list[list[int]] = []
        for index, (kind, sources, args) in enumerate(YOLOV8N):
            self.sources.append([index - 1 if s == -1 else s for s in sources])
            if kind == "Conv":
                c_in, c_out, k, s = args
                self.layers.append(ConvBNSiLU(c_in, c_out, k, s, norm=norm))
            elif kind == "C2f":
                self.layers.append(C2f(*args, norm=norm))
            elif kind == "SPPF":
                self.layers.append(SPPF(*args, norm=norm))
            elif kind == "Detect":
                self.layers.append(DetectV8(nc, [64, 128, 256], norm=norm))
            else:
                self.layers.append(Functional())  # Upsample and Concat: computed in run_layer, no parameters

    def run_layer(self, index: int, inputs: list, record=None):
        kind = YOLOV8N[index][0]
        if kind == "Upsample":
            return nn.interpolate(inputs[0], scale_factor=2, mode="nearest")
        if kind == "Concat":
            return jt.concat(inputs, dim=1)
        if kind == "Detect":
            return self.layers[index](inputs, record)
        if kind in ("C2f", "SPPF"):
            return self.layers[index](inputs[0], record)
        return self.layers[index](inputs[0])

    def execute(self, img, record=None):
        outs = []
        for index, sources in enumerate(self.sources):
            inputs = [img] if index == 0 else [outs[s] for s in sources]
            outs.append(self.run_layer(index, inputs, _scoped(record, index)))
        return outs


def _record(record, path: str, value) -> None:
    if record is not None:
        record(path, value)


def _scoped(record, index: int):
    if record is None:
        return None
    return lambda path, value: record(f"act.{index}.{path}", value)


def bias_init(head: DetectV8, strides: list[float], variant: str) -> None:
    for level, stride in enumerate(strides):
        head.cv2[level][-1].bias.assign(jt.full((4 * REG_MAX,), 2.0))
        value = class_prior_bias(head.nc, stride, variant)
        head.cv3[level][-1].bias.assign(jt.full((head.nc,), float(value)))


# ------------------------------------------------------------------------------------------------ files
class LayersFile:
    """The file `parity export-layers` writes: layer i's tensors under `layer.{i}.`, its metadata in `layers`."""

    def __init__(self, path: Path):
        with safe_open(str(path), framework="numpy") as handle:
            meta = handle.metadata() or {}
            if meta.get("schema") != "yolo-parity-layers":
                raise SystemExit(f"{path}: not a file written by `parity export-layers` (schema {meta.get('schema')!r})")
            self.meta = {int(k): v for k, v in json.loads(meta["layers"]).items()}
            # expected.* are the answers: a port never reads them.
            self.tensors = {n: handle.get_tensor(n) for n in handle.keys() if ".expected." not in n}

    def inputs(self, index: int) -> list[np.ndarray]:
        count = len(json.loads(self.meta[index]["inputs"]))
        return [self.tensors[f"layer.{index}.input.{k}"] for k in range(count)]

    def params(self) -> dict[str, np.ndarray]:
        """Every layer's parameters and buffers under ultralytics' names (`model.{i}.…`)."""
        prefix = ".param."
        return {n.split(prefix, 1)[1]: t for n, t in self.tensors.items() if prefix in n}

    def head_facts(self) -> tuple[int, list[float]]:
        head = max(self.meta)
        return json.loads(self.meta[head]["nc"]), json.loads(self.meta[head]["strides"])


def load_reference_weights(model: YOLOv8, params: dict[str, np.ndarray]) -> None:
    """Ultralytics names onto this port's: `model.{i}.` is `layers.{i}.`. Not placed: BatchNorm's
    `num_batches_tracked` (this port keeps no counter) and the DFL's frozen 1x1 conv (its weights are the fixed
    bins 0..15; the train-mode outputs never pass through it)."""
    own = {k: v for k, v in model.state_dict().items()}
    missing = []
    for name, value in params.items():
        if name.endswith("num_batches_tracked") or ".dfl." in name:
            continue
        key = "layers." + name[len("model."):]
        if key not in own:
            missing.append(name)
            continue
        own[key].assign(jt.array(value))
    if missing:
        raise SystemExit(f"the reference has {len(missing)} tensors this port cannot place, e.g. {missing[:3]}")


def counts(model: YOLOv8) -> list[dict]:
    """Per layer: trainable parameters, and buffers apart (Jittor's parameters() lists running stats too)."""
    rows = []
    for index, layer in enumerate(model.layers):
        kind = YOLOV8N[index][0]
        trainable = buffers = 0
        if kind not in ("Upsample", "Concat"):
            for name, value in layer.state_dict().items():
                if name.endswith(("running_mean", "running_var")):
                    buffers += int(np.prod(value.shape))
                else:
                    trainable += int(np.prod(value.shape))
        rows.append({"index": index, "type": kind, "parameters": trainable, "buffers": buffers})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers-file", required=True, type=Path, help="written by `parity export-layers`")
    parser.add_argument("--out", required=True, type=Path, help="candidate dump directory to write")
    parser.add_argument("--bias", choices=("clean", "intdiv"), default="clean")
    parser.add_argument("--bn-eps", type=float, default=REFERENCE_BN_EPS)
    parser.add_argument("--bn", choices=("two-pass", "stock"), default="two-pass")
    args = parser.parse_args(argv)
    jt.flags.use_cuda = 0

    if args.bn == "stock":
        norm = lambda c: nn.BatchNorm(c, eps=args.bn_eps, is_train=True)  # noqa: E731
    else:
        norm = lambda c: TwoPassBatchNorm(c, args.bn_eps)  # noqa: E731
    layers_file = LayersFile(args.layers_file)
    nc, strides = layers_file.head_facts()

    fresh = YOLOv8(nc, norm=norm)
    bias_init(fresh.layers[-1], strides, args.bias)
    out: dict[str, np.ndarray] = {}
    for level in range(len(strides)):
        out[f"init.cls_bias.{level}.stored"] = fresh.layers[-1].cv3[level][-1].bias.numpy()
        out[f"init.box_bias.{level}.stored"] = fresh.layers[-1].cv2[level][-1].bias.numpy()

    model = YOLOv8(nc, norm=norm)
    load_reference_weights(model, layers_file.params())
    model.train()

    def keep(prefix: str):
        def record(name: str, value) -> None:
            out[prefix + name] = value.numpy()
        return record

    img = jt.array(layers_file.inputs(0)[0])
    chained = model(img, keep(""))
    for index, value in enumerate(chained):
        _write_layer_output(out, f"act.{index}", value)
    for index in range(len(YOLOV8N)):
        inputs = [jt.array(x) for x in layers_file.inputs(index)]
        value = model.run_layer(index, inputs, _scoped(keep("isolated."), index))
        _write_layer_output(out, f"isolated.act.{index}", value)
        print(f"layer {index:2d} {YOLOV8N[index][0]:8s} isolated", file=sys.stderr)

    write_dump(args.out, out, counts(model), producer=f"examples/jittor (jittor {jt.__version__}, bias {args.bias}, "
                                                       f"bn {args.bn} eps {args.bn_eps:g})")
    print(f"wrote {args.out}: {len(out)} tensors")
    return 0


def _write_layer_output(out: dict, name: str, value) -> None:
    if isinstance(value, dict):
        for key, tensor in value.items():
            out[f"{name}.{key}"] = tensor.numpy()
    else:
        out[name] = value.numpy()


def write_dump(directory: Path, tensors: dict[str, np.ndarray], layer_rows: list[dict], *, producer: str) -> None:
    """A candidate dump: manifest.json + one safetensors file, written beside and renamed into place."""
    import os
    import shutil
    import tempfile

    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.partial-", dir=directory.parent))
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
    save_file(tensors, str(tmp / "outputs.safetensors"))
    manifest = {"schema": "yolo-parity-dump", "schema_version": 1, "kind": "candidate", "producer": producer,
                "model": {"layers": layer_rows},
                "tensors": {k: {"file": "outputs.safetensors", "dtype": "F32", "shape": list(v.shape)}
                            for k, v in tensors.items()}}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    if directory.exists():
        if not (directory / "manifest.json").exists():
            shutil.rmtree(tmp)
            raise SystemExit(f"{directory} exists and is not a dump: not replacing it")
        shutil.rmtree(directory)
    os.replace(tmp, directory)


if __name__ == "__main__":
    sys.exit(main())
