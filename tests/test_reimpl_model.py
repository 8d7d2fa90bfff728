"""The built-in re-implementation against ultralytics: bitwise per layer on CPU, structure, bias init, and what
each injected bug changes (and nothing else)."""

from __future__ import annotations

import math
import os
import re

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_CONFIG_DIR", os.path.join(os.path.dirname(__file__), "..", "runs", "ultralytics-config"))

import numpy as np
import pytest
import torch

from parity.replay.mapping import build_mapping, compare_param_counts, layer_of_from_map, param_counts_by_layer
from parity.causes import INJECTIONS, all_injections
from parity.reimpl import build_detector
from parity.causes.plant import planted_detector

IMGSZ = 128
NC80_BIAS = [-11.536642074584961, -10.150347709655762, -8.764053344726562]
MODEL_INJECTIONS = ["bias-init-float32", "bias-init-float64", "bias-init-skipped", "bias-init-int-division",
                    "concat-channels", "upsample-bilinear", "bn-eps"]


@pytest.fixture(autouse=True, scope="module")
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)           # both sides run with the same thread count
    yield
    torch.set_num_threads(before)


def ultralytics_model(name: str, nc: int = 80, seed: int = 0):
    """DetectionModel as the reference capture builds it (without leaking parse_model's `Detect.legacy`)."""
    from parity.capture.reference import build_model

    return build_model(name, nc, seed)


_CACHE: dict = {}


def ultralytics_cached(name: str):
    """One build per yaml for the whole file (a DetectionModel build costs seconds here); callers get a copy."""
    import copy

    if name not in _CACHE:
        _CACHE[name] = ultralytics_model(name)
    return copy.deepcopy(_CACHE[name])


def ultralytics_bias(nc: int, strides=(8.0, 16.0, 32.0)) -> list[torch.Tensor]:
    """The class biases ultralytics' own Detect.bias_init stores, from a bare head (no model build needed)."""
    from ultralytics.nn.modules.head import Detect

    head = Detect(nc=nc, ch=(16, 32, 64))
    head.stride = torch.tensor(strides)
    head.bias_init()
    return [head.cv3[l][-1].bias.detach().clone() for l in range(len(strides))]


def perturb_(model: torch.nn.Module, seed: int = 1) -> None:
    """Make every BatchNorm tensor distinct, so a mapping that swaps two equal-shaped norms shows up."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if k.endswith(("bn.weight", "bn.running_var")):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif k.endswith(("bn.bias", "bn.running_mean")):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)


def ul_forward_layers(ref, x):
    outs, h = [], x
    for m in ref.model:
        if m.f != -1:
            h = outs[m.f] if isinstance(m.f, int) else [h if j == -1 else outs[j] for j in m.f]
        h = m(h)
        outs.append(h)
    return outs


def image(seed: int = 3, batch: int = 2, size: int = IMGSZ) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def ulp_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.contiguous().view(torch.int32).long() - b.contiguous().view(torch.int32).long()).abs()


# ---- bitwise parity -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["yolov8n.yaml", "yolo11n.yaml"])
def test_bitwise_every_layer_and_head_stage(name):
    ref = ultralytics_cached(name)
    perturb_(ref)
    mine = build_detector(name)
    km = build_mapping(ref.state_dict(), mine)            # by order and shape, through mine.layer_map
    assert {e.how for e in km.ref_to_cand.values()} == {"shape"} and not km.missing and not km.unexpected
    km.load_reference_into(mine, ref.state_dict())
    ref.train(), mine.train()
    assert mine.layer_types() == [type(m).__name__ for m in ref.model]
    assert mine.sources == [[-1]] + [[m.i - 1] if m.f == -1 else [m.i - 1 if f == -1 else f for f in m.f]
                                     for m in list(ref.model)[1:]]
    assert mine.strides.dtype == torch.float32 and torch.equal(mine.strides, ref.stride)

    head = ref.model[-1]
    captured, children = {}, {}
    for path, mod in head.named_modules():
        if re.fullmatch(r"cv[23]\.\d+\.\d+(\.\d+)?", path):
            mod.register_forward_hook(lambda _m, _i, o, path=path: captured.__setitem__(path, o))
    shared_act = type(ref.model[0]).default_act          # one SiLU instance called by every Conv: not hookable
    for i, layer in enumerate(list(ref.model)[:-1]):
        for path, mod in layer.named_modules():
            if path and mod is not shared_act:
                mod.register_forward_hook(lambda _m, _i, o, key=f"{i}.{path}": children.__setitem__(key, o))
    x = image()
    want = ul_forward_layers(ref, x)
    got = mine.forward_layers(x)
    assert len(got) == len(want)
    for i, (w, g) in enumerate(zip(want, got)):
        if isinstance(w, dict):
            for k in ("boxes", "scores"):
                assert torch.equal(w[k], g[k]), f"layer {i} {k}: max diff {(w[k] - g[k]).abs().max()}"
        else:
            assert torch.equal(w, g), f"layer {i} ({mine.layer_types()[i]}): max diff {(w - g).abs().max()}"
    # the train-mode forward moved BatchNorm statistics identically
    after = km.candidate_to_reference(mine.state_dict())
    for k, t in ref.state_dict().items():
        assert torch.equal(t, after[k]), k

    # Detect internals, under the dump's names
    feats = [got[j] for j in mine.sources[mine.head_index]]
    stages = mine.head_stages(feats)
    assert set(stages) == set(captured) | {"dfl"}
    for k, t in captured.items():
        assert torch.equal(t, stages[k]), k
    ref_dfl = head.dfl(want[-1]["boxes"])
    assert torch.equal(ref_dfl, stages["dfl"]) and torch.equal(ref_dfl, mine.dfl(got[-1]["boxes"]))
    assert stages["dfl"].shape == (2, 4, got[-1]["boxes"].shape[-1])

    # direct children of the other layers, under ultralytics' child names
    n_checked = 0
    for i in range(mine.head_index):
        inputs = [x] if i == 0 else [want[j] for j in mine.sources[i]]
        for k, t in mine.layer_stages(i, inputs).items():
            if k == "act":
                assert torch.equal(t, want[i])
                continue
            assert torch.equal(t, children[f"{i}.{k}"]), f"layer {i} {k}"
            n_checked += 1
    assert n_checked > 40

    # isolated replay of one layer on the reference's inputs, and the whole forward
    i = mine.head_index - 1
    assert torch.equal(mine.run_layer(i, [want[j] for j in mine.sources[i]]), want[i])
    out = mine(x)
    assert set(out) == {"boxes", "scores", "feats"}
    assert torch.equal(out["scores"], want[-1]["scores"])


# ---- structure --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,count", [("yolov8n.yaml", 3_157_200), ("yolo11n.yaml", 2_624_080)])
def test_parameter_counts_per_layer(name, count):
    mine = build_detector(name)
    assert sum(p.numel() for p in mine.parameters()) == count
    ref = ultralytics_cached(name)
    assert sum(p.numel() for p in ref.parameters()) == count
    ref_counts = param_counts_by_layer(ref.state_dict())
    mine_counts = param_counts_by_layer(mine.state_dict(), layer_of_from_map(mine.layer_map))
    assert ref_counts == mine_counts
    assert sum(mine_counts.values()) == count


@pytest.mark.parametrize("name,count", [("yolov8s.yaml", 11_166_560), ("yolo11s.yaml", 9_458_752)])
def test_parameter_counts_s_scale(name, count):
    # the totals the yaml files quote for these scales (ultralytics' own summary)
    assert sum(p.numel() for p in build_detector(name).parameters()) == count


def test_larger_scale_from_yaml_table():
    # yolo11m: C3k inner blocks forced on every C3k2 row, max_channels 512 (yaml comment: 20114688)
    assert sum(p.numel() for p in build_detector("yolo11m.yaml").parameters()) == 20_114_688


@pytest.mark.slow  # 2-11 s here (a subprocess, a browser or full-size builds); make test-fast skips it
def test_no_ultralytics_code_is_imported():
    import subprocess
    import sys

    code = ("import sys; from parity.reimpl import build_detector, find_model_yaml; "
            "m = build_detector('yolo11n.yaml'); m(__import__('torch').zeros(1, 3, 64, 64)); "
            "p, s = find_model_yaml('yolov8s'); assert p.parts[-2:] == ('v8', 'yolov8.yaml') and s == 's', (p, s); "
            "print(sorted(k for k in sys.modules if k.startswith('ultralytics')))")
    root = os.path.join(os.path.dirname(__file__), "..")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": root})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_legacy_and_depthwise_heads():
    v8, v11 = build_detector("yolov8n.yaml", nc=3), build_detector("yolo11n.yaml", nc=3)
    assert v8.legacy_head and not v11.legacy_head
    cls8 = [m for m in v8.head.levels[0]["cls"].modules() if isinstance(m, torch.nn.Conv2d)]
    cls11 = [m for m in v11.head.levels[0]["cls"].modules() if isinstance(m, torch.nn.Conv2d)]
    assert [m.kernel_size for m in cls8] == [(3, 3), (3, 3), (1, 1)]
    assert [(m.kernel_size, m.groups > 1) for m in cls11] == [((3, 3), True), ((1, 1), False), ((3, 3), True),
                                                              ((1, 1), False), ((1, 1), False)]


# ---- Detect bias initialisation ---------------------------------------------------------------------------------

def cls_bias(model, level):
    if hasattr(model, "head_index"):
        return model.head.cls_final(level).bias.detach()
    return model.model[-1].cv3[level][-1].bias.detach()


def box_bias(model, level):
    if hasattr(model, "head_index"):
        return model.head.box_final(level).bias.detach()
    return model.model[-1].cv2[level][-1].bias.detach()


def test_bias_init_values_nc80():
    mine = build_detector("yolo11n.yaml", nc=80)
    for level, value in enumerate(NC80_BIAS):
        b = cls_bias(mine, level)
        assert b.dtype == torch.float32 and torch.equal(b, torch.full((80,), value, dtype=torch.float32))
        assert torch.equal(box_bias(mine, level), torch.full((64,), 2.0))


def test_bias_init_bitwise_like_ultralytics():
    for nc in (1, 3, 8, 12, 17, 32, 41, 80, 128):
        mine, want = build_detector("yolov8n.yaml", nc=nc), ultralytics_bias(nc)
        for level in range(3):
            assert torch.equal(cls_bias(mine, level), want[level]), (nc, level)
    ref = ultralytics_cached("yolo11n.yaml")             # and the biases of a full ultralytics build
    mine = build_detector("yolo11n.yaml")
    for level in range(3):
        assert torch.equal(cls_bias(mine, level), cls_bias(ref, level))
        assert torch.equal(box_bias(mine, level), box_bias(ref, level))


# ---- injected bugs ----------------------------------------------------------------------------------------------

def built(name, nc=80, inject=None, seed=0):
    torch.manual_seed(seed)
    return planted_detector(name, nc, inject)


def differing_keys(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    return [k for k in sa if not torch.equal(sa[k], sb[k])]


def test_registry_lists_every_model_injection():
    assert set(MODEL_INJECTIONS) <= set(INJECTIONS)
    for name in MODEL_INJECTIONS:
        assert INJECTIONS[name] and "\n" not in INJECTIONS[name]
        assert all_injections()[name].kind == "model"
    with pytest.raises(KeyError):
        planted_detector("yolov8n.yaml", name="no-such-bug")
    # a loss-side bug (registered by parity.reimpl.loss_inject, when present) leaves the model as it is
    loss_bugs = [n for n, inj in all_injections().items() if inj.kind != "model"]
    if loss_bugs:
        assert not differing_keys(built("yolov8n.yaml"), built("yolov8n.yaml", inject=loss_bugs[0]))


def test_bias_init_float32_one_ulp_at_nc12_only_cls_bias():
    clean, bad = built("yolov8n.yaml", 12), built("yolov8n.yaml", 12, "bias-init-float32")
    want = ultralytics_bias(12)
    ulps = [int(ulp_diff(cls_bias(bad, l), want[l]).max()) for l in range(3)]
    assert max(ulps) == 1 and min(ulps) == 0
    assert all(re.fullmatch(r"layers\.22\.levels\.\d\.cls\.2\.bias", k) for k in differing_keys(clean, bad))
    # at nc=80 every formula agrees
    assert not differing_keys(built("yolov8n.yaml", 80), built("yolov8n.yaml", 80, "bias-init-float32"))


def test_bias_init_float64_one_ulp_at_nc8():
    bad, want = built("yolo11n.yaml", 8, "bias-init-float64"), ultralytics_bias(8)
    ulps = [int(ulp_diff(cls_bias(bad, l), want[l]).max()) for l in range(3)]
    assert max(ulps) == 1
    assert all(k.endswith("cls.2.bias") for k in differing_keys(built("yolo11n.yaml", 8), bad))


def test_bias_init_skipped_keeps_default_conv_bias():
    clean, bad = built("yolov8n.yaml"), built("yolov8n.yaml", inject="bias-init-skipped")
    diff = differing_keys(clean, bad)
    assert sorted(diff) == sorted(f"layers.22.levels.{l}.{b}.2.bias" for l in range(3) for b in ("box", "cls"))
    for l in range(3):
        conv = bad.head.cls_final(l)
        bound = 1 / math.sqrt(conv.weight[0].numel())          # PyTorch's default uniform(-bound, bound)
        assert conv.bias.abs().max() <= bound and conv.bias.std() > bound / 4
        assert not torch.any(box_bias(bad, l) == 2.0)


def test_bias_init_int_division_is_minus_inf():
    bad = built("yolov8n.yaml", 80, "bias-init-int-division")
    for l in range(3):
        assert torch.all(torch.isneginf(cls_bias(bad, l)))
        assert torch.equal(box_bias(bad, l), torch.full((64,), 2.0))
    # nc <= 5: 5 // nc is not 0 but still not 5 / nc (except nc in {1, 5})
    assert torch.isfinite(cls_bias(built("yolov8n.yaml", 2, "bias-init-int-division"), 0)).all()


@pytest.mark.parametrize("name,concat", [("yolov8n.yaml", 11), ("yolo11n.yaml", 12)])
def test_concat_channels_widens_one_layer(name, concat):
    clean, bad = built(name), built(name, inject="concat-channels")
    rows = compare_param_counts(param_counts_by_layer(clean.state_dict(), layer_of_from_map(clean.layer_map)),
                                param_counts_by_layer(bad.state_dict(), layer_of_from_map(bad.layer_map)))
    assert len(rows) == 1 and rows[0][0] == concat + 1 and rows[0][3] > 0
    a, b = clean.forward_layers(image(size=64)), bad.forward_layers(image(size=64))
    assert b[concat].shape[1] > a[concat].shape[1]
    assert all(torch.equal(a[i], b[i]) for i in range(concat))
    assert b[-1]["scores"].shape == a[-1]["scores"].shape


@pytest.mark.parametrize("name", ["yolov8n.yaml", "yolo11n.yaml"])
def test_upsample_bilinear_changes_upsample_output(name):
    clean, bad = built(name), built(name, inject="upsample-bilinear")
    assert not differing_keys(clean, bad)
    clean.train(), bad.train()
    x = image(size=64)
    a, b = clean.forward_layers(x), bad.forward_layers(x)
    up = clean.layer_types().index("Upsample")
    assert all(torch.equal(a[i], b[i]) for i in range(up))
    assert a[up].shape == b[up].shape and not torch.equal(a[up], b[up])


def test_bn_eps_changes_layer_4_only():
    clean, bad = built("yolov8n.yaml"), built("yolov8n.yaml", inject="bn-eps")
    assert not differing_keys(clean, bad)
    for i, (lc, lb) in enumerate(zip(clean.layers, bad.layers)):
        eps = {m.eps for m in lb.modules() if isinstance(m, torch.nn.BatchNorm2d)}
        assert eps == (set() if not eps else ({1e-5} if i == 4 else {1e-3})), i
    clean.train(), bad.train()
    x = image(size=64)
    a, b = clean.forward_layers(x), bad.forward_layers(x)
    assert all(torch.equal(a[i], b[i]) for i in range(4)) and not torch.equal(a[4], b[4])


def test_float32_formula_is_numpy_float32():
    # the injected formula is every step in float32 (the facts' "pure float32"), not a relabelled float64 one
    bad = built("yolov8n.yaml", 12, "bias-init-float32")
    s = np.float32(8.0)
    expect = np.log(np.float32(5) / np.float32(12) / (np.float32(640) / s) ** np.float32(2))
    assert cls_bias(bad, 0)[0].item() == float(expect)


@pytest.mark.parametrize("dump", ["yolov8-narrow-nc12-96", "yolo11-narrow-nc80-96"])
def test_bitwise_against_committed_reference_dump(dump):
    # The committed fixture dumps (perturbed weights and BatchNorm statistics) were written by ultralytics itself.
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    from parity.replay.mapping import reference_shapes_from_manifest

    root = Path(__file__).resolve().parent.parent
    path = root / "fixtures" / dump
    if not (path / "manifest.json").is_file():
        pytest.skip(f"fixture {dump} not present")
    manifest = json.loads((path / "manifest.json").read_text())
    tensors = {}
    for f in {e["file"] for e in manifest["tensors"].values()} & {"weights.safetensors", "activations.safetensors",
                                                                   "batch.safetensors", "init.safetensors"}:
        tensors.update(load_file(path / f))
    mine = build_detector(str(root / manifest["config"]["model"]), nc=manifest["config"]["nc"])
    assert sum(p.numel() for p in mine.parameters()) == manifest["model"]["parameters"]
    for level in range(3):
        assert torch.equal(cls_bias(mine, level), tensors[f"init.cls_bias.{level}.stored"])
        assert torch.equal(box_bias(mine, level), tensors[f"init.box_bias.{level}.stored"])
    km = build_mapping(reference_shapes_from_manifest(manifest), mine)
    km.load_reference_into(mine, tensors)
    mine.train()
    outs = mine.forward_layers(tensors["batch.img"])
    for i, out in enumerate(outs):
        if isinstance(out, dict):
            for k in ("boxes", "scores"):
                assert torch.equal(out[k], tensors[f"act.{i}.{k}"]), (i, k)
        else:
            assert torch.equal(out, tensors[f"act.{i}"]), i
    h = mine.head_index
    stages = mine.head_stages([outs[j] for j in mine.sources[h]])
    for k, t in stages.items():
        if f"act.{h}.{k}" in tensors:
            assert torch.equal(t, tensors[f"act.{h}.{k}"]), k
