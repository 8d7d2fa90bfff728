"""The statistics of the benchmarks: medians with spread, ratios of interleaved runs, power-law and linear fits."""

from __future__ import annotations

import math
import statistics
from typing import Any

SPREAD_FLAG = 0.20


def summarize(values: list[float]) -> dict[str, Any]:
    """Median with spread. `flag` when (max - min) / median exceeds 20 %."""
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0, "spread": None, "flag": False, "values": []}
    median = statistics.median(values)
    lo, hi = min(values), max(values)
    spread = (hi - lo) / median if median else 0.0
    return {"median": median, "min": lo, "max": hi, "n": len(values), "spread": spread,
            "flag": len(values) > 1 and spread > SPREAD_FLAG, "values": values}


def ratio_summary(numerators: list[float], denominators: list[float], *, paired: bool = True) -> dict[str, Any]:
    """Runs measured in the same repeat (interleaved) give paired ratios: their median, min and max. Otherwise a
    ratio of medians, with a spread from the extreme pairings (min/max and max/min)."""
    if paired and numerators and len(numerators) == len(denominators) and all(denominators):
        out = summarize([a / b for a, b in zip(numerators, denominators)])
        out["paired"] = True
        return out
    num, den = summarize(numerators), summarize(denominators)
    if not num["n"] or not den["n"] or not den["median"]:
        return {"median": None, "min": None, "max": None, "n": 0, "spread": None, "flag": False}
    median = num["median"] / den["median"]
    lo, hi = num["min"] / den["max"], num["max"] / den["min"]
    spread = (hi - lo) / median if median else 0.0
    return {"median": median, "min": lo, "max": hi, "n": min(num["n"], den["n"]), "spread": spread,
            "flag": num["flag"] or den["flag"]}


def median_of(entry: dict | None) -> float | None:
    """The median of a `summarize` entry, None when there is none."""
    return entry.get("median") if entry else None


def fit_exponent(xs: list[float], ys: list[float]) -> dict[str, Any] | None:
    """Least-squares slope of log(y) against log(x): y ~ x**k. `per_doubling` = 2**k."""
    pairs = [(float(x), float(y)) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    if len(pairs) < 2:
        return None
    lx = [math.log(x) for x, _ in pairs]
    ly = [math.log(y) for _, y in pairs]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    sxx = sum((a - mx) ** 2 for a in lx)
    if sxx == 0:
        return None
    k = sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sxx
    residual = max(abs(b - (my + k * (a - mx))) for a, b in zip(lx, ly))
    return {"exponent": k, "per_doubling": 2 ** k, "points": len(pairs), "max_log_residual": residual}


def memory_fit(points: list[dict]) -> dict | None:
    """Compare peak RSS against the largest tensor pair over the growth points: peak = fixed + slope x pair
    (least squares). The slope is the memory a compare needs per byte of its largest pair."""
    xs, ys = [], []
    for p in points:
        mem = (p.get("compare") or {}).get("memory_pread") or {}
        if mem.get("largest_pair_bytes") and mem.get("peak_rss_mb"):
            xs.append(mem["largest_pair_bytes"] / 2 ** 20)
            ys.append(mem["peak_rss_mb"])
    if len(xs) < 2 or max(xs) == min(xs):
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    fixed = my - slope * mx
    residual = max(abs(y - (fixed + slope * x)) for x, y in zip(xs, ys))
    return {"slope_pairs": slope, "fixed_mb": fixed, "points": len(xs), "max_residual_mb": residual,
            "largest_pair_mb": xs, "peak_mb": ys}
