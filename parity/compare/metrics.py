"""Numbers that say how far a candidate tensor is from the reference tensor, and whether that is within tolerance.

`compare_tensors` walks the flattened pair in chunks (so a 640x640 activation never needs more than a few
float64 chunk buffers), accumulating every statistic in float64. Nothing here looks at tensor names: the caller
picks the `Tolerance` (see `parity.compare.tolerances`).

Pass rule (element-wise, like `numpy.allclose` with the reference on the right-hand side):

    |cand - ref| <= atol + atol_absmax * max|ref| + rtol * |ref|     (and ulp(cand, ref) <= max_ulp when set)

for every element, NaN only where the other side has NaN, +-Inf only where the other side has the same Inf,
and identical shapes. bool and integer tensors are compared exactly. Cosine similarity is reported for people;
it never passes a tensor (it is blind to a scale or an offset error).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from parity.compare.tolerances import Tolerance
from parity.jsonio import plain

# Elements per chunk: cache-sized (a few float64 temporaries of 512 KiB each).
CHUNK = 1 << 16



@dataclass
class TensorMetrics:
    """Everything one comparison measured. `passed` is the verdict; `reason` says why not, in words."""

    ref_shape: list[int]
    cand_shape: list[int]
    ref_dtype: str
    cand_dtype: str
    passed: bool
    reason: str = ""
    numel: int = 0
    exact: bool = False  # every element identical (+0 == -0; NaN opposite NaN), shapes equal
    max_abs: float | None = None
    max_rel: float | None = None
    mean_abs: float | None = None
    rmse: float | None = None
    cosine: float | None = None
    max_ulp: int | None = None  # float32 pairs only
    mismatched: int = 0  # elements outside tolerance (or differing, for bool/int)
    mismatched_fraction: float = 0.0
    nan_ref: int = 0
    nan_cand: int = 0
    inf_ref: int = 0
    inf_cand: int = 0
    min_atol: float | None = None  # smallest atol that would have passed at the tolerance's rtol (atol_absmax 0)
    ref_absmax: float | None = None  # largest finite |ref|
    effective_atol: float | None = None  # atol + atol_absmax * ref_absmax: the absolute part actually applied
    worst_index: list[int] | None = None  # multi-index of the largest |cand - ref|
    ref_at_worst: float | None = None
    cand_at_worst: float | None = None
    shape_note: str = ""  # which dimension differs, and a permutation that would make the shapes match
    permutation: list[int] | None = None
    permuted_passed: bool | None = None  # when a permutation exists: would the values pass after applying it
    exact_compare: bool = False  # bool/int comparison (counts of differing elements, no tolerance)
    tolerance: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: non-finite floats become the strings "inf", "-inf", "nan" (JSON has no such numbers)."""
        out = {}
        for key, value in self.__dict__.items():
            out[key] = plain(value)
        return out

    def summary(self) -> str:
        """One short line for a table cell."""
        if self.ref_shape != self.cand_shape:
            return self.shape_note or f"shape {self.cand_shape} != {self.ref_shape}"
        if self.exact:
            return "bitwise equal"
        if self.exact_compare:
            return f"{self.mismatched} of {self.numel} elements differ"
        parts = [f"max|d| {_fmt(self.max_abs)}", f"max rel {_fmt(self.max_rel)}"]
        if self.max_ulp is not None:
            parts.append(f"ulp {self.max_ulp}")
        if self.mismatched:
            parts.append(f"{self.mismatched_fraction:.2%} out of tol")
        if self.nan_cand or self.inf_cand:
            parts.append(f"cand NaN {self.nan_cand} Inf {self.inf_cand}")
        return ", ".join(parts)


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    return f"{value:.3g}"


def _dtype_str(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _is_exact_dtype(dtype: torch.dtype) -> bool:
    return dtype == torch.bool or not (dtype.is_floating_point or dtype.is_complex)


def shape_difference(ref_shape: list[int], cand_shape: list[int]) -> tuple[str, list[int] | None]:
    """Words naming the differing dimension(s), and a permutation `p` with `cand.permute(p).shape == ref.shape`.

    The permutation closest to the identity is chosen (NHWC -> NCHW is `(0, 3, 1, 2)`).
    """
    ref_shape, cand_shape = list(ref_shape), list(cand_shape)
    perm = None
    if len(ref_shape) == len(cand_shape) and sorted(ref_shape) == sorted(cand_shape) and len(ref_shape) <= 6:
        best = None
        for p in itertools.permutations(range(len(cand_shape))):
            if [cand_shape[i] for i in p] == ref_shape:
                moved = sum(1 for a, b in enumerate(p) if a != b)
                if best is None or moved < best[0]:
                    best = (moved, list(p))
        perm = best[1] if best else None
    if len(ref_shape) != len(cand_shape):
        note = f"rank differs: reference {ref_shape} ({len(ref_shape)} dims), candidate {cand_shape} ({len(cand_shape)} dims)"
        if math.prod(ref_shape) == math.prod(cand_shape):
            note += "; same number of elements (a reshape or a missing view?)"
        return note, None
    diffs = []
    for dim, (r, c) in enumerate(zip(ref_shape, cand_shape)):
        if r != c:
            ratio = f" ({c / r:.3g}x)" if r else ""
            diffs.append(f"dim {dim}: reference {r}, candidate {c}{ratio}")
    note = "; ".join(diffs)
    if perm is not None:
        layout = ""
        if len(ref_shape) == 4 and perm == [0, 3, 1, 2]:
            layout = " (candidate is NHWC, reference NCHW)"
        elif len(ref_shape) == 4 and perm == [0, 2, 3, 1]:
            layout = " (candidate is NCHW, reference NHWC)"
        note += f"; candidate.permute{tuple(perm)} has the reference shape{layout}"
    return note, perm


def _ordered_int(values: torch.Tensor) -> torch.Tensor:
    """float32 bit patterns as int64 that are ordered like the floats, +0 and -0 both 0 (XOR of the magnitude
    bits for negatives, then +1 so that -0 lands on 0 too)."""
    bits = values.view(torch.int32)
    sign = bits >> 31  # -1 for negative floats, 0 otherwise
    return (bits ^ (sign & 0x7FFFFFFF)).to(torch.int64) - sign.to(torch.int64)


def compare_tensors(ref: torch.Tensor, cand: torch.Tensor, tol: Tolerance | None = None) -> TensorMetrics:
    """Compare `cand` against `ref` under `tol` (a bitwise tolerance when None). Never modifies either tensor.

    One pass over the flattened pair in cache-sized chunks (plus a cheap max|ref| pass when the tolerance scales
    with it); float64 accumulation; no boolean indexing; bitwise-equal float pairs take a fast path."""
    tol = tol or Tolerance(0.0, 0.0, max_ulp=0, source="bitwise (no tolerance given)")
    ref = ref.detach()
    cand = cand.detach()
    if ref.device.type != "cpu":
        ref = ref.cpu()
    if cand.device.type != "cpu":
        cand = cand.cpu()
    out = TensorMetrics(
        ref_shape=list(ref.shape), cand_shape=list(cand.shape),
        ref_dtype=_dtype_str(ref.dtype), cand_dtype=_dtype_str(cand.dtype),
        passed=False, numel=ref.numel(), tolerance=tol.as_dict(),
    )
    if list(ref.shape) != list(cand.shape):
        return _shape_mismatch(ref, cand, tol, out)
    exact_compare = _is_exact_dtype(ref.dtype) or _is_exact_dtype(cand.dtype)
    out.exact_compare = exact_compare
    if ref.numel() == 0:
        return _empty(out, exact_compare)
    rflat = ref.reshape(-1)
    cflat = cand.reshape(-1)
    if exact_compare:
        return _compare_exact(rflat, cflat, list(ref.shape), out)
    return _compare_floats(rflat, cflat, list(ref.shape), tol, out)


def _shape_mismatch(ref: torch.Tensor, cand: torch.Tensor, tol: Tolerance, out: TensorMetrics) -> TensorMetrics:
    """Name the differing dimensions and, when a permutation of the candidate fits, say whether it would pass."""
    out.shape_note, out.permutation = shape_difference(list(ref.shape), list(cand.shape))
    out.reason = f"shape mismatch: {out.shape_note}"
    if out.permutation is not None:
        inner = compare_tensors(ref, cand.permute(*out.permutation), tol)
        out.permuted_passed = inner.passed
        out.reason += (
            "; after that permutation the values pass" if inner.passed
            else f"; after that permutation the values still differ ({inner.summary()})"
        )
    return out


def _empty(out: TensorMetrics, exact_compare: bool) -> TensorMetrics:
    out.passed = out.exact = True
    out.max_abs = out.max_rel = out.mean_abs = out.rmse = 0.0
    out.min_atol = None if exact_compare else 0.0
    return out


def _compare_floats(rflat: torch.Tensor, cflat: torch.Tensor, shape: list[int], tol: Tolerance,
                    out: TensorMetrics) -> TensorMetrics:
    """Floating-point pairs: the equal fast paths first, else the chunked statistics."""
    same_dtype = rflat.dtype == cflat.dtype
    ulp_ok = rflat.dtype == torch.float32 and cflat.dtype == torch.float32
    # fast path: the same dtype and every element equal. torch.equal and one aminmax are each a single
    # vectorised pass, several times quicker than the chunked statistics (docs/benchmarks.md); a NaN makes
    # torch.equal false, so NaN pairs take the chunked route.
    if same_dtype and torch.equal(rflat, cflat):
        lo, hi = (float(v) for v in torch.aminmax(rflat))
        if math.isfinite(lo) and math.isfinite(hi):
            return _exactly_equal(out, tol, max(-lo, hi), nan=0, inf=0, ulp_ok=ulp_ok)
    absmax = _finite_absmax(rflat)
    out.ref_absmax = absmax
    atol = float(tol.atol) + float(tol.atol_absmax) * absmax
    out.effective_atol = atol
    # torch.equal said no above: float32 pairs can still be equal as numbers (-0 vs +0, NaN opposite NaN)
    if same_dtype and ulp_ok and _equal_as_float32_numbers(rflat, cflat):
        nan, inf = _nonfinite_counts(rflat)
        return _exactly_equal(out, tol, absmax, nan=nan, inf=inf, ulp_ok=ulp_ok)

    stats = _ChunkAccumulator(rtol=float(tol.rtol), atol=atol, ulp_ok=ulp_ok, ulp_limit=tol.max_ulp,
                              bit_equal=same_dtype)
    n = rflat.numel()
    for start in range(0, n, CHUNK):
        stats.add(start, rflat[start:start + CHUNK], cflat[start:start + CHUNK])
    stats.fill(out, n)
    if not out.passed:
        out.reason = _mismatch_reason(stats, n, tol, absmax)
    if not out.exact:
        out.worst_index = _unravel(stats.max_abs_at, shape)
        out.ref_at_worst = float(rflat[stats.max_abs_at])
        out.cand_at_worst = float(cflat[stats.max_abs_at])
    return out


def _nonfinite_counts(flat: torch.Tensor) -> tuple[int, int]:
    """(NaN count, Inf count), in chunks."""
    nan = inf = 0
    for start in range(0, flat.numel(), CHUNK):
        r = flat[start:start + CHUNK]
        nan += int(torch.isnan(r).sum())
        inf += int(torch.isinf(r).sum())
    return nan, inf


_ZERO_F64 = torch.zeros((), dtype=torch.float64)
_ZERO_I64 = torch.zeros((), dtype=torch.int64)


@dataclass
class _ChunkAccumulator:
    """Running float64 statistics of one float pair, fed chunk by chunk in order (the sums depend on it)."""

    rtol: float
    atol: float  # the absolute part actually applied (atol + atol_absmax * max|ref|)
    ulp_ok: bool  # both sides float32: ULP distances are measured
    ulp_limit: int | None  # the tolerance's max_ulp
    bit_equal: bool  # every chunk so far identical (starts False when the dtypes differ)
    max_abs: float = 0.0
    max_abs_at: int = 0
    max_rel: float = 0.0
    sum_abs: float = 0.0
    sum_sq: float = 0.0
    dot: float = 0.0
    ref_sq: float = 0.0
    cand_sq: float = 0.0
    mismatched: int = 0
    nonfinite_mismatch: int = 0
    min_atol: float = 0.0
    max_ulp: int = 0
    nan_ref: int = 0
    nan_cand: int = 0
    inf_ref: int = 0
    inf_cand: int = 0
    finite_count: int = 0

    def add(self, start: int, r: torch.Tensor, c: torch.Tensor) -> None:
        """Fold the chunk `r`/`c` (flat offset `start`) into the statistics."""
        if self.bit_equal:
            self.bit_equal = _all_equal(r, c, self.ulp_ok)
        # float64 working copies (never views of the caller's tensors: they are modified in place below)
        rd = r.to(torch.float64, copy=True)
        cd = c.to(torch.float64, copy=True)
        # a finite sum means every value is finite (an inf or NaN always reaches the sum); a sum that overflows
        # (float64 inputs near the range limit only) merely takes the exact path below
        all_finite = math.isfinite(float(rd.sum())) and math.isfinite(float(cd.sum()))
        if all_finite:
            both_fin = None
            self.finite_count += r.numel()
        else:
            both_fin = self._count_nonfinite(r, c, rd, cd)
            rd = torch.where(both_fin, rd, _ZERO_F64)
            cd = torch.where(both_fin, cd, _ZERO_F64)
        d = (cd - rd).abs_()
        local = float(d.max())
        if local > self.max_abs:
            self.max_abs = local
            self.max_abs_at = start + int(d.argmax())
        self.sum_abs += float(d.sum())
        self.sum_sq += float(torch.dot(d, d))
        self.dot += float(torch.dot(rd, cd))
        self.ref_sq += float(torch.dot(rd, rd))
        self.cand_sq += float(torch.dot(cd, cd))
        ra = rd.abs_()
        rel = torch.nan_to_num(d / ra, nan=0.0, posinf=math.inf)  # 0/0 -> 0; x/0 -> inf (not the largest float)
        self.max_rel = max(self.max_rel, float(rel.max()))
        excess = d.sub_(ra.mul_(self.rtol))
        self.min_atol = max(self.min_atol, float(excess.max()))
        over = excess > self.atol
        if self.ulp_ok:
            ulp = (_ordered_int(r) - _ordered_int(c)).abs_()
            if both_fin is not None:
                ulp = torch.where(both_fin, ulp, _ZERO_I64)
            self.max_ulp = max(self.max_ulp, int(ulp.max()))
            if self.ulp_limit is not None:
                over |= ulp > self.ulp_limit
        self.mismatched += int(over.sum())  # non-finite positions were zeroed on both sides: never "over"

    def _count_nonfinite(self, r: torch.Tensor, c: torch.Tensor, rd: torch.Tensor, cd: torch.Tensor) -> torch.Tensor:
        """Count NaN/Inf per side and the positions where only one side is non-finite (or the Infs differ);
        return the mask of positions finite on both sides."""
        r_fin, c_fin = torch.isfinite(r), torch.isfinite(c)
        r_nan, c_nan = torch.isnan(r), torch.isnan(c)
        r_inf, c_inf = torch.isinf(r), torch.isinf(c)
        self.nan_ref += int(r_nan.sum())
        self.nan_cand += int(c_nan.sum())
        self.inf_ref += int(r_inf.sum())
        self.inf_cand += int(c_inf.sum())
        both_fin = r_fin & c_fin
        agree = (r_nan & c_nan) | (r_inf & c_inf & (rd == cd))
        bad = ~both_fin & ~agree
        k_bad = int(bad.sum())
        self.nonfinite_mismatch += k_bad
        self.mismatched += k_bad
        self.finite_count += int(both_fin.sum())
        return both_fin

    def fill(self, out: TensorMetrics, n: int) -> None:
        """Write the finished statistics of `n` elements and the verdict into `out`."""
        out.exact = self.bit_equal
        out.mismatched = self.mismatched
        out.mismatched_fraction = self.mismatched / n
        out.max_abs = math.inf if self.nonfinite_mismatch else self.max_abs
        out.mean_abs = self.sum_abs / n
        out.rmse = math.sqrt(self.sum_sq / n)
        out.max_rel = self.max_rel
        out.nan_ref, out.nan_cand = self.nan_ref, self.nan_cand
        out.inf_ref, out.inf_cand = self.inf_ref, self.inf_cand
        out.cosine = self._cosine()
        out.max_ulp = self.max_ulp if self.ulp_ok else None
        out.min_atol = math.inf if self.nonfinite_mismatch else max(0.0, self.min_atol)
        out.passed = self.mismatched == 0

    def _cosine(self) -> float | None:
        norm = math.sqrt(self.ref_sq) * math.sqrt(self.cand_sq)
        if self.finite_count == 0:
            return None
        if norm > 0:
            return max(-1.0, min(1.0, self.dot / norm))
        return 1.0 if self.ref_sq == self.cand_sq == 0 else 0.0


def _mismatch_reason(stats: _ChunkAccumulator, n: int, tol: Tolerance, absmax: float) -> str:
    """Why a float pair failed, in words: the one-sided non-finite elements, then the ones out of tolerance."""
    reasons = []
    if stats.nonfinite_mismatch:
        reasons.append(
            f"{stats.nonfinite_mismatch} elements non-finite on one side only "
            f"(NaN ref/cand {stats.nan_ref}/{stats.nan_cand}, Inf ref/cand {stats.inf_ref}/{stats.inf_cand})"
        )
    numeric = stats.mismatched - stats.nonfinite_mismatch
    if numeric:
        reasons.append(
            f"{numeric} of {n} elements ({numeric / n:.3%}) outside atol {stats.atol:.3g}"
            + (f" (= {tol.atol:g} + {tol.atol_absmax:g}*max|ref| {absmax:.3g})" if tol.atol_absmax else "")
            + f" + rtol {tol.rtol:g}*|ref|"
            + (f" or over {tol.max_ulp} ulp" if tol.max_ulp is not None and stats.ulp_ok else "")
        )
    return "; ".join(reasons)


def _finite_absmax(flat: torch.Tensor) -> float:
    """Largest finite |x| (0 when there is none)."""
    absmax = 0.0
    for start in range(0, flat.numel(), CHUNK):
        a = flat[start:start + CHUNK].abs()
        m = float(a.max())
        if not math.isfinite(m):
            m = float(torch.nan_to_num(a, nan=0.0, posinf=0.0).max())
        absmax = max(absmax, m)
    return absmax


def _exactly_equal(out: TensorMetrics, tol: Tolerance, absmax: float, *, nan: int, inf: int,
                   ulp_ok: bool) -> TensorMetrics:
    """Fill `out` for a pair whose elements are all identical."""
    out.ref_absmax = absmax
    out.effective_atol = float(tol.atol) + float(tol.atol_absmax) * absmax
    out.exact = out.passed = True
    out.max_abs = out.max_rel = out.mean_abs = out.rmse = out.min_atol = 0.0
    out.max_ulp = 0 if ulp_ok else None
    out.nan_ref = out.nan_cand = nan
    out.inf_ref = out.inf_cand = inf
    out.cosine = 1.0 if absmax > 0 else (1.0 if nan + inf < out.numel else None)
    return out


def _all_equal(r: torch.Tensor, c: torch.Tensor, float32: bool) -> bool:
    """Every element equal: +0 and -0 count as equal (they are the same number), a NaN only opposite a NaN
    with the same bits (float32)."""
    if torch.equal(r, c):
        return True
    return float32 and _equal_as_float32_numbers(r, c)


def _equal_as_float32_numbers(r: torch.Tensor, c: torch.Tensor) -> bool:
    """Element-wise equal or bit-identical, in chunks: +0 equals -0, and a NaN equals the same NaN bits."""
    for start in range(0, r.numel(), CHUNK):
        a, b = r[start:start + CHUNK], c[start:start + CHUNK]
        if not bool(((a == b) | (a.view(torch.int32) == b.view(torch.int32))).all()):
            return False
    return True


def _compare_exact(rflat: torch.Tensor, cflat: torch.Tensor, shape: list[int], out: TensorMetrics) -> TensorMetrics:
    """bool / integer tensors (either side): counts of differing elements, no tolerance."""
    n = rflat.numel()
    mismatched = 0
    max_abs, max_abs_at, sum_abs, sum_sq = 0.0, 0, 0.0, 0.0
    for start in range(0, n, CHUNK):
        r = rflat[start:start + CHUNK]
        c = cflat[start:start + CHUNK]
        differ = (r != c) if r.dtype == c.dtype else (r.to(torch.float64) != c.to(torch.float64))
        k = int(differ.sum())
        if not k:
            continue
        mismatched += k
        d = (c.to(torch.float64) - r.to(torch.float64)).abs_()
        d = torch.nan_to_num(d, nan=math.inf)
        local = float(d.max())
        if local > max_abs:
            max_abs = local
            max_abs_at = start + int(d.argmax())
        sum_abs += float(d.sum())
        sum_sq += float(torch.dot(d, d))
    out.mismatched = mismatched
    out.mismatched_fraction = mismatched / n
    out.exact = mismatched == 0
    out.passed = mismatched == 0
    out.max_abs = max_abs
    out.mean_abs = sum_abs / n
    out.rmse = math.sqrt(sum_sq / n) if math.isfinite(sum_sq) else math.inf
    if mismatched:
        out.reason = f"{mismatched} of {n} elements differ (exact comparison of {out.ref_dtype}/{out.cand_dtype})"
        out.worst_index = _unravel(max_abs_at, shape)
        out.ref_at_worst = float(rflat[max_abs_at])
        out.cand_at_worst = float(cflat[max_abs_at])
    return out


def _unravel(flat: int, shape: list[int]) -> list[int]:
    idx = []
    for size in reversed(shape):
        idx.append(flat % size if size else 0)
        flat //= size if size else 1
    return list(reversed(idx))


def ulp_distance(ref: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """Element-wise distance in float32 units in the last place (int64). +0 and -0 are 0 apart."""
    if ref.dtype != torch.float32 or cand.dtype != torch.float32:
        raise TypeError("ulp_distance needs two float32 tensors")
    return (_ordered_int(ref.contiguous()) - _ordered_int(cand.contiguous())).abs()


# A report that wants the differences' histograms (the HTML drill-down) observes every comparison.
from parity.compare.histogram import observed as _observed  # noqa: E402 - wraps the function defined above

compare_tensors = _observed(compare_tensors)
