"""`parity dump` and `parity inspect` from the command line: bad input is exit 2 with a clear message."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from parity.cli.main import main
from parity.tools.fixtures import FIXTURES, fixture_path

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--model", "fixtures/models/yolo11-narrow.yaml", "--imgsz", "64", "--no-progress"]


def run_cli(capsys, *argv):
    code = main(["--no-progress", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_dump_then_inspect(tmp_path, capsys):
    out = tmp_path / "dump"
    code, stdout, _ = run_cli(capsys, "dump", *SMALL, "--out", str(out))
    assert code == 0 and (out / "manifest.json").exists()
    code, stdout, _ = run_cli(capsys, "inspect", str(out), "--verify")
    assert code == 0
    assert "Detect" in stdout and "C2PSA" in stdout and "cls_loss" in stdout and "no_boxes" in stdout


@pytest.mark.parametrize("name", list(FIXTURES))
def test_inspect_reads_every_fixture(name, capsys):
    code, stdout, _ = run_cli(capsys, "inspect", str(fixture_path(name)))
    assert code == 0 and "Detect" in stdout and "default" in stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "yolo99n.yaml"], "unknown model yaml"),
        (["--imgsz", "100"], "multiple of the largest stride (32)"),
        (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "cuda"),
        (["--device", "tpu"], "not understood"),
        (["--images", "/nonexistent/folder"], "expected 'assets', 'synthetic' or a folder"),
        (["--nc", "0"], "--nc must be at least 1"),
    ],
)
def test_bad_input_is_exit_2_and_writes_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "dump"
    code, _, err = run_cli(capsys, "dump", *SMALL, *argv, "--out", str(out))
    assert code == 2
    assert message.lower() in " ".join(err.split()).lower()
    assert "Traceback" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.slow  # 1-2 s here (a full compare or capture); make test-fast skips it
def test_existing_output_needs_force_and_force_replaces_only_a_dump(tmp_path, capsys):
    out = tmp_path / "dump"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "dump", *SMALL, "--out", str(out))
    assert code == 2 and "--force" in err
    assert (out / "keep.txt").read_text() == "mine"
    code, _, err = run_cli(capsys, "dump", *SMALL, "--out", str(out), "--force")
    assert code == 2 and "--force replaces only a dump" in err and "keep.txt" in err
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    out.rmdir()
    assert run_cli(capsys, "dump", *SMALL, "--out", str(out))[0] == 0
    first = (out / "manifest.json").read_text()
    code, _, _ = run_cli(capsys, "dump", *SMALL, "--out", str(out), "--force", "--seed", "1")
    assert code == 0 and (out / "manifest.json").read_text() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dump"]


def test_unreadable_image_is_named(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    (images / "broken.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    code, _, err = run_cli(capsys, "dump", *SMALL, "--images", str(images), "--out", str(tmp_path / "d"))
    assert code == 2 and "broken.jpg" in err and not (tmp_path / "d").exists()


@pytest.mark.parametrize(
    "label, message",
    [("0 0.5 0.5 0.2\n", "expected 'class cx cy w h'"), ("0 0.5 0.5 1.7 0.2\n", "normalized"),
     ("99 0.5 0.5 0.2 0.2\n", "class 99 is outside")],
)
def test_bad_label_file_is_named_with_its_line(tmp_path, capsys, label, message):
    import shutil

    from parity.capture.batch import ultralytics_assets

    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(ultralytics_assets() / "bus.jpg", images / "bus.jpg")
    (images / "bus.txt").write_text(label)
    code, _, err = run_cli(capsys, "dump", *SMALL, "--images", str(images), "--out", str(tmp_path / "d"))
    flat = " ".join(err.split())
    assert code == 2 and "bus.txt:1" in flat and message in flat


def test_missing_label_file_is_named(tmp_path, capsys):
    import shutil

    from parity.capture.batch import ultralytics_assets

    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(ultralytics_assets() / "zidane.jpg", images / "zidane.jpg")
    code, _, err = run_cli(capsys, "dump", *SMALL, "--images", str(images), "--out", str(tmp_path / "d"))
    assert code == 2 and "zidane.txt" in err


def test_synthetic_images(tmp_path, capsys):
    code, _, _ = run_cli(capsys, "dump", *SMALL, "--images", "synthetic", "--out", str(tmp_path / "d"))
    assert code == 0


def test_inspect_of_a_non_dump_is_exit_2(tmp_path, capsys):
    code, _, err = run_cli(capsys, "inspect", str(tmp_path))
    assert code == 2 and "no manifest.json" in err


@pytest.mark.slow  # 2-11 s here (a subprocess, a browser or full-size builds); make test-fast skips it
def test_nothing_is_written_to_the_home_directory(tmp_path):
    """ultralytics writes settings.json under the home directory unless told otherwise."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("YOLO_CONFIG_DIR", "YOLO_OFFLINE")}
    env["HOME"] = str(home)
    result = subprocess.run(
        [sys.executable, "-m", "parity", "--no-progress", "dump", *SMALL, "--out", str(tmp_path / "d")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert list(home.rglob("*")) == []
