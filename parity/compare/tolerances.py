"""Tolerance profiles: how far a candidate may be from the reference and still count as the same computation.

Every number here is explained, with the measurement that produced it, in docs/tolerances.md; the CPU numbers
were measured by `python -m parity.tools.measure_tolerances` (ultralytics against itself, torch threads 1 vs 2
vs 4). Never loosen a number to make a test pass: a failing test is a finding.

A tensor passes when every element satisfies `|cand - ref| <= atol + rtol * |ref|` (and `ulp <= max_ulp` when
`max_ulp` is set); see `parity.compare.metrics`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from parity.errors import ParityError

# Tolerance kinds. A dump name picks its family by its first segment (`kind_of`); the comparison mode picks
# between the single-step and the accumulated variant (`Profile.for_name`):
#   activation-isolated  a layer fed the reference's own inputs          activation  the end-to-end forward
#   loss                 a loss stage fed the reference's own inputs     loss-chained  loss after the port's forward
#   grad-isolated        loss gradients w.r.t. the reference's head      grad          the end-to-end backward
#   weight, init, input  copied or computed by a formula: bitwise
KINDS = ("activation", "activation-isolated", "weight", "init", "input", "loss", "loss-chained", "grad",
         "grad-isolated")
_DEFAULT_MODE_KIND = {"activation": "activation", "loss": "loss", "grad": "grad"}
_MODE_KIND = {
    ("activation", "isolated"): "activation-isolated", ("activation", "chained"): "activation",
    ("loss", "isolated"): "loss", ("loss", "chained"): "loss-chained",
    ("grad", "isolated"): "grad-isolated", ("grad", "chained"): "grad",
}


@dataclass(frozen=True)
class Tolerance:
    """Element-wise: `|cand - ref| <= atol + atol_absmax * max|ref| + rtol * |ref|` (and `ulp <= max_ulp` if set).

    `atol_absmax` scales the absolute part with the reference tensor's largest finite magnitude: rounding
    error of a reduction grows with the size of its terms, and tensors of one kind (activations of different
    layers, gradients of different parameters) differ in scale by orders of magnitude. `atol` is the floor for
    tensors whose values are all near zero (a gradient that is structurally ~0 is pure rounding noise).
    """

    atol: float
    rtol: float
    max_ulp: int | None = None
    source: str = ""
    atol_absmax: float = 0.0

    @property
    def bitwise(self) -> bool:
        return self.atol == 0 and self.rtol == 0 and self.atol_absmax == 0 and self.max_ulp in (None, 0)

    def as_dict(self) -> dict:
        return {"atol": self.atol, "rtol": self.rtol, "atol_absmax": self.atol_absmax, "max_ulp": self.max_ulp,
                "source": self.source}

    def describe(self) -> str:
        if self.bitwise:
            return "bitwise"
        text = f"atol {self.atol:g}"
        if self.atol_absmax:
            text += f" + {self.atol_absmax:g}*max|ref|"
        text += f", rtol {self.rtol:g}"
        return text + (f", max {self.max_ulp} ulp" if self.max_ulp is not None else "")


BITWISE = Tolerance(0.0, 0.0, max_ulp=0, source="bitwise: copied or computed by a formula, never by a reduction")


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    measured: bool  # False: derived from documented precision, not yet measured on the hardware it names
    tolerances: dict[str, Tolerance] = field(default_factory=dict)
    notes: str = ""

    def for_kind(self, kind: str) -> Tolerance:
        if kind not in self.tolerances:
            raise ParityError(f"profile {self.name!r} has no tolerance for kind {kind!r} (kinds: {', '.join(self.tolerances)})")
        return self.tolerances[kind]

    def for_name(self, name: str, *, mode: str | None = None) -> Tolerance:
        """The tolerance for a dump tensor name. `mode` is "isolated" (fed the reference's own inputs: no
        upstream error, held tighter) or "chained" (after the candidate's own upstream computation); without it,
        activations and gradients are taken as chained and loss stages as isolated (a loss replay)."""
        kind = kind_of(name)
        if mode in ("isolated", "chained"):
            kind = _MODE_KIND.get((kind, mode), kind)
        return self.for_kind(kind)

    def discriminates(self, kind: str) -> bool:
        """False when the tolerance is at least the tensor's own scale: the comparison then only catches
        shapes and non-finite values, not wrong numbers."""
        tol = self.for_kind(kind)
        return tol.atol_absmax < 1.0 and tol.rtol < 1.0

    def as_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "measured": self.measured,
                "notes": self.notes, "tolerances": {k: v.as_dict() for k, v in self.tolerances.items()}}


def kind_of(name: str) -> str:
    """Which tolerance kind a dump name belongs to (docs/dump-format.md spells the names)."""
    head = name.split(".", 1)[0]
    return {
        "act": "activation",
        "model": "weight",
        "init": "init",
        "batch": "input",
        "loss": "loss",
        "grad": "grad",
    }.get(head, "activation")


# ---------------------------------------------------------------------------------------------------------
# The numbers. docs/tolerances.md explains each; runs/tolerances/measurements.json is the raw measurement
# (`python -m parity.tools.measure_tolerances`: yolo11n and yolov8n at 160/320/640 px, batch 2, the `assets`
# batch, perturbed BatchNorm, torch threads 1 and 4 against 2, ultralytics 8.4.190, torch 2.14.1, CPU).
#
# Measured worst cases (over both models, three sizes, two thread counts), at rtol 1e-5 unless noted:
#   isolated layer outputs      max(|d| - rtol|ref|) <= 3.70e-7 * max|ref|                 (act.9, yolo11n 160)
#   chained layer/sub-module    max(|d| - rtol|ref|) <= 2.13e-5 * max|ref|                 (act.23.cv3.2.1.1)
#   loss stages, reference in   every stage bitwise except the returned loss (1 ULP); all pass at rtol 1e-6
#   loss stages, chained        <= 9.54e-7 absolute where max|ref| < 0.01, else <= 5.97e-5 * max|ref|
#   head grads, reference in    <= 1.54e-8 * max|ref|
#   parameter grads, chained    <= 1.76e-7 absolute where max|ref| < 0.01, else <= 7.24e-5 * max|ref|
# Each tolerance is 10x the measured worst case, rounded up to one significant digit: the thread counts only
# reorder reductions inside one library on one CPU; another CPU, library or kernel choice (a port's conv) rounds
# differently, and 10x keeps that in while a real bug (a wrong eps, interpolation, bias) stays far outside.
# `atol` floors (1e-6 for activations, 1e-9 for loss stages) are not measured: they only matter for a tensor
# whose reference is all zeros, which none of the measured tensors is.
MEASURED = {
    "isolated_per_absmax": 3.70e-7,
    "chained_per_absmax": 2.13e-5,
    "depth_growth": 2.13e-5 / 3.70e-7,  # ~58: how much the end-to-end spread exceeds one layer's
    "loss_chained_floor": 9.54e-7,
    "loss_chained_per_absmax": 5.97e-5,
    "grad_isolated_per_absmax": 1.54e-8,
    "grad_floor": 1.76e-7,
    "grad_per_absmax": 7.24e-5,
}
_CPU = "measured: ultralytics vs itself, torch threads 1/4 vs 2, CPU, 10x worst case (docs/tolerances.md)"
_UNIT_ROUNDOFF = {"fp32": 2.0 ** -24, "tf32": 2.0 ** -11, "fp16": 2.0 ** -11, "bf16": 2.0 ** -8}

PROFILES: dict[str, Profile] = {}


def _register(profile: Profile) -> Profile:
    PROFILES[profile.name] = profile
    return profile


def _cpu_tolerances(source: str) -> dict[str, Tolerance]:
    return {
        "activation-isolated": Tolerance(1e-6, 1e-5, source=source, atol_absmax=4e-6),
        "activation": Tolerance(1e-6, 1e-5, source=source, atol_absmax=3e-4),
        "weight": BITWISE,
        "init": BITWISE,
        "input": BITWISE,
        "loss": Tolerance(1e-9, 1e-5, source=source),
        "loss-chained": Tolerance(1e-5, 1e-5, source=source, atol_absmax=6e-4),
        "grad-isolated": Tolerance(1e-12, 1e-5, source=source, atol_absmax=2e-7),
        "grad": Tolerance(2e-6, 1e-5, source=source, atol_absmax=8e-4),
    }


def _derived(precision: str, source: str) -> dict[str, Tolerance]:
    """CPU float32 tolerances scaled by the unit roundoff of `precision` relative to float32's.

    Rounding errors are linear in the unit roundoff, and the measured CPU numbers already carry the growth with
    depth (chained = ~58x isolated), so every non-bitwise number scales by u(precision) / u(fp32):
    8192 for TF32 and fp16 (10 explicit mantissa bits), 65536 for bf16 (7)."""
    factor = _UNIT_ROUNDOFF[precision] / _UNIT_ROUNDOFF["fp32"]
    out = {}
    for kind, tol in _cpu_tolerances(source).items():
        if tol.bitwise:
            out[kind] = tol
            continue
        out[kind] = Tolerance(_round_up(tol.atol * factor), _round_up(tol.rtol * factor), tol.max_ulp, source,
                              _round_up(tol.atol_absmax * factor))
    return out


def _round_up(value: float) -> float:
    """Up to one significant digit (0.0327 -> 0.04)."""
    if value <= 0:
        return 0.0
    import math

    exponent = math.floor(math.log10(value))
    mantissa = value / 10 ** exponent
    digit = math.ceil(round(mantissa, 9))
    return float(f"{digit}e{exponent}") if digit < 10 else float(f"1e{exponent + 1}")


_register(Profile("cpu-fp32", "float32 on CPU (any thread count), the default", True, _cpu_tolerances(_CPU)))
_register(Profile(
    "cuda-fp32", "float32 on a CUDA GPU, TF32 off", False,
    _derived("fp32", "derived: same unit roundoff as CPU float32; not measured on a GPU yet"),
    notes="Same numbers as cpu-fp32: the 10x margin is meant to cover another library's kernels (cuDNN). "
          "Not measured on a GPU yet."))
_register(Profile(
    "cuda-tf32", "CUDA with TF32 convolutions/matmuls (10-bit mantissa inputs, float32 accumulation)", False,
    _derived("tf32", "derived: cpu-fp32 x u(tf32)/u(fp32) = 8192; not measured on a GPU yet"),
    notes="Chained activations and end-to-end gradients get tolerances above the tensors' own scale: under TF32 "
          "only isolated mode separates a port bug from precision noise. Not measured on a GPU yet."))
_register(Profile(
    "amp-fp16", "CUDA autocast float16 (10-bit mantissa, narrow range)", False,
    _derived("fp16", "derived: cpu-fp32 x u(fp16)/u(fp32) = 8192; not measured on a GPU yet"),
    notes="As cuda-tf32, plus float16's range: overflow to inf is a finding, not noise. Not measured on a GPU "
          "yet."))
_register(Profile(
    "amp-bf16", "CUDA autocast bfloat16 (7-bit mantissa)", False,
    _derived("bf16", "derived: cpu-fp32 x u(bf16)/u(fp32) = 65536; not measured on a GPU yet"),
    notes="Only isolated activations and loss stages keep some discriminating power. Not measured on a GPU yet."))

DEFAULT_PROFILE = "cpu-fp32"


def get_profile(name: str | Profile | None) -> Profile:
    if isinstance(name, Profile):
        return name
    name = name or DEFAULT_PROFILE
    if name not in PROFILES:
        raise ParityError(f"unknown tolerance profile {name!r}; choose one of {', '.join(PROFILES)}")
    return PROFILES[name]


def profile_for_environment(environment: dict | None, precision: str | None = None) -> str:
    """The profile that matches how a reference dump was captured (manifest `environment`, `config.precision`)."""
    environment = environment or {}
    precision = precision or "fp32"
    if precision in ("fp16", "bf16"):
        return f"amp-{precision}"
    if str(environment.get("device", "cpu")).startswith("cuda"):
        if precision == "tf32" or environment.get("tf32_cudnn") or environment.get("tf32_matmul"):
            return "cuda-tf32"
        return "cuda-fp32"
    return "cpu-fp32"
