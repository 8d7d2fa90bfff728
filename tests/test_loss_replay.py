"""compare_loss: stage cross-replay, end-to-end verdicts per term, gradients, near-ties and the diagnosis.

Reference: the committed fixture dumps (ultralytics' own loss, captured) and, for tie-breaking, a loss-only dump
written here from ultralytics' real criterion on constant head outputs (exact ties by symmetry).
"""

from __future__ import annotations

import json

import pytest
import torch

from parity.dump import names
from parity.compare.tolerances import Tolerance
from parity.dump.files import Dump
from parity.errors import ParityError
from parity.reimpl import assigner as assigner_module
from parity.reimpl.loss import build_loss
from parity.diagnose.loss import compare_loss
from parity.replay.loss import LossAdapter, LossSpec, builtin_loss_adapter, compare_assignment
from parity.causes.plant import planted_loss

from test_reimpl_loss import ultralytics_loss_dump

YOLO11 = "yolo11-narrow-nc80-96"
YOLO26 = "yolo26-narrow-nc12-64"

# inject -> (signature of the first finding, stage named first, cases replayed, fixture)
INJECTED = {
    "missing-sigmoid": ("missing-sigmoid", "assign", ["default"], YOLO11),
    "double-sigmoid": ("double-sigmoid", "assign", ["default"], YOLO11),
    "unclamped-target-scores-sum": ("unclamped-target-scores-sum", "normalize", ["no_boxes"], YOLO11),
    "no-detach": ("no-detach", "assign", ["default"], YOLO11),
    "weights-broadcast": ("shape-broadcast", "classify", ["default"], YOLO11),
    "iou-weight-broadcast": ("shape-broadcast", "box", ["default"], YOLO11),
    "all-anchors-positive": ("all-anchors-positive", "assign", ["default"], YOLO11),
    "gain-swap": ("gain-mismatch", "gains", ["default"], YOLO11),
    "no-batch-scale": ("gain-mismatch", "output", ["default"], YOLO11),
}


@pytest.fixture(scope="module")
def yolo11(fixtures_dir) -> Dump:
    return Dump(fixtures_dir / YOLO11)


def stage_of(row) -> str:
    return row.where.split(" (")[0].split()[-1]


def numeric_rows(report):
    return [r for r in report.rows if r.metrics is not None]


# -------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("fixture", [YOLO11, YOLO26])
def test_builtin_loss_is_bitwise_at_parity_on_every_case(fixtures_dir, fixture):
    dump = Dump(fixtures_dir / fixture)
    report = compare_loss(dump, "builtin", profile="cpu-fp32", progress=False)
    assert report.verdict == "parity", [(r.section, r.name, r.note) for r in report.failed_rows][:5]
    assert not report.findings
    cases = [c["name"] for c in dump.manifest["loss"]["cases"]]
    sections = {r.section for r in report.rows}
    for case in cases:  # every case covered, in all three passes
        assert {f"loss/{case}", f"loss/{case} end-to-end", f"loss/{case} gradients"} <= sections
    assert all(r.metrics["exact"] for r in numeric_rows(report)), "built-in loss is bitwise, not just within tol"
    # each term judged on its own, and the gradient of each term w.r.t. each head output
    assert {r.name for r in report.rows if r.name.startswith("loss.default.output.loss[")} == {
        f"loss.default.output.loss[{t}]" for t in names.LOSS_TERMS}
    grads = {r.name for r in report.rows if r.section == "loss/default gradients"}
    branches = dump.manifest["loss"]["branches"] or [None]
    assert {names.grad_head("default", t, o, b) for t in names.LOSS_TERMS for o in names.HEAD_OUTPUTS
            for b in branches} <= grads
    assert report.coverage["loss"]["cases"] == cases
    assert report.context["loss"]["first_wrong_stage"] is None
    json.dumps(report.to_dict())


# --------------------------------------------------------------------------------------- injected bugs
@pytest.mark.parametrize("inject", list(INJECTED))
def test_injected_bug_is_found_at_its_stage(fixtures_dir, inject):
    signature, stage, cases, fixture = INJECTED[inject]
    report = compare_loss(Dump(fixtures_dir / fixture), "builtin", inject=inject, cases=cases, progress=False)
    assert report.verdict == "divergence"
    first = report.first_divergence()
    assert stage_of(first) == stage, f"first failing row {first.where} / {first.name}"
    assert report.context["loss"]["first_wrong_stage"]["stage"] == stage
    assert report.findings, "no finding"
    lead = report.findings[0]
    assert lead.signature == signature, [(f.signature, f.where) for f in report.findings]
    assert f"stage {stage}" in lead.where
    assert lead.message and "\n" not in lead.message
    json.dumps(report.to_dict())


def test_missing_sigmoid_nan_is_told_at_the_assigner_not_as_a_nan_loss(yolo11):
    report = compare_loss(yolo11, "builtin", inject="missing-sigmoid", cases=["default"], progress=False)
    signatures = [f.signature for f in report.findings]
    assert signatures[0] == "missing-sigmoid" and "nan-source" in signatures
    nan = next(f for f in report.findings if f.signature == "nan-source")
    assert nan.where == "loss stage assign" and nan.evidence["tensor"] == "align_metric"
    # the assigner proper, fed the reference's probabilities, is fine: only its input is wrong
    core = [r for r in report.rows if r.section == "loss/default" and r.where.startswith("assigner")]
    assert core and all(r.passed for r in core)
    # and the loss math after the assignment, fed the reference assignment, is fine too
    after = [r for r in report.rows if r.section == "loss/default" and stage_of(r) in ("classify", "box", "gains")]
    assert after and all(r.passed for r in after)


def test_e2e_injection_names_the_branch(fixtures_dir):
    report = compare_loss(Dump(fixtures_dir / YOLO26), "builtin", inject="missing-sigmoid", cases=["default"],
                          progress=False)
    lead = report.findings[0]
    assert lead.signature == "missing-sigmoid" and lead.where == "loss stage assign (one2many branch)"
    assert stage_of(report.first_divergence()) == "assign"


def test_all_anchors_positive_fails_the_discrete_comparison(yolo11):
    report = compare_loss(yolo11, "builtin", inject="all-anchors-positive", cases=["default"], progress=False)
    fg = next(r for r in report.rows if r.section == "loss/default" and r.name == "loss.default.assign.fg_mask")
    assert not fg.passed and "real" in fg.note and "positives" in fg.note


# ---------------------------------------------------------------------------------------- black boxes
def _ultralytics_criterion(yaml: str, nc: int):
    from parity.capture.reference import build_model

    return build_model(yaml, nc, 0).init_criterion()


def test_ultralytics_own_loss_as_a_black_box_is_at_parity(yolo11):
    criterion = _ultralytics_criterion("fixtures/models/yolo11-narrow.yaml", 80)
    report = compare_loss(yolo11, LossAdapter(criterion, name="ultralytics"), progress=False)
    assert report.verdict == "parity" and all(r.metrics["exact"] for r in numeric_rows(report))
    assert report.coverage["loss"]["stages_exposed"] == {"all": []}
    assert "multiplied by the batch size" in report.coverage["loss"]["batch_convention"]
    per_term = [r for r in report.rows if "output.loss[" in r.name]
    assert len(per_term) == 3 * 4


@pytest.mark.parametrize("inject,signature", [("missing-sigmoid", "missing-sigmoid"), ("no-detach", "no-detach"),
                                              ("no-batch-scale", "gain-mismatch"),
                                              ("unclamped-target-scores-sum", "unclamped-target-scores-sum")])
def test_black_box_bugs_are_still_diagnosed(yolo11, inject, signature):
    """A candidate exposing no stage and no intermediate: per-term verdicts and inferred findings."""
    loss = planted_loss(yolo11.manifest, inject)
    cases = ["no_boxes"] if inject.startswith("unclamped") else ["default"]
    report = compare_loss(yolo11, LossAdapter(lambda p, b: loss(p, b), name=inject), cases=cases, progress=False)
    assert report.verdict == "divergence"
    assert report.findings[0].signature == signature, [(f.signature, f.where) for f in report.findings]
    if inject == "missing-sigmoid":
        assert report.findings[0].where.startswith("loss stage assign")


def test_declared_per_image_mean_is_stated_not_hidden(yolo11):
    loss = build_loss(yolo11.manifest)

    def mean_loss(preds, batch):
        run = loss.run(preds, batch)
        return run.loss / preds["scores"].shape[0], run.items

    declared = compare_loss(yolo11, LossAdapter(mean_loss, batch_scaled=False), cases=["default"], progress=False)
    assert declared.verdict == "parity"
    terms = [r for r in declared.rows if "output.loss[" in r.name]
    assert terms and all("per-image mean" in r.note and "B=2" in r.note for r in terms)
    assert "per-image mean" in declared.coverage["loss"]["batch_convention"]
    silent = compare_loss(yolo11, LossAdapter(mean_loss), cases=["default"], progress=False)
    assert silent.verdict == "divergence"
    assert silent.findings[0].signature == "gain-mismatch" and "batch size" in silent.findings[0].message


def test_adapter_levels_coarse_first_pixel_xyxy_and_term_order(yolo11):
    """A port taking 8.3-style per-level maps, coarsest first, pixel corner boxes, returning (cls, box, dfl)."""
    spec = LossSpec.from_dump(yolo11)
    loss = build_loss(yolo11.manifest)
    reg = 4 * spec.reg_max

    def port_loss(levels, batch):
        assert isinstance(levels, list) and levels[0].shape[-1] == spec.feat_shapes[-1][1]  # coarse first
        flat = torch.cat([l.flatten(2) for l in levels[::-1]], 2)
        h, w = spec.imgsz
        xyxy = batch["bboxes"] / torch.tensor([w, h, w, h])
        xywh = torch.cat(((xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]), 1)
        run = loss.run({"boxes": flat[:, :reg], "scores": flat[:, reg:], "feat_shapes": spec.feat_shapes},
                       {**batch, "bboxes": xywh})
        return run.loss[[1, 0, 2]]

    adapter = LossAdapter(port_loss, predictions="levels", level_order="coarse-first", targets="xyxy",
                          normalized=False, terms=("cls", "box", "dfl"))
    report = compare_loss(yolo11, adapter, profile="cpu-fp32", progress=False)
    assert report.verdict == "parity", [(r.name, r.metrics and r.metrics.get("reason")) for r in report.failed_rows]


def test_factory_string_with_module_options(yolo11):
    report = compare_loss(yolo11, "test_loss_replay:make_port_loss", cases=["default"], progress=False)
    assert report.verdict == "parity" and report.candidate == "test_loss_replay:make_port_loss"
    with pytest.raises(ParityError, match="cannot import"):
        compare_loss(yolo11, "no_such_module_xyz:factory", progress=False)
    with pytest.raises(ParityError, match="built-in"):
        compare_loss(yolo11, "test_loss_replay:make_port_loss", inject="gain-swap", progress=False)
    with pytest.raises(ParityError, match="not in"):
        compare_loss(yolo11, "builtin", cases=["no_such_case"], progress=False)


# Module-level adapter options for the factory above (docs/loss-adapter.md).
LOSS_ADAPTER = {"batch_scaled": True, "terms": ("box", "cls", "dfl")}


def make_port_loss(spec):
    loss = build_loss(spec.manifest)
    return lambda preds, batch: loss(preds, batch)


# ------------------------------------------------------------------------------------------ tie-breaks
@pytest.fixture(scope="module")
def tied_dump(tmp_path_factory) -> Dump:
    """Constant head outputs and a 40 px box centred on the grid: symmetric anchors tie exactly at the top-k
    boundary (ultralytics' own loss writes the reference)."""
    def constant_head(preds):
        return {"boxes": torch.zeros_like(preds["boxes"]).requires_grad_(),
                "scores": torch.zeros_like(preds["scores"]).requires_grad_(), "feats": preds["feats"]}

    side = 40 / 96
    cases = {"default": (torch.tensor([[3.0], [5.0]]), torch.tensor([[0.5, 0.5, side, side]] * 2),
                         torch.tensor([0.0, 1.0]))}
    return ultralytics_loss_dump(tmp_path_factory.mktemp("tied") / "ref", model_yaml="fixtures/models/yolo11-narrow.yaml",
                                 nc=80, imgsz=96, head_fn=constant_head, cases=cases)


def _with_top_candidates(replacement, dump):
    original = assigner_module.top_candidates
    assigner_module.top_candidates = replacement
    try:
        return compare_loss(dump, builtin_loss_adapter(LossSpec.from_dump(dump)), progress=False)
    finally:
        assigner_module.top_candidates = original


def test_near_tie_flips_are_harmless_and_do_not_turn_later_numbers_red(tied_dump):
    def reversed_ties(align_metric, mask_gt, topk):  # same values, ties broken from the other end
        idx = align_metric.shape[-1] - 1 - torch.topk(align_metric.flip(-1), topk, dim=-1).indices
        chosen = torch.zeros(align_metric.shape, dtype=torch.int8).scatter_(-1, idx, 1)
        return chosen * mask_gt.to(torch.int8)

    report = _with_top_candidates(reversed_ties, tied_dump)
    fg = next(r for r in report.rows if r.section == "loss/default" and r.name.endswith("assign.fg_mask"))
    assert "near-tie" in fg.note and " 0 real" in fg.note and fg.passed
    assert fg.metrics["mismatched"] > 0  # the anchors did flip
    explained = [r for r in report.rows if "near-tie assignment flip" in r.note]
    assert explained, "the flips changed no later number: the test lost its point"
    assert report.verdict == "parity"


def test_real_flips_fail(tied_dump):
    original = assigner_module.top_candidates

    def fewer(align_metric, mask_gt, topk):  # one anchor too few per box: a real difference, not a tie
        return original(align_metric, mask_gt, topk - 1)

    report = _with_top_candidates(fewer, tied_dump)
    fg = next(r for r in report.rows if r.section == "loss/default" and r.name.endswith("assign.fg_mask"))
    assert not fg.passed and "real" in fg.note
    assert report.verdict == "divergence"


def test_compare_assignment_classifies_flips():
    metric = torch.tensor([[[0.9, 0.5, 0.5, 0.1, 0.0]]])  # one image, one box, five anchors
    overlaps = torch.tensor([[[0.8, 0.6, 0.6, 0.2, 0.0]]])
    ref_fg = torch.tensor([[True, True, False, False, False]])  # top-2: anchors 0 and 1 (1 and 2 tie)
    idx = torch.zeros(1, 5, dtype=torch.long)
    tol = Tolerance(1e-5, 1e-5)
    tie = compare_assignment(ref_fg, idx, torch.tensor([[True, False, True, False, False]]), idx, metric, overlaps, tol)
    assert len(tie.flips) == 2 and not tie.real and tie.boxes[0]["added"] == [2] and tie.boxes[0]["removed"] == [1]
    real = compare_assignment(ref_fg, idx, torch.tensor([[True, False, False, True, False]]), idx, metric, overlaps, tol)
    assert len(real.real) == 2
    same = compare_assignment(ref_fg, idx, ref_fg.clone(), idx, metric, overlaps, tol)
    assert not same.flips and "same foreground" in same.summary()


def test_a_total_only_loss_gets_a_total_verdict_and_says_so(yolo11):
    loss = build_loss(yolo11.manifest)
    report = compare_loss(yolo11, LossAdapter(lambda p, b: loss(p, b)[0].sum(), name="total"), cases=["default"],
                          progress=False)
    assert report.verdict == "parity"
    total = next(r for r in report.rows if r.name.endswith("output.loss[sum]"))
    assert "no per-term verdict" in total.note
    assert any(r.where == "end-to-end (total)" for r in report.rows)


# ----------------------------------------------------------------------------------------- candidate dumps
def _write_candidate_dump(reference: Dump, out, *, inject=None, record_loss=True, head_scale=1.0) -> str:
    """What a port in another language writes: its head outputs, and (optionally) every loss tensor and head
    gradient it computed, under the dump's names."""
    from parity.dump.files import DumpWriter

    spec = LossSpec.from_dump(reference)
    loss = planted_loss(reference.manifest, inject)
    head_index = reference.model["head_index"]
    with DumpWriter(out, force=True, kind="candidate") as writer:
        head = {o: reference.get(names.act(head_index, o)) * head_scale for o in names.HEAD_OUTPUTS}
        for output, tensor in head.items():
            writer.add(names.act(head_index, output), tensor)
        for case in ([c["name"] for c in reference.manifest["loss"]["cases"]] if record_loss else []):
            leaves = {k: v.clone().requires_grad_(True) for k, v in head.items()}
            batch = {f: reference.get(names.batch_target(case, f)) for f in ("cls", "bboxes", "batch_idx")}
            run = loss.run({**leaves, "feat_shapes": spec.feat_shapes}, batch)
            for name, tensor in run.tensors.items():
                writer.add(f"loss.{case}.{name}", tensor.detach())
            for index, term in enumerate(names.LOSS_TERMS):
                grads = torch.autograd.grad(run.loss[index], list(leaves.values()), retain_graph=True,
                                            allow_unused=True)
                for (output, leaf), grad in zip(leaves.items(), grads):
                    writer.add(names.grad_head(case, term, output), torch.zeros_like(leaf) if grad is None else grad)
        writer.commit({"model": {"head_index": head_index}})
    return str(out)


def test_candidate_dump_with_recorded_loss(yolo11, tmp_path):
    clean = compare_loss(yolo11, _write_candidate_dump(yolo11, tmp_path / "clean"), cases=["default", "no_boxes"],
                         progress=False)
    assert clean.verdict == "parity" and all(r.metrics["exact"] for r in numeric_rows(clean))
    assert any("candidate's own inputs" in r.note for r in clean.rows)  # stages checked against the oracle
    assert any(r.where.startswith("head") for r in clean.rows)
    sick = compare_loss(yolo11, _write_candidate_dump(yolo11, tmp_path / "sick", inject="missing-sigmoid"),
                        cases=["default"], progress=False)
    assert sick.findings[0].signature == "missing-sigmoid" and sick.findings[0].where == "loss stage assign"
    assert stage_of(sick.first_divergence()) == "assign"


def test_candidate_dump_without_loss_tensors_gets_the_loss_of_its_head(yolo11, tmp_path):
    same = compare_loss(yolo11, _write_candidate_dump(yolo11, tmp_path / "same", record_loss=False),
                        cases=["default"], progress=False)
    assert same.verdict == "parity"
    assert any("applied to the candidate's head outputs" in r.note for r in same.rows)
    off = compare_loss(yolo11, _write_candidate_dump(yolo11, tmp_path / "off", record_loss=False, head_scale=1.01),
                       cases=["default"], progress=False)
    assert off.verdict == "divergence" and stage_of(off.first_divergence()) == "head"


# ------------------------------------------------------------------------------------------ return shapes
class _Terms:
    def __init__(self, box, cls, dfl):
        self.box_loss, self.cls_loss, self.dfl_loss = box, cls, dfl


class _Run:
    def __init__(self, loss, items, tensors):
        self.loss, self.items, self.tensors = loss, items, tensors


def _vec():
    return torch.tensor([1.0, 2.0, 3.0], requires_grad=True) * 1


@pytest.mark.parametrize("make,form", [
    (lambda v: v, "a (3,) loss vector (box, cls, dfl)"),
    (lambda v: tuple(v), "a tuple of three scalars (box, cls, dfl)"),
    (lambda v: list(v), "a list of three scalars (box, cls, dfl)"),
    (lambda v: (v, v.detach()), "(loss, items) with loss = a (3,) loss vector (box, cls, dfl)"),
    (lambda v: (v, {"box_loss": v[0], "cls_loss": v[1], "dfl_loss": v[2]}, {"normalize.target_scores_sum": v[0]}),
     "(loss, items, intermediates) with loss = a (3,) loss vector (box, cls, dfl)"),
    (lambda v: {"box": v[0], "cls": v[1], "dfl": v[2]}, "a dict of the terms box, cls, dfl"),
    (lambda v: {"loss_box": v[0], "loss_cls": v[1], "loss_dfl": v[2], "total": v.sum()},
     "a dict of the terms box, cls, dfl"),
    (lambda v: _Terms(v[0], v[1], v[2]), "a _Terms object of the terms box, cls, dfl"),
    (lambda v: _Run(v, v.detach(), {}), "a _Run object with loss = a (3,) loss vector (box, cls, dfl)"),
    (lambda v: {"loss": v, "items": v.detach()}, "a dict with loss = a (3,) loss vector (box, cls, dfl)"),
])
def test_every_common_return_shape_is_read_as_the_three_terms(make, form):
    from parity.replay.loss import read_loss_return

    result = read_loss_return(make(_vec()))
    assert result.form == form
    assert result.terms.tolist() == [1.0, 2.0, 3.0] and result.terms.requires_grad
    assert float(result.total.detach()) == 6.0


@pytest.mark.parametrize("value,form", [
    (lambda v: v.sum(), "a scalar (the total only)"),
    (lambda v: 6.0, "a scalar (the total only)"),
    (lambda v: (v.sum(), v.detach()), "(loss, items) with loss = a scalar (the total only)"),
])
def test_a_total_is_read_as_a_total(value, form):
    from parity.replay.loss import read_loss_return

    result = read_loss_return(value(_vec()))
    assert result.terms is None and float(result.total.detach()) == 6.0 and result.form == form


def test_term_order_applies_to_every_shape():
    from parity.replay.loss import read_loss_return

    v = _vec()
    assert read_loss_return(tuple(v), ("cls", "box", "dfl")).terms.tolist() == [2.0, 1.0, 3.0]
    assert read_loss_return((v, v.detach()), ("dfl", "cls", "box")).items.tolist() == [3.0, 2.0, 1.0]


@pytest.mark.parametrize("value,received,why", [
    (lambda v: (v, v.detach(), v.detach()), "tuple(tensor (3,), tensor (3,), tensor (3,))",
     "neither a scalar (for (box, cls, dfl)) nor a dict of intermediates"),
    (lambda v: (v[0], v, v[2]), "tuple(tensor (), tensor (3,), tensor ())", "neither a scalar"),
    (lambda v: torch.zeros(2, 2), "tensor (2, 2)", "3 elements (box, cls, dfl) or one"),
    (lambda v: {"box": v[0], "cls": v[1]}, "dict{box, cls}", "no terms box, cls, dfl and no `loss`"),
    (lambda v: (v[0], v[1], v[2], v.sum()), "tuple(tensor (), tensor (), tensor (), tensor ())", "fits no reading"),
    (lambda v: ("box", v), "tuple(str, tensor (3,))", "its first element (str)"),
    (lambda v: None, "NoneType", "no terms box, cls, dfl"),
])
def test_an_ambiguous_return_is_an_error_saying_what_was_received(value, received, why):
    from parity.replay.loss import read_loss_return

    with pytest.raises(ParityError) as error:
        read_loss_return(value(_vec()), label="mine:loss")
    text = str(error.value)
    assert text.startswith(f"loss candidate mine:loss: returned {received}: ") and why in text
    assert "a tuple/list of three scalars (box, cls, dfl)" in text and "\n" not in text


def test_an_ambiguous_return_stops_the_comparison(yolo11):
    loss = build_loss(yolo11.manifest)

    def confusing(preds, batch):
        run = loss.run(preds, batch)
        return run.loss, run.items, run.items  # a third element that is neither a scalar nor a dict
    with pytest.raises(ParityError, match=r"returned tuple\(tensor \(3,\), tensor \(3,\), tensor \(3,\)\)"):
        compare_loss(yolo11, LossAdapter(confusing), cases=["default"], progress=False)


# ----------------------------------------------------------------------------------- safety and options
class _MutatingLoss:
    """Keeps the tensors it returned and scribbles on them at the start of its next call, as a loss that reuses
    buffers does; returns only a total, so the harness calls it again (one gain at a time) before comparing."""

    def __init__(self, manifest):
        self.loss = build_loss(manifest)
        self.kept = None

    def __call__(self, preds, batch):
        if self.kept is not None:
            self.kept.mul_(0)
        run = self.loss.run(preds, batch)
        self.kept = run.tensors["assign.target_scores"]
        return {"loss": run.loss.sum(), "tensors": {"assign.target_scores": self.kept}}


def make_mutating_loss(spec):
    return _MutatingLoss(spec.manifest)


def test_a_returned_tensor_changed_in_place_later_is_compared_as_returned(yolo11):
    report = compare_loss(yolo11, "test_loss_replay:make_mutating_loss", cases=["default"], progress=False)
    scores = next(r for r in report.rows if r.name == "loss.default.assign.target_scores")
    assert scores.passed and scores.metrics["exact"]
    assert report.verdict == "parity", [(r.name, r.note) for r in report.failed_rows]
    assert report.coverage["loss"]["return_shape"] == [
        "a dict with loss = a scalar (the total only); terms from one call per gain"]


def test_a_stage_that_changes_its_input_in_place_is_given_copies_and_named(yolo11):
    builtin = builtin_loss_adapter(LossSpec.from_dump(yolo11))
    normalize = builtin.stage("normalize")

    def scribbling_normalize(target_scores):
        out = normalize(target_scores=target_scores)
        target_scores.zero_()
        return out

    stages = {**builtin.stages, "normalize": scribbling_normalize}
    report = compare_loss(yolo11, LossAdapter(builtin.loss, stages=stages), cases=["default"], progress=False)
    assert report.verdict == "parity", [(r.name, r.note) for r in report.failed_rows]
    warning = next(f for f in report.findings if f.signature == "in-place-input")
    assert warning.severity == "warning" and "target_scores in place" in warning.message
    assert any("changed its input(s) target_scores in place" in r.note for r in report.rows)


def _assigner_returning(yolo11, keep=None, noise=None):
    builtin = builtin_loss_adapter(LossSpec.from_dump(yolo11))
    assigner = builtin.stage("assigner")

    def partial(**inputs):
        out = assigner(**inputs)
        if noise:
            out = {k: (v * noise if k in ("overlaps", "align_metric") else v) for k, v in out.items()}
        return {k: v for k, v in out.items() if keep is None or k in keep}

    return LossAdapter(None, stages={"assigner": partial})


def test_a_partial_stage_is_not_exposed_not_failed(yolo11):
    adapter = _assigner_returning(yolo11, keep=("target_labels", "target_bboxes"))
    report = compare_loss(yolo11, adapter, cases=["default", "no_boxes"], progress=False)
    assert report.verdict == "parity", [(r.name, r.note) for r in report.failed_rows]
    assert report.context["loss"]["stages"]["default"]["assigner"] == "partial (2 of 9 outputs)"
    labels = next(r for r in report.rows if r.name == "loss.default.assign.target_labels")
    assert "reference's" in labels.note and "foreground anchors" in labels.note  # filler rows left out
    assert not any("did not return" in r.note for r in report.rows)


def test_float_noise_in_an_intermediate_does_not_fail_an_equal_assignment(yolo11):
    noisy = compare_loss(yolo11, _assigner_returning(yolo11, noise=1 + 3e-5), cases=["default"], progress=False)
    assert noisy.verdict == "parity", [(r.name, r.note) for r in noisy.failed_rows]
    overlaps = next(r for r in noisy.rows if r.name == "loss.default.assign.overlaps")
    assert not overlaps.metrics["passed"] and "differs by float noise only" in overlaps.note
    assert "fg_mask, target_gt_idx, target_scores, target_bboxes are equal" in overlaps.note
    # the same tensors off by 1% are not noise, and the fg_mask still being equal does not excuse them
    wrong = compare_loss(yolo11, _assigner_returning(yolo11, noise=1.01), cases=["default"], progress=False)
    assert {r.name for r in wrong.failed_rows} >= {"loss.default.assign.overlaps", "loss.default.assign.align_metric"}


def test_a_loss_that_always_raises_says_every_case(yolo11):
    def broken(preds, batch):
        return preds["nope"]

    report = compare_loss(yolo11, LossAdapter(broken, name="broken"), cases=["default", "no_boxes"], progress=False)
    lead = report.findings[0]
    assert lead.signature == "candidate-exception" and lead.where == "loss (whole candidate run)"
    assert lead.message.startswith("KeyError: 'nope' raised by the whole loss at test_loss_replay.py:")
    assert lead.message.endswith("(in broken), in every case (default, no_boxes)")


@pytest.mark.parametrize("layout,row", [
    ("img,cls,xywh", [1.0, 7.0, 48.0, 24.0, 19.2, 9.6]),
    ("img,cls,xyxy", [1.0, 7.0, 38.4, 19.2, 57.6, 28.8]),
    ("img,xyxy,cls", [1.0, 38.4, 19.2, 57.6, 28.8, 7.0]),
    ("img,xywh,cls", [1.0, 48.0, 24.0, 19.2, 9.6, 7.0]),
])
def test_label_layouts(yolo11, layout, row):
    spec = LossSpec.from_dump(yolo11)
    batch = {"cls": torch.tensor([[7.0]]), "bboxes": torch.tensor([[0.5, 0.25, 0.2, 0.1]]),
             "batch_idx": torch.tensor([1.0])}
    pixels = LossAdapter(lambda p, b: None, targets=layout, normalized=False).convert_batch(batch, spec)
    assert pixels.shape == (1, 6) and torch.allclose(pixels[0], torch.tensor(row))
    fractions = LossAdapter(lambda p, b: None, targets=layout).convert_batch(batch, spec)
    start = 2 if layout.startswith("img,cls") else 1  # the first box column
    expected = torch.tensor(row)
    expected[start:start + 4] /= 96  # the fixture's image is 96 x 96
    assert torch.allclose(fractions[0], expected)


def test_level_order_names_and_dict_predictions_coarse_first(yolo11):
    spec = LossSpec.from_dump(yolo11)
    head = {"boxes": torch.randn(2, 64, sum(h * w for h, w in spec.feat_shapes)),
            "scores": torch.randn(2, 80, sum(h * w for h, w in spec.feat_shapes))}
    levels = LossAdapter(lambda p, b: None, predictions="levels", level_order="P5-first").convert_preds(head, spec)
    assert [tuple(l.shape[2:]) for l in levels] == spec.feat_shapes[::-1]
    flat = LossAdapter(lambda p, b: None, level_order="coarse-first").convert_preds(head, spec)
    assert flat["feat_shapes"] == spec.feat_shapes[::-1]
    assert torch.equal(torch.cat([l.flatten(2) for l in levels], 2), torch.cat((flat["boxes"], flat["scores"]), 1))
    for bad, match in (({"level_order": "P4-first"}, "level_order"), ({"targets": "cls,img,xyxy"}, "targets"),
                       ({"normalized": "pixels"}, "normalized")):
        with pytest.raises(ParityError, match=match):
            LossAdapter(lambda p, b: None, **bad)


LOSS_ADAPTER_TYPO = {"target": "xyxy"}


def test_an_unknown_module_level_option_is_named(yolo11):
    from parity.replay.loss.loading import _as_adapter

    with pytest.raises(ParityError, match=r"unknown adapter option\(s\) 'target'"):
        _as_adapter(lambda p, b: None, LOSS_ADAPTER_TYPO, "mine:build")
