"""A candidate dump holding isolated.act.* (each layer on the reference's own inputs) is judged layer by layer."""

import pytest

from parity.replay.export import export_layers, write_candidate_dump
from parity.diagnose.layers import compare_layers


@pytest.fixture(scope="module")
def reference(fixtures_dir):
    return fixtures_dir / "yolov8-narrow-nc12-96"


def _isolated_rows(report):
    return [r for r in report.rows if r.section == "isolated"]


def test_clean_isolated_dump_is_parity_in_both_modes(reference, tmp_path):
    dump = write_candidate_dump(reference, "builtin", tmp_path / "clean", isolated=True)
    report = compare_layers(reference, str(dump), progress=False)
    assert report.verdict == "parity", [f.message for f in report.findings if f.severity == "error"]
    assert {r.where for r in _isolated_rows(report)} >= {f"layer {i}" for i in range(23)}
    assert not any("isolated mode" in note for note in report.coverage.get("not_checked", []))


def test_isolated_dump_puts_an_eps_error_where_it_is_made(reference, tmp_path):
    """bn-eps plants eps 1e-5 in layer 4: the isolated rows fail at layer 4 and at no other layer."""
    dump = write_candidate_dump(reference, "builtin", tmp_path / "eps", inject="bn-eps", isolated=True)
    report = compare_layers(reference, str(dump), progress=False)
    assert report.verdict == "divergence"
    assert report.context["first_divergent_layer"]["isolated"] == 4
    assert {r.where for r in _isolated_rows(report) if not r.passed} == {"layer 4"}


def test_chained_only_dump_says_how_to_get_isolated_verdicts(reference, tmp_path):
    dump = write_candidate_dump(reference, "builtin", tmp_path / "chained")
    report = compare_layers(reference, str(dump), progress=False)
    assert not _isolated_rows(report)
    assert any("write isolated.act.*" in note for note in report.coverage["not_checked"])


def test_export_layers_holds_every_layer_file(reference, tmp_path):
    from safetensors import safe_open
    import json

    out = export_layers(reference, tmp_path / "layers.safetensors")
    with safe_open(str(out), framework="pt") as handle:
        meta = handle.metadata()
        keys = set(handle.keys())
    layers = json.loads(meta["layers"])
    assert meta["schema"] == "yolo-parity-layers" and len(layers) == 23
    assert "layer.0.input.0" in keys and "layer.22.param.model.22.cv2.0.2.bias" in keys
    assert "layer.12.expected.act.12" in keys
    assert json.loads(layers["11"]["inputs"]) == ["act.10", "act.6"]
