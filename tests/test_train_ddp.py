"""Data parallel on this machine: two gloo ranks (torch.distributed, one process each) run ultralytics' trainer
under DistributedDataParallel and the built-in's step, on the reference batch split over the ranks."""

import pytest
import torch

from parity.capture import CaptureConfig, dump_reference
from parity.capture.train import TrainArgs
from parity.compare.tolerances import get_profile
from parity.diagnose.train import compare_training
from parity.dump.files import Dump
from parity.replay.train import DumpSteps
from parity.replay.train_ddp import run_two_ranks

PLANTED = "tests.ports.train.planted:no_world_size_scale"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    config = CaptureConfig(model="fixtures/models/yolov8-narrow.yaml", nc=12, imgsz=64, steps=1, cases=("default",),
                           gradients=False, train=TrainArgs(optimizer="SGD", batches_per_epoch=2))
    reference = dump_reference(config, root / "single")
    return run_two_ranks(reference, ["builtin", PLANTED], steps=1, out=root / "ranks", timeout=540)


@pytest.mark.slow
def test_what_data_parallel_changes_in_the_reference(ranks):
    rank0, rank1 = Dump(ranks.reference[0]), Dump(ranks.reference[1])
    assert rank0.manifest["train"]["world_size"] == 2 and rank1.manifest["train"]["rank"] == 1
    # each rank's loss is on its own image, and the trainer multiplies it by the world size
    assert not torch.equal(rank0.get("train.0.loss"), rank1.get("train.0.loss"))
    assert torch.equal(rank0.get("train.0.loss_sum"), rank0.get("train.0.loss").sum() * 2)
    # gradients are averaged by DDP: both ranks step to the same weights
    # (at step 0 only the biases move: the other groups warm up from lr 0)
    bias = "model.0.bn.bias"
    assert torch.equal(rank0.get(f"train.0.weights.{bias}"), rank1.get(f"train.0.weights.{bias}"))
    assert not torch.equal(rank0.get(f"train.0.weights.{bias}"),
                           Dump(ranks.reference[0].parent.parent / "single").get(bias))
    # BatchNorm is not synchronised: running statistics follow each rank's own image
    assert not torch.equal(rank0.get("train.0.weights.model.0.bn.running_mean"),
                           rank1.get("train.0.weights.model.0.bn.running_mean"))


def _report(reference, candidate):
    return compare_training(DumpSteps(Dump(reference)), DumpSteps(Dump(candidate)), profile=get_profile("cpu-fp32"),
                            reference=str(reference), candidate=str(candidate), mode="chained")


@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 1])
def test_builtin_two_rank_step_is_parity(ranks, rank):
    report = _report(ranks.reference[rank], ranks.candidates[0][rank])
    assert report.verdict == "parity", [(r.where, r.name, r.note) for r in report.failed_rows]


@pytest.mark.slow
def test_forgotten_world_size_scaling_is_named(ranks):
    report = _report(ranks.reference[0], ranks.candidates[1][0])
    assert [f.signature for f in report.findings] == ["loss-scale"]
    assert report.findings[0].where == "step 0" and "divided by 2" in report.findings[0].message
