"""Reference capture: it changes nothing, it is reproducible, and a dump stands on its own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from parity.dump import names
from parity.capture import CaptureConfig, dump_reference, run_capture
from parity.capture.batch import load_batch
from parity.capture.reference import build_model, is_end2end, prepare_model
from parity.tools.fixtures import FIXTURES, MODELS

ROOT = Path(__file__).resolve().parent.parent
SMALL = CaptureConfig(model=f"{MODELS}/yolo11-narrow.yaml", nc=80, imgsz=64)
SMALL_E2E = CaptureConfig(model=f"{MODELS}/yolo26-narrow.yaml", nc=12, imgsz=64)


def plain_step(config: CaptureConfig):
    """What a person would run without the harness: build, forward, loss, backward. No hooks."""
    batch = load_batch(config.images, imgsz=config.imgsz, batch=config.batch, nc=config.nc, seed=config.seed)
    model, _ = prepare_model(config, batch)
    preds = model(batch.img)
    loss, _items = model.loss(batch.as_loss_batch("default"), preds)
    loss.sum().backward()
    return loss.detach(), {k: p.grad for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("config", [SMALL, SMALL_E2E], ids=["yolo11", "yolo26-e2e"])
def test_capture_changes_nothing(config):
    plain_loss, plain_grads = plain_step(config)
    captured = run_capture(config)
    assert torch.equal(captured.tensors[names.loss_output("default", "loss")], plain_loss)
    for key, grad in plain_grads.items():
        assert torch.equal(captured.tensors[names.grad_param(key)], grad), key
    assert len(plain_grads) == len(captured.names_with_prefix("grad.param."))


def test_two_captures_are_bitwise_equal():
    first, second = run_capture(SMALL), run_capture(SMALL)
    assert first.tensors.keys() == second.tensors.keys()
    for name, tensor in first.tensors.items():
        assert torch.equal(tensor, second.tensors[name]), name
    assert first.manifest["model"] == second.manifest["model"]


def test_capture_records_every_contract_stage(small_capture):
    captured = small_capture
    for case in names.LOSS_CASES:
        for stage, tensors in names.LOSS_STAGES.items():
            for tensor in tensors:
                assert names.loss(case, stage, tensor) in captured.tensors, (case, stage, tensor)
        for term in names.LOSS_TERMS:
            for output in names.HEAD_OUTPUTS:
                assert names.grad_head(case, term, output) in captured.tensors
    head = captured.manifest["model"]["head_index"]
    for level in range(3):
        for stage in range(3):
            assert names.act(head, "cv2", level, stage) in captured.tensors
            assert names.act(head, "cv3", level, stage) in captured.tensors
    # the inputs of every layer are outputs of earlier layers, never stored twice
    for layer in captured.manifest["model"]["layers"]:
        for name in layer["inputs"]:
            assert name in captured.tensors


def test_loss_stages_agree_with_what_ultralytics_returns(small_capture):
    captured = small_capture
    t = captured.tensors
    for case in names.LOSS_CASES:
        after = t[names.loss(case, "gains", "after")]
        assert torch.equal(t[names.loss_output(case, "loss")], after * SMALL.batch)
        before = t[names.loss(case, "gains", "before")]
        assert torch.allclose(after, before * torch.tensor([7.5, 0.5, 1.5]), rtol=1e-6, atol=0)
    fg = t[names.loss("default", "assign", "fg_mask")]
    assert 0 < int(fg.sum()) < fg.numel()
    assert float(t[names.loss("no_boxes", "normalize", "target_scores_sum")]) == 1.0  # clamped
    assert int(t[names.loss("no_boxes", "assign", "fg_mask")].sum()) == 0


def test_end2end_captures_both_branches():
    captured = run_capture(SMALL_E2E)
    assert captured.manifest["loss"]["branches"] == ["one2many", "one2one"]
    for branch in names.E2E_BRANCHES:
        assert names.loss("default", "assign", "fg_mask", branch) in captured.tensors
        assert names.act(captured.manifest["model"]["head_index"], branch, "scores") in captured.tensors
    assert names.loss_output("default", "loss") in captured.tensors


@pytest.mark.slow
def test_bias_init_is_stored_and_recomputed():
    captured = run_capture(CaptureConfig(model="yolo11n.yaml", nc=80, imgsz=64, gradients=False, cases=("default",)))
    expected = [-11.536642074584961, -10.150347709655762, -8.764053344726562]
    for level, value in enumerate(expected):
        for variant in ("stored", "float32", "float64"):
            bias = captured.tensors[names.init_bias("cls_bias", level, variant)]
            assert bias.dtype == torch.float32 and bias.shape == (80,)
            assert float(bias[0]) == value, (level, variant)
        assert torch.all(captured.tensors[names.init_bias("box_bias", level, "stored")] == 2.0)


def test_bias_arithmetics_differ_at_nc12():
    """At nc=12 pure float32 lands one ULP away from ultralytics' mixed arithmetic, at some stride."""
    captured = run_capture(CaptureConfig(model=f"{MODELS}/yolov8-narrow.yaml", nc=12, imgsz=64,
                                         gradients=False, cases=("default",)))
    stored = [captured.tensors[names.init_bias("cls_bias", level, "stored")] for level in range(3)]
    float32 = [captured.tensors[names.init_bias("cls_bias", level, "float32")] for level in range(3)]
    assert any(not torch.equal(s, f) for s, f in zip(stored, float32))


@pytest.mark.slow  # 2-11 s here (a subprocess, a browser or full-size builds); make test-fast skips it
def test_models_built_in_one_process_equal_fresh_builds(tmp_path):
    """parse_model leaks `Detect.legacy` across builds; capture must not inherit it."""
    build_model("yolov8n.yaml", 80, 0)
    in_process = build_model("yolov10n.yaml", 80, 0).state_dict()
    script = (
        "import sys, torch; sys.path.insert(0, '.');"
        "from parity.runtime import prepare; prepare();"
        "from parity.capture.reference import build_model;"
        "from safetensors.torch import save_file;"
        f"save_file({{k: v.contiguous() for k, v in build_model('yolov10n.yaml', 80, 0).state_dict().items()}}, "
        f"{str(tmp_path / 'fresh.safetensors')!r})"
    )
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True)
    from safetensors.torch import load_file

    fresh = load_file(str(tmp_path / "fresh.safetensors"))
    assert fresh.keys() == in_process.keys()
    for key in fresh:
        assert torch.equal(fresh[key], in_process[key]), key


def test_dump_reloads_without_project_code_and_reproduces_the_loss(fixtures_dir):
    """Only json, safetensors and ultralytics: the dumped weights and batch give the dumped loss, bitwise."""
    from safetensors import safe_open
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils import DEFAULT_CFG

    path = fixtures_dir / "yolo11-narrow-nc80-96"
    manifest = json.loads((path / "manifest.json").read_text())
    tensors = {}
    for name, entry in manifest["tensors"].items():
        with safe_open(str(path / entry["file"]), framework="pt") as handle:
            tensors[name] = handle.get_tensor(name)
    model = DetectionModel(str(ROOT / manifest["config"]["model"]), nc=manifest["model"]["nc"], verbose=False)
    model.load_state_dict({k: v for k, v in tensors.items() if k.startswith("model.")})
    model.args = get_cfg(DEFAULT_CFG)
    model.train()
    batch = {"img": tensors["batch.img"], "cls": tensors["batch.default.cls"],
             "bboxes": tensors["batch.default.bboxes"], "batch_idx": tensors["batch.default.batch_idx"]}
    loss, _ = model.loss(batch)
    assert torch.equal(loss.detach(), tensors["loss.default.output.loss"])


def test_progress_callback_sees_every_step():
    steps = []
    run_capture(SMALL, progress=steps.append)
    assert steps[0] == "building the model" and "backward pass" in steps
    assert sum(s.startswith("loss, case") for s in steps) == len(names.LOSS_CASES)


def test_dump_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    import parity.dump.files as dumpfile

    calls = []

    def failing_save(tensors, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return original(tensors, path)

    original = dumpfile.save_file
    monkeypatch.setattr(dumpfile, "save_file", failing_save)
    out = tmp_path / "dump"
    from parity.errors import DumpError

    with pytest.raises(DumpError, match=f"cannot write {out}: disk full; nothing was written"):
        dump_reference(SMALL, out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_is_end2end_detects_dual_heads():
    assert is_end2end(build_model(f"{MODELS}/yolo26-narrow.yaml", 12, 0))
    assert not is_end2end(build_model(f"{MODELS}/yolo11-narrow.yaml", 12, 0))


def test_fixture_configs_are_small():
    for name in FIXTURES:
        size = sum(f.stat().st_size for f in (ROOT / "fixtures" / name).iterdir())
        assert size < 12e6, (name, size)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["yolov8n.yaml", "yolo11n.yaml", "yolo12n.yaml", "yolo26n.yaml"])
def test_every_model_family_dumps_and_inspects(model, tmp_path):
    from rich.console import Console

    from parity.dump.files import Dump
    from parity.dump.inspect import render_inspect

    path = dump_reference(CaptureConfig(model=model, imgsz=64), tmp_path / "dump")
    dump = Dump(path)
    console = Console(record=True, width=200)
    render_inspect(dump, console)
    text = console.export_text()
    assert "Detect" in text and "default" in text
    assert dump.model["parameters"] == sum(layer["parameters"] for layer in dump.layers)
    assert names.loss_output("no_boxes", "loss") in dump


def test_a_capture_with_a_sink_keeps_nothing_and_dumps_what_memory_holds(tmp_path):
    """dump_reference streams every tensor to disk as it is captured: the dump holds, in the same order, exactly
    what an in-memory capture holds."""
    from parity.dump.files import Dump

    seen = []
    streamed = run_capture(SMALL, sink=lambda name, tensor: seen.append(name))
    assert streamed.tensors == {} and seen == list(streamed.shapes)
    in_memory = run_capture(SMALL)
    assert list(in_memory.tensors) == seen
    dump = Dump(dump_reference(SMALL, tmp_path / "dump"))
    assert list(dump.index) == seen
    for name, tensor in in_memory.tensors.items():
        assert torch.equal(dump.get(name), tensor), name
    assert dump.manifest["model"] == in_memory.manifest["model"]
