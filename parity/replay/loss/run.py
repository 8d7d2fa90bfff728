"""The loss replay over every chosen case (`LossReplay`): open the reference and the candidate, replay each case
into a report's rows, and say what the replay covered; and the stage table the report's context keeps
(`first_wrong_stage`, `stage_table_key`, `mark_drifted_stages`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from parity.compare.tolerances import Profile, get_profile, profile_for_environment
from parity.dump.files import Dump
from parity.errors import ParityError
from parity.findings import Report
from parity.progress import steps
from parity.replay.loss.adapter import LossAdapter
from parity.replay.loss.cases import CaseReplay
from parity.replay.loss.evidence import LossEvidence
from parity.replay.loss.loading import load_loss_candidate
from parity.replay.loss.recorded import RecordedCaseReplay, RecordedLoss, as_candidate_dump
from parity.replay.loss.spec import CATEGORY, REPLAY_STAGES, LossSpec

SUMMARY_EXTRAS = ("intermediates", "return_shape")  # per-case facts kept beside the stage table, not in it


@dataclass
class LossReplay:
    """A reference's loss cases and the candidate loss they are replayed through."""

    dump: Dump
    spec: LossSpec
    adapter: LossAdapter | RecordedLoss
    profile: Profile
    cases: list[str]
    summary: dict[str, dict[str, Any]] = field(default_factory=dict)  # per case: its column of the stage table

    @classmethod
    def open(cls, reference: Dump | str | Path, candidate_loss: Any = "builtin", *,
             profile: str | Profile | None = None, cases: Sequence[str] | None = None,
             inject: str | None = None) -> "LossReplay":
        """candidate_loss: "builtin", "package.module:factory", a LossAdapter, a callable loss, or a candidate
        dump (directory or Dump) holding the loss tensors a port recorded; `cases` default to all the dump's."""
        from parity.dump.layouts import in_current_layout

        # an ultralytics <= 8.3 reference stores the head per level: read it in the 8.4 boxes/scores layout
        dump = in_current_layout(reference if isinstance(reference, Dump) else Dump(reference))
        spec = LossSpec.from_dump(dump)
        recorded = as_candidate_dump(candidate_loss)
        if recorded is not None and inject:
            raise ParityError("--inject plants a bug in the built-in candidate; a candidate dump is compared as "
                              "recorded")
        adapter = RecordedLoss(recorded) if recorded is not None else load_loss_candidate(candidate_loss, spec,
                                                                                           inject=inject)
        profile = get_profile(profile or profile_for_environment(dump.manifest.get("environment"),
                                                                 dump.config.get("precision")))
        return cls(dump, spec, adapter, profile, _chosen_cases(dump, cases))

    def run(self, report: Report, progress: bool = False) -> LossEvidence:
        """Every chosen case replayed into `report`'s rows; what the replay saw, for the diagnosis."""
        evidence = LossEvidence(gains=self.spec.gains, batch_scaled=self.adapter.batch_scaled,
                                tolerance=self.profile.for_kind("loss"))
        kind = RecordedCaseReplay if isinstance(self.adapter, RecordedLoss) else CaseReplay
        with steps(progress, len(self.cases), "loss replay") as advance:
            for case in self.cases:
                advance(f"loss case {case}")
                replay = kind(self.dump, self.spec, self.adapter, self.profile, report, case)
                evidence.cases.append(replay.run())
                self.summary[case] = replay.summary
        return evidence

    def record_coverage(self, report: Report) -> None:
        """What the replay covered (`report.coverage["loss"]`) and the stage table (`report.context["loss"]`)."""
        adapter, summary = self.adapter, self.summary
        branches = list(self.spec.branches) or [None]
        report.coverage["loss"] = {
            "cases": self.cases,
            "stages_exposed": {str(b or "all"): adapter.exposed(b) for b in branches},
            "stages_not_exposed": {str(b or "all"): [s for s in REPLAY_STAGES if s not in adapter.exposed(b)]
                                   for b in branches},
            "intermediates_returned": sorted(set().union(*[set(s.get("intermediates", []))
                                                           for s in summary.values()])) if summary else [],
            "batch_convention": _convention(adapter, self.spec),
            "return_shape": sorted({s["return_shape"] for s in summary.values() if s.get("return_shape")}),
        }
        report.context["loss"] = {
            "criterion": (self.dump.manifest.get("loss") or {}).get("criterion"),
            "end2end": self.spec.end2end,
            "stages": {case: {k: v for k, v in s.items() if k not in SUMMARY_EXTRAS} for case, s in summary.items()},
            "first_wrong_stage": first_wrong_stage(report),
            "categories": CATEGORY,
        }


def _chosen_cases(dump: Dump, cases: Sequence[str] | None) -> list[str]:
    present = [c["name"] if isinstance(c, Mapping) else str(c)
               for c in (dump.manifest.get("loss") or {}).get("cases", [])]
    if not present:
        raise ParityError(f"{dump.path}: the manifest lists no loss cases (manifest.loss.cases)")
    chosen = list(cases) if cases else present
    missing = [c for c in chosen if c not in present]
    if missing:
        raise ParityError(f"loss case(s) {', '.join(missing)} not in {dump.path} (it has {', '.join(present)})")
    return chosen


def _convention(adapter: LossAdapter | RecordedLoss, spec: LossSpec) -> str:
    if adapter.batch_scaled:
        return f"loss vector multiplied by the batch size (B = {spec.batch_size}), as ultralytics returns it"
    return (f"candidate declares the per-image mean (batch_scaled=False); its values and gradients are multiplied "
            f"by B = {spec.batch_size} before comparison, and every such row says so")


# ------------------------------------------------------------------------------------------- stage table
def first_wrong_stage(report: Report) -> dict | None:
    for row in report.rows:
        if not row.passed and row.section.startswith("loss/"):
            stage = row.where.split(" (")[0].split()[-1]
            return {"section": row.section, "stage": stage, "category": CATEGORY.get(stage, stage), "name": row.name}
    return None


def stage_table_key(row) -> tuple[str, str] | None:
    """(case, key in the stage table) of a loss row: rows read `loss/{case}[ end-to-end]` and `[{branch} ]{stage}
    ({category})` (`CaseReplay.where`); end-to-end rows all count under `end-to-end`."""
    if not row.section.startswith("loss/"):
        return None
    case, _, part = row.section[len("loss/"):].partition(" ")
    if part == "end-to-end":
        return case, "end-to-end"
    return case, ".".join(row.where.split(" (")[0].split())


def mark_drifted_stages(report: Report) -> None:
    """After rows were explained as release drift (`compare --old-reference`), a stage that failed only through
    such rows reads `drift` in the stage table, and the first wrong stage is found again."""
    loss = report.context.get("loss")
    if not loss:
        return
    still_failing = {stage_table_key(row) for row in report.failed_rows}
    for case, stages in (loss.get("stages") or {}).items():
        for key, verdict in stages.items():
            if verdict == "fail" and (case, key) not in still_failing:
                stages[key] = "drift"
    loss["first_wrong_stage"] = first_wrong_stage(report)
