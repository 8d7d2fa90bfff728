"""`model.legacy_head` says what ultralytics' own instance says, for every family (ports are told to use it)."""

import json
import subprocess
import sys

import pytest

from parity.capture.reference import build_model, head_of

FAMILIES = ["yolov8n.yaml", "yolo11n.yaml", "yolo12n.yaml", "yolo26n.yaml"]


def ultralytics_own_legacy(model_yaml: str) -> bool:
    """The head's `legacy` as a plain ultralytics session sees it: a fresh process, one build, nothing reset."""
    code = ("import json, sys; from ultralytics.nn.tasks import DetectionModel; "
            f"m = DetectionModel({model_yaml!r}, nc=80, verbose=False); print(json.dumps(bool(m.model[-1].legacy)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("model_yaml", FAMILIES)
@pytest.mark.slow  # 2-11 s here (a subprocess, a browser or full-size builds); make test-fast skips it
def test_legacy_head_matches_ultralytics_instance(model_yaml):
    expected = ultralytics_own_legacy(model_yaml)
    assert head_of(build_model(model_yaml, nc=80, seed=0)).legacy is expected
    assert expected is (model_yaml == "yolov8n.yaml")  # only YOLOv8 keeps the legacy class branch


def test_legacy_head_survives_a_later_build():
    """The class attribute parse_model sets is reset after each build; the instance keeps its own value."""
    v8 = build_model("yolov8n.yaml", nc=80, seed=0)
    build_model("yolo11n.yaml", nc=80, seed=0)
    assert head_of(v8).legacy is True


def test_yolov8_fixture_manifest_says_legacy(fixtures_dir):
    manifest = json.loads((fixtures_dir / "yolov8-narrow-nc12-96" / "manifest.json").read_text())
    assert manifest["model"]["legacy_head"] is True
    manifest = json.loads((fixtures_dir / "yolo11-narrow-nc80-96" / "manifest.json").read_text())
    assert manifest["model"]["legacy_head"] is False
