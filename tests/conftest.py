import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("YOLO_CONFIG_DIR", str(ROOT / "runs" / "ultralytics-config"))
os.environ["YOLO_OFFLINE"] = "1"
# The committed fixtures are compared bit for bit, and torch's CPU kernels round differently per instruction set
# (AVX-512 vs AVX2 convolutions and reductions differ in the last bits). Every x86-64 machine that can run the
# suite has AVX2, so the suite pins it; it must be set before torch is imported. `make fixtures` pins the same.
for _variable, _value in (("ATEN_CPU_CAPABILITY", "avx2"), ("ONEDNN_MAX_CPU_ISA", "AVX2")):
    os.environ.setdefault(_variable, _value)

from parity.runtime import prepare  # noqa: E402

prepare()

FIXTURES = ROOT / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def small_capture():
    """`run_capture` of yolo11-narrow, nc 80, 64 px, every loss case and gradient: the capture the capture tests
    read, taken once per session. Tests only read it; one that needs a fresh or changed capture takes its own."""
    from parity.capture import CaptureConfig, run_capture

    return run_capture(CaptureConfig(model="fixtures/models/yolo11-narrow.yaml", nc=80, imgsz=64))


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


requires_cuda = pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device; none on this machine")
