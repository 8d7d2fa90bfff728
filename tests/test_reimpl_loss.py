"""The clean-room loss (parity/reimpl/loss.py) against ultralytics' real v8DetectionLoss / E2ELoss.

Reference values come from the committed fixture dumps (written by the lead's capture, `make fixtures`) and,
for the full-width yolo11n / yolov8n / yolov10n heads, from ultralytics' real criterion run here with the
capture's recorder wrapped around its methods. Every stage tensor and every head gradient must be BITWISE
equal on CPU, on all four loss cases (default, small_box, empty_image, no_boxes).
"""

from __future__ import annotations

import pytest
import torch

from parity.dump import names
from parity.dump.files import Dump, DumpWriter
from parity.causes import all_injections, get
from parity.reimpl.loss import (INPUT_SOURCES, STAGE_INPUTS, DetectionLoss, EndToEndLoss, LossConfig, build_loss,
                                preprocess)
from parity.causes.loss_causes import LOSS_INJECTIONS
from parity.causes.plant import planted_loss

FIXTURE_DUMPS = ("yolo11-narrow-nc80-96", "yolov8-narrow-nc12-96", "yolo26-narrow-nc12-64")
FILLER = ("target_labels", "target_bboxes", "target_gt_idx")  # background rows are filler: foreground only


# ------------------------------------------------------------------------------------------------ helpers
def ultralytics_loss_dump(out, *, model_yaml: str, nc: int, imgsz: int, batch_size: int = 2, seed: int = 0,
                          head_fn=None, cases: dict | None = None) -> Dump:
    """A loss-only reference dump: ultralytics' own criterion on a model's head outputs (optionally replaced
    by `head_fn(preds)`), recorded by the capture's wrappers, over the capture's loss cases (or `cases`:
    {name: (cls, bboxes, batch_idx)})."""
    from parity.capture.batch import Targets, load_batch
    from parity.capture.reference import Capture, build_model, head_of, head_outputs, is_end2end, loss_recorders

    batch = load_batch("assets", imgsz=imgsz, batch=batch_size, nc=nc, seed=seed)
    if cases is not None:
        batch.cases = {name: Targets(*value) for name, value in cases.items()}
    model = build_model(model_yaml, nc, seed).train()
    with torch.no_grad():  # gradients are taken w.r.t. the head outputs only: they become the leaves
        preds = _as_leaves(model(batch.img))
    if head_fn is not None:
        preds = head_fn(preds)
    end2end, head, head_index = is_end2end(model), head_of(model), len(model.model) - 1
    capture = Capture()
    capture.put(names.batch_img(), batch.img)
    for case, targets in batch.cases.items():
        for field in ("cls", "bboxes", "batch_idx"):
            capture.put(names.batch_target(case, field), getattr(targets, field))
    outputs = head_outputs(preds, end2end)
    for suffix, tensor in outputs.items():
        capture.put(f"act.{head_index}.{suffix}", tensor)
    model.criterion = model.init_criterion()
    recorders = loss_recorders(model, capture)
    try:
        for case in batch.cases:
            for recorder in recorders:
                recorder.case = case
            loss, items = model.loss(batch.as_loss_batch(case), preds)
            capture.put(names.loss_output(case, "loss"), loss)
            capture.put(names.loss_output(case, "items"), torch.stack(list(items.values())))
            for index, term in enumerate(names.LOSS_TERMS):
                grads = torch.autograd.grad(loss[index], list(outputs.values()), retain_graph=True, allow_unused=True)
                for (suffix, tensor), grad in zip(outputs.items(), grads):
                    capture.put(f"grad.head.{case}.{term}.{suffix}", torch.zeros_like(tensor) if grad is None else grad)
    finally:
        for recorder in recorders:
            recorder.remove()
    criterion = model.criterion.one2many if end2end else model.criterion
    manifest = {
        "config": {"model": model_yaml, "nc": nc, "imgsz": imgsz, "batch": batch_size, "precision": "fp32"},
        "environment": {"device": "cpu"},
        "hyperparameters": {"box": 7.5, "cls": 0.5, "dfl": 1.5, "tal_topk": criterion.assigner.topk,
                            "tal_alpha": criterion.assigner.alpha, "tal_beta": criterion.assigner.beta,
                            "tal_eps": criterion.assigner.eps, "small_box_floor_px": criterion.assigner.stride_val},
        "model": {"nc": nc, "reg_max": head.reg_max, "strides": head.stride.tolist(), "head_index": head_index,
                  "end2end": end2end, "layers": []},
        "loss": {"criterion": type(model.criterion).__name__,
                 "branches": list(names.E2E_BRANCHES) if end2end else [],
                 "branch_weights": {"one2many": model.criterion.o2m, "one2one": model.criterion.o2o} if end2end else None,
                 "cases": [{"name": c, "boxes": t.count} for c, t in batch.cases.items()]},
    }
    with DumpWriter(out, force=True) as writer:
        for name, tensor in capture.tensors.items():
            writer.add(name, tensor)
        writer.commit(manifest)
    return Dump(out)


def _as_leaves(preds):
    if isinstance(preds, dict):
        return {k: v if k == "feats" else _as_leaves(v) for k, v in preds.items()}
    return preds.detach().requires_grad_(True)


def cases_of(dump: Dump) -> list[str]:
    return [c["name"] for c in dump.manifest["loss"]["cases"]]


def branches_of(dump: Dump) -> list[str | None]:
    return list(dump.manifest["loss"].get("branches") or []) or [None]


def feat_shapes(dump: Dump) -> list[tuple[int, int]]:
    from parity.replay.loss import LossSpec

    return LossSpec.from_dump(dump).feat_shapes


def head_leaves(dump: Dump) -> dict:
    head = dump.model["head_index"]
    out = {}
    for branch in branches_of(dump):
        path = (branch,) if branch else ()
        out[branch] = {o: dump.get(names.act(head, *path, o)).clone().requires_grad_(True) for o in names.HEAD_OUTPUTS}
    return out


def predictions(dump: Dump, leaves: dict):
    shapes = feat_shapes(dump)
    if dump.model.get("end2end"):
        return {b: {**leaves[b], "feat_shapes": shapes} for b in leaves}
    return {**leaves[None], "feat_shapes": shapes}


def loss_batch(dump: Dump, case: str) -> dict:
    return {f: dump.get(names.batch_target(case, f)) for f in ("cls", "bboxes", "batch_idx")}


def assert_bitwise(ref: torch.Tensor, cand: torch.Tensor, what: str) -> None:
    cand = cand.detach()
    assert list(cand.shape) == list(ref.shape), f"{what}: shape {list(cand.shape)} != {list(ref.shape)}"
    if ref.dtype.is_floating_point:
        assert cand.dtype == ref.dtype, f"{what}: dtype {cand.dtype} != {ref.dtype}"
        same = ref.contiguous().view(torch.int32) == cand.contiguous().view(torch.int32)
        assert bool(same.all()), (f"{what}: {int((~same).sum())} of {ref.numel()} elements differ, max |d| "
                                  f"{float((ref.double() - cand.double()).abs().max()):.3g}")
    else:
        assert torch.equal(ref.to(torch.int64), cand.to(torch.int64)), f"{what}: values differ"


def check_against_dump(dump: Dump) -> int:
    """Run the built-in loss on every case; every reference loss tensor and head gradient must match bitwise.
    Returns the number of tensors compared."""
    loss = build_loss(dump.manifest)
    compared = 0
    for case in cases_of(dump):
        leaves = head_leaves(dump)
        run = loss.run(predictions(dump, leaves), loss_batch(dump, case))
        reference = dump.names(f"loss.{case}.")
        assert reference, f"no loss tensors for case {case}"
        for full in reference:
            short = full[len(f"loss.{case}."):]
            assert short in run.tensors, f"{full}: the built-in loss produced no such tensor"
            ref, cand = dump.get(full), run.tensors[short]
            if short.rsplit(".", 1)[-1] in FILLER:
                fg = dump.get(full.rsplit(".", 1)[0] + ".fg_mask")
                ref, cand = ref[fg], cand.detach()[fg]
                if ref.dtype != cand.dtype:  # no_boxes: ultralytics returns float filler (docs/loss-adapter.md)
                    assert case == "no_boxes" and ref.numel() == 0, f"{full}: dtype {cand.dtype} != {ref.dtype}"
                    continue
            assert_bitwise(ref, cand, full)
            compared += 1
        assert set(run.tensors) == {n[len(f"loss.{case}."):] for n in reference}, "names beyond the contract"
        for index, term in enumerate(names.LOSS_TERMS):
            flat = [(b, o, leaves[b][o]) for b in leaves for o in names.HEAD_OUTPUTS]
            grads = torch.autograd.grad(run.loss[index], [t for _, _, t in flat], retain_graph=True, allow_unused=True)
            for (branch, output, leaf), grad in zip(flat, grads):
                name = names.grad_head(case, term, output, branch)
                assert_bitwise(dump.get(name), torch.zeros_like(leaf) if grad is None else grad, name)
                compared += 1
    return compared


# ------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("fixture", FIXTURE_DUMPS)
def test_whole_loss_matches_fixture_bitwise(fixtures_dir, fixture):
    dump = Dump(fixtures_dir / fixture)
    assert set(cases_of(dump)) == set(names.LOSS_CASES)
    assert check_against_dump(dump) > 100


@pytest.mark.parametrize("fixture", FIXTURE_DUMPS)
def test_every_stage_fed_reference_inputs_matches_bitwise(fixtures_dir, fixture):
    """Stage cross-replay with the built-in stages: each stage alone, on the reference's inputs."""
    dump = Dump(fixtures_dir / fixture)
    loss = build_loss(dump.manifest)
    shapes = feat_shapes(dump)
    for case in cases_of(dump):
        batch = loss_batch(dump, case)
        for branch in branches_of(dump):
            criterion = loss.branch(branch) if branch else loss
            head = {o: dump.get(names.act(dump.model["head_index"], *((branch,) if branch else ()), o))
                    for o in names.HEAD_OUTPUTS}
            given = {"feat_shapes": shapes, "batch_size": head["scores"].shape[0],
                     "imgsz": torch.tensor(dump.index["batch.img"]["shape"][2:], dtype=torch.float32), **head, **batch}
            for stage, inputs in STAGE_INPUTS.items():
                if stage == "output" and branch:
                    continue
                kwargs = {}
                for name in inputs:
                    group, tensor = INPUT_SOURCES[name].split(".", 1)
                    kwargs[name] = given[name] if group in ("head", "batch") else \
                        dump.get(names.loss(case, group, tensor, branch))
                produced = criterion.stage(stage)(**kwargs)
                reference_stage = "assign" if stage == "assigner" else stage
                fg = dump.get(names.loss(case, "assign", "fg_mask", branch))
                for name, value in produced.items():
                    full = names.loss_output(case, name) if stage == "output" else names.loss(case, reference_stage, name, branch)
                    ref = dump.get(full)
                    if name in FILLER:
                        ref, value = ref[fg], value.detach()[fg]
                        if ref.dtype != value.dtype:
                            continue  # no_boxes: empty, float filler in ultralytics
                    assert_bitwise(ref, value, f"{stage} stage: {full}")


@pytest.mark.parametrize("model_yaml", ["yolo11n.yaml", "yolov8n.yaml", "yolov10n.yaml"])
def test_matches_live_ultralytics_loss_bitwise(tmp_path, model_yaml):
    """Full-width n heads at imgsz 128, ultralytics' criterion run here (yolov10n: E2ELoss with reg_max 16; the
    yolo26 fixture covers E2ELoss with reg_max 1)."""
    dump = ultralytics_loss_dump(tmp_path / "ref", model_yaml=model_yaml, nc=80, imgsz=128)
    assert check_against_dump(dump) > 100


def test_preprocess_places_boxes_per_image_in_order():
    """Sorted batch_idx (the contract) and unsorted give the same per-image rows, in input order."""
    imgsz = torch.tensor([64.0, 96.0])
    cls = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.2], [0.6, 0.4, 0.2, 0.1], [0.1, 0.1, 0.1, 0.1]])
    sorted_out = preprocess(torch.tensor([0.0, 0.0, 2.0, 2.0]), cls, boxes, 3, imgsz)
    assert sorted_out["targets"].shape == (3, 2, 5)
    assert sorted_out["mask_gt"].squeeze(-1).tolist() == [[1, 1], [0, 0], [1, 1]]
    assert sorted_out["targets"][0, :, 0].tolist() == [1.0, 2.0]
    # x1 of box 0: (0.5 * 96) - (0.2 * 96) / 2 = 38.4
    assert torch.allclose(sorted_out["targets"][0, 0, 1:], torch.tensor([38.4, 25.6, 57.6, 38.4]))
    order = torch.tensor([2, 0, 3, 1])
    shuffled = preprocess(torch.tensor([0.0, 0.0, 2.0, 2.0])[order], cls[order], boxes[order], 3, imgsz)
    assert torch.equal(shuffled["targets"][0, :, 0], torch.tensor([1.0, 2.0]))
    assert torch.equal(shuffled["targets"][2, :, 0], torch.tensor([3.0, 4.0]))
    empty = preprocess(torch.zeros(0), torch.zeros(0, 1), torch.zeros(0, 4), 2, imgsz)
    assert empty["targets"].shape == (2, 0, 5) and empty["mask_gt"].shape == (2, 0, 1)


def test_loss_injections_are_registered_and_buildable(fixtures_dir):
    dump = Dump(fixtures_dir / "yolo11-narrow-nc80-96")
    registry = all_injections()
    for name in LOSS_INJECTIONS:
        assert registry[name].kind == "loss" and registry[name].description
        assert isinstance(planted_loss(dump.manifest, name), DetectionLoss)
    assert isinstance(planted_loss(Dump(fixtures_dir / "yolo26-narrow-nc12-64").manifest, "gain-swap"),
                      EndToEndLoss)
    with pytest.raises(KeyError):
        planted_loss(dump.manifest, "no-such-bug")
    model_bug = next(n for n, i in registry.items() if i.kind == "model")
    with pytest.raises(ValueError):
        planted_loss(dump.manifest, model_bug)
    assert get("missing-sigmoid").hooks  # hooks replace stage methods


def test_injected_bugs_show_their_symptom(fixtures_dir):
    """The stories the injections stand for, on the loss alone (the replay tests check the diagnosis)."""
    dump = Dump(fixtures_dir / "yolo11-narrow-nc80-96")
    clean = build_loss(dump.manifest)

    def run(loss, case="default"):
        leaves = head_leaves(dump)
        return loss.run(predictions(dump, leaves), loss_batch(dump, case)), leaves

    sick, _ = run(planted_loss(dump.manifest, "missing-sigmoid"))
    assert bool(torch.isnan(sick.loss).all()) and bool(torch.isnan(sick.tensors["assign.align_metric"]).any())
    assert not bool(torch.isnan(sick.tensors["assign.pd_scores"]).any())  # NaN starts inside the assigner

    empty, _ = run(planted_loss(dump.manifest, "unclamped-target-scores-sum"), "no_boxes")
    assert float(empty.tensors["normalize.target_scores_sum"]) == 0 and not bool(torch.isfinite(empty.loss).all())
    assert bool(torch.isfinite(run(clean, "no_boxes")[0].loss).all())

    (reference, ref_leaves), (detached, leaves) = run(clean), run(planted_loss(dump.manifest, "no-detach"))
    assert torch.equal(reference.loss.detach(), detached.loss.detach())  # equal values …
    g_ref = torch.autograd.grad(reference.loss[1], ref_leaves[None]["scores"])[0]
    g_bug = torch.autograd.grad(detached.loss[1], leaves[None]["scores"])[0]
    assert not torch.equal(g_ref, g_bug)  # … different gradients

    swapped, _ = run(planted_loss(dump.manifest, "gain-swap"))
    assert torch.allclose(swapped.loss[0] / reference.loss[0], torch.tensor(0.2))
    unscaled, _ = run(planted_loss(dump.manifest, "no-batch-scale"))
    assert torch.allclose(unscaled.loss * 2, reference.loss)

    everything, _ = run(planted_loss(dump.manifest, "all-anchors-positive"))
    assert bool(everything.tensors["assign.fg_mask"].all())
    with pytest.raises(RuntimeError, match="must match the size"):
        run(planted_loss(dump.manifest, "weights-broadcast"))


def test_config_from_manifest(fixtures_dir):
    config = LossConfig.from_manifest(Dump(fixtures_dir / "yolo26-narrow-nc12-64").manifest)
    assert (config.nc, config.reg_max, config.topk, config.alpha, config.beta) == (12, 1, 10, 0.5, 6.0)
    assert config.gains == (7.5, 0.5, 1.5) and config.assigner.min_box_side == 16.0
    e2e = build_loss(Dump(fixtures_dir / "yolo26-narrow-nc12-64").manifest)
    assert (e2e.one2many.config.topk, e2e.one2one.config.topk, e2e.one2one.config.topk2) == (10, 7, 1)
    assert (e2e.o2m, e2e.o2o) == (0.8, 1.0 - 0.8)


def test_the_bitwise_check_catches_one_ulp(fixtures_dir, monkeypatch):
    """Negative control: a stage one ULP off must fail the checks above."""
    import parity.reimpl.loss as module

    original = module.classify

    def one_ulp_off(scores, target_scores, target_scores_sum):
        out = original(scores, target_scores, target_scores_sum)
        return {**out, "loss": torch.nextafter(out["loss"], torch.tensor(float("inf")))}

    monkeypatch.setattr(module, "classify", one_ulp_off)
    with pytest.raises(AssertionError, match="classify.loss"):
        check_against_dump(Dump(fixtures_dir / "yolo11-narrow-nc80-96"))
