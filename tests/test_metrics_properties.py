"""compare_tensors against numpy as the oracle, property by property (hypothesis, derandomized, modest counts).

The oracle is the pass rule of parity.compare.metrics written out in numpy, element by element:

    both finite:   |c - r| - rtol * |r| <= atol + atol_absmax * max finite |r|   (and ulp <= max_ulp, float32 pairs)
    otherwise:     NaN only opposite NaN, +Inf only opposite +Inf, -Inf only opposite -Inf
    bool / int:    exact equality

(the subtraction order is the implementation's, so a value exactly on the boundary is judged the same way.)
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import parity.compare.metrics as metrics_module
from parity.compare.metrics import compare_tensors, ulp_distance
from parity.compare.tolerances import Tolerance

SETTINGS = settings(derandomize=True, max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

FLOAT_DTYPES = {"float16": (np.float16, torch.float16, 16), "float32": (np.float32, torch.float32, 32),
                "float64": (np.float64, torch.float64, 64)}


# ------------------------------------------------------------------------------------------- oracle
def ordered(bits: np.ndarray) -> np.ndarray:
    bits = bits.astype(np.int64)
    return np.where(bits < 0, -(bits & 0x7FFFFFFF), bits)


def oracle(ref: np.ndarray, cand: np.ndarray, tol: Tolerance) -> dict:
    """What compare_tensors must say, computed independently in numpy (float64)."""
    if ref.dtype.kind in "biu" or cand.dtype.kind in "biu":
        differ = ref.astype(np.float64) != cand.astype(np.float64)
        return {"passed": not differ.any(), "mismatched": int(differ.sum())}
    r, c = ref.astype(np.float64).ravel(), cand.astype(np.float64).ravel()
    finite_r = np.isfinite(r)
    absmax = float(np.abs(r[finite_r]).max()) if finite_r.any() else 0.0
    eff = tol.atol + tol.atol_absmax * absmax
    both = finite_r & np.isfinite(c)
    agree = (np.isnan(r) & np.isnan(c)) | (np.isinf(r) & np.isinf(c) & (r == c))
    bad_nonfinite = ~both & ~agree
    rz, cz = np.where(both, r, 0.0), np.where(both, c, 0.0)
    d = np.abs(cz - rz)
    over = both & ((d - np.abs(rz) * tol.rtol) > eff)
    result = {"nan_ref": int(np.isnan(r).sum()), "nan_cand": int(np.isnan(c).sum()),
              "inf_ref": int(np.isinf(r).sum()), "inf_cand": int(np.isinf(c).sum())}
    if ref.dtype == np.float32 and cand.dtype == np.float32:
        ulp = np.abs(ordered(ref.ravel().view(np.int32)) - ordered(cand.ravel().view(np.int32)))
        ulp = np.where(both, ulp, 0)
        result["max_ulp"] = int(ulp.max()) if ulp.size else 0
        if tol.max_ulp is not None:
            over |= both & (ulp > tol.max_ulp)
    else:
        result["max_ulp"] = None
    mismatched = int(bad_nonfinite.sum() + over.sum())
    result.update({"passed": mismatched == 0, "mismatched": mismatched,
                   "max_abs": math.inf if bad_nonfinite.any() else (float(d.max()) if d.size else 0.0),
                   "ref_absmax": absmax})
    return result


def check_against_oracle(ref: np.ndarray, cand: np.ndarray, tol: Tolerance) -> None:
    got = compare_tensors(torch.from_numpy(ref.copy()), torch.from_numpy(cand.copy()), tol)
    want = oracle(ref, cand, tol)
    assert got.passed == want["passed"], (got, want)
    assert got.mismatched == want["mismatched"]
    for key in ("nan_ref", "nan_cand", "inf_ref", "inf_cand", "max_ulp"):
        if key in want and not (got.exact and key == "max_ulp" and want[key] == 0):
            assert getattr(got, key) == want[key], key
    if "max_abs" in want:
        assert got.max_abs == want["max_abs"]


@contextmanager
def small_chunks(size: int):
    """Run compare_tensors with tiny chunks, so accumulation across chunks is exercised on small arrays."""
    before = metrics_module.CHUNK
    metrics_module.CHUNK = size
    try:
        yield
    finally:
        metrics_module.CHUNK = before


# ---------------------------------------------------------------------------------------- strategies
def float_arrays(dtype, *, special: bool = True, min_size: int = 0, max_size: int = 40):
    width = {np.float16: 16, np.float32: 32, np.float64: 64}[dtype]
    elements = st.floats(width=width, allow_nan=special, allow_infinity=special, allow_subnormal=True)
    return hnp.arrays(dtype, st.integers(min_size, max_size), elements=elements)


tolerances = st.builds(
    Tolerance,
    atol=st.sampled_from([0.0, 1e-6, 1e-3, 0.5]),
    rtol=st.sampled_from([0.0, 1e-5, 1e-2]),
    max_ulp=st.sampled_from([None, 0, 1, 4]),
    atol_absmax=st.sampled_from([0.0, 1e-6]),
)


@st.composite
def pairs(draw, dtype=np.float32, cand_dtype=None):
    """(ref, cand): cand is ref with some elements nudged, replaced, or given a non-finite value."""
    ref = draw(float_arrays(dtype))
    cand = ref.astype(cand_dtype or dtype).copy()
    if ref.size:
        k = draw(st.integers(0, ref.size))
        idx = draw(st.lists(st.integers(0, ref.size - 1), min_size=k, max_size=k))
        kinds = draw(st.lists(st.sampled_from(["nudge", "nan", "inf", "-inf", "zero", "neg", "big"]),
                              min_size=k, max_size=k))
        for i, kind in zip(idx, kinds):
            value = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "zero": -0.0 if cand[i] == 0 else 0.0,
                     "neg": -cand[i], "big": 1e4}.get(kind)
            if kind == "nudge":
                cand[i] = np.nextafter(cand[i], np.inf, dtype=cand.dtype) if np.isfinite(cand[i]) else cand[i]
            else:
                cand[i] = value
    return ref, cand


# ---------------------------------------------------------------------------- NaN and Inf by position
@pytest.mark.slow
@SETTINGS
@given(ref=float_arrays(np.float32, special=False, min_size=1), data=st.data())
def test_nan_only_matches_nan_at_the_same_position(ref, data):
    where = data.draw(st.lists(st.integers(0, ref.size - 1), min_size=1, unique=True))
    ref = ref.copy()
    ref[where] = np.nan
    cand = ref.copy()
    same = compare_tensors(torch.from_numpy(ref), torch.from_numpy(cand), Tolerance(0.0, 0.0))
    assert same.passed and same.nan_ref == same.nan_cand == len(where)
    cand[where[0]] = data.draw(st.floats(width=32, allow_nan=False))  # any number, even inf, opposite a NaN
    moved = compare_tensors(torch.from_numpy(ref), torch.from_numpy(cand), Tolerance(1e30, 1.0))
    assert not moved.passed and moved.mismatched >= 1 and "non-finite on one side only" in moved.reason


@pytest.mark.slow
@SETTINGS
@given(ref=float_arrays(np.float32, special=False, min_size=1), data=st.data())
def test_a_nan_in_the_candidate_never_passes_opposite_a_number(ref, data):
    cand = ref.copy()
    at = data.draw(st.integers(0, ref.size - 1))
    cand[at] = np.nan
    result = compare_tensors(torch.from_numpy(ref), torch.from_numpy(cand), Tolerance(1e30, 1.0))
    assert not result.passed and result.nan_cand == 1 and result.nan_ref == 0 and result.max_abs == math.inf


@pytest.mark.slow
@SETTINGS
@given(ref=float_arrays(np.float32, special=False, min_size=1), data=st.data(),
       sign=st.sampled_from([1.0, -1.0]))
def test_inf_only_matches_the_same_inf(ref, data, sign):
    at = data.draw(st.integers(0, ref.size - 1))
    ref = ref.copy()
    ref[at] = sign * np.inf
    assert compare_tensors(torch.from_numpy(ref), torch.from_numpy(ref.copy()), Tolerance(0.0, 0.0)).passed
    for other in (-sign * np.inf, np.nan, np.float32(3.4e38) * sign):
        cand = ref.copy()
        cand[at] = other
        result = compare_tensors(torch.from_numpy(ref), torch.from_numpy(cand), Tolerance(1e30, 1.0))
        assert not result.passed and result.mismatched == 1, other


# ------------------------------------------------------------------------------------ numpy as oracle
@pytest.mark.slow
@SETTINGS
@given(pair=pairs(np.float32), tol=tolerances)
def test_float32_pairs_agree_with_the_oracle(pair, tol):
    check_against_oracle(*pair, tol)


@pytest.mark.slow
@SETTINGS
@given(pair=pairs(np.float32), tol=tolerances, chunk=st.integers(1, 8))
def test_the_chunked_pass_agrees_with_the_oracle(pair, tol, chunk):
    with small_chunks(chunk):
        check_against_oracle(*pair, tol)


@pytest.mark.slow
@SETTINGS
@given(pair=pairs(np.float64), tol=tolerances)
def test_float64_pairs_agree_with_the_oracle(pair, tol):
    check_against_oracle(*pair, tol)


@pytest.mark.slow
@SETTINGS
@given(pair=pairs(np.float16), tol=tolerances)
def test_float16_pairs_agree_with_the_oracle(pair, tol):
    check_against_oracle(*pair, tol)


@pytest.mark.slow
@SETTINGS
@given(pair=pairs(np.float32, cand_dtype=np.float64), tol=tolerances)
def test_float32_against_float64_agrees_with_the_oracle_and_is_never_exact(pair, tol):
    ref, cand = pair
    check_against_oracle(ref, cand, tol)
    result = compare_tensors(torch.from_numpy(ref), torch.from_numpy(cand), tol)
    assert result.max_ulp is None  # ULPs are float32-only
    if ref.size:
        assert not result.exact  # different dtypes are never bitwise equal


@pytest.mark.slow
@SETTINGS
@given(ref=hnp.arrays(st.sampled_from([np.int64, np.int32, np.uint8, np.bool_]), st.integers(0, 30)),
       data=st.data(), tol=tolerances)
def test_bool_and_integer_tensors_compare_exactly_whatever_the_tolerance(ref, data, tol):
    cand = ref.copy()
    if ref.size and data.draw(st.booleans()):
        at = data.draw(st.integers(0, ref.size - 1))
        cand[at] = (not cand[at]) if ref.dtype == np.bool_ else cand[at] ^ 1
    result = compare_tensors(torch.from_numpy(ref), torch.from_numpy(cand), tol)
    want = oracle(ref, cand, tol)
    assert result.exact_compare and result.passed == want["passed"] and result.mismatched == want["mismatched"]


# ------------------------------------------------------------------------------------- edges, each one
@pytest.mark.slow
@SETTINGS
@given(ref=hnp.arrays(np.float32, st.integers(1, 20), elements=st.integers(-64, 64).map(lambda v: v / 8)),
       atol_steps=st.integers(0, 8), data=st.data())
def test_the_atol_boundary_is_inclusive(ref, atol_steps, data):
    """Values on a dyadic grid make |c - r| exactly atol: that passes, one float32 step more fails."""
    atol = atol_steps / 8
    cand = ref + np.float32(atol)
    tol = Tolerance(atol, 0.0)
    at_edge = compare_tensors(torch.from_numpy(ref), torch.from_numpy(cand), tol)
    assert at_edge.passed and at_edge.max_abs == atol
    at = data.draw(st.integers(0, ref.size - 1))
    cand[at] = np.nextafter(cand[at], np.float32(np.inf), dtype=np.float32)
    beyond = compare_tensors(torch.from_numpy(ref), torch.from_numpy(cand), tol)
    assert not beyond.passed and beyond.mismatched == 1
    assert beyond.worst_index == [at] and f"outside atol {atol:.3g}" in beyond.reason


@pytest.mark.slow
@SETTINGS
@given(ref=hnp.arrays(np.float32, st.integers(1, 20), elements=st.sampled_from([1.0, 2.0, 4.0, -8.0, 0.5])),
       data=st.data())
def test_the_rtol_boundary_is_inclusive(ref, data):
    rtol = 0.25  # |r| * rtol is exact for these values
    cand = ref + np.abs(ref) * np.float32(rtol)
    assert compare_tensors(torch.from_numpy(ref), torch.from_numpy(cand), Tolerance(0.0, rtol)).passed
    at = data.draw(st.integers(0, ref.size - 1))
    cand[at] = np.nextafter(cand[at], np.float32(np.inf), dtype=np.float32)
    assert not compare_tensors(torch.from_numpy(ref), torch.from_numpy(cand), Tolerance(0.0, rtol)).passed


@pytest.mark.slow
@SETTINGS
@given(ref=float_arrays(np.float32, special=False, min_size=1), steps=st.integers(0, 5), data=st.data())
def test_the_ulp_boundary_is_inclusive(ref, steps, data):
    assume(np.all(np.abs(ref) < 1e38))
    at = data.draw(st.integers(0, ref.size - 1))
    cand = ref.copy()
    for _ in range(steps):
        cand[at] = np.nextafter(cand[at], np.float32(np.inf), dtype=np.float32)
    distance = int(ulp_distance(torch.from_numpy(ref), torch.from_numpy(cand)).max())
    assert distance == steps
    lenient = Tolerance(1e30, 1.0, max_ulp=steps)
    assert compare_tensors(torch.from_numpy(ref), torch.from_numpy(cand), lenient).passed
    if steps:
        strict = Tolerance(1e30, 1.0, max_ulp=steps - 1)
        result = compare_tensors(torch.from_numpy(ref), torch.from_numpy(cand), strict)
        assert not result.passed and result.max_ulp == steps and f"over {steps - 1} ulp" in result.reason


@pytest.mark.slow
@SETTINGS
@given(ref=float_arrays(np.float32, special=False), dtype=st.sampled_from(list(FLOAT_DTYPES)))
def test_signed_zeros_are_the_same_number(ref, dtype):
    np_dtype = FLOAT_DTYPES[dtype][0]
    with np.errstate(over="ignore"):  # float32 values beyond float16's range become inf: still a valid input
        ref = ref.astype(np_dtype)
    ref[ref == 0] = 0.0
    cand = ref.copy()
    cand[cand == 0] = -0.0
    result = compare_tensors(torch.from_numpy(ref), torch.from_numpy(cand), Tolerance(0.0, 0.0, max_ulp=0))
    assert result.passed and result.mismatched == 0 and result.max_abs == 0
    if dtype == "float32":
        assert result.max_ulp == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64, torch.int64, torch.bool])
@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 4, 5)])
def test_empty_tensors_pass_and_are_exact(dtype, shape):
    result = compare_tensors(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype), Tolerance(0.0, 0.0))
    assert result.passed and result.exact and result.numel == 0 and result.mismatched == 0
    assert result.max_abs == 0.0 and result.mismatched_fraction == 0.0


def test_empty_against_a_different_empty_shape_fails_on_the_shape():
    result = compare_tensors(torch.zeros(0, 3), torch.zeros(3, 0), Tolerance(0.0, 0.0))
    assert not result.passed and result.reason.startswith("shape mismatch: ")
