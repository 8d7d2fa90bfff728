"""Unit tests of `parity.compare.metrics` and `parity.compare.tolerances`: every metric, each able to fail."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from parity.compare import metrics as metrics_module
from parity.compare.metrics import compare_tensors, shape_difference, ulp_distance
from parity.compare.tolerances import BITWISE, KINDS, PROFILES, Tolerance, get_profile, kind_of, profile_for_environment
from parity.errors import ParityError

LOOSE = Tolerance(1e-3, 1e-3, source="test")


def _next_up(x: float, steps: int = 1) -> torch.Tensor:
    value = np.float32(x)
    for _ in range(steps):
        value = np.nextafter(value, np.float32(np.inf), dtype=np.float32)
    return torch.tensor(value, dtype=torch.float32)


def test_identical_tensors_are_exact_and_pass():
    ref = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0))
    m = compare_tensors(ref, ref.clone(), BITWISE)
    assert m.passed and m.exact
    assert m.max_abs == 0 and m.max_rel == 0 and m.mean_abs == 0 and m.rmse == 0
    assert m.max_ulp == 0 and m.mismatched == 0 and m.min_atol == 0
    assert m.cosine == pytest.approx(1.0)
    assert m.ref_shape == m.cand_shape == [3, 4, 5]
    assert m.ref_dtype == m.cand_dtype == "float32"


def test_bitwise_equal_fast_path_reports_what_the_chunked_path_reports(monkeypatch):
    ref = torch.randn(70_000, generator=torch.Generator().manual_seed(3)) * 7
    tol = Tolerance(1e-4, 1e-4, atol_absmax=1e-3, max_ulp=2, source="test")
    fast = compare_tensors(ref, ref.clone(), tol)
    assert fast.ref_absmax == pytest.approx(float(ref.abs().max()))
    assert fast.effective_atol == pytest.approx(1e-4 + 1e-3 * fast.ref_absmax)
    # without torch.equal every pair goes through the element-wise equality check in chunks
    monkeypatch.setattr(metrics_module.torch, "equal", lambda a, b: False)
    slow = compare_tensors(ref, ref.clone(), tol)
    assert fast.as_dict() == slow.as_dict()


def test_statistics_match_numpy_definitions():
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(1000, generator=g)
    cand = ref + 1e-3 * torch.randn(1000, generator=g)
    m = compare_tensors(ref, cand, Tolerance(0.0, 0.0))
    r, c = ref.double().numpy(), cand.double().numpy()
    d = np.abs(c - r)
    assert m.max_abs == pytest.approx(d.max(), rel=1e-12)
    assert m.mean_abs == pytest.approx(d.mean(), rel=1e-12)
    assert m.rmse == pytest.approx(np.sqrt((d ** 2).mean()), rel=1e-12)
    assert m.max_rel == pytest.approx((d / np.abs(r)).max(), rel=1e-12)
    assert m.cosine == pytest.approx(float(r @ c / np.linalg.norm(r) / np.linalg.norm(c)), rel=1e-12)
    assert m.ref_absmax == pytest.approx(np.abs(r).max())
    # the worst element is located
    assert m.worst_index == [int(d.argmax())]
    assert m.ref_at_worst == pytest.approx(float(ref[int(d.argmax())]))
    assert not m.passed and not m.exact


def test_chunked_pass_gives_the_same_numbers(monkeypatch):
    g = torch.Generator().manual_seed(2)
    ref = torch.randn(4, 3, 7, 5, generator=g)
    cand = ref * (1 + 1e-5 * torch.randn(ref.shape, generator=g))
    cand[1, 2, 3, 4] = float("nan")
    tol = Tolerance(1e-6, 1e-5)
    whole = compare_tensors(ref, cand, tol).as_dict()
    monkeypatch.setattr(metrics_module, "CHUNK", 7)
    chunked = compare_tensors(ref, cand, tol).as_dict()
    for key in ("max_abs", "mismatched", "max_ulp", "nan_cand", "min_atol", "worst_index", "ref_absmax"):
        assert chunked[key] == whole[key], key
    for key in ("mean_abs", "rmse", "cosine", "max_rel"):
        assert chunked[key] == pytest.approx(whole[key], rel=1e-12), key


def test_ulp_distance_counts_representable_floats():
    one = torch.tensor([1.0])
    assert compare_tensors(one, _next_up(1.0).reshape(1), BITWISE).max_ulp == 1
    assert compare_tensors(one, _next_up(1.0, 5).reshape(1), BITWISE).max_ulp == 5
    # across zero: +0 and -0 are the same point; the two smallest subnormals are 2 apart
    assert compare_tensors(torch.tensor([0.0]), torch.tensor([-0.0]), BITWISE).max_ulp == 0
    tiny = np.float32(1.4e-45)
    assert int(ulp_distance(torch.tensor([tiny]), torch.tensor([-tiny]))[0]) == 2
    # a negative pair behaves like the positive one
    assert compare_tensors(-one, -_next_up(1.0, 3).reshape(1), BITWISE).max_ulp == 3
    # only for float32 pairs
    assert compare_tensors(one.double(), one.double(), BITWISE).max_ulp is None
    assert compare_tensors(one, one.double(), LOOSE).max_ulp is None


def test_max_ulp_tolerance_fails_one_ulp_and_atol_passes_it():
    ref = torch.tensor([-11.536642074584961, 2.0])
    cand = ref.clone()
    cand[0] = _next_up(float(ref[0]))
    bitwise = compare_tensors(ref, cand, BITWISE)
    assert not bitwise.passed and bitwise.max_ulp == 1 and bitwise.mismatched == 1
    assert bitwise.mismatched_fraction == 0.5
    one_ulp = compare_tensors(ref, cand, Tolerance(0.0, 0.0, max_ulp=1))
    # ULPs alone allow it only when atol/rtol do too: atol 0 keeps it out
    assert not one_ulp.passed
    assert compare_tensors(ref, cand, Tolerance(1e-5, 0.0, max_ulp=1)).passed
    assert not compare_tensors(ref, cand, Tolerance(1e-5, 0.0, max_ulp=0)).passed


def test_scale_and_offset_errors_fail_although_cosine_is_one():
    g = torch.Generator().manual_seed(3)
    ref = torch.rand(64, 8, generator=g) + 0.5
    scaled = compare_tensors(ref, ref * 1.01, LOOSE)
    assert scaled.cosine == pytest.approx(1.0, abs=1e-12)
    assert not scaled.passed
    assert scaled.mismatched_fraction == 1.0
    assert scaled.max_rel == pytest.approx(0.01, rel=1e-5)
    shifted = compare_tensors(ref + 100, ref + 100.5, LOOSE)
    assert shifted.cosine > 0.9999
    assert not shifted.passed


def test_mismatch_fraction_and_minimum_atol():
    ref = torch.ones(10)
    cand = ref.clone()
    cand[:3] += torch.tensor([0.1, 0.2, 0.3])
    tol = Tolerance(0.15, 0.0)
    m = compare_tensors(ref, cand, tol)
    assert m.mismatched == 2 and m.mismatched_fraction == pytest.approx(0.2)
    assert m.min_atol == pytest.approx(0.3, rel=1e-6)
    # at rtol 0.1 the atol needed shrinks by 0.1 * |ref|
    m = compare_tensors(ref, cand, Tolerance(0.15, 0.1))
    assert m.min_atol == pytest.approx(0.2, rel=1e-6)
    assert m.mismatched == 1
    # exactly the minimum atol passes
    assert compare_tensors(ref, cand, Tolerance(m.min_atol + 1e-7, 0.1)).passed


def test_atol_absmax_scales_with_the_reference():
    ref = torch.tensor([100.0, 1.0, 0.0])
    cand = ref + torch.tensor([0.0, 0.0, 0.05])
    assert not compare_tensors(ref, cand, Tolerance(0.01, 0.0)).passed
    m = compare_tensors(ref, cand, Tolerance(0.0, 0.0, atol_absmax=1e-3))
    assert m.passed and m.effective_atol == pytest.approx(0.1)
    assert not compare_tensors(ref / 100, cand / 100 + torch.tensor([0, 0, 0.05]), Tolerance(0.0, 0.0, atol_absmax=1e-3)).passed


def test_nan_and_inf_counts():
    ref = torch.tensor([1.0, float("nan"), float("inf"), 4.0])
    same = compare_tensors(ref, ref.clone(), BITWISE)
    assert same.passed and same.nan_ref == same.nan_cand == 1 and same.inf_ref == same.inf_cand == 1
    cand = ref.clone()
    cand[0] = float("nan")
    m = compare_tensors(ref, cand, LOOSE)
    assert not m.passed and m.nan_cand == 2 and m.nan_ref == 1
    assert m.mismatched == 1 and m.min_atol == math.inf and m.max_abs == math.inf
    assert "non-finite on one side only" in m.reason
    flipped = ref.clone()
    flipped[2] = float("-inf")
    m = compare_tensors(ref, flipped, LOOSE)
    assert not m.passed and m.inf_cand == 1 and m.mismatched == 1
    # NaN where the reference is finite fails even with an enormous tolerance
    assert not compare_tensors(torch.zeros(3), torch.tensor([0.0, float("nan"), 0.0]), Tolerance(1e9, 1e9)).passed


def test_shape_mismatch_names_the_dimension():
    ref = torch.zeros(2, 96, 6, 6)
    cand = torch.zeros(2, 128, 6, 6)
    m = compare_tensors(ref, cand, LOOSE)
    assert not m.passed
    assert "dim 1: reference 96, candidate 128" in m.shape_note
    assert m.permutation is None
    note, perm = shape_difference([2, 3], [2, 3, 1])
    assert perm is None and "rank differs" in note and "same number of elements" in note


def test_nhwc_layout_is_recognised():
    ref = torch.randn(2, 16, 8, 10, generator=torch.Generator().manual_seed(4))
    cand = ref.permute(0, 2, 3, 1).contiguous()  # NHWC
    m = compare_tensors(ref, cand, BITWISE)
    assert not m.passed
    assert m.permutation == [0, 3, 1, 2]
    assert "NHWC" in m.shape_note
    assert m.permuted_passed is True
    assert "after that permutation the values pass" in m.reason
    # a permutation that fixes the shape but not the values says so
    m = compare_tensors(ref, cand + 1, BITWISE)
    assert m.permuted_passed is False and "still differ" in m.reason


def test_bool_and_integer_tensors_compare_exactly():
    ref = torch.tensor([True, False, True, True])
    cand = torch.tensor([True, True, True, False])
    m = compare_tensors(ref, cand, Tolerance(10.0, 10.0))
    assert m.exact_compare and not m.passed and m.mismatched == 2
    assert m.max_ulp is None and m.cosine is None
    ints = torch.arange(6)
    other = ints.clone()
    other[5] = 6
    m = compare_tensors(ints, other, Tolerance(10.0, 10.0))
    assert not m.passed and m.mismatched == 1 and m.max_abs == 1.0
    assert compare_tensors(ints, ints.to(torch.int32), BITWISE).passed
    # a float port of an integer tensor is compared exactly too
    assert compare_tensors(ints, ints.float(), BITWISE).passed
    assert not compare_tensors(ints, ints.float() + 1e-3, Tolerance(1.0, 1.0)).passed


def test_mixed_float_dtypes_and_non_contiguous_inputs():
    g = torch.Generator().manual_seed(5)
    ref = torch.randn(5, 7, generator=g, dtype=torch.float64)
    cand = ref.float().t().contiguous().t()  # float32, non-contiguous view
    m = compare_tensors(ref, cand, Tolerance(1e-6, 1e-6))
    assert m.passed and not m.exact and m.max_ulp is None
    assert m.cand_dtype == "float32" and m.ref_dtype == "float64"
    assert m.max_abs <= 2.0 ** -23 * float(ref.abs().max())


def test_signed_zeros_and_nans_count_as_exact():
    ref = torch.tensor([0.0, 1.0, float("nan")])
    cand = torch.tensor([-0.0, 1.0, float("nan")])
    m = compare_tensors(ref, cand, BITWISE)
    assert m.passed and m.exact and m.max_ulp == 0 and m.nan_ref == m.nan_cand == 1
    # the same in the slow path (a float64 pair whose sum overflows, so finiteness is checked element-wise)
    big = torch.tensor([1e308, 1e308, -0.0], dtype=torch.float64)
    near = big.clone()
    near[0] = 1.0000001e308
    m = compare_tensors(big, near, Tolerance(0.0, 1e-6))
    assert m.passed and not m.exact and m.nan_cand == m.inf_cand == 0
    assert not compare_tensors(big, near, Tolerance(0.0, 1e-9)).passed


def test_empty_tensors_and_json():
    m = compare_tensors(torch.zeros(0, 4), torch.zeros(0, 4), BITWISE)
    assert m.passed and m.numel == 0
    bad = compare_tensors(torch.ones(3), torch.tensor([1.0, float("nan"), 1.0]), LOOSE).as_dict()
    text = json.dumps(bad, allow_nan=False)  # strict JSON: non-finite numbers become strings
    assert '"min_atol": "inf"' in text and bad["passed"] is False
    assert bad["tolerance"]["atol"] == LOOSE.atol


# ------------------------------------------------------------------------------------------ tolerances
def test_every_profile_has_every_kind_and_bitwise_weights():
    assert set(PROFILES) >= {"cpu-fp32", "cuda-fp32", "cuda-tf32", "amp-fp16", "amp-bf16"}
    for profile in PROFILES.values():
        for kind in KINDS:
            assert profile.for_kind(kind).source, (profile.name, kind)
        assert profile.for_kind("init").bitwise and profile.for_kind("weight").bitwise
    cpu = get_profile("cpu-fp32")
    assert cpu.measured
    assert not get_profile("cuda-tf32").measured
    # lower precision never gets a tighter activation tolerance than full float32 on the same device family
    acts = [get_profile(p).for_kind("activation") for p in ("cuda-fp32", "cuda-tf32", "amp-bf16")]
    assert acts[0].atol_absmax <= acts[1].atol_absmax <= acts[2].atol_absmax


def test_tolerance_is_chosen_by_tensor_name():
    cpu = get_profile("cpu-fp32")
    assert kind_of("act.4") == "activation" and kind_of("model.0.conv.weight") == "weight"
    assert kind_of("init.cls_bias.0.stored") == "init" and kind_of("grad.param.model.0.conv.weight") == "grad"
    assert kind_of("loss.default.assign.overlaps") == "loss" and kind_of("batch.img") == "input"
    assert cpu.for_name("init.cls_bias.0.stored").bitwise
    isolated = cpu.for_name("act.4", mode="isolated")
    chained = cpu.for_name("act.4", mode="chained")
    assert isolated.atol_absmax < chained.atol_absmax
    with pytest.raises(ParityError):
        get_profile("no-such-profile")


def test_profile_follows_how_the_reference_was_captured():
    assert profile_for_environment({"device": "cpu"}) == "cpu-fp32"
    assert profile_for_environment({"device": "cuda:0", "tf32_cudnn": False, "tf32_matmul": False}) == "cuda-fp32"
    assert profile_for_environment({"device": "cuda", "tf32_cudnn": True}) == "cuda-tf32"
    assert profile_for_environment({"device": "cuda"}, "fp16") == "amp-fp16"
    assert profile_for_environment({"device": "cuda"}, "bf16") == "amp-bf16"
