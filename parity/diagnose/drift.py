"""What a candidate's match against an older reference means: "matches ultralytics X.Y on this point", a port of
the older release, not a bug (docs/drift.md).

`explain(metrics_vs_current, metrics_vs_old)` turns a candidate's comparison against two references into
`version-drift` findings, one per cause (`parity.causes.releases.cause_of`), naming the release-history entries
that predict it.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from parity.causes.releases import CAUSE_TITLES, cause_of, history_of
from parity.findings import Finding

# The causes a candidate's tensor may be put under when it matches an older reference.
_RELEASE_CAUSES = {"box-bias-init", "small-box-floor", "loss-output-shape", "head-output-layout", "cls-bias-init"}


def _passed(metrics) -> bool | None:
    if metrics is None:
        return None
    return bool(metrics.get("passed") if isinstance(metrics, Mapping) else getattr(metrics, "passed", None))


def _max_abs(metrics) -> float | None:
    value = metrics.get("max_abs") if isinstance(metrics, Mapping) else getattr(metrics, "max_abs", None)
    if isinstance(value, str):
        return math.inf if value in ("inf", "nan") else float(value)
    return value


def explain(candidate_metrics_vs_current: Mapping[str, Any], candidate_metrics_vs_old: Mapping[str, Any], *,
            current_version: str | None = None, old_version: str | None = None,
            head: int | None = None, closer_factor: float = 100.0) -> list[Finding]:
    """Findings for tensors where the candidate departs from the current reference but matches an older one.

    Both arguments map dump names to the candidate's metrics (`TensorMetrics` or `as_dict()`) against the
    current and the old reference. A tensor counts when it fails against the current reference and passes
    against the old one (or, failing both, is `closer_factor` times closer to the old). One `version-drift`
    finding (severity "warning": a known release difference, not a bug) per cause, naming the release.
    """
    matched = _matched_old(candidate_metrics_vs_current, candidate_metrics_vs_old, closer_factor)
    by_cause = _by_cause(matched, head)
    return [_finding(cause, items, current_version, old_version) for cause, items in sorted(by_cause.items())]


def _matched_old(now_by_name: Mapping[str, Any], then_by_name: Mapping[str, Any], closer_factor: float) -> list[dict]:
    """The tensors that fail against the current reference and match (or come much closer to) the old one."""
    matched = []
    for name, now in now_by_name.items():
        then = then_by_name.get(name)
        if then is None or _passed(now) is not False:
            continue
        cur_abs, old_abs = _max_abs(now), _max_abs(then)
        matches = _passed(then)
        closer = (not matches and cur_abs is not None and old_abs is not None and
                  (old_abs == 0 or cur_abs / max(old_abs, 1e-300) >= closer_factor) and cur_abs > 0)
        if matches or closer:
            matched.append({"name": name, "matches_old": bool(matches), "max_abs_vs_current": cur_abs,
                            "max_abs_vs_old": old_abs})
    return matched


def _by_cause(matched: list[dict], head: int | None) -> dict[str, list[dict]]:
    # The loss replay feeds each reference's own head outputs to the loss, so a loss row that matches the older
    # release is the older loss, never the head's init. Where a case's candidate-in-box mask matches the older
    # release, its assignment (and everything the assignment feeds) is the small-box floor's doing.
    floor_cases = {item["name"].split(".")[1] for item in matched
                   if item["name"].split(".")[0] == "loss" and item["name"].split(".")[2:4] == ["assign", "mask_in_gts"]}
    by_cause: dict[str, list[dict]] = {}
    for item in matched:
        name = item["name"]
        parts = name.split(".")
        if parts[0] == "loss" or parts[:2] == ["grad", "head"]:
            case = parts[1] if parts[0] == "loss" else parts[2]
            cause = cause_of(name, None, {"loss-output-shape", "small-box-floor"})
            if cause == "numerics" and case in floor_cases:
                cause = "small-box-floor"
        else:
            cause = cause_of(name, head if head is not None else _guess_head(name), _RELEASE_CAUSES)
        if cause == "numerics":
            cause = "version-drift"
        by_cause.setdefault(cause, []).append(item)
    return by_cause


def _finding(cause: str, items: list[dict], current_version: str | None, old_version: str | None) -> Finding:
    old = old_version or "an older release"
    current = current_version or "the current release"
    names_ = [i["name"] for i in items]
    exact = all(i["matches_old"] for i in items)
    history = history_of(cause)
    what = CAUSE_TITLES.get(cause, "behaviour")
    message = (f"matches ultralytics {old} on this point ({what}): {len(items)} tensor(s) that differ from "
               f"ultralytics {current} {'agree' if exact else 'come much closer'} with {old}"
               + (f" [{'; '.join(history)}]" if history else "")
               + ". A port of the older release, not a bug in the port.")
    return Finding(
        signature="version-drift", where=f"{cause}: {names_[0]}" + (f" and {len(names_) - 1} more" if len(names_) > 1 else ""),
        message=message, severity="warning",
        evidence={"cause": cause, "old_version": old_version, "current_version": current_version,
                  "tensors": items[:20], "count": len(items), "release_history": history})


def _guess_head(name: str) -> int | None:
    parts = name.split(".")
    if parts[0] in ("model", "act") and len(parts) > 2 and parts[1].isdigit() and parts[2] in (
            "cv2", "cv3", "boxes", "scores", "dfl", "one2many", "one2one"):
        return int(parts[1])
    return None
