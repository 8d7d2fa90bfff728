"""compare_tensors' words and numbers pinned exactly, so a changed rule or message fails a test (docs/testing.md).

tests/test_metrics.py checks the definitions and tests/test_metrics_properties.py the pass rule against numpy;
this file pins what a person reads (summary, reason, shape notes) and every field of TensorMetrics on small
hand-checked pairs.
"""

from __future__ import annotations

import math

import pytest
import torch

import parity.compare.metrics as metrics_module
from parity.jsonio import plain as _jsonable
from parity.compare.metrics import (TensorMetrics, _fmt, _ordered_int, _unravel, compare_tensors,
                                    shape_difference, ulp_distance)
from parity.compare.tolerances import Tolerance

R = torch.tensor([1.0, 2.0, 3.0, 4.0])
C = torch.tensor([1.0, 2.5, 3.0, 4.0])


def test_every_field_of_a_float32_divergence():
    m = compare_tensors(R, C, Tolerance(0.1, 0.01))
    assert (m.passed, m.exact, m.exact_compare, m.numel) == (False, False, False, 4)
    assert (m.max_abs, m.max_rel, m.mean_abs, m.rmse) == (0.5, 0.25, 0.125, 0.25)
    assert m.mismatched == 1 and m.mismatched_fraction == 0.25
    assert m.max_ulp == 2097152 and m.min_atol == pytest.approx(0.48)
    assert m.ref_absmax == 4.0 and m.effective_atol == pytest.approx(0.1)
    assert (m.worst_index, m.ref_at_worst, m.cand_at_worst) == ([1], 2.0, 2.5)
    assert m.cosine == pytest.approx(float(torch.nn.functional.cosine_similarity(R.double(), C.double(), dim=0)), rel=1e-12)
    assert (m.nan_ref, m.nan_cand, m.inf_ref, m.inf_cand) == (0, 0, 0, 0)
    assert m.reason == "1 of 4 elements (25.000%) outside atol 0.1 + rtol 0.01*|ref|"
    assert m.summary() == "max|d| 0.5, max rel 0.25, ulp 2097152, 25.00% out of tol"
    assert m.ref_shape == m.cand_shape == [4] and m.ref_dtype == m.cand_dtype == "float32"
    assert m.tolerance == {"atol": 0.1, "rtol": 0.01, "atol_absmax": 0.0, "max_ulp": None, "source": ""}


def test_the_reason_names_atol_absmax_and_the_ulp_limit():
    m = compare_tensors(R, C, Tolerance(0.1, 0.01, max_ulp=2, atol_absmax=0.01))
    assert m.effective_atol == pytest.approx(0.14)
    assert m.reason == ("1 of 4 elements (25.000%) outside atol 0.14 (= 0.1 + 0.01*max|ref| 4) + rtol 0.01*|ref| "
                        "or over 2 ulp")
    m64 = compare_tensors(R.double(), C.double(), Tolerance(0.1, 0.01, max_ulp=2))
    assert m64.max_ulp is None and m64.reason == "1 of 4 elements (25.000%) outside atol 0.1 + rtol 0.01*|ref|"
    assert m64.summary() == "max|d| 0.5, max rel 0.25, 25.00% out of tol"


def test_ulp_limit_alone_fails_a_pair_inside_atol():
    c = torch.nextafter(R, torch.tensor(math.inf))
    loose = compare_tensors(R, c, Tolerance(1.0, 0.0, max_ulp=1))
    assert loose.passed and loose.max_ulp == 1 and loose.mismatched == 0
    assert loose.summary() == f"max|d| {_fmt(loose.max_abs)}, max rel {_fmt(loose.max_rel)}, ulp 1"
    strict = compare_tensors(R, c, Tolerance(1.0, 0.0, max_ulp=0))
    assert not strict.passed and strict.mismatched == 4 and strict.reason.endswith(" or over 0 ulp")


def test_non_finite_mismatch_reason_and_numbers():
    m = compare_tensors(torch.tensor([1.0, math.nan, math.inf, 2.0]), torch.tensor([1.0, 2.0, math.inf, math.nan]))
    assert not m.passed and m.mismatched == 2 and m.mismatched_fraction == 0.5
    assert m.reason == "2 elements non-finite on one side only (NaN ref/cand 1/1, Inf ref/cand 1/1)"
    assert m.max_abs == math.inf and m.min_atol == math.inf
    assert (m.nan_ref, m.nan_cand, m.inf_ref, m.inf_cand) == (1, 1, 1, 1)
    assert m.summary() == "max|d| inf, max rel 0, ulp 0, 50.00% out of tol, cand NaN 1 Inf 1"
    both = compare_tensors(torch.tensor([math.nan, 1.0]), torch.tensor([math.nan, 1.5]), Tolerance(0.1, 0.0))
    assert both.reason == "1 of 2 elements (50.000%) outside atol 0.1 + rtol 0*|ref|" and both.max_abs == 0.5
    mixed = compare_tensors(torch.tensor([math.nan, 1.0]), torch.tensor([0.0, 1.5]), Tolerance(0.1, 0.0))
    assert mixed.reason == ("1 elements non-finite on one side only (NaN ref/cand 1/0, Inf ref/cand 0/0); "
                            "1 of 2 elements (50.000%) outside atol 0.1 + rtol 0*|ref|")
    assert mixed.mismatched == 2


def test_cosine_edge_values():
    assert compare_tensors(torch.tensor([math.nan]), torch.tensor([1.0])).cosine is None
    assert compare_tensors(torch.zeros(3), torch.tensor([0.0, 1.0, 0.0]), Tolerance(1.0, 0.0)).cosine == 0.0
    opposite = compare_tensors(R, -R, Tolerance(100.0, 0.0))
    assert opposite.cosine == -1.0 and opposite.passed
    assert compare_tensors(R, R * 3, Tolerance(100.0, 0.0)).cosine == pytest.approx(1.0)
    # exact pairs: cosine 1, or None when nothing is finite
    assert compare_tensors(R, R.clone()).cosine == 1.0
    assert compare_tensors(torch.zeros(2), torch.zeros(2)).cosine == 1.0
    assert compare_tensors(torch.tensor([math.nan]), torch.tensor([math.nan])).cosine is None


def test_relative_error_of_a_zero_reference_is_infinite():
    m = compare_tensors(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0]), Tolerance(2.0, 0.0))
    assert m.passed and m.max_rel == math.inf and m.max_abs == 1.0


def test_exact_pairs_and_the_fast_path():
    for ref in (R, R.double(), R.half()):
        m = compare_tensors(ref, ref.clone(), Tolerance(0.5, 0.5, atol_absmax=0.25))
        assert m.passed and m.exact and m.summary() == "bitwise equal"
        assert (m.max_abs, m.max_rel, m.mean_abs, m.rmse, m.min_atol) == (0.0, 0.0, 0.0, 0.0, 0.0)
        assert m.ref_absmax == 4.0 and m.effective_atol == 1.5 and m.mismatched == 0
        assert m.max_ulp == (0 if ref.dtype == torch.float32 else None)
        assert m.worst_index is None and m.reason == ""
    signed = compare_tensors(torch.tensor([0.0, math.nan, 2.0]), torch.tensor([-0.0, math.nan, 2.0]))
    assert signed.passed and signed.exact and signed.nan_ref == signed.nan_cand == 1 and signed.ref_absmax == 2.0
    inf = compare_tensors(torch.tensor([math.inf, -1.0]), torch.tensor([math.inf, -1.0]))
    assert inf.passed and inf.exact and inf.inf_ref == inf.inf_cand == 1 and inf.ref_absmax == 1.0


def test_different_float_dtypes_are_never_exact_and_signed_zero_float64_is():
    m = compare_tensors(R, R.double(), Tolerance(0.0, 0.0))
    assert m.passed and not m.exact and m.max_ulp is None
    z = compare_tensors(torch.tensor([0.0, 1.0]).double(), torch.tensor([-0.0, 1.0]).double())
    assert z.passed and z.max_abs == 0.0


def test_chunk_boundaries_do_not_change_the_numbers(monkeypatch):
    g = torch.Generator().manual_seed(3)
    ref = torch.randn(37, generator=g)
    cand = ref + torch.randn(37, generator=g) * 1e-3
    cand[20] = math.nan
    whole = compare_tensors(ref, cand, Tolerance(1e-3, 1e-3))
    monkeypatch.setattr(metrics_module, "CHUNK", 5)
    chunked = compare_tensors(ref, cand, Tolerance(1e-3, 1e-3))
    for key in ("passed", "mismatched", "max_ulp", "worst_index", "nan_cand", "max_abs"):
        assert getattr(chunked, key) == getattr(whole, key), key
    for key in ("mean_abs", "rmse", "cosine", "max_rel", "min_atol"):
        assert getattr(chunked, key) == pytest.approx(getattr(whole, key), rel=1e-12), key
    assert chunked.ref_absmax == float(ref.abs().max())


def test_exact_comparison_of_integers_and_bools():
    m = compare_tensors(torch.arange(6), torch.tensor([0, 1, 2, 3, 4, 9]), Tolerance(10.0, 1.0))
    assert not m.passed and m.exact_compare and not m.exact and m.mismatched == 1
    assert m.reason == "1 of 6 elements differ (exact comparison of int64/int64)"
    assert m.summary() == "1 of 6 elements differ"
    assert (m.max_abs, m.worst_index, m.ref_at_worst, m.cand_at_worst) == (4.0, [5], 5.0, 9.0)
    assert m.mean_abs == pytest.approx(4 / 6) and m.rmse == pytest.approx(math.sqrt(16 / 6))
    assert m.mismatched_fraction == pytest.approx(1 / 6)
    b = compare_tensors(torch.tensor([True, False, True]), torch.tensor([True, True, False]))
    assert b.mismatched == 2 and b.reason == "2 of 3 elements differ (exact comparison of bool/bool)"
    mixed = compare_tensors(torch.tensor([1, 2]), torch.tensor([1.0, 2.5]))
    assert mixed.exact_compare and mixed.mismatched == 1 and mixed.max_abs == 0.5
    assert mixed.reason == "1 of 2 elements differ (exact comparison of int64/float32)"
    same = compare_tensors(torch.tensor([1, 2]), torch.tensor([1, 2]))
    assert same.passed and same.exact and same.summary() == "bitwise equal" and same.max_abs == 0.0
    nan = compare_tensors(torch.tensor([1, 2]), torch.tensor([1.0, math.nan]))
    assert nan.mismatched == 1 and nan.max_abs == math.inf


def test_empty_tensors():
    m = compare_tensors(torch.zeros(0), torch.zeros(0), Tolerance(0.1, 0.1))
    assert m.passed and m.exact and m.min_atol == 0.0 and m.max_abs == 0.0 and m.rmse == 0.0
    e = compare_tensors(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
    assert e.passed and e.min_atol is None and e.exact_compare


def test_shape_notes_word_for_word():
    assert shape_difference([1, 3, 4, 5], [1, 4, 5, 3]) == (
        "dim 1: reference 3, candidate 4 (1.33x); dim 2: reference 4, candidate 5 (1.25x); dim 3: reference 5, "
        "candidate 3 (0.6x); candidate.permute(0, 3, 1, 2) has the reference shape (candidate is NHWC, reference "
        "NCHW)", [0, 3, 1, 2])
    assert shape_difference([1, 3, 4, 5], [1, 5, 3, 4]) == (
        "dim 1: reference 3, candidate 5 (1.67x); dim 2: reference 4, candidate 3 (0.75x); dim 3: reference 5, "
        "candidate 4 (0.8x); candidate.permute(0, 2, 3, 1) has the reference shape (candidate is NCHW, reference "
        "NHWC)", [0, 2, 3, 1])
    assert shape_difference([2, 6], [12]) == (
        "rank differs: reference [2, 6] (2 dims), candidate [12] (1 dims); same number of elements (a reshape or a "
        "missing view?)", None)
    assert shape_difference([2, 6], [13]) == ("rank differs: reference [2, 6] (2 dims), candidate [13] (1 dims)", None)
    assert shape_difference([2, 6], [2, 3]) == ("dim 1: reference 6, candidate 3 (0.5x)", None)
    assert shape_difference([0, 6], [2, 6]) == ("dim 0: reference 0, candidate 2", None)
    assert shape_difference([2, 3], [3, 2]) == (
        "dim 0: reference 2, candidate 3 (1.5x); dim 1: reference 3, candidate 2 (0.667x); candidate.permute(1, 0) "
        "has the reference shape", [1, 0])
    # the permutation closest to the identity wins when several fit
    assert shape_difference([2, 2, 3], [2, 3, 2])[1] == [0, 2, 1]
    assert shape_difference([1, 2, 3, 4, 5, 6, 7], [7, 6, 5, 4, 3, 2, 1])[1] is None  # over 6 dims: not searched


def test_shape_mismatch_reason_tries_the_permutation():
    ref = torch.arange(24.0).reshape(1, 2, 3, 4)
    m = compare_tensors(ref, ref.permute(0, 2, 3, 1).contiguous())
    assert not m.passed and m.permutation == [0, 3, 1, 2] and m.permuted_passed is True
    assert m.reason == f"shape mismatch: {m.shape_note}; after that permutation the values pass"
    assert m.summary() == m.shape_note
    wrong = ref.permute(0, 2, 3, 1).contiguous() + 1
    m = compare_tensors(ref, wrong)
    inner = compare_tensors(ref, wrong.permute(0, 3, 1, 2))
    assert m.permuted_passed is False
    assert m.reason == f"shape mismatch: {m.shape_note}; after that permutation the values still differ " \
                       f"({inner.summary()})"
    m = compare_tensors(torch.zeros(2, 3), torch.zeros(2, 4))
    assert m.reason == "shape mismatch: dim 1: reference 3, candidate 4 (1.33x)" and m.permuted_passed is None
    bare = TensorMetrics([2], [3], "float32", "float32", False)
    assert bare.summary() == "shape [3] != [2]"


def test_formatting_and_json():
    assert (_fmt(None), _fmt(0), _fmt(0.0), _fmt(1234.5678), _fmt(1e-7)) == ("-", "0", "0", "1.23e+03", "1e-07")
    assert _jsonable({"a": [math.nan, math.inf, -math.inf, 1.5, (2, 3)], "b": "x"}) == \
        {"a": ["nan", "inf", "-inf", 1.5, [2, 3]], "b": "x"}
    d = compare_tensors(torch.tensor([math.nan]), torch.tensor([1.0])).as_dict()
    assert d["max_abs"] == "inf" and d["min_atol"] == "inf" and d["cosine"] is None and d["passed"] is False


def test_ordered_int_and_ulp_distance():
    values = torch.tensor([-2.0, -1.0, -0.0, 0.0, 1.0, 2.0])
    ordered = _ordered_int(values)
    assert ordered.tolist() == [-1073741824, -1065353216, 0, 0, 1065353216, 1073741824]
    tiny = torch.tensor([-1.4e-45, 1.4e-45])  # the smallest subnormals: one step either side of zero
    assert _ordered_int(tiny).tolist() == [-1, 1]
    assert ulp_distance(tiny[:1], tiny[1:]).tolist() == [2]
    assert ulp_distance(torch.tensor([1.0]), torch.tensor([-1.0])).tolist() == [2 * 1065353216]
    with pytest.raises(TypeError, match="two float32 tensors"):
        ulp_distance(torch.tensor([1.0]).double(), torch.tensor([1.0]))
    with pytest.raises(TypeError):
        ulp_distance(torch.tensor([1.0]), torch.tensor([1.0]).half())


def test_unravel():
    assert _unravel(0, [2, 3]) == [0, 0] and _unravel(5, [2, 3]) == [1, 2] and _unravel(4, [2, 3]) == [1, 1]
    assert _unravel(7, [2, 2, 2]) == [1, 1, 1] and _unravel(3, [4]) == [3]


def test_no_tolerance_means_bitwise_and_inputs_are_not_modified():
    ref, cand = R.clone(), C.clone()
    m = compare_tensors(ref, cand)
    assert not m.passed and m.tolerance["source"] == "bitwise (no tolerance given)" and m.tolerance["max_ulp"] == 0
    assert torch.equal(ref, R) and torch.equal(cand, C)
    strided = torch.arange(8.0)[::2]
    assert compare_tensors(strided, strided.clone()).exact


def test_summary_names_candidate_nan_without_inf_and_formats_one():
    m = compare_tensors(torch.tensor([1.0, 2.0]), torch.tensor([1.0, math.nan]))
    assert m.summary().endswith(", cand NaN 1 Inf 0")
    assert _fmt(1) == "1" and _fmt(1.0) == "1"


def test_layout_words_only_for_the_two_layouts():
    note, perm = shape_difference([2, 3, 4, 5], [3, 2, 4, 5])
    assert perm == [1, 0, 2, 3] and note.endswith("candidate.permute(1, 0, 2, 3) has the reference shape")
    six = shape_difference([1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 6, 5])
    assert six[1] == [0, 1, 2, 3, 5, 4]
    assert shape_difference([2, 3, 1], [1, 2, 3])[1] == [1, 2, 0]


def test_exact_comparison_accumulates_across_chunks(monkeypatch):
    monkeypatch.setattr(metrics_module, "CHUNK", 2)
    ref = torch.tensor([0, 0, 0, 0, 0, 0])
    cand = torch.tensor([3, 0, 0, 0, 3, 1])
    m = compare_tensors(ref, cand)
    assert m.mismatched == 3 and m.max_abs == 3.0 and m.worst_index == [0]
    assert m.mean_abs == pytest.approx(7 / 6) and m.rmse == pytest.approx(math.sqrt(19 / 6))
    assert m.reason == "3 of 6 elements differ (exact comparison of int64/int64)"


def test_ulp_distance_message_is_exact():
    with pytest.raises(TypeError, match=r"^ulp_distance needs two float32 tensors$"):
        ulp_distance(torch.tensor([1.0]).double(), torch.tensor([1.0]))
