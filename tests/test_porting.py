"""The porting harness: export-layer / check-layer, foreign-dump diagnostics, and candidate dumps.

Everything runs on the small committed fixtures (fixtures/README.md): yolo11-narrow-nc80-96 (Detect at layer 23)
and yolov8-narrow-nc12-96 (Detect at layer 22; at nc=12 the pure-float32 class bias is one ULP off).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from parity.cli.main import main
from parity.compare.foreign import (check_candidate_dump, check_safetensors_file, diagnose_foreign_tensor,
                                    name_problem, nearest_names)
from parity.dump.files import Dump, DumpWriter
from parity.diagnose.layer_check import check_layer
from parity.dump.layer_file import LayerFile
from parity.replay.export import export_layer, write_candidate_dump
from parity.runtime import PROJECT_ROOT

FIXTURES = PROJECT_ROOT / "fixtures"
Y11 = FIXTURES / "yolo11-narrow-nc80-96"
Y8 = FIXTURES / "yolov8-narrow-nc12-96"


@pytest.fixture(scope="module")
def layer23(tmp_path_factory) -> Path:
    return export_layer(Dump(Y11), 23, tmp_path_factory.mktemp("layers") / "layer23.safetensors")


@pytest.fixture(scope="module")
def y8_head(tmp_path_factory) -> Path:
    return export_layer(Dump(Y8), 22, tmp_path_factory.mktemp("layers") / "layer22.safetensors")


def _expected_as_output(layer_file: Path, *, init: str | None = "stored") -> dict[str, torch.Tensor]:
    """What a perfect port would write: the expected tensors under their protocol names."""
    tensors = load_file(str(layer_file))
    out = {k[len("expected."):]: v.clone() for k, v in tensors.items() if k.startswith("expected.act.")}
    if init:
        for k, v in tensors.items():
            if k.startswith("expected.init.") and k.endswith(f".{init}"):
                level_name = k[len("expected."):].rsplit(".", 1)[0]  # init.cls_bias.0
                out[level_name] = v.clone()
    return out


def _check(layer_file: Path, output: dict[str, torch.Tensor], tmp_path: Path, capsys) -> tuple[int, dict]:
    path = tmp_path / "port_out.safetensors"
    save_file({k: v.contiguous() for k, v in output.items()}, str(path))
    capsys.readouterr()
    code = main(["check-layer", "--layer-file", str(layer_file), "--output", str(path), "--json"])
    return code, json.loads(capsys.readouterr().out)


def _signatures(report: dict) -> set[tuple[str, str]]:
    return {(f["signature"], f["where"]) for f in report["findings"]}


# ================================================================================================ export
def test_export_layer_holds_inputs_params_outputs_and_init(layer23):
    ref = Dump(Y11)
    lf = LayerFile(layer23)
    assert lf.layer == 23 and lf.type == "Detect" and lf.nc == 80 and lf.reg_max == 16
    assert lf.strides == [8.0, 16.0, 32.0]
    assert json.loads(lf.meta["from"]) == [16, 19, 22]
    assert lf.inputs == ["act.16", "act.19", "act.22"]
    for k, source in enumerate(lf.inputs):
        assert torch.equal(lf.get(f"input.{k}"), ref.get(source))
    # parameters and buffers under ultralytics' names, nothing of other layers
    assert set(lf.param_names()) == set(ref.names("model.23."))
    assert torch.equal(lf.get("param.model.23.cv2.0.0.conv.weight"), ref.get("model.23.cv2.0.0.conv.weight"))
    # the layer's own outputs and every captured sub-module, in capture order
    assert lf.outputs == ["act.23.boxes", "act.23.scores", "act.23.dfl"]
    assert lf.sub_blocks[:4] == ["act.23.cv2.0.0", "act.23.cv2.0.1", "act.23.cv2.0.2", "act.23.cv2.0"]
    assert set(lf.sub_blocks) == {n for n in ref.names("act.23.") if n not in lf.outputs}
    assert torch.equal(lf.expected("act.23.scores"), ref.get("act.23.scores"))
    assert json.loads(lf.meta["output_shapes"])["act.23.boxes"] == [2, 64, 189]
    # the bias init, all three arithmetics
    for level in range(3):
        for variant in ("stored", "float32", "float64"):
            assert torch.equal(lf.expected(f"init.cls_bias.{level}.{variant}"),
                               ref.get(f"init.cls_bias.{level}.{variant}"))
        assert lf.expected(f"init.box_bias.{level}.stored") is not None
    assert json.loads(lf.meta["batchnorm"])["eps"] == 1e-3


def test_export_layer_without_head_has_no_init(tmp_path):
    path = export_layer(Dump(Y11), 9, tmp_path / "l9.safetensors")
    lf = LayerFile(path)
    assert lf.type == "SPPF" and lf.inputs == ["act.8"]
    assert lf.outputs == ["act.9"] and "act.9.m#2" in lf.sub_blocks
    assert not [n for n in lf.names if n.startswith("expected.init")]


def test_export_layer_with_candidate_mapping(tmp_path, capsys):
    out = tmp_path / "l23m.safetensors"
    assert main(["export-layer", "--reference", str(Y11), "--layer", "23", "--out", str(out),
                 "--candidate", "builtin"]) == 0
    lf = LayerFile(out)
    mapping = json.loads(lf.meta["mapping"])
    assert "model.23.cv2.0.0.conv.weight" in mapping
    mapped = [n for n in lf.names if n.startswith("mapped.")]
    assert len(mapped) == len(lf.param_names())
    ref_key = "model.23.cv3.1.2.bias"
    (cand_key,) = mapping[ref_key]
    assert torch.equal(lf.get(f"mapped.{cand_key}"), lf.get(f"param.{ref_key}"))


@pytest.mark.parametrize("argv, message", [
    (["--layer", "99"], "the reference has layers 0..23"),
    (["--layer", "23", "--reference", "fixtures/models"], "no manifest.json"),
])
def test_export_layer_bad_input_exits_2(argv, message, tmp_path, capsys):
    args = ["export-layer", "--reference", str(Y11), "--out", str(tmp_path / "x.safetensors")]
    code = main(args + argv)
    assert code == 2
    assert message in capsys.readouterr().err.replace("\n", " ")


# ================================================================================================= check
def test_check_layer_perfect_port_is_parity(layer23, tmp_path, capsys):
    code, report = _check(layer23, _expected_as_output(layer23), tmp_path, capsys)
    assert code == 0, report["findings"]
    assert report["verdict"] == "parity"
    assert report["coverage"]["isolated"]["left_out"] == []
    assert report["coverage"]["sub_blocks"]["compared"] == report["coverage"]["sub_blocks"]["reference"] == 36
    rows = {r["name"]: r for r in report["rows"]}
    assert rows["act.23.boxes"]["metrics"]["exact"]
    assert rows["init.cls_bias.0.stored"]["passed"]


def test_check_layer_table_output(layer23, tmp_path, capsys):
    path = tmp_path / "out.safetensors"
    save_file(_expected_as_output(layer23), str(path))
    assert main(["check-layer", "--layer-file", str(layer23), "--output", str(path)]) == 0
    out = capsys.readouterr().out
    assert "PARITY" in out and "act.23.cv3.2.2" in out


def test_check_layer_names_planted_bias_bugs(y8_head, tmp_path, capsys):
    """At nc=12 numpy's pure-float32 arithmetic is one ULP off ultralytics at strides 8 and 16."""
    ref = Dump(Y8)
    base = _expected_as_output(y8_head, init=None)
    cases = {
        "float32": ({l: ref.get(f"init.cls_bias.{l}.float32") for l in range(3)}, "bias-init-float32", [8, 16]),
        "nonfinite": ({l: torch.full((12,), -math.inf) for l in range(3)}, "bias-init-nonfinite", [8, 16, 32]),
        "skipped": ({l: torch.zeros(12) for l in range(3)}, "bias-init-skipped", [8, 16, 32]),
        "formula": ({l: torch.full((12,), -4.59512) for l in range(3)}, "bias-init-formula", [8, 16, 32]),
    }
    for label, (biases, signature, strides) in cases.items():
        output = dict(base)
        for level, bias in biases.items():
            output[f"init.cls_bias.{level}"] = bias
            output[f"init.box_bias.{level}"] = ref.get(f"init.box_bias.{level}.stored")
        code, report = _check(y8_head, output, tmp_path, capsys)
        assert code == 1, label
        found = {w for s, w in _signatures(report) if s == signature}
        assert found == {f"layer 22, cls bias init, stride {s}" for s in strides}, (label, _signatures(report))


def test_check_layer_nhwc_output_says_which_permutation(layer23, tmp_path, capsys):
    output = _expected_as_output(layer23)
    output["act.23.cv2.1.0"] = output["act.23.cv2.1.0"].permute(0, 2, 3, 1)
    code, report = _check(layer23, output, tmp_path, capsys)
    assert code == 1
    layout = [f for f in report["findings"] if f["signature"] == "foreign-layout"]
    assert layout and "permute(0, 3, 1, 2)" in layout[0]["message"] and "NHWC" in layout[0]["message"]
    assert ("sub-block-divergence", "layer 23, cv2.1.0") in _signatures(report)
    divergence = next(f for f in report["findings"] if f["signature"] == "layer-divergence")
    assert "NHWC" in divergence["message"]


def test_check_layer_float64_output_is_a_warning(layer23, tmp_path, capsys):
    output = _expected_as_output(layer23)
    output["act.23.scores"] = output["act.23.scores"].double()
    code, report = _check(layer23, output, tmp_path, capsys)
    assert code == 0
    warning = next(f for f in report["findings"] if f["signature"] == "foreign-dtype")
    assert warning["severity"] == "warning"
    assert "float64" in warning["message"] and "float32" in warning["message"] and "bitwise" in warning["message"]


def test_check_layer_scaled_sub_block(layer23, tmp_path, capsys):
    output = _expected_as_output(layer23)
    output["act.23.cv3.0.1"] = output["act.23.cv3.0.1"] * 1.01
    code, report = _check(layer23, output, tmp_path, capsys)
    assert code == 1
    sub = next(f for f in report["findings"] if f["signature"] == "sub-block-divergence")
    assert sub["where"] == "layer 23, cv3.0.1"
    assert "1.01 x reference" in sub["message"]


def test_check_layer_unknown_names_get_the_nearest(layer23, tmp_path, capsys):
    output = _expected_as_output(layer23)
    output["activations.23.boxes"] = output.pop("act.23.boxes")
    code, report = _check(layer23, output, tmp_path, capsys)
    assert code == 0  # the rest is at parity; the miss is a warning and a coverage gap
    name = next(f for f in report["findings"] if f["signature"] == "foreign-name")
    assert "'act.23.boxes'" in name["message"]
    assert report["coverage"]["isolated"]["left_out"] == ["act.23.boxes"]


def test_check_layer_partial_output_reports_coverage(layer23, tmp_path, capsys):
    output = {k: v for k, v in _expected_as_output(layer23, init=None).items() if k in ("act.23.scores",)}
    code, report = _check(layer23, output, tmp_path, capsys)
    assert code == 0
    assert report["coverage"]["isolated"] == {"reference_tensors": 3, "compared": 1,
                                              "left_out": ["act.23.boxes", "act.23.dfl"]}
    assert report["coverage"]["sub_blocks"]["compared"] == 0
    assert any("bias init" in line for line in report["coverage"]["not_checked"])


def test_check_layer_accepts_a_candidate_dump_directory(layer23, tmp_path, capsys):
    dump = tmp_path / "port_dump"
    with DumpWriter(dump, kind="candidate") as writer:
        for name, tensor in _expected_as_output(layer23).items():
            writer.add(name + (".stored" if name.startswith("init.") else ""), tensor, file="out.safetensors")
        writer.commit({})
    assert main(["check-layer", "--layer-file", str(layer23), "--output", str(dump), "--json"]) == 0


@pytest.mark.parametrize("damage, message", [
    ("truncate", "truncated"),
    ("garbage", "truncated or corrupt"),
    ("nothing-known", "none of its 1 tensor(s) is one layer 23 expects"),
])
def test_check_layer_bad_output_exits_2(damage, message, layer23, tmp_path, capsys):
    path = tmp_path / "bad.safetensors"
    if damage == "truncate":
        save_file(_expected_as_output(layer23), str(path))
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "garbage":
        path.write_bytes(b"\xff" * 64)
    else:
        save_file({"detect.out": torch.zeros(2)}, str(path))
    code = main(["check-layer", "--layer-file", str(layer23), "--output", str(path)])
    assert code == 2
    assert message in capsys.readouterr().err.replace("\n", " ")


def test_check_layer_rejects_what_is_not_a_layer_file(tmp_path, capsys):
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, str(plain))
    assert main(["check-layer", "--layer-file", str(plain), "--output", str(plain)]) == 2
    assert "not a layer file" in capsys.readouterr().err
    assert main(["check-layer", "--layer-file", str(Y11), "--output", str(plain)]) == 2
    assert "parity export-layer" in capsys.readouterr().err.replace("\n", " ")


def test_check_layer_function_returns_a_report(layer23, tmp_path):
    path = tmp_path / "out.safetensors"
    save_file(_expected_as_output(layer23), str(path))
    report = check_layer(layer23, path)
    assert report.verdict == "parity" and report.profile == "cpu-fp32"


# ======================================================================================= foreign tensors
def _ref4() -> torch.Tensor:
    return torch.randn(2, 5, 7, 3, generator=torch.Generator().manual_seed(0))


def test_foreign_nhwc_is_named_with_its_permutation():
    ref = torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(1))
    (message,) = diagnose_foreign_tensor("act.3", ref, ref.permute(0, 2, 3, 1).contiguous())
    assert "permute(0, 3, 1, 2)" in message and "NHWC" in message and "bitwise" in message


def test_foreign_transposed_head_output():
    ref = torch.randn(2, 12, 21)
    (message,) = diagnose_foreign_tensor("act.22.scores", ref, ref.transpose(1, 2).contiguous())
    assert "permute(0, 2, 1)" in message and "anchors-major" in message


def test_foreign_float64_and_float16():
    ref = _ref4()
    (f64,) = diagnose_foreign_tensor("act.3", ref, ref.double())
    assert "float64 (F64)" in f64 and "float32 (F32)" in f64 and "matches the reference bitwise" in f64
    (f16,) = diagnose_foreign_tensor("act.3", ref, ref.half())
    assert "half precision" in f16 and "still differs" in f16


def test_foreign_big_endian():
    ref = _ref4()
    swapped = ref.contiguous().view(torch.uint8).reshape(-1, 4).flip(1).contiguous().view(torch.float32).reshape(ref.shape)
    (message,) = diagnose_foreign_tensor("act.3", ref, swapped)
    assert "big-endian" in message


def test_foreign_bgr_and_pixel_range():
    img = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    assert "BGR" in diagnose_foreign_tensor("batch.img", img, img.flip(1))[0]
    assert "0..255" in diagnose_foreign_tensor("batch.img", img, img * 255)[0]


def test_foreign_box_channels_bin_major():
    ref = torch.randn(2, 64, 21)
    bin_major = ref.reshape(2, 4, 16, 21).transpose(1, 2).reshape(2, 64, 21)
    messages = diagnose_foreign_tensor("act.23.boxes", ref, bin_major)
    assert any("bin-major" in m for m in messages), messages


def test_foreign_levels_reversed():
    ref = torch.randn(2, 12, 21 * 4)  # levels of 64, 16 and 4 anchors
    parts = torch.split(ref, [64, 16, 4], dim=-1)
    messages = diagnose_foreign_tensor("act.22.scores", ref, torch.cat(parts[::-1], -1))
    assert any("coarsest first" in m for m in messages), messages


def test_foreign_flattened_and_unrelated_shapes():
    ref = _ref4()
    (flat,) = diagnose_foreign_tensor("act.3", ref, ref.reshape(2, -1))
    assert "only the shape differs" in flat
    (other,) = diagnose_foreign_tensor("act.3", ref, torch.zeros(2, 5, 7, 4))
    assert "dim 3" in other


def test_foreign_concat_inputs_swapped():
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    messages = diagnose_foreign_tensor("act.12", torch.cat([a, b], 1), torch.cat([b, a], 1))
    assert any("Concat with its inputs swapped" in m for m in messages), messages


def test_foreign_nothing_to_say_about_equal_or_plainly_different_tensors():
    ref = _ref4()
    assert diagnose_foreign_tensor("act.3", ref, ref.clone()) == []
    assert diagnose_foreign_tensor("act.3", ref, ref + 1.0) == []


# ========================================================================================== foreign names
def test_name_suggestions():
    known = list(Dump(Y11).index)
    assert nearest_names("activations.23.boxes", known)[0] == "act.23.boxes"
    assert nearest_names("model.0.bn.gamma", known)[0] == "model.0.bn.weight"  # MindSpore
    assert nearest_names("model.0.bn.moving_variance", known)[0] == "model.0.bn.running_var"
    assert nearest_names("model/23/cv2/0/2/bias", known)[0] == "model.23.cv2.0.2.bias"
    assert nearest_names("model.model.4.cv1.conv.weight", known)[0] == "model.4.cv1.conv.weight"
    assert nearest_names("act.23.cls", known)[0] == "act.23.scores"
    assert nearest_names("init.cls_bias.1", known)[0] == "init.cls_bias.1.stored"
    assert "act.23.cv3.0.2" in nearest_names("act.23.cv3.0.3", known)
    problem = name_problem("act.99", known)
    assert problem is not None and "layers 0..23" in problem.message
    assert name_problem("act.23.boxes", known) is None
    assert name_problem("act.9.m#2") is None and name_problem("loss.default.assign.fg_mask") is None
    assert name_problem("feats.0") is not None


# ========================================================================================== foreign dumps
def _write_candidate(path: Path, tensors: dict[str, torch.Tensor], manifest: dict | None = None,
                     file: str = "out.safetensors") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / file))
    if manifest is not False:
        manifest = {"schema": "yolo-parity-dump", "schema_version": 1, "kind": "candidate", **(manifest or {})}
        (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def _codes(problems) -> dict[str, list]:
    out: dict[str, list] = {}
    for p in problems:
        out.setdefault(p.code, []).append(p)
    return out


def test_candidate_dump_without_index_is_fine(tmp_path):
    path = _write_candidate(tmp_path / "d", {"act.0": torch.zeros(2, 8, 4, 4)})
    problems = check_candidate_dump(path)
    assert [p.code for p in problems] == ["no-index"] and problems[0].severity == "info"
    assert Dump(path).names() == ["act.0"]


def test_truncated_and_corrupt_files_are_named(tmp_path):
    path = _write_candidate(tmp_path / "d", {"act.0": torch.zeros(2, 8, 4, 4), "act.1": torch.ones(3)})
    data = (path / "out.safetensors").read_bytes()
    (path / "out.safetensors").write_bytes(data[:-20])
    truncated = _codes(check_candidate_dump(path))["truncated"]
    assert "cut short" in truncated[0].message and truncated[0].tensor in ("act.0", "act.1")
    (path / "out.safetensors").write_bytes(data[:5])
    assert "8-byte" in _codes(check_candidate_dump(path))["truncated"][0].message
    length = struct.unpack("<Q", data[:8])[0]
    (path / "out.safetensors").write_bytes(data[:8] + b"{not json" + data[17:])
    assert "not valid JSON" in _codes(check_candidate_dump(path))["corrupt-header"][0].message
    assert length > 0


def test_big_endian_header_length(tmp_path):
    path = tmp_path / "be.safetensors"
    save_file({"act.0": torch.zeros(4)}, str(path))
    data = path.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    path.write_bytes(struct.pack(">Q", length) + data[8:])
    _, problems = check_safetensors_file(path)
    assert problems and "big-endian" in problems[0].message


@pytest.mark.parametrize("manifest, code, words", [
    ({"schema_version": 2}, "schema-version", "schema_version 2"),
    ({"schema_version": "1"}, "schema-version", "write the number 1"),
    ({"schema": "yolo-parity-report"}, "schema", "comparison report"),
    ({"schema": "yolo_parity_dump"}, "schema", "misspelled"),
    ({"schema": "yolo-parity-layer"}, "schema", "check-layer"),
    ({"kind": "reference"}, "kind", "reference dump"),
])
def test_manifest_problems(manifest, code, words, tmp_path):
    path = _write_candidate(tmp_path / "d", {"act.0": torch.zeros(2)}, manifest)
    found = _codes(check_candidate_dump(path))
    assert code in found and words in found[code][0].message, found


def test_missing_manifest_and_single_file(tmp_path):
    path = _write_candidate(tmp_path / "d", {"act.0": torch.zeros(2)}, manifest=False)
    assert "no-manifest" in _codes(check_candidate_dump(path))
    single = _codes(check_candidate_dump(path / "out.safetensors"))
    assert single["no-manifest"][0].severity == "warning" and "check-layer" in single["no-manifest"][0].message


def test_index_disagreements(tmp_path):
    tensors = {"act.0": torch.zeros(2, 3), "act.1": torch.zeros(4)}
    index = {"act.0": {"file": "out.safetensors", "dtype": "F32", "shape": [3, 2]},
             "act.2": {"file": "other.safetensors", "dtype": "F32", "shape": [1]}}
    path = _write_candidate(tmp_path / "d", tensors, {"tensors": index})
    found = _codes(check_candidate_dump(path))
    assert "shape [3, 2]" in found["index-mismatch"][0].message
    assert "other.safetensors" in found["index-file-missing"][0].message
    assert found["unindexed"][0].tensor == "act.1" and found["unindexed"][0].severity == "warning"


def test_names_dtypes_and_layouts_against_a_reference(tmp_path):
    ref = Dump(Y11)
    act0 = ref.get("act.0")
    tensors = {"act.0": act0.permute(0, 2, 3, 1).contiguous(), "act.1": ref.get("act.1").double(),
               "model.0.bn.gamma": ref.get("model.0.bn.weight"), "act.2": ref.get("act.2")}
    path = _write_candidate(tmp_path / "d", tensors)
    found = _codes(check_candidate_dump(path, reference=ref))
    assert "NHWC" in found["layout"][0].message
    assert "F64" in found["dtype"][0].message and "cast" in found["dtype"][0].message
    assert found["unknown-name"][0].suggestion == "model.0.bn.weight"
    assert not [p for p in check_candidate_dump(path, reference=ref) if p.severity == "error"]


def test_duplicate_names_across_files(tmp_path):
    path = _write_candidate(tmp_path / "d", {"act.0": torch.zeros(2)}, {}, file="a.safetensors")
    save_file({"act.0": torch.ones(2)}, str(path / "b.safetensors"))
    assert "duplicate-name" in _codes(check_candidate_dump(path))


# ===================================================================== candidate dump == live replay
LIVE_ONLY = {"weight-unmapped", "bn-eps", "bn-momentum", "candidate-error", "upsample-mode"}


@pytest.mark.parametrize("inject", [None, "bias-init-float32", "concat-channels", "bn-eps"])
def test_candidate_dump_gives_the_live_verdicts(inject, tmp_path):
    """The built-in candidate written as a candidate DUMP and compared dump-vs-dump gives the live replay's
    verdict, the same chained rows (bitwise the same metrics) and the same findings, except those only a live
    module can produce (its BatchNorm settings, parameters its mapping could not place)."""
    from parity.diagnose.layers import compare_layers

    ref = Dump(Y8)
    # seeded: with concat-channels the candidate holds weights no reference tensor maps onto, which keep their
    # random init; both runs must draw the same one
    torch.manual_seed(0)
    dump_dir = write_candidate_dump(ref, "builtin", tmp_path / "cand", inject=inject)
    assert [p for p in check_candidate_dump(dump_dir, reference=ref) if p.severity != "info"] == []
    torch.manual_seed(0)
    live = compare_layers(ref, "builtin", inject=inject, modes=("chained",), progress=False)
    dumped = compare_layers(ref, str(dump_dir), modes=("chained",), progress=False)
    assert dumped.verdict == live.verdict
    rows = lambda r: {row.name: (row.passed, (row.metrics or {}).get("max_abs")) for row in r.rows  # noqa: E731
                      if row.section == "chained"}
    assert rows(dumped) == rows(live)
    findings = lambda r: {(f.signature, f.where, f.severity) for f in r.findings  # noqa: E731
                          if f.signature not in LIVE_ONLY}
    assert findings(dumped) == findings(live)
    assert {f.signature for f in dumped.findings} - {f.signature for f in live.findings} == set()
    if inject == "bias-init-float32":
        assert ("bias-init-float32", "layer 22, cls bias init, stride 8", "error") in findings(dumped)


def test_candidate_dump_through_the_cli(tmp_path, capsys):
    ref = Dump(Y8)
    dump_dir = write_candidate_dump(ref, "builtin", tmp_path / "cand", inject="upsample-bilinear")
    code = main(["compare", "--reference", str(Y8), "--candidate", str(dump_dir), "--what", "layers",
                 "--json", str(tmp_path / "r.json")])
    assert code == 1
    report = json.loads((tmp_path / "r.json").read_text())
    assert any(f["signature"] == "layer-divergence" and f["where"] == "layer 10" for f in report["findings"])


def test_problems_become_report_findings(tmp_path):
    from parity.compare.foreign import problem_findings, problems_text

    path = _write_candidate(tmp_path / "d", {"act.0": torch.zeros(2)}, {"schema_version": 3})
    problems = check_candidate_dump(path)
    findings = problem_findings(problems)
    assert [f.signature for f in findings] == ["foreign-schema-version"] and findings[0].severity == "error"
    assert "schema_version 3" in problems_text(problems)


def test_dump_compare_names_an_nhwc_tensor_first(tmp_path, fixtures_dir):
    """Through the real compare path: one activation written NHWC is called a layout slip, not a bad layer."""
    from parity.dump.files import Dump, DumpWriter
    from parity.diagnose.layers import compare_layers

    reference = Dump(fixtures_dir / "yolo11-narrow-nc80-96")
    with DumpWriter(tmp_path / "port", kind="candidate") as writer:
        for name in ("act.0", "act.1", "act.2"):
            tensor = reference.get(name)
            writer.add(name, tensor.permute(0, 2, 3, 1).contiguous() if name == "act.1" else tensor)
        writer.commit({})
    report = compare_layers(reference, str(tmp_path / "port"), progress=False)
    assert report.verdict == "divergence"
    layout = [f for f in report.findings if f.signature == "foreign-layout" and f.severity == "error"]
    assert layout and "permute(0, 3, 1, 2)" in layout[0].message and layout[0].where == "layer 1"
