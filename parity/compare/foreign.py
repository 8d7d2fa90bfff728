"""Precise diagnostics for dumps and files written by a port in another language (C++, Jittor, MindSpore, numpy).

A foreign port fails in foreign ways before a single number is wrong: a tensor written NHWC, float64 where the
protocol stores float32, a name that is almost the protocol's, a file cut short, a manifest written for another
schema version. These functions name such problems exactly, so the comparison can say "write it as X" instead
of "shape mismatch".

Two pure entry points, both without side effects and without raising on bad content:

    diagnose_foreign_tensor(name, ref, cand) -> list[str]
        Why a candidate tensor that does not match the reference might be a layout/dtype/encoding problem, and
        which transformation (a permutation, a cast, a byte swap, a channel reorder) would make it match.
        Empty when nothing foreign explains it (then the numbers themselves differ).

    check_candidate_dump(path, reference=None) -> list[Problem]
        Everything wrong with a candidate dump directory (or a single .safetensors file) as a container:
        missing/invalid manifest, another schema or schema version, truncated or corrupt safetensors files, an
        index that disagrees with the files, names outside the protocol (with the nearest protocol name).

`check_safetensors_file(path)` and `name_problem(name, known)` are the building blocks, also used by
`parity check-layer`. docs/porting-protocol.md lists what a port must write.
"""

from __future__ import annotations

import difflib
import itertools
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import torch

from parity.dump import names
from parity.dump.files import MANIFEST, SCHEMA, SCHEMA_VERSION
from parity.dump.header import DTYPE_SIZES, MAX_HEADER_BYTES, HeaderRead, dtype_label, parse_header
from parity.findings import REPORT_SCHEMA

LAYER_SCHEMA = "yolo-parity-layer"


@dataclass
class Problem:
    """One thing wrong with a candidate dump or file. `code` is a stable id (tests and tools key on it)."""

    code: str
    message: str
    severity: str = "error"  # "error": the dump cannot be used as is; "warning": it can, but something is off
    file: str | None = None
    tensor: str | None = None
    suggestion: str | None = None

    def __str__(self) -> str:
        return self.message

    def as_dict(self) -> dict:
        return asdict(self)


def errors(problems: Iterable[Problem]) -> list[Problem]:
    return [p for p in problems if p.severity == "error"]


# ============================================================================================ tensors
def _tolerance_for(name: str):
    from parity.compare.tolerances import get_profile

    return get_profile("cpu-fp32").for_name(name, mode="isolated")


def _matches(ref: torch.Tensor, cand: torch.Tensor, tol) -> tuple[bool, bool]:
    """(bitwise equal, within tol) for two same-shape tensors."""
    from parity.compare.metrics import compare_tensors

    if list(ref.shape) != list(cand.shape):
        return False, False
    metrics = compare_tensors(ref, cand, tol)
    return metrics.exact, metrics.passed


def _how(exact: bool) -> str:
    return "bitwise" if exact else "within the cpu-fp32 tolerance"


def _perm_words(perm: list[int], rank: int) -> str:
    if rank == 4 and perm == [0, 3, 1, 2]:
        return " (it was written NHWC; the protocol is NCHW)"
    if rank == 4 and perm == [0, 2, 3, 1]:
        return " (it was written NCHW-transposed: (B, W, C, H)?)"
    if rank == 4 and perm == [0, 1, 3, 2]:
        return " (height and width swapped: (B, C, W, H))"
    if rank == 3 and perm == [0, 2, 1]:
        return " (the last two dimensions are transposed: anchors-major instead of channels-major)"
    if rank == 2 and perm == [1, 0]:
        return " (transposed)"
    if rank == 4 and perm == [1, 0, 2, 3]:
        return " (batch and channel dimensions swapped: a conv weight written (in, out, kh, kw)?)"
    return ""



def diagnose_foreign_tensor(name: str, ref: torch.Tensor, cand: torch.Tensor, tol=None) -> list[str]:
    """Foreign-port explanations for `cand` not matching `ref` (see the module docstring). Pure; never raises.

    `tol` defaults to the cpu-fp32 tolerance for `name`. Each message says what was found and the exact
    transformation that makes the candidate match, or that it still differs after it.
    """
    try:
        return _diagnose(name, ref.detach().cpu(), cand.detach().cpu(), tol or _tolerance_for(name))
    except Exception as error:  # noqa: BLE001 - a diagnosis must never turn into a crash of the comparison
        return [f"{name}: (foreign-tensor diagnosis failed: {type(error).__name__}: {error})"]


def _diagnose(name: str, ref: torch.Tensor, cand: torch.Tensor, tol) -> list[str]:
    out: list[str] = []
    if cand.dtype != ref.dtype:
        out.append(_dtype_message(name, ref, cand, tol))
        if cand.is_floating_point() and ref.is_floating_point():
            cand = cand.to(ref.dtype)  # the rest is judged on the values, in the reference's precision
    for explain in (_byte_order, _permutation, _shape_mismatch):
        message = explain(name, ref, cand, tol)
        if message is not None:
            return out + [message]
    if list(ref.shape) != list(cand.shape) or _matches(ref, cand, tol)[1]:
        return out
    return out + _value_encodings(name, ref, cand, tol)


def _dtype_message(name: str, ref: torch.Tensor, cand: torch.Tensor, tol) -> str:
    """What a dtype other than the protocol's means (and, for floats, whether the cast values match)."""
    rname, cname = dtype_label(ref.dtype), dtype_label(cand.dtype)
    if ref.is_floating_point() and cand.is_floating_point():
        cast = cand.to(ref.dtype)
        verdict = ""
        if list(ref.shape) == list(cand.shape):
            exact, ok = _matches(ref, cast, tol)
            verdict = (f"; cast to {rname} it matches the reference {_how(exact)}" if ok else
                       f"; cast to {rname} it still differs ({_summary(ref, cast, tol)})")
        if torch.finfo(cand.dtype).bits > torch.finfo(ref.dtype).bits:
            return (f"{name} is {cname}, the protocol stores {rname}: the port computed or wrote it in higher "
                    f"precision (write .astype(float32) / .to(torch::kFloat32) before saving){verdict}")
        return (f"{name} is {cname}, the protocol stores {rname}: half precision loses about 3 decimal "
                f"digits, far beyond the float32 tolerances (compute and write float32){verdict}")
    if ref.is_floating_point() != cand.is_floating_point():
        return (f"{name} is {cname}, the protocol stores {rname}"
                + ("; integer data where floats are expected (a truncating cast?)" if ref.is_floating_point()
                   else "; floats where the protocol has integer/bool values"))
    return f"{name} is {cname}, the protocol stores {rname} (values are compared exactly after widening)"


def _byte_order(name: str, ref: torch.Tensor, cand: torch.Tensor, tol) -> str | None:
    """Big-endian elements (same shape and dtype)."""
    if list(ref.shape) != list(cand.shape) or ref.dtype != cand.dtype or cand.element_size() not in (2, 4, 8) \
            or not cand.numel() or _matches(ref, cand, tol)[1]:
        return None
    exact, ok = _matches(ref, _byteswap(cand), tol)
    if not ok:
        return None
    return (f"{name}: its bytes are big-endian; safetensors stores little-endian. Byte-swapping every "
            f"element makes it match {_how(exact)}")


def _permutation(name: str, ref: torch.Tensor, cand: torch.Tensor, tol) -> str | None:
    """A permuted layout: a different shape, or the same shape with equal-sized dimensions."""
    rshape, cshape = list(ref.shape), list(cand.shape)
    if not (len(rshape) == len(cshape) and sorted(rshape) == sorted(cshape) and 1 < len(rshape) <= 5):
        return None
    if rshape == cshape and _matches(ref, cand, tol)[1]:
        return None
    for perm in itertools.permutations(range(len(cshape))):
        perm = list(perm)
        if perm == list(range(len(cshape))) or [cshape[i] for i in perm] != rshape:
            continue
        exact, ok = _matches(ref, cand.permute(*perm).contiguous(), tol)
        if ok:
            return (f"{name} has shape {cshape}, the reference {rshape}: candidate.permute{tuple(perm)} matches "
                    f"the reference {_how(exact)}{_perm_words(perm, len(rshape))}. Write it as "
                    f"{_layout_name(rshape, name)}")
    if rshape == cshape:
        return None
    from parity.compare.metrics import shape_difference

    _, perm = shape_difference(rshape, cshape)
    if perm is None:
        return None
    return (f"{name} has shape {cshape}, the reference {rshape}: candidate.permute{tuple(perm)} has "
            f"the reference's shape{_perm_words(perm, len(rshape))}, but the values still differ "
            f"after it ({_summary(ref, cand.permute(*perm).contiguous(), tol)})")


def _shape_mismatch(name: str, ref: torch.Tensor, cand: torch.Tensor, tol) -> str | None:
    """Another shape that no permutation explains: flattened, reshaped, or simply different."""
    rshape, cshape = list(ref.shape), list(cand.shape)
    if rshape == cshape:
        return None
    if ref.numel() != cand.numel() or not ref.numel():
        return f"{name} has shape {cshape}, the reference {rshape}: {_shape_words(rshape, cshape)}"
    exact, ok = _matches(ref, cand.reshape(rshape), tol)
    if ok:
        return (f"{name} has shape {cshape}, the reference {rshape}: the same values in the same order, only "
                f"the shape differs ({_how(exact)} after reshape({', '.join(map(str, rshape))})). Write the "
                f"shape in the header as the protocol's")
    return (f"{name} has shape {cshape}, the reference {rshape}: the same number of elements, but a plain "
            f"reshape does not reproduce the reference (a permuted layout flattened?)")


def _value_encodings(name: str, ref: torch.Tensor, cand: torch.Tensor, tol) -> list[str]:
    """Same shape and dtype, other values: non-finite values, BGR, 0..255 pixels, (W, H) axes, head layouts,
    a channel order."""
    out = []
    if cand.is_floating_point():
        nonfinite = int((~torch.isfinite(cand)).sum())
        ref_nonfinite = int((~torch.isfinite(ref)).sum()) if ref.is_floating_point() else 0
        if nonfinite and not ref_nonfinite:
            out.append(f"{name} holds {nonfinite} non-finite value(s) (NaN/Inf) where the reference is finite")
    if ref.dim() == 4 and ref.shape[1] == 3:
        exact, ok = _matches(ref, cand.flip(1), tol)
        if ok:
            return out + [f"{name}: its colour channels are in reverse order (BGR); the protocol is RGB. Reversing "
                          f"dimension 1 makes it match {_how(exact)}"]
    if name == names.batch_img() and ref.is_floating_point():
        exact, ok = _matches(ref, cand / 255.0, tol)
        if ok or float(cand.abs().max()) > 2.0 >= float(ref.abs().max()):
            return out + [f"{name} looks like 0..255 pixel values; the protocol stores RGB in [0, 1] (divide by 255)"]
    if ref.dim() == 4 and ref.shape[-1] == ref.shape[-2] and ref.shape[-1] > 1:
        exact, ok = _matches(ref, cand.transpose(-1, -2).contiguous(), tol)
        if ok:
            return out + [f"{name}: rows and columns are swapped (the port's image axes are (W, H)); transposing "
                          f"the last two dimensions makes it match {_how(exact)}"]
    out.extend(_head_layouts(name, ref, cand, tol))
    if not out and ref.dim() == 4 and ref.shape[1] > 1 and ref.shape[1] == cand.shape[1]:
        swapped = _concat_order(ref, cand, tol)  # a permutation of the channels (e.g. a Concat in the other order)
        if swapped:
            out.append(f"{name}: {swapped}")
    return out


def _head_layouts(name: str, ref: torch.Tensor, cand: torch.Tensor, tol) -> list[str]:
    """Detect-head specific encodings of `act.{i}.boxes` / `.scores` (B, C, A)."""
    out = []
    if ref.dim() != 3:
        return out
    b, c, a = ref.shape
    if name.endswith(".boxes") and c % 4 == 0 and c > 4:
        bins = c // 4
        # bin-major [l0 t0 r0 b0 l1 ...] instead of side-major [l0..l15 t0..t15 ...]
        guess = cand.reshape(b, bins, 4, a).transpose(1, 2).reshape(b, c, a)
        exact, ok = _matches(ref, guess, tol)
        if ok:
            out.append(f"{name}: box channels are bin-major ([l0, t0, r0, b0, l1, ...]); ultralytics is side-major "
                       f"([l0..l{bins - 1}, t0..t{bins - 1}, r..., b...]). Reordering makes it match {_how(exact)}")
            return out
    # anchors concatenated coarse-to-fine (P5 first) instead of P3 first; square images: A = a0 (1 + 1/4 + 1/16)
    if a % 21 == 0:
        a2 = a // 21
        sizes = [16 * a2, 4 * a2, a2]
        parts = list(torch.split(cand, list(reversed(sizes)), dim=-1))
        guess = torch.cat(list(reversed(parts)), dim=-1)
        exact, ok = _matches(ref, guess, tol)
        if ok:
            out.append(f"{name}: the detection levels are concatenated coarsest first (P5, P4, P3); ultralytics "
                       f"concatenates P3 (stride 8) first. Reversing the level order makes it match {_how(exact)}")
            return out
        # within each level: column-major anchors (x fastest vs y fastest)
        pieces, start = [], 0
        for size in sizes:
            side = int(round(math.sqrt(size)))
            if side * side != size:
                return out
            piece = cand[..., start:start + size].reshape(b, c, side, side).transpose(-1, -2).reshape(b, c, size)
            pieces.append(piece)
            start += size
        exact, ok = _matches(ref, torch.cat(pieces, -1), tol)
        if ok:
            out.append(f"{name}: anchors within each level are column-major (y fastest); ultralytics flattens each "
                       f"level row-major (x fastest). Transposing each level's grid makes it match {_how(exact)}")
    return out


def _concat_order(ref: torch.Tensor, cand: torch.Tensor, tol) -> str:
    """A two-way channel split in the other order (Concat inputs swapped)."""
    c = ref.shape[1]
    # the reference's channel 0 must be some candidate channel j = c - split: find those first (one pass)
    first = ref[:, :1].double()
    scale = float(first.abs().max()) or 1.0
    closeness = (cand.double() - first).abs().flatten(2).amax(dim=(0, 2))
    starts = [j for j in range(1, c) if float(closeness[j]) <= 1e-3 * scale]
    for j in starts:
        split = c - j
        guess = torch.cat([cand[:, c - split:], cand[:, :c - split]], 1)
        exact, ok = _matches(ref, guess, tol)
        if ok:
            return (f"its channels are the reference's in another order: the last {split} channels come first in the "
                    f"reference (a Concat with its inputs swapped?); reordering makes it match {_how(exact)}")
    return ""


def _byteswap(t: torch.Tensor) -> torch.Tensor | None:
    size = t.element_size()
    if size not in (2, 4, 8):
        return None
    raw = t.contiguous().reshape(-1).view(torch.uint8).reshape(-1, size).flip(1).contiguous()
    return raw.reshape(-1).view(t.dtype).reshape(t.shape)


def _layout_name(shape: list[int], name: str) -> str:
    if len(shape) == 4:
        return "NCHW (batch, channels, height, width), C-contiguous"
    if len(shape) == 3 and name.split(".")[-1] in names.HEAD_OUTPUTS:
        return "(batch, channels, anchors), anchors level-major (P3 first), row-major within a level"
    return f"shape {shape}, C-contiguous (row-major)"


def _shape_words(rshape: list[int], cshape: list[int]) -> str:
    from parity.compare.metrics import shape_difference

    note, _ = shape_difference(rshape, cshape)
    return note


def _summary(ref: torch.Tensor, cand: torch.Tensor, tol) -> str:
    from parity.compare.metrics import compare_tensors

    return compare_tensors(ref, cand, tol).summary()


# ============================================================================================== names
_MINDSPORE = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}
_GROUP_ALIASES = {"activations": "act", "activation": "act", "acts": "act", "act_": "act", "output": "act",
                  "outputs": "act", "weights": "model", "params": "model", "param": "model", "state_dict": "model",
                  "inits": "init", "initialization": "init", "grads": "grad", "gradients": "grad", "losses": "loss",
                  "inputs": "batch", "input": "batch"}
_HEAD_ALIASES = {"cls": "scores", "class": "scores", "classes": "scores", "score": "scores", "logits": "scores",
                 "box": "boxes", "bbox": "boxes", "bboxes": "boxes", "reg": "boxes", "regression": "boxes"}

_GRAMMAR = [
    re.compile(r"^model\.\d+(\.[A-Za-z0-9_]+)+$"),
    re.compile(r"^batch\.img$"),
    re.compile(r"^batch\.(%s)\.(cls|bboxes|batch_idx)$" % "|".join(names.LOSS_CASES)),
    re.compile(r"^(isolated\.)?act\.\d+(\.[A-Za-z0-9_]+)*(#\d+)?$"),
    re.compile(r"^init\.(cls_bias|box_bias)\.\d+\.(stored|float32|float64)$"),
    re.compile(r"^loss\.(%s)(\.(%s))?\.(%s)$" % (
        "|".join(names.LOSS_CASES), "|".join(names.E2E_BRANCHES),
        "|".join(f"{stage}\\.({'|'.join(items)})" for stage, items in names.LOSS_STAGES.items()))),
    re.compile(r"^loss\.(%s)\.output\.(loss|items)$" % "|".join(names.LOSS_CASES)),
    re.compile(r"^grad\.param\.model\.\d+(\.[A-Za-z0-9_]+)+$"),
    re.compile(r"^grad\.head\.(%s)\.(%s)(\.(%s))?\.(boxes|scores)$" % (
        "|".join(names.LOSS_CASES), "|".join(names.LOSS_TERMS), "|".join(names.E2E_BRANCHES))),
]


def follows_grammar(name: str) -> bool:
    """Whether `name` is spelled as docs/dump-format.md spells names (whatever the model)."""
    return any(p.match(name) for p in _GRAMMAR)


def _rewrites(name: str) -> list[str]:
    """Names a foreign port probably meant: separators, group aliases, framework-specific parameter names."""
    out = []
    fixed = name.replace("/", ".").replace(":", ".").replace("__", ".")
    fixed = re.sub(r"\.+", ".", fixed).strip(".")
    parts = fixed.split(".")
    if parts and parts[0].lower() in _GROUP_ALIASES:
        parts[0] = _GROUP_ALIASES[parts[0].lower()]
    if parts[:2] == ["model", "model"]:
        parts = parts[1:]
    if parts and parts[0].isdigit():  # a bare state_dict of the Sequential: "23.cv2.0.0.conv.weight"
        parts = ["model", *parts]
    if parts and parts[0] == "model" and parts[-1] in _MINDSPORE:
        parts[-1] = _MINDSPORE[parts[-1]]
    if parts and parts[0] == "act" and parts[-1] in _HEAD_ALIASES:
        parts[-1] = _HEAD_ALIASES[parts[-1]]
    if len(parts) == 3 and parts[0] == "init" and parts[1] in ("cls_bias", "box_bias") and parts[2].isdigit():
        parts.append("stored")
    candidate = ".".join(parts)
    if candidate != name:
        out.append(candidate)
    return out


def nearest_names(name: str, known: Iterable[str], n: int = 3) -> list[str]:
    """Protocol names closest to `name`: exact rewrites first (aliases, separators), then difflib's nearest."""
    known = list(known)
    known_set = set(known)
    out = [r for r in _rewrites(name) if not known_set or r in known_set]
    if out and known_set:
        return out[:n]  # an exact rewrite (alias, separator, framework name) is the answer; no guesses beside it
    # difflib works on the whole string; compare within the same group first (act.* with act.*)
    group = (out[0] if out else name).split(".", 1)[0]
    pool = [k for k in known if k.split(".", 1)[0] == group] or known
    for guess in difflib.get_close_matches(out[0] if out else name, pool, n=n, cutoff=0.5):
        if guess not in out:
            out.append(guess)
    return out[:n]


def name_problem(name: str, known: Iterable[str] | None = None) -> Problem | None:
    """A Problem when `name` is not a protocol name (with `known`: not one of those), else None."""
    known_list = list(known) if known is not None else None
    if known_list is not None:
        if name in known_list:
            return None
        suggestions = nearest_names(name, known_list)
        grammatical = follows_grammar(name)
        if grammatical:
            why = "is spelled like a protocol name but the reference has no such tensor"
            layer = names.layer_of(name)
            if layer is not None:
                layers = sorted({names.layer_of(k) for k in known_list if names.layer_of(k) is not None})
                if layers and layer not in layers:
                    why += f" (the reference has layers {layers[0]}..{layers[-1]})"
        else:
            why = "is not a name of the protocol (docs/dump-format.md)"
    else:
        if follows_grammar(name):
            return None
        suggestions = [r for r in _rewrites(name) if follows_grammar(r)]
        why = "is not a name of the protocol (docs/dump-format.md)"
    hint = f"; did you mean {' or '.join(repr(s) for s in suggestions)}?" if suggestions else ""
    return Problem("unknown-name", f"tensor {name!r} {why}{hint}", severity="warning", tensor=name,
                   suggestion=suggestions[0] if suggestions else None)


# ====================================================================================== safetensors
def check_safetensors_file(path: str | Path) -> tuple[dict[str, dict], list[Problem]]:
    """Parse a safetensors header defensively: ({name: {dtype, shape, data_offsets}}, problems).

    Finds: a file shorter than its 8-byte length prefix, a header length past the end of the file, a header that
    is not JSON (or not an object), entries without dtype/shape/data_offsets, unknown dtypes, byte ranges that
    do not match dtype x shape, ranges past the end of the file (truncated), overlapping ranges.
    """
    path = Path(path)
    problems: list[Problem] = []

    def bad(code: str, message: str, tensor: str | None = None) -> None:
        problems.append(Problem(code, f"{path}: {message}", file=path.name, tensor=tensor))

    if not path.exists():
        bad("missing-file", "no such file")
        return {}, problems
    if path.is_dir():
        bad("not-a-file", "is a directory, not a safetensors file")
        return {}, problems
    read = parse_header(path)
    if read.fault is not None:
        bad(*_header_fault(read))
        return {}, problems
    metadata = read.metadata
    if metadata is not None and (not isinstance(metadata, dict) or
                                 not all(isinstance(v, str) for v in metadata.values())):
        bad("metadata", "__metadata__ must map strings to strings (safetensors readers reject anything else)")
    entries: dict[str, dict] = {}
    for name, entry in read.header.items():
        fault = _entry_fault(name, entry, read)
        if fault is not None:
            bad(*fault, tensor=name)
        else:
            entries[name] = {"dtype": entry["dtype"], "shape": entry["shape"], "data_offsets": entry["data_offsets"]}
    spans = sorted((e["data_offsets"][0], e["data_offsets"][1], n) for n, e in entries.items())
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            bad("corrupt-header", f"tensors {n0!r} and {n1!r} overlap in the data section", tensor=n1)
    return entries, problems


def _header_fault(read: HeaderRead) -> tuple[str, str]:
    """(code, words) for a header `parse_header` could not read."""
    size, length = read.size, read.length
    if read.fault == "short":
        return "truncated", (f"truncated: {size} bytes; a safetensors file starts with an 8-byte little-endian "
                             f"header length")
    if read.fault == "big-endian":
        return "corrupt-header", (f"the header length is written big-endian ({read.big_endian_length} bytes read "
                                  f"as big-endian); safetensors uses a little-endian u64")
    if read.fault == "past-end":
        return "truncated", (f"truncated or corrupt: the header claims {length} bytes but only {size - 8} follow "
                             f"the length prefix"
                             + (" (is this a safetensors file at all?)" if length > MAX_HEADER_BYTES else ""))
    if read.fault == "not-json":
        return "corrupt-header", f"corrupt: the {length}-byte header is not valid JSON ({read.detail})"
    return "corrupt-header", f"corrupt: the header is a JSON {read.detail}, not an object"


def _entry_fault(name: str, entry: object, read: HeaderRead) -> tuple[str, str] | None:
    """(code, words) for a header entry that does not describe a tensor in the file, None for a good one."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        return "corrupt-header", f"entry {name!r} lacks dtype/shape/data_offsets"
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_SIZES:
        return "dtype", (f"tensor {name!r} has dtype {dtype!r}, not a safetensors dtype name "
                         f"({', '.join(sorted(DTYPE_SIZES))})")
    if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
        return "corrupt-header", f"tensor {name!r} has shape {shape!r}; expected a list of non-negative integers"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        return "corrupt-header", f"tensor {name!r} has data_offsets {offsets!r}; expected [begin, end]"
    need = math.prod(shape) * DTYPE_SIZES[dtype]
    have = offsets[1] - offsets[0]
    if need != have:
        return "corrupt-header", f"tensor {name!r}: {dtype} {shape} needs {need} bytes but its data_offsets span {have}"
    if offsets[1] > read.data_size:
        return "truncated", (f"truncated: tensor {name!r} ends at byte {offsets[1]} of the data section, which has "
                             f"only {read.data_size} bytes (the file was cut short: {read.size} bytes, "
                             f"{8 + read.length + offsets[1]} needed)")
    return None


# ============================================================================================== dumps
def check_manifest(manifest: object, where: str = MANIFEST) -> list[Problem]:
    """Schema, version, kind and index of a candidate manifest (already parsed from JSON)."""
    problems: list[Problem] = []
    if not isinstance(manifest, dict):
        return [Problem("manifest-json", f"{where}: expected a JSON object, found a JSON {type(manifest).__name__}")]
    schema = manifest.get("schema")
    version = manifest.get("schema_version")
    if schema is None:
        problems.append(Problem("schema", f"{where}: no 'schema' field; a candidate manifest needs "
                                          f"\"schema\": \"{SCHEMA}\", \"schema_version\": {SCHEMA_VERSION}, "
                                          f"\"kind\": \"candidate\"", suggestion=SCHEMA))
    elif schema == REPORT_SCHEMA:
        problems.append(Problem("schema", f"{where}: this is a comparison report ({REPORT_SCHEMA}), not a dump"))
    elif schema == LAYER_SCHEMA:
        problems.append(Problem("schema", f"{where}: this is a layer file from `parity export-layer`; judge a port's "
                                          f"output against it with `parity check-layer`"))
    elif schema != SCHEMA:
        close = difflib.get_close_matches(str(schema), [SCHEMA], n=1, cutoff=0.6)
        problems.append(Problem("schema", f"{where}: schema is {schema!r}, expected {SCHEMA!r}"
                                          + (" (misspelled?)" if close else ""), suggestion=SCHEMA))
    if version is None:
        problems.append(Problem("schema-version", f"{where}: no 'schema_version' field; write \"schema_version\": "
                                                  f"{SCHEMA_VERSION}"))
    elif isinstance(version, str) and version.strip().isdigit() and int(version) == SCHEMA_VERSION:
        problems.append(Problem("schema-version", f"{where}: schema_version is the string {version!r}; write the "
                                                  f"number {SCHEMA_VERSION}", severity="warning"))
    elif version != SCHEMA_VERSION or isinstance(version, bool):
        newer = isinstance(version, (int, float)) and not isinstance(version, bool) and version > SCHEMA_VERSION
        problems.append(Problem(
            "schema-version",
            f"{where}: manifest written for schema_version {version!r}; this yolo-parity reads version "
            f"{SCHEMA_VERSION} only" + (" (written by a newer yolo-parity or port protocol: upgrade yolo-parity, or "
                                        "write version 1 as docs/dump-format.md describes)" if newer else
                                        " (write version 1 as docs/dump-format.md describes)")))
    kind = manifest.get("kind")
    if kind is None:
        problems.append(Problem("kind", f"{where}: no 'kind' field; a port writes \"kind\": \"candidate\"",
                                severity="warning"))
    elif kind not in ("candidate", "reference"):
        problems.append(Problem("kind", f"{where}: kind is {kind!r}; expected \"candidate\"", severity="warning"))
    elif kind == "reference":
        problems.append(Problem("kind", f"{where}: kind is \"reference\": this looks like a reference dump, not a "
                                        f"port's output (comparing a reference with itself proves nothing)",
                                severity="warning"))
    tensors = manifest.get("tensors")
    if tensors is not None and not isinstance(tensors, dict):
        problems.append(Problem("index", f"{where}: 'tensors' must be an object {{name: {{file, dtype, shape}}}}, "
                                         f"found a JSON {type(tensors).__name__}"))
    return problems


def check_candidate_dump(path: str | Path, reference=None) -> list[Problem]:
    """Everything wrong with a candidate dump as a container (see the module docstring). Pure: reads only.

    `path` is a dump directory (manifest.json + .safetensors files) or, for convenience, one .safetensors file
    or the manifest itself. `reference` (a `parity.dump.files.Dump`) makes the name check exact: every name must
    be one of the reference's (nearest suggested otherwise); without it names are checked against the
    protocol's grammar.
    """
    path = Path(path)
    if not path.exists():
        return [Problem("missing", f"{path} does not exist")]
    if path.is_file():
        if path.name != MANIFEST:
            return _check_single_file(path, reference)
        path = path.parent
    files = sorted(path.glob("*.safetensors"))
    manifest, problems = _read_manifest(path)
    if not files:
        problems.append(Problem("empty", f"{path} holds no .safetensors files"))
    headers: dict[str, dict[str, dict]] = {}
    for file in files:
        entries, file_problems = check_safetensors_file(file)
        headers[file.name] = entries
        problems.extend(file_problems)
    located = _locate(headers, problems)
    index = manifest.get("tensors") if isinstance(manifest, dict) else None
    if isinstance(index, dict):
        _check_index(path, index, headers, located, problems)
    elif isinstance(manifest, dict) and "tensors" not in manifest and located:
        problems.append(Problem("no-index", f"{MANIFEST} has no 'tensors' index; the reader scans the "
                                            f"{len(files)} safetensors file(s) instead", severity="info"))
    problems.extend(_name_problems({n: headers[f][n] for n, f in located.items()}, reference))
    return problems


def _check_single_file(path: Path, reference) -> list[Problem]:
    """A lone .safetensors file (or another file, which is not a dump)."""
    if path.suffix != ".safetensors":
        return [Problem("not-a-dump", f"{path} is a file; a dump is a directory holding {MANIFEST} and "
                                      f".safetensors files")]
    entries, problems = check_safetensors_file(path)
    problems.append(Problem("no-manifest", f"{path} is a single safetensors file; a dump is a directory "
                                           f"holding it and a {MANIFEST} (or use `parity check-layer "
                                           f"--output {path.name}` for a single layer)", severity="warning"))
    problems.extend(_name_problems(entries, reference))
    return problems


def _read_manifest(path: Path) -> tuple[object, list[Problem]]:
    """The parsed manifest of dump directory `path` (None when there is none or it is not JSON), and its problems."""
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        return None, [Problem("no-manifest", f"{path} has no {MANIFEST}; a candidate dump needs one with at least "
                                             f"{{\"schema\": \"{SCHEMA}\", \"schema_version\": {SCHEMA_VERSION}, "
                                             f"\"kind\": \"candidate\"}}")]
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return None, [Problem("manifest-json", f"{manifest_path} is not valid JSON: {error}", file=MANIFEST)]
    return manifest, check_manifest(manifest, str(manifest_path))


def _locate(headers: dict[str, dict[str, dict]], problems: list[Problem]) -> dict[str, str]:
    """Where each tensor actually is: {name: file}; a name in two files is a problem (the first file counts)."""
    located: dict[str, str] = {}
    for file, entries in headers.items():
        for name in entries:
            if name in located:
                problems.append(Problem("duplicate-name", f"tensor {name!r} is in both {located[name]} and {file}; "
                                                          f"names must be unique across a dump", tensor=name, file=file))
            else:
                located[name] = file
    return located


def _check_index(path: Path, index: dict, headers: dict[str, dict[str, dict]], located: dict[str, str],
                 problems: list[Problem]) -> None:
    """The manifest's index against the files, appended to `problems` (an index-mismatch is not reported for a
    file whose header already has an error problem: the header is not to be trusted then)."""
    for name, entry in index.items():
        if not isinstance(entry, dict) or "file" not in entry:
            problems.append(Problem("index", f"{MANIFEST}: tensors[{name!r}] lacks 'file'", tensor=name))
            continue
        file = entry["file"]
        if not (path / file).exists():
            problems.append(Problem("index-file-missing", f"{MANIFEST} puts {name!r} in {file}, which is not in "
                                                          f"{path}", tensor=name, file=file))
            continue
        header = headers.get(file, {})
        if name not in header:
            if file in headers and not any(p.file == file and p.severity == "error" and p.code != "dtype"
                                           for p in problems):
                where = f" (it is in {located[name]})" if name in located else ""
                problems.append(Problem("index-mismatch", f"{MANIFEST} puts {name!r} in {file}, but {file} has no "
                                                          f"such tensor{where}", tensor=name, file=file))
            continue
        problems.extend(_entry_mismatches(name, entry, header[name], file))
    unindexed = [n for n in located if n not in index]
    if unindexed:
        problems.append(Problem("unindexed", f"{len(unindexed)} tensor(s) in the files are not in the manifest's "
                                             f"index and will be ignored, first {unindexed[0]!r} (in "
                                             f"{located[unindexed[0]]})", severity="warning",
                                tensor=unindexed[0], file=located[unindexed[0]]))


def _entry_mismatches(name: str, entry: dict, actual: dict, file: str) -> list[Problem]:
    """An index entry's dtype and shape against the file's header."""
    out = []
    if "dtype" in entry and entry["dtype"] != actual["dtype"]:
        out.append(Problem("index-mismatch", f"{MANIFEST} says {name!r} is {entry['dtype']}, {file} "
                                             f"holds {actual['dtype']}", tensor=name, file=file))
    if "shape" in entry and list(entry["shape"]) != list(actual["shape"]):
        out.append(Problem("index-mismatch", f"{MANIFEST} says {name!r} has shape {entry['shape']}, "
                                             f"{file} holds {actual['shape']}", tensor=name, file=file))
    return out


def _name_problems(entries: dict[str, dict], reference) -> list[Problem]:
    problems = []
    known = list(reference.index) if reference is not None else None
    ref_index = reference.index if reference is not None else {}
    for name, entry in entries.items():
        name = name[len(names.ISOLATED):] if name.startswith(names.ISOLATED + "act.") else name
        problem = name_problem(name, known)
        if problem is not None:
            problems.append(problem)
            continue
        ref_entry = ref_index.get(name)
        if ref_entry is not None:
            rdt, cdt = ref_entry.get("dtype"), entry.get("dtype")
            if rdt and cdt and rdt != cdt:
                problems.append(Problem("dtype", f"tensor {name!r} is {cdt}, the reference stores {rdt}"
                                        + (" (float64 where float32 is expected: cast before writing)"
                                           if (cdt, rdt) == ("F64", "F32") else ""),
                                        severity="warning", tensor=name))
            rshape, cshape = list(ref_entry.get("shape", [])), list(entry.get("shape", []))
            if rshape and rshape != cshape and sorted(rshape) == sorted(cshape):
                problems.append(Problem("layout", f"tensor {name!r} has shape {cshape}, the reference {rshape}: "
                                                  f"{_layout_guess(rshape, cshape)}", severity="warning", tensor=name))
    return problems


def _layout_guess(rshape: list[int], cshape: list[int]) -> str:
    """Words for a shape that is a permutation of the reference's, from the shapes alone (no values)."""
    perms = [list(p) for p in itertools.permutations(range(len(cshape))) if [cshape[i] for i in p] == rshape]
    if len(rshape) == 4 and [0, 3, 1, 2] in perms:
        return ("it looks written NHWC (batch, height, width, channels); the protocol is NCHW: "
                "candidate.permute(0, 3, 1, 2) has the reference's shape")
    if len(rshape) == 3 and [0, 2, 1] in perms:
        return "the last two dimensions look transposed: candidate.permute(0, 2, 1) has the reference's shape"
    if perms:
        return f"candidate.permute{tuple(perms[0])} has the reference's shape"
    return "a permutation of the reference's dimensions"


# ==================================================================================== for the comparisons
def problem_findings(problems: Iterable[Problem], where: str = "candidate dump") -> list:
    """`parity.findings.Finding`s for a comparison report: signature `foreign-{code}`; only "error" problems stay
    errors (a dump with error problems cannot be read reliably; callers usually refuse it with exit 2 instead)."""
    from parity.findings import Finding

    return [Finding(f"foreign-{p.code}", where if p.tensor is None else f"{where}, {p.tensor}", p.message,
                    severity=p.severity, evidence={k: v for k, v in p.as_dict().items() if v is not None})
            for p in problems if p.severity in ("error", "warning")]


def tensor_findings(name: str, where: str, ref: torch.Tensor, cand: torch.Tensor, tol=None, *,
                    passed: bool = False) -> list:
    """`Finding`s from `diagnose_foreign_tensor`: `foreign-dtype` for the dtype message (always first when the
    dtypes differ), `foreign-layout` for the rest; errors when the tensor failed, warnings when it passed."""
    from parity.findings import Finding

    messages = diagnose_foreign_tensor(name, ref, cand, tol)
    out = []
    for position, message in enumerate(messages):
        signature = "foreign-dtype" if position == 0 and ref.dtype != cand.dtype else "foreign-layout"
        out.append(Finding(signature, where, message, severity="warning" if passed else "error",
                           evidence={"tensor": name}))
    return out


def problems_text(problems: Iterable[Problem]) -> str:
    return "\n".join(f"  [{p.severity}] {p.message}" for p in problems)
