"""What a Conv layer's BatchNorm did, read from a port's output alone: the eps it implies, or rounding.

An ultralytics `Conv` is conv -> train-mode BatchNorm -> SiLU. Given the layer's reference input and weights, the
pre-normalisation tensor `z` and its per-channel batch variance `v` are known exactly. A port whose BatchNorm
uses another eps `e` scales channel `c` of the normalised tensor by

    r_c = sqrt((v_c + eps_ref) / (v_c + e))

relative to ultralytics, so the per-channel scale of the port's output, measured where SiLU is well conditioned,
gives `e` back: consistently across channels when eps is really the cause. Reduction rounding (a one-pass float32
variance, another summation order) moves every channel by a scale within float noise of 1 and implies the
reference's own eps: it is not an eps difference, and this module never calls it one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# ultralytics' initialize_weights() sets this on every BatchNorm2d.
REFERENCE_EPS = 1e-3
# Common framework defaults a port inherits (PyTorch, Jittor, Paddle, MindSpore: 1e-5; TF/Keras: 1e-3).
COMMON_EPS = (1e-5, 1e-4, 1e-3, 1e-6, 1e-2, 0.0)
# Where SiLU(y) is inverted: y > 0.5 keeps the inversion well conditioned (SiLU's slope there is above 0.7).
_INVERT_ABOVE = 0.5
_MIN_POINTS = 16


@dataclass
class BatchNormFit:
    """The per-channel scale of a port's BatchNorm relative to ultralytics', and the eps it implies."""

    implied_eps: float
    eps_spread: float  # relative interquartile range of the per-channel implied eps
    max_scale_error: float  # max over channels of |r_c - 1|
    channels: int
    nearest_common_eps: float

    @property
    def is_eps_difference(self) -> bool:
        """The channels agree on one eps that is not ultralytics'."""
        far = not (0.5 < (self.implied_eps + 1e-12) / REFERENCE_EPS < 2.0)
        return far and self.eps_spread < 0.5 and self.max_scale_error > 1e-4

    @property
    def is_rounding(self) -> bool:
        """Every channel within rounding of ultralytics' scale, and the implied eps is ultralytics' own."""
        return self.max_scale_error < 2e-3 and 0.5 < self.implied_eps / REFERENCE_EPS < 2.0

    def eps_words(self) -> str:
        return f"{self.nearest_common_eps:g}" if _close(self.implied_eps, self.nearest_common_eps) else \
            f"{self.implied_eps:.3g}"


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 0.1 * max(abs(b), 1e-12)


def _invert_silu(out: torch.Tensor) -> torch.Tensor:
    """y with y * sigmoid(y) = out (Newton, float64); valid on SiLU's increasing branch."""
    target = out.double()
    y = target.clone()
    for _ in range(50):
        s = torch.sigmoid(y)
        y = y - (y * s - target) / (s * (1 + y * (1 - s)))
    return y


def fit_conv_batchnorm(layer_input: torch.Tensor, conv_weight: torch.Tensor, bn_bias: torch.Tensor,
                       reference_out: torch.Tensor, candidate_out: torch.Tensor) -> BatchNormFit | None:
    """Fit the port's per-channel BatchNorm scale from a Conv layer's outputs; None when it cannot be fitted
    (shapes that are not conv -> BN -> SiLU, or too few well-conditioned elements)."""
    if reference_out.shape != candidate_out.shape or reference_out.dim() != 4 or conv_weight.dim() != 4:
        return None
    channels = conv_weight.shape[0]
    if reference_out.shape[1] != channels or bn_bias.numel() != channels:
        return None
    groups = layer_input.shape[1] // conv_weight.shape[1] if conv_weight.shape[1] else 1
    stride = max(1, round(layer_input.shape[-1] / reference_out.shape[-1]))
    z = F.conv2d(layer_input.double(), conv_weight.double(), stride=stride, padding=conv_weight.shape[-1] // 2,
                 groups=groups)
    if z.shape != reference_out.shape:
        return None
    variance = z.var(dim=(0, 2, 3), unbiased=False)
    shift = bn_bias.double().view(1, -1, 1, 1)
    y_ref, y_cand = _invert_silu(reference_out), _invert_silu(candidate_out.to(reference_out.dtype))
    usable = (reference_out > _INVERT_ABOVE) & (candidate_out > _INVERT_ABOVE) & ((y_ref - shift).abs() > 1e-3)
    scales, eps = [], []
    for c in range(channels):
        mask = usable[:, c]
        if int(mask.sum()) < _MIN_POINTS:
            continue
        ratio = ((y_cand[:, c] - shift[:, c]) / (y_ref[:, c] - shift[:, c]))[mask].median()
        if not torch.isfinite(ratio) or ratio <= 0:
            continue
        scales.append(float(ratio))
        eps.append(float((variance[c] + REFERENCE_EPS) / ratio ** 2 - variance[c]))
    if len(scales) < max(2, channels // 4):
        return None
    eps_t = torch.tensor(eps, dtype=torch.float64)
    implied = float(eps_t.median())
    q1, q3 = torch.quantile(eps_t, torch.tensor([0.25, 0.75], dtype=torch.float64)).tolist()
    spread = (q3 - q1) / max(abs(implied), 1e-12)
    nearest = min(COMMON_EPS, key=lambda e: abs(e - implied) / max(e, 1e-12) if e else abs(implied) * 1e6)
    return BatchNormFit(implied_eps=max(implied, 0.0), eps_spread=spread,
                        max_scale_error=max(abs(s - 1) for s in scales), channels=len(scales),
                        nearest_common_eps=nearest)


def describe(fit: BatchNormFit, where: str) -> str:
    if fit.is_eps_difference:
        return (f"{where}: the port's BatchNorm matches eps={fit.eps_words()} (ultralytics uses "
                f"{REFERENCE_EPS:g}): its per-channel scale, fitted from its outputs on the reference's inputs, "
                f"implies eps {fit.implied_eps:.3g} in {fit.channels} channels (up to {fit.max_scale_error:.2g} "
                f"off ultralytics' scale). Set eps={REFERENCE_EPS:g} on every BatchNorm")
    return (f"{where}: the BatchNorm's per-channel scale is within {fit.max_scale_error:.2g} of ultralytics' and "
            f"implies ultralytics' own eps ({fit.implied_eps:.3g}): reduction rounding in the batch statistics "
            f"(e.g. a one-pass float32 variance), not an eps difference. For a parity check, accumulate the mean "
            f"and the centred variance in float64 (docs/porting-jittor.md)")


def conv_places(reference, index: int) -> list[tuple[str, str, str]]:
    """(output name, weight prefix, input name) of the Conv blocks of layer `index` whose input is the layer's own:
    the layer itself when it is an ultralytics Conv, else its first sub-block `cv1` when that is one."""
    entry = next((e for e in reference.layers if e.get("index") == index), None)
    if entry is None or len(entry.get("inputs", [])) != 1:
        return []
    places = []
    for output, prefix in ((f"act.{index}", f"model.{index}."), (f"act.{index}.cv1", f"model.{index}.cv1.")):
        if f"{prefix}conv.weight" in reference and f"{prefix}bn.bias" in reference and output in reference:
            places.append((output, prefix, entry["inputs"][0]))
    return places[:1]


def diagnose_layer(reference, candidate_outputs: dict[str, torch.Tensor], index: int):
    """A `bn-eps` error or a `bn-reduction-rounding` warning for layer `index`, from the candidate's isolated outputs
    (`{act name: tensor}`, as `Candidate.run_layer` / `layer_stages` return them); None when nothing can be said."""
    from parity.findings import Finding

    for output, prefix, source in conv_places(reference, index):
        cand = candidate_outputs.get(output)
        if cand is None:
            continue
        fit = fit_conv_batchnorm(reference.get(source), reference.get(f"{prefix}conv.weight"),
                                 reference.get(f"{prefix}bn.bias"), reference.get(output), cand)
        if fit is None or not (fit.is_eps_difference or fit.is_rounding):
            continue
        where = f"layer {index}" + ("" if output == f"act.{index}" else f", {output.split('.', 2)[2]}")
        evidence = {"layer": index, "tensor": output, "implied_eps": fit.implied_eps, "eps_spread": fit.eps_spread,
                    "max_scale_error": fit.max_scale_error, "channels": fit.channels, "reference_eps": REFERENCE_EPS}
        if fit.is_eps_difference:
            return Finding("bn-eps", where, describe(fit, where), evidence=evidence)
        return Finding("bn-reduction-rounding", where, describe(fit, where), severity="warning", evidence=evidence)
    return None
