"""Training-step parity: the capture of ultralytics' trainer, the built-in's clean-room step compared with it,
and every planted training error named at the right step (docs/training.md)."""

import json
import math

import pytest
import torch

from parity.capture import CaptureConfig, dump_reference
from parity.capture.reference import _config_section
from parity.capture.train import TrainArgs
from parity.cli.main import main
from parity.compare.tolerances import get_profile
from parity.diagnose.train import compare_training
from parity.dump.files import Dump
from parity.errors import ParityError
from parity.replay.train import DumpSteps, candidate_steps, write_train_dump
from parity.cli.train import overfit_curves, render_train

from tests.ports.train import planted

MODEL = "fixtures/models/yolov8-narrow.yaml"
STEPS = 4
# 2 batches per epoch: an epoch boundary at step 2, a 6-iteration warmup, accumulate ramped 1, 2, 2, 2.
SHORT = dict(epochs=10, batches_per_epoch=2)


@pytest.fixture(scope="session")
def sgd_dump(tmp_path_factory):
    """Written through the command line, as a user would."""
    out = tmp_path_factory.mktemp("train") / "sgd"
    code = main(["--no-progress", "dump", "--model", MODEL, "--nc", "12", "--imgsz", "64", "--steps", str(STEPS),
                 "--optimizer", "SGD", "--batches-per-epoch", "2", "--out", str(out)])
    assert code == 0
    return Dump(out)


@pytest.fixture(scope="session")
def auto_dump(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "auto"
    config = CaptureConfig(model=MODEL, nc=12, imgsz=64, steps=STEPS, cases=("default",), gradients=False,
                           train=TrainArgs(**SHORT))
    return Dump(dump_reference(config, out))


def compare(dump, spec, steps=STEPS, mode="isolated"):
    cand = candidate_steps(spec, dump, steps=steps, mode=mode)
    return compare_training(DumpSteps(dump), cand, profile=get_profile("cpu-fp32"), reference=str(dump.path),
                            candidate=getattr(spec, "__name__", str(spec)), steps=steps, mode=mode)


# ------------------------------------------------------------------------------------------------- capture
def test_no_steps_leaves_the_manifest_as_it_was():
    section = _config_section(CaptureConfig())
    assert "steps" not in section and "train" not in section


def test_steps_are_checked_before_any_work():
    with pytest.raises(ParityError, match="more than the 4 iterations planned"):
        from parity.capture import run_capture

        run_capture(CaptureConfig(steps=5, train=TrainArgs(epochs=1, batches_per_epoch=4)))


def test_sgd_capture_records_what_the_trainer_did(sgd_dump):
    train = sgd_dump.manifest["train"]
    assert train["optimizer"]["type"] == "SGD"
    assert [g["name"] for g in train["optimizer"]["param_groups"]] == ["weight", "bn", "bias"]
    assert all(g["settings"]["nesterov"] for g in train["optimizer"]["param_groups"])
    groups = {g["name"]: g["params"] for g in train["optimizer"]["param_groups"]}
    assert "model.0.bn.weight" in groups["bn"] and "model.0.bn.bias" in groups["bias"]
    assert "model.0.conv.weight" in groups["weight"]
    assert train["frozen"] == ["model.22.dfl.conv.weight"]
    assert train["warmup_iterations"] == 6 and train["accumulate_nominal"] == 4
    # step 0: the bias lr starts at warmup_bias_lr, the others at 0; momentum at warmup_momentum
    assert sgd_dump.get("train.0.lr").tolist() == [0.0, 0.0, 0.1]
    assert sgd_dump.get("train.0.momentum").tolist() == [0.8, 0.8, 0.8]
    assert sgd_dump.get("train.0.weight_decay").tolist() == [0.0005, 0.0, 0.0]
    assert [bool(sgd_dump.get(f"train.{s}.stepped")) for s in range(STEPS)] == [True, False, True, False]
    assert float(sgd_dump.get("train.0.grad_norm")) > 10 >= float(sgd_dump.get("train.0.grad_norm_clipped")) - 1e-5
    assert float(sgd_dump.get("train.2.ema_decay")) == pytest.approx(0.9999 * (1 - math.exp(-2 / 2000)), rel=1e-15)
    assert "train.0.optim.model.0.conv.weight.momentum_buffer" in sgd_dump
    assert "train.1.optim.model.0.conv.weight.momentum_buffer" not in sgd_dump  # no step, no new state
    loss = sgd_dump.get("train.0.loss")
    assert torch.equal(loss, sgd_dump.get("loss.default.output.loss"))  # step 0 is the dump's own loss


def test_auto_picks_adamw_and_records_its_choice(auto_dump):
    train = auto_dump.manifest["train"]
    assert train["optimizer"]["type"] == "AdamW"
    assert train["resolved"] == {"optimizer": "AdamW", "lr0": round(0.002 * 5 / (4 + 12), 6), "momentum": 0.9,
                                 "warmup_bias_lr": 0.0, "requested_optimizer": "auto"}
    assert train["planned_iterations"] <= 10_000
    assert auto_dump.get("train.0.lr").tolist() == [0.0, 0.0, 0.0]  # warmup_bias_lr zeroed by auto
    assert auto_dump.get("train.1.momentum").tolist() == [0.9, 0.9, 0.9]  # Adam's beta1 is never warmed up
    assert "train.0.optim.model.0.conv.weight.exp_avg_sq" in auto_dump


def test_statistics_only_dump_keeps_every_step(tmp_path):
    config = CaptureConfig(model=MODEL, nc=12, imgsz=64, steps=2, cases=("default",), gradients=False,
                           train=TrainArgs(**SHORT))
    dump = Dump(dump_reference(config, tmp_path / "stats", stats_only=True))
    entry = dump.index["train.1.weights.model.0.conv.weight"]
    assert entry["file"] is None and entry["stats"]["l2"] > 0
    assert dump.index["train.1.lr"]["stats"]["max"] == pytest.approx(dump.manifest["train"]["resolved"]["lr0"] / 6
                                                                     * 1.0, rel=1e-9)


# ------------------------------------------------------------------------------------------------- built-in
@pytest.mark.parametrize("which", ["sgd_dump", "auto_dump"])
def test_builtin_training_step_is_parity(which, request):
    dump = request.getfixturevalue(which)
    report = compare(dump, "builtin")
    assert report.verdict == "parity", [(r.where, r.name, r.note) for r in report.failed_rows]
    assert not report.findings
    rows = {(r.where, r.name): r for r in report.rows}
    # The loss is bitwise. The gradient norm that clip_grad_norm_ takes sums per-parameter norms in module
    # registration order, which the built-in does not share with ultralytics: it may differ in the last bit,
    # and then the clipped update by a few ULP (docs/training.md).
    for step in range(STEPS):
        for quantity in ("lr", "momentum", "weight_decay", "loss", "loss_sum"):
            assert rows[(f"step {step}", quantity)].metrics["exact"], (step, quantity)
        assert rows[(f"step {step}", "grad_norm")].metrics["max_ulp"] <= 4


@pytest.mark.parametrize("which", ["sgd_dump", "auto_dump"])
def test_builtin_summing_the_norm_in_reference_order_is_bitwise(which, request):
    report = compare(request.getfixturevalue(which), planted.reference_order_norm, steps=3)
    assert report.verdict == "parity"
    inexact = [(r.where, r.name) for r in report.rows if r.section == "train" and r.metrics and
               not r.metrics["exact"]]
    assert inexact == []


# (reference, planted factory, steps to run, signature, where, first quantity, words in the evidence)
PLANTED = [
    ("auto_dump", planted.no_warmup, 1, "warmup-missing", "step 0", "lr", "ramps it over 6 iterations"),
    ("sgd_dump", planted.bias_warmup_from_zero, 1, "warmup-mismatch", "step 0", "lr", "bias 0 (ultralytics 0.1)"),
    ("sgd_dump", planted.no_momentum_warmup, 1, "warmup-mismatch", "step 0", "momentum", "0.937 at step 0, "
                                                                                           "ultralytics 0.8"),
    ("auto_dump", planted.no_accumulation, 2, "accumulate-mismatch", "step 1", "stepped", "ultralytics accumulates"),
    ("auto_dump", planted.decay_without_accumulate, 1, "weight-decay-scaling", "step 0", "weight_decay",
     "0.000125, ultralytics 0.0005"),
    ("auto_dump", planted.decayed_batchnorm, 1, "param-group-mismatch", "step 0", "weight_decay",
     "the bn group is decayed"),
    ("sgd_dump", planted.no_clip, 1, "clip-missing", "step 0", "grad_norm_clipped", "clips it to max_norm 10"),
    ("auto_dump", planted.ema_without_ramp, 1, "ema-mismatch", "step 0", "ema_decay", "0.9999 at update 1"),
    ("sgd_dump", planted.ema_parameters_only, 1, "ema-mismatch", "step 0", "ema", "only the BatchNorm buffers"),
    ("sgd_dump", planted.cosine_schedule, 3, "lr-schedule-mismatch", "step 2", "lr", "start of epoch 1"),
    ("auto_dump", planted.auto_picks_sgd, 1, "optimizer-mismatch", "setup", "optimizer", "uses SGD, ultralytics AdamW"),
    ("sgd_dump", planted.sgd_without_nesterov, 1, "optimizer-mismatch", "setup", "weight.nesterov",
     "nesterov is False"),
    ("sgd_dump", planted.loss_times_batch, 1, "loss-scale", "step 0", "loss_sum", "multiplied by 2"),
]


@pytest.mark.parametrize("which, factory, steps, signature, where, quantity, evidence", PLANTED,
                         ids=[p[1].__name__ for p in PLANTED])
def test_planted_training_error_is_named_at_its_step(which, factory, steps, signature, where, quantity, evidence,
                                                     request):
    report = compare(request.getfixturevalue(which), factory, steps=steps)
    assert report.verdict == "divergence"
    first = report.first_divergence()
    assert (first.where, first.name) == (where, quantity)
    assert [f.signature for f in report.findings] == [signature]
    assert report.findings[0].where == where and evidence in report.findings[0].message


# ------------------------------------------------------------------------------------- dumps, CLI, overfit
def test_candidate_dump_of_steps_compares_like_a_live_candidate(sgd_dump, tmp_path):
    live = candidate_steps(planted.no_clip, sgd_dump, steps=1)
    path = write_train_dump(live, tmp_path / "candidate")
    report = compare_training(DumpSteps(sgd_dump), DumpSteps(Dump(path)), profile=get_profile("cpu-fp32"),
                              reference="r", candidate="dump", steps=1)
    assert [f.signature for f in report.findings] == ["clip-missing"]


def test_cli_train_compare_exit_codes_and_report(sgd_dump, capsys, tmp_path):
    assert main(["--no-progress", "compare", "--what", "train", "--reference", str(sgd_dump.path),
                 "--train", "tests.ports.train.planted:no_clip", "--train-steps", "1",
                 "--json", str(tmp_path / "r.json")]) == 1
    out = capsys.readouterr().out
    assert "DIVERGENCE at step 0, first quantity grad_norm_clipped" in out and "clip-missing" in out
    assert max(len(line) for line in out.splitlines()) <= 80
    assert json.loads((tmp_path / "r.json").read_text())["findings"][0]["signature"] == "clip-missing"
    assert main(["--no-progress", "compare", "--what", "train", "--reference", str(sgd_dump.path),
                 "--train-steps", "2"]) == 0
    assert "PARITY: 2 steps" in capsys.readouterr().out


def test_cli_train_compare_bad_input_is_one_line(sgd_dump, capsys, tmp_path):
    assert main(["--no-progress", "compare", "--what", "train", "--reference", str(sgd_dump.path),
                 "--train-steps", "9"]) == 2
    assert "the reference holds 4 training steps" in capsys.readouterr().err
    assert main(["--no-progress", "compare", "--what", "train", "--reference", str(tmp_path)]) == 2


def test_overfit_curves_part_where_the_candidate_stops_learning_alike(sgd_dump, capsys):
    assert main(["--no-progress", "overfit", "--reference", str(sgd_dump.path)]) == 0
    assert "LEARNS LIKE THE REFERENCE: the curves stay within 1%" in capsys.readouterr().out
    unclipped = overfit_curves(DumpSteps(sgd_dump), candidate_steps(planted.no_clip, sgd_dump, mode="chained"), 0.01)
    assert unclipped["parted_at"] == 1 and not unclipped["learns_like_reference"]


def test_render_fits_80_columns(sgd_dump):
    text = render_train(compare(sgd_dump, planted.cosine_schedule, steps=3))
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "lr-schedule-mismatch (step 2)" in text


def test_the_documented_factory_example_is_parity(sgd_dump):
    from pathlib import Path

    text = (Path(__file__).parent.parent / "docs" / "training.md").read_text()
    code = text.split("## Writing a training candidate", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, "docs/training.md", "exec"), namespace)
    report = compare(sgd_dump, namespace["training"], steps=2)
    assert report.verdict == "parity", [(r.where, r.name, r.note) for r in report.failed_rows]
    assert report.coverage["train_left_out"] == []
