#!/usr/bin/env python3
"""A numpy-only port of a few ultralytics layers, driven by yolo-parity layer files (no torch anywhere).

This is what a Jittor / MindSpore / plain-numpy port looks like from the harness's side: it reads files written
by `parity export-layer` with `safetensors.numpy`, runs the layer with its own code, and writes its outputs
under the protocol's names for `parity check-layer` (or as a candidate dump for `parity compare --candidate`).

    python examples/numpy/yp_numpy.py --layer-file layer0.safetensors --out port0.safetensors
    python examples/numpy/yp_numpy.py --layer-file l0.safetensors l9.safetensors l11.safetensors l12.safetensors \\
        --out-dir outs/ --dump numpy_dump/ [--dtype float64]

Layers implemented (ultralytics 8.4): Conv (conv + BatchNorm + SiLU), SPPF, nn.Upsample (nearest, x2), Concat.

Arithmetic: convolutions are im2col + one matrix product; BatchNorm uses the batch's own mean and biased
variance over (N, H, W) (train mode, as the reference was captured), eps 1e-3. `--dtype float32` (default)
computes in float32 like a real port; the result is not bitwise torch's (another summation order) but within
the cpu-fp32 profile. `--dtype float64` computes in double and rounds once at the end (closer to exact).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

BN_EPS = 1e-3  # ultralytics' initialize_weights()


# ------------------------------------------------------------------------------------------------ reading
class LayerFile:
    """An export-layer file: metadata, inputs, parameters (ultralytics names), declared output shapes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with safe_open(str(self.path), framework="numpy") as handle:
            self.meta = handle.metadata() or {}
            self.tensors = {name: handle.get_tensor(name) for name in handle.keys()
                            if not name.startswith("expected.")}  # a port never needs the answers
        if self.meta.get("schema") != "yolo-parity-layer":
            raise SystemExit(f"{self.path}: not a layer file written by `parity export-layer`")
        self.layer = int(self.meta["layer"])
        self.type = self.meta["type"]
        self.output_shapes: dict[str, list[int]] = json.loads(self.meta.get("output_shapes", "{}"))
        count = len(json.loads(self.meta["inputs"]))
        self.inputs = [self.tensors[f"input.{k}"] for k in range(count)]

    def param(self, path: str) -> np.ndarray:
        return self.tensors[f"param.model.{self.layer}.{path}"]


# ----------------------------------------------------------------------------------------------- the ops
def conv2d(x: np.ndarray, w: np.ndarray, stride: int = 1, groups: int = 1, dtype=np.float32) -> np.ndarray:
    """Cross-correlation with 'same' padding k // 2 (ultralytics' autopad), via im2col and one matmul per group."""
    x = x.astype(dtype, copy=False)
    w = w.astype(dtype, copy=False)
    b, c, h, wd = x.shape
    o, cg, k, _ = w.shape
    pad = k // 2
    ho = (h + 2 * pad - k) // stride + 1
    wo = (wd + 2 * pad - k) // stride + 1
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    # cols[b, c, i, j, y, x] = xp[b, c, y*stride + i, x*stride + j]
    cols = np.empty((b, c, k, k, ho, wo), dtype=dtype)
    for i in range(k):
        for j in range(k):
            cols[:, :, i, j] = xp[:, :, i:i + stride * ho:stride, j:j + stride * wo:stride]
    og = o // groups
    out = np.empty((b, o, ho * wo), dtype=dtype)
    for g in range(groups):
        patch = cols[:, g * cg:(g + 1) * cg].reshape(b, cg * k * k, ho * wo)
        kernel = w[g * og:(g + 1) * og].reshape(og, cg * k * k)
        out[:, g * og:(g + 1) * og] = np.matmul(kernel, patch)
    return out.reshape(b, o, ho, wo)


def batchnorm_train(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float = BN_EPS) -> np.ndarray:
    """Train-mode BatchNorm2d: the batch's mean and biased variance over (N, H, W)."""
    dtype = x.dtype
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    var = ((x - mean) ** 2).mean(axis=(0, 2, 3), keepdims=True)
    invstd = (1.0 / np.sqrt(var + dtype.type(eps))).astype(dtype)
    return ((x - mean) * invstd * weight.astype(dtype).reshape(1, -1, 1, 1)
            + bias.astype(dtype).reshape(1, -1, 1, 1)).astype(dtype)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (x.dtype.type(1) + np.exp(-x))


def conv_block(lf: LayerFile, path: str, x: np.ndarray, *, stride: int = 1, act: bool = True, dtype=np.float32):
    """ultralytics Conv: conv (no bias) -> BatchNorm (train) -> SiLU (Identity when act=False)."""
    prefix = f"{path}." if path else ""
    w = lf.param(f"{prefix}conv.weight")
    groups = x.shape[1] // w.shape[1]
    y = conv2d(x, w, stride, groups, dtype)
    y = batchnorm_train(y, lf.param(f"{prefix}bn.weight"), lf.param(f"{prefix}bn.bias"))
    return silu(y) if act else y


def maxpool(x: np.ndarray, k: int = 5) -> np.ndarray:
    """MaxPool2d(k, stride 1, padding k // 2): padding never wins (PyTorch pads with -inf)."""
    pad = k // 2
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=-np.inf)
    h, w = x.shape[2:]
    out = np.full_like(x, -np.inf)
    for i in range(k):
        for j in range(k):
            np.maximum(out, xp[:, :, i:i + h, j:j + w], out=out)
    return out


# -------------------------------------------------------------------------------------------- the layers
def sppf_cv1_activation(lf: LayerFile, choice: str = "auto") -> bool:
    """Whether SPPF's cv1 ends with SiLU. ultralytics 8.4 builds SPPF.cv1 with act=False (YOLO26), but
    parse_model puts SiLU back for yaml rows with at most 3 arguments (`SPPF, [1024, 5]` in yolov8/yolo11 yaml):
    "legacy YAML rows predate the unactivated YOLO26 SPPF". A port has to know which yaml it follows."""
    if choice != "auto":
        return choice == "silu"
    return "26" not in Path(lf.meta.get("model", "")).stem


def run_layer(lf: LayerFile, dtype=np.float32, sppf_cv1_act: str = "auto") -> dict[str, np.ndarray]:
    """Outputs under the protocol's names: `act.{i}` and, where the reference has them, sub-module outputs."""
    i = lf.layer
    out: dict[str, np.ndarray] = {}
    if lf.type == "Conv":
        x = lf.inputs[0]
        # the stride is the layer's yaml argument; the manifest's declared output shape gives it here
        stride = x.shape[2] // lf.output_shapes[f"act.{i}"][2]
        out[f"act.{i}"] = conv_block(lf, "", x, stride=stride, dtype=dtype)
    elif lf.type == "SPPF":
        # cv1 (1x1 Conv, SiLU or not: see sppf_cv1_activation), 3 poolings k=5 stride 1, concat, cv2 (1x1 Conv)
        y = [conv_block(lf, "cv1", lf.inputs[0], act=sppf_cv1_activation(lf, sppf_cv1_act), dtype=dtype)]
        out[f"act.{i}.cv1"] = y[0]
        for n in range(3):
            y.append(maxpool(y[-1], 5))
            out[f"act.{i}.m" + (f"#{n}" if n else "")] = y[-1]
        out[f"act.{i}.cv2"] = conv_block(lf, "cv2", np.concatenate(y, axis=1), dtype=dtype)
        out[f"act.{i}"] = out[f"act.{i}.cv2"]
    elif lf.type == "Upsample":
        out[f"act.{i}"] = lf.inputs[0].repeat(2, axis=2).repeat(2, axis=3)  # nearest, scale factor 2
    elif lf.type == "Concat":
        out[f"act.{i}"] = np.concatenate(lf.inputs, axis=1)
    else:
        raise SystemExit(f"{lf.path}: layer {i} is a {lf.type}; this example ports Conv, SPPF, Upsample, Concat")
    return {name: np.ascontiguousarray(t.astype(np.float32)) for name, t in out.items()}


# ------------------------------------------------------------------------------------------------ writing
def write_dump(path: Path, tensors: dict[str, np.ndarray], producer: dict) -> None:
    """A candidate dump: one safetensors file + manifest.json (schema, schema_version, kind, tensors index)."""
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "outputs.safetensors"), metadata={"producer": "yolo-parity examples/numpy"})
    manifest = {
        "schema": "yolo-parity-dump",
        "schema_version": 1,
        "kind": "candidate",
        "producer": producer,
        "tensors": {name: {"file": "outputs.safetensors", "dtype": "F32", "shape": list(t.shape)}
                    for name, t in tensors.items()},
    }
    (path / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer-file", nargs="+", required=True, help="file(s) written by `parity export-layer`")
    parser.add_argument("--out", help="output .safetensors (one layer file only)")
    parser.add_argument("--out-dir", help="write layer{i}.safetensors per layer file here")
    parser.add_argument("--dump", help="also write every output into one candidate dump directory")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="compute precision")
    parser.add_argument("--sppf-cv1-act", choices=("auto", "silu", "none"), default="auto",
                        help="SPPF cv1 activation (auto: SiLU except for YOLO26 yaml files)")
    args = parser.parse_args(argv)
    if args.out and len(args.layer_file) != 1:
        parser.error("--out takes one --layer-file; use --out-dir for several")
    if not (args.out or args.out_dir or args.dump):
        parser.error("give --out, --out-dir or --dump")
    dtype = np.float32 if args.dtype == "float32" else np.float64
    everything: dict[str, np.ndarray] = {}
    for file in args.layer_file:
        lf = LayerFile(file)
        outputs = run_layer(lf, dtype, args.sppf_cv1_act)
        if args.out:
            save_file(outputs, args.out, metadata={"producer": "yolo-parity examples/numpy", "dtype": args.dtype})
        if args.out_dir:
            Path(args.out_dir).mkdir(parents=True, exist_ok=True)
            save_file(outputs, str(Path(args.out_dir) / f"layer{lf.layer}.safetensors"),
                      metadata={"producer": "yolo-parity examples/numpy", "dtype": args.dtype})
        everything.update(outputs)
        print(f"layer {lf.layer} ({lf.type}): wrote {', '.join(outputs)}")
    if args.dump:
        write_dump(Path(args.dump), everything, {"tool": "yolo-parity examples/numpy", "dtype": args.dtype,
                                                 "numpy": np.__version__, "torch_imported": sys.modules.get("torch") is not None})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
