"""The Jittor client of examples/jittor/ against a real reference: clean is PARITY, each planted variant is named.

Runs only where a Jittor environment is given (`make example-jittor` builds one and sets PARITY_JITTOR_PYTHON);
`make test` skips it, since Jittor's first compile takes minutes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
JITTOR_PYTHON = os.environ.get("PARITY_JITTOR_PYTHON")
pytestmark = pytest.mark.skipif(not JITTOR_PYTHON, reason="no Jittor environment (make example-jittor builds one)")

CLIENT = ROOT / "examples" / "jittor" / "yp_jittor.py"


def _parity(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "parity", "--no-progress", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "COLUMNS": "200"})


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """yolov8n at 160 px (SPPF's P5 map is 5 x 5) and every layer of it in one export-layers file."""
    base = tmp_path_factory.mktemp("jittor")
    dump = base / "ref"
    done = _parity("dump", "--model", "yolov8n.yaml", "--nc", "80", "--imgsz", "160", "--out", str(dump))
    assert done.returncode == 0, done.stderr
    layers = base / "layers.safetensors"
    done = _parity("export-layers", "--reference", str(dump), "--out", str(layers))
    assert done.returncode == 0, done.stderr
    return dump, layers


def _run_client(reference, out: Path, *flags: str) -> Path:
    env = {**os.environ, "nvcc_path": "", "use_mkl": "0",
           "HOME": os.environ.get("PARITY_JITTOR_HOME", str(ROOT / "runs" / "jittor-home"))}
    done = subprocess.run([JITTOR_PYTHON, str(CLIENT), "--layers-file", str(reference[1]), "--out", str(out), *flags],
                          capture_output=True, text=True, env=env, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _compare(reference, candidate: Path) -> tuple[int, dict]:
    report = candidate.parent / f"{candidate.name}-report.json"
    done = _parity("compare", "--reference", str(reference[0]), "--candidate", str(candidate), "--what", "layers",
                   "--json", str(report))
    assert done.returncode in (0, 1), done.stdout + done.stderr
    return done.returncode, json.loads(report.read_text())


def _errors(report: dict) -> list[dict]:
    return [f for f in report["findings"] if f["severity"] == "error"]


@pytest.mark.slow
def test_clean_port_is_parity(reference, tmp_path):
    code, report = _compare(reference, _run_client(reference, tmp_path / "clean"))
    assert code == 0, _errors(report)
    assert report["verdict"] == "parity"
    isolated = [r for r in report["rows"] if r["section"] == "isolated"]
    assert len({r["where"] for r in isolated}) >= 23  # every layer judged on the reference's own inputs


@pytest.mark.slow
def test_integer_division_bias_is_named(reference, tmp_path):
    code, report = _compare(reference, _run_client(reference, tmp_path / "intdiv", "--bias", "intdiv"))
    assert code == 1
    signatures = {f["signature"] for f in _errors(report)}
    assert signatures == {"bias-init-nonfinite"}, signatures


@pytest.mark.slow
def test_bn_eps_is_named_at_layer_0_from_outputs_alone(reference, tmp_path):
    code, report = _compare(reference, _run_client(reference, tmp_path / "eps", "--bn-eps", "1e-5"))
    assert code == 1
    assert report["summary"]["first_divergent_layer"]["isolated"] == 0
    eps = [f for f in report["findings"] if f["signature"] == "bn-eps"]
    assert eps and "layer 0" in eps[0]["where"] and "eps=1e-05" in eps[0]["message"].replace("1e-5", "1e-05")


@pytest.mark.slow
def test_stock_batchnorm_rounding_is_not_called_an_eps_difference(reference, tmp_path):
    _, report = _compare(reference, _run_client(reference, tmp_path / "stock", "--bn", "stock"))
    assert not [f for f in report["findings"] if f["signature"] == "bn-eps"]
