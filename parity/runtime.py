"""Process-wide settings every command needs before torch or ultralytics do any work.

ultralytics reads its environment at import time, so `prepare()` must run before the first import of it.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_THREADS = 2


def threads_from_environment() -> int:
    """$PARITY_THREADS, else DEFAULT_THREADS (docs/python-api.md, 'Threads')."""
    value = os.environ.get("PARITY_THREADS", "").strip()
    if not value:
        return DEFAULT_THREADS
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1:
        from parity.errors import ParityError

        raise ParityError(f"PARITY_THREADS={value!r}: expected a thread count, 1 or more")
    return threads


def prepare(threads: int | None = None) -> int:
    """Keep ultralytics offline and out of the home directory, and pin the torch thread count.

    The thread count changes float results by ~1e-6 relative, so it is set explicitly and recorded.
    Returns the thread count in force.
    """
    os.environ["YOLO_OFFLINE"] = "1"
    config_dir = os.environ.get("YOLO_CONFIG_DIR") or str(PROJECT_ROOT / "runs" / "ultralytics-config")
    os.environ["YOLO_CONFIG_DIR"] = config_dir
    Path(config_dir).mkdir(parents=True, exist_ok=True)
    threads = threads or threads_from_environment()
    # ultralytics sets OMP_NUM_THREADS=1 when unset; we decide instead.
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    # cuBLAS reads this once, at its first call: deterministic CUDA matmuls need it set before any work.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import torch

    torch.set_num_threads(threads)
    return threads


def versions() -> dict:
    import numpy
    import safetensors
    import torch

    import parity

    try:
        from importlib.metadata import version

        ultralytics_version = version("ultralytics")
    except Exception:  # noqa: BLE001 - a dump written without ultralytics installed (a port) is still valid
        ultralytics_version = None
    return {
        "tool": parity.__version__,
        "ultralytics": ultralytics_version,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }


def environment(device: str) -> dict:
    import torch

    info = {
        "device": device,
        "device_name": platform.processor() or platform.machine(),
        "cuda": None,
        "cudnn": None,
        "driver": None,
        **tf32_state(),
        "deterministic_algorithms": bool(torch.are_deterministic_algorithms_enabled()),
        "deterministic_warn_only": bool(torch.is_deterministic_algorithms_warn_only_enabled()),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        info["device_name"] = torch.cuda.get_device_name(index)
        info["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(index)))
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        info["driver"] = _nvidia_driver()
        info["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
        info["fp16_reduced_precision_reduction"] = bool(torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction)
        info["bf16_reduced_precision_reduction"] = bool(torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction)
    else:
        info["tf32_matmul"] = False
        info["tf32_cudnn"] = False
    return info


def tf32_state() -> dict:
    """TF32 as torch's `fp32_precision` settings say. The legacy `allow_tf32` flags are never read: torch
    refuses them (RuntimeError) once anything in the process has used the new API."""
    import torch

    matmul = torch.backends.cuda.matmul.fp32_precision
    conv = torch.backends.cudnn.conv.fp32_precision
    return {"tf32_matmul": matmul == "tf32", "tf32_cudnn": conv == "tf32",
            "fp32_precision_matmul": matmul, "fp32_precision_cudnn_conv": conv}


def set_tf32(enabled: bool) -> tuple[str, str]:
    """Turn TF32 on or off for CUDA matmuls and cuDNN convolutions; returns the settings it replaced."""
    import torch

    saved = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    value = "tf32" if enabled else "ieee"
    torch.backends.cuda.matmul.fp32_precision = value
    torch.backends.cudnn.conv.fp32_precision = value
    return saved


def restore_tf32(saved: tuple[str, str]) -> None:
    import torch

    torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved


def _nvidia_driver() -> str | None:
    try:
        import subprocess

        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=False,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, IndexError, Exception):  # noqa: BLE001 - the driver version is informative only
        return None


def check_device(device: str) -> None:
    """Fail early, as bad input, when the requested device does not exist here."""
    from parity.errors import ParityError

    import torch

    if device == "cpu":
        return
    import re

    if re.fullmatch(r"cuda(:\d+)?", device):
        if not torch.cuda.is_available():
            raise ParityError(
                f"--device {device} was requested but CUDA is not available on this machine "
                f"(torch {torch.__version__}, torch.cuda.is_available() is False). Use --device cpu."
            )
        index = torch.device(device).index or 0
        if index >= torch.cuda.device_count():
            raise ParityError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) present")
        return
    raise ParityError(f"--device {device!r} is not understood: expected 'cpu', 'cuda' or 'cuda:N'")


def python_executable() -> str:
    return sys.executable
