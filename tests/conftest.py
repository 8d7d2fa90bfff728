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


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


requires_cuda = pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device; none on this machine")
