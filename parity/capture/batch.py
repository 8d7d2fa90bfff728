"""The batch a reference dump is captured on: images letterboxed as ultralytics does, and ground truth.

Three sources: the two images that ship inside ultralytics with hand-made boxes (`assets`, the default), a
seeded random batch (`synthetic`), or a folder of images with YOLO-format `.txt` labels beside them.
The loss cases of docs/dump-format.md are derived here from the default ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from parity.errors import ParityError
from parity.runtime import PROJECT_ROOT

ASSET_IMAGES = ("bus.jpg", "zidane.jpg")
ASSET_LABELS = PROJECT_ROOT / "fixtures" / "labels"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SMALL_BOX_PX = 6  # below the assigner's 16 px floor, so the floor is exercised


@dataclass
class Targets:
    cls: torch.Tensor  # (N, 1) float32
    bboxes: torch.Tensor  # (N, 4) float32, normalized cx cy w h on the letterboxed image
    batch_idx: torch.Tensor  # (N,) float32, sorted

    @property
    def count(self) -> int:
        return int(self.cls.shape[0])


@dataclass
class Batch:
    img: torch.Tensor  # (B, 3, H, W) float32 RGB in [0, 1]
    cases: dict[str, Targets]
    source: str
    notes: list[str]

    def as_loss_batch(self, case: str = "default") -> dict[str, torch.Tensor]:
        """The dict `model.loss(batch)` expects."""
        t = self.cases[case]
        return {"img": self.img, "cls": t.cls, "bboxes": t.bboxes, "batch_idx": t.batch_idx}


def ultralytics_assets() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("ultralytics")
    return Path(spec.origin).parent / "assets"


def load_batch(images: str, *, imgsz: int, batch: int, nc: int, seed: int) -> Batch:
    if images == "synthetic":
        return synthetic_batch(imgsz=imgsz, batch=batch, nc=nc, seed=seed)
    if images == "assets":
        folder, labels, fold_classes = ultralytics_assets(), ASSET_LABELS, True
        files = [folder / name for name in ASSET_IMAGES]
    else:
        folder = Path(images)
        if not folder.is_dir():
            raise ParityError(f"--images {images!r}: expected 'assets', 'synthetic' or a folder of images")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ParityError(f"--images {folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        labels, fold_classes = folder, False
    # A batch larger than the image set cycles through it, so BATCH=16 works on the two shipped images.
    chosen = [files[i % len(files)] for i in range(batch)]
    notes = []
    if fold_classes and nc < 80:
        notes.append(f"class ids of the shipped ground truth taken modulo nc={nc}")
    imgs, rows = [], []
    for index, path in enumerate(chosen):
        image, (ratio, left, top, orig_h, orig_w) = _letterbox(path, imgsz)
        imgs.append(image)
        for cls, cx, cy, w, h in _read_labels(labels / (path.stem + ".txt"), nc, fold_classes):
            x1, y1 = (cx - w / 2) * orig_w * ratio + left, (cy - h / 2) * orig_h * ratio + top
            x2, y2 = (cx + w / 2) * orig_w * ratio + left, (cy + h / 2) * orig_h * ratio + top
            rows.append((index, cls, (x1 + x2) / 2 / imgsz, (y1 + y2) / 2 / imgsz, (x2 - x1) / imgsz, (y2 - y1) / imgsz))
    img = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous().float() / 255.0
    default = _targets(rows)
    return Batch(img=img, cases=derive_cases(default, imgsz), source=str(images), notes=notes)


def _letterbox(path: Path, imgsz: int):
    import cv2
    from ultralytics.data.augment import LetterBox

    bgr = cv2.imread(str(path))
    if bgr is None:
        raise ParityError(f"cannot read image {path}: not an image file, or corrupt")
    letterbox = LetterBox(new_shape=(imgsz, imgsz), auto=False, scaleup=True)
    from parity.capture import compat

    params = compat.letterbox_params(letterbox, bgr)
    out = letterbox(image=bgr)
    rgb = np.ascontiguousarray(out[..., ::-1])
    return rgb, (params["ratio"][0], params["left"], params["top"], bgr.shape[0], bgr.shape[1])


def _read_labels(path: Path, nc: int, fold_classes: bool) -> list[tuple[int, float, float, float, float]]:
    if not path.exists():
        raise ParityError(f"no label file {path} for image {path.stem}: expected YOLO-format 'class cx cy w h' lines")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            cls, cx, cy, w, h = int(fields[0]), *map(float, fields[1:5])
            if len(fields) != 5:
                raise ValueError
        except (ValueError, IndexError):
            raise ParityError(
                f"{path}:{number}: expected 'class cx cy w h' (an integer and four floats), found {line.strip()!r}"
            ) from None
        if not all(0.0 <= v <= 1.0 for v in (cx, cy, w, h)):
            raise ParityError(f"{path}:{number}: box values must be normalized to [0, 1], found {line.strip()!r}")
        if fold_classes:
            cls %= nc
        elif not 0 <= cls < nc:
            raise ParityError(f"{path}:{number}: class {cls} is outside 0..{nc - 1} (nc={nc})")
        rows.append((cls, cx, cy, w, h))
    return rows


def _targets(rows: list[tuple]) -> Targets:
    rows = sorted(rows, key=lambda r: r[0])  # the loss needs batch_idx sorted ascending
    if not rows:
        return Targets(torch.zeros(0, 1), torch.zeros(0, 4), torch.zeros(0))
    data = torch.tensor(rows, dtype=torch.float64)
    return Targets(
        cls=data[:, 1:2].float(), bboxes=data[:, 2:6].float().contiguous(), batch_idx=data[:, 0].float().contiguous()
    )


def derive_cases(default: Targets, imgsz: int) -> dict[str, Targets]:
    """The batches that break ports, from the same images (docs/dump-format.md, 'Cases')."""
    first = default.batch_idx == 0
    side = SMALL_BOX_PX / imgsz
    small = Targets(
        cls=torch.zeros(1, 1),
        bboxes=torch.tensor([[0.5, 0.5, side, side]], dtype=torch.float32),
        batch_idx=torch.zeros(1),
    )
    return {
        "default": default,
        "small_box": small,
        "empty_image": Targets(default.cls[first], default.bboxes[first], default.batch_idx[first]),
        "no_boxes": Targets(torch.zeros(0, 1), torch.zeros(0, 4), torch.zeros(0)),
    }


def synthetic_batch(*, imgsz: int, batch: int, nc: int, seed: int) -> Batch:
    generator = torch.Generator().manual_seed(seed + 1000)
    img = torch.rand(batch, 3, imgsz, imgsz, generator=generator)
    rows = []
    for index in range(batch):
        for _ in range(int(torch.randint(2, 6, (1,), generator=generator))):
            w, h = (0.05 + 0.4 * torch.rand(2, generator=generator)).tolist()
            cx = float(w / 2 + (1 - w) * torch.rand(1, generator=generator))
            cy = float(h / 2 + (1 - h) * torch.rand(1, generator=generator))
            rows.append((index, int(torch.randint(0, nc, (1,), generator=generator)), cx, cy, w, h))
    return Batch(img=img, cases=derive_cases(_targets(rows), imgsz), source="synthetic", notes=[])


def calibration_images(*, imgsz: int, batch: int, seed: int) -> torch.Tensor:
    """A separate seeded batch for BatchNorm running statistics, never the captured one."""
    generator = torch.Generator().manual_seed(seed + 2000)
    return torch.rand(max(batch, 2), 3, imgsz, imgsz, generator=generator)
