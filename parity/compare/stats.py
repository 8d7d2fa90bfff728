"""Statistics-only comparison: two dumps judged tensor by tensor from their manifests' statistics and checksums.

A statistics-only dump (`parity dump --stats-only`, docs/dump-format.md) keeps per tensor its shape, dtype,
SHA-256 and `stats` = {min, max, mean, std, l2, nan, inf} (over finite elements, float64), and no values.
`compare_stats` works on any two dumps (`Dump.stats` computes statistics for a dump that holds values), and
judges each tensor present in both:

1. shape (and dtype, reported; a different dtype makes bitwise identity impossible but is not a failure alone);
2. checksum identity: equal SHA-256 means bitwise equal, which proves everything;
3. NaN and Inf counts: must be equal;
4. statistics within what the profile's element-wise tolerance allows. The bounds are *necessary* conditions of
   the element-wise rule `|c - r| <= atol_eff + rtol * |r|` (atol_eff = atol + atol_absmax * max|r|), so a
   tensor that fails here would certainly fail an element-wise comparison:

   | statistic | allowed difference | because |
   | --- | --- | --- |
   | min, max | atol_eff + rtol * max abs r | every element moves by at most that |
   | mean | atol_eff + rtol * rms(r) | mean abs r <= rms r (power means) |
   | std | atol_eff + rtol * rms(r) | centring is a projection: its norm shrinks |
   | l2 | sqrt(n) * atol_eff + rtol * l2(r) | triangle inequality |

   Tensors whose tolerance is bitwise (weights, inputs, bias init) and bool/integer tensors are judged by the
   checksum alone.

What this mode cannot conclude is stated in every report it produces (`LIMITATIONS`).
"""

from __future__ import annotations

import math
from typing import Any

from parity.dump import names
from parity.compare.tolerances import Profile, Tolerance, get_profile, profile_for_environment
from parity.dump.files import Dump
from parity.dump.header import EXACT_DTYPES
from parity.errors import ParityError
from parity.findings import Finding, Report, Row

SECTION = "stats"
STATS = ("min", "max", "mean", "std", "l2")

# Said in every statistics-only report, in plain words.
LIMITATIONS = [
    "no element-wise error: max |candidate - reference|, relative error and the share of elements out of "
    "tolerance are not measured; only bounds that the statistics imply are checked",
    "no localisation inside a tensor: a difference is attributed to a whole tensor, never to an element, "
    "channel, pixel or anchor",
    "no ULP distance: float32 units in the last place need the values",
    "no replay: layer inputs are not stored, so no layer can be re-run on the reference's inputs (isolated "
    "mode), and a layer that diverges cannot be told apart from one that inherits an upstream difference",
    "statistics within tolerance are necessary, not sufficient: a tensor whose statistics agree can still differ "
    "element by element (e.g. permuted or locally wrong values); only a checksum match proves identity",
    "no masked comparison: the filler rows of target_labels, target_bboxes and target_gt_idx (background "
    "anchors) cannot be excluded, so these tensors are reported as inconclusive when their checksums differ",
]

# Rounding of the float64 statistics themselves: a relative slack far below any tolerance in use.
STAT_SLACK = 1e-9



def _sha(dump: Dump, name: str) -> str | None:
    """The tensor's SHA-256: recomputed from its values when the dump holds them (a stale manifest checksum is a
    corrupted dump, DumpError), from the manifest only in a statistics-only dump."""
    return dump.verified_checksum(name)


def checksum_source(reference: Dump, candidate: Dump) -> str:
    """Where the checksums a statistics-only report relies on come from, in words."""
    def one(dump: Dump, role: str) -> str:
        if dump.stats_only:
            return f"{role}: from its manifest (a statistics-only dump holds no values to hash)"
        if not dump.verify_reads:
            return f"{role}: from its manifest, NOT checked against the values (--no-verify)"
        return f"{role}: recomputed from the values and checked against its manifest"
    return "; ".join((one(reference, "reference"), one(candidate, "candidate")))


def stat_bounds(ref: dict, tol: Tolerance) -> dict[str, float]:
    """Largest difference of each statistic that the element-wise tolerance allows (see the module docstring)."""
    n = max(int(ref.get("n") or 0), 1)
    lo, hi = ref.get("min"), ref.get("max")
    absmax = max(abs(lo), abs(hi)) if lo is not None and hi is not None else 0.0
    l2 = ref.get("l2") or 0.0
    rms = l2 / math.sqrt(n)
    atol = float(tol.atol) + float(tol.atol_absmax) * absmax
    rtol = float(tol.rtol)
    return {
        "min": atol + rtol * absmax,
        "max": atol + rtol * absmax,
        "mean": atol + rtol * rms,
        "std": atol + rtol * rms,
        "l2": math.sqrt(n) * atol + rtol * l2,
    }


def _finite_count(entry: dict, stats: dict) -> int:
    numel = math.prod(entry.get("shape") or [])
    return numel - int(stats.get("nan") or 0) - int(stats.get("inf") or 0)


def judge(name: str, ref_entry: dict, cand_entry: dict, ref_stats: dict | None, cand_stats: dict | None,
          ref_sha: str | None, cand_sha: str | None, tol: Tolerance) -> tuple[bool, str, dict[str, Any]]:
    """One tensor: (passed, note, metrics). Pure: everything it needs is passed in, so it is easy to test."""
    metrics: dict[str, Any] = {"mode": "statistics", "ref_shape": ref_entry.get("shape"),
                               "cand_shape": cand_entry.get("shape"), "ref_dtype": ref_entry.get("dtype"),
                               "cand_dtype": cand_entry.get("dtype")}
    if list(ref_entry.get("shape") or []) != list(cand_entry.get("shape") or []):
        return False, f"shape {cand_entry.get('shape')} != reference {ref_entry.get('shape')}", metrics
    same_dtype = ref_entry.get("dtype") == cand_entry.get("dtype")
    checksum_equal = None if ref_sha is None or cand_sha is None else (same_dtype and ref_sha == cand_sha)
    metrics["checksum_equal"] = checksum_equal
    metrics["exact"] = bool(checksum_equal)
    if checksum_equal:
        return True, "bitwise equal (checksum)", metrics
    dtype_note = "" if same_dtype else f" (dtype {cand_entry.get('dtype')} vs reference {ref_entry.get('dtype')})"
    exact_kind = tol.bitwise or ref_entry.get("dtype") in EXACT_DTYPES or cand_entry.get("dtype") in EXACT_DTYPES
    if exact_kind and checksum_equal is False:
        passed, note = _checksum_verdict(name, tol, dtype_note, metrics)
        return passed, note, metrics
    if ref_stats is None or cand_stats is None:
        return False, "no statistics to compare", metrics
    metrics["stats_ref"] = dict(ref_stats)
    metrics["stats_cand"] = dict(cand_stats)
    count_mismatch = _nonfinite_count_mismatch(ref_stats, cand_stats, metrics)
    if count_mismatch:
        return False, count_mismatch, metrics
    if ref_stats.get("min") is None or cand_stats.get("min") is None:
        both_empty = ref_stats.get("min") is None and cand_stats.get("min") is None
        return both_empty, ("no finite elements on either side" if both_empty
                            else "no finite elements on one side only"), metrics
    ref_n = dict(ref_stats, n=_finite_count(ref_entry, ref_stats))
    _record_stat_deltas(ref_n, cand_stats, tol, exact_kind, metrics)
    passed, note = _statistics_verdict(metrics, checksum_equal)
    return passed, note + dtype_note, metrics


def _checksum_verdict(name: str, tol: Tolerance, dtype_note: str, metrics: dict[str, Any]) -> tuple[bool, str]:
    """A tensor judged by its checksum alone, whose checksums differ: it fails, unless its filler rows (which
    only the values could mask) make the verdict inconclusive."""
    if names.foreground_mask_for(name):
        metrics["inconclusive"] = True
        return True, ("inconclusive: checksums differ, but background rows are filler and cannot be masked "
                      "without the values" + dtype_note)
    why = "bitwise tolerance" if tol.bitwise else "compared exactly (bool/integer)"
    return False, f"checksum differs ({why}): the tensor is not identical{dtype_note}"


def _nonfinite_count_mismatch(ref_stats: dict, cand_stats: dict, metrics: dict[str, Any]) -> str:
    """Record the NaN and Inf counts; words for the first that differs ("" when both agree)."""
    for key in ("nan", "inf"):
        r, c = int(ref_stats.get(key) or 0), int(cand_stats.get(key) or 0)
        metrics[f"{key}_ref"], metrics[f"{key}_cand"] = r, c
        if r != c:
            return f"{key.upper()} count {c} != reference {r}"
    return ""


def _record_stat_deltas(ref_n: dict, cand_stats: dict, tol: Tolerance, exact_kind: bool,
                        metrics: dict[str, Any]) -> None:
    """Each statistic's difference against what the tolerance allows, and the worst of them, into `metrics`."""
    if exact_kind:  # no checksum on one side: statistics must then be identical
        bounds = {k: 0.0 for k in STATS}
    else:
        bounds = stat_bounds(ref_n, tol)
    deltas = {}
    worst, worst_ratio = None, 0.0
    for key in STATS:
        r, c = float(ref_n[key]), float(cand_stats[key])
        diff = abs(c - r)
        allowed = bounds[key] + STAT_SLACK * max(abs(r), abs(c)) if not exact_kind else 0.0
        ratio = diff / allowed if allowed > 0 else (0.0 if diff == 0 else math.inf)
        deltas[key] = {"reference": r, "candidate": c, "diff": diff, "allowed": allowed, "ratio": ratio}
        if ratio > worst_ratio:
            worst, worst_ratio = key, ratio
    metrics["stat_deltas"] = deltas
    metrics["worst_stat"] = worst
    metrics["worst_ratio"] = worst_ratio


def _statistics_verdict(metrics: dict[str, Any], checksum_equal: bool | None) -> tuple[bool, str]:
    """Pass when every statistic is within what the tolerance allows; the note names those that are not."""
    deltas = metrics["stat_deltas"]
    over = [k for k, d in deltas.items() if d["ratio"] > 1.0]
    if over:
        parts = [f"{k} {deltas[k]['candidate']:.6g} vs {deltas[k]['reference']:.6g} "
                 f"(|d| {deltas[k]['diff']:.3g} > allowed {deltas[k]['allowed']:.3g})" for k in over]
        return False, "statistics outside tolerance: " + "; ".join(parts)
    basis = "no checksum on one side; " if checksum_equal is None else "not bitwise equal; "
    return True, (basis + f"statistics within tolerance (worst {metrics['worst_stat']} at "
                  f"{metrics['worst_ratio']:.2g} of allowed)")


def compare_stats(reference: Dump | str, candidate: Dump | str, *, profile: str | Profile | None = None,
                  prefix: str = "") -> Report:
    """Compare two dumps (either may be statistics-only) by statistics and checksums. See the module docstring."""
    reference = reference if isinstance(reference, Dump) else Dump(reference)
    candidate = candidate if isinstance(candidate, Dump) else Dump(candidate)
    profile = get_profile(profile or profile_for_environment(reference.manifest.get("environment"),
                                                            reference.config.get("precision")))
    report = _stats_report(reference, candidate, profile)
    ref_names = reference.names(prefix)
    if not ref_names:
        raise ParityError(f"{reference.path}: no tensors" + (f" under {prefix!r}" if prefix else ""))
    cand_names = set(candidate.names(prefix))
    left_out, inconclusive = [], []
    first_failure: Row | None = None
    for name in ref_names:
        if name not in cand_names:
            left_out.append(name)
            continue
        tol = profile.for_name(name)
        passed, note, metrics = _judge_pair(reference, candidate, name, tol)
        row = report.add(Row(SECTION, names.place_of(name), name, passed, metrics=metrics, tolerance=tol.as_dict(),
                             note=note))
        if metrics.get("inconclusive"):
            inconclusive.append(name)
        if not passed and first_failure is None:
            first_failure = row
    compared = len(report.rows)
    report.coverage.update({
        "mode": "statistics-only",
        "compared": compared,
        "bitwise_equal": sum(1 for r in report.rows if (r.metrics or {}).get("exact")),
        "left_out": left_out,
        "extra_in_candidate": sorted(cand_names.difference(ref_names)),
        "inconclusive": inconclusive,
        "not_checked": list(LIMITATIONS),
    })
    _add_findings(report, first_failure, compared)
    return report


def _stats_report(reference: Dump, candidate: Dump, profile: Profile) -> Report:
    """An empty statistics-only report whose context states the mode, the bounds and the limitations."""
    report = Report(command="compare --stats-only", reference=str(reference.path), candidate=str(candidate.path),
                    profile=profile.name)
    report.context.update({
        "mode": "statistics-only",
        "reference_stats_only": reference.stats_only,
        "candidate_stats_only": candidate.stats_only,
        "profile": profile.as_dict(),
        "limitations": list(LIMITATIONS),
        "checksums": checksum_source(reference, candidate),
        "bounds": "statistic differences allowed by the element-wise tolerance: min/max atol_eff + rtol*max|r|; "
                  "mean/std atol_eff + rtol*rms(r); l2 sqrt(n)*atol_eff + rtol*l2(r) (necessary conditions)",
    })
    return report


def _judge_pair(reference: Dump, candidate: Dump, name: str, tol: Tolerance) -> tuple[bool, str, dict[str, Any]]:
    """`judge` one tensor both dumps hold, reading its statistics only when the checksums do not settle it."""
    ref_entry, cand_entry = reference.index[name], candidate.index[name]
    ref_sha, cand_sha = _sha(reference, name), _sha(candidate, name)
    ref_stats = cand_stats = None
    # equal checksums settle it (judge stops there): statistics are computed only when they are needed
    if ref_sha is None or ref_sha != cand_sha or ref_entry.get("dtype") != cand_entry.get("dtype"):
        try:
            ref_stats = reference.stats(name)
            cand_stats = candidate.stats(name)
        except (KeyError, ParityError):
            ref_stats = cand_stats = None
    return judge(name, ref_entry, cand_entry, ref_stats, cand_stats, ref_sha, cand_sha, tol)


def _add_findings(report: Report, first_failure: Row | None, compared: int) -> None:
    """The first tensor that rules parity out (if any), and what a statistics-only comparison cannot tell."""
    if first_failure is not None:
        failed = len(report.failed_rows)
        report.find(Finding(
            "stats-divergence", first_failure.where,
            f"first tensor whose statistics or checksum rule out parity: {first_failure.name}: {first_failure.note} "
            f"({failed} of {compared} tensors fail). Statistics-only dumps cannot say where inside the tensor or "
            f"whether the layer itself or its inputs are at fault: write both dumps with values to localise it",
            evidence={"tensor": first_failure.name, "failed": failed, "compared": compared}))
    report.find(Finding(
        "stats-only-limits", "statistics-only comparison",
        "statistics-only comparison: " + "; ".join(LIMITATIONS), severity="info"))
    report.find(Finding("checksum-source", "statistics-only comparison",
                        "checksums: " + report.context["checksums"], severity="info"))


__all__ = ["LIMITATIONS", "compare_stats", "judge", "stat_bounds"]
