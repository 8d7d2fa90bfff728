"""One-line summaries of a report and of a row, shared by every renderer (HTML, JUnit, the assertion text)."""

from __future__ import annotations

from typing import Any

from parity.findings import Report, Row


def headline(report: Report) -> str:
    """One line: the verdict, how many checks failed, the first divergent layer and the first failed check."""
    failed, checks = len(report.failed_rows), len(report.rows)
    if report.verdict == "parity":
        return f"PARITY: all {checks} checks passed under profile {report.profile}"
    parts = [f"DIVERGENCE: {failed} of {checks} checks failed, {len(report.errors)} error finding(s)"]
    first = (report.context or {}).get("first_divergent_layer") or {}
    layers = ", ".join(f"{mode} layer {index}" for mode, index in first.items() if index is not None)
    if layers:
        parts.append(f"first divergent: {layers}")
    row = report.first_divergence()
    if row is not None:
        parts.append(f"first failed check: [{row.section}] {row.where} {row.name}")
    elif report.errors:
        parts.append(f"first error: {report.errors[0].signature} @ {report.errors[0].where}")
    return "; ".join(parts)


def row_detail(row: Row) -> str:
    """What a failed (or passed) row says: its note, or else its numbers."""
    if str(row.note).strip():
        return " ".join(str(row.note).split())
    m = row.metrics or {}
    if not m:
        return "passed" if row.passed else "failed"
    if m.get("ref_shape") != m.get("cand_shape"):
        return f"shape {m.get('cand_shape')} != reference {m.get('ref_shape')}"
    parts = [f"max|d| {_g(m.get('max_abs'))}"]
    if m.get("mismatched"):
        parts.append(f"{m.get('mismatched')} of {m.get('numel')} elements out of tolerance")
    if m.get("nan_cand") or m.get("inf_cand"):
        parts.append(f"candidate NaN {m.get('nan_cand')} Inf {m.get('inf_cand')} (reference NaN {m.get('nan_ref')})")
    if m.get("worst_index") is not None:
        parts.append(f"worst at {m.get('worst_index')}: {_g(m.get('ref_at_worst'))} -> {_g(m.get('cand_at_worst'))}")
    return ", ".join(parts)


def _g(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


__all__ = ["headline", "row_detail"]
