"""A candidate DUMP (a port in any language) judged by its recorded loss tensors: each recorded stage against
ultralytics' arithmetic on the candidate's own inputs, its intermediates, loss and head gradients against the
reference's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from parity.compare.metrics import compare_tensors
from parity.compare.tolerances import Profile
from parity.dump import names
from parity.dump.files import Dump
from parity.findings import Report
from parity.replay.loss.cases import CaseReplay
from parity.replay.loss.evidence import CaseEvidence, StageEvidence
from parity.replay.loss.loading import builtin_loss_adapter
from parity.replay.loss.returns import CandidateResult
from parity.replay.loss.spec import REFERENCE_STAGE, REPLAY_STAGES, STAGE_OUTPUTS, TERMS, CaseView, LossSpec


class RecordedLoss:
    """A candidate DUMP (docs/dump-format.md; a port in any language): its own loss tensors, recorded under the
    dump's names, instead of code to run. `manifest.loss.batch_scaled: false` declares a per-image-mean
    `output.loss`."""

    level_order = "fine-first"  # a recorded dump stores the reference's layout
    with_gains = None

    def __init__(self, dump: Dump):
        self.dump = dump
        self.name = str(dump.path)
        self.batch_scaled = bool((dump.manifest.get("loss") or {}).get("batch_scaled", True))
        self.loss = None

    def exposed(self, branch: str | None = None) -> list[str]:
        """Stages with at least one recorded output (in any case)."""
        recorded = set()
        for name in self.dump.names("loss."):
            parts = name.split(".")[2:]
            if branch and parts and parts[0] == branch:
                parts = parts[1:]
            elif parts and parts[0] in names.E2E_BRANCHES:
                continue
            if parts:
                recorded.add(parts[0])
        return [s for s in REPLAY_STAGES if REFERENCE_STAGE.get(s, s) in recorded]


def as_candidate_dump(candidate: Any) -> Dump | None:
    """The candidate as a dump, when it is one (a Dump, or a directory holding a manifest); otherwise None."""
    if isinstance(candidate, Dump):
        return candidate
    if isinstance(candidate, (str, Path)) and Path(candidate).is_dir() and (Path(candidate) / "manifest.json").exists():
        return Dump(candidate)
    return None



class RecordedCaseReplay(CaseReplay):
    """A candidate dump: nothing to run, so each recorded stage is checked against ultralytics' arithmetic (the
    built-in loss, bitwise equal to it on CPU) fed the CANDIDATE's own recorded inputs, the recorded
    intermediates and loss against the reference's, and the recorded head gradients against the reference's."""

    ORACLE_NOTE = "checked against ultralytics' arithmetic (built-in loss) on the candidate's own inputs"

    def __init__(self, dump: Dump, spec: LossSpec, adapter: RecordedLoss, profile: Profile, report: Report,
                 case: str):
        super().__init__(dump, spec, adapter, profile, report, case)
        self.cand = CaseView(adapter.dump, spec, case, fallback=dump)
        self.oracle = builtin_loss_adapter(spec)

    def run(self) -> CaseEvidence:
        for branch in self.branches:
            self.head_rows(branch)
            for stage in REPLAY_STAGES:
                if not (stage == "output" and self.spec.end2end):
                    self.replay_recorded(stage, branch)
        self.whole_recorded()
        return self.evidence

    def head_rows(self, branch: str | None) -> None:
        """The head outputs the candidate's loss ran on: a loss difference may start here."""
        if not self.cand.has_head(branch):
            return
        mine, ref = self.cand.head(branch), self.ref.head(branch)
        ok = True
        for output in names.HEAD_OUTPUTS:
            path = (branch,) if branch else ()
            name = names.act(self.ref.head_index, *path, output)
            tol = self.profile.for_name(name)
            metrics = compare_tensors(ref[output], mine[output], tol)
            ok &= metrics.passed
            self._row("head", branch, name, metrics.passed, metrics=metrics.as_dict(), tolerance=tol.as_dict(),
                      where=self.where("head", branch),
                      note="the head outputs the candidate's loss was computed on")
        self._mark("head", branch, "pass" if ok else "fail")

    def replay_recorded(self, stage: str, branch: str | None) -> None:
        ref_stage = REFERENCE_STAGE.get(stage, stage)
        out_branch = None if stage == "output" else branch
        produced = {n: self.cand.ref(ref_stage, n, out_branch) for n in STAGE_OUTPUTS[stage]}
        produced = {n: t for n, t in produced.items() if t is not None}
        if not produced:
            self._mark(stage, branch, "not recorded")
            return
        try:
            inputs = self.cand.stage_inputs(stage, branch)
        except KeyError as missing:
            self._row(stage, branch, self.ref.name(ref_stage, "*", out_branch), True,
                      note=f"not checked: the candidate dump lacks {missing.args[0]}, an input of this stage")
            self._mark(stage, branch, "not checked")
            return
        expected = self.oracle.stage(stage, branch)(**inputs)
        expected = {n: t.detach() for n, t in expected.items() if n in produced and isinstance(t, torch.Tensor)}
        ev = StageEvidence(self.case, branch, stage, reference=expected, inputs=inputs, outputs=produced)
        diff = None
        if "fg_mask" in expected:
            ref_of = (lambda n: expected[n] if n in expected else self.oracle_assign(branch, inputs).get(n))
            diff = self._assignment(branch, produced, ref_of)
        ok = True
        for name, value in expected.items():
            ok &= self._compare(stage, branch, name, value, produced.get(name), ev, diff,
                                batch_note=(stage == "output" and name == "loss"), extra_note=self.ORACLE_NOTE)
        self.evidence.stages.append(ev)
        self.conditioned_ok[(branch, stage)] = ok
        self._mark(stage, branch, "pass" if ok else "fail")

    def oracle_assign(self, branch: str | None, inputs: dict) -> dict:
        """All assigner outputs (align_metric and overlaps decide near-ties) on the candidate's inputs."""
        if "pd_scores" in inputs:
            return self.oracle.stage("assigner", branch)(**inputs)
        return self.oracle.stage("assign", branch)(**inputs)

    def whole_recorded(self) -> None:
        section = f"{self.section} end-to-end"
        prefix = f"loss.{self.case}."
        tensors = {n[len(prefix):]: self.adapter.dump.get(n) for n in self.adapter.dump.names(prefix)}
        scale = 1 if self.adapter.batch_scaled else self.spec.batch_size
        if tensors:
            values_ok = self._compare_intermediates(tensors, section, note="as recorded by the candidate")
            loss = tensors.get("output.loss")
            if loss is not None:
                items = tensors.get("output.items")
                result = (CandidateResult(loss.reshape(3), loss.sum(), items, tensors) if loss.numel() == 3 else
                          CandidateResult(None, loss.reshape(()), items, tensors))
                values_ok &= self._compare_terms(result, scale, section, note="as recorded by the candidate")
            self.evidence.values_passed = values_ok
            self._mark("end-to-end", None, "pass" if values_ok else "fail")
            self.recorded_gradients()
            return
        # Nothing recorded: ultralytics' loss applied to the candidate's head outputs, which is what its loss
        # would be if it were right -- a difference here starts in the head.
        if not all(self.cand.has_head(b) for b in self.branches):
            self._row("output", None, names.loss_output(self.case, "loss"), True, section=section,
                      note="not compared: the candidate dump holds neither loss tensors nor head outputs")
            return
        head = {b: self.cand.head(b) for b in self.branches}
        head = head if self.spec.end2end else head[None]
        result = self.oracle.call(self.oracle.convert_preds(head, self.spec),
                                  self.oracle.convert_batch(self.ref.batch(), self.spec))
        values_ok = self._compare_terms(result, 1, section, note=(
            "the candidate dump holds no loss tensors: ultralytics' loss (built-in) applied to the candidate's "
            "head outputs"))
        self.evidence.values_passed = values_ok
        self._mark("end-to-end", None, "pass" if values_ok else "fail")

    def recorded_gradients(self) -> None:
        section = f"{self.section} gradients"
        scale = 1 if self.adapter.batch_scaled else self.spec.batch_size
        ok, failures, seen = True, [], False
        for term in TERMS:
            for branch in self.branches:
                for output in names.HEAD_OUTPUTS:
                    name = names.grad_head(self.case, term, output, branch)
                    mine, ref = self.adapter.dump.get_optional(name), self.dump.get_optional(name)
                    if mine is None or ref is None:
                        continue
                    seen = True
                    tol = self.tol(name)
                    metrics = compare_tensors(ref, mine * scale, tol)
                    ok &= metrics.passed
                    if not metrics.passed:
                        failures.append(name)
                    self._row("gradients", branch, name, metrics.passed, metrics=metrics.as_dict(),
                              tolerance=tol.as_dict(), section=section, where=f"end-to-end ({term} term)",
                              note="as recorded by the candidate" + (
                                  "" if scale == 1 else f"; x B={self.spec.batch_size} (per-image mean)"))
        if seen:
            self.evidence.grads_passed = ok
            self.evidence.grad_failures = failures
