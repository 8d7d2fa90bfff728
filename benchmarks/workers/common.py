"""What every worker shares: its log line, the repeat loop that respects the time budget, a synchronised timer,
and the capture configuration of one benchmark point."""

from __future__ import annotations

import sys
import time
from typing import Callable

_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def log(message: str) -> None:
    print(f"    {message}", file=sys.stderr, flush=True)


class Repeats:
    """Up to `repeats` rounds, but none started that would end past `deadline` (epoch seconds) once
    `minimum` rounds are done; `stopped` says how many were run when time ran out."""

    def __init__(self, params: dict, repeats: int | None = None):
        self.total = int(params["repeats"] if repeats is None else repeats)
        self.minimum = min(self.total, int(params.get("min_repeats", 1)))
        self.deadline = params.get("deadline")
        self.stopped: int | None = None

    def __iter__(self):
        t0 = time.time()
        for rep in range(self.total):
            if self.deadline and rep >= self.minimum:
                per_round = (time.time() - t0) / rep
                if time.time() + per_round > self.deadline:
                    self.stopped = rep
                    log(f"stopping after {rep} of {self.total} repeats: the time budget is spent")
                    return
            yield rep


def sync_for(device: str) -> Callable[[], None]:
    import torch

    if device.startswith("cuda"):
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def timed_forward(model, img, grad: bool, sync: Callable[[], None]) -> float:
    """Seconds of one train-mode forward, with or without autograd, synchronised on both ends."""
    import torch

    sync()
    t0 = time.perf_counter()
    with torch.set_grad_enabled(grad):
        preds = model(img)
    sync()
    del preds
    return time.perf_counter() - t0


def model_yaml(params: dict) -> str:
    return params.get("model") or params["template"].format(scale=params["scale"])


def capture_config(params: dict, **overrides):
    from parity.capture import CaptureConfig

    config = CaptureConfig(model=model_yaml(params), nc=params.get("nc", 80), imgsz=params["imgsz"],
                           batch=params["batch"], seed=0, device=params.get("device", "cpu"),
                           images=params.get("images", "assets"))
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def dtype_size(name: str) -> int:
    return _DTYPE_SIZES.get(name, 4)


def tensor_bytes(entry: dict) -> int:
    """Bytes of one tensor of a dump's index."""
    import math

    return math.prod(entry["shape"]) * dtype_size(entry["dtype"])
