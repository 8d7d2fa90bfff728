"""`make fixtures`: regenerate the small committed dumps in fixtures/ that the tests read.

The models are ultralytics' own yaml files at a quarter of the `n` width (fixtures/models/), so a whole dump
with gradients stays around a few MB. `tests/test_fixtures.py` re-dumps each one and demands bitwise equality,
so a change of ultralytics behaviour cannot slip in unnoticed.
"""

from __future__ import annotations

import os
import sys

# tests/conftest.py pins the same instruction set: the fixtures are compared bit for bit, and torch's CPU kernels
# round differently under AVX-512 and AVX2. Set before torch is imported (parity.capture imports it).
for _variable, _value in (("ATEN_CPU_CAPABILITY", "avx2"), ("ONEDNN_MAX_CPU_ISA", "AVX2")):
    os.environ.setdefault(_variable, _value)

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


# The same configuration captured with an older ultralytics release (through its side environment,
# parity/capture/sideenv.py): the tests of `compare --old-reference` and of the drift report read it.
OLD_RELEASE_FIXTURES: dict[str, tuple[str, str]] = {
    "yolov8-narrow-nc12-96-u8.3.200": ("8.3.200", "yolov8-narrow-nc12-96"),
}


def fixture_path(name: str):
    return FIXTURES_DIR / name


def dump_old_release(name: str) -> None:
    """Re-dump an old-release fixture with its ultralytics version (builds the side environment when missing:
    about 5 minutes and 6 GB the first time)."""
    from parity.capture import sideenv

    version, base = OLD_RELEASE_FIXTURES[name]
    config = FIXTURES[base]
    code = sideenv.run_parity(version, ["--no-progress", "dump", "--model", config.model, "--nc", str(config.nc),
                                        "--imgsz", str(config.imgsz), "--out", str(fixture_path(name)), "--force"])
    if code != 0:
        raise SystemExit(f"dumping {name} with ultralytics {version} failed (exit {code})")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    prepare()
    for name, config in FIXTURES.items():
        path = dump_reference(config, fixture_path(name), force=True)
        size = sum(f.stat().st_size for f in path.iterdir())
        print(f"{path.relative_to(PROJECT_ROOT)}: {size / 1e6:.1f} MB")
    if "--old-releases" in argv:
        for name in OLD_RELEASE_FIXTURES:
            dump_old_release(name)
            print(f"fixtures/{name}: dumped with ultralytics {OLD_RELEASE_FIXTURES[name][0]}")
    else:
        print(f"left as committed: {', '.join(OLD_RELEASE_FIXTURES)} (older ultralytics releases; "
              f"`python -m parity.tools.fixtures --old-releases` re-dumps them through their side environments)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
