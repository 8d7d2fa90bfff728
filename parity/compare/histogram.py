"""Histograms of the differences of compared tensors, for the HTML report's per-tensor drill-down.

Off by default: a comparison that wants them runs inside `collecting()`, and every `compare_tensors` call made
meanwhile stores one on its `TensorMetrics` (`histogram`), which therefore reaches the report row's `metrics`.
Bins are quarter decades of |candidate - reference| from 1e-12 to 1e4 (leading and trailing empty bins dropped);
exact zeros and non-finite differences are counted apart.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator

import torch

LOW, HIGH, PER_DECADE = -12, 4, 4
_CHUNK = 1 << 20
_collecting: ContextVar[bool] = ContextVar("parity_collect_histograms", default=False)


@contextmanager
def collecting() -> Iterator[None]:
    token = _collecting.set(True)
    try:
        yield
    finally:
        _collecting.reset(token)


def observed(compare: Callable) -> Callable:
    """Wrap `compare_tensors` so that, while collecting, its result carries the histogram of the differences."""

    @functools.wraps(compare)
    def compare_and_observe(ref: torch.Tensor, cand: torch.Tensor, tol=None):
        metrics = compare(ref, cand, tol)
        if _collecting.get() and list(ref.shape) == list(cand.shape):
            histogram = difference_histogram(ref, cand)
            if histogram is not None:
                metrics.histogram = histogram
        return metrics

    return compare_and_observe


def difference_histogram(ref: torch.Tensor, cand: torch.Tensor) -> dict | None:
    """Counts of log10 |cand - ref| per quarter decade; None for non-float tensors."""
    if not (ref.is_floating_point() and cand.is_floating_point()) or ref.numel() == 0:
        return None
    bins = (HIGH - LOW) * PER_DECADE
    counts = torch.zeros(bins, dtype=torch.float64)
    zero = nonfinite = 0
    r, c = ref.detach().reshape(-1).cpu(), cand.detach().reshape(-1).cpu()
    for start in range(0, r.numel(), _CHUNK):
        d = (c[start:start + _CHUNK].double() - r[start:start + _CHUNK].double()).abs()
        finite = torch.isfinite(d)
        nonfinite += int((~finite).sum())
        d = d[finite]
        zero += int((d == 0).sum())
        d = d[d > 0]
        if d.numel():
            logs = d.log10().clamp(LOW, HIGH - 1e-9)
            counts += torch.histc(logs, bins=bins, min=LOW, max=HIGH)
    edges = [LOW + i / PER_DECADE for i in range(bins + 1)]
    used = [i for i, n in enumerate(counts.tolist()) if n]
    first, last = (used[0], used[-1] + 1) if used else (0, 0)
    return {"log10_edges": edges[first:last + 1] if used else [], "counts": [int(n) for n in counts.tolist()[first:last]],
            "zero": zero, "nonfinite": nonfinite, "numel": ref.numel()}
