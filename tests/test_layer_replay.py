"""Layer replay against the small committed reference dumps: the clean built-in candidate passes (bitwise on CPU),
every injected model bug fails and is named at the right layer, a port made of ultralytics classes is localised
without a map, and a candidate dump is compared on what it has."""

from __future__ import annotations

import functools
import io
import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from parity.dump import names
from parity.replay.candidates import load_candidate
from parity.dump.files import Dump, DumpWriter
from parity.errors import ParityError
from parity.report.text import exit_code, render, to_json
from parity.diagnose.layers import compare_layers
from parity.runtime import PROJECT_ROOT

FIXTURES = PROJECT_ROOT / "fixtures"


def _find_fixture(family: str, nc: int) -> Path | None:
    """The lead's committed fixture for a model family and nc, whatever its image size."""
    for manifest in sorted(FIXTURES.glob("*/manifest.json")):
        data = json.loads(manifest.read_text())
        if Path(data["config"]["model"]).name.startswith(family) and data["model"]["nc"] == nc \
                and not data.get("stats_only"):
            return manifest.parent
    return None


def _make_dump(tmp_root: Path, family: str, nc: int, imgsz: int = 96, cases=("default",)) -> Path:
    """A reference dump written with the project's own capture (used when no committed fixture fits)."""
    from parity.capture import CaptureConfig, dump_reference

    model = FIXTURES / "models" / f"{family}-narrow.yaml"
    config = CaptureConfig(model=str(model if model.exists() else f"{family}n.yaml"), nc=nc, imgsz=imgsz,
                           images="synthetic", cases=tuple(cases), gradients=False)
    return dump_reference(config, tmp_root / f"{family}-nc{nc}-{imgsz}", force=True)


@pytest.fixture(scope="session")
def dumps(tmp_path_factory) -> dict[str, Dump]:
    out = {}
    for key, (family, nc) in {"yolo11": ("yolo11", 80), "yolov8": ("yolov8", 12)}.items():
        path = _find_fixture(family, nc) or _make_dump(tmp_path_factory.mktemp("dumps"), family, nc)
        out[key] = Dump(path)
    return out


@functools.lru_cache(maxsize=None)
def _replay(path: str, inject: str | None = None, layer: int | None = None):
    return compare_layers(Dump(path), "builtin", inject=inject, layer=layer, progress=False)


def replay(dump: Dump, inject: str | None = None, layer: int | None = None):
    return _replay(str(dump.path), inject, layer)


def signatures(report, severity: str | None = "error") -> set[str]:
    return {f.signature for f in report.findings if severity is None or f.severity == severity}


def findings(report, signature: str):
    return [f for f in report.findings if f.signature == signature]


def first_layer_of(dump: Dump, type_name: str, after: int = -1) -> int:
    return next(e["index"] for e in dump.layers if e["type"] == type_name and e["index"] > after)


def first_neck_concat(dump: Dump) -> int:
    return first_layer_of(dump, "Concat")


# ------------------------------------------------------------------------------------------- clean
@pytest.mark.parametrize("key", ["yolo11", "yolov8"])
def test_clean_builtin_passes_isolated_and_chained(dumps, key):
    dump = dumps[key]
    report = replay(dump)
    assert report.verdict == "parity", [(f.signature, f.message) for f in report.errors]
    assert exit_code(report) == 0
    numeric = [r for r in report.rows if r.section in ("isolated", "chained")]
    layers = len(dump.layers)
    assert {names.layer_of(r.name) for r in numeric if r.section == "isolated"} == set(range(layers))
    assert {names.layer_of(r.name) for r in numeric if r.section == "chained"} == set(range(layers))
    assert report.coverage["isolated"]["left_out"] == [] and report.coverage["chained"]["left_out"] == []
    assert report.context["first_divergent_layer"] == {"isolated": None, "chained": None}
    # same arithmetic, same thread count as the capture: every layer output is bitwise equal
    if torch.get_num_threads() == (dump.manifest.get("environment") or {}).get("threads"):
        assert all(r.metrics["exact"] for r in numeric), [r.name for r in numeric if not r.metrics["exact"]]
    # structure rows first: parameters of every layer match
    params = [r for r in report.rows if r.name == "parameters"]
    assert len(params) == layers and all(r.passed for r in params)
    assert report.rows.index(params[0]) < report.rows.index(numeric[0])


def test_clean_builtin_bias_init_at_nc80_cannot_tell_arithmetics_apart(dumps):
    report = replay(dumps["yolo11"])
    info = findings(report, "bias-init-indistinguishable")
    assert info and info[0].severity == "info"
    assert "cannot tell them apart" in info[0].message and "not applied" in info[0].message
    # and an injected pure-float32 bias at nc=80 is not blamed for anything
    report32 = replay(dumps["yolo11"], "bias-init-float32")
    assert report32.verdict == "parity" and findings(report32, "bias-init-indistinguishable")


def test_head_drill_down_compares_every_stage_and_dfl(dumps):
    dump = dumps["yolo11"]
    head = dump.model["head_index"]
    report = replay(dump, layer=head)
    assert report.verdict == "parity"
    compared = {r.name for r in report.rows if r.section == f"isolated/layer {head}"}
    levels = len(dump.model["strides"])
    for level in range(levels):
        for stage in range(3):
            assert names.act(head, "cv2", level, stage) in compared
            assert names.act(head, "cv3", level, stage) in compared
        assert names.act(head, "cv2", level) in compared  # per-level output of the box branch
    assert names.act(head, "dfl") in compared
    assert all(r.passed for r in report.rows if r.section.endswith(f"layer {head}"))
    assert report.coverage["sub_blocks"]["layer"] == head


# ------------------------------------------------------------------------------------ injected bugs
def _bias_levels_that_differ(dump: Dump, variant: str) -> list[float]:
    strides = dump.model["strides"]
    out = []
    for level, stride in enumerate(strides):
        stored = dump.get(names.init_bias("cls_bias", level, "stored"))
        other = dump.get(names.init_bias("cls_bias", level, variant))
        if not torch.equal(stored.view(torch.int32), other.view(torch.int32)):
            out.append(stride)
    return out


def test_bias_init_float32_is_named_per_stride_at_nc12(dumps):
    dump = dumps["yolov8"]
    differing = _bias_levels_that_differ(dump, "float32")
    assert differing, "nc=12 is chosen because pure float32 arithmetic is one ULP off there"
    report = replay(dump, "bias-init-float32")
    assert report.verdict == "divergence" and exit_code(report) == 1
    found = findings(report, "bias-init-float32")
    assert sorted(f.evidence["stride"] for f in found) == sorted(differing)
    assert all("bias init matches float32 arithmetic" in f.message for f in found)
    assert all(f.evidence["ulp_from_reference"] == 1 for f in found)
    # the weights come from the reference, so the activations are untouched by an init bug
    assert all(r.passed for r in report.rows if r.section in ("isolated", "chained"))
    assert signatures(report) == {"bias-init-float32"}


def _init_only_dump(tmp_path: Path, family: str, nc: int) -> Dump:
    """Just what the bias-init check reads: ultralytics' weights, its `init.*` tensors and the head's facts
    (no forward pass, no loss: this check never looks at activations)."""
    from parity.capture.reference import build_model, detect_bias_init, head_of

    model = build_model(str(FIXTURES / "models" / f"{family}-narrow.yaml"), nc, 0)
    head = head_of(model)
    with DumpWriter(tmp_path / f"init-{family}-nc{nc}", kind="reference", force=True) as writer:
        for key, tensor in model.state_dict().items():
            writer.add(key, tensor)
        for name, tensor in detect_bias_init(model).items():
            writer.add(name, tensor)
        path = writer.commit({"model": {"nc": nc, "reg_max": head.reg_max, "strides": head.stride.tolist(),
                                        "head_index": len(model.model) - 1, "layers": []},
                              "config": {"model": str(FIXTURES / "models" / f"{family}-narrow.yaml"), "nc": nc}})
    return Dump(path)


def _bias_findings(dump: Dump, inject: str):
    from parity.diagnose.structure import diagnose_bias_init
    from parity.findings import Report

    candidate = load_candidate("builtin", dump, inject=inject)
    candidate.prepare(dump)
    report = Report("bias init", str(dump.path), candidate.label, "cpu-fp32")
    diagnose_bias_init(dump, candidate, report)
    return report


def test_bias_init_float64_is_named_at_nc38(tmp_path):
    # nc=38: pure float64 is one ULP off at strides 16 and 32 while pure float32 agrees with ultralytics
    dump = _init_only_dump(tmp_path, "yolov8", 38)
    differing = _bias_levels_that_differ(dump, "float64")
    assert differing and not _bias_levels_that_differ(dump, "float32")
    report = _bias_findings(dump, "bias-init-float64")
    found = findings(report, "bias-init-float64")
    assert sorted(f.evidence["stride"] for f in found) == sorted(differing)
    assert all("bias init matches float64 arithmetic" in f.message for f in found)
    assert not findings(report, "bias-init-float32") and report.verdict == "divergence"
    assert _bias_findings(dump, "bias-init-float32").verdict == "parity"
    assert _bias_findings(dump, None).verdict == "parity"


def test_bias_init_where_float32_and_float64_agree_names_both(tmp_path):
    # nc=8, stride 8: pure float32 and pure float64 agree with each other, not with ultralytics' mixed arithmetic
    dump = _init_only_dump(tmp_path, "yolov8", 8)
    report = _bias_findings(dump, "bias-init-float64")
    at8 = [f for f in report.findings if f.where.endswith("stride 8")]
    assert {f.signature for f in at8} == {"bias-init-float32", "bias-init-float64"}
    assert all("either arithmetic explains it" in f.message for f in at8)


@pytest.mark.parametrize("inject, signature, text", [
    ("bias-init-skipped", "bias-init-skipped", "not applied (default conv init"),
    ("bias-init-int-division", "bias-init-nonfinite", "integer division"),
])
@pytest.mark.parametrize("key", ["yolo11", "yolov8"])
def test_bias_init_not_applied_or_nonfinite(dumps, key, inject, signature, text):
    dump = dumps[key]
    report = replay(dump, inject)
    found = findings(report, signature)
    assert sorted(f.evidence["stride"] for f in found) == sorted(dump.model["strides"])
    assert all(text in f.message for f in found)
    assert report.verdict == "divergence"
    # the bias init is judged on its own: the layers keep their parity
    assert report.first_divergence().section == "bias init"
    assert report.context["verdicts"] == {"layers": "parity", "bias_init": "divergence"}


@pytest.mark.parametrize("key", ["yolo11", "yolov8"])
def test_concat_channels_is_a_parameter_count_and_shape_mismatch(dumps, key):
    dump = dumps[key]
    concat = first_neck_concat(dump)
    wider = concat + 1  # the layer built wider to take the duplicated input
    report = replay(dump, "concat-channels")
    counts = findings(report, "param-count-mismatch")
    assert [f.evidence["layer"] for f in counts] == [wider]
    assert f"layer {wider}" in counts[0].message and "more parameters" in counts[0].message
    shape = findings(report, "shape-mismatch")
    assert shape and shape[0].evidence["layer"] == concat and "dim 1" in shape[0].message
    assert report.context["first_divergent_layer"]["isolated"] == concat
    assert report.context["first_divergent_layer"]["chained"] == concat
    assert findings(report, "layer-divergence")[0].evidence["layer"] == concat


@pytest.mark.parametrize("key", ["yolo11", "yolov8"])
def test_upsample_bilinear_is_localised_to_the_upsample(dumps, key):
    dump = dumps[key]
    upsample = first_layer_of(dump, "Upsample")
    report = replay(dump, "upsample-bilinear")
    assert report.context["first_divergent_layer"] == {"isolated": upsample, "chained": upsample}
    mode = findings(report, "upsample-mode")
    assert mode and mode[0].where == f"layer {upsample}"
    assert "bilinear" in mode[0].message and "nearest" in mode[0].message
    assert findings(report, "layer-divergence")[0].evidence["layer"] == upsample
    assert not findings(report, "param-count-mismatch")


@pytest.mark.parametrize("key", ["yolo11", "yolov8"])
def test_bn_eps_is_localised_to_its_layer(dumps, key):
    dump = dumps[key]
    report = replay(dump, "bn-eps")
    assert report.context["first_divergent_layer"] == {"isolated": 4, "chained": 4}
    eps = findings(report, "bn-eps")
    assert [f.where for f in eps] == ["layer 4"] and "1e-05" in eps[0].message
    assert findings(report, "layer-divergence")[0].where == "layer 4"
    # layers before 4 are untouched, layers after 4 match when fed the reference's inputs
    iso = {names.layer_of(r.name): r.passed for r in report.rows if r.section == "isolated"}
    assert all(iso[i] for i in iso if i != 4) and not iso[4]


def test_bn_eps_drill_down_points_at_the_first_sub_block(dumps):
    report = replay(dumps["yolo11"], "bn-eps", layer=4)
    sub = findings(report, "sub-block-divergence")
    assert sub and sub[0].evidence["sub_block"] == "cv1"


# ---------------------------------------------------------------------- ports from ultralytics classes
PORT = '''
from parity.capture.reference import build_model

MODEL = {model!r}


def clean(nc=80):
    return build_model(MODEL, nc, 0)


def one_bn_eps(nc=80):
    model = build_model(MODEL, nc, 0)
    model.model[{layer}].cv1.bn.eps = 1e-5  # one BatchNorm
    return model


def swapped_concat(nc=80):
    model = build_model(MODEL, nc, 0)
    concat = model.model[{concat}]
    concat.f = list(reversed(concat.f))  # same shapes, inputs in the other order
    return model
'''


@pytest.fixture
def ultralytics_port(dumps, tmp_path, monkeypatch):
    dump = dumps["yolo11"]
    layer = first_layer_of(dump, "C3k2", after=4)
    (tmp_path / "my_port.py").write_text(textwrap.dedent(PORT.format(model=dump.config["model"], layer=layer,
                                                                      concat=first_neck_concat(dump))))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(PROJECT_ROOT)
    yield dump, layer
    sys.modules.pop("my_port", None)


def test_ultralytics_class_port_needs_no_map(ultralytics_port):
    dump, _ = ultralytics_port
    report = compare_layers(dump, "my_port:clean", progress=False)
    assert report.context["candidate"]["kind"] == "ultralytics-classes"
    assert report.verdict == "parity", [(f.signature, f.message) for f in report.errors]
    assert report.coverage["isolated"]["left_out"] == []
    assert any(r.name.startswith("init.cls_bias") and r.passed for r in report.rows)


def test_ultralytics_class_port_with_one_bn_eps_is_localised(ultralytics_port):
    dump, layer = ultralytics_port
    report = compare_layers(dump, "my_port:one_bn_eps", progress=False)
    assert report.context["first_divergent_layer"] == {"isolated": layer, "chained": layer}
    eps = findings(report, "bn-eps")
    assert [f.where for f in eps] == [f"layer {layer}"]
    assert eps[0].evidence["modules"] == [f"model.{layer}.cv1.bn"]
    assert findings(report, "layer-divergence")[0].where == f"layer {layer}"
    drill = compare_layers(dump, "my_port:one_bn_eps", layer=layer, modes=("isolated",), progress=False)
    assert findings(drill, "sub-block-divergence")[0].evidence["sub_block"] == "cv1"


def test_wrong_wiring_is_named_when_the_layer_itself_is_right(ultralytics_port):
    dump, _ = ultralytics_port
    concat = first_neck_concat(dump)
    report = compare_layers(dump, "my_port:swapped_concat", progress=False)
    assert report.context["first_divergent_layer"] == {"isolated": None, "chained": concat}
    wiring = findings(report, "layer-wiring")
    assert wiring and wiring[0].where == f"layer {concat}" and "from" in wiring[0].message


USER_PORT = '''
from torch import nn

from parity.reimpl.model import build_detector

MODEL = {model!r}


class Port(nn.Module):
    """A port with its own module names and its own forward; only a map file says which block is which layer."""

    def __init__(self, nc):
        super().__init__()
        detector = build_detector(MODEL, nc=nc)
        self.blocks = detector.layers
        self.wiring = detector.sources

    def forward(self, img):
        outs = []
        for i, block in enumerate(self.blocks):
            xs = [img] if i == 0 else [outs[j] for j in self.wiring[i]]
            outs.append(block(xs if len(xs) > 1 else xs[0]))
        return outs[-1]


def factory(nc=80):
    return Port(nc)
'''


def test_user_port_with_a_map_file(dumps, tmp_path, monkeypatch):
    dump = dumps["yolo11"]
    (tmp_path / "user_port.py").write_text(textwrap.dedent(USER_PORT.format(model=dump.config["model"])))
    map_file = tmp_path / "map.json"
    map_file.write_text(json.dumps({"layer_map": {f"blocks.{e['index']}.": e["index"] for e in dump.layers}}))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(PROJECT_ROOT)
    try:
        report = compare_layers(dump, "user_port:factory", map_file=str(map_file), layer=4, progress=False)
    finally:
        sys.modules.pop("user_port", None)
    assert report.verdict == "parity", [(f.signature, f.message) for f in report.errors]
    # a generic module exposes no DFL of its own: that one tensor is listed as not covered, nothing else
    head = dump.model["head_index"]
    assert report.coverage["chained"]["left_out"] == [names.act(head, "dfl")]
    sub = [r.name for r in report.rows if r.section == "isolated/layer 4"]
    assert {names.act(4, "cv1"), names.act(4, "cv2")} <= set(sub)  # found through the key mapping
    assert any(r.name.startswith("init.cls_bias") and r.passed for r in report.rows)


# ------------------------------------------------------------------------------------ candidate dumps
def _write_candidate_dump(reference: Dump, out: Path, keep, edit=None) -> Path:
    candidate = load_candidate("builtin", reference)
    candidate.prepare(reference)
    head = reference.model["head_index"]
    # weights as loaded, before the train-mode forward updates the BatchNorm running statistics
    weights = {k: v.clone() for k, v in candidate.weight_tensors().items()}
    produced = candidate.run_chained(reference.get(names.batch_img()), head_index=head)
    with DumpWriter(out, kind="candidate", force=True) as writer:
        writer.add(names.batch_img(), reference.get(names.batch_img()))
        for name, tensor in produced.items():
            if keep(name):
                writer.add(name, edit(name, tensor) if edit else tensor)
        for name in list(weights)[:5]:
            writer.add(name, edit(name, weights[name]) if edit else weights[name])
        return writer.commit({"note": "written by tests/test_layer_replay.py"})


def test_partial_candidate_dump_is_compared_on_what_it_has(dumps, tmp_path):
    dump = dumps["yolov8"]
    head = dump.model["head_index"]
    keep = lambda n: names.layer_of(n) is not None and (names.layer_of(n) < 10 or names.layer_of(n) == head)  # noqa: E731
    path = _write_candidate_dump(dump, tmp_path / "cand", keep)
    report = compare_layers(dump, str(path), progress=False)
    assert report.context["candidate"]["kind"] == "dump"
    assert report.verdict == "parity", [(f.signature, f.message) for f in report.errors]
    left = report.coverage["chained"]["left_out"]
    assert names.act(10) in left and names.act(head, "boxes") not in left and names.act(0) not in left
    assert any("isolated mode" in line for line in report.coverage["not_checked"])
    assert "isolated" not in report.coverage


def test_candidate_dump_divergence_and_wrong_weights_are_named(dumps, tmp_path):
    dump = dumps["yolov8"]

    def edit(name, tensor):
        if name == names.act(5):
            return tensor + 0.01
        if name.startswith("model.") and tensor.is_floating_point() and tensor.dim() == 4:
            return tensor * 1.001
        return tensor

    path = _write_candidate_dump(dump, tmp_path / "cand", lambda n: True, edit)
    report = compare_layers(dump, str(path), progress=False)
    assert report.context["first_divergent_layer"]["chained"] == 5
    assert findings(report, "layer-divergence")[0].where == "layer 5"
    assert findings(report, "weights-differ")


# --------------------------------------------------------------------------------- output, bad input
def test_json_and_terminal_rendering(dumps, tmp_path):
    report = replay(dumps["yolo11"], "upsample-bilinear")
    text = to_json(report, tmp_path / "report.json")
    data = json.loads((tmp_path / "report.json").read_text(),
                      parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert data == json.loads(text)
    assert data["schema"] == "yolo-parity-report" and data["schema_version"] == 1
    assert data["verdict"] == "divergence" and data["summary"]["failed"] > 0
    assert {"upsample-mode", "layer-divergence"} <= {f["signature"] for f in data["findings"]}
    assert data["first_divergence"]["section"] == "isolated"
    console_out = io.StringIO()
    from rich.console import Console

    render(report, Console(file=console_out, width=160, force_terminal=False))
    shown = console_out.getvalue()
    assert "DIVERGENCE" in shown and "upsample-mode" in shown and "[isolated]" in shown


def test_bad_input_is_a_parity_error(dumps, tmp_path):
    dump = dumps["yolo11"]
    with pytest.raises(ParityError):
        compare_layers(dump, "no_such_module_xyz:factory", progress=False)
    with pytest.raises(ParityError):
        compare_layers(dump, str(tmp_path / "missing-dump"), progress=False)
    with pytest.raises(ParityError):
        compare_layers(dump, "builtin", layer=999, progress=False)
    with pytest.raises(ParityError):
        compare_layers(dump, "builtin", inject="no-such-bug", progress=False)
    with pytest.raises(ParityError):
        compare_layers(dump, "builtin", modes=("sideways",), progress=False)


def test_candidate_runs_in_train_mode(dumps):
    candidate = load_candidate("builtin", dumps["yolo11"])
    compare_layers(dumps["yolo11"], candidate, modes=("isolated",), progress=True)  # progress off: not a TTY
    assert candidate.module.training
