"""The CUDA worker: the capture and replay benchmarks with `--device cuda`, `torch.cuda.synchronize()` around
every timed region; skipped, with the reason, without a GPU."""

from __future__ import annotations

from benchmarks.workers.replay import worker_replay
from benchmarks.workers.step import worker_step


def worker_cuda(params: dict) -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"skipped": f"CUDA is not available on this machine (torch {torch.__version__}, "
                           f"torch.cuda.is_available() is False)"}
    out = {"device_name": torch.cuda.get_device_name(0), "cuda": torch.version.cuda}
    step_params = {**params, "device": "cuda", "dump": True, "keep_dump": params["keep_dump"], "noop": True,
                   "single_case": False, "dump_each": False}
    out["step"] = worker_step(step_params)
    out["replay"] = worker_replay({"dump": params["keep_dump"], "repeats": params["repeats"], "device": "cuda"})
    return out
