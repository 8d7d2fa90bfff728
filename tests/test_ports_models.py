"""Clean-room PyTorch ports in real ports' styles (tests/ports/models/), each compared with a bare factory and no
adapter: the faithful ones get PARITY for their layers, the planted ones are named at the right layer with the
right evidence."""

from __future__ import annotations

import functools
import sys
import textwrap

import pytest
import torch

from parity.replay.candidates import load_candidate
from parity.dump.files import Dump
from parity.errors import ParityError
from parity.replay.mapping import KeyMapping
from parity.diagnose.layers import compare_layers
from parity.runtime import PROJECT_ROOT

V8 = PROJECT_ROOT / "fixtures" / "yolov8-narrow-nc12-96"
HEAD = 22


@functools.lru_cache(maxsize=None)
def report_for(port: str, layer: int | None = None):
    return compare_layers(Dump(V8), f"tests.ports.models.{port}:build", layer=layer, progress=False)


def found(report, signature):
    return [f for f in report.findings if f.signature == signature]


def errors(report):
    return [(f.signature, f.where) for f in report.findings if f.severity == "error"]


# ------------------------------------------------------------------------------------------- faithful
@pytest.mark.parametrize("port", ["student_v8", "split_v8", "flat_v8"])
def test_faithful_port_gets_layer_parity_with_a_bare_factory(port):
    report = report_for(port)
    assert report.context["candidate"]["kind"] == "traced"
    assert report.context["verdicts"]["layers"] == "parity", errors(report)
    assert report.context["first_divergent_layer"] == {"isolated": None, "chained": None}
    for mode in ("isolated", "chained"):
        # every layer is compared, the functional Upsample/Concat ones too; a port without a DFL module has
        # no DFL output of its own
        assert set(report.coverage[mode]["left_out"]) <= {f"act.{HEAD}.dfl"}, report.coverage[mode]
    params = [r for r in report.rows if r.name == "parameters"]
    assert len(params) == 23 and all(r.passed for r in params), [r.note for r in params if not r.passed]
    assert not found(report, "param-count-mismatch") and not found(report, "layer-not-inferred")


def test_student_port_hand_silu_rounds_inside_tolerance_and_its_missing_bias_init_is_reported_apart():
    report = report_for("student_v8")
    numeric = [r for r in report.rows if r.section in ("isolated", "chained")]
    conv_rows = [r for r in numeric if r.name in ("act.0", "act.1", "act.3")]
    assert conv_rows and not all(r.metrics["exact"] for r in conv_rows)     # x * sigmoid(x) rounds differently
    assert all(r.passed for r in numeric)
    skipped = found(report, "bias-init-skipped")
    assert sorted(f.evidence["stride"] for f in skipped) == [8.0, 16.0, 32.0]
    assert all("not applied (default conv init" in f.message for f in skipped)
    assert report.context["verdicts"] == {"layers": "parity", "bias_init": "divergence"}
    assert report.first_divergence().section == "bias init"
    # the frozen DFL conv the port leaves out is no parameter error
    head_params = next(r for r in report.rows if r.name == "parameters" and r.where == f"layer {HEAD}")
    assert head_params.passed and "dfl.conv.weight, not trainable" in head_params.note


def test_split_cv1_port_is_bitwise_where_threads_agree_and_says_how_equal_shapes_were_matched():
    report = report_for("split_v8")
    assert report.verdict == "parity", errors(report)
    assert report.context["verdicts"] == {"layers": "parity", "bias_init": "parity"}
    ambiguous = {f.evidence["layer"]: f for f in found(report, "mapping-ambiguous")}
    assert set(ambiguous) == {18, 21}          # C2f cv1 and cv2 have one shape there
    assert "cv1 and cv2 (32, 48, 1, 1)" in ambiguous[18].message
    assert "isolated replay confirms" in ambiguous[18].message and ambiguous[18].severity == "info"
    assert report.coverage["isolated"]["left_out"] == []      # its DFL module is found and run
    mapping = report.context["candidate"]["mapping"]
    assert mapping.get("split") == 48          # 8 C2f blocks x 6 tensors of cv1, written as two convs


def test_an_ambiguous_layer_mapped_wrongly_is_put_right_by_isolated_replay():
    reference = Dump(V8)
    candidate = load_candidate("tests.ports.models.split_v8:build", reference)
    candidate.prepare(reference)
    mapping = candidate.mapping
    right = {k: e for k, e in mapping.ref_to_cand.items() if k.startswith("model.18.")}
    # the shape-only match: cv1 takes the merge conv, cv2 the two halves
    wrong = mapping.alternatives[18][0]
    assert wrong["model.18.cv1.conv.weight"].cand_keys == ["c2f_n4.merge.conv.weight"]
    mapping.alternatives[18] = [right]
    mapping.ref_to_cand.update(wrong)
    KeyMapping(mapping.ref_shapes, mapping.cand_shapes, dict(wrong), [], [], lambda _k: True, [], {}) \
        .load_reference_into(candidate.module, {k: reference.get(k) for k in wrong})
    findings = candidate._resolve_ambiguities(reference)
    kept = [f for f in findings if f.evidence.get("layer") == 18]
    assert kept and kept[0].evidence["resolved"] and "only #2 reproduces the reference" in kept[0].message
    assert mapping.ref_to_cand["model.18.cv1.conv.weight"].cand_keys == ["c2f_n4.left.conv.weight",
                                                                         "c2f_n4.right.conv.weight"]


# -------------------------------------------------------------------------------------------- planted
def test_bilinear_upsample_in_the_neck_forward_is_named_at_its_layer():
    report = report_for("bilinear_v8")
    assert report.context["first_divergent_layer"] == {"isolated": 10, "chained": 10}
    mode = found(report, "upsample-mode")
    assert mode and mode[0].where == "layer 10" and mode[0].evidence["candidate_mode"].startswith("bilinear")
    assert "ultralytics uses nearest" in mode[0].message
    assert not found(report, "chained-drift") and not found(report, "param-count-mismatch")


def test_a_feature_scaled_before_the_concat_is_named_with_the_operation_and_its_line():
    report = report_for("scaled_v8")
    assert report.context["first_divergent_layer"] == {"isolated": 11, "chained": 11}
    divergence = found(report, "layer-divergence")[0]
    assert divergence.where == "layer 11" and divergence.evidence["mode"] == "isolated"
    assert "through mul at tests/ports/models/scaled_v8.py:" in divergence.message
    assert "channels 64\u201395 of the candidate are 0.01 x the reference's" in divergence.message
    assert not found(report, "chained-drift")


def test_a_residual_shortcut_flipped_in_the_neck_is_localised_to_its_layer():
    report = report_for("shortcut_v8")
    assert report.context["first_divergent_layer"] == {"isolated": 12, "chained": 12}
    divergence = found(report, "layer-divergence")[0]
    assert divergence.where == "layer 12" and "fed the reference's own inputs" in divergence.message
    assert "the first sub-block that differs is m.0" in divergence.message     # the residual unit
    assert not found(report, "param-count-mismatch")       # a shortcut has no parameters


def test_the_head_wired_to_the_wrong_p4_is_named_by_source():
    report = report_for("wrong_p4_v8")
    assert report.context["first_divergent_layer"] == {"isolated": None, "chained": HEAD}
    wiring = found(report, "layer-wiring")
    assert wiring and wiring[0].where == f"layer {HEAD}"
    assert "the head's P4 input is layer 12's output, ultralytics uses layer 18's" in wiring[0].message


def test_an_extra_bottleneck_is_named_with_the_shapes_that_differ():
    report = report_for("extra_block_v8")
    unmapped = found(report, "weight-unmapped")
    assert [f.where for f in unmapped] == ["layer 12"]
    assert "layer 12: 2 extra Bottlenecks m.1, m.2; cv2 (32, 80, 1, 1) vs (32, 48, 1, 1)" in unmapped[0].message
    counts = found(report, "param-count-mismatch")
    assert [f.evidence["layer"] for f in counts] == [12] and "2 extra Bottlenecks" in counts[0].message
    assert report.context["first_divergent_layer"]["isolated"] == 12


def test_a_jump_across_layers_the_candidate_does_not_expose_is_put_there():
    report = report_for("prealloc_v8")
    assert {f.evidence["layer"] for f in found(report, "layer-not-inferred")} >= {10, 11}
    assert all("Fix:" in f.message for f in found(report, "layer-not-inferred"))
    assert report.context["first_divergent_layer"] == {"isolated": None, "chained": 12}
    divergence = found(report, "layer-divergence")[0]
    assert divergence.where == "layer 12"
    assert "made in layers 10\u201311, which were not compared" in divergence.message
    assert divergence.evidence["not_compared"] == [10, 11]
    assert "jumps from" in divergence.message and not found(report, "chained-drift")


# -------------------------------------------------------------------------------- errors and entries
BROKEN = '''
import torch
from tests.ports.models import student_v8


class Flaky(student_v8.CSPLayer):
    calls = 0

    def forward(self, x):
        Flaky.calls += 1
        if Flaky.calls > 1:
            raise RuntimeError("flaky block")
        return super().forward(x)


def build(nc=12):
    model = student_v8.Detector(nc)
    model.neck.td_p4 = Flaky(96, 32, 1, residual=False)
    return model


def crash(nc=12):
    model = student_v8.Detector(nc)
    model.neck.forward = lambda *a: (_ for _ in ()).throw(ValueError("no neck today"))
    return model
'''


@pytest.fixture
def broken_port(tmp_path, monkeypatch):
    (tmp_path / "broken_port.py").write_text(textwrap.dedent(BROKEN))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(PROJECT_ROOT)
    yield
    sys.modules.pop("broken_port", None)


def test_a_candidate_exception_names_its_layer_and_its_own_line(broken_port):
    report = compare_layers(Dump(V8), "broken_port:build", progress=False)
    errors_ = found(report, "candidate-error")
    assert errors_ and {f.where for f in errors_} == {"layer 12"}
    assert all("broken_port.py:" in f.message and "flaky block" in f.message for f in errors_)
    with pytest.raises(ParityError, match=r"in module neck.*broken_port\.py:\d+.*no neck today"):
        load_candidate("broken_port:crash", Dump(V8)).prepare(Dump(V8))


def test_unused_key_map_and_layer_map_entries_are_errors_that_name_them(tmp_path):
    reference = Dump(V8)
    bad_key = tmp_path / "keys.yaml"
    bad_key.write_text("key_map:\n  '^nothing_like_this\\.': 'model.3.'\n")
    with pytest.raises(ParityError, match=r"key_map entry '\^nothing_like_this\\\\.'"):
        load_candidate("tests.ports.models.flat_v8:build", reference, map_file=str(bad_key)).prepare(reference)
    bad_layer = tmp_path / "layers.yaml"
    bad_layer.write_text("layer_map:\n  head.box: 7\n  b0: 99\n")
    with pytest.raises(ParityError, match=r"layer_map entry 'b0\.': 99"):
        load_candidate("tests.ports.models.flat_v8:build", reference, map_file=str(bad_layer)).prepare(reference)


def test_a_mapped_module_that_never_runs_is_a_finding_with_the_fix(tmp_path):
    import copy

    from parity.replay.candidates import module_candidate

    model = __import__("tests.ports.models.flat_v8", fromlist=["build"]).build(12)
    model.old_n16 = copy.deepcopy(model.n16)       # an earlier version of the block, left in, never called
    del model.n16
    model.n16 = copy.deepcopy(model.old_n16)
    reference = Dump(V8)
    candidate = module_candidate(model, label="port with a leftover block", layer_map={"old_n16.": 16})
    findings = candidate.prepare(reference)
    idle = [f for f in findings if f.signature == "module-not-run"]
    assert idle and idle[0].evidence["module"] == "old_n16" and idle[0].where == "layer 16"
    assert "never runs it" in idle[0].message and "Fix: call it in forward" in idle[0].message
