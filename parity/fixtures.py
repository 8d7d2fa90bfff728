"""`make fixtures`: regenerate the small committed dumps in fixtures/ that the tests read.

The models are ultralytics' own yaml files at a quarter of the `n` width (fixtures/models/), so a whole dump
with gradients stays around a few MB. `tests/test_fixtures.py` re-dumps each one and demands bitwise equality,
so a change of ultralytics behaviour cannot slip in unnoticed.
"""

from __future__ import annotations

import sys

from parity.capture import CaptureConfig, dump_reference
from parity.runtime import PROJECT_ROOT, prepare

FIXTURES_DIR = PROJECT_ROOT / "fixtures"
MODELS_DIR = FIXTURES_DIR / "models"
# Relative to the project root, so manifests do not depend on where the checkout lives.
MODELS = "fixtures/models"

FIXTURES: dict[str, CaptureConfig] = {
    # The everyday fixture: YOLO11 at nc=80, where every bias arithmetic gives the same float32 value.
    "yolo11-narrow-nc80-96": CaptureConfig(model=f"{MODELS}/yolo11-narrow.yaml", nc=80, imgsz=96),
    # YOLOv8 (legacy class head) at nc=12, where pure float32 bias arithmetic is one ULP off.
    "yolov8-narrow-nc12-96": CaptureConfig(model=f"{MODELS}/yolov8-narrow.yaml", nc=12, imgsz=96),
    # YOLO26: end-to-end head (one2many and one2one branches), reg_max 1, E2ELoss.
    "yolo26-narrow-nc12-64": CaptureConfig(model=f"{MODELS}/yolo26-narrow.yaml", nc=12, imgsz=64),
}


def fixture_path(name: str):
    return FIXTURES_DIR / name


def main() -> int:
    prepare()
    for name, config in FIXTURES.items():
        path = dump_reference(config, fixture_path(name), force=True)
        size = sum(f.stat().st_size for f in path.iterdir())
        print(f"{path.relative_to(PROJECT_ROOT)}: {size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
