"""The eps a port's BatchNorm implies, from its outputs alone; rounding is never called an eps difference."""

import pytest
import torch

from parity.replay.candidates import DumpCandidate
from parity.diagnose.batchnorm import diagnose_layer, fit_conv_batchnorm
from parity.dump.files import Dump
from parity.replay.export import write_candidate_dump


@pytest.fixture(scope="module")
def reference(fixtures_dir):
    return Dump(fixtures_dir / "yolov8-narrow-nc12-96")


def _layer0(reference):
    return (reference.get("batch.img"), reference.get("model.0.conv.weight"), reference.get("model.0.bn.bias"),
            reference.get("act.0"))


def _conv_bn_silu(reference, eps: float, *, variance_noise: float = 0.0) -> torch.Tensor:
    img, weight, bias, _ = _layer0(reference)
    z = torch.nn.functional.conv2d(img, weight, stride=2, padding=weight.shape[-1] // 2)
    mean, var = z.mean((0, 2, 3), keepdim=True), z.var((0, 2, 3), unbiased=False, keepdim=True)
    var = var * (1 + variance_noise * torch.randn_like(var))
    gamma = reference.get("model.0.bn.weight").view(1, -1, 1, 1)
    y = (z - mean) / torch.sqrt(var + eps) * gamma + bias.view(1, -1, 1, 1)
    return torch.nn.functional.silu(y)


@pytest.mark.parametrize("eps", [1e-5, 1e-4, 1e-2])
def test_an_eps_difference_is_named_with_the_value(reference, eps):
    fit = fit_conv_batchnorm(*_layer0(reference), _conv_bn_silu(reference, eps))
    assert fit is not None and fit.is_eps_difference and not fit.is_rounding
    assert fit.implied_eps == pytest.approx(eps, rel=0.05)
    assert fit.eps_words() == f"{eps:g}"


def test_rounding_of_the_variance_is_not_an_eps_difference(reference):
    torch.manual_seed(0)
    fit = fit_conv_batchnorm(*_layer0(reference), _conv_bn_silu(reference, 1e-3, variance_noise=2e-4))
    assert fit is not None and fit.is_rounding and not fit.is_eps_difference
    assert fit.implied_eps == pytest.approx(1e-3, rel=0.05)


def test_the_reference_against_itself_is_rounding_at_most(reference):
    fit = fit_conv_batchnorm(*_layer0(reference), reference.get("act.0"))
    assert fit is not None and not fit.is_eps_difference and fit.max_scale_error < 1e-6


def test_planted_eps_is_named_from_an_isolated_dump(reference, tmp_path):
    """bn-eps plants eps 1e-5 in layer 4 (a C2f): its first sub-block cv1 is a Conv fed the layer's input."""
    dump = write_candidate_dump(reference, "builtin", tmp_path / "eps", inject="bn-eps", isolated=True)
    candidate = DumpCandidate(Dump(dump))
    finding = diagnose_layer(reference, candidate.run_layer(4, []), 4)
    assert finding is not None and finding.signature == "bn-eps" and finding.where == "layer 4, cv1"
    assert "matches eps=1e-05 (ultralytics uses 0.001)" in finding.message
    assert finding.evidence["implied_eps"] == pytest.approx(1e-5, rel=0.05)
    assert diagnose_layer(reference, candidate.run_layer(0, []), 0) is not None  # layer 0 is clean: rounding at most
    assert diagnose_layer(reference, candidate.run_layer(0, []), 0).signature == "bn-reduction-rounding"
