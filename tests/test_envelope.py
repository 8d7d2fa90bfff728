"""Noise envelopes (`parity envelope`, `parity.compare.envelope.judge`, `load_envelope`) and the committed envelopes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from parity.compare import envelope as env
from parity.cli.main import main
from parity.compare.metrics import compare_tensors
from parity.errors import ParityError

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--model", "fixtures/models/yolo11-narrow.yaml", "--imgsz", "64"]


# --------------------------------------------------------------------------------------------- naming
@pytest.mark.parametrize("name, group, kind", [
    ("act.4", "act.4", "act"),
    ("act.23.cv2.0.2", "act.23", "act"),
    ("act.9.m#2", "act.9", "act"),
    ("model.23.cv2.0.2.bias", "model.23", "model"),
    ("loss.default.assign.fg_mask", "loss.default.assign", "loss"),
    ("loss.small_box.one2one.assign.fg_mask", "loss.small_box.one2one.assign", "loss"),
    ("loss.default.output.loss", "loss.default.output", "loss"),
    ("grad.param.model.2.cv1.conv.weight", "grad.param.2", "grad.param"),
    ("grad.head.default.cls.scores", "grad.head.default.cls", "grad.head"),
    ("init.cls_bias.0.stored", "init", "init"),
    ("batch.img", "batch", "batch"),
])
def test_groups(name, group, kind):
    assert env.group_of(name) == group and env.kind_of(name) == kind


@pytest.mark.parametrize("given, pair", [
    ("cpu", "cpu-cpu"), ("cpu-cpu", "cpu-cpu"), (("cuda:0", "cpu"), "cpu-cuda"), ("cuda/cpu", "cpu-cuda"),
    ("cuda:1", "cuda-cuda"), (["cuda", "cuda:0"], "cuda-cuda"),
])
def test_device_pairs(given, pair):
    assert env.device_pair(given) == pair


def test_bad_pairs_and_precisions():
    with pytest.raises(ParityError):
        env.device_pair("tpu")
    with pytest.raises(ParityError):
        env.pair_key("cpu", "fp8")


def test_plan_without_and_with_cuda():
    plan = env.make_plan((1, 2, 4), cuda=None, cuda_reason="no GPU here")
    assert [c.variant for c in plan.comparisons] == ["cpu-fp32-t1", "cpu-fp32-t4", "cpu-fp64"]
    assert {c.pair for c in plan.comparisons} == {"cpu-cpu/fp32"}
    assert {s["run"] for s in plan.skipped} == {"cuda-fp32", "cuda-fp32-nondet", "cuda-tf32"}
    assert all(s["reason"] == "no GPU here" for s in plan.skipped)
    plan = env.make_plan((2,), cuda="cuda:0")
    assert {c.pair for c in plan.comparisons} == {"cpu-cpu/fp32", "cpu-cuda/fp32", "cuda-cuda/fp32",
                                                  "cpu-cuda/tf32", "cuda-cuda/tf32"}
    assert plan.runs["cuda-tf32"].precision == "tf32" and not plan.runs["cuda-fp32-nondet"].deterministic
    assert not plan.skipped
    with pytest.raises(ParityError):
        env.make_plan((0, 2))


def test_cuda_status_reason_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    usable, reason = env.cuda_status()
    assert not usable and "is_available() is False" in reason or "CPU-only" in reason


# ------------------------------------------------------------------------------------ judge (synthetic)
def _document() -> dict:
    return {
        "schema": env.SCHEMA, "schema_version": env.SCHEMA_VERSION, "name": "synthetic",
        "config": {"model": "fixtures/models/yolo11-narrow.yaml", "imgsz": 64},
        "runs": {"cpu-fp32-t2": {"versions": {"ultralytics": "8.4.190", "torch": "2.14.1"}}},
        "pairs": {"cpu-cpu/fp32": {
            "comparisons": [{"base": "cpu-fp32-t2", "variant": "cpu-fp32-t1", "change": "torch threads 2 -> 1"}],
            "kinds": {"act": {"max_abs": 1e-4, "scaled": 1e-5}},
            "groups": {"act.4": {"max_abs": 1e-5, "scaled": 1e-6, "worst": "act.4"},
                       "init": {"max_abs": 0.0, "scaled": 0.0},
                       "loss.default.assign": {"max_abs": 1e-6, "scaled": 1e-7, "mismatched_fraction": 0.01}},
            "tensors": {"act.4": [1e-5, 10.0, 20], "loss.default.assign.fg_mask": [0.01]},
        }},
    }


def test_judge_against_tensor_group_and_kind_levels():
    envelope = env.Envelope(_document(), "cpu-cpu/fp32")
    ref = torch.linspace(-10, 10, 101)
    # tensor level: max|d| 3e-5 against the envelope's 1e-5 -> factor 3
    assert env.judge(envelope, "act.4", compare_tensors(ref, ref + 3e-5)) == pytest.approx(3.0, rel=1e-2)
    detail = env.judge_detail(envelope, "act.4", compare_tensors(ref, ref + 3e-5).as_dict())
    assert detail["basis"] == "tensor" and detail["factor"] == pytest.approx(3.0, rel=1e-2)
    # a sub-module of layer 4: the group level; the smaller of abs (2e-6/1e-5) and scaled factors
    detail = env.judge_detail(envelope, "act.4.cv1", compare_tensors(ref, ref + 2e-6))
    assert detail["basis"] == "group" and detail["factor"] <= 1.0
    # a layer with no group: the kind level
    assert env.judge_detail(envelope, "act.9", compare_tensors(ref, ref + 1e-3))["basis"] == "kind"
    assert env.judge(envelope, "act.9", compare_tensors(ref, ref + 1e-3)) > 1.0
    # bitwise-stable group: any difference is an infinite factor, none is 0
    bias = torch.full((3,), -4.5)
    assert env.judge(envelope, "init.cls_bias.0.stored", compare_tensors(bias, bias)) == 0.0
    assert math.isinf(env.judge(envelope, "init.cls_bias.0.stored", compare_tensors(bias, bias.nextafter(bias + 1))))
    # bool tensors: fractions of differing elements
    mask = torch.zeros(100, dtype=torch.bool)
    flipped = mask.clone()
    flipped[:5] = True
    assert env.judge(envelope, "loss.default.assign.fg_mask", compare_tensors(mask, flipped)) == pytest.approx(5.0)
    with pytest.raises(ParityError):
        env.judge(envelope, "grad.param.model.0.conv.weight", compare_tensors(ref, ref))


def test_load_envelope_selection_and_errors(tmp_path):
    a, b = _document(), _document()
    b["config"] = {"model": "yolo11n.yaml", "imgsz": 640}
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    assert env.load_envelope("cpu", "fp32", model="yolo11n.yaml", imgsz=640, directory=tmp_path).path.name == "b.json"
    assert env.load_envelope(("cpu", "cpu"), "fp32", model="yolo11-narrow.yaml", imgsz=64,
                             directory=tmp_path).path.name == "a.json"
    with pytest.raises(ParityError, match="CUDA envelopes are measured on a machine with a GPU"):
        env.load_envelope(("cpu", "cuda:0"), "fp32", directory=tmp_path)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ParityError, match="not a noise envelope"):
        env.load_envelope("cpu", "fp32", directory=tmp_path)


# --------------------------------------------------------------------------------- a real measurement
@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    out = tmp_path_factory.mktemp("envelope") / "small.json"
    code = main(["--no-progress", "envelope", *SMALL, "--device", "cpu", "--threads-list", "1", "2",
                 "--out", str(out)])
    assert code == 0
    return out


@pytest.mark.slow
def test_measured_envelope_document(measured):
    document = json.loads(measured.read_text())
    assert document["schema"] == env.SCHEMA and list(document["pairs"]) == ["cpu-cpu/fp32"]
    assert set(document["runs"]) == {"cpu-fp32-t2", "cpu-fp32-t1", "cpu-fp64"}
    for run in document["runs"].values():
        assert run["versions"]["ultralytics"] and run["environment"]["threads"] == run["threads"]
        assert run["config"]["imgsz"] == 64
    assert {s["run"] for s in document["skipped"]} == {"cuda-fp32", "cuda-fp32-nondet", "cuda-tf32"}
    entry = document["pairs"]["cpu-cpu/fp32"]
    # per layer, per loss stage, per gradient group
    assert {"act.0", "act.23", "loss.default.assign", "loss.small_box.box", "grad.param.0",
            "grad.head.default.cls"} <= set(entry["groups"])
    # weights as built and the Detect bias init never change; computed tensors always do in float64
    assert entry["kinds"]["init"]["max_abs"] == 0 and entry["kinds"]["batch"]["max_abs"] == 0
    assert entry["groups"]["act.0"]["max_abs"] > 0 and entry["groups"]["act.0"]["scaled"] < 1e-5
    assert set(entry["by_change"]) == {"cpu-fp32-t2~cpu-fp32-t1", "cpu-fp32-t2~cpu-fp64"}
    assert measured.stat().st_size < 200_000


@pytest.mark.slow
def test_envelope_judges_its_own_runs_within_and_a_bug_outside(measured):
    """Re-capturing at 1 thread stays within the envelope (factor <= 1); a layer scaled by 1.001 does not."""
    from parity.capture import CaptureConfig
    from parity.compare.envelope import capture_run, RunSpec

    envelope = env.load_envelope("cpu", "fp32", path=measured)
    config = CaptureConfig(model="fixtures/models/yolo11-narrow.yaml", imgsz=64, gradients=False,
                           cases=("default",))
    base = capture_run(RunSpec("t2"), config).tensors
    again = capture_run(RunSpec("t1", threads=1), config).tensors
    for name in ("act.0", "act.10", "act.23.boxes", "loss.default.output.loss", "loss.default.classify.bce"):
        assert env.judge(envelope, name, compare_tensors(base[name], again[name])) <= 1.0, name
    assert env.judge(envelope, "act.10", compare_tensors(base["act.10"], base["act.10"] * 1.001)) > 10


@pytest.mark.slow
def test_envelope_show_and_bad_device(measured, capsys):
    assert main(["--no-progress", "envelope", "--show", str(measured)]) == 0
    assert "cpu-cpu/fp32" in capsys.readouterr().out
    if not torch.cuda.is_available():
        assert main(["--no-progress", "envelope", *SMALL, "--device", "cuda", "--out", str(measured.parent / "x.json")]) == 2
        assert "CUDA is not available" in " ".join(capsys.readouterr().err.split())
        assert not (measured.parent / "x.json").exists()
    assert main(["--no-progress", "envelope", *SMALL, "--device", "cpu", "--out", str(measured)]) == 2  # exists


# --------------------------------------------------------------------------------- committed envelopes
COMMITTED = sorted((ROOT / "envelopes").glob("*.json"))


@pytest.mark.parametrize("path", COMMITTED, ids=[p.name for p in COMMITTED])
def test_committed_envelopes_are_valid(path):
    document = env.read_envelope_file(path)
    assert "cpu-cpu/fp32" in document["pairs"] and document["runs"]
    assert path.stat().st_size < 200_000
    for key in document["pairs"]:
        citation = env.Envelope(document, key, path).citation()
        assert citation.startswith(f"envelope envelopes/{path.name}#{key}")


def test_shipped_cpu_envelope_loads_for_the_default_model():
    envelope = env.load_envelope("cpu", "fp32", model="yolo11n.yaml", imgsz=640)
    assert envelope.config["model"] == "yolo11n.yaml" and envelope.config["imgsz"] == 640
    assert envelope.covers("act.23.boxes") and envelope.covers("grad.param.model.0.conv.weight")


def test_shipped_fixture_envelope_judges_the_fixture_against_itself(fixtures_dir):
    from parity.dump.files import Dump

    envelope = env.load_envelope("cpu", "fp32", model="yolo11-narrow.yaml", imgsz=96)
    dump = Dump(fixtures_dir / "yolo11-narrow-nc80-96")
    for name in ("act.10", "loss.default.output.loss", "grad.param.model.23.cv3.0.2.bias"):
        tensor = dump.get(name)
        assert env.judge(envelope, name, compare_tensors(tensor, tensor)) == 0.0


@pytest.mark.parametrize("model, imgsz", [("yolo11n.yaml", 640), ("yolo11-narrow.yaml", 96)])
def test_cpu_profile_accepts_the_cpu_envelope(model, imgsz):
    """The `cpu-fp32` profile (chained tolerances) passes every computed float tensor's harmless noise. What it
    rejects: BatchNorm running statistics (the reference computes them in a calibration forward whose rounding
    depends on the thread count; weights are compared bitwise because a candidate copies them), and, at 640,
    `mask_in_gts` of anchors lying on a box edge, which flip in the float64 shadow (bool tensors are exact)."""
    from parity.compare.tolerances import get_profile

    envelope = env.load_envelope("cpu", "fp32", model=model, imgsz=imgsz)
    problems = env.check_profile(get_profile("cpu-fp32"), envelope)
    for problem in problems:
        running_stat = problem.startswith("model.") and ("running_mean" in problem or "running_var" in problem)
        edge_flip = ".assign.mask_in_gts has" in problem and "bool/int tensors are compared exactly" in problem
        assert running_stat or edge_flip, problem


def test_check_profile_flags_a_too_tight_profile():
    from parity.compare.tolerances import BITWISE, Profile

    envelope = env.load_envelope("cpu", "fp32", model="yolo11-narrow.yaml", imgsz=96)
    bitwise = Profile("bitwise", "everything bitwise", False,
                      {k: BITWISE for k in ("activation", "weight", "init", "input", "loss", "grad")})
    problems = env.check_profile(bitwise, envelope)
    assert any(p.startswith("act.") for p in problems) and any(p.startswith("grad.param.") for p in problems)
