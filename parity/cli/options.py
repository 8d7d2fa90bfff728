"""Options more than one command shares, as option groups (`add(parser)`, then `config(args)` for the typed
value they stand for), and the numeric checks every command's options go through.

Numeric options are checked before any work is done: a value out of range is exit 2, never a traceback from
deep inside ultralytics or OpenCV (`--imgsz 0` used to reach cv2.resize). The rules are keyed by the argparse
destination, so every sub-command that uses one of these names (dump, compare, map, envelope, export-layer,
drift, ...) is checked the same way, wherever it registered the option.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from parity.errors import ParityError

if TYPE_CHECKING:
    from parity.capture import CaptureConfig

# ultralytics' detection models downsample by 32 at their coarsest level (P5); a P6 model needs 64, which the
# capture checks once the model is built.
LARGEST_P5_STRIDE = 32
MAX_SEED = 2**32 - 1  # numpy's seed range; torch accepts it too
MAX_THREADS = 1024


class UsageError(ParityError):
    """An option argparse could not read, or a value outside its range."""


@dataclass(frozen=True)
class Rule:
    flag: str
    ok: Callable[[int], bool]
    expected: str


RULES: dict[str, Rule] = {
    "nc": Rule("--nc", lambda v: v >= 1, "must be at least 1"),
    "imgsz": Rule("--imgsz", lambda v: v > 0 and v % LARGEST_P5_STRIDE == 0,
                  f"must be a positive multiple of the largest stride ({LARGEST_P5_STRIDE})"),
    "batch": Rule("--batch", lambda v: v >= 1, "must be at least 1"),
    "seed": Rule("--seed", lambda v: 0 <= v <= MAX_SEED, f"must be between 0 and {MAX_SEED}"),
    "threads": Rule("--threads", lambda v: 1 <= v <= MAX_THREADS, f"must be between 1 and {MAX_THREADS}"),
    "threads_list": Rule("--threads-list", lambda v: 1 <= v <= MAX_THREADS,
                         f"values must be between 1 and {MAX_THREADS}"),
    "layer": Rule("--layer", lambda v: v >= 0, "must be a layer index, 0 or more"),
    "limit": Rule("--limit", lambda v: v >= 1, "must be at least 1"),
}


def validate_numbers(values: dict) -> None:
    """Raise UsageError (exit 2) for the first numeric option outside its range. `values`: vars(namespace)."""
    for dest, rule in RULES.items():
        value = values.get(dest)
        if value is None or isinstance(value, bool):
            continue
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, int) and not rule.ok(item):
                raise UsageError(f"{rule.flag} {rule.expected}, got {item}")


class GlobalOptions:
    """`--threads`, `--no-progress`, `--no-verify`: given before the command or after it."""

    @staticmethod
    def add(parser: argparse.ArgumentParser, *, after_command: bool = False) -> None:
        # After the command, SUPPRESS keeps the command's parser from resetting what was given before it.
        unset, off = (argparse.SUPPRESS, argparse.SUPPRESS) if after_command else (None, False)
        parser.add_argument("--threads", type=int, default=unset,
                            help="torch CPU threads (default 2, or $PARITY_THREADS; recorded in dumps)")
        parser.add_argument("--no-progress", action="store_true", default=off, help="no progress bars")
        parser.add_argument("--no-verify", action="store_true", default=off,
                            help="do not check tensors against their manifest checksums as they are read (the "
                                 "report says so)")

    @staticmethod
    def threads(args: argparse.Namespace) -> int | None:
        return args.threads

    @staticmethod
    def progress(args: argparse.Namespace) -> bool:
        """Progress bars were not refused (they still show only on a terminal)."""
        return not getattr(args, "no_progress", False)

    @staticmethod
    def verify(args: argparse.Namespace) -> bool:
        return not getattr(args, "no_verify", False)


CAPTURE_DEFAULTS = dict(model="yolo11n.yaml", nc=80, imgsz=640, batch=2, seed=0, device="cpu", images="assets",
                        init="perturbed", precision="fp32")


class CaptureOptions:
    """What a reference capture records (`parity dump`), and so which default dump `compare` and `map` read."""

    @staticmethod
    def add(parser: argparse.ArgumentParser) -> None:
        d = CAPTURE_DEFAULTS
        parser.add_argument("--model", default=d["model"], help="ultralytics model yaml (default %(default)s)")
        parser.add_argument("--nc", type=int, default=d["nc"], help="number of classes (default %(default)s)")
        parser.add_argument("--imgsz", type=int, default=d["imgsz"], help="image size (default %(default)s)")
        parser.add_argument("--batch", type=int, default=d["batch"], help="batch size (default %(default)s)")
        parser.add_argument("--seed", type=int, default=d["seed"], help="seed for weights and data")
        parser.add_argument("--device", default=d["device"], help="cpu, cuda or cuda:N")
        parser.add_argument("--images", default=d["images"],
                            help="'assets' (bus.jpg, zidane.jpg), 'synthetic', or a folder of images with YOLO .txt "
                                 "labels")
        parser.add_argument("--init", default=d["init"], choices=("perturbed", "pristine"),
                            help="perturbed: BatchNorm perturbed and calibrated so every layer carries signal")
        parser.add_argument("--precision", default=d["precision"], choices=("fp32", "tf32", "fp16", "bf16"))

    @staticmethod
    def config(args: argparse.Namespace, **more) -> "CaptureConfig":
        """The `CaptureConfig` the options stand for; `more`: fields other option groups decide (steps, train)."""
        from parity.capture import CaptureConfig

        return CaptureConfig(model=args.model, nc=args.nc, imgsz=args.imgsz, batch=args.batch, seed=args.seed,
                             device=args.device, images=args.images, init=args.init, precision=args.precision,
                             **more)


__all__ = ["CAPTURE_DEFAULTS", "CaptureOptions", "GlobalOptions", "RULES", "UsageError", "validate_numbers"]
