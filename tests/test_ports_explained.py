"""The planted ports of tests/ports/models/ are explained by name through the whole compare (layers, the
counterfactual explainer included), with a bare factory; the faithful ones get no explanation at all."""

import pytest

import parity

V8 = "fixtures/yolov8-narrow-nc12-96"
PLANTED = [
    # port, the cause the explainer names, words its finding carries
    ("scaled_v8", "input-scale", "input=1, k=0.01"),
    ("bilinear_v8", "upsample-mode", "mode=bilinear"),
    ("shortcut_v8", "residual-shortcut", "block=0"),
    ("wrong_p4_v8", "wiring", "layer 22"),
]


def _explained(report):
    return [f for f in report.findings if f.message.startswith("explained by")]


@pytest.mark.parametrize("port,cause,words", PLANTED)
def test_a_planted_port_is_explained_by_name(fixtures_dir, port, cause, words):
    report = parity.compare(fixtures_dir.parent / V8, f"tests.ports.models.{port}:build", what="layers")
    assert report.verdict == "divergence"
    explained = [f for f in _explained(report) if not f.signature.startswith("bias-init")]
    assert explained and explained[0].signature == cause, [f.message for f in report.findings]
    assert words in explained[0].message or words in explained[0].where


@pytest.mark.parametrize("port", ["split_v8", "flat_v8"])
def test_a_faithful_port_is_parity_and_nothing_is_explained(fixtures_dir, port):
    report = parity.compare(fixtures_dir.parent / V8, f"tests.ports.models.{port}:build", what="layers")
    assert report.verdict == "parity", [f.message for f in report.errors]
    assert not _explained(report) and not [f for f in report.findings if f.signature == "unexplained"]
