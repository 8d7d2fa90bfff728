"""Key mapping: identity, the built-in model by shape, split tensors, reordered groups, allowed missing buffers,
renames, and failures that name the tensor and both shapes."""

from __future__ import annotations

import copy
import os
from collections import OrderedDict

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_CONFIG_DIR", os.path.join(os.path.dirname(__file__), "..", "runs", "ultralytics-config"))

import pytest
import torch
import torch.nn as nn

from parity.errors import ParityError
from parity.replay.mapping import (MappingError, build_mapping, compare_param_counts, layer_of_from_map,
                            param_counts_by_layer, ref_layer_of, reference_shapes_from_manifest)
from parity.reimpl import build_detector
from parity.reimpl.blocks import ConvNormAct
from parity.causes.plant import planted_detector

_UL: dict = {}


def ultralytics_v8n():
    """yolov8n as ultralytics builds it (once per file), keeping `Detect.legacy` as it was."""
    from parity.capture.reference import build_model

    if "m" not in _UL:
        _UL["m"] = build_model("yolov8n.yaml", 80, 0)
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():        # distinct values everywhere, so a wrong assignment cannot go unseen
            for k, t in _UL["m"].state_dict().items():
                if t.is_floating_point() and not k.endswith("dfl.conv.weight"):
                    t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.5 if k.endswith("running_var")
                            else torch.randn(t.shape, generator=g) * 0.1)
    return copy.deepcopy(_UL["m"])


def shapes(sd):
    return OrderedDict((k, tuple(v.shape)) for k, v in sd.items())


def renamed(sd, old, new):
    return OrderedDict((k.replace(old, new, 1), v) for k, v in sd.items())


@pytest.fixture(scope="module")
def ref():
    return ultralytics_v8n()


@pytest.fixture(scope="module")
def ref_sd(ref):
    return ref.state_dict()


def test_identity_for_an_ultralytics_built_module(ref, ref_sd):
    cand = ultralytics_v8n()
    with torch.no_grad():
        for t in cand.parameters():
            t.zero_()
    km = build_mapping(ref_sd, cand)
    assert {e.how for e in km.ref_to_cand.values()} == {"identity"} and len(km.ref_to_cand) == len(ref_sd)
    assert not km.missing and not km.unexpected
    km.load_reference_into(cand, ref_sd)
    assert all(torch.equal(cand.state_dict()[k], v) for k, v in ref_sd.items())


def test_builtin_detector_maps_by_shape_without_key_map(ref_sd):
    mine = build_detector("yolov8n.yaml")
    km = build_mapping(shapes(ref_sd), mine)                   # reference given as shapes only
    assert {e.how for e in km.ref_to_cand.values()} == {"shape"}
    assert len(km.ref_to_cand) == len(ref_sd) and not km.missing and not km.unexpected
    assert km.ref_to_cand["model.2.cv1.conv.weight"].cand_keys == ["layers.2.split_conv.conv.weight"]
    assert km.ref_to_cand["model.2.cv2.bn.running_var"].cand_keys == ["layers.2.merge_conv.norm.running_var"]
    assert km.ref_to_cand["model.22.cv3.1.2.bias"].cand_keys == ["layers.22.levels.1.cls.2.bias"]
    assert km.ref_to_cand["model.22.dfl.conv.weight"].cand_keys == ["layers.22.dfl_bins"]
    km.load_reference_into(mine, ref_sd)
    back = km.candidate_to_reference(mine.state_dict())
    assert all(torch.equal(back[k], v) for k, v in ref_sd.items())
    assert "layer(s) 2" in km.describe()          # C2f groups are registered in another order: reported


def test_by_order_without_layer_map_prefers_the_shallowest_block(ref_sd):
    # Without a layer map the candidate is one ordered stream. yolov8n layer 16 (a strided 3x3 conv) and the
    # bottleneck convs of layer 18 share the shape (64, 64, 3, 3): each must stay in its own layer.
    mine = build_detector("yolov8n.yaml")
    flat = renamed(mine.state_dict(), "layers.", "net.")
    assert ref_sd["model.16.conv.weight"].shape == ref_sd["model.18.m.0.cv1.conv.weight"].shape
    km = build_mapping(ref_sd, flat)
    assert km.ref_to_cand["model.16.conv.weight"].cand_keys == ["net.16.conv.weight"]
    assert km.ref_to_cand["model.18.m.0.cv1.conv.weight"].cand_keys == ["net.18.blocks.0.conv_a.conv.weight"]
    by_map = build_mapping(ref_sd, mine)
    assert {k: [c.replace("layers.", "net.", 1) for c in e.cand_keys] for k, e in by_map.ref_to_cand.items()} \
        == {k: e.cand_keys for k, e in km.ref_to_cand.items()}


class TwoConvs(nn.Module):
    """A C2f `cv1` written as two convs whose outputs are concatenated."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.first = ConvNormAct(c_in, c_out // 2, 1)
        self.second = ConvNormAct(c_in, c_out - c_out // 2, 1)

    def forward(self, x):
        return torch.cat([self.first(x), self.second(x)], 1)


def test_split_cv1_into_two_convs(ref, ref_sd):
    mine = build_detector("yolov8n.yaml")
    c2f = mine.layers[2]
    c2f.split_conv = TwoConvs(c2f.split_conv.conv.in_channels, c2f.split_conv.conv.out_channels)
    km = build_mapping(ref_sd, mine)
    e = km.ref_to_cand["model.2.cv1.conv.weight"]
    assert e.how == "split"
    assert e.cand_keys == ["layers.2.split_conv.first.conv.weight", "layers.2.split_conv.second.conv.weight"]
    assert km.ref_to_cand["model.2.cv1.bn.running_mean"].how == "split"
    assert len(km.ref_to_cand["model.2.cv1.bn.num_batches_tracked"].cand_keys) == 2
    assert not km.unexpected and not km.missing
    km.load_reference_into(mine, ref_sd)
    w = ref_sd["model.2.cv1.conv.weight"]
    assert torch.equal(mine.state_dict()["layers.2.split_conv.second.conv.weight"], w[w.shape[0] // 2:])
    back = km.candidate_to_reference(mine.state_dict())
    assert all(torch.equal(back[k], v) for k, v in ref_sd.items())
    # and the split port computes what ultralytics computes
    ref_c, mine_c = copy.deepcopy(ref).eval(), mine.eval()
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = ref_c.model[1](ref_c.model[0](x))
        want = ref_c.model[2](h)
        got = mine_c.run_layer(2, [h])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_groups_registered_in_another_order(ref_sd):
    # A port whose C2f registers the output conv first, then the bottleneck, then the input conv.
    cand = OrderedDict()
    for k, v in ref_sd.items():
        if ref_layer_of(k) != 2:
            cand[k.replace("model.", "port.", 1)] = v
            if k == "model.1.bn.num_batches_tracked":
                for part, new in (("cv2", "out_conv"), ("m.0", "inner"), ("cv1", "in_conv")):
                    for k2, v2 in ref_sd.items():
                        if k2.startswith(f"model.2.{part}."):
                            cand[k2.replace(f"model.2.{part}.", f"port.2.{new}.")] = v2
    assert list(cand)[6].startswith("port.1.") and list(cand)[12].startswith("port.2.out_conv.")
    km = build_mapping(ref_sd, cand)
    assert km.ref_to_cand["model.2.cv1.conv.weight"].cand_keys == ["port.2.in_conv.conv.weight"]
    assert km.ref_to_cand["model.2.cv2.bn.bias"].cand_keys == ["port.2.out_conv.bn.bias"]
    assert km.ref_to_cand["model.2.m.0.cv2.conv.weight"].cand_keys == ["port.2.inner.cv2.conv.weight"]
    assert any("layer(s) 2" in n for n in km.notes)
    back = km.candidate_to_reference(cand)
    assert all(torch.equal(back[k], v) for k, v in ref_sd.items())


def test_missing_dfl_and_num_batches_tracked_are_allowed_and_reported(ref_sd):
    sd = build_detector("yolov8n.yaml").state_dict()
    cand = OrderedDict((k, v) for k, v in sd.items() if k != "layers.22.dfl_bins")
    km = build_mapping(ref_sd, cand, layer_map={f"layers.{i}.": i for i in range(23)})
    assert km.missing == ["model.22.dfl.conv.weight"] and not km.missing_required
    assert "model.22.dfl.conv.weight" in km.describe() and "allowed" in km.describe()
    # a norm without num_batches_tracked, and no layer map either
    cand2 = OrderedDict((k, v) for k, v in cand.items() if not k.endswith("num_batches_tracked"))
    km2 = build_mapping(ref_sd, cand2)
    assert set(km2.missing) == {k for k in ref_sd if k.endswith("num_batches_tracked")} | {"model.22.dfl.conv.weight"}
    assert len(km2.ref_to_cand) == len(cand2)
    # a trainable tensor may not be missing
    cand3 = OrderedDict((k, v) for k, v in cand.items() if not k.startswith("layers.22.levels.2.cls.2."))
    with pytest.raises(MappingError, match=r"model\.22\.cv3\.2\.2\.weight"):
        build_mapping(ref_sd, cand3, layer_map={f"layers.{i}.": i for i in range(23)})


def test_failure_names_the_tensor_and_both_shapes(ref_sd):
    bad = planted_detector("yolov8n.yaml", name="concat-channels")
    with pytest.raises(MappingError) as info:
        build_mapping(ref_sd, bad)
    msg = str(info.value)
    assert "model.12.cv1.conv.weight" in msg and "(128, 384, 1, 1)" in msg
    assert "layers.12.split_conv.conv.weight (128, 512, 1, 1)" in msg
    assert info.value.layer == 12 and info.value.ref_shape == (128, 384, 1, 1)
    assert isinstance(info.value, ParityError)               # the CLI prints it as an input error
    # the same without a layer map
    with pytest.raises(MappingError, match=r"model\.12\.cv1\.conv\.weight \(128, 384, 1, 1\).*\(128, 512, 1, 1\)"):
        build_mapping(ref_sd, renamed(bad.state_dict(), "layers.", "net."))
    # not strict: the rest maps, the widened conv is reported on both sides, with the error strict mode raises
    km = build_mapping(ref_sd, bad, strict=False)
    cv1 = [k for k in ref_sd if k.startswith("model.12.cv1.")]            # the conv with its norm: one group
    assert km.missing_required == cv1[:-1] and km.missing == cv1
    assert km.unexpected == [k for k in bad.state_dict() if k.startswith("layers.12.split_conv.")]
    assert km.layer_of_candidate("layers.12.split_conv.conv.weight") == 12
    assert "(128, 512, 1, 1)" in str(km.errors[0]) and len(km.ref_to_cand) == len(ref_sd) - len(cv1)
    # and the parameter table says which layer holds the extra parameters
    rows = compare_param_counts(param_counts_by_layer(ref_sd),
                                param_counts_by_layer(bad.state_dict(), layer_of_from_map(bad.layer_map)))
    assert rows == [(12, 148_224, 164_608, 16_384)]     # cv1 reads 128 more channels: 128 * 128


def test_key_map_renames_and_its_shape_check(ref_sd):
    cand = renamed(ref_sd, "model.", "backbone_and_head.")
    km = build_mapping(ref_sd, cand, key_map={r"^backbone_and_head\.": "model."})
    assert {e.how for e in km.ref_to_cand.values()} == {"rename"}
    cand["backbone_and_head.0.conv.weight"] = torch.zeros(16, 3, 5, 5)
    with pytest.raises(MappingError, match=r"model\.0\.conv\.weight \(16, 3, 3, 3\).*\(16, 3, 5, 5\)"):
        build_mapping(ref_sd, cand, key_map=[(r"^backbone_and_head\.", "model.")])


def test_unexpected_candidate_tensor(ref_sd):
    cand = OrderedDict(build_detector("yolov8n.yaml").state_dict())
    cand["extra.proj.weight"] = torch.zeros(7, 5)
    layer_map = {f"layers.{i}.": i for i in range(23)}
    with pytest.raises(MappingError, match=r"extra\.proj\.weight \(7, 5\) matches no reference"):
        build_mapping(ref_sd, cand, layer_map=layer_map)
    km = build_mapping(ref_sd, cand, layer_map=layer_map, strict=False)
    assert km.unexpected == ["extra.proj.weight"] and len(km.ref_to_cand) == len(ref_sd)


def test_reference_from_manifest_entries(ref_sd):
    manifest = {"tensors": {"act.0": {"shape": [2, 16, 32, 32]},
                            **{k: {"file": "weights.safetensors", "shape": list(v.shape)} for k, v in ref_sd.items()}}}
    ref_shapes = reference_shapes_from_manifest(manifest)
    assert list(ref_shapes) == list(ref_sd)
    km = build_mapping(ref_shapes, build_detector("yolov8n.yaml"))
    assert len(km.ref_to_cand) == len(ref_sd)


def test_sorted_reference_names_map_the_same(ref_sd):
    # A manifest written with sorted keys loses registration order (bn < conv, bias < weight): same mapping.
    mine = build_detector("yolov8n.yaml")
    want = build_mapping(ref_sd, mine).ref_to_cand
    got = build_mapping(OrderedDict(sorted(shapes(ref_sd).items())), mine).ref_to_cand
    assert {k: e.cand_keys for k, e in got.items()} == {k: e.cand_keys for k, e in want.items()}


def test_parity_map_prints_how_each_tensor_was_matched(capsys):
    """Each line of `parity map` ends in "[how]"; rich took it for a style tag and dropped it until the table was
    printed as plain text."""
    from parity.cli.main import main
    from parity.runtime import PROJECT_ROOT

    assert main(["map", "--reference", str(PROJECT_ROOT / "fixtures" / "yolo11-narrow-nc80-96"),
                 "--candidate", "builtin", "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = [line for line in lines if "<-" in line]
    assert table and all(line.endswith("[shape]") for line in table), table[:3]
    assert "model.0.conv.weight" in table[0] and "layers.0.conv.weight" in table[0]
