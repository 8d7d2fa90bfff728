"""Replaying one loss case against the reference (`CaseReplay`), in three passes: each stage the candidate
exposes fed the reference's inputs, the whole candidate loss on the reference's head outputs, and the
gradients of each term w.r.t. the head outputs."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Mapping, Sequence

import torch

from parity.compare.metrics import compare_tensors
from parity.compare.tolerances import BITWISE, Profile, Tolerance
from parity.dump import names
from parity.dump.files import Dump
from parity.errors import ParityError
from parity.findings import Report, Row
from parity.reimpl.loss import build_loss
from parity.replay.factories import own_frame
from parity.replay.loss.adapter import LossAdapter, coarse_first_order
from parity.replay.loss.assignment import AssignmentDiff, compare_assignment
from parity.replay.loss.evidence import BroadcastWatch, CaseEvidence, StageEvidence
from parity.replay.loss.returns import CandidateResult, describe
from parity.replay.loss.spec import (ASSIGNER_INPUT_NAMES, CATEGORY, REFERENCE_STAGE, REPLAY_STAGES, STAGE_OUTPUTS,
                                     TERMS, CaseView, LossSpec)

DISCRETE = ("mask_in_gts", "mask_pos", "fg_mask", "target_gt_idx", "target_labels")
AFTER_ASSIGNMENT = ("normalize", "classify", "box", "gains", "output")
# The assignment's outputs that the loss uses: when they are equal, its intermediates changed nothing.
DECISIVE = ("fg_mask", "target_gt_idx", "target_scores", "target_bboxes")
# Defined by ultralytics only for anchor-box pairs with the anchor inside the box (zero elsewhere).
PAIR_DEFINED = ("align_metric", "overlaps")
# Intermediates that may differ by float noise when the decisive outputs are equal.
NOISE_TOLERANT = ("align_metric", "overlaps", "pd_bboxes")


def _copy_input(value: Any) -> Any:
    """A copy for the candidate: a stage that changes its inputs in place must not change the reference."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, list):
        return [tuple(v) if isinstance(v, tuple) else v for v in value]
    return value


def _mutated_inputs(originals: Mapping[str, Any], given: Mapping[str, Any]) -> list[str]:
    """Inputs the candidate changed in place (it was given copies, so nothing of the reference moved)."""
    out = []
    for key, original in originals.items():
        copy = given.get(key)
        if isinstance(original, torch.Tensor) and isinstance(copy, torch.Tensor) and copy.shape == original.shape:
            same = (copy.detach() == original) | (torch.isnan(copy.detach()) & torch.isnan(original)) \
                if original.is_floating_point() else copy.detach() == original
            if not bool(same.all()):
                out.append(key)
    return out


def candidate_exception(error: BaseException, call: str) -> dict:
    """What a finding needs of an exception raised by candidate code: the call, type, message, own frame."""
    message = " ".join(str(error).split())
    return {"call": call, "type": type(error).__name__, "message": message[:300], "at": own_frame(error)}


def _exception_words(exception: dict) -> str:
    text = f"{exception['type']}: {exception['message']}"
    return text + (f" at {exception['at']}" if exception.get("at") else "")


class CaseReplay:
    """One loss case of a candidate loss replayed against the reference: `run` makes the rows (into the report)
    and returns the case's evidence; `summary` is the case's column of the stage table."""

    def __init__(self, dump: Dump, spec: LossSpec, adapter: LossAdapter, profile: Profile, report: Report,
                 case: str):
        self.dump, self.spec, self.adapter, self.profile, self.report = dump, spec, adapter, profile, report
        self.case = case
        self.ref = CaseView(dump, spec, case)
        self.evidence = CaseEvidence(case, spec.batch_size)
        self.branches = list(spec.branches) or [None]
        self.summary: dict[str, Any] = {}
        self.section = f"loss/{case}"
        # stages whose conditioned replay passed, per branch (decides whether near-tie explanations hold)
        self.conditioned_ok: dict[tuple[str | None, str], bool] = {}
        # the end-to-end run's assignment against the reference's, per branch
        self.evidence_diff: dict[str | None, AssignmentDiff | None] = {}

    def run(self) -> CaseEvidence:
        for branch in self.branches:
            for stage in REPLAY_STAGES:
                if stage == "output" and self.spec.end2end:
                    continue  # the end-to-end output combines both branches: compared in the whole run
                self.replay_stage(stage, branch)
        self.whole_run()
        self.conditioned_gradients()
        return self.evidence

    # -- tolerances
    def tol(self, name: str) -> Tolerance:
        return self.profile.for_name(name)

    def where(self, stage: str, branch: str | None) -> str:
        text = f"{branch} {stage}" if branch else stage
        return f"{text} ({CATEGORY.get(stage, stage)})"

    def _mark(self, stage: str, branch: str | None, verdict: str) -> None:
        key = f"{branch}.{stage}" if branch else stage
        previous = self.summary.get(key)
        if previous in (None, "pass") or verdict == "fail":
            self.summary[key] = verdict

    # -- 1. stage cross-replay
    def replay_stage(self, stage: str, branch: str | None) -> None:
        fn = self.adapter.stage(stage, branch)
        if fn is None:
            self._mark(stage, branch, "not exposed")
            return
        ref_stage = REFERENCE_STAGE.get(stage, stage)
        out_branch = None if stage == "output" else branch
        outputs_ref = {n: self.ref.ref(ref_stage, n, out_branch) for n in STAGE_OUTPUTS[stage]}
        outputs_ref = {n: t for n, t in outputs_ref.items() if t is not None}
        try:
            inputs = self.ref.stage_inputs(stage, branch)
        except KeyError as missing:
            self._row(stage, branch, f"{self.ref.name(stage, '*', branch)}", True,
                      note=f"not replayed: the reference lacks {missing.args[0]}")
            self._mark(stage, branch, "no reference")
            return
        ev = StageEvidence(self.case, branch, stage, reference=outputs_ref, inputs=inputs)
        call_inputs = self._candidate_inputs(stage, inputs)
        watch = BroadcastWatch()
        try:
            produced = self._run_stage(fn, stage, call_inputs, watch)
        except ParityError:
            raise
        except Exception as error:  # noqa: BLE001 - a candidate stage may raise anything; that is the finding
            ev.exception = candidate_exception(error, f"{stage} stage")
            ev.error = f"{type(error).__name__}: {error}"
            ev.broadcasts = watch.events
            ev.failed = list(outputs_ref)
            self._row(stage, branch, self.ref.name(ref_stage, "*", out_branch), False,
                      note=f"the candidate's {stage} stage raised {_exception_words(ev.exception)}")
            self.evidence.stages.append(ev)
            self._mark(stage, branch, "fail")
            self.conditioned_ok[(branch, stage)] = False
            return
        ev.broadcasts = watch.events
        self._judge_stage(stage, branch, ev, produced, call_inputs)

    def _candidate_inputs(self, stage: str, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """The candidate gets copies: a stage that changes its inputs in place must not change the reference."""
        call_inputs = {k: _copy_input(v) for k, v in inputs.items()}
        if stage == "assign":
            # fed head outputs that carry gradients: the assignment must come out as constants
            for key in ("scores", "pred_bboxes"):
                if key in call_inputs and call_inputs[key].is_floating_point():
                    call_inputs[key] = call_inputs[key].detach().requires_grad_(True)
        if stage == "anchors" and self.adapter.level_order == "coarse-first":
            call_inputs["feat_shapes"] = list(call_inputs["feat_shapes"])[::-1]  # the candidate's own level order
        return call_inputs

    def _run_stage(self, fn: Callable, stage: str, call_inputs: dict[str, Any], watch: BroadcastWatch) -> Any:
        """The candidate's stage under the broadcast watch; a coarse-first candidate's anchors come back in the
        reference's anchor order."""
        with watch:
            produced = fn(**call_inputs)
        if stage == "anchors" and self.adapter.level_order == "coarse-first" and isinstance(produced, Mapping):
            back = torch.argsort(coarse_first_order(self.spec.feat_shapes))
            produced = {k: v[back] if isinstance(v, torch.Tensor) and v.shape[:1] == back.shape else v
                        for k, v in produced.items()}
        return produced

    def _judge_stage(self, stage: str, branch: str | None, ev: StageEvidence, produced: Any,
                     call_inputs: Mapping[str, Any]) -> None:
        """What a stage returned against the reference's outputs: rows, evidence and the stage's verdict."""
        if not isinstance(produced, Mapping):
            raise ParityError(f"loss candidate {self.adapter.name}: stage {stage} returned {describe(produced)}, "
                              f"expected a dict {{name: tensor}} under the names of docs/loss-adapter.md")
        outputs_ref = ev.reference
        # copied before anything else of the candidate runs (a later call may change them in place)
        ev.carries_grad = [k for k, v in produced.items() if isinstance(v, torch.Tensor) and v.requires_grad
                           and k not in ASSIGNER_INPUT_NAMES] if stage == "assign" else []
        ev.outputs = {k: v.detach().clone() for k, v in produced.items() if isinstance(v, torch.Tensor)}
        ev.mutated = _mutated_inputs(ev.inputs, call_inputs)
        if stage == "assign":
            self._row(stage, branch, f"{stage}: outputs are constants", not ev.carries_grad,
                      note=("assignment outputs carry gradients: " + ", ".join(ev.carries_grad)) if ev.carries_grad
                      else "assignment outputs carry no gradient (assigner inputs detached)")
        diff = None
        if "fg_mask" in outputs_ref and "fg_mask" in ev.outputs:
            diff = self._assignment(branch, ev.outputs, lambda n: outputs_ref.get(n) if n in outputs_ref
                                    else self.ref.ref("assign", n, branch))
        ok = self._compare_stage_outputs(stage, branch, outputs_ref, ev, diff)
        self._exposure_row(stage, branch, outputs_ref, ev)
        self.evidence.stages.append(ev)
        self.conditioned_ok[(branch, stage)] = ok and not ev.carries_grad
        returned = [n for n in outputs_ref if n in ev.outputs]
        verdict = "fail" if not ok or ev.carries_grad else (
            "pass" if len(returned) == len(outputs_ref) else f"partial ({len(returned)} of {len(outputs_ref)} outputs)")
        self._mark(stage, branch, verdict)

    def _compare_stage_outputs(self, stage: str, branch: str | None, outputs_ref: Mapping[str, torch.Tensor],
                               ev: StageEvidence, diff: "AssignmentDiff | None", *, section: str | None = None,
                               end_to_end: bool = False, extra_note: str = "") -> bool:
        """Every returned output against the reference; what the stage does not return is not exposed, never a
        failure. The assignment's decisive outputs go first: when they are equal, an intermediate that differs
        only by float noise (align_metric, overlaps) cannot have changed anything, and its row says so."""
        ordered = sorted(outputs_ref, key=lambda n: (n not in DECISIVE, list(outputs_ref).index(n)))
        decisive_ok: bool | None = None
        ok = True
        for name in ordered:
            cand = ev.outputs.get(name)
            if cand is None:
                continue
            if name not in DECISIVE and decisive_ok is None:
                shown = [n for n in DECISIVE if n in ev.outputs and n in outputs_ref]
                decisive_ok = ok and {"fg_mask", "target_gt_idx", "target_scores"} <= set(shown)
            passed = self._compare(stage, branch, name, outputs_ref[name], cand, ev, diff, section=section,
                                   end_to_end=end_to_end, extra_note=extra_note,
                                   batch_note=(stage == "output" and name == "loss"),
                                   assignment_equal=bool(decisive_ok))
            ok &= passed
        return ok

    def _exposure_row(self, stage: str, branch: str | None, outputs_ref: Mapping, ev: StageEvidence) -> None:
        """One row for what a stage did not return (not exposed) and returned under names the contract lacks."""
        missing = [n for n in outputs_ref if n not in ev.outputs]
        known = set(STAGE_OUTPUTS[stage]) | (set(ASSIGNER_INPUT_NAMES) if stage == "assigner" else set())
        unknown = sorted(k for k in ev.outputs if k not in known)
        notes = []
        if missing:
            notes.append(f"partial ({len(outputs_ref) - len(missing)} of {len(outputs_ref)} outputs): not exposed "
                         + ", ".join(missing))
        if unknown:
            notes.append(f"not compared, no such {stage} output in docs/dump-format.md: " + ", ".join(unknown))
        if ev.mutated:
            notes.append(f"the candidate's {stage} stage changed its input(s) {', '.join(ev.mutated)} in place "
                         f"(it was given copies; the comparison used the reference's)")
        if notes:
            ref_stage = REFERENCE_STAGE.get(stage, stage)
            self._row(stage, branch, self.ref.name(ref_stage, "*", None if stage == "output" else branch), True,
                      note="; ".join(notes))

    def _compare(self, stage: str, branch: str | None, name: str, ref: torch.Tensor, cand: Any,
                 ev: StageEvidence, diff: "AssignmentDiff | None", *, batch_note: bool = False,
                 section: str | None = None, end_to_end: bool = False, extra_note: str = "",
                 assignment_equal: bool = False) -> bool:
        full = self.ref.name(REFERENCE_STAGE.get(stage, stage), name, None if stage == "output" else branch)
        tol = BITWISE if name in DISCRETE else self.tol(full)
        if cand is None:  # not exposed: said once per stage (`_exposure_row`), never a failure
            return True
        if not isinstance(cand, torch.Tensor):
            cand = torch.as_tensor(cand)
        cand_d = cand.detach()
        note = ""
        if batch_note and not self.adapter.batch_scaled:
            cand_d = cand_d * self.spec.batch_size
            note = f"candidate declares the per-image mean: its value x B={self.spec.batch_size} is compared"
        fg_names = ("fg_mask", "target_gt_idx", "mask_pos", "target_labels", "target_bboxes", "target_scores")
        pairs = self._pairs(branch) if name in PAIR_DEFINED and stage in ("assign", "assigner") else None
        if diff is not None and name in fg_names:
            passed, metrics, note2 = self._compare_assignment_tensor(name, ref, cand_d, diff, tol)
            note = "; ".join(filter(None, [note, note2]))
        elif name in names.FOREGROUND_ONLY and stage in ("assign", "assigner") and self._ref_fg(branch) is not None \
                and cand_d.shape == ref.shape:
            fg = self._ref_fg(branch)  # without the candidate's fg_mask: judged on the reference's foreground
            metrics = compare_tensors(ref[fg], cand_d[fg], tol)
            passed = metrics.passed
            note = "; ".join(filter(None, [note, f"compared on the reference's {int(fg.sum())} foreground anchors "
                                                 f"(background rows are filler)"]))
        elif pairs is not None and pairs.shape == ref.shape == cand_d.shape:
            passed, metrics, note2 = self._compare_inside_boxes(name, ref, cand_d, pairs, tol, assignment_equal)
            note = "; ".join(filter(None, [note, note2]))
        else:
            metrics = compare_tensors(ref, cand_d, tol)
            passed = metrics.passed
            if not passed and assignment_equal and name in NOISE_TOLERANT:
                passed, note2 = self._float_noise(ref, cand_d, metrics)
                note = "; ".join(filter(None, [note, note2]))
            if not passed and end_to_end and self._explained_by_ties(stage, branch):
                passed = True
                note = "; ".join(filter(None, [note, self._tie_note(branch)]))
        if not passed:
            ev.failed.append(name)
        note = "; ".join(filter(None, [note, extra_note]))
        self._row(stage, branch, full, passed, metrics=metrics.as_dict(), tolerance=tol.as_dict(), note=note,
                  section=section)
        return passed

    # -- conventions that are not bugs
    def _pairs(self, branch: str | None) -> torch.Tensor | None:
        """(B, M, A) bool: the anchor-box pairs where ultralytics defines align_metric and overlaps (the anchor
        inside the box, a real box); it leaves them zero elsewhere."""
        inside = self.ref.ref("assign", "mask_in_gts", branch)
        mask_gt = self.ref.ref("preprocess", "mask_gt", branch)
        if inside is None or mask_gt is None or mask_gt.shape[:2] != inside.shape[:2]:
            return None
        return inside.bool() & mask_gt.bool()

    def _ref_fg(self, branch: str | None) -> torch.Tensor | None:
        fg = self.ref.ref("assign", "fg_mask", branch)
        return None if fg is None else fg.bool()

    def _compare_inside_boxes(self, name: str, ref: torch.Tensor, cand: torch.Tensor, pairs: torch.Tensor,
                              tol: Tolerance, assignment_equal: bool):
        """align_metric / overlaps where ultralytics defines them; the outside is a note, not a verdict."""
        metrics = compare_tensors(ref[pairs], cand[pairs], tol)
        passed, notes = metrics.passed, [f"compared on the {int(pairs.sum())} anchor-box pairs inside the boxes"]
        if not passed and assignment_equal:
            passed, noise = self._float_noise(ref[pairs], cand[pairs], metrics)
            notes.append(noise)
        outside = ~pairs
        nonzero = int((cand[outside] != 0).sum())
        if nonzero:
            what = "CIoU" if name == "overlaps" else "the alignment metric"
            effect = ("no effect on the assignment" if assignment_equal else
                      "whether it changes the assignment is for fg_mask and target_gt_idx to say")
            notes.append(f"the candidate computes {what} for every pair ({nonzero} of {int(outside.sum())} pairs "
                         f"outside the boxes are nonzero); ultralytics zeroes it outside the boxes: {effect}")
        return passed, metrics, "; ".join(filter(None, notes))

    def _float_noise(self, ref: torch.Tensor, cand: torch.Tensor, metrics) -> tuple[bool, str]:
        """An intermediate of an assignment whose decisive outputs are equal: a difference within the chained
        loss tolerance (rounding of a differently ordered computation, docs/tolerances.md) is float noise."""
        chained = self.profile.for_kind("loss-chained")
        # relative parts only: the absolute floor is larger than a whole alignment metric (~1e-6 at init)
        noise = Tolerance(0.0, chained.rtol, source=chained.source, atol_absmax=chained.atol_absmax)
        if not compare_tensors(ref, cand, noise).passed:
            return False, ""
        worst = float((ref.double() - cand.double()).abs().max()) if ref.numel() else 0.0
        return True, (f"differs by float noise only (max |d| {worst:.2g}, within the loss-chained tolerance's "
                      f"relative part, {noise.describe()}); {', '.join(DECISIVE)} are equal: not a failure")

    # -- assignment as discrete data
    def _assignment(self, branch: str | None, cand: Mapping, ref_of: Callable[[str], torch.Tensor | None]
                    ) -> "AssignmentDiff | None":
        ref_fg, ref_idx = ref_of("fg_mask"), ref_of("target_gt_idx")
        metric, overlaps = ref_of("align_metric"), ref_of("overlaps")
        cand_fg, cand_idx = cand.get("fg_mask"), cand.get("target_gt_idx")
        if ref_fg is None or ref_idx is None or cand_fg is None or cand_idx is None:
            return None
        if cand_fg.shape != ref_fg.shape or cand_idx.shape != ref_idx.shape:
            return None
        tol = self.tol(self.ref.name("assign", "align_metric", branch))
        return compare_assignment(ref_fg, ref_idx, cand_fg.detach(), cand_idx.detach(), metric, overlaps, tol,
                                  self.tol(self.ref.name("assign", "overlaps", branch)))

    def _compare_assignment_tensor(self, name: str, ref: torch.Tensor, cand: torch.Tensor, diff: "AssignmentDiff",
                                   tol: Tolerance):
        """fg_mask and target_gt_idx are judged per box (AssignmentDiff); the others on the anchors whose
        assignment both sides agree on (background rows are filler, flipped anchors are the diff's business)."""
        if name == "fg_mask":
            metrics = compare_tensors(ref.bool(), cand.bool(), BITWISE)
            return not diff.real, metrics, diff.summary()
        if cand.shape != ref.shape:
            return False, compare_tensors(ref, cand, tol), ""
        if name == "target_gt_idx":
            common = diff.common_mask  # foreground on both sides: the box index is no filler there
            metrics = compare_tensors(ref[common], cand[common], BITWISE)
            moved_real = [f for f in diff.real if f.kind == "moved"]
            return not moved_real, metrics, (f"compared on the {int(common.sum())} anchors foreground on both "
                                             f"sides; {len(diff.flips) - len(diff.real)} near-tie flip(s)"
                                             if diff.flips else f"compared on the {int(common.sum())} foreground "
                                                                f"anchors")
        if name in names.FOREGROUND_ONLY:
            agree = diff.agree_mask  # same box on both sides: label and box must match
            metrics = compare_tensors(ref[agree], cand[agree], tol)
            return metrics.passed, metrics, f"compared on the {int(agree.sum())} anchors assigned the same box"
        if not diff.flips:
            metrics = compare_tensors(ref, cand, tol)
            return metrics.passed, metrics, ""
        # mask_pos (B, M, A) and target_scores (B, A, C): leave the flipped anchors out
        keep = ~diff.flipped_mask
        r, c = (ref.transpose(1, 2)[keep], cand.transpose(1, 2)[keep]) if name == "mask_pos" else (ref[keep], cand[keep])
        metrics = compare_tensors(r, c, tol)
        note = f"compared outside the {int(diff.flipped_mask.sum())} flipped anchor(s)"
        if diff.real:
            note += f"; {len(diff.real)} real flip(s) (see fg_mask)"
        return metrics.passed and not diff.real, metrics, note

    def _explained_by_ties(self, stage: str, branch: str | None) -> bool:
        """An end-to-end number after the assignment that differs only because of near-tie flips: the flips are
        all near-ties, and the stage(s) behind the number match when fed the reference assignment."""
        if stage not in AFTER_ASSIGNMENT:
            return False
        diffs = self.evidence_diff
        relevant = [diffs.get(b) for b in (self.branches if stage == "output" else [branch])]
        relevant = [d for d in relevant if d is not None]
        if not relevant or not any(d.flips for d in relevant) or any(d.real for d in relevant):
            return False
        needed = [(b, s) for b in self.branches for s in ("normalize", "classify", "box", "gains")] \
            if stage == "output" else [(branch, stage)]
        return all(self.conditioned_ok.get(key, False) for key in needed)

    def _tie_note(self, branch: str | None) -> str:
        count = sum(len(d.flips) for d in self.evidence_diff.values() if d is not None)
        return (f"differs only through {count} near-tie assignment flip(s); the stages match when fed the "
                f"reference assignment")

    # -- 2. the whole candidate loss
    def whole_run(self) -> None:
        section = f"{self.section} end-to-end"
        if self.adapter.loss is None:
            self._row("output", None, names.loss_output(self.case, "loss"), True, section=section,
                      note="not run: the candidate exposes stages only")
            return
        leaves = self._head_leaves()
        head = leaves if self.spec.end2end else leaves[None]
        batch = self.ref.batch()
        watch = BroadcastWatch()
        try:
            with watch:
                result = self._call(self.adapter, head, batch)
        except ParityError:
            raise
        except Exception as error:  # noqa: BLE001 - a candidate loss may raise anything; that is the finding
            self.evidence.run_exception = candidate_exception(error, "loss call")
            self.evidence.run_error = f"{type(error).__name__}: {error}"
            self.evidence.run_broadcasts = watch.events
            self.evidence.values_passed = False
            self._row("output", None, names.loss_output(self.case, "loss"), False, section=section,
                      where="end-to-end (candidate exception)",
                      note=f"the candidate loss raised {_exception_words(self.evidence.run_exception)}")
            self._mark("end-to-end", None, "fail")
            return
        self.evidence.run_broadcasts = watch.events
        if result.terms is None and self.adapter.with_gains is not None:
            result = self._per_gain_terms(result, head, batch, section)
        self._leaves, self._result = leaves, result
        self.summary["intermediates"] = sorted(result.tensors)
        self.summary["return_shape"] = result.form

        values_ok = self._compare_intermediates(result.tensors, section)
        scale = 1 if self.adapter.batch_scaled else self.spec.batch_size
        values_ok &= self._compare_terms(result, scale, section)
        self.evidence.values_passed = values_ok
        self._mark("end-to-end", None, "pass" if values_ok else "fail")
        ref_loss, cand = self.evidence.ref_loss, self.evidence.cand_loss
        if not bool(torch.isfinite(cand).all()) and ref_loss is not None and bool(torch.isfinite(ref_loss).all()):
            self.evidence.positive_logits_finite = self._probe_positive_logits(head, batch)
        self.end_to_end_gradients(section.replace("end-to-end", "gradients"))

    def _call(self, adapter: "LossAdapter", head: Any, batch: dict, loss: Callable | None = None) -> CandidateResult:
        """The candidate loss on copies of the batch (the head leaves are this case's own)."""
        batch = {k: _copy_input(v) for k, v in batch.items()}
        preds, converted = adapter.convert_preds(head, self.spec), adapter.convert_batch(batch, self.spec)
        if loss is None:
            return adapter.call(preds, converted)
        return adapter.parse(loss(preds, converted))

    def _per_gain_terms(self, result: CandidateResult, head: Any, batch: dict, section: str) -> CandidateResult:
        """A loss returning only its total, built again by its own factory with one gain at a time: each call
        gives one term. Used only when the three parts add up to the total (a factory that ignores the gains
        gives three totals)."""
        gains = self.spec.gains
        if not hasattr(self.adapter, "_per_gain_losses"):
            self.adapter._per_gain_losses = [self.adapter.with_gains(tuple(g if k == t else 0.0
                                                                           for k, g in enumerate(gains)))
                                             for t in range(len(TERMS))]
        parts = []
        try:
            for loss in self.adapter._per_gain_losses:
                part = self._call(self.adapter, head, batch, loss)
                parts.append(part.total.reshape(()))
        except ParityError:
            raise
        except Exception as error:  # noqa: BLE001
            exception = candidate_exception(error, "loss call with one gain")
            self._row("output", None, names.loss_output(self.case, "loss") + "[sum]", True, section=section,
                      where="output (one gain at a time)",
                      note=f"no per-term verdict: a call with one gain at a time raised {_exception_words(exception)}")
            return result
        terms = torch.stack(parts)
        tol = self.tol(names.loss_output(self.case, "loss"))
        metrics = compare_tensors(result.total.detach().reshape(1), terms.detach().sum().reshape(1), tol)
        values = ", ".join(f"{t} {float(v):.6g}" for t, v in zip(TERMS, terms.detach()))
        if not metrics.passed:
            self._row("output", None, names.loss_output(self.case, "loss") + "[sum]", True, section=section,
                      where="output (one gain at a time)", metrics=metrics.as_dict(), tolerance=tol.as_dict(),
                      note=(f"no per-term verdict: the calls with one gain at a time ({values}) do not add up to the "
                            f"total {float(result.total):.6g}, so the factory does not pass the gains on"))
            return result
        self._row("output", None, names.loss_output(self.case, "loss") + "[sum]", True, section=section,
                  where="output (one gain at a time)", metrics=metrics.as_dict(), tolerance=tol.as_dict(),
                  note=f"the three calls with one gain at a time ({values}) add up to the candidate's total")
        return CandidateResult(terms, result.total, result.items, result.tensors,
                               result.form + "; terms from one call per gain", per_gain=True)

    def _compare_intermediates(self, tensors: Mapping[str, torch.Tensor], section: str, note: str = "") -> bool:
        """Every intermediate the candidate returned, per branch, against the reference (unconditioned)."""
        values_ok = True
        for branch in self.branches:
            prefix = f"{branch}." if branch else ""
            mine = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)} if branch else dict(tensors)
            ev = StageEvidence(self.case, branch, "end-to-end")
            ev.outputs = {k: v for k, v in mine.items() if isinstance(v, torch.Tensor)}
            ev.carries_grad = [k for k, v in ev.outputs.items() if k.startswith("assign.") and v.requires_grad
                               and k.split(".", 1)[1] not in ASSIGNER_INPUT_NAMES]
            diff = None
            if "assign.fg_mask" in ev.outputs and "assign.target_gt_idx" in ev.outputs:
                diff = self._assignment(branch, {"fg_mask": ev.outputs["assign.fg_mask"],
                                                 "target_gt_idx": ev.outputs["assign.target_gt_idx"]},
                                        lambda n, b=branch: self.ref.ref("assign", n, b))
            self.evidence_diff[branch] = diff
            by_stage: dict[str, dict[str, torch.Tensor]] = {}
            for key in sorted(ev.outputs, key=_pipeline_key):
                stage, _, name = key.partition(".")
                if stage not in names.LOSS_STAGES or stage == "output":
                    continue
                ref = self.ref.ref(stage, name, branch)
                if ref is not None:
                    ev.reference[key] = ref
                    by_stage.setdefault(stage, {})[name] = ref
            for stage, refs in by_stage.items():
                sub = StageEvidence(self.case, branch, stage, reference=refs,
                                    outputs={n: ev.outputs[f"{stage}.{n}"] for n in refs})
                if not self._compare_stage_outputs(stage, branch, refs, sub, diff if stage == "assign" else None,
                                                   section=section, end_to_end=True, extra_note=note):
                    ev.failed += [f"{stage}.{n}" for n in sub.failed]
                    values_ok = False
            self.evidence.run[branch] = ev
        return values_ok

    def _compare_terms(self, result: CandidateResult, scale: int, section: str, note: str = "") -> bool:
        """The loss itself: one verdict per term (or on the total), and the items."""
        values_ok = True
        ref_loss = self.ref.ref("output", "loss")
        in_order = self._order_equivalent() if ref_loss is not None else None
        # the diagnosis reads the reference a coarse-first candidate should equal (the same, without order ties)
        self.evidence.ref_loss = in_order["loss"] if in_order is not None else ref_loss
        cand = result.terms if result.terms is not None else result.total
        self.evidence.cand_loss = cand.detach() * scale  # in the reference's convention, as the rows compare it
        convention = ("" if scale == 1 else
                      f"candidate declares the per-image mean: its value x B={self.spec.batch_size} is compared")
        convention = "; ".join(filter(None, [convention, note]))
        if ref_loss is not None and result.terms is not None:
            for t, term in enumerate(TERMS):
                name = f"{names.loss_output(self.case, 'loss')}[{term}]"
                tol = self.tol(names.loss_output(self.case, "loss"))
                metrics = compare_tensors(ref_loss[t:t + 1], result.terms[t:t + 1].detach() * scale, tol)
                passed, row_note = metrics.passed, "; ".join(filter(None, [convention, _per_gain_note(result, term,
                                                                                                self.spec.gains)]))
                if not passed and self._explained_by_ties("output", None):
                    passed, row_note = True, "; ".join(filter(None, [row_note, self._tie_note(None)]))
                if not passed and self._in_candidate_order(result.terms[t:t + 1].detach() * scale, tol,
                                                           lambda alt, t=t: alt["loss"][t:t + 1]):
                    passed, row_note = True, "; ".join(filter(None, [row_note, self._order_note()]))
                values_ok &= passed
                self._row("output", None, name, passed, metrics=metrics.as_dict(), tolerance=tol.as_dict(),
                          note=row_note, section=section, where=f"output ({term} term)")
        elif ref_loss is not None:
            tol = self.tol(names.loss_output(self.case, "loss"))
            metrics = compare_tensors(ref_loss.sum().reshape(1), result.total.detach().reshape(1) * scale, tol)
            values_ok &= metrics.passed
            self._row("output", None, names.loss_output(self.case, "loss") + "[sum]", metrics.passed,
                      metrics=metrics.as_dict(), tolerance=tol.as_dict(), section=section,
                      note="; ".join(filter(None, [convention, "the candidate returns only a total: no per-term "
                                                               "verdict (return (box, cls, dfl), or let the factory "
                                                               "take the gains, to get one)"])))
        ref_items = self.ref.ref("output", "items")
        if ref_items is not None and result.items is not None and result.items.numel() == 3:
            tol = self.tol(names.loss_output(self.case, "items"))
            metrics = compare_tensors(ref_items, result.items.detach().reshape(3).to(ref_items.dtype), tol)
            passed = metrics.passed or self._explained_by_ties("output", None)
            if not passed and self._in_candidate_order(result.items.detach().reshape(3).to(ref_items.dtype), tol,
                                                       lambda alt: alt["loss"] / self.spec.batch_size):
                passed, note = True, "; ".join(filter(None, [note, self._order_note()]))
            values_ok &= passed
            self._row("output", None, names.loss_output(self.case, "items"), passed, metrics=metrics.as_dict(),
                      tolerance=tol.as_dict(), section=section,
                      note="; ".join(filter(None, [note, "" if metrics.passed or not passed else self._tie_note(None)])))
        return values_ok

    # -- a candidate whose anchors run coarsest level first
    def _in_candidate_order(self, value: torch.Tensor, tol: Tolerance, pick: Callable[[dict], torch.Tensor]) -> bool:
        alt = self._order_equivalent()
        return alt is not None and compare_tensors(pick(alt), value, tol).passed

    def _order_note(self) -> str:
        flips = self._order_equivalent()["flips"]
        return (f"differs from the reference only through {flips} anchor flip(s) from top-k ties that the anchor "
                f"order breaks: ultralytics' arithmetic (built-in loss) run in the candidate's coarse-first anchor "
                f"order gives this value")

    def _order_equivalent(self) -> dict | None:
        """The reference's loss and head gradients recomputed in a coarse-first candidate's anchor order.

        `topk` breaks ties among equal alignment metrics (all zero for a box no prediction overlaps yet) by
        anchor index, so a port that orders anchors P5 first may pick other tied anchors than ultralytics; a
        tied zero-metric anchor that enters a box's top k can then win a conflict and move others. Every other
        operation is the same in either order, so a candidate equal to this is ultralytics' arithmetic."""
        if hasattr(self, "_order_reference"):
            return self._order_reference
        self._order_reference = None
        if self.adapter.level_order != "coarse-first" or self.spec.end2end:
            return None
        shapes = list(self.spec.feat_shapes)
        perm = coarse_first_order(shapes)
        back = torch.argsort(perm)
        config = replace(self.spec.config, strides=tuple(reversed(self.spec.strides)),
                         min_box_side=self.spec.config.assigner.min_box_side)
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in self.ref.head(None).items()}
        run = build_loss(config).run({"boxes": leaves["boxes"][..., perm], "scores": leaves["scores"][..., perm],
                                      "feat_shapes": shapes[::-1]}, self.ref.batch())
        ref_fg, ref_idx = self.ref.ref("assign", "fg_mask"), self.ref.ref("assign", "target_gt_idx")
        if ref_fg is None or ref_idx is None:
            return None
        diff = compare_assignment(ref_fg, ref_idx, run.tensors["assign.fg_mask"][:, back],
                                  run.tensors["assign.target_gt_idx"][:, back],
                                  self.ref.ref("assign", "align_metric"), self.ref.ref("assign", "overlaps"),
                                  self.tol(self.ref.name("assign", "align_metric")),
                                  self.tol(self.ref.name("assign", "overlaps")))
        if not diff.flips:  # the same assignment in either order: the order explains nothing
            return None
        grads = {}
        for t, term in enumerate(TERMS):
            values = torch.autograd.grad(run.loss[t], list(leaves.values()), retain_graph=True, allow_unused=True)
            for (output, leaf), grad in zip(leaves.items(), values):
                grads[(term, output)] = torch.zeros_like(leaf) if grad is None else grad.detach()
        self._order_reference = {"loss": run.loss.detach(), "grads": grads, "flips": len(diff.flips)}
        return self._order_reference

    def _probe_positive_logits(self, head: Any, batch: dict) -> bool | None:
        """Rerun the candidate with |logits| instead of the (negative, at initialisation) class logits: a loss that
        turns finite was taking a fractional power of raw logits. None when the probe itself fails."""
        def positive(h):
            return {"boxes": h["boxes"].detach(), "scores": h["scores"].detach().abs()}

        probe = {b: positive(head[b]) for b in self.spec.branches} if self.spec.end2end else positive(head)
        try:
            with torch.no_grad():
                result = self._call(self.adapter, probe, batch)
        except Exception:  # noqa: BLE001 - a probe that fails proves nothing
            return None
        value = result.terms if result.terms is not None else result.total
        return bool(torch.isfinite(value).all())

    def _head_leaves(self) -> dict[str | None, dict[str, torch.Tensor]]:
        leaves: dict[str | None, dict[str, torch.Tensor]] = {}
        for branch in self.branches:
            leaves[branch] = {k: v.detach().clone().requires_grad_(True) for k, v in self.ref.head(branch).items()}
        return leaves

    # -- 3. gradients
    def end_to_end_gradients(self, section: str) -> None:
        result, leaves = self._result, self._leaves
        if result.terms is None:
            self._total_gradients(section)
            return
        if not result.terms.requires_grad:
            self._row("gradients", None, f"grad.head.{self.case}.*", False, section=section, where="end-to-end",
                      note="the candidate's loss carries no gradient to the head outputs")
            self.evidence.grads_passed = False
            return
        wanted = [(b, o) for b in self.branches for o in names.HEAD_OUTPUTS
                  if self.dump.get_optional(names.grad_head(self.case, TERMS[0], o, b)) is not None]
        if not wanted:
            return
        ok = True
        failures = []
        scale = 1 if self.adapter.batch_scaled else self.spec.batch_size
        for t, term in enumerate(TERMS):
            tensors = [leaves[b][o] for b, o in wanted]
            grads = torch.autograd.grad(result.terms[t] * scale if scale != 1 else result.terms[t], tensors,
                                        retain_graph=True, allow_unused=True)
            for (branch, output), grad, leaf in zip(wanted, grads, tensors):
                ref = self.dump.get(names.grad_head(self.case, term, output, branch))
                grad = torch.zeros_like(leaf) if grad is None else grad
                name = names.grad_head(self.case, term, output, branch)
                tol = self.tol(name)
                metrics = compare_tensors(ref, grad.detach(), tol)
                passed = metrics.passed
                note = "; ".join(filter(None, [
                    "" if scale == 1 else f"candidate gradient x B={self.spec.batch_size} (per-image mean)",
                    _per_gain_note(result, term, self.spec.gains)]))
                if not passed and self._explained_by_ties("output", None):
                    passed, note = True, "; ".join(filter(None, [note, self._tie_note(None)]))
                if not passed and self._in_candidate_order(grad.detach(), tol,
                                                           lambda alt, k=(term, output): alt["grads"][k]):
                    passed, note = True, "; ".join(filter(None, [note, self._order_note()]))
                if not passed:
                    failures.append(name)
                ok &= passed
                self._row("gradients", branch, name, passed, metrics=metrics.as_dict(), tolerance=tol.as_dict(),
                          note=note, section=section, where=f"end-to-end ({term} term)")
        self.evidence.grads_passed = ok
        self.evidence.grad_failures = failures

    def _total_gradients(self, section: str) -> None:
        """A candidate returning only a total: its gradient against the sum of the reference's term gradients."""
        result, leaves = self._result, self._leaves
        if not result.total.requires_grad:
            self._row("gradients", None, f"grad.head.{self.case}.*", False, section=section, where="end-to-end",
                      note="the candidate's loss carries no gradient to the head outputs")
            self.evidence.grads_passed = False
            return
        wanted = [(b, o) for b in self.branches for o in names.HEAD_OUTPUTS
                  if all(self.dump.get_optional(names.grad_head(self.case, t, o, b)) is not None for t in TERMS)]
        if not wanted:
            return
        scale = 1 if self.adapter.batch_scaled else self.spec.batch_size
        grads = torch.autograd.grad(result.total * scale, [leaves[b][o] for b, o in wanted], retain_graph=True,
                                    allow_unused=True)
        ok = True
        for (branch, output), grad in zip(wanted, grads):
            ref = sum(self.dump.get(names.grad_head(self.case, t, output, branch)) for t in TERMS)
            grad = torch.zeros_like(ref) if grad is None else grad.detach()
            name = names.grad_head(self.case, "total", output, branch)
            tol = self.tol(names.grad_head(self.case, TERMS[0], output, branch))
            metrics = compare_tensors(ref, grad, tol)
            ok &= metrics.passed
            self._row("gradients", branch, name, metrics.passed, metrics=metrics.as_dict(), tolerance=tol.as_dict(),
                      section=section, where="end-to-end (total)",
                      note="the candidate returns only a total: compared with the sum of the reference's term "
                           "gradients (not bitwise by construction)")
        self.evidence.grads_passed = ok

    def conditioned_gradients(self) -> None:
        """Per term, d(stage loss)/d(head output) with the reference assignment fed in, scaled like the full
        graph scales it (branch weight, batch size, gain): isolates the loss math's gradients."""
        section = f"{self.section} gradients"
        results = []
        for branch in self.branches:
            weight = self.spec.branch_weight(branch)
            for stage, terms in (("classify", ("cls",)), ("box", ("box", "dfl"))):
                fn = self.adapter.stage(stage, branch)
                if fn is None or (stage == "box" and self.adapter.stage("decode", branch) is None):
                    continue
                if not self.conditioned_ok.get((branch, stage), False):
                    continue  # values already differ: the gradient row would only repeat that
                try:
                    inputs = self.ref.stage_inputs(stage, branch)
                except KeyError:
                    continue
                output = "scores" if stage == "classify" else "boxes"
                leaf = inputs[output].detach().clone().requires_grad_(True)
                inputs[output] = leaf
                try:  # the candidate's stages once more: an exception was reported by the stage replay
                    if stage == "box":
                        decoded = self.adapter.stage("decode", branch)(boxes=leaf,
                                                                       anchor_points=inputs["anchor_points"])
                        inputs["pred_bboxes"] = decoded["pred_bboxes"]
                    produced = fn(**inputs)
                except Exception:  # noqa: BLE001
                    continue
                for term in terms:
                    ref = self.dump.get_optional(names.grad_head(self.case, term, output, branch))
                    key = {"cls": "loss", "box": "loss_iou", "dfl": "loss_dfl"}[term]
                    if ref is None or key not in produced or not produced[key].requires_grad:
                        continue
                    seed = torch.ones((), dtype=produced[key].dtype)
                    if weight is not None:
                        seed = seed * weight
                    seed = seed * self.spec.batch_size * self.spec.gains[TERMS.index(term)]
                    (grad,) = torch.autograd.grad(produced[key], leaf, grad_outputs=seed, retain_graph=True)
                    name = names.grad_head(self.case, term, output, branch)
                    tol = self.tol(name)
                    metrics = compare_tensors(ref, grad.detach(), tol)
                    results.append(metrics.passed)
                    self._row(stage, branch, name, metrics.passed, metrics=metrics.as_dict(), tolerance=tol.as_dict(),
                              section=section, where=f"{branch + ' ' if branch else ''}{stage} ({term} term, "
                                                     f"conditioned)",
                              note="fed the reference assignment (conditioned)")
        if results:
            self.evidence.conditioned_grads_passed = all(results)

    # -- rows
    def _row(self, stage: str, branch: str | None, name: str, passed: bool, *, metrics=None, tolerance=None,
             note: str = "", section: str | None = None, where: str | None = None) -> Row:
        return self.report.add(Row(section=section or self.section, where=where or self.where(stage, branch),
                                   name=name, passed=bool(passed), metrics=metrics, tolerance=tolerance, note=note))


def _per_gain_note(result: CandidateResult, term: str, gains: Sequence[float]) -> str:
    if not result.per_gain:
        return ""
    others = ", ".join(f"{t}=0" for t in TERMS if t != term)
    return (f"{term} term: the candidate's loss called with only the {term} gain "
            f"({term}={gains[TERMS.index(term)]:g}, {others}); it returns a scalar")


def _pipeline_key(name: str) -> tuple[int, int]:
    stage, _, tensor = name.partition(".")
    order = list(REPLAY_STAGES)
    s = order.index(stage) if stage in order else len(order)
    outputs = STAGE_OUTPUTS.get(stage, ())
    return s, outputs.index(tensor) if tensor in outputs else len(outputs)


