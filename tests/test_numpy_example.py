"""The numpy-only example port (examples/numpy): it never imports torch, and the harness finds it at parity.

Layers 0 and 1 (Conv, stride 2), 9 (SPPF, with its sub-modules), 11 (Upsample) and 12 (Concat) of the committed
yolo11 fixture are exported, run by examples/numpy/yp_numpy.py in a subprocess where `import torch` fails, and
judged by `parity check-layer` under the cpu-fp32 profile.

Measured (float32 im2col + BLAS matmul, float32 BatchNorm): Conv and SPPF outputs differ from torch's by at most
~2.4e-6 absolute (a few hundred to ~1e5 float32 ULPs on near-zero elements), inside the cpu-fp32 isolated
tolerance; Upsample and Concat are bitwise. Computing in float64 does not get closer: the reference itself carries
float32 rounding of the same size.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from parity.cli.main import main
from parity.dump.files import Dump
from parity.runtime import PROJECT_ROOT

CLIENT = PROJECT_ROOT / "examples" / "numpy" / "yp_numpy.py"
FIXTURE = PROJECT_ROOT / "fixtures" / "yolo11-narrow-nc80-96"
LAYERS = (0, 1, 9, 11, 12)

# Runs the client with torch made unimportable: `import torch` (and torch.anything) raises ImportError.
NO_TORCH = """
import runpy, sys
sys.modules["torch"] = None
sys.argv = [{client!r}] + {argv!r}
try:
    runpy.run_path({client!r}, run_name="__main__")
except SystemExit as done:
    code = done.code or 0
else:
    code = 0
assert sys.modules.get("torch") is None, "torch was imported"
assert not [m for m in sys.modules if m.startswith("torch.")], "a torch sub-module was imported"
print("NO_TORCH_OK")
sys.exit(code)
"""


def run_client(argv: list[str]) -> subprocess.CompletedProcess:
    script = NO_TORCH.format(client=str(CLIENT), argv=argv)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=str(PROJECT_ROOT))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("numpy_layers")
    files = {}
    for layer in LAYERS:
        files[layer] = root / f"layer{layer}.safetensors"
        assert main(["export-layer", "--reference", str(FIXTURE), "--layer", str(layer), "--out",
                     str(files[layer])]) == 0
    return files


@pytest.fixture(scope="module")
def outputs(exported, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("numpy_out")
    result = run_client(["--layer-file", *map(str, exported.values()), "--out-dir", str(root / "out"),
                         "--dump", str(root / "dump")])
    assert result.returncode == 0, result.stderr
    assert "NO_TORCH_OK" in result.stdout
    return root / "out", root / "dump"


def _check(layer_file: Path, output: Path, capsys) -> tuple[int, dict]:
    capsys.readouterr()
    code = main(["check-layer", "--layer-file", str(layer_file), "--output", str(output), "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_client_cannot_import_torch():
    result = subprocess.run([sys.executable, "-c", "import sys; sys.modules['torch'] = None\n"
                             "try:\n import torch\nexcept ImportError:\n print('blocked')"],
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "blocked"
    assert "import torch" not in CLIENT.read_text().replace("no torch", "")


@pytest.mark.parametrize("layer", LAYERS)
def test_numpy_port_is_at_parity(layer, exported, outputs, capsys):
    out_dir, _ = outputs
    code, report = _check(exported[layer], out_dir / f"layer{layer}.safetensors", capsys)
    assert code == 0, [f["message"] for f in report["findings"]]
    rows = [r for r in report["rows"] if r["metrics"]]
    assert rows and all(r["passed"] for r in rows)
    assert report["coverage"]["isolated"]["left_out"] == []
    if layer == 9:
        assert {r["name"] for r in rows} == {"act.9", "act.9.cv1", "act.9.m", "act.9.m#1", "act.9.m#2", "act.9.cv2"}
    worst = max(rows, key=lambda r: r["metrics"]["max_abs"])
    m = worst["metrics"]
    if layer in (11, 12):
        assert m["exact"]  # copies of the input: bitwise
    # how much of the tolerance the float32 numpy arithmetic uses (min_atol: the atol it would have needed)
    print(f"\nlayer {layer}: worst {worst['name']} max|d| {m['max_abs']:.3g}, max ulp {m['max_ulp']}, needs atol "
          f"{m['min_atol']:.3g} of the {m['effective_atol']:.3g} allowed")


def test_numpy_dump_is_accepted_by_compare(outputs):
    from parity.compare.foreign import check_candidate_dump
    from parity.diagnose.layers import compare_layers

    _, dump = outputs
    reference = Dump(FIXTURE)
    assert [p for p in check_candidate_dump(dump, reference=reference) if p.severity != "info"] == []
    report = compare_layers(reference, str(dump), progress=False)
    assert report.verdict == "parity", [f.message for f in report.findings]
    assert report.coverage["chained"]["compared"] == len(LAYERS)


def test_a_porting_mistake_is_caught(exported, tmp_path, capsys):
    """SPPF.cv1 without SiLU (what ultralytics does for YOLO26 yaml rows, not yolo11's): found at act.9.cv1."""
    out = tmp_path / "sppf.safetensors"
    result = run_client(["--layer-file", str(exported[9]), "--out", str(out), "--sppf-cv1-act", "none"])
    assert result.returncode == 0, result.stderr
    code, report = _check(exported[9], out, capsys)
    assert code == 1
    sub = next(f for f in report["findings"] if f["signature"] == "sub-block-divergence")
    assert sub["where"] == "layer 9, cv1"
