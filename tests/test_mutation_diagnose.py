"""Diagnosis rules pinned by their evidence and their words, so a changed rule fails a test (docs/testing.md).

Written against behaviour unlikely to change: the signatures, the evidence values and message fragments of
parity/diagnose/structure.py (bias init, parameter counts, shapes, BatchNorm, upsample, affine hints) and
parity/diagnose/loss.py (sigmoid, all-positive, detach, normaliser, broadcast, gains, NaN source). Inputs are
synthetic evidence or the committed fixtures, read only.
"""

from __future__ import annotations

import math

import pytest
import torch

from parity.dump import names
from parity.compare.tolerances import BITWISE, Tolerance
from parity.diagnose import loss as dl
from parity.diagnose import structure as ds
from parity.replay.loss.evidence import BroadcastEvent, CaseEvidence, LossEvidence, StageEvidence
from parity.dump.files import Dump
from parity.tools.fixtures import fixture_path
from parity.findings import Report

LOSS_TOL = Tolerance(1e-6, 1e-5)


def new_report() -> Report:
    return Report(command="test", reference="r", candidate="c", profile="p")


@pytest.fixture(scope="module")
def v8():
    """yolov8-narrow nc12: at stride 8 ultralytics' stored bias equals pure float64 and differs from float32."""
    return Dump(fixture_path("yolov8-narrow-nc12-96"))


@pytest.fixture(scope="module")
def y11():
    """yolo11-narrow nc80: the three arithmetics agree at every stride."""
    return Dump(fixture_path("yolo11-narrow-nc80-96"))


def biases(dump: Dump, level: int):
    return [dump.get(names.init_bias("cls_bias", level, v)) for v in ("stored", "float32", "float64")]


def classify(dump: Dump, level: int, cand: torch.Tensor):
    stored, f32, f64 = biases(dump, level)
    stride = dump.model["strides"][level]
    return ds._classify_cls_bias(dump, level, stride, cand, (stored, f32, f64))


# ============================================================================ bias-init classifier
def test_bitwise_equal_bias_has_no_signature_and_names_the_indistinguishable_case(v8, y11):
    stored = biases(v8, 0)[0]
    verdict, signature, message, evidence = classify(v8, 0, stored.clone())
    assert (verdict, signature, message) == ("bitwise equal", None, "")
    assert evidence["level"] == 0 and evidence["stride"] == 8.0 and evidence["nc"] == 12
    assert evidence["reference"] == float(stored[0]) and evidence["float64"] == float(stored[0])
    assert evidence["float32"] != evidence["reference"]
    verdict, signature, _, _ = classify(y11, 0, biases(y11, 0)[0].clone())
    assert signature is None and verdict == "bitwise equal (float32/float64 indistinguishable at this nc)"


def test_float32_arithmetic_is_named_with_its_value_and_ulp(v8):
    stored, f32, _ = biases(v8, 0)
    verdict, signatures, messages, evidence = classify(v8, 0, f32.clone())
    assert verdict == "matches float32 arithmetic" and signatures == ["bias-init-float32"]
    assert evidence["matches"] == ["float32"] and evidence["ulp_from_reference"] == 1
    assert messages[0].startswith(f"stride 8: bias init matches float32 arithmetic ({float(f32[0]):.9g}); "
                                  f"ultralytics stores {float(stored[0]):.9g} (1 ULP apart): it divides and squares "
                                  f"in float32")
    assert messages[0].endswith("One ULP of a bias cannot move a loss visibly.")
    assert "either arithmetic explains it" not in messages[0]


def test_a_one_ulp_difference_that_is_neither_arithmetic_is_a_formula_finding(v8):
    stored = biases(v8, 1)[0]
    cand = torch.nextafter(stored, torch.tensor(-math.inf))
    if torch.equal(cand, biases(v8, 1)[1]):
        cand = torch.nextafter(stored, torch.tensor(math.inf))
    verdict, signature, message, evidence = classify(v8, 1, cand)
    assert signature == "bias-init-formula" and verdict == "different formula"
    assert evidence["ulp_from_reference"] == 1
    assert message == (f"stride 16: bias init follows a different formula: {float(cand[0]):.9g} everywhere "
                       f"(exp = {math.exp(float(cand[0])):.4g}), ultralytics {float(stored[0]):.9g} = "
                       f"log(5 / nc / (640 / stride) ** 2) (1 ULP apart)")
    assert evidence["implied_prior"] == pytest.approx(math.exp(float(cand[0])))


def test_when_both_arithmetics_match_both_are_named(y11):
    stored, f32, f64 = biases(y11, 0)
    cand = torch.nextafter(stored, torch.tensor(math.inf))  # neither: checks the combined branch is not taken
    assert classify(y11, 0, cand)[1] == "bias-init-formula"


def test_another_levels_value_says_levels_or_strides_are_swapped(v8):
    other = biases(v8, 2)[0]
    verdict, signature, message, evidence = classify(v8, 0, other.clone())
    assert signature == "bias-init-formula" and verdict == "stride 32's value"
    assert evidence["matches_stride"] == 32.0
    assert message == (f"stride 8: the class bias equals ultralytics' value for stride 32 ({float(other[0]):.9g}): "
                       f"levels or strides are in another order")


def test_zeros_are_a_bias_init_not_applied(v8):
    stored = biases(v8, 0)[0]
    verdict, signature, message, evidence = classify(v8, 0, torch.zeros_like(stored))
    assert signature == "bias-init-skipped" and verdict == "not applied (default conv init)"
    assert message.startswith("stride 8: bias init not applied (default conv init: zeros, 0 everywhere); "
                              f"ultralytics sets {float(stored[0]):.9g} = log(5 / nc / (640 / stride) ** 2).")
    assert evidence["default_init_bound"] > 0


def test_default_uniform_init_is_recognised_by_its_bound(v8):
    stored = biases(v8, 0)[0]
    _, _, _, evidence = classify(v8, 0, torch.zeros_like(stored))
    bound = evidence["default_init_bound"]
    inside = torch.linspace(-bound, bound, stored.numel())
    verdict, signature, message, _ = classify(v8, 0, inside)
    assert signature == "bias-init-skipped"
    assert f"uniform within +-1/sqrt(fan_in) = +-{bound:.4g}" in message
    outside = torch.linspace(-bound * 1.01, bound * 1.01, stored.numel())
    verdict, signature, message, _ = classify(v8, 0, outside)
    assert signature == "bias-init-formula" and message == (
        f"stride 8: bias init follows a different formula (values from {-bound * 1.01:.6g} to {bound * 1.01:.6g}); "
        f"ultralytics sets {float(stored[0]):.9g} for every class")
    just_inside = torch.linspace(-bound * (1 + 1e-7), bound * (1 + 1e-7), stored.numel())
    assert classify(v8, 0, just_inside)[1] == "bias-init-skipped"


def test_minus_infinity_names_integer_division(v8):
    stored = biases(v8, 0)[0]
    cand = torch.full_like(stored, -math.inf)
    verdict, signature, message, evidence = classify(v8, 0, cand)
    assert (verdict, signature) == ("non-finite", "bias-init-nonfinite")
    assert message == (f"stride 8: the class bias is -inf everywhere (12 of 12 non-finite); ultralytics "
                       f"{float(stored[0]):.9g}. -inf is log(0): with C/C++ integer division 5 / nc is 0 for nc > 5; "
                       f"divide in floating point A non-finite logit makes the class loss infinite or NaN from the "
                       f"first step.")
    assert evidence["candidate"] == "-inf everywhere"


def test_nan_is_non_finite_without_the_integer_division_hint(v8):
    stored = biases(v8, 0)[0]
    cand = stored.clone()
    cand[3] = math.nan
    _, signature, message, _ = classify(v8, 0, cand)
    assert signature == "bias-init-nonfinite" and "(1 of 12 non-finite)" in message and "integer division" not in message


def test_a_wrong_shape_names_both_shapes(v8):
    verdict, signature, message, evidence = classify(v8, 0, torch.zeros(80))
    assert (verdict, signature) == ("shape [80] vs [12]", "bias-init-formula")
    assert message == "stride 8: the class bias has shape [80], ultralytics [12] (nc=12)"
    assert evidence["candidate_shape"] == [80]


class FakeCandidate:
    """What diagnose_bias_init asks a candidate: its fresh biases per level, and whether it is live."""

    def __init__(self, fresh, live=True):
        self._fresh = fresh
        self.live = live

    def fresh_head_biases(self, reference):
        return self._fresh


def test_diagnose_bias_init_rows_and_findings_per_stride(v8):
    fresh = {}
    for level in range(3):
        stored, f32, _ = biases(v8, level)
        box = v8.get(names.init_bias("box_bias", level, "stored"))
        fresh[level] = {"cls": f32.clone() if level == 0 else stored.clone(), "box": box.clone()}
    report = new_report()
    ds.diagnose_bias_init(v8, FakeCandidate(fresh), report)
    cls_rows = [r for r in report.rows if ".cls_bias." in r.name]
    box_rows = [r for r in report.rows if ".box_bias." in r.name]
    assert [r.passed for r in cls_rows] == [False, True, True] and all(r.passed for r in box_rows)
    assert cls_rows[0].where == "layer 22, cls bias init, stride 8" and cls_rows[0].note == "matches float32 arithmetic"
    assert cls_rows[1].note == "bitwise equal" and box_rows[0].note == "as ultralytics (2.0)"
    assert [f.signature for f in report.findings] == ["bias-init-float32"]
    assert report.findings[0].evidence["ulp_from_reference"] == 1 and report.findings[0].severity == "error"


def test_diagnose_bias_init_box_branch_one_is_a_warning_that_cancels(v8):
    fresh = {level: {"cls": biases(v8, level)[0].clone(),
                     "box": torch.ones_like(v8.get(names.init_bias("box_bias", level, "stored")))}
             for level in range(3)}
    report = new_report()
    ds.diagnose_bias_init(v8, FakeCandidate(fresh), report)
    box = [f for f in report.findings if f.signature == "bias-init-box"]
    assert len(box) == 3 and {f.severity for f in box} == {"warning"}
    assert box[0].where == "layer 22, box bias init, stride 8"
    assert box[0].message == ("box-branch bias is 1 everywhere, ultralytics 2 (1.0 before 8.4.0). With reg_max > 1 a "
                              "constant bias cancels in the DFL softmax, so the loss barely moves.")
    assert box[0].evidence["reference"] == 2.0 and box[0].evidence["candidate"][:2] == [1.0, 1.0]
    varied = {level: {"cls": biases(v8, level)[0].clone(),
                      "box": torch.linspace(0, 1, v8.get(names.init_bias("box_bias", level, "stored")).numel())}
              for level in range(3)}
    report = new_report()
    ds.diagnose_bias_init(v8, FakeCandidate(varied), report)
    assert {f.severity for f in report.findings if f.signature == "bias-init-box"} == {"error"}
    assert "it shifts the predicted distances" in report.findings[0].message


def test_diagnose_bias_init_indistinguishable_info_at_nc80(y11):
    fresh = {level: {"cls": biases(y11, level)[0].clone()} for level in range(3)}
    report = new_report()
    ds.diagnose_bias_init(y11, FakeCandidate(fresh), report)
    (info,) = report.findings
    assert info.signature == "bias-init-indistinguishable" and info.severity == "info"
    assert info.where == "layer 23, cls bias init" and info.evidence == {"nc": 80}
    assert info.message.startswith("at nc=80 ultralytics' mixed arithmetic, pure float32 and pure float64 give the "
                                   "same float32 class bias at every stride")
    assert all(r.passed for r in report.rows) and len(report.rows) == 3


def test_diagnose_bias_init_says_what_it_could_not_check(v8):
    report = new_report()
    ds.diagnose_bias_init(v8, FakeCandidate({}, live=True), report)
    assert report.coverage["not_checked"] == [
        "Detect bias init: the candidate cannot be rebuilt without weights (a module instance, not a factory) and "
        "wrote no init.cls_bias.{level}.stored"]
    report = new_report()
    ds.diagnose_bias_init(v8, FakeCandidate({}, live=False), report)
    assert report.coverage["not_checked"] == ["Detect bias init: the candidate dump has no init.cls_bias.{level}.stored"]
    assert report.rows == [] and report.findings == []


def test_bitwise_and_ulps_helpers():
    a = torch.tensor([1.0, -0.0])
    assert ds._bitwise(a, a.clone()) and not ds._bitwise(a, torch.tensor([1.0, 0.0]))
    assert not ds._bitwise(a, a.double()) and not ds._bitwise(a, a[:1])
    assert ds._bitwise(torch.tensor([1, 2]), torch.tensor([1, 2]))
    assert ds._ulps(torch.tensor([1.0]), torch.nextafter(torch.tensor([1.0]), torch.tensor([2.0]))) == 1
    assert ds._ulps(torch.tensor([1.0]), torch.tensor([1.0]).double()) == -1
    assert ds._ulps(torch.tensor([math.inf]), torch.tensor([1.0])) == -1
    assert ds._ulps(torch.zeros(0), torch.zeros(0)) == 0
    assert ds._describe_values(torch.zeros(0)) == "empty"
    assert ds._describe_values(torch.tensor([2.5, 2.5])) == "2.5 everywhere"
    assert ds._describe_values(torch.tensor([1.0, 3.0])) == "values from 1 to 3"


# =============================================================================== structure checks
class CountsCandidate:
    def __init__(self, counts=None, bns=None):
        self._counts, self._bns = counts, bns

    def param_counts(self):
        return self._counts

    def batchnorms(self):
        return self._bns


def test_param_counts_name_the_layer_and_the_difference(y11):
    ref = {e["index"]: e["parameters"] for e in y11.layers}
    cand = dict(ref)
    cand[3] = ref[3] + 16
    del cand[5]
    report = new_report()
    assert ds.check_param_counts(y11, CountsCandidate(cand), report) == [3, 5]
    rows = {r.where: r for r in report.rows}
    assert rows["layer 3"].note == f"reference {ref[3]:,}, candidate {ref[3] + 16:,} (+16)" and not rows["layer 3"].passed
    assert rows["layer 5"].note == f"reference {ref[5]:,}, not in the candidate" and rows["layer 4"].passed
    total_r, total_c = sum(ref.values()), sum(cand.values())
    first, second = report.findings
    assert first.signature == second.signature == "param-count-mismatch"
    assert [r.name for r in report.rows] == ["parameters"] * len(report.rows)
    assert ds._ref_type(y11, 3) == "Conv" and ds._ref_type(y11, 2) == "C3k2" and ds._ref_type(y11, 999) == "?"
    assert first.message == (f"layer 3 (Conv) has 16 more parameters than ultralytics' "
                             f"({ref[3] + 16:,} vs {ref[3]:,}); whole model {total_c:,} vs {total_r:,} "
                             f"({total_c - total_r:+,})")
    assert first.evidence == {"layer": 3, "reference": ref[3], "candidate": ref[3] + 16, "difference": 16,
                              "model_reference": total_r, "model_candidate": total_c}
    assert second.message == f"layer 5 exists only in the reference ({ref[5]:,} parameters)"
    assert second.evidence["difference"] is None
    assert report.context["parameters"] == {"reference": total_r, "candidate": total_c}
    cand = dict(ref)
    cand[99] = 7
    cand[2] = ref[2] - 1
    report = new_report()
    assert ds.check_param_counts(y11, CountsCandidate(cand), report) == [2, 99]
    assert "1 fewer parameters" in report.findings[0].message
    assert report.findings[1].message == "layer 99 exists only in the candidate (7 parameters)"
    assert report.findings[0].message.startswith(f"layer 2 (C3k2) has 1 fewer parameters than ultralytics' "
                                                 f"({ref[2] - 1:,} vs {ref[2]:,})")
    assert {r.where: r.note for r in report.rows}["layer 99"] == "not in the reference, candidate 7"
    assert {r.where: r.note for r in report.rows}["layer 2"] == f"reference {ref[2]:,}, candidate {ref[2] - 1:,} (-1)"
    report = new_report()
    assert ds.check_param_counts(y11, CountsCandidate(None), report) == []
    assert report.coverage["not_checked"] == [
        "parameter counts per layer (the candidate gives no layer structure: add a layer_map)"]


def test_output_shapes_name_the_dimension_and_the_mode(y11):
    outputs = {}
    for entry in y11.layers:
        outputs.update({n: list(s) for n, s in entry.get("outputs", {}).items()})
    entry = next(e for e in y11.layers if e["type"] == "Concat")
    name, shape = next(iter(entry["outputs"].items()))
    wide = list(shape)
    wide[1] *= 2
    outputs[name] = wide
    report = new_report()
    assert ds.check_output_shapes(y11, outputs, report, mode="chained") == [entry["index"]]
    (finding,) = report.findings
    assert finding.signature == "shape-mismatch" and finding.where == f"layer {entry['index']}"
    assert finding.message == (f"layer {entry['index']} (Concat) output {name} has shape {wide}, ultralytics "
                               f"{list(shape)} (dim 1: reference {shape[1]}, candidate {wide[1]} (2x)); a Concat 2x "
                               f"as wide: check which inputs it concatenates [chained]")
    assert finding.evidence == {"layer": entry["index"], "tensor": name, "reference": list(shape), "candidate": wide,
                                "permutation": None, "mode": "chained"}
    assert sum(not r.passed for r in report.rows) == 1 and all(r.note == "as the reference" for r in report.rows
                                                                 if r.passed)
    assert {r.name for r in report.rows} == {"output shape"} and report.rows[0].where == "layer 0"
    assert [r.where for r in report.rows if not r.passed] == [f"layer {entry['index']}"]
    assert [r.note for r in report.rows if not r.passed] == [
        f"{name}: dim 1: reference {shape[1]}, candidate {wide[1]} (2x)"]
    # a layer that is not a Concat gets no Concat hint; NHWC is named with its permutation
    conv = {n: list(s) for e in y11.layers for n, s in e.get("outputs", {}).items()}
    conv["act.0"] = [2, 48, 48, 8]
    report = new_report()
    assert ds.check_output_shapes(y11, conv, report, mode="isolated") == [0]
    (finding,) = report.findings
    assert finding.message == ("layer 0 (Conv) output act.0 has shape [2, 48, 48, 8], ultralytics [2, 8, 48, 48] "
                               "(dim 1: reference 8, candidate 48 (6x); dim 3: reference 48, candidate 8 (0.167x); "
                               "candidate.permute(0, 3, 2, 1) has the reference shape) [isolated]")
    assert finding.evidence["permutation"] == [0, 3, 2, 1] and finding.evidence["mode"] == "isolated"
    other = {n: list(s) for e in y11.layers for n, s in e.get("outputs", {}).items()}
    other["act.1"] = [2, 8, 24, 12]
    report = new_report()
    ds.check_output_shapes(y11, other, report, mode="chained")
    assert "check which inputs" not in report.findings[0].message
    report = new_report()
    assert ds.check_output_shapes(y11, {}, report, mode="isolated") == [] and report.rows == []


def test_batchnorm_eps_and_momentum_are_named_with_their_effect():
    bns = [{"layer": 2, "path": "m.2.bn", "eps": 1e-5, "momentum": 0.03},
           {"layer": 2, "path": "m.2.cv.bn", "eps": 1e-5, "momentum": 0.1},
           {"layer": None, "path": "head.bn", "eps": 1e-3, "momentum": None},
           {"layer": 1, "path": "m.1.bn", "eps": 1e-3, "momentum": 0.03}]
    report = new_report()
    ds.check_batchnorms(CountsCandidate(bns=bns), report)
    found = {(f.signature, f.where): f for f in report.findings}
    assert set(found) == {("bn-eps", "layer 2"), ("bn-momentum", "layer 2"), ("bn-momentum", "model")}
    eps = found[("bn-eps", "layer 2")]
    assert eps.message == ("2 BatchNorm module(s) in layer 2 use eps 1e-05 instead of ultralytics' 0.001 (set by "
                           "initialize_weights); this changes every normalised output in train and eval mode. First: "
                           "m.2.bn")
    assert eps.evidence == {"layer": 2, "values": [1e-05], "reference": 0.001, "modules": ["m.2.bn", "m.2.cv.bn"]}
    momentum = found[("bn-momentum", "model")]
    assert momentum.evidence["values"] == [None] and "the running statistics" in momentum.message
    assert report.context["batchnorm"] == {"modules": 4, "reference_eps": 1e-3, "reference_momentum": 0.03}
    assert [r.where for r in report.rows] == ["layer 2", "layer 2", "model"]
    assert [r.name for r in report.rows] == ["batchnorm eps", "batchnorm momentum", "batchnorm momentum"]
    assert [r.passed for r in report.rows] == [False, False, False]
    assert report.rows[0].note == "2 BatchNorm(s) with eps 1e-05; ultralytics 0.001"
    assert report.rows[1].note == "1 BatchNorm(s) with momentum 0.1; ultralytics 0.03"
    assert found[("bn-momentum", "layer 2")].message == (
        "1 BatchNorm module(s) in layer 2 use momentum 0.1 instead of ultralytics' 0.03 (set by initialize_weights); "
        "this does not change a train-mode forward, but the running statistics (and so eval results and later steps) "
        "drift. First: m.2.cv.bn")
    ordered = [{"layer": layer, "path": f"m.{layer}", "eps": eps, "momentum": 0.03}
               for layer, eps in ((3, 1e-4), (None, 1e-5), (1, 1e-5), (0, 1e-5), (3, 1e-5))]
    report = new_report()
    ds.check_batchnorms(CountsCandidate(bns=ordered), report)
    assert [f.where for f in report.findings] == ["layer 0", "layer 1", "layer 3", "model"]
    assert report.findings[2].evidence["values"] == [1e-05, 0.0001]
    assert "use eps 1e-05, 0.0001 instead" in report.findings[2].message
    report = new_report()
    ds.check_batchnorms(CountsCandidate(bns=[]), report)
    assert report.rows == [] and report.context == {}


def test_upsample_mode_is_named_only_when_it_is_not_nearest():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    nearest = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")
    bilinear = torch.nn.functional.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    finding = ds.diagnose_upsample(11, [x], bilinear, nearest, BITWISE)
    assert finding.signature == "upsample-mode" and finding.where == "layer 11"
    assert finding.message == ("layer 11 (Upsample): the candidate's output is bilinear (align_corners=False) "
                               "interpolation of the layer's input; ultralytics uses nearest (nn.Upsample("
                               "scale_factor=2, mode='nearest'))")
    assert finding.evidence == {"layer": 11, "candidate_mode": "bilinear (align_corners=False)",
                                "reference_mode": "nearest"}
    assert ds.diagnose_upsample(11, [x], nearest, nearest, BITWISE) is None
    assert ds.diagnose_upsample(11, [x], nearest + 1, nearest, BITWISE) is None
    assert ds.diagnose_upsample(11, [x, x], bilinear, nearest, BITWISE) is None
    other = ds.diagnose_upsample(11, [x], bilinear, nearest + 1, BITWISE)
    assert "ultralytics uses another mode" in other.message and other.evidence["reference_mode"] is None


def test_affine_hints_for_global_and_per_channel_errors():
    ref = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    hint = ds.affine_hint(ref, ref * 2 + 0.5)
    assert hint == "the candidate is 2 x reference +0.5 everywhere (a global scale/offset error)"
    scale = torch.tensor([1.0, 1.5, 0.5]).view(1, 3, 1, 1)
    hint = ds.affine_hint(ref, ref * scale)
    assert hint == ("each channel of the candidate is an affine map of the reference's (scales 0.5..1.5): a "
                    "normalisation difference (BatchNorm eps, statistics or affine parameters)")
    assert ds.affine_hint(ref, ref.clone()) == ""
    assert ds.affine_hint(ref, ref + torch.randn_like(ref)) == ""
    assert ds.affine_hint(ref[:, :, :1, :1].flatten()[:3], ref.flatten()[:3]) == ""
    assert ds.affine_hint(torch.ones(8), torch.ones(8) * 2) == ""
    bad = ref.clone()
    bad[0, 0, 0, 0] = math.nan
    assert ds.affine_hint(bad, ref) == ""


# ==================================================================================== loss checks
def stage(name, outputs=None, reference=None, *, branch=None, case="default", **kw) -> StageEvidence:
    return StageEvidence(case=case, branch=branch, stage=name, outputs=outputs or {}, reference=reference or {}, **kw)


def evidence(*stages, case="default", batch=2, **kw) -> LossEvidence:
    return LossEvidence(cases=[CaseEvidence(case=case, batch_size=batch, stages=list(stages), **kw)],
                        tolerance=LOSS_TOL)


def logits():
    return torch.linspace(-6.0, -1.0, 24).reshape(2, 4, 3)


def test_missing_sigmoid_from_raw_logits():
    ev = evidence(stage("assign", {"pd_scores": logits()}, {"pd_scores": logits().sigmoid()}))
    (finding,) = dl.check_sigmoid(ev)
    assert finding.signature == "missing-sigmoid" and finding.where == "loss stage assign"
    assert finding.message == ("the assigner receives raw class logits: sigmoid(candidate pd_scores) equals the "
                               "reference's pd_scores, and the candidate's range is [-6, -1], so score ** alpha (0.5) "
                               "of a negative logit is NaN (case default); apply .sigmoid() to the detached scores "
                               "before assigning")
    assert finding.evidence == {"case": "default", "min_pd_score": -6.0}


def test_double_sigmoid_and_out_of_range_scores():
    probs = logits().sigmoid()
    (finding,) = dl.check_sigmoid(evidence(stage("assign", {"pd_scores": probs.sigmoid()}, {"pd_scores": probs},
                                                 branch="one2many")))
    assert finding.signature == "double-sigmoid" and finding.where == "loss stage assign (one2many branch)"
    assert finding.message.startswith("candidate pd_scores equal sigmoid(reference pd_scores): the class "
                                      "probabilities go through a second sigmoid and all lie in [")
    (finding,) = dl.check_sigmoid(evidence(stage("assign", {"pd_scores": probs * 3 - 0.1}, {"pd_scores": probs})))
    assert finding.signature == "missing-sigmoid" and "outside [0, 1]" in finding.message
    assert dl.check_sigmoid(evidence(stage("assign", {"pd_scores": probs * 0.5}, {"pd_scores": probs}))) == []
    assert dl.check_sigmoid(evidence(stage("assign", {"pd_scores": probs.clone()}, {"pd_scores": probs}))) == []


def test_missing_sigmoid_from_nan_alignment_metrics_end_to_end():
    metric = torch.ones(2, 5)
    metric[0, :3] = math.nan
    case = CaseEvidence(case="default", batch_size=2,
                        run={None: stage("end-to-end", {"assign.align_metric": metric},
                                         {"assign.align_metric": torch.ones(2, 5)})})
    (finding,) = dl.check_sigmoid(LossEvidence(cases=[case], tolerance=LOSS_TOL))
    assert finding.message.startswith("3 alignment metrics are NaN where the reference has none (case default)")
    assert finding.evidence == {"case": "default", "nan_align_metric": 3}


def test_missing_sigmoid_inferred_from_the_probe():
    case = CaseEvidence(case="default", batch_size=2, positive_logits_finite=True,
                        cand_loss=torch.tensor([math.nan, 1.0, 2.0]))
    (finding,) = dl.check_sigmoid(LossEvidence(cases=[case]))
    assert finding.where == "loss stage assign (inferred)" and finding.evidence["probe"] == "abs(scores)"
    assert "finite once the same logits are made non-negative (case default)" in finding.message
    assert dl.check_sigmoid(LossEvidence(cases=[CaseEvidence(case="d", batch_size=2)])) == []


def test_all_anchors_positive_names_the_image_and_counts():
    ref_fg = torch.zeros(2, 6, dtype=torch.bool)
    ref_fg[1, :2] = True
    fg = ref_fg.clone()
    fg[1] = True
    (finding,) = dl.check_all_positive(evidence(stage("assign", {"fg_mask": fg}, {"fg_mask": ref_fg})))
    assert finding.signature == "all-anchors-positive"
    assert finding.message == ("every anchor is foreground: image 1 has 6 of 6 anchors positive where the reference "
                               "has 2 (case default); top-k and the in-box test select the positives")
    assert finding.evidence == {"case": "default", "image": 1, "positives": 6, "reference": 2}
    assert dl.check_all_positive(evidence(stage("assign", {"fg_mask": ref_fg}, {"fg_mask": ref_fg}))) == []
    assert dl.check_all_positive(evidence(stage("assign", {"fg_mask": torch.ones(2, 6)},
                                                {"fg_mask": torch.ones(2, 6)}))) == []


def test_detach_from_grad_carrying_outputs_and_inferred_from_gradients():
    (finding,) = dl.check_detach(evidence(stage("assign", carries_grad=["target_scores", "fg_mask", "a", "b"])))
    assert finding.signature == "no-detach" and finding.where == "loss stage assign"
    branch = dl.check_detach(evidence(stage("assign", carries_grad=["t"], branch="one2one")))
    assert branch[0].where == "loss stage assign (one2one branch)" and branch[0].evidence["case"] == "default"
    assert finding.message == ("the assignment carries gradients (target_scores, fg_mask, a have a grad_fn, case "
                               "default): its inputs are not detached, so the targets move with the predictions")
    assert finding.evidence["tensors"] == ["target_scores", "fg_mask", "a", "b"]
    ev = evidence(values_passed=True, grads_passed=False, conditioned_grads_passed=True,
                  grad_failures=["grad.head.scores"])
    (finding,) = dl.check_detach(ev)
    assert finding.signature == "no-detach" and finding.where == "loss stage assign (inferred)"
    assert finding.evidence == {"case": "default", "gradients": ["grad.head.scores"]}
    assert finding.message == ("equal loss values but different gradients (case default: grad.head.scores); the "
                               "gradients match when the reference assignment is fed in, so they flow through the "
                               "assignment: its inputs are not detached")
    ev = evidence(values_passed=True, grads_passed=False, conditioned_grads_passed=False, grad_failures=["g"])
    assert "as when the assigner inputs are not detached" in dl.check_detach(ev)[0].message
    assert dl.check_detach(evidence(values_passed=True, grads_passed=True)) == []
    assert dl.check_detach(evidence(values_passed=False, grads_passed=False)) == []


def test_unclamped_normaliser_with_and_without_boxes():
    scores = torch.full((2, 4, 3), 0.02)
    raw = float(scores.sum())
    ev = evidence(stage("normalize", {"target_scores_sum": torch.tensor(raw)}, {"target_scores_sum": torch.tensor(1.0)},
                        inputs={"target_scores": scores}))
    (finding,) = dl.check_normaliser(ev)
    assert finding.signature == "unclamped-target-scores-sum" and finding.where == "loss stage normalize"
    assert finding.message == (f"the normaliser is target_scores.sum() = {raw:.4g} where the reference clamps it to 1 "
                               f"(case default)")
    assert finding.evidence == {"case": "default", "candidate": pytest.approx(raw), "reference": 1.0}
    zero = torch.zeros(2, 4, 3)
    ev = evidence(stage("normalize", {"target_scores_sum": torch.tensor(0.0)}, {"target_scores_sum": torch.tensor(1.0)},
                        inputs={"target_scores": zero}))
    assert dl.check_normaliser(ev)[0].message.endswith("; with no boxes it is 0 and every term divides by zero")
    ev = evidence(stage("normalize", {"target_scores_sum": torch.tensor(1.0)}, {"target_scores_sum": torch.tensor(1.0)},
                        inputs={"target_scores": scores}))
    assert dl.check_normaliser(ev) == []
    inferred = evidence(case="no_boxes", cand_loss=torch.tensor([math.nan, math.inf, 0.0]),
                        ref_loss=torch.tensor([0.0, 1.0, 0.0]))
    (finding,) = dl.check_normaliser(inferred)
    assert finding.where == "loss stage normalize (inferred)"
    assert finding.message.startswith("with no boxes the candidate's loss is [nan, inf, 0.0] while the reference's "
                                      "is finite")
    assert dl.check_normaliser(evidence(case="default", cand_loss=torch.tensor([math.nan, 0.0, 0.0]),
                                        ref_loss=torch.tensor([0.0, 1.0, 0.0]))) == []


def test_broadcast_errors_and_outer_products():
    message = "The size of tensor a (8400) must match the size of tensor b (80) at non-singleton dimension 1"
    event = BroadcastEvent("mul", [[2, 8400], [2, 80]], None, "error", message)
    (finding,) = dl.check_broadcast(evidence(stage("classify", broadcasts=[event])))
    assert finding.signature == "shape-broadcast" and finding.where == "loss stage classify"
    assert finding.message == ("mul of (2, 8400) and (2, 80) cannot broadcast (size 8400 met size 80 at dimension 1, "
                               "case default): a per-anchor weight needs unsqueeze(-1) to scale every class of its "
                               "anchor")
    assert finding.evidence == {"case": "default", "op": "mul", "shapes": [[2, 8400], [2, 80]], "result": None}
    (finding,) = dl.check_broadcast(evidence(stage("box", error=message)))
    assert "size 8400 met size 80 at dimension 1" in finding.message
    outer = BroadcastEvent("mul", [[5, 1], [5]], [5, 5], "outer")
    case = CaseEvidence(case="default", batch_size=2, run_broadcasts=[outer], values_passed=False)
    (finding,) = dl.check_broadcast(LossEvidence(cases=[case]))
    assert finding.where == "loss (whole candidate run)"
    assert finding.message == ("mul of (5, 1) with (5,) broadcast to (5, 5) (case default): a per-item vector "
                               "multiplied with itself as an outer product, as when a (n,) weight meets a (n, 1) "
                               "tensor; keep the dimension (keepdim=True)")
    case = CaseEvidence(case="default", batch_size=2, run_broadcasts=[outer], values_passed=True)
    assert dl.check_broadcast(LossEvidence(cases=[case])) == []
    (finding,) = dl.check_broadcast(evidence(stage("box", {"iou": torch.zeros(4, 4)}, {"iou": torch.zeros(4)})))
    assert finding.message == ("box.iou is (4, 4) where the reference is (4,): operands combined only through "
                               "broadcasting (case default)")
    assert dl.check_broadcast(evidence(stage("box", {"iou": torch.zeros(3)}, {"iou": torch.zeros(4)}))) == []


def test_self_outer_and_broadcasts_to():
    assert dl._self_outer(torch.zeros(5, 1), torch.zeros(5))
    assert not dl._self_outer(torch.zeros(5, 1), torch.zeros(7))
    assert not dl._self_outer(torch.zeros(1), torch.zeros(1))
    assert dl._broadcasts_to([4], [4, 4]) and not dl._broadcasts_to([4], [4]) and not dl._broadcasts_to([3], [4])


GAINS = (7.5, 0.5, 1.5)


def loss_vec(box, cls, dfl):
    return torch.tensor([box, cls, dfl], dtype=torch.float64)


def test_gain_swap_names_the_right_gains():
    ref = loss_vec(1.0, 2.0, 3.0)
    cand = loss_vec(1.0 * 0.5 / 7.5, 2.0, 3.0)  # box multiplied by the cls gain
    finding = dl._ratio_finding(cand, ref, GAINS, None, "default", "loss stage gains")
    assert finding.signature == "gain-mismatch"
    assert finding.message == ("the box term is off by exactly 0.5/7.5: it is multiplied by the cls gain (0.5) "
                               "instead of the box gain (7.5) (case default)")
    assert finding.evidence["ratios"] == {"box": pytest.approx(0.5 / 7.5)}
    cand = loss_vec(1.0, 2.0, 3.0 * 7.5 / 1.5)
    assert dl._ratio_finding(cand, ref, GAINS, None, "c", "w").message.startswith(
        "the dfl term is off by exactly 7.5/1.5: it is multiplied by the box gain (7.5) instead of the dfl gain (1.5)")


def test_gain_ratio_matching_is_tight():
    ref = loss_vec(1.0, 2.0, 3.0)
    exact = 0.5 / 7.5
    assert dl._ratio_finding(loss_vec(exact * (1 + 5e-6), 2.0, 3.0), ref, GAINS, None, "c", "w") is not None
    assert dl._ratio_finding(loss_vec(exact * (1 + 1e-3), 2.0, 3.0), ref, GAINS, None, "c", "w") is None
    assert dl._near(1.0 + 9e-6, 1.0) and not dl._near(1.0 + 2e-5, 1.0) and dl._near(-2.0, -2.0)


def test_gain_not_applied_applied_twice_and_batch_size():
    ref = loss_vec(1.0, 2.0, 3.0)
    assert dl._ratio_finding(loss_vec(1 / 7.5, 2.0, 3.0), ref, GAINS, None, "c", "w").message == (
        "the box term is 1/7.5 of the reference: its gain (7.5) is not applied (case c)")
    assert dl._ratio_finding(loss_vec(1.0, 2.0, 3.0 * 1.5), ref, GAINS, None, "c", "w").message == (
        "the dfl term is 1.5x the reference: its gain (1.5) is applied twice (case c)")
    half = dl._ratio_finding(ref / 4, ref, GAINS, 4, "c", "w")
    assert half.message == ("every term is 1/4 of the reference: the loss vector is not multiplied by the batch size "
                            "B = 4 (ultralytics returns loss * B; declare batch_scaled=False if that is your "
                            "convention) (case c)")
    assert dl._ratio_finding(ref * 4, ref, GAINS, 4, "c", "w").message == (
        "every term is 4x the reference: multiplied by the batch size twice (case c)")
    assert dl._ratio_finding(loss_vec(1.0, 2.0 / 4, 3.0), ref, None, 4, "c", "w").message == (
        "the cls term is 1/4 of the reference: not multiplied by the batch size (case c)")
    assert dl._ratio_finding(loss_vec(1.0, 2.0 * 4, 3.0), ref, None, 4, "c", "w").message == (
        "the cls term is 4x the reference: multiplied by the batch size twice (case c)")
    assert dl._ratio_finding(ref.clone(), ref, GAINS, 4, "c", "w") is None
    assert dl._ratio_finding(loss_vec(1.3, 2.0, 3.0), ref, GAINS, 4, "c", "w") is None
    assert dl._ratio_finding(torch.ones(2), torch.ones(2), GAINS, 4, "c", "w") is None
    assert dl._ratio_finding(loss_vec(5.0, 2.0, 3.0), loss_vec(0.0, 2.0, 3.0), GAINS, 4, "c", "w") is None


def test_check_gains_reads_gain_and_output_stages():
    ref = loss_vec(1.0, 2.0, 3.0)
    ev = evidence(stage("gains", {"after": loss_vec(1.0, 2.0 * 7.5 / 0.5, 3.0)}, {"after": ref}))
    (finding,) = dl.check_gains(ev)
    assert finding.signature == "gain-mismatch" and finding.message.endswith("(case default)")
    assert finding.evidence["case"] == "default" and finding.evidence["ratios"] == {"cls": pytest.approx(15.0)}
    assert finding.where == "loss stage gains" and "multiplied by the box gain (7.5) instead of the cls gain (0.5)" \
        in finding.message
    ev = evidence(stage("output", {"loss": ref / 2}, {"loss": ref}), batch=2)
    (finding,) = dl.check_gains(ev)
    assert finding.where == "loss stage output" and finding.message.startswith("every term is 1/2 of the reference")
    ev = evidence(cand_loss=ref * 2, ref_loss=ref, batch=2)
    (finding,) = dl.check_gains(ev)
    assert finding.where == "loss stage gains/output (end-to-end)"


def test_nan_source_names_the_first_stage_and_tensor():
    bad = torch.ones(4)
    bad[:2] = math.nan
    inf = torch.ones(4)
    inf[0] = math.inf
    ev = evidence(stage("box", {"iou": bad}, {"iou": torch.ones(4)}), stage("assign", {"align": inf}, {}))
    (finding,) = dl.check_nan_source(ev)
    assert finding.signature == "nan-source" and finding.where == "loss stage assign"
    assert finding.message == ("Inf first appears at stage assign in align (1 of 4 elements, case default) where the "
                               "reference is finite")
    assert finding.evidence == {"case": "default", "stage": "assign", "tensor": "align", "count": 1}
    (finding,) = dl.check_nan_source(evidence(stage("box", {"iou": bad}, {"iou": torch.ones(4)})))
    assert finding.message.startswith("NaN first appears at stage box in iou (2 of 4 elements")
    mixed = bad.clone()
    mixed[3] = math.inf
    assert dl.check_nan_source(evidence(stage("box", {"iou": mixed}, {})))[0].message.startswith("NaN/Inf first")
    assert dl.check_nan_source(evidence(stage("box", {"iou": bad}, {"iou": bad.clone()}))) == []
    run = CaseEvidence(case="default", batch_size=2,
                       run={"one2one": stage("end-to-end", {"box.iou": bad, "assign.x": torch.ones(2)}, {})})
    (finding,) = dl.check_nan_source(LossEvidence(cases=[run]))
    assert finding.where == "loss stage box (one2one branch)" and " in iou (" in finding.message
    blind = evidence(cand_loss=torch.tensor([math.nan, 0.0, 0.0]), ref_loss=torch.tensor([1.0, 1.0, 1.0]))
    (finding,) = dl.check_nan_source(blind)
    assert finding.where == "loss output" and "exposes no intermediate that locates the first NaN/Inf" in finding.message
    assert dl.check_nan_source(evidence(stage("box", {"n": torch.tensor([1, 2])}, {}))) == []


def test_diagnose_loss_orders_findings_by_stage():
    bad = torch.ones(3)
    bad[0] = math.nan
    ev = evidence(stage("box", {"iou": bad}, {}), stage("assign", carries_grad=["t"]))
    report = new_report()
    found = dl.diagnose_loss(ev, report)
    assert [f.signature for f in found] == ["no-detach", "nan-source"]
    assert report.findings == found
    assert dl._stage_rank("loss stage normalize (one2many branch)") == dl.STAGE_ORDER.index("normalize")
    assert dl._stage_rank("somewhere else") == len(dl.STAGE_ORDER)
    assert dl._close(torch.ones(2), torch.ones(2) + 1e-7, LOSS_TOL)
    assert not dl._close(torch.ones(2), torch.ones(3), LOSS_TOL)
    assert not dl._close(torch.tensor([math.nan]), torch.tensor([1.0]), LOSS_TOL)
    assert not dl._close(torch.ones(2), torch.ones(2) + 1e-3, LOSS_TOL)
    assert dl._close(torch.ones(2), torch.ones(2), None) and not dl._close(torch.ones(1), torch.ones(1) + 1e-6, None)


def test_broadcast_watch_records_self_outer_products_and_failures_only():
    with dl.BroadcastWatch() as watch:
        square = torch.ones(5, 1) * torch.ones(5)
        pairs = torch.ones(3, 1) - torch.ones(7)  # pairwise: different sizes, not recorded
        same = torch.ones(4) + torch.ones(4)
        with pytest.raises(RuntimeError):
            torch.ones(2, 8400) * torch.ones(2, 80)
    assert square.shape == (5, 5) and pairs.shape == (3, 7) and same.shape == (4,)
    outer, error = watch.events
    assert (outer.op, outer.shapes, outer.result, outer.kind) == ("mul", [[5, 1], [5]], [5, 5], "outer")
    assert outer.describe() == "mul of (5, 1) with (5,) broadcast to (5, 5)"
    assert (error.op, error.shapes, error.result, error.kind) == ("mul", [[2, 8400], [2, 80]], None, "error")
    assert "must match the size of tensor b (80)" in error.message
    assert error.describe() == "mul of (2, 8400) with (2, 80) failed to broadcast"
    with dl.BroadcastWatch() as quiet:
        torch.ones(5, 1).sum() + torch.ones(5)
        torch.matmul(torch.ones(5, 1), torch.ones(1, 5))
    assert quiet.events == []


class StrictCandidate(FakeCandidate):
    """Hands out its biases only for the reference it was made for."""

    def __init__(self, fresh, reference):
        super().__init__(fresh)
        self.reference = reference

    def fresh_head_biases(self, reference):
        assert reference is self.reference
        return self._fresh


def test_diagnose_bias_init_rows_carry_metrics_and_the_bitwise_tolerance(v8):
    fresh = {level: {"cls": biases(v8, level)[0].clone(),
                     "box": v8.get(names.init_bias("box_bias", level, "stored")).clone()} for level in (0, 2)}
    report = new_report()
    ds.diagnose_bias_init(v8, StrictCandidate(fresh, v8), report)
    assert [r.name for r in report.rows] == ["init.cls_bias.0.stored", "init.box_bias.0.stored",
                                             "init.cls_bias.2.stored", "init.box_bias.2.stored"]
    assert {r.section for r in report.rows} == {"bias init"}  # judged apart from the layers (issue 11)
    for row in report.rows:
        assert row.tolerance == BITWISE.as_dict() and row.metrics["exact"] is True and row.metrics["passed"] is True
    assert report.findings == [] and "bias_init_note" not in report.context  # stored != float32 at nc=12


def test_diagnose_bias_init_note_when_the_arithmetics_agree_but_a_level_is_wrong(y11):
    fresh = {level: {"cls": biases(y11, level)[0].clone()} for level in range(3)}
    fresh[1]["cls"] = torch.zeros_like(fresh[1]["cls"])
    report = new_report()
    ds.diagnose_bias_init(y11, FakeCandidate(fresh), report)
    assert [f.signature for f in report.findings] == ["bias-init-skipped"]
    assert report.context["bias_init_note"] == ("at nc=80 the three arithmetics agree, so float32/float64 cannot be "
                                                "told apart here")
    row = report.rows[1]
    assert not row.passed and row.note == "not applied (default conv init)" and row.metrics["mismatched"] == 80


def test_diagnose_bias_init_box_evidence_keeps_eight_values_and_skips_box_when_cls_is_skipped(v8):
    box = v8.get(names.init_bias("box_bias", 0, "stored"))
    fresh = {0: {"cls": biases(v8, 0)[0].clone(), "box": torch.ones_like(box)},
             1: {"cls": torch.zeros_like(biases(v8, 1)[0]), "box": torch.ones_like(box)}}
    report = new_report()
    ds.diagnose_bias_init(v8, FakeCandidate(fresh), report)
    box_findings = [f for f in report.findings if f.signature == "bias-init-box"]
    assert len(box_findings) == 1 and box_findings[0].where == "layer 22, box bias init, stride 8"
    assert box_findings[0].evidence["candidate"] == [1.0] * 8 and box.numel() > 8
    assert [r.name for r in report.rows] == ["init.cls_bias.0.stored", "init.box_bias.0.stored",
                                             "init.cls_bias.1.stored"]
    assert report.rows[1].note == "1 everywhere" and not report.rows[1].passed


def test_diagnose_bias_init_without_init_tensors_says_so(tmp_path):
    from parity.dump.files import DumpWriter

    with DumpWriter(tmp_path / "d", kind="reference") as writer:
        writer.add("act.0", torch.zeros(2))
        path = writer.commit({"model": {"strides": [8.0, 16.0, 32.0], "head_index": 23, "nc": 80}})
    report = new_report()
    ds.diagnose_bias_init(Dump(path), FakeCandidate({0: {"cls": torch.zeros(80)}}), report)
    assert report.coverage == {"not_checked": ["Detect bias init (the reference has no init.* tensors)"]}
    assert report.rows == []


@pytest.mark.parametrize("mode, kwargs", [("nearest-exact", {}), ("bilinear (align_corners=True)",
                                                                  {"mode": "bilinear", "align_corners": True}),
                                          ("bicubic (align_corners=False)", {"mode": "bicubic", "align_corners": False})])
def test_upsample_names_each_interpolation(mode, kwargs):
    x = torch.arange(36.0).reshape(1, 1, 6, 6) ** 1.5
    nearest = torch.nn.functional.interpolate(x, size=(12, 12), mode="nearest")
    if mode == "nearest-exact":
        x = torch.arange(25.0).reshape(1, 1, 5, 5) ** 1.5
        nearest = torch.nn.functional.interpolate(x, size=(7, 7), mode="nearest")
        cand = torch.nn.functional.interpolate(x, size=(7, 7), mode="nearest-exact")
    else:
        cand = torch.nn.functional.interpolate(x, size=(12, 12), **kwargs)
    finding = ds.diagnose_upsample(4, [x], cand, nearest, Tolerance(1e-5, 1e-5))
    assert finding is not None and finding.evidence["candidate_mode"] == mode
    assert f"the candidate's output is {mode} interpolation" in finding.message
    assert ds.diagnose_upsample(4, [x], cand + 0.5, nearest, Tolerance(1e-5, 1e-5)) is None
    assert ds.diagnose_upsample(4, [x[0]], cand, nearest, BITWISE) is None


def test_affine_hint_edges():
    four = torch.tensor([1.0, 2.0, 4.0, 8.0])
    assert ds.affine_hint(four, four * 3) == "the candidate is 3 x reference +0 everywhere (a global scale/offset error)"
    assert ds.affine_hint(four[:3], four[:3] * 3) == ""
    assert ds.affine_hint(torch.arange(4), torch.arange(4) * 2) == ""
    assert ds.affine_hint(four, four + 1e-9) == ""
    assert ds.affine_hint(four, four + 0.25).endswith("+0.25 everywhere (a global scale/offset error)")
    flat = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    scaled = flat * torch.tensor([1.0, 2.0, 3.0]).view(3, 1)  # rows scaled: dim 1 is not the channel here
    assert ds.affine_hint(flat.T.contiguous(), scaled.T.contiguous()).startswith("each channel of the candidate")
    assert ds.affine_hint(flat.flatten(), scaled.flatten()) == ""
