"""Noise envelopes: how far ultralytics moves from ITSELF under changes that do not change the computation.

A tolerance says how far a candidate may be from the reference; an envelope says how far the reference is
from itself when nothing that matters changes. `parity envelope` captures the reference several times with
the same model, weights and batch, changing only:

* the torch CPU thread count (1, 2 and 4; 2 is the baseline, as in every reference dump);
* the arithmetic width: a *float64 shadow* run of the same model and batch, every captured tensor cast back
  to float32 (this gives a level for every computed tensor, also for those that happen to be bitwise stable
  across thread counts: it is the float32 rounding error of ultralytics' own result);
* where CUDA exists: CPU vs CUDA, TF32 off vs on, deterministic algorithms on vs off.

Each variant is compared with its baseline tensor by tensor (`parity.compare.metrics.compare_tensors`), and
the worst error levels (max abs, max rel, max ULP, max |d| / max |ref|, mismatched fraction for bool/int
tensors) are stored per tensor, per layer (`act.{i}`), per loss stage (`loss.{case}[.{branch}].{stage}`), per
gradient group (`grad.param.{i}`, `grad.head.{case}.{term}`), and per kind, for each *device pair* and
*precision* (`cpu-cpu/fp32`, `cpu-cuda/fp32`, `cuda-cuda/fp32`, `cpu-cuda/tf32`, `cuda-cuda/tf32`), together
with the runs that produced them (versions, environment, capture configs, seconds).

`judge(envelope, name, metrics)` then says by what factor a candidate's error exceeds the envelope for that
tensor (1.0 = as large as the largest harmless change; <= 1 is indistinguishable from noise).

Envelope files are JSON (`schema: yolo-parity-envelope`), committed under `envelopes/`; docs/cuda.md describes
them and how tolerance profiles cite them.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from parity.errors import OutputExists, ParityError
from parity.runtime import PROJECT_ROOT

SCHEMA = "yolo-parity-envelope"
SCHEMA_VERSION = 1
ENVELOPES_DIR = PROJECT_ROOT / "envelopes"
BASELINE_THREADS = 2
RTOLS = (0.0, 1e-6, 1e-5, 1e-4)
# A tensor whose largest |ref| is under this fraction of its group's largest |ref| is "tiny" for the group's
# scaled level (structurally ~0 gradients are pure rounding noise: max|d| / max|ref| is ~1 for them).
TINY = 1e-3
DEVICE_PAIRS = ("cpu-cpu", "cpu-cuda", "cuda-cuda")
PRECISIONS = ("fp32", "tf32", "fp16", "bf16")

if TYPE_CHECKING:
    from parity.capture import CaptureConfig


# ------------------------------------------------------------------------------------------------ naming
def normalize_device(device: str) -> str:
    device = str(device).strip().lower()
    if device.startswith("cuda"):
        return "cuda"
    if device == "cpu":
        return "cpu"
    raise ParityError(f"device {device!r} is not understood: expected 'cpu', 'cuda' or 'cuda:N'")


def device_pair(pair: str | Iterable[str]) -> str:
    """Canonical device pair: `cpu-cpu`, `cpu-cuda` or `cuda-cuda`, from 'cpu', ('cuda:0', 'cpu'), 'cuda/cpu'…"""
    if isinstance(pair, str):
        parts = [p for p in pair.replace("/", "-").replace(",", "-").split("-") if p]
        parts = [parts[0], parts[0]] if len(parts) == 1 else parts
    else:
        parts = list(pair)
    if len(parts) != 2:
        raise ParityError(f"device pair {pair!r}: expected two devices such as 'cpu-cuda'")
    a, b = sorted(normalize_device(p) for p in parts)
    return f"{a}-{b}"


def pair_key(pair: str | Iterable[str], precision: str) -> str:
    if precision not in PRECISIONS:
        raise ParityError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    return f"{device_pair(pair)}/{precision}"


def group_of(name: str) -> str:
    """The envelope group of a dump tensor name: per layer, per loss stage, per gradient group."""
    parts = name.split(".")
    head = parts[0]
    if head == "act" and len(parts) > 1:
        return f"act.{parts[1].split('#')[0]}"
    if head == "model" and len(parts) > 1:
        return f"model.{parts[1]}"
    if head == "loss" and len(parts) >= 4:
        return ".".join(parts[:-1])  # loss.{case}[.{branch}].{stage}
    if parts[:2] == ["grad", "param"] and len(parts) > 3:
        return f"grad.param.{parts[3]}"  # grad.param.model.{i}.…
    if parts[:2] == ["grad", "head"] and len(parts) > 3:
        return ".".join(parts[:4])  # grad.head.{case}.{term}
    return head


def kind_of(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "grad" and len(parts) > 1:
        return f"grad.{parts[1]}"
    return parts[0]


# ------------------------------------------------------------------------------------------------- runs
@dataclass(frozen=True)
class RunSpec:
    """One capture of the reference: the same model, weights and batch; only these settings change."""

    id: str
    device: str = "cpu"
    precision: str = "fp32"
    threads: int = BASELINE_THREADS
    deterministic: bool = True
    float64: bool = False

    def describe(self) -> dict:
        return {"id": self.id, "device": self.device, "precision": self.precision, "threads": self.threads,
                "deterministic": self.deterministic, "float64_shadow": self.float64}


@dataclass(frozen=True)
class Comparison:
    """Which run is compared with which, and the envelope (device pair, precision) the result goes to."""

    pair: str  # e.g. "cpu-cuda/tf32"
    base: str  # run id
    variant: str  # run id
    change: str  # in words


@dataclass
class Plan:
    runs: dict[str, RunSpec]
    comparisons: list[Comparison]
    skipped: list[dict] = field(default_factory=list)


def cuda_status(device: str = "cuda") -> tuple[bool, str]:
    """(usable, reason): whether CUDA runs can be made here, and why not."""
    import torch

    if not torch.cuda.is_available():
        built = torch.version.cuda
        why = ("this torch is a CPU-only build" if not built else
               f"torch {torch.__version__} (CUDA {built}) sees no CUDA device (torch.cuda.is_available() is False)")
        return False, why
    index = 0 if ":" not in device else int(device.split(":", 1)[1])
    if index >= torch.cuda.device_count():
        return False, f"{device}: only {torch.cuda.device_count()} CUDA device(s) present"
    return True, ""


def make_plan(threads: Iterable[int] = (1, 2, 4), *, float64: bool = True, cuda: str | None = None,
              cuda_reason: str = "") -> Plan:
    """The runs of an envelope measurement. `cuda`: a CUDA device to add CUDA runs for, or None (then
    `cuda_reason` says why they are left out, and the plan records it)."""
    threads = sorted(set(int(t) for t in threads))
    if any(t < 1 for t in threads):
        raise ParityError(f"thread counts {threads}: each must be at least 1")
    base = RunSpec(f"cpu-fp32-t{BASELINE_THREADS}", threads=BASELINE_THREADS)
    runs = {base.id: base}
    comparisons = []
    for t in threads:
        if t == BASELINE_THREADS:
            continue
        run = RunSpec(f"cpu-fp32-t{t}", threads=t)
        runs[run.id] = run
        comparisons.append(Comparison("cpu-cpu/fp32", base.id, run.id, f"torch threads {BASELINE_THREADS} -> {t}"))
    if float64:
        run = RunSpec("cpu-fp64", float64=True)
        runs[run.id] = run
        comparisons.append(Comparison("cpu-cpu/fp32", base.id, run.id, "float32 -> float64 shadow, cast back"))
    skipped = []
    cuda_runs = ("cuda-fp32", "cuda-fp32-nondet", "cuda-tf32")
    if cuda:
        det = RunSpec("cuda-fp32", device=cuda)
        nondet = RunSpec("cuda-fp32-nondet", device=cuda, deterministic=False)
        tf32 = RunSpec("cuda-tf32", device=cuda, precision="tf32")
        for run in (det, nondet, tf32):
            runs[run.id] = run
        comparisons += [
            Comparison("cpu-cuda/fp32", base.id, det.id, "CPU -> CUDA, float32, TF32 off, deterministic"),
            Comparison("cuda-cuda/fp32", det.id, nondet.id, "deterministic algorithms on -> off"),
            Comparison("cpu-cuda/tf32", base.id, tf32.id, "CPU float32 -> CUDA with TF32 on"),
            Comparison("cuda-cuda/tf32", det.id, tf32.id, "TF32 off -> on"),
        ]
        if float64:
            comparisons.append(Comparison("cpu-cuda/fp32", "cpu-fp64", det.id, "float64 shadow (CPU) -> CUDA float32"))
    else:
        skipped = [{"run": r, "reason": cuda_reason or "no CUDA device requested"} for r in cuda_runs]
    return Plan(runs, comparisons, skipped)


@contextmanager
def float64_shadow():
    """Run the reference capture in float64: the same model (built, perturbed and calibrated in float32 as
    usual) and the same batch, converted to float64 before the forward pass; the loss runs with float64 as
    torch's default dtype, so ultralytics' own `torch.zeros`/`torch.tensor` temporaries are float64 too."""
    import torch

    import parity.capture.reference as reference

    original = reference.prepare_model
    default = torch.get_default_dtype()

    def prepare_in_float64(config, batch):
        model, info = original(config, batch)
        model.double()
        batch.img = batch.img.double()
        for targets in batch.cases.values():
            targets.cls = targets.cls.double()
            targets.bboxes = targets.bboxes.double()
            targets.batch_idx = targets.batch_idx.double()
        torch.set_default_dtype(torch.float64)
        return model, info

    reference.prepare_model = prepare_in_float64
    try:
        yield
    finally:
        reference.prepare_model = original
        torch.set_default_dtype(default)


def capture_run(spec: RunSpec, base_config) -> Any:
    """One capture (`parity.capture.run_capture`) under `spec`; returns the Capture (tensors on the host)."""
    import dataclasses

    import torch

    from parity.capture import run_capture

    config = dataclasses.replace(base_config, device=spec.device, precision=spec.precision,
                                 deterministic=spec.deterministic)
    saved = torch.get_num_threads()
    torch.set_num_threads(spec.threads)
    try:
        if spec.float64:
            with float64_shadow():
                return run_capture(config)
        return run_capture(config)
    finally:
        torch.set_num_threads(saved)


# ------------------------------------------------------------------------------------------- measuring
def _num(value: float | None, digits: int = 3) -> float | str | None:
    """A level rounded UP to `digits` significant digits (an envelope is a bound); JSON-safe."""
    if value is None:
        return None
    value = float(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf"
    if value == 0:
        return 0.0
    exponent = math.floor(math.log10(abs(value))) - (digits - 1)
    scale = 10.0 ** exponent
    rounded = math.ceil(value / scale) * scale if value > 0 else math.floor(value / scale) * scale
    return float(f"{rounded:.{digits}g}")


def _val(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):
        return {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}[value]
    return float(value)


def tensor_level(ref, cand) -> dict | None:
    """The error of `cand` against `ref` as one envelope entry; None when they cannot be compared (shape)."""
    import torch

    from parity.compare.metrics import compare_tensors

    if cand.dtype == torch.float64 and ref.dtype != torch.float64:
        cand = cand.to(ref.dtype)  # the float64 shadow, cast back
    if list(ref.shape) != list(cand.shape):
        return None
    m = compare_tensors(ref, cand)
    if m.exact_compare:
        return {"exact": m.exact, "mismatched_fraction": m.mismatched_fraction}
    absmax = m.ref_absmax or 0.0
    level = {"exact": m.exact, "max_abs": m.max_abs, "max_rel": m.max_rel, "max_ulp": m.max_ulp,
             "ref_absmax": absmax, "scaled": (m.max_abs / absmax) if absmax else (0.0 if m.max_abs == 0 else math.inf)}
    if ref.dtype.is_floating_point and ref.numel() and not m.exact:
        r = ref.detach().double().reshape(-1)
        d = torch.nan_to_num((cand.detach().double().reshape(-1) - r).abs(), nan=math.inf)
        level["min_atol"] = {str(rt): max(0.0, float((d - rt * r.abs()).max())) for rt in RTOLS}
    else:
        level["min_atol"] = {str(rt): 0.0 for rt in RTOLS}
    return level


_MAX_KEYS = ("max_abs", "max_rel", "max_ulp", "mismatched_fraction")


def _merge(into: dict, level: dict, run: str, name: str | None = None) -> None:
    """Fold one tensor's level into a group (worst of each statistic), remembering where the worst came from."""
    into["tensors"] = into.get("tensors", 0) + 1
    into["exact"] = into.get("exact", 0) + int(bool(level.get("exact")))
    for key in _MAX_KEYS:
        value = level.get(key)
        if value is None:
            continue
        if key not in into or value > into[key]:
            into[key] = value
            if key == "max_abs" and name and value > 0:
                into["worst"] = name
                into["worst_run"] = run
            elif key == "mismatched_fraction" and name and value > 0:
                into["worst_mismatch"] = name
    if "ref_absmax" in level:
        into["ref_absmax"] = max(into.get("ref_absmax", 0.0), level["ref_absmax"])
    for rt, value in (level.get("min_atol") or {}).items():
        atol = into.setdefault("min_atol", {})
        atol[rt] = max(atol.get(rt, 0.0), value)
        if level.get("ref_absmax"):
            rel = into.setdefault("min_atol_absmax", {})
            rel[rt] = max(rel.get(rt, 0.0), value / level["ref_absmax"])
    runs = into.setdefault("runs", [])
    if run not in runs:
        runs.append(run)


def _scaled_groups(tensors: dict[str, dict], key_of) -> dict[str, float]:
    """Per group: the largest max|d| / max|ref| over its tensors that are not tiny next to the group's largest."""
    absmax: dict[str, float] = {}
    for name, level in tensors.items():
        if "ref_absmax" in level:
            key = key_of(name)
            absmax[key] = max(absmax.get(key, 0.0), level["ref_absmax"])
    scaled: dict[str, float] = {}
    for name, level in tensors.items():
        if "ref_absmax" not in level:
            continue
        key = key_of(name)
        if level["ref_absmax"] >= TINY * absmax[key] and absmax[key] > 0:
            scaled[key] = max(scaled.get(key, 0.0), level["scaled"])
    return scaled


class _Captures:
    """The captures of a plan, each made on first use and dropped once no comparison still needs it (at 640x640
    a capture is ~0.5 GB: only what is still needed is kept)."""

    def __init__(self, plan: Plan, base_config, log):
        self.plan, self.base_config, self.log = plan, base_config, log
        self.held: dict[str, Any] = {}
        self.records: dict[str, dict] = {}
        self.uses_left = {rid: sum(1 for c in plan.comparisons if rid in (c.base, c.variant)) for rid in plan.runs}

    def get(self, run_id: str):
        if run_id not in self.held:
            spec = self.plan.runs[run_id]
            self.log(f"capturing {run_id} ({', '.join(f'{k}={v}' for k, v in spec.describe().items() if k != 'id')})")
            start = time.perf_counter()
            capture = capture_run(spec, self.base_config)
            manifest = capture.manifest
            self.records[run_id] = {**spec.describe(), "seconds": round(time.perf_counter() - start, 2),
                                    "versions": manifest.get("versions"), "environment": manifest.get("environment"),
                                    "config": manifest.get("config")}
            self.held[run_id] = capture
        return self.held[run_id]

    def done_with(self, comparison: Comparison) -> None:
        for rid in (comparison.base, comparison.variant):
            self.uses_left[rid] -= 1
            if self.uses_left[rid] <= 0:
                self.held.pop(rid, None)


def _compare_runs(entry: dict, comparison: Comparison, base, variant) -> None:
    """Fold every tensor the two captures share into the pair's entry: per tensor, and per kind for this change."""
    entry["comparisons"].append({"base": comparison.base, "variant": comparison.variant,
                                 "change": comparison.change})
    label = f"{comparison.base}~{comparison.variant}"
    by_change = entry.setdefault("by_change", {}).setdefault(label, {"change": comparison.change, "kinds": {}})
    for name, ref in base.tensors.items():
        cand = variant.tensors.get(name)
        if cand is None:
            continue
        level = tensor_level(ref, cand)
        if level is None:
            entry.setdefault("shape_mismatch", []).append(name)
            continue
        worst = entry["tensors"].setdefault(name, {})
        _merge(worst, level, label, name)
        _merge(by_change["kinds"].setdefault(kind_of(name), {}), level, label, name)
        if "scaled" in level:
            worst["scaled"] = max(worst.get("scaled", 0.0), level["scaled"])


def _summarise_pair(entry: dict) -> None:
    """The pair's group and kind levels, from its per-tensor worsts."""
    tensors = entry["tensors"]
    groups: dict[str, dict] = {}
    kinds: dict[str, dict] = {}
    for name, level in tensors.items():
        flat = {k: v for k, v in level.items()
                if k not in ("runs", "tensors", "exact", "worst", "worst_run", "worst_mismatch")}
        flat["exact"] = level.get("exact", 0) == level.get("tensors", 0)  # bitwise in every comparison
        run = level.get("worst_run") or level["runs"][0]
        _merge(groups.setdefault(group_of(name), {}), flat, run, name)
        _merge(kinds.setdefault(kind_of(name), {}), flat, run, name)
    for key, value in _scaled_groups(tensors, group_of).items():
        groups[key]["scaled"] = value
    for key, value in _scaled_groups(tensors, kind_of).items():
        kinds[key]["scaled"] = value
    entry["groups"] = groups
    entry["kinds"] = kinds


def measure(base_config, plan: Plan, *, log=lambda line: None) -> dict:
    """Run the plan and return the envelope document (not yet rounded)."""
    captures = _Captures(plan, base_config, log)
    pairs: dict[str, dict] = {}
    for run_id in plan.runs:  # baseline first, then variants as listed
        for comparison in [c for c in plan.comparisons if c.variant == run_id]:
            base, variant = captures.get(comparison.base), captures.get(comparison.variant)
            log(f"comparing {comparison.variant} with {comparison.base} -> {comparison.pair}")
            _compare_runs(pairs.setdefault(comparison.pair, {"comparisons": [], "tensors": {}}), comparison, base,
                          variant)
            captures.done_with(comparison)
    for entry in pairs.values():
        _summarise_pair(entry)
    return {"runs": captures.records, "pairs": pairs, "skipped": plan.skipped}


def _compact_tensor(level: dict) -> list:
    """Per-tensor levels as a short list: [max_abs, ref_absmax, max_ulp, min_atol at rtol 1e-5] (float) or
    [mismatched_fraction] (bool/int)."""
    if "max_abs" in level:
        return [_num(level["max_abs"]), _num(level.get("ref_absmax")), level.get("max_ulp"),
                _num((level.get("min_atol") or {}).get("1e-05", level["max_abs"]))]
    return [_num(level.get("mismatched_fraction", 0.0))]


def _round_level(level: dict) -> dict:
    out = {}
    for key, value in level.items():
        if key in ("max_abs", "max_rel", "scaled", "ref_absmax", "mismatched_fraction"):
            out[key] = _num(value)
        elif key in ("min_atol", "min_atol_absmax"):
            out[key] = {rt: _num(v) for rt, v in value.items()}
        else:
            out[key] = value
    return out


def envelope_document(base_config, measured: dict, *, name: str, command: str, seconds: float) -> dict:
    from dataclasses import asdict

    config = {k: v for k, v in asdict(base_config).items() if k not in ("device", "precision", "deterministic")}
    config["cases"] = list(config.get("cases", []))
    pairs = {}
    for key, entry in sorted(measured["pairs"].items()):
        pairs[key] = {
            "comparisons": entry["comparisons"],
            "kinds": {k: _round_level(v) for k, v in sorted(entry["kinds"].items())},
            "groups": {k: _round_level(v) for k, v in entry["groups"].items()},
            "by_change": {label: {"change": item["change"],
                                  "kinds": {k: {x: _num(v.get(x)) if x != "max_ulp" else v.get(x)
                                                for x in ("max_abs", "max_ulp", "mismatched_fraction") if x in v}
                                            for k, v in sorted(item["kinds"].items())}}
                          for label, item in entry.get("by_change", {}).items()},
            "tensors": {k: _compact_tensor(v) for k, v in entry["tensors"].items()},
            **({"shape_mismatch": entry["shape_mismatch"]} if entry.get("shape_mismatch") else {}),
        }
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "command": command,
        "config": config,
        "measured_seconds": round(seconds, 1),
        "runs": measured["runs"],
        "skipped": measured["skipped"],
        "tensor_columns": {"float": ["max_abs", "ref_absmax", "max_ulp", "min_atol_rtol_1e-5"],
                           "bool/int": ["mismatched_fraction"]},
        "pairs": pairs,
    }


# -------------------------------------------------------------------------------------------- reading
class Envelope:
    """One device pair and precision of an envelope file: the levels `judge` compares against."""

    def __init__(self, document: dict, key: str, path: Path | None = None):
        if key not in document.get("pairs", {}):
            raise ParityError(f"envelope {path or document.get('name')} has no levels for {key} "
                              f"(it has {', '.join(document.get('pairs', {})) or 'none'})")
        self.document = document
        self.key = key
        self.path = path
        self.data = document["pairs"][key]

    @property
    def name(self) -> str:
        return self.document.get("name", self.path.stem if self.path else "envelope")

    @property
    def config(self) -> dict:
        return self.document.get("config", {})

    @property
    def device_pair(self) -> str:
        return self.key.split("/")[0]

    @property
    def precision(self) -> str:
        return self.key.split("/")[1]

    def runs(self) -> list[dict]:
        ids = {r for c in self.data.get("comparisons", []) for r in (c["base"], c["variant"])}
        return [run for rid, run in self.document.get("runs", {}).items() if rid in ids]

    def citation(self) -> str:
        """How a tolerance profile cites this envelope (docs/cuda.md, 'Citing an envelope')."""
        where = self.path.relative_to(PROJECT_ROOT) if self.path and self.path.is_relative_to(PROJECT_ROOT) else (
            self.path or self.name)
        changes = "; ".join(c["change"] for c in self.data.get("comparisons", []))
        versions = next(iter(self.document.get("runs", {}).values()), {}).get("versions") or {}
        return (f"envelope {where}#{self.key} ({changes}; ultralytics {versions.get('ultralytics')}, "
                f"torch {versions.get('torch')}; {self.config.get('model')} imgsz {self.config.get('imgsz')})")

    def level(self, name: str) -> tuple[str, dict]:
        """(basis, level) for a tensor: its own entry, else its group's, else its kind's."""
        entry = self.data.get("tensors", {}).get(name)
        if entry is not None:
            if len(entry) >= 3:
                level = {"max_abs": _val(entry[0]), "ref_absmax": _val(entry[1]), "max_ulp": entry[2]}
                if len(entry) > 3:
                    level["min_atol_1e-5"] = _val(entry[3])
                return "tensor", level
            return "tensor", {"mismatched_fraction": _val(entry[0])}
        group = self.data.get("groups", {}).get(group_of(name))
        if group is not None:
            return "group", group
        kind = self.data.get("kinds", {}).get(kind_of(name))
        if kind is not None:
            return "kind", kind
        raise ParityError(f"envelope {self.name} ({self.key}) has no level for {name!r} nor its group "
                          f"{group_of(name)!r} or kind {kind_of(name)!r}")

    def covers(self, name: str) -> bool:
        try:
            self.level(name)
            return True
        except ParityError:
            return False


def _ratio(candidate: float | None, envelope: float | None) -> float | None:
    if candidate is None or envelope is None:
        return None
    if math.isnan(candidate):
        return math.inf
    if envelope == 0:
        return 0.0 if candidate == 0 else math.inf
    return candidate / envelope


def _metric(metrics, key: str):
    if metrics is None:
        return None
    value = metrics.get(key) if isinstance(metrics, Mapping) else getattr(metrics, key, None)
    return _val(value) if isinstance(value, str) else value


def judge_detail(envelope: Envelope, name: str, metrics) -> dict:
    """By what factor `metrics` (a TensorMetrics or its `as_dict()`, candidate vs reference for `name`)
    exceeds the envelope, with the levels behind it.

    Float tensors, against the tensor's own level: factor = candidate max|d| / envelope max|d|. Against a group
    or kind level (a tensor the envelope run did not have): the smaller of the ratio of max|d| and the ratio of
    max|d| / max|ref| (the group's scaled level ignores tensors tiny next to the group's largest). bool/int
    tensors: ratio of mismatched fractions. An envelope level of 0 (bitwise stable under every harmless
    change) makes any difference an infinite factor.
    """
    basis, level = envelope.level(name)
    out = {"name": name, "envelope": envelope.name, "pair": envelope.key, "basis": basis}
    cand_abs = _metric(metrics, "max_abs")
    exact_compare = bool(_metric(metrics, "exact_compare"))
    if exact_compare or ("max_abs" not in level and "mismatched_fraction" in level):
        cand = _metric(metrics, "mismatched_fraction") or 0.0
        env = _val(level.get("mismatched_fraction")) or 0.0
        out.update(candidate={"mismatched_fraction": cand}, level={"mismatched_fraction": env},
                   factor=_ratio(cand, env))
        return out
    cand_absmax = _metric(metrics, "ref_absmax")
    env_abs = _val(level.get("max_abs"))
    abs_factor = _ratio(cand_abs, env_abs)
    if basis == "tensor":
        factor = abs_factor
    else:
        cand_scaled = (cand_abs / cand_absmax) if cand_abs is not None and cand_absmax else None
        scaled_factor = _ratio(cand_scaled, _val(level.get("scaled")))
        factors = [f for f in (abs_factor, scaled_factor) if f is not None]
        factor = min(factors) if factors else None
        out["scaled_factor"] = scaled_factor
    out["abs_factor"] = abs_factor
    out.update(candidate={"max_abs": cand_abs, "ref_absmax": cand_absmax, "max_ulp": _metric(metrics, "max_ulp")},
               level={k: level.get(k) for k in ("max_abs", "ref_absmax", "max_ulp", "scaled", "worst") if k in level},
               factor=factor)
    if factor is None:
        raise ParityError(f"cannot judge {name!r}: the metrics carry no max_abs (shape mismatch?)")
    return out


def judge(envelope: Envelope, name: str, metrics) -> float:
    """By what factor a candidate's error on tensor `name` exceeds the envelope (<= 1: within the noise of
    harmless changes; inf: the envelope is bitwise there and the candidate is not)."""
    return judge_detail(envelope, name, metrics)["factor"]


def list_envelopes(directory: Path | None = None) -> list[Path]:
    directory = Path(directory or ENVELOPES_DIR)
    return sorted(directory.glob("*.json")) if directory.is_dir() else []


def read_envelope_file(path: str | Path) -> dict:
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise ParityError(f"envelope {path} does not exist") from None
    except json.JSONDecodeError as error:
        raise ParityError(f"envelope {path} is not valid JSON: {error}") from None
    if not isinstance(document, dict) or document.get("schema") != SCHEMA:
        raise ParityError(f"{path} is not a noise envelope (schema {SCHEMA!r} expected)")
    if document.get("schema_version") != SCHEMA_VERSION:
        raise ParityError(f"{path}: envelope schema_version {document.get('schema_version')!r}; "
                          f"this yolo-parity reads {SCHEMA_VERSION}")
    return document


def load_envelope(device_pair_: str | Iterable[str], precision: str = "fp32", *, model: str | None = None,
                  imgsz: int | None = None, directory: str | Path | None = None,
                  path: str | Path | None = None) -> Envelope:
    """The envelope for a device pair (e.g. 'cpu-cpu', ('cpu', 'cuda:0')) and precision, from `path` or the
    committed `envelopes/`. With several candidates, the one measured on the same model (file stem) and image
    size wins, then the same model, then any."""
    key = pair_key(device_pair_, precision)
    files = [Path(path)] if path else list_envelopes(Path(directory) if directory else None)
    found = []
    for file in files:
        document = read_envelope_file(file)
        if key in document.get("pairs", {}):
            found.append((file, document))
    if not found:
        where = path or (directory or ENVELOPES_DIR)
        hint = (" CUDA envelopes are measured on a machine with a GPU: `parity envelope --device cuda` "
                "(docs/cuda.md)." if "cuda" in key else "")
        raise ParityError(f"no measured noise envelope for {key} in {where}.{hint}")

    def score(item) -> tuple:
        config = item[1].get("config", {})
        same_model = model is not None and Path(str(config.get("model"))).stem == Path(model).stem
        same_size = imgsz is not None and config.get("imgsz") == imgsz
        return (same_model and same_size, same_model, same_size)

    file, document = max(found, key=score)
    return Envelope(document, key, file)


def check_profile(profile, envelope: Envelope, *, mode: str = "chained") -> list[str]:
    """Tensors of the envelope that a tolerance profile (`parity.compare.tolerances.Profile`) would reject:
    harmless noise that the profile calls a divergence, one line per group (its worst tensor).

    The envelope's runs are whole captures, so their differences are *chained* (errors carried through the
    network): the profile's chained tolerances apply. Per tensor, with `need` the smallest absolute allowance
    that passes at rtol 1e-5 (stored) or, for another rtol, max |d| (conservative): the tensor passes when
    `need <= atol + atol_absmax * max|ref|` and its ULP distance is within `max_ulp`. bool/int tensors must
    not differ at all."""
    from parity.compare.tolerances import kind_of as tolerance_kind

    worst: dict[str, tuple[float, str]] = {}
    for name, entry in envelope.data.get("tensors", {}).items():
        group = group_of(name)
        try:
            tol = profile.for_name(name, mode=mode)
        except (ParityError, TypeError):
            continue
        if len(entry) == 1:
            fraction = _val(entry[0]) or 0.0
            if fraction:
                line = (f"{group}: {name} has {fraction:.3g} of its elements changed by harmless changes; "
                        f"bool/int tensors are compared exactly")
                worst.setdefault(group, (math.inf, line))
            continue
        max_abs, absmax, max_ulp = _val(entry[0]) or 0.0, _val(entry[1]) or 0.0, entry[2]
        need = _val(entry[3]) if len(entry) > 3 and tol.rtol == 1e-5 else max_abs
        allowed = tol.atol + tol.atol_absmax * absmax
        if tol.max_ulp is not None and max_ulp is not None and max_ulp > tol.max_ulp and max_abs > allowed:
            ratio = math.inf if tol.max_ulp == 0 else max_ulp / tol.max_ulp
            line = (f"{group}: {name} moves {max_ulp} ulp (max |d| {max_abs:.3g}) under harmless changes; profile "
                    f"{profile.name} allows {tol.describe()} ({tolerance_kind(name)})")
        elif need > allowed:
            ratio = need / allowed if allowed else math.inf
            line = (f"{group}: {name} needs atol {need:.3g} at rtol 1e-5 (max|ref| {absmax:.3g}); profile "
                    f"{profile.name} allows {tol.describe()} = {allowed:.3g} ({tolerance_kind(name)}, {mode})")
        else:
            continue
        if group not in worst or ratio > worst[group][0]:
            worst[group] = (ratio, line)
    return [line for _, line in sorted(worst.values(), key=lambda item: -item[0])]


# ------------------------------------------------------------------------------------------- writing
@dataclass(frozen=True)
class EnvelopeConfig:
    """What `parity envelope` measures and where it writes it (docs/cuda.md)."""

    capture: "CaptureConfig"  # model, weights and batch; each run sets its own device, precision and threads
    device: str = "auto"  # "auto" (CUDA runs where CUDA exists), "cpu", "cuda" or "cuda:N"
    threads: tuple[int, ...] = (1, 2, 4)  # CPU thread counts to compare (BASELINE_THREADS is the baseline)
    float64: bool = True  # the float64 shadow run
    name: str | None = None  # stored in the file; None: the file's name
    out: str | Path | None = None  # None: envelopes/{cpu|cuda}-{model}-{imgsz}.json
    force: bool = False  # replace an existing envelope file


def default_out(config, plan: Plan) -> Path:
    pairs = sorted({c.pair.split("/")[0] for c in plan.comparisons})
    tag = "cuda" if any("cuda" in p for p in pairs) else "cpu"
    return ENVELOPES_DIR / f"{tag}-{Path(config.model).stem}-{config.imgsz}.json"


def cuda_for(device: str) -> tuple[str | None, str]:
    """(the CUDA device to add runs for, or None; why there are none)."""
    if device == "auto":
        usable, reason = cuda_status("cuda")
        return ("cuda" if usable else None), reason
    if device == "cpu":
        return None, "CPU only (device 'cpu' asked for)"
    from parity.runtime import check_device

    check_device(device)  # ParityError (exit 2) when the device does not exist
    if not device.startswith("cuda"):
        raise ParityError(f"device {device!r}: expected cpu, auto, cuda or cuda:N")
    return device, ""


def plan_envelope(config: EnvelopeConfig) -> tuple[Plan, Path]:
    """The runs to make and the file to write, checked before any capture runs."""
    cuda, reason = cuda_for(config.device)
    plan = make_plan(config.threads, float64=config.float64, cuda=cuda, cuda_reason=reason)
    if not plan.comparisons:
        raise ParityError("nothing to measure: give more than one thread count, or leave the float64 shadow on")
    out = Path(config.out) if config.out else default_out(config.capture, plan)
    if out.exists() or out.is_symlink():
        if not config.force:
            raise OutputExists(out, "noise envelope")
        from parity.dump.files import check_replaceable_file

        check_replaceable_file(out, "a noise envelope file", lambda path: read_envelope_file(path) is not None)
    return plan, out


def write_envelope(config: EnvelopeConfig, plan: Plan, out: Path, *, command: str = "",
                   log=lambda line: None) -> dict:
    """Measure `plan` and write the envelope document to `out` atomically; returns the document.
    `command`: how the measurement was asked for, stored in the file."""
    start = time.perf_counter()
    measured = measure(config.capture, plan, log=log)
    document = envelope_document(config.capture, measured, name=config.name or out.stem, command=command,
                                 seconds=time.perf_counter() - start)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    tmp.write_text(json.dumps(document, indent=None, separators=(",", ":")) + "\n")
    tmp.replace(out)
    return document


def summary_table(document: dict):
    from rich.table import Table

    table = Table(title=f"noise envelope {document.get('name')}: worst level per kind")
    for column in ("pair", "kind", "tensors", "bitwise", "max |d|", "max |d|/max|ref|", "max ulp", "worst"):
        table.add_column(column)
    for key, entry in document["pairs"].items():
        for kind, level in entry["kinds"].items():
            if "max_abs" in level:
                cells = [f"{_val(level['max_abs']):.3g}", f"{_val(level.get('scaled', 0.0)):.3g}",
                         str(level.get("max_ulp", "-"))]
            else:
                cells = [f"{_val(level.get('mismatched_fraction', 0.0)):.3g} differ", "-", "-"]
            table.add_row(key, kind, str(level.get("tensors", 0)), str(level.get("exact", 0)), *cells,
                          str(level.get("worst", "")))
    return table
