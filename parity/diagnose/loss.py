"""Why a candidate loss departs from the reference: findings with stable signatures and one-sentence evidence.

`compare_loss` runs the loss replay (`parity.replay.loss`), which collects `LossEvidence` (what each candidate
stage returned when fed the reference's inputs, what the whole candidate loss returned, gradients, exceptions,
broadcasting), and `diagnose_loss` turns it into `Finding`s, most specific first and in pipeline order:

    missing-sigmoid              the assigner got raw logits: sigmoid(candidate pd_scores) == reference pd_scores,
                                 or probabilities below 0 / NaN inside the assigner            (stage assign)
    double-sigmoid               candidate pd_scores == sigmoid(reference pd_scores)           (stage assign)
    all-anchors-positive         every anchor of an image with boxes is foreground             (stage assign)
    no-detach                    assignment outputs carry gradients, or equal loss values with different
                                 gradients                                                     (stage assign)
    unclamped-target-scores-sum  the normaliser is target_scores.sum() without clamp(min=1)   (stage normalize)
    shape-broadcast              tensors whose shapes only combined through broadcasting (an outer product
                                 of a vector with itself), or a broadcasting error             (the stage)
    gain-mismatch                a term off by exactly a ratio of gains, or by the batch size  (gains / output)
    nan-source                   the first stage and tensor where NaN/Inf appears              (that stage)
    candidate-exception          candidate code raised: type, message, its own file:line, the cases
                                 ("only in case no_boxes")                                     (the stage, or
                                                                                               the whole run)
    in-place-input               a stage changed its inputs in place (warning)                 (the stage)

The evidence types and `BroadcastWatch` (the torch-function mode the replay runs candidate code under to see
element-wise operations whose operands broadcast against each other) live in `parity.replay.loss.evidence`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Sequence

import torch

from parity.compare.tolerances import Profile
from parity.dump.files import Dump
from parity.findings import Finding, Report
from parity.replay.loss import REPLAY_STAGES, TERMS, LossReplay
from parity.replay.loss.evidence import BROADCAST_ERROR, BroadcastEvent, LossEvidence
# The watch and its shape test, reached here by tests/test_mutation_diagnose.py (as `dl.BroadcastWatch`).
from parity.replay.loss.evidence import BroadcastWatch, _self_outer  # noqa: F401

# Findings are sorted in the replay's stage order (the pipeline order).
STAGE_ORDER = REPLAY_STAGES


# ------------------------------------------------------------------------------------------- entry point
def compare_loss(reference: Dump | str | Path, candidate_loss: Any = "builtin", *,
                 profile: str | Profile | None = None, cases: Sequence[str] | None = None, progress: bool = True,
                 inject: str | None = None) -> Report:
    """Compare a candidate loss with the reference dump's loss: stage cross-replay, end to end, gradients.

    candidate_loss: "builtin", "package.module:factory", a LossAdapter, a callable loss, or a candidate dump
    (directory or Dump) holding the loss tensors a port recorded. Returns a Report: rows per case and stage
    (`parity.replay.loss`), then the findings `diagnose_loss` draws from what the replay saw.
    """
    replay = LossReplay.open(reference, candidate_loss, profile=profile, cases=cases, inject=inject)
    report = Report(command="compare --what loss", reference=str(replay.dump.path), candidate=replay.adapter.name,
                    profile=replay.profile.name)
    evidence = replay.run(report, progress)
    diagnose_loss(evidence, report)
    replay.record_coverage(report)
    return report


# -------------------------------------------------------------------------------------------- diagnosis
def diagnose_loss(evidence: LossEvidence, report: Report) -> list[Finding]:
    """Add every loss finding to `report`, most specific first within a stage, stages in pipeline order."""
    found: list[tuple[int, int, Finding]] = []
    for rank, check in enumerate(_CHECKS):
        for finding in check(evidence):
            found.append((_stage_rank(finding.where), rank, finding))
    found.sort(key=lambda item: (item[0], item[1]))
    out = []
    for _, _, finding in found:
        out.append(report.find(finding))
    return out


def _stage_rank(where: str) -> int:
    for index, stage in enumerate(STAGE_ORDER):
        if re.search(rf"\b{stage}\b", where):
            return index
    return len(STAGE_ORDER)


def _where(stage: str, branch: str | None = None) -> str:
    return f"loss stage {stage}" + (f" ({branch} branch)" if branch else "")


def _close(a: torch.Tensor, b: torch.Tensor, tol) -> bool:
    if a.shape != b.shape:
        return False
    atol, rtol = (tol.atol, tol.rtol) if tol is not None else (0.0, 0.0)
    a, b = a.detach().double(), b.detach().double()
    finite = torch.isfinite(a) & torch.isfinite(b)
    if not bool((torch.isfinite(a) == torch.isfinite(b)).all()):
        return False
    return bool(((a - b).abs()[finite] <= atol + rtol * b.abs()[finite]).all())


def _assign_views(evidence: LossEvidence):
    """Every place the candidate's assignment was seen: conditioned stage replays first, then whole runs."""
    for case in evidence.cases:
        for stage in case.stages:
            if stage.stage == "assign":
                yield case, stage
        for stage in case.run.values():
            if stage.outputs:
                yield case, stage


def _once(findings: list[Finding]) -> list[Finding]:
    seen, out = set(), []
    for f in findings:
        if (f.signature, f.where) not in seen:
            seen.add((f.signature, f.where))
            out.append(f)
    return out


# --- assigner inputs ---------------------------------------------------------------------------------
def check_sigmoid(evidence: LossEvidence) -> list[Finding]:
    out = []
    for case, stage in _assign_views(evidence):
        prefix = "assign." if stage.stage == "end-to-end" else ""
        cand = stage.outputs.get(prefix + "pd_scores")
        ref = stage.reference.get(prefix + "pd_scores")
        where = _where("assign", stage.branch)
        if cand is not None and ref is not None and cand.shape == ref.shape:
            cand, ref = cand.detach().float(), ref.detach().float()
            if not _close(cand, ref, evidence.tolerance):
                if _close(cand.sigmoid(), ref, evidence.tolerance):
                    out.append(Finding("missing-sigmoid", where, (
                        f"the assigner receives raw class logits: sigmoid(candidate pd_scores) equals the reference's "
                        f"pd_scores, and the candidate's range is [{float(cand.min()):.3g}, {float(cand.max()):.3g}], "
                        f"so score ** alpha (0.5) of a negative logit is NaN (case {case.case}); apply .sigmoid() to the "
                        f"detached scores before assigning"), evidence={"case": case.case, "min_pd_score": float(cand.min())}))
                elif _close(cand, ref.sigmoid(), evidence.tolerance):
                    out.append(Finding("double-sigmoid", where, (
                        f"candidate pd_scores equal sigmoid(reference pd_scores): the class probabilities go through "
                        f"a second sigmoid and all lie in [{float(cand.min()):.6g}, {float(cand.max()):.6g}] "
                        f"(case {case.case})"), evidence={"case": case.case}))
                elif float(cand.min()) < 0 or float(cand.max()) > 1:
                    out.append(Finding("missing-sigmoid", where, (
                        f"candidate pd_scores range over [{float(cand.min()):.3g}, {float(cand.max()):.3g}], outside "
                        f"[0, 1]: the assigner is not given probabilities (case {case.case})"),
                        evidence={"case": case.case}))
            continue
        # pd_scores not exposed: a NaN alignment metric over finite boxes can only come from a fractional power
        # of a negative score.
        metric = stage.outputs.get(prefix + "align_metric")
        ref_metric = stage.reference.get(prefix + "align_metric")
        if metric is not None and ref_metric is not None and metric.shape == ref_metric.shape:
            nan = int(torch.isnan(metric.detach()).sum())
            if nan and not bool(torch.isnan(ref_metric).any()):
                out.append(Finding("missing-sigmoid", where, (
                    f"{nan} alignment metrics are NaN where the reference has none (case {case.case}): "
                    f"score ** alpha of a negative score, i.e. the assigner got logits instead of probabilities"),
                    evidence={"case": case.case, "nan_align_metric": nan}))
    if not out:  # black box: the probe with non-negative logits
        for case in evidence.cases:
            if case.positive_logits_finite:
                out.append(Finding("missing-sigmoid", _where("assign") + " (inferred)", (
                    f"the candidate's loss is {case.cand_loss.tolist() if case.cand_loss is not None else 'NaN'} on the "
                    f"reference logits (all negative at initialisation) and finite once the same logits are made "
                    f"non-negative (case {case.case}): a fractional power of raw logits, as when the assigner gets "
                    f"logits instead of sigmoid probabilities"), evidence={"case": case.case, "probe": "abs(scores)"}))
                break
    return _once(out)


def check_all_positive(evidence: LossEvidence) -> list[Finding]:
    out = []
    for case, stage in _assign_views(evidence):
        prefix = "assign." if stage.stage == "end-to-end" else ""
        fg, ref_fg = stage.outputs.get(prefix + "fg_mask"), stage.reference.get(prefix + "fg_mask")
        if fg is None or ref_fg is None or fg.shape != ref_fg.shape or fg.dim() != 2:
            continue
        fg, ref_fg = fg.bool(), ref_fg.bool()
        anchors = fg.shape[1]
        for image in range(fg.shape[0]):
            count, ref_count = int(fg[image].sum()), int(ref_fg[image].sum())
            if count == anchors and ref_count < anchors:
                out.append(Finding("all-anchors-positive", _where("assign", stage.branch), (
                    f"every anchor is foreground: image {image} has {count} of {anchors} anchors positive where the "
                    f"reference has {ref_count} (case {case.case}); top-k and the in-box test select the positives"),
                    evidence={"case": case.case, "image": image, "positives": count, "reference": ref_count}))
                break
    return _once(out)


def check_detach(evidence: LossEvidence) -> list[Finding]:
    out = []
    for case in evidence.cases:
        for stage in case.stages + list(case.run.values()):
            if stage.carries_grad:
                out.append(Finding("no-detach", _where("assign", stage.branch), (
                    f"the assignment carries gradients ({', '.join(stage.carries_grad[:3])} have a grad_fn, case "
                    f"{case.case}): its inputs are not detached, so the targets move with the predictions"),
                    evidence={"case": case.case, "tensors": stage.carries_grad}))
                break
    if not out:
        for case in evidence.cases:
            if case.values_passed and case.grads_passed is False:
                out.append(Finding("no-detach", _where("assign") + " (inferred)", (
                    f"equal loss values but different gradients (case {case.case}: {', '.join(case.grad_failures[:3])})"
                    + ("; the gradients match when the reference assignment is fed in, so they flow through the "
                       "assignment: its inputs are not detached" if case.conditioned_grads_passed else
                       ": gradients flow where the reference has none, as when the assigner inputs are not detached")),
                    evidence={"case": case.case, "gradients": case.grad_failures}))
                break
    return _once(out)


# --- normaliser -----------------------------------------------------------------------------------------
def check_normaliser(evidence: LossEvidence) -> list[Finding]:
    out = []
    for case in evidence.cases:
        views = [(s, "") for s in case.stages if s.stage == "normalize"]
        views += [(s, "normalize.") for s in case.run.values() if s.outputs]
        for stage, prefix in views:
            cand = stage.outputs.get(prefix + "target_scores_sum")
            ref = stage.reference.get(prefix + "target_scores_sum")
            scores = stage.inputs.get("target_scores")
            if scores is None:
                scores = stage.reference.get("assign.target_scores") if prefix else None
            if cand is None or ref is None or scores is None:
                continue
            raw = scores.detach().sum()
            if float(raw) < 1 and float(ref) == 1.0 and _close(cand.detach().reshape(()), raw.reshape(()), evidence.tolerance):
                out.append(Finding("unclamped-target-scores-sum", _where("normalize", stage.branch), (
                    f"the normaliser is target_scores.sum() = {float(raw):.4g} where the reference clamps it to 1 "
                    f"(case {case.case})" + ("; with no boxes it is 0 and every term divides by zero"
                                             if float(raw) == 0 else "")),
                    evidence={"case": case.case, "candidate": float(cand), "reference": float(ref)}))
                break
    if not out:  # black box: a term that blows up only when there is nothing to normalise by
        for case in evidence.cases:
            if case.cand_loss is None or case.ref_loss is None:
                continue
            total = case.ref_loss.detach()
            if not bool(torch.isfinite(case.cand_loss.detach()).all()) and bool(torch.isfinite(total).all()) \
                    and case.case in ("no_boxes",):
                out.append(Finding("unclamped-target-scores-sum", _where("normalize") + " (inferred)", (
                    f"with no boxes the candidate's loss is {case.cand_loss.detach().tolist()} while the reference's "
                    f"is finite: a normaliser of 0, as target_scores.sum() without clamp(min=1) gives"),
                    evidence={"case": case.case}))
    return _once(out)


# --- shapes ---------------------------------------------------------------------------------------------
def check_broadcast(evidence: LossEvidence) -> list[Finding]:
    out = []
    for case in evidence.cases:
        for stage in case.stages:
            events = [e for e in stage.broadcasts if e.kind == "error" or stage.failed]
            if stage.error and BROADCAST_ERROR.search(stage.error) and not events:
                events = [BroadcastEvent("?", [], None, "error", stage.error)]
            if events:
                out.append(_broadcast_finding(events[0], _where(stage.stage, stage.branch), case.case))
            for name, tensor in stage.outputs.items():
                ref = stage.reference.get(name)
                if ref is not None and isinstance(tensor, torch.Tensor) and tensor.shape != ref.shape \
                        and _broadcasts_to(ref.shape, tensor.shape):
                    out.append(Finding("shape-broadcast", _where(stage.stage, stage.branch), (
                        f"{stage.stage}.{name} is {tuple(tensor.shape)} where the reference is {tuple(ref.shape)}: "
                        f"operands combined only through broadcasting (case {case.case})"),
                        evidence={"case": case.case, "tensor": name}))
        events = case.run_broadcasts
        if events and not any(f.signature == "shape-broadcast" for f in out):
            if case.run_error or case.values_passed is False:
                out.append(_broadcast_finding(events[0], "loss (whole candidate run)", case.case))
    return _once(out)


def _broadcast_finding(event: BroadcastEvent, where: str, case: str) -> Finding:
    if event.kind == "error":
        match = BROADCAST_ERROR.search(event.message)
        shapes = f"{tuple(event.shapes[0])} and {tuple(event.shapes[1])}" if len(event.shapes) == 2 else "two tensors"
        detail = (f"size {match.group(1)} met size {match.group(2)} at dimension {match.group(3)}" if match else
                  event.message)
        message = (f"{event.op} of {shapes} cannot broadcast ({detail}, case {case}): a per-anchor weight needs "
                   f"unsqueeze(-1) to scale every class of its anchor")
    else:
        message = (f"{event.describe()} (case {case}): a per-item vector multiplied with itself as an outer "
                   f"product, as when a (n,) weight meets a (n, 1) tensor; keep the dimension (keepdim=True)")
    return Finding("shape-broadcast", where, message,
                   evidence={"case": case, "op": event.op, "shapes": event.shapes, "result": event.result})


def _broadcasts_to(small, large) -> bool:
    try:
        return list(torch.broadcast_shapes(tuple(small), tuple(large))) == list(large) and list(small) != list(large)
    except RuntimeError:
        return False


# --- gains and batch size -------------------------------------------------------------------------------
def check_gains(evidence: LossEvidence) -> list[Finding]:
    out = []
    gains = evidence.gains
    for case in evidence.cases:
        for stage in case.stages:
            if stage.stage != "gains" or "after" not in stage.outputs or "after" not in stage.reference:
                continue
            finding = _ratio_finding(stage.outputs["after"], stage.reference["after"], gains, None, case.case,
                                     _where("gains", stage.branch))
            if finding:
                out.append(finding)
        for stage in case.stages:
            if stage.stage == "output" and "loss" in stage.outputs and "loss" in stage.reference:
                finding = _ratio_finding(stage.outputs["loss"], stage.reference["loss"], None, case.batch_size,
                                         case.case, _where("output", stage.branch))
                if finding:
                    out.append(finding)
        if not out and case.cand_loss is not None and case.ref_loss is not None:
            finding = _ratio_finding(case.cand_loss, case.ref_loss, gains, case.batch_size, case.case,
                                     "loss stage gains/output (end-to-end)")
            if finding:
                out.append(finding)
        if out:
            break
    return _once(out)


def _ratio_finding(cand: torch.Tensor, ref: torch.Tensor, gains, batch_size, case: str, where: str
                   ) -> Finding | None:
    """A gain problem: every differing term is off by an exact factor that a gain or the batch size explains."""
    cand, ref = cand.detach().double().reshape(-1), ref.detach().double().reshape(-1)
    if cand.shape != ref.shape or cand.numel() != 3:
        return None
    ratios = {}
    for t, term in enumerate(TERMS):
        r, c = float(ref[t]), float(cand[t])
        if r == 0 or not math.isfinite(r) or not math.isfinite(c) or abs(c - r) <= 1e-6 * abs(r):
            continue
        ratios[term] = c / r
    if not ratios:
        return None
    evidence = {"case": case, "candidate": cand.tolist(), "reference": ref.tolist(), "ratios": ratios}
    if batch_size and batch_size > 1 and len(ratios) == 3:  # every term by the same factor: the batch size
        if all(_near(v, 1 / batch_size) for v in ratios.values()):
            return Finding("gain-mismatch", where, (
                f"every term is 1/{batch_size} of the reference: the loss vector is not multiplied by the batch "
                f"size B = {batch_size} (ultralytics returns loss * B; declare batch_scaled=False if that is your "
                f"convention) (case {case})"), evidence=evidence)
        if all(_near(v, batch_size) for v in ratios.values()):
            return Finding("gain-mismatch", where, (
                f"every term is {batch_size}x the reference: multiplied by the batch size twice (case {case})"),
                evidence=evidence)
    explained = []
    for term, ratio in ratios.items():
        t = TERMS.index(term)
        found = None
        if gains is not None:
            for k, other in enumerate(TERMS):
                if k != t and _near(ratio, gains[k] / gains[t]):
                    found = (f"the {term} term is off by exactly {gains[k]:g}/{gains[t]:g}: it is multiplied by the "
                             f"{other} gain ({gains[k]:g}) instead of the {term} gain ({gains[t]:g})")
                    break
            if found is None and gains[t] not in (0, 1):
                if _near(ratio, 1 / gains[t]):
                    found = f"the {term} term is 1/{gains[t]:g} of the reference: its gain ({gains[t]:g}) is not applied"
                elif _near(ratio, gains[t]):
                    found = f"the {term} term is {gains[t]:g}x the reference: its gain ({gains[t]:g}) is applied twice"
        if found is None and batch_size and batch_size > 1:
            if _near(ratio, 1 / batch_size):
                found = f"the {term} term is 1/{batch_size} of the reference: not multiplied by the batch size"
            elif _near(ratio, batch_size):
                found = f"the {term} term is {batch_size}x the reference: multiplied by the batch size twice"
        if found is None:
            return None  # an unexplained ratio on any term: not a gain problem
        explained.append(found)
    return Finding("gain-mismatch", where, "; ".join(explained) + f" (case {case})", evidence=evidence)


def _near(value: float, target: float) -> bool:
    return abs(value - target) <= 1e-5 * abs(target)


# --- NaN / Inf ------------------------------------------------------------------------------------------
def check_nan_source(evidence: LossEvidence) -> list[Finding]:
    for case in evidence.cases:
        ordered = sorted(case.stages, key=lambda s: STAGE_ORDER.index(s.stage) if s.stage in STAGE_ORDER else 99)
        for stage in ordered:
            hit = _first_nonfinite(stage.outputs, stage.reference)
            if hit:
                return [_nan_finding(case.case, stage.stage, stage.branch, *hit)]
        for branch, stage in case.run.items():
            names = sorted(stage.outputs, key=lambda n: STAGE_ORDER.index(n.split(".")[0])
                           if n.split(".")[0] in STAGE_ORDER else 99)
            hit = _first_nonfinite({n: stage.outputs[n] for n in names}, stage.reference)
            if hit:
                name = hit[0]
                return [_nan_finding(case.case, name.split(".")[0], branch, name.split(".", 1)[1], *hit[1:])]
    for case in evidence.cases:
        if case.cand_loss is not None and not bool(torch.isfinite(case.cand_loss.detach()).all()) \
                and (case.ref_loss is None or bool(torch.isfinite(case.ref_loss).all())):
            return [Finding("nan-source", "loss output", (
                f"the candidate loss is {case.cand_loss.detach().tolist()} (case {case.case}) and exposes no "
                f"intermediate that locates the first NaN/Inf; expose stages (docs/loss-adapter.md) to find it"),
                evidence={"case": case.case})]
    return []


def _first_nonfinite(outputs: dict, reference: dict):
    for name, tensor in outputs.items():
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            continue
        bad = ~torch.isfinite(tensor.detach())
        count = int(bad.sum())
        if not count:
            continue
        ref = reference.get(name)
        if ref is not None and ref.shape == tensor.shape and bool((~torch.isfinite(ref) == bad).all()):
            continue  # the reference has the same non-finite values
        nan = int(torch.isnan(tensor.detach()).sum())
        return name, count, nan, tensor.numel()
    return None


def _nan_finding(case: str, stage: str, branch: str | None, name: str, count: int, nan: int, numel: int) -> Finding:
    kind = "NaN" if nan == count else ("Inf" if nan == 0 else "NaN/Inf")
    return Finding("nan-source", _where(stage, branch), (
        f"{kind} first appears at stage {stage} in {name} ({count} of {numel} elements, case {case}) where the "
        f"reference is finite"), evidence={"case": case, "stage": stage, "tensor": name, "count": count})


# --- exceptions ------------------------------------------------------------------------------------------
def check_exceptions(evidence: LossEvidence) -> list[Finding]:
    """Candidate code that raised (other than a broadcasting error, which `shape-broadcast` names): one finding
    per distinct exception (type and the candidate's own file:line), with the cases it appeared in."""
    seen: dict[tuple, dict] = {}
    for case in evidence.cases:
        raised = [(s.exception, s.stage, s.branch) for s in case.stages if s.exception]
        if case.run_exception:
            raised.append((case.run_exception, None, None))
        for exception, stage, branch in raised:
            if BROADCAST_ERROR.search(exception["message"]):
                continue
            key = (exception["type"], exception.get("at") or exception["message"])
            entry = seen.setdefault(key, {"exception": exception, "calls": [], "cases": [], "stage": stage,
                                          "branch": branch})
            if exception["call"] not in entry["calls"]:
                entry["calls"].append(exception["call"])
            if case.case not in entry["cases"]:
                entry["cases"].append(case.case)
    everyone = [c.case for c in evidence.cases]
    out = []
    for entry in seen.values():
        exception, cases = entry["exception"], entry["cases"]
        where = _where(entry["stage"], entry["branch"]) if entry["stage"] else "loss (whole candidate run)"
        calls = " and ".join(("the whole loss" if c == "loss call" else f"the {c}") for c in entry["calls"])
        scope = (f"only in case{'s' if len(cases) > 1 else ''} {', '.join(cases)}" if len(cases) < len(everyone)
                 else f"in every case ({', '.join(cases)})")
        # the file's name keeps the message readable at 80 columns; the evidence has the path
        at = f" at {exception['at'].rsplit('/', 1)[-1]}" if exception.get("at") else ""
        out.append(Finding("candidate-exception", where, (
            f"{exception['type']}: {exception['message']} raised by {calls}{at}, {scope}"),
            evidence={"cases": cases, "calls": entry["calls"], "type": exception["type"],
                      "message": exception["message"], "at": exception.get("at")}))
    return out


# --- in-place changes -----------------------------------------------------------------------------------
def check_mutation(evidence: LossEvidence) -> list[Finding]:
    """A stage that changes its inputs in place: harmless here (it gets copies), but in a training loop the
    caller's tensors change under it."""
    for case in evidence.cases:
        for stage in case.stages:
            if stage.mutated:
                return [Finding("in-place-input", _where(stage.stage, stage.branch), (
                    f"the candidate's {stage.stage} stage changes its input(s) {', '.join(stage.mutated)} in place "
                    f"(case {case.case}); the comparison gave it copies, but a caller that reuses them sees "
                    f"changed values"), severity="warning", evidence={"case": case.case, "inputs": stage.mutated})]
    return []


_CHECKS = (check_sigmoid, check_all_positive, check_detach, check_normaliser, check_broadcast, check_gains,
           check_nan_source, check_exceptions, check_mutation)
