"""Numeric command-line options, checked before any work is done: a value out of range is exit 2, never a
traceback from deep inside ultralytics or OpenCV (`--imgsz 0` used to reach cv2.resize).

The rules are keyed by the argparse destination, so every sub-command that uses one of these names (dump,
compare, map, envelope, export-layer, drift, ...) is checked the same way, wherever it registered the option.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from parity.errors import ParityError

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


__all__ = ["RULES", "UsageError", "validate_numbers"]
