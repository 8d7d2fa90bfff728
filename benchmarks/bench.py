"""Benchmarks of yolo-parity on this machine: `make bench` (`python -m benchmarks.bench`) writes
docs/benchmarks.md and docs/benchmarks.json. Not part of `make test`.

What is measured (every figure a median of several runs, with min and max; spread over 20 % is flagged):

* capture: a full reference dump (`dump_reference`, written to disk) and the capture alone (`run_capture`, no
  disk) against one plain ultralytics training step (forward + loss + backward) on the same batch, with the
  capture's phases timed from its own progress callbacks and a run that does all the capture's work but keeps
  references instead of copies (`Capture.put` replaced), which isolates the cost of the copies;
* replay: `compare_layers` with the built-in candidate, isolated and chained separately, against one plain
  forward (train mode, with and without autograd), with the time split into candidate, metrics and reading;
* compare: a streamed dump-against-dump comparison (`parity.compare.stream`), in GB/s of tensor data judged
  (reference + candidate bytes), against this machine's memory-copy bandwidth measured in the same process
  (read + write bytes, the STREAM convention, so both count the bytes that cross the memory bus);
* memory: peak resident memory of a dump and of a compare, each measured in a fresh subprocess (VmHWM, reset
  per phase through /proc/self/clear_refs, cross-checked with the child's ru_maxrss from wait4);
* growth: batch, image size and model scale, with fitted exponents;
* CUDA: the same capture and replay timings with `torch.cuda.synchronize()` around timed regions, when a GPU
  is present (skipped with the reason otherwise).

Heavy work runs in worker subprocesses (`python -m benchmarks.bench --worker KIND`), so each has its own memory
figures and ultralytics' process-global state never leaks between model sizes. A time budget (default 14
minutes) shrinks repeats and drops the most expensive growth points when the machine is slower than planned;
anything left out is said in the output.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

RESULT_TAG = "PARITY-BENCH-RESULT "
SPREAD_FLAG = 0.20
SCHEMA = "yolo-parity-benchmarks"
SCHEMA_VERSION = 1

TARGETS = {
    "capture_vs_step": 1.3,  # capture (disk excluded) <= 1.3x a plain training step
    "isolated_vs_forward": 2.0,  # isolated replay <= 2x a forward
    "compare_vs_copy": 1 / 3,  # compare throughput >= 1/3 of copy bandwidth
    "compare_memory_pairs": 2.0,  # compare peak < 2x the largest tensor pair + a fixed base
}


# ============================================================================================ statistics
def summarize(values: list[float]) -> dict[str, Any]:
    """Median with spread. `flag` when (max - min) / median exceeds 20 %."""
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0, "spread": None, "flag": False, "values": []}
    median = statistics.median(values)
    lo, hi = min(values), max(values)
    spread = (hi - lo) / median if median else 0.0
    return {"median": median, "min": lo, "max": hi, "n": len(values), "spread": spread,
            "flag": len(values) > 1 and spread > SPREAD_FLAG, "values": values}


def ratio_summary(numerators: list[float], denominators: list[float], *, paired: bool = True) -> dict[str, Any]:
    """Runs measured in the same repeat (interleaved) give paired ratios: their median, min and max. Otherwise a
    ratio of medians, with a spread from the extreme pairings (min/max and max/min)."""
    if paired and numerators and len(numerators) == len(denominators) and all(denominators):
        out = summarize([a / b for a, b in zip(numerators, denominators)])
        out["paired"] = True
        return out
    num, den = summarize(numerators), summarize(denominators)
    if not num["n"] or not den["n"] or not den["median"]:
        return {"median": None, "min": None, "max": None, "n": 0, "spread": None, "flag": False}
    median = num["median"] / den["median"]
    lo, hi = num["min"] / den["max"], num["max"] / den["min"]
    spread = (hi - lo) / median if median else 0.0
    return {"median": median, "min": lo, "max": hi, "n": min(num["n"], den["n"]), "spread": spread,
            "flag": num["flag"] or den["flag"]}


def fit_exponent(xs: list[float], ys: list[float]) -> dict[str, Any] | None:
    """Least-squares slope of log(y) against log(x): y ~ x**k. `per_doubling` = 2**k."""
    pairs = [(float(x), float(y)) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    if len(pairs) < 2:
        return None
    lx = [math.log(x) for x, _ in pairs]
    ly = [math.log(y) for _, y in pairs]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    sxx = sum((a - mx) ** 2 for a in lx)
    if sxx == 0:
        return None
    k = sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sxx
    residual = max(abs(b - (my + k * (a - mx))) for a, b in zip(lx, ly))
    return {"exponent": k, "per_doubling": 2 ** k, "points": len(pairs), "max_log_residual": residual}


# ============================================================================================ memory
def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> float | None:
    kb = _status_kb("VmRSS")
    return kb / 1024 if kb is not None else None


def hwm_mb() -> float | None:
    """Peak resident memory since the process started or since the last `reset_hwm()`."""
    kb = _status_kb("VmHWM")
    if kb is None:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024


def reset_hwm() -> bool:
    """Reset the peak-RSS mark (Linux >= 4.0: `echo 5 > /proc/self/clear_refs`)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class Phase:
    """Peak and starting RSS of one phase of a worker: `with Phase() as p: ...; p.peak_mb, p.start_mb`."""

    def __enter__(self) -> "Phase":
        self.reset = reset_hwm()
        self.start_mb = rss_mb()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.peak_mb = hwm_mb()
        self.end_mb = rss_mb()

    def as_dict(self) -> dict:
        return {"seconds": self.seconds, "start_rss_mb": self.start_mb, "peak_rss_mb": self.peak_mb,
                "end_rss_mb": self.end_mb, "peak_reset": self.reset}


# ============================================================================================ machine
def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version()}
    cpuinfo = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if ":" in line:
                key, value = (s.strip() for s in line.split(":", 1))
                cpuinfo.setdefault(key, value)
    except OSError:
        pass
    info["cpu_model"] = cpuinfo.get("model name") or platform.processor() or platform.machine()
    info["cpu_family_model"] = f"family {cpuinfo.get('cpu family', '?')} model {cpuinfo.get('model', '?')}"
    flags = cpuinfo.get("flags", "").split()
    info["simd"] = [f for f in ("avx2", "avx512f", "fma") if f in flags]
    info["hypervisor"] = "hypervisor" in flags
    info["logical_cpus"] = os.cpu_count()
    try:
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:
        info["usable_cpus"] = os.cpu_count()
    caches = {}
    for index in range(8):
        base = Path(f"/sys/devices/system/cpu/cpu0/cache/index{index}")
        if not base.exists():
            break
        try:
            level = (base / "level").read_text().strip()
            kind = (base / "type").read_text().strip()
            size = (base / "size").read_text().strip()
            shared = (base / "shared_cpu_list").read_text().strip()
            caches[f"L{level} {kind}"] = f"{size} (cpus {shared})"
        except OSError:
            continue
    info["caches"] = caches
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        info["memory_gib"] = round(int(meminfo["MemTotal"].split()[0]) / 2 ** 20, 1)
        info["memory_available_gib_at_start"] = round(int(meminfo["MemAvailable"].split()[0]) / 2 ** 20, 1)
    except (OSError, KeyError, ValueError):
        pass
    return info


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def versions_and_threads() -> dict[str, Any]:
    from parity.runtime import versions

    import torch

    return {"versions": versions(), "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "cuda_available": torch.cuda.is_available()}


# ============================================================================================ workers
def _log(message: str) -> None:
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
                    _log(f"stopping after {rep} of {self.total} repeats: the time budget is spent")
                    return
            yield rep


def _sync_for(device: str) -> Callable[[], None]:
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


def _model_yaml(params: dict) -> str:
    return params.get("model") or params["template"].format(scale=params["scale"])


def _config(params: dict, **overrides):
    from parity.capture import CaptureConfig

    config = CaptureConfig(model=_model_yaml(params), nc=params.get("nc", 80), imgsz=params["imgsz"],
                           batch=params["batch"], seed=0, device=params.get("device", "cpu"),
                           images=params.get("images", "assets"))
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def _capture_timed(config, sync) -> dict[str, float]:
    """run_capture with its phases timed from the progress callbacks it already makes."""
    from parity.capture import run_capture

    stamps: list[tuple[str, float]] = []
    sync()
    t0 = time.perf_counter()
    capture = run_capture(config, lambda step: stamps.append((step, time.perf_counter())))
    sync()
    end = time.perf_counter()
    times = {"total": end - t0}
    marks = [(s, t) for s, t in stamps] + [("end", end)]

    def at(prefix: str) -> float | None:
        return next((t for s, t in marks if s.startswith(prefix)), None)

    fwd, loss, bwd = at("forward pass"), at("loss, case"), at("backward pass")
    times["setup"] = (fwd - t0) if fwd else None
    times["forward"] = (loss - fwd) if fwd and loss else None
    times["losses_and_head_grads"] = ((bwd or end) - loss) if loss else None
    times["backward_and_describe"] = (end - bwd) if bwd else None
    nbytes = sum(t.numel() * t.element_size() for t in capture.tensors.values())
    times["captured_bytes"] = nbytes
    times["captured_tensors"] = len(capture.tensors)
    del capture
    return times


def worker_step(params: dict) -> dict:
    """Plain training step vs capture (no disk) vs dump (disk) for one configuration."""
    import torch

    from parity.capture import dump_reference
    from parity.capture.batch import load_batch
    from parity.capture.reference import Capture, prepare_model
    from parity.dump.files import Dump

    device = params.get("device", "cpu")
    sync = _sync_for(device)
    repeats = int(params["repeats"])
    config = _config(params)
    out: dict[str, Any] = {"config": {"model": config.model, "imgsz": config.imgsz, "batch": config.batch,
                                      "device": device}, "base_rss_mb": rss_mb()}
    workdir = Path(params["workdir"])
    keep = params.get("keep_dump")

    # -- the plain training step on the same batch
    batch = load_batch(config.images, imgsz=config.imgsz, batch=config.batch, nc=config.nc, seed=config.seed)
    model, _ = prepare_model(config, batch)
    out["parameters"] = sum(p.numel() for p in model.parameters())
    img = batch.img.to(device)
    loss_batch = {k: v.to(device) for k, v in batch.as_loss_batch("default").items()}

    def plain_step() -> dict[str, float]:
        sync()
        t0 = time.perf_counter()
        preds = model(img)
        sync()
        t1 = time.perf_counter()
        loss, _items = model.loss(loss_batch, preds)
        sync()
        t2 = time.perf_counter()
        loss.sum().backward()
        sync()
        t3 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        return {"total": t3 - t0, "forward": t1 - t0, "loss": t2 - t1, "backward": t3 - t2}

    # -- memory first, in a fresh process: one plain step, then one dump (or one capture for the biggest points)
    with Phase() as phase:
        plain_step()
    out["memory_plain_step"] = phase.as_dict()
    _log("capture once (memory)")
    with Phase() as phase:
        first = _capture_timed(config, sync)
    out["memory_capture"] = phase.as_dict()
    out["capture_once"] = first
    if params.get("dump"):
        _log("dump once (memory)")
        with Phase() as phase:
            target = Path(keep) if keep else workdir / "mem-dump"
            dump_reference(config, target, force=True)
        out["memory_dump"] = phase.as_dict()
        dump = Dump(target)
        sizes = [math.prod(e["shape"]) * _dtype_size(e["dtype"]) for e in dump.index.values()]
        out["dump"] = {"bytes_on_disk": dump.nbytes(), "tensors": len(dump.index), "tensor_bytes": sum(sizes),
                       "largest_tensor_bytes": max(sizes), "first_seconds": phase.seconds,
                       "parameters": dump.model.get("parameters")}
        if not keep:
            shutil.rmtree(target, ignore_errors=True)

    plain_step()  # warm-up, excluded
    series: dict[str, list] = {k: [] for k in ("plain", "capture", "capture_noop", "capture_single", "dump",
                                               "forward_grad", "forward_nograd")}
    original_put = Capture.put
    rounds = Repeats(params)
    for rep in rounds:
        _log(f"repeat {rep + 1}/{repeats}: plain step, capture" + (", dump" if params.get("dump_each") else ""))
        series["plain"].append(plain_step())
        series["forward_grad"].append(timed_forward(model, img, True, sync))
        series["forward_nograd"].append(timed_forward(model, img, False, sync))
        series["capture"].append(_capture_timed(config, sync))
        if params.get("noop"):
            Capture.put = _put_reference  # same work, references kept instead of copies
            try:
                series["capture_noop"].append(_capture_timed(config, sync))
            finally:
                Capture.put = original_put
        if params.get("single_case"):
            series["capture_single"].append(_capture_timed(_config(params, cases=("default",)), sync))
        if params.get("dump_each"):
            target = workdir / f"timed-dump-{rep}"
            sync()
            t0 = time.perf_counter()
            dump_reference(config, target, force=True)
            series["dump"].append({"total": time.perf_counter() - t0})
            shutil.rmtree(target, ignore_errors=True)
    out["series"] = {k: v for k, v in series.items() if v}
    out["stopped_early"] = rounds.stopped
    out["contiguity"] = _contiguity_probe(config) if params.get("contiguity") else None
    return out


def _put_reference(self, name, tensor) -> None:
    """`Capture.put` without the copy: keeps a reference, so a capture does all its work but copies nothing."""
    self.tensors[name] = tensor.detach()


def _contiguity_probe(config) -> dict:
    """How many captured tensors are not contiguous (DumpWriter.add then copies them a second time)."""
    from parity.capture import run_capture

    capture = run_capture(config)
    odd = [(n, t.numel() * t.element_size()) for n, t in capture.tensors.items() if not t.is_contiguous()]
    return {"tensors": len(odd), "bytes": sum(b for _, b in odd), "examples": [n for n, _ in odd[:4]]}


_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _dtype_size(name: str) -> int:
    return _DTYPE_SIZES.get(name, 4)


def worker_replay(params: dict) -> dict:
    """compare_layers (built-in candidate), isolated and chained separately, vs one plain forward."""
    import torch

    from parity.replay import candidates
    from parity.capture.batch import load_batch
    from parity.capture.reference import prepare_model
    from parity.dump.files import Dump
    from parity.replay import layers as replay_layers

    device = params.get("device", "cpu")
    sync = _sync_for(device)
    repeats = int(params["repeats"])
    reference = Dump(params["dump"])
    cfg = reference.config
    params = {**params, "model": cfg["model"], "imgsz": cfg["imgsz"], "batch": cfg["batch"], "nc": cfg["nc"]}
    config = _config(params)
    batch = load_batch(config.images, imgsz=config.imgsz, batch=config.batch, nc=config.nc, seed=config.seed)
    model, _ = prepare_model(config, batch)
    img = batch.img.to(device)

    timed_forward(model, img, True, sync)
    # Time where compare_layers spends its time, without changing what it does.
    spent = {"candidate": 0.0, "metrics": 0.0, "read": 0.0}

    def timed(key: str, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[key] += time.perf_counter() - t0

        return wrapper

    saved = [(replay_layers, "compare_tensors", replay_layers.compare_tensors), (Dump, "get", Dump.get)]
    saved += [(candidates.ModuleCandidate, n, getattr(candidates.ModuleCandidate, n))
              for n in ("run_layer", "run_chained", "layer_stages")]
    for owner, name, original in saved:
        key = {"compare_tensors": "metrics", "get": "read"}.get(name, "candidate")
        setattr(owner, name, timed(key, original))
    try:
        return _replay_loop(reference, lambda grad: timed_forward(model, img, grad, sync), sync, spent, repeats,
                            device, params)
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def _replay_loop(reference, forward, sync, spent: dict, repeats: int, device: str, params: dict) -> dict:
    from parity.diagnose import layers as replay_layers
    from parity.replay import candidates

    series: dict[str, list] = {"forward_grad": [], "forward_nograd": [], "isolated": [], "chained": []}
    verdicts = {}
    if params.get("warmup", True):
        _log("warm-up replay (excluded)")
        replay_layers.compare_layers(reference, candidates.load_candidate("builtin", reference, device=device),
                                     modes=("isolated",), progress=False, device=device)
    rounds = Repeats(params)
    for rep in rounds:
        series["forward_grad"].append(forward(True))
        series["forward_nograd"].append(forward(False))
        for mode in ("isolated", "chained"):
            _log(f"repeat {rep + 1}/{repeats}: replay {mode}")
            sync()
            t0 = time.perf_counter()
            candidate = candidates.load_candidate("builtin", reference, device=device)
            t_load = time.perf_counter() - t0
            for key in spent:
                spent[key] = 0.0
            report = replay_layers.compare_layers(reference, candidate, modes=(mode,), progress=False,
                                                  device=device)
            sync()
            total = time.perf_counter() - t0
            other = total - t_load - sum(spent.values())
            series[mode].append({"total": total, "load_candidate": t_load, **dict(spent), "other": other})
            verdicts[mode] = {"verdict": report.verdict, "rows": len(report.rows),
                              "failed": len(report.failed_rows)}
            del report, candidate
    return {"series": series, "verdicts": verdicts, "dump": params["dump"], "stopped_early": rounds.stopped,
            "activation_bytes": sum(math.prod(e["shape"]) * _dtype_size(e["dtype"])
                                    for n, e in reference.index.items() if n.startswith("act."))}


def worker_make_candidate(params: dict) -> dict:
    """A candidate dump: the reference with one float32 ULP added to every third element of each activation,
    loss and gradient tensor (weights, batch and init copied bitwise): inside every tolerance, never bitwise."""
    import torch

    from parity.dump.files import Dump, DumpWriter

    reference = Dump(params["dump"])
    t0 = time.perf_counter()
    with DumpWriter(params["out"], force=True, kind="candidate") as writer:
        for name in reference.names():
            tensor = reference.get(name)
            if name.split(".", 1)[0] in ("act", "loss", "grad") and tensor.dtype == torch.float32 and tensor.numel():
                flat = tensor.reshape(-1).clone()
                flat[::3] = torch.nextafter(flat[::3], torch.tensor(math.inf))
                tensor = flat.reshape(tensor.shape)
            writer.add(name, tensor, copy=False)
        writer.commit({k: v for k, v in reference.manifest.items() if k not in ("tensors", "schema", "schema_version",
                                                                                "kind", "stats_only")})
    return {"seconds": time.perf_counter() - t0, "out": params["out"]}


def copy_bandwidth(nbytes: int, repeats: int) -> dict[str, Any]:
    """Memory-copy bandwidth, STREAM convention (bytes read + bytes written, per second)."""
    import numpy as np
    import torch

    n = nbytes // 4
    src = torch.rand(n)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch_gbs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        torch_gbs.append(2 * nbytes / (time.perf_counter() - t0) / 1e9)
    a, b = src.numpy(), dst.numpy()
    numpy_gbs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(b, a)
        numpy_gbs.append(2 * nbytes / (time.perf_counter() - t0) / 1e9)
    return {"buffer_bytes": nbytes, "torch_threads": torch.get_num_threads(),
            "torch_copy_gbs": summarize(torch_gbs), "numpy_copy_gbs": summarize(numpy_gbs)}


def worker_compare(params: dict) -> dict:
    """Streamed dump-vs-dump compare: peak memory (first run, fresh process), then throughput vs copy bandwidth.
    `repeats: 0` measures memory only."""
    from parity.compare.stream import compare_dumps
    from parity.dump.files import Dump

    repeats = int(params["repeats"])
    prefix = params.get("prefix", "")
    ref_path, cand_path = params["reference"], params["candidate"]
    out: dict[str, Any] = {}
    # base: imports done, both dumps opened (manifests parsed), nothing compared
    reference, candidate = Dump(ref_path), Dump(cand_path)
    out["base_rss_mb"] = rss_mb()
    backend = params.get("backend", "pread")
    _log(f"compare once, backend {backend} (memory)")
    with Phase() as phase:
        report = compare_dumps(Dump(ref_path), Dump(cand_path), prefix=prefix, backend=backend)
    out[f"memory_{backend}"] = {**phase.as_dict(), "verdict": report.verdict,
                                "bytes_judged": report.context["bytes_judged"],
                                "largest_pair_bytes": report.context["largest_pair_bytes"],
                                "rows": len(report.rows), "failed": len(report.failed_rows),
                                "read_seconds": report.context["read_seconds"],
                                "metrics_seconds": report.context["metrics_seconds"]}
    del report
    if repeats == 0:
        return out
    out["copy"] = copy_bandwidth(int(params.get("copy_bytes", 256 << 20)), max(3, repeats))
    series = []
    rounds = Repeats(params)
    for rep in rounds:
        _log(f"repeat {rep + 1}/{repeats}: streamed compare")
        t0 = time.perf_counter()
        report = compare_dumps(Dump(ref_path), Dump(cand_path), prefix=prefix, backend=backend)
        total = time.perf_counter() - t0
        series.append({"total": total, "bytes": report.context["bytes_judged"],
                       "read": report.context["read_seconds"], "metrics": report.context["metrics_seconds"],
                       "gbs": report.context["bytes_judged"] / total / 1e9, "tensors": len(report.rows)})
        del report
    out["series"] = series
    out["stopped_early"] = rounds.stopped
    out["copy_after"] = copy_bandwidth(int(params.get("copy_bytes", 256 << 20)), 3)
    if params.get("metrics_probe"):
        out["metrics_probe"] = metrics_probe(reference, candidate, repeats)
    return out


def metrics_probe(reference, candidate, repeats: int) -> dict[str, Any]:
    """`compare_tensors` alone, in memory: throughput by tensor size (fixed per-call cost vs per-byte cost), a
    bitwise-equal pair, and where its time goes by operator (torch profiler) on the largest activation pair."""
    import torch

    from parity.compare.metrics import compare_tensors
    from parity.compare.tolerances import get_profile

    acts = [n for n in reference.names("act.") if n in candidate and reference.index[n]["dtype"] == "F32"]
    name = max(acts, key=lambda n: math.prod(reference.index[n]["shape"]))
    ref_t, cand_t = reference.get(name).clone().reshape(-1), candidate.get(name).clone().reshape(-1)
    tol = get_profile(None).for_name(name)
    sizes = sorted({min(s, ref_t.numel()) for s in (256, 1 << 16, 1 << 20, ref_t.numel())})
    by_size = []
    for size in sizes:
        r, c = ref_t[:size].clone(), cand_t[:size].clone()
        t0 = time.perf_counter()
        compare_tensors(r, c, tol)
        calls = max(1, min(200, int(0.2 / max(time.perf_counter() - t0, 1e-6))))
        timings = []
        for _ in range(max(3, repeats)):
            t0 = time.perf_counter()
            for _ in range(calls):
                compare_tensors(r, c, tol)
            timings.append((time.perf_counter() - t0) / calls)
        seconds = summarize(timings)
        by_size.append({"elements": size, "pair_bytes": 2 * size * 4, "seconds_per_call": seconds,
                        "gbs": 2 * size * 4 / seconds["median"] / 1e9})
    equal = []
    for _ in range(max(3, repeats)):
        t0 = time.perf_counter()
        compare_tensors(ref_t, ref_t, tol)
        equal.append(2 * ref_t.numel() * 4 / (time.perf_counter() - t0) / 1e9)
    return {"tensor": name, "elements": ref_t.numel(), "by_size": by_size, "bitwise_equal_gbs": summarize(equal),
            "operators": operator_profile(ref_t, cand_t, tol), "dot": dot_probe(repeats)}


def dot_probe(repeats: int, n: int = 1 << 16) -> dict[str, Any]:
    """`torch.dot` (BLAS, which starts its own threads even for short vectors) against `(a * b).sum()` (torch's
    own loop, which stays on one thread below its grain size) on one float64 chunk, microseconds per call."""
    import torch

    a = torch.rand(n, dtype=torch.float64)
    b = torch.rand(n, dtype=torch.float64)
    out = {"elements": n, "threads": torch.get_num_threads()}
    for label, fn in (("dot_us", lambda: float(torch.dot(a, b))), ("mul_sum_us", lambda: float((a * b).sum()))):
        fn()
        values = []
        for _ in range(max(5, repeats)):
            t0 = time.perf_counter()
            for _ in range(20):
                fn()
            values.append((time.perf_counter() - t0) / 20 * 1e6)
        out[label] = summarize(values)
    return out


def operator_profile(ref, cand, tol) -> dict[str, Any]:
    """Operator calls and self time of one compare_tensors (torch profiler), with the chunk size in use."""
    try:
        from torch.profiler import ProfilerActivity, profile

        from parity.compare import metrics
    except Exception:  # noqa: BLE001 - informative only
        return {}
    metrics.compare_tensors(ref, cand, tol)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        metrics.compare_tensors(ref, cand, tol)
    skip = {"aten::slice", "aten::view", "aten::as_strided", "aten::reshape", "aten::detach", "aten::alias",
            "aten::lift_fresh", "aten::item", "aten::_local_scalar_dense", "aten::empty", "aten::empty_strided",
            "aten::resolve_conj", "aten::resolve_neg", "aten::to", "aten::_to_copy", "aten::empty_like",
            "aten::zeros", "aten::fill_", "aten::zero_", "aten::expand"}
    events = [e for e in prof.key_averages() if e.key.startswith("aten::") and e.key not in skip]
    total = sum(e.self_cpu_time_total for e in events) or 1
    chunk = getattr(metrics, "CHUNK", None)
    chunks = max(1, math.ceil(ref.numel() / chunk)) if chunk else 1
    return {"chunk_elements": chunk, "chunks": chunks,
            "calls_per_chunk": round(sum(e.count for e in events) / chunks, 1),
            "ops": [{"op": e.key, "calls": e.count, "share": e.self_cpu_time_total / total}
                    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:10]]}


def worker_compare_base(params: dict) -> dict:
    """The fixed base of a compare process: same imports, both dumps opened, nothing compared; then the fixed
    working set: the peak above that base while comparing a small dump (same tensor count, tiny tensors)."""
    from parity.compare.stream import compare_dumps
    from parity.dump.files import Dump

    Dump(params["reference"]), Dump(params["candidate"])
    out = {"rss_mb": rss_mb(), "hwm_mb": hwm_mb()}
    small = params.get("small_dump")
    if small and Path(small).exists():
        with Phase() as phase:
            report = compare_dumps(Dump(small), Dump(small))
        out["small"] = {**phase.as_dict(), "dump": small, "tensors": len(report.rows),
                        "largest_pair_bytes": report.context["largest_pair_bytes"]}
        out["fixed_working_set_mb"] = phase.peak_mb - phase.start_mb
    return out


def worker_fused(params: dict) -> dict:
    """How fast could the metric set be if it were one fused kernel? torch.compile (Inductor, C++) of the same
    float64 statistics compare_tensors keeps, on the largest activation pair; compile time excluded."""
    import torch

    from parity.dump.files import Dump

    reference, candidate = Dump(params["reference"]), Dump(params["candidate"])
    acts = [n for n in reference.names("act.") if n in candidate and reference.index[n]["dtype"] == "F32"]
    name = max(acts, key=lambda n: math.prod(reference.index[n]["shape"]))
    r, c = reference.get(name).clone().reshape(-1), candidate.get(name).clone().reshape(-1)
    t0 = time.perf_counter()
    try:
        fused = torch.compile(fused_metrics, dynamic=True)
        fused(r, c, 1e-5, 1e-5, 4)
    except Exception as error:  # noqa: BLE001 - a missing compiler is a result, not a crash
        return {"skipped": f"torch.compile failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"}
    compile_s = time.perf_counter() - t0
    out = {"tensor": name, "compile_seconds": compile_s}
    for label, fn in (("fused", fused), ("eager", fused_metrics)):
        rates = []
        for _ in range(max(3, int(params.get("repeats", 3)))):
            t0 = time.perf_counter()
            values = [float(v) for v in fn(r, c, 1e-5, 1e-5, 4)]
            rates.append(2 * r.numel() * 4 / (time.perf_counter() - t0) / 1e9)
        out[f"{label}_gbs"] = summarize(rates)
        out[f"{label}_values"] = values
    return out


def fused_metrics(r, c, atol: float, rtol: float, max_ulp: int):
    """The reductions compare_tensors needs for a float32 pair, written as one expression graph (for the
    fused-kernel probe only; non-finite handling left out)."""
    import torch

    rd, cd = r.to(torch.float64), c.to(torch.float64)
    d = (cd - rd).abs()
    ra = rd.abs()
    rel = torch.nan_to_num(d / ra, nan=0.0, posinf=math.inf)
    excess = d - rtol * ra
    rb, cb = r.view(torch.int32), c.view(torch.int32)
    rs, cs = rb >> 31, cb >> 31
    ro = (rb ^ (rs & 0x7FFFFFFF)).to(torch.int64) - rs.to(torch.int64)
    co = (cb ^ (cs & 0x7FFFFFFF)).to(torch.int64) - cs.to(torch.int64)
    ulp = (ro - co).abs()
    over = (excess > atol) | (ulp > max_ulp)
    return (d.amax(), d.sum(), (d * d).sum(), (rd * cd).sum(), (rd * rd).sum(), (cd * cd).sum(), rel.amax(),
            excess.amax(), ulp.amax(), over.sum(), (rb != cb).sum(), ra.amax())


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


# ------------------------------------------------------------------------------------- explain time
# One plant per cause family: (plant, fixture, what). The explainer's time at each divergent place is compared
# with one run of that place: one forward of the layer, one stage call, one loss evaluation (black box).
EXPLAIN_PLANTS = [
    ("upsample-bilinear", "yolov8-narrow-nc12-96", "layers"), ("feature-scale", "yolov8-narrow-nc12-96", "layers"),
    ("bn-eps", "yolov8-narrow-nc12-96", "layers"), ("activation-relu", "yolov8-narrow-nc12-96", "layers"),
    ("shortcut-flipped", "yolov8-narrow-nc12-96", "layers"), ("concat-order", "yolov8-narrow-nc12-96", "layers"),
    ("concat-channels", "yolov8-narrow-nc12-96", "layers"), ("sppf-zero-padding", "yolo11-narrow-nc80-96", "layers"),
    ("missing-sigmoid", "yolov8-narrow-nc12-96", "loss"), ("double-sigmoid", "yolov8-narrow-nc12-96", "loss"),
    ("no-detach", "yolov8-narrow-nc12-96", "loss"), ("all-anchors-positive", "yolov8-narrow-nc12-96", "loss"),
    ("topk-13", "yolov8-narrow-nc12-96", "loss"), ("tal-alpha-1", "yolov8-narrow-nc12-96", "loss"),
    ("tal-beta-4", "yolov8-narrow-nc12-96", "loss"), ("small-box-floor-8", "yolov8-narrow-nc12-96", "loss"),
    ("unclamped-target-scores-sum", "yolov8-narrow-nc12-96", "loss-no_boxes"),
    ("weights-broadcast", "yolo11-narrow-nc80-96", "loss"), ("iou-weight-broadcast", "yolov8-narrow-nc12-96", "loss"),
    ("iou-giou", "yolov8-narrow-nc12-96", "loss"), ("reg-max-4", "yolov8-narrow-nc12-96", "loss"),
    ("dfl-view-transposed", "yolov8-narrow-nc12-96", "loss"), ("ltrb-order", "yolov8-narrow-nc12-96", "loss"),
    ("targets-xywh-as-xyxy", "yolov8-narrow-nc12-96", "loss"), ("anchors-coarse-first", "yolov8-narrow-nc12-96", "loss"),
    ("gain-twice", "yolov8-narrow-nc12-96", "loss"), ("no-batch-scale", "yolov8-narrow-nc12-96", "loss"),
    ("as-of-8.3-loss", "yolov8-narrow-nc12-96", "loss"), ("loss-output-scalar", "yolov8-narrow-nc12-96", "loss"),
    ("topk-13", "yolov8-narrow-nc12-96", "black-box"), ("gain-twice", "yolov8-narrow-nc12-96", "black-box"),
]


def _isolated_report(dump, inject):
    """The isolated replay's verdict up to the first divergent layer (what the explainer reads), and the
    loaded candidate."""
    from parity.replay.candidates import load_candidate
    from parity.compare.metrics import compare_tensors
    from parity.compare.tolerances import get_profile, profile_for_environment
    from parity.findings import Report, Row

    candidate = load_candidate("builtin", dump, inject=inject)
    candidate.prepare(dump)
    profile = get_profile(profile_for_environment(dump.manifest.get("environment"), dump.config.get("precision")))
    report = Report("compare --what layers", str(dump.path), candidate.label, profile.name)
    head, first = dump.model["head_index"], None
    for entry in dump.layers:
        index = entry["index"]
        produced = candidate.run_layer(index, [dump.get(n) for n in entry["inputs"]], is_head=index == head)
        for name in entry["outputs"]:
            if name in produced and name in dump:
                ok = compare_tensors(dump.get(name), produced[name], profile.for_name(name, mode="isolated")).passed
                report.add(Row("isolated", f"layer {index}", name, ok))
                first = index if first is None and not ok else first
        if first is not None:
            break
    report.context["first_divergent_layer"] = {"isolated": first}
    return report, candidate


def worker_explain(params: dict) -> dict:
    """Time the explainer at every divergent place of each plant, against one run of that place."""
    from parity.diagnose.explain import ExplainConfig, explain_report
    from parity.dump.files import Dump
    from parity.causes.plant import planted_loss
    from parity.reimpl.loss import build_loss
    from parity.replay.loss import LossAdapter, compare_loss
    from parity.runtime import PROJECT_ROOT

    rows = []
    plants = EXPLAIN_PLANTS[: params.get("limit") or None]
    for repeat in range(max(1, params.get("repeats", 1))):
        for plant, fixture, what in plants:
            dump = Dump(PROJECT_ROOT / "fixtures" / fixture)
            if what == "layers":
                report, candidate = _isolated_report(dump, plant)
                config = ExplainConfig(candidate=candidate, inject=plant)
            elif what == "black-box":
                planted = planted_loss(dump.manifest, plant)
                adapter = LossAdapter(lambda p, b, planted=planted: planted(p, b), name=plant)
                report = compare_loss(dump, adapter, cases=["default"], progress=False)
                config = ExplainConfig(loss_candidate=adapter)
            else:
                case = what.partition("-")[2] or "default"
                report = compare_loss(dump, "builtin", inject=plant, cases=[case], progress=False)
                config = ExplainConfig(inject=plant)
            t0 = time.perf_counter()
            explain_report(report, dump, config)
            total = time.perf_counter() - t0
            loss_eval = None
            if what != "layers":
                loss = build_loss(dump.manifest)
                head = dump.model["head_index"]
                preds = {"boxes": dump.get(f"act.{head}.boxes"), "scores": dump.get(f"act.{head}.scores"),
                         "feat_shapes": [tuple(dump.index[f"act.{i}"]["shape"][2:]) for i in dump.layers[head]["from"]]}
                batch = {k: dump.get(f"batch.default.{k}") for k in ("cls", "bboxes", "batch_idx")}
                loss.run(preds, batch)
                t1 = time.perf_counter()
                loss.run(preds, batch)
                loss_eval = time.perf_counter() - t1
            for entry in report.context.get("explanations", []):
                rows.append({"repeat": repeat, "plant": plant, "fixture": fixture, "place": entry["place"],
                             "cause": entry["cause"], "runs": entry["runs"], "seconds": entry["seconds"],
                             "one_run_seconds": entry["one_run_seconds"], "loss_eval_seconds": loss_eval,
                             "explain_report_seconds": total})
    return {"rows": rows}


def explain_summary(result: dict) -> list[dict]:
    """Per (plant, place): median explain time, runs, and its ratio to one run of the place (and to one loss
    evaluation for loss places)."""
    groups: dict[tuple, list[dict]] = {}
    for row in result.get("rows", []):
        groups.setdefault((row["plant"], row["place"]), []).append(row)
    out = []
    for (plant, place), rows in groups.items():
        seconds = [r["seconds"] for r in rows]
        ratio = [r["seconds"] / r["one_run_seconds"] for r in rows if r["one_run_seconds"]]
        vs_loss = [r["seconds"] / r["loss_eval_seconds"] for r in rows if r.get("loss_eval_seconds")]
        out.append({"plant": plant, "place": place, "cause": rows[0]["cause"], "runs": rows[0]["runs"],
                    "seconds": summarize(seconds), "vs_one_run": summarize(ratio),
                    "vs_loss_eval": summarize(vs_loss) if vs_loss else None,
                    "explain_report_seconds": summarize([r["explain_report_seconds"] for r in rows])})
    return out



# ------------------------------------------------------------------------- checksum verification on read
def worker_verify(params: dict) -> dict:
    """What checking every tensor against its manifest checksum costs (`Dump.check`, on by default): the
    streamed compare and the built-in replay (`parity compare --what layers`), each timed with verification on
    and off in alternating rounds (fresh `Dump`s each round, so every tensor is hashed again), plus the throughput
    of the hash reads check (XXH3-128) and of SHA-256 over the reference's bytes."""
    from parity.compare.stream import compare_dumps
    from parity.dump.files import Dump, checksum, fast_checksum

    ref_path, cand_path = params["reference"], params["candidate"]
    reference = Dump(ref_path, verify=False)
    tensors = [reference.get(n) for n in reference.names() if reference.index[n].get("file")]
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    out: dict[str, Any] = {}
    for key, hash_fn in (("sha256", checksum), ("xxh3_128", fast_checksum)):
        t0 = time.perf_counter()
        for tensor in tensors:
            hash_fn(tensor)
        out[key] = {"bytes": nbytes, "seconds": time.perf_counter() - t0}
        out[key]["gbs"] = nbytes / out[key]["seconds"] / 1e9
    del tensors
    kinds = {"streamed": lambda verify: compare_dumps(Dump(ref_path, verify=verify), Dump(cand_path, verify=verify))}
    if params.get("replay", True):
        from parity.diagnose.layers import compare_layers

        kinds["replay"] = lambda verify: compare_layers(Dump(ref_path, verify=verify), "builtin", progress=False)
    for kind, run in kinds.items():
        series = {"on": [], "off": []}
        run(True)  # warm: page cache, imports, the candidate's first build
        for rep in Repeats(params):
            for verify in ((True, False) if rep % 2 == 0 else (False, True)):
                _log(f"{kind} compare, verification {'on' if verify else 'off'}, repeat {rep + 1}")
                started = time.perf_counter()
                run(verify)
                series["on" if verify else "off"].append(time.perf_counter() - started)
        out[kind] = series
    return out


def analyse_verify(result: dict) -> dict:
    summary = {"sha256_gbs": result["sha256"]["gbs"], "sha256_seconds": result["sha256"]["seconds"],
               "bytes": result["sha256"]["bytes"]}
    if "xxh3_128" in result:
        summary.update({"read_hash_gbs": result["xxh3_128"]["gbs"], "read_hash_seconds": result["xxh3_128"]["seconds"]})
    for kind in ("streamed", "replay"):
        if kind in result:
            on, off = result[kind]["on"], result[kind]["off"]
            summary[kind] = {"on": summarize(on), "off": summarize(off),
                             "overhead": ratio_summary([a - b for a, b in zip(on, off)], off)}
    return summary


def _verify_section(doc: dict) -> list[str]:
    ver = (doc.get("verify") or {}).get("summary")
    if not ver:
        return ["## Checksum verification on read", "", "Not measured in this run.", ""]
    point = (doc.get("verify") or {}).get("point") or {}
    lines = ["## Checksum verification on read", "",
             "Every tensor a command reads is checked once against its manifest XXH3-128 (SHA-256 for a dump "
             "that has none; `Dump.check`; `--no-verify` turns it off). Timed on "
             f"{point.get('model', 'the main configuration')} {point.get('imgsz', '')}px batch "
             f"{point.get('batch', '')}: the streamed compare of the reference against the 1-ULP candidate, and "
             "the built-in replay (`compare_layers`, what `parity compare --what layers` runs), verification on and "
             "off in alternating rounds. Target: under 10 % of a compare.", "",
             "| what | value |", "| --- | --- |",
             f"| SHA-256 over the reference's {ver['bytes'] / 1e6:.1f} MB | {_fmt(ver['sha256_seconds'])} s "
             f"({_fmt(ver['sha256_gbs'])} GB/s) |"]
    if ver.get("read_hash_gbs"):
        lines.append(f"| XXH3-128 (what reads check) over the same bytes | {_fmt(ver['read_hash_seconds'])} s "
                     f"({_fmt(ver['read_hash_gbs'])} GB/s) |")
    for kind, label in (("streamed", "streamed compare"), ("replay", "built-in replay")):
        if kind in ver:
            entry = ver[kind]
            lines.append(f"| {label}: verification off / on | {_cell(entry['off'], ' s')} / "
                         f"{_cell(entry['on'], ' s')} |")
            lines.append(f"| {label}: cost of verification | {_cell(entry['overhead'], 'x', 3)} of the unverified "
                         f"time (target < 0.10x) |")
    lines += _verify_estimate(doc, ver)
    load = point.get("load_average")
    if load and load[0] > 1.5:
        lines += ["", f"> **Taken under load** (1-minute load average {load[0]} at the end of this measurement): the "
                      f"on/off timings above are dominated by other processes and their ratios mean little; the "
                      f"estimate from the hash throughput against this file's quiet compare and replay figures is "
                      f"the better guide."]
    return lines + [""]


def _verify_estimate(doc: dict, ver: dict) -> list[str]:
    """Hashing time at the measured throughput of the hash reads check, against the compare and replay timings of
    this document."""
    gbs = ver.get("read_hash_gbs") or ver.get("sha256_gbs")
    if not gbs:
        return []
    lines = []
    series = ((doc.get("compare") or {}).get("raw") or {}).get("series") or []
    if series:
        total = sorted(s["total"] for s in series)[len(series) // 2]
        nbytes = series[0]["bytes"]
        hashing = nbytes / gbs / 1e9
        lines.append(f"| estimate, streamed compare: hashing its {nbytes / 1e6:.0f} MB (both dumps) / the compare's "
                     f"{_fmt(total)} s | {_fmt(hashing)} s = {hashing / total:.2f}x (target < 0.10x) |")
    replay = (doc.get("replay") or {}).get("raw") or {}
    times = (replay.get("series") or {}).get("isolated")
    if times and replay.get("activation_bytes"):
        total = sorted(t["total"] if isinstance(t, dict) else t for t in times)[len(times) // 2]
        hashing = replay["activation_bytes"] / gbs / 1e9
        lines.append(f"| estimate, isolated replay: hashing its {replay['activation_bytes'] / 1e6:.0f} MB of "
                     f"activations (weights add more) / the replay's {_fmt(total)} s | {_fmt(hashing)} s = "
                     f"{hashing / total:.2f}x (target < 0.10x) |")
    return lines


def run_verify_only(args, out_dir: Path) -> int:
    """`--only-verify`: measure the verification section alone and merge it into the existing benchmarks.json
    (the other sections keep their figures)."""
    from parity.capture import CaptureConfig, dump_reference

    path = out_dir / "benchmarks.json"
    doc = json.loads(path.read_text()) if path.exists() else {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "quick": args.quick,
        "machine": {**machine_info(), **versions_and_threads()}, "skipped": [], "settings": {}, "threads": None}
    workdir = Path(tempfile.mkdtemp(prefix="parity-bench-verify-"))
    try:
        model = args.template.format(scale="n")
        ref, cand = workdir / "reference", workdir / "candidate"
        dump_reference(CaptureConfig(model=model, imgsz=args.imgsz, batch=args.batch), ref)
        made, info = run_worker("make-candidate", {"dump": str(ref), "out": str(cand)}, timeout=600)
        if made is None:
            raise SystemExit(f"candidate dump failed: {info.get('error')}")
        result, info = run_worker("verify", {"reference": str(ref), "candidate": str(cand),
                                             "repeats": args.repeats, "threads": args.threads}, timeout=1200)
        doc["verify"] = {"worker": info, "point": {"model": model, "imgsz": args.imgsz, "batch": args.batch,
                                                   "repeats": args.repeats, "load_average": load_average()}}
        if result is not None:
            doc["verify"].update({"raw": result, "summary": analyse_verify(result)})
        write_outputs(doc, out_dir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0

WORKERS = {"step": worker_step, "replay": worker_replay, "make-candidate": worker_make_candidate,
           "compare": worker_compare, "compare-base": worker_compare_base, "fused": worker_fused,
           "cuda": worker_cuda, "verify": worker_verify, "explain": worker_explain}


def run_worker_main(kind: str, params_json: str) -> int:
    from parity.runtime import prepare

    params = json.loads(params_json)
    prepare(params.get("threads"))
    result = WORKERS[kind](params)
    result["worker_hwm_mb"] = hwm_mb()
    print(RESULT_TAG + json.dumps(result, default=str), flush=True)
    return 0


# ============================================================================================ orchestration
class Budget:
    def __init__(self, seconds: float):
        self.t0 = time.perf_counter()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def deadline(self, share: float) -> float:
        """Epoch seconds by which a stage given `share` of the whole budget should end (never past the budget)."""
        return time.time() + max(0.0, min(self.left(), share * self.seconds))


INPROCESS = False  # `--inprocess` (tests): workers run in this process; memory figures then mean little


def run_worker(kind: str, params: dict, *, timeout: float) -> tuple[dict | None, dict]:
    """A worker subprocess; returns (its result, {wall, maxrss_mb (wait4), error})."""
    if INPROCESS:
        t0 = time.perf_counter()
        result = json.loads(json.dumps(WORKERS[kind](params), default=str))
        result["worker_hwm_mb"] = hwm_mb()
        return result, {"wall": time.perf_counter() - t0, "maxrss_mb": hwm_mb(), "exit": 0, "inprocess": True}
    command = [sys.executable, "-m", "benchmarks.bench", "--worker", kind, json.dumps(params)]
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=None, env=env, text=True, cwd=root)
    deadline = t0 + max(timeout, 5)
    output = []
    import selectors

    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    timed_out = False
    while True:
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            timed_out = True
            proc.kill()
            break
        if selector.select(timeout=min(remaining, 1.0)):
            line = proc.stdout.readline()
            if not line:
                break
            output.append(line)
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    info = {"wall": time.perf_counter() - t0, "maxrss_mb": usage.ru_maxrss / 1024,
            "exit": os.waitstatus_to_exitcode(status)}
    result = None
    for line in output:
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG):])
    if timed_out:
        info["error"] = f"timed out after {timeout:.0f} s"
    elif result is None:
        info["error"] = f"worker {kind} exited {info['exit']} without a result"
    return result, info


class Contention:
    """How much of the machine other processes used, stage by stage: busy CPU time of the whole machine
    (/proc/stat, steal included) minus this process's and its finished workers' CPU time, over cpus x wall."""

    def __init__(self):
        self.stages: list[dict] = []
        self._last = self._sample()
        self._label = "start"

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        import resource

        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return None
        # user nice system idle iowait irq softirq steal [guest guest_nice, already inside user/nice]
        busy = sum(fields[:8]) - fields[3] - fields[4]
        own = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                  for f in ("ru_utime", "ru_stime"))
        return time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"), own

    def mark(self, label: str) -> None:
        now = self._sample()
        if now and self._last:
            wall = now[0] - self._last[0]
            cpus = os.cpu_count() or 1
            if wall > 0.5:
                others = max(0.0, (now[1] - self._last[1]) - (now[2] - self._last[2])) / (cpus * wall)
                self.stages.append({"stage": self._label, "seconds": round(wall, 1), "others": round(others, 3)})
        self._last, self._label = now, label


CONTENTION: Contention | None = None


def _progress(budget: Budget, message: str) -> None:
    if CONTENTION is not None:
        CONTENTION.mark(message)
    print(f"[{budget.elapsed():6.1f}s] {message}", file=sys.stderr, flush=True)


def _series(rows: list[dict], key: str) -> list[float]:
    return [r[key] for r in rows if r.get(key) is not None]


def analyse_step(result: dict) -> dict:
    s = result["series"]
    plain = s["plain"]
    cap = s["capture"]
    out = {
        "plain_step_s": summarize(_series(plain, "total")),
        "plain_forward_s": summarize(_series(plain, "forward")),
        "plain_loss_s": summarize(_series(plain, "loss")),
        "plain_backward_s": summarize(_series(plain, "backward")),
        "forward_grad_s": summarize(s.get("forward_grad", [])),
        "forward_nograd_s": summarize(s.get("forward_nograd", [])),
        "capture_s": summarize(_series(cap, "total")),
        "capture_vs_step": ratio_summary(_series(cap, "total"), _series(plain, "total")),
        "capture_phases_s": {k: summarize(_series(cap, k)) for k in ("setup", "forward", "losses_and_head_grads",
                                                                     "backward_and_describe")},
        "captured_bytes": cap[0].get("captured_bytes") if cap else None,
        "captured_tensors": cap[0].get("captured_tensors") if cap else None,
        "capture_forward_vs_plain_forward": ratio_summary(_series(cap, "forward"), _series(plain, "forward")),
    }
    if s.get("capture_noop"):
        noop = s["capture_noop"]
        out["capture_noop_s"] = summarize(_series(noop, "total"))
        out["capture_vs_noop"] = ratio_summary(_series(cap, "total"), _series(noop, "total"))
        out["noop_vs_step"] = ratio_summary(_series(noop, "total"), _series(plain, "total"))
        out["noop_phases_s"] = {k: summarize(_series(noop, k)) for k in ("setup", "forward", "losses_and_head_grads",
                                                                         "backward_and_describe")}
        out["copy_cost_s"] = summarize([a["total"] - b["total"] for a, b in zip(cap, noop)])
    if s.get("capture_single"):
        out["capture_single_s"] = summarize(_series(s["capture_single"], "total"))
        out["capture_single_vs_step"] = ratio_summary(_series(s["capture_single"], "total"), _series(plain, "total"))
        single = s["capture_single"]
        like = [a["forward"] + a["losses_and_head_grads"] + a["backward_and_describe"] for a in single
                if a.get("forward") and a.get("losses_and_head_grads") and a.get("backward_and_describe")]
        out["capture_single_step_phases_s"] = summarize(like)
        out["capture_single_step_phases_vs_step"] = ratio_summary(like, _series(plain, "total"))
    if s.get("dump"):
        out["dump_s"] = summarize(_series(s["dump"], "total"))
        out["dump_vs_step"] = ratio_summary(_series(s["dump"], "total"), _series(plain, "total"))
    return out


def analyse_replay(result: dict) -> dict:
    s = result["series"]
    out = {"forward_grad_s": summarize(s["forward_grad"]), "forward_nograd_s": summarize(s["forward_nograd"]),
           "verdicts": result.get("verdicts")}
    for mode in ("isolated", "chained"):
        rows = s[mode]
        out[f"{mode}_s"] = summarize(_series(rows, "total"))
        out[f"{mode}_vs_forward_grad"] = ratio_summary(_series(rows, "total"), s["forward_grad"])
        out[f"{mode}_vs_forward_nograd"] = ratio_summary(_series(rows, "total"), s["forward_nograd"])
        out[f"{mode}_breakdown_s"] = {k: summarize(_series(rows, k)) for k in ("load_candidate", "candidate",
                                                                               "metrics", "read", "other")}
    return out


def analyse_memory(mem: dict, base: dict | None, fallback_base: float | None) -> dict:
    """Peak of one compare against the fixed base (imports + opened dumps, measured in its own process) and the
    fixed working set (peak above that base when comparing a dump of tiny tensors)."""
    mem = dict(mem)
    fixed = (base or {}).get("hwm_mb") or fallback_base
    working = (base or {}).get("fixed_working_set_mb") or 0.0
    pair_mb = mem["largest_pair_bytes"] / 2 ** 20
    mem["base_mb"] = fixed
    mem["fixed_working_set_mb"] = working
    mem["largest_pair_mb"] = pair_mb
    if fixed is not None:
        mem["above_base_mb"] = mem["peak_rss_mb"] - fixed
        mem["above_fixed_mb"] = mem["peak_rss_mb"] - fixed - working
        mem["above_base_in_pairs"] = mem["above_base_mb"] / pair_mb if pair_mb else None
        mem["above_fixed_in_pairs"] = mem["above_fixed_mb"] / pair_mb if pair_mb else None
    return mem


def analyse_compare(result: dict, base: dict | None, extra_memory: dict | None = None) -> dict:
    series = result.get("series") or []
    out: dict[str, Any] = {}
    if series:
        copy_all = result["copy"]["torch_copy_gbs"]["values"] + result["copy_after"]["torch_copy_gbs"]["values"]
        out.update({"compare_gbs": summarize(_series(series, "gbs")), "copy_gbs": summarize(copy_all),
                    "numpy_copy_gbs": result["copy"]["numpy_copy_gbs"],
                    "copy_buffer_bytes": result["copy"]["buffer_bytes"], "copy_threads": result["copy"]["torch_threads"],
                    "compare_vs_copy": ratio_summary(_series(series, "gbs"), copy_all, paired=False),
                    "bytes_judged": series[0]["bytes"], "tensors": series[0].get("tensors"),
                    "read_s": summarize(_series(series, "read")), "metrics_s": summarize(_series(series, "metrics")),
                    "total_s": summarize(_series(series, "total"))})
    if not series:
        memory = next((v for k, v in result.items() if k.startswith("memory_")), None)
        if memory:
            out["total_s"] = summarize([memory["seconds"]])
            out["compare_gbs"] = summarize([memory["bytes_judged"] / memory["seconds"] / 1e9])
    for source in (result, extra_memory or {}):
        for key, value in source.items():
            if key.startswith("memory_"):
                out[key] = analyse_memory(value, base, source.get("base_rss_mb"))
    if result.get("metrics_probe"):
        out["metrics_probe"] = result["metrics_probe"]
    return out


def _median(entry: dict | None) -> float | None:
    return entry.get("median") if entry else None


def memory_fit(points: list[dict]) -> dict | None:
    """Compare peak RSS against the largest tensor pair over the growth points: peak = fixed + slope x pair
    (least squares). The slope is the memory a compare needs per byte of its largest pair."""
    xs, ys = [], []
    for p in points:
        mem = (p.get("compare") or {}).get("memory_pread") or {}
        if mem.get("largest_pair_bytes") and mem.get("peak_rss_mb"):
            xs.append(mem["largest_pair_bytes"] / 2 ** 20)
            ys.append(mem["peak_rss_mb"])
    if len(xs) < 2 or max(xs) == min(xs):
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    fixed = my - slope * mx
    residual = max(abs(y - (fixed + slope * x)) for x, y in zip(xs, ys))
    return {"slope_pairs": slope, "fixed_mb": fixed, "points": len(xs), "max_residual_mb": residual,
            "largest_pair_mb": xs, "peak_mb": ys}


def growth_fits(points: list[dict]) -> dict:
    """Exponents of each figure against batch, image size (side) and parameters, per axis of the grid."""
    figures = {
        "plain_step_s": lambda p: _median(p["step"].get("plain_step_s")),
        "capture_s": lambda p: _median(p["step"].get("capture_s")),
        "capture_vs_step": lambda p: _median(p["step"].get("capture_vs_step")),
        "plain_step_peak_rss_mb": lambda p: p.get("plain_peak_rss_mb"),
        "dump_peak_rss_mb": lambda p: p.get("dump_peak_rss_mb"),
        "capture_peak_rss_mb": lambda p: p.get("capture_peak_rss_mb"),
        "dump_bytes": lambda p: p.get("dump_bytes"),
        "compare_s": lambda p: _median((p.get("compare") or {}).get("total_s")),
        "compare_peak_rss_mb": lambda p: ((p.get("compare") or {}).get("memory_pread") or {}).get("peak_rss_mb"),
    }
    fits = {}
    for axis, key in (("batch", "batch"), ("imgsz", "imgsz"), ("scale", "parameters")):
        chosen = [p for p in points if axis in p["axes"]]
        chosen.sort(key=lambda p: p[key] or 0)
        fits[axis] = {}
        for figure, get in figures.items():
            xs = [p[key] for p in chosen]
            ys = [get(p) for p in chosen]
            fit = fit_exponent(xs, ys)
            if fit:
                fits[axis][figure] = fit
    return fits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "JSON"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="folder for benchmarks.md and benchmarks.json (default docs/)")
    parser.add_argument("--budget", type=float, default=840.0, help="seconds for the whole run (default 840)")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of the main configuration (default 5)")
    parser.add_argument("--growth-repeats", type=int, default=3, help="repeats of each growth point (default 3)")
    parser.add_argument("--template", default="yolo11{scale}.yaml", help="model yaml, {scale} is n/s/m")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--grid-batch", default="1,2,8,16")
    parser.add_argument("--grid-imgsz", default="320,640,1280")
    parser.add_argument("--grid-scale", default="n,s,m")
    parser.add_argument("--no-growth", action="store_true", help="only the main configuration")
    parser.add_argument("--no-fused", action="store_true", help="leave out the torch.compile fused-kernel probe")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and one repeat: checks the code paths (tests), numbers mean nothing")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default 2, as parity)")
    parser.add_argument("--workdir", default=None, help="scratch folder for dumps (default: a temporary folder)")
    parser.add_argument("--explain-only", action="store_true",
                        help="only the explainer's time per divergent place (the committed fixtures, no dump)")
    parser.add_argument("--only-verify", action="store_true",
                        help="measure only the checksum-verification section and merge it into benchmarks.json")
    parser.add_argument("--inprocess", action="store_true",
                        help="run the workers in this process (tests: faster; memory figures lose their meaning)")
    args = parser.parse_args(argv)
    if args.worker:
        return run_worker_main(*args.worker)
    global INPROCESS, CONTENTION
    INPROCESS = args.inprocess
    CONTENTION = Contention()
    if args.quick:
        args.imgsz, args.batch, args.repeats, args.growth_repeats = 64, 1, 1, 1
        args.grid_batch, args.grid_imgsz, args.grid_scale = "1,2", "64", "n"
        args.no_fused = True
    from parity.runtime import PROJECT_ROOT, prepare

    threads = prepare(args.threads)
    out_dir = Path(args.out) if args.out else PROJECT_ROOT / "docs"
    if args.only_verify:
        return run_verify_only(args, out_dir)
    budget = Budget(args.budget)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="parity-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "quick": args.quick,
                           "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                           "machine": {**machine_info(), **versions_and_threads()},
                           "load_average_start": load_average(), "targets": TARGETS, "skipped": [],
                           "settings": {k: v for k, v in vars(args).items() if k != "worker"}, "threads": threads}
    common = {"template": args.template, "threads": threads, "workdir": str(workdir)}
    _progress(budget, f"benchmarks into {out_dir} (budget {args.budget:.0f} s, scratch {workdir})")
    _progress(budget, f"machine: {doc['machine']['cpu_model']}, {doc['machine']['usable_cpus']} cpus, "
                      f"{doc['machine'].get('memory_gib')} GiB, torch threads {threads}, load {doc['load_average_start']}")
    try:
        if not args.explain_only:
            _run_all(args, doc, common, budget, workdir, out_dir)
        _progress(budget, f"explainer time per divergent place, {len(EXPLAIN_PLANTS)} plants")
        explained, info = run_worker("explain", {**common, "repeats": 1 if args.quick else 3},
                                     timeout=max(5.0, budget.left()))
        doc["explain"] = {"worker": info}
        if explained is not None:
            doc["explain"].update({"raw": explained, "summary": explain_summary(explained)})
        else:
            doc["skipped"].append(f"explain: {info.get('error')}")
    finally:
        CONTENTION.mark("end")
        doc["contention"] = CONTENTION.stages
        doc["load_average_end"] = load_average()
        doc["wall_seconds"] = budget.elapsed()
        write_outputs(doc, out_dir)
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    _progress(budget, f"done: {out_dir / 'benchmarks.md'}, {out_dir / 'benchmarks.json'}")
    INPROCESS = False
    return 0


def _run_all(args, doc: dict, common: dict, budget: Budget, workdir: Path, out_dir: Path) -> None:
    main_point = {**common, "scale": "n", "imgsz": args.imgsz, "batch": args.batch}
    ref_dump = str(workdir / "reference")
    cand_dump = str(workdir / "candidate")

    # ---- 1. capture overhead on the main configuration (keeps its dump for replay and compare)
    _progress(budget, f"capture vs plain step: {_model_yaml(main_point)} {args.imgsz}px batch {args.batch}, "
                      f"{args.repeats} repeats")
    step, info = run_worker("step", {**main_point, "repeats": args.repeats, "dump": True, "keep_dump": ref_dump,
                                     "noop": True, "single_case": True, "dump_each": True, "contiguity": True,
                                     "min_repeats": 2, "deadline": budget.deadline(0.30)},
                            timeout=budget.left())
    doc["capture"] = {"worker": info}
    if step is None:
        doc["skipped"].append(f"capture: {info.get('error')}")
        return
    doc["capture"].update({"raw": step, "summary": analyse_step(step)})
    _note_early_stop(doc, "capture", step, args.repeats)
    write_outputs(doc, out_dir)

    # ---- 2. replay
    _progress(budget, f"replay (built-in candidate), isolated and chained, {args.repeats} repeats")
    replay, info = run_worker("replay", {**common, "dump": ref_dump, "repeats": args.repeats,
                                         "warmup": not args.quick, "min_repeats": 2,
                                         "deadline": budget.deadline(0.12)},
                              timeout=budget.left())
    doc["replay"] = {"worker": info}
    if replay is not None:
        doc["replay"].update({"raw": replay, "summary": analyse_replay(replay)})
        _note_early_stop(doc, "replay", replay, args.repeats)
    else:
        doc["skipped"].append(f"replay: {info.get('error')}")
    write_outputs(doc, out_dir)

    # ---- 3. compare: throughput, memory, copy bandwidth, metric probe
    _progress(budget, "candidate dump (reference + 1 ULP on every third element)")
    made, info = run_worker("make-candidate", {**common, "dump": ref_dump, "out": cand_dump},
                            timeout=budget.left())
    if made is not None:
        pair = {**common, "reference": ref_dump, "candidate": cand_dump}
        _progress(budget, "compare: fixed base and working set")
        small = str(Path(__file__).resolve().parent.parent / "fixtures" / "yolo11-narrow-nc80-96")
        base, _ = run_worker("compare-base", {**pair, "small_dump": small}, timeout=budget.left())
        _progress(budget, f"streamed compare (pread), {max(3, args.repeats - 2)} repeats, copy bandwidth, metric probe")
        comp, info = run_worker("compare", {**pair, "repeats": max(3, args.repeats - 2), "backend": "pread",
                                            "metrics_probe": True, "min_repeats": 2,
                                            "deadline": budget.deadline(0.08)}, timeout=budget.left())
        _progress(budget, "compare memory through Dump.get (mmap)")
        mmap, _ = run_worker("compare", {**pair, "repeats": 0, "backend": "mmap"}, timeout=budget.left())
        doc["compare"] = {"worker": info, "base": base, "candidate_seconds": made["seconds"], "mmap": mmap}
        if comp is not None:
            doc["compare"].update({"raw": comp, "summary": analyse_compare(comp, base, mmap)})
            _note_early_stop(doc, "compare", comp, max(3, args.repeats - 2))
        else:
            doc["skipped"].append(f"compare: {info.get('error')}")
        if not args.no_fused and budget.left() > 420:
            _progress(budget, "fused-kernel probe (torch.compile of the metric set)")
            fused, info = run_worker("fused", {**pair, "repeats": 3}, timeout=min(budget.left(), 240))
            doc["compare"]["fused"] = fused or {"skipped": info.get("error")}
        else:
            doc["skipped"].append("fused-kernel probe: not enough time left")
        _progress(budget, "checksum verification on read: streamed compare and replay, on vs off")
        ver, info = run_worker("verify", {**pair, "repeats": 3 if not args.quick else 1, "min_repeats": 1,
                                          "deadline": budget.deadline(0.08)}, timeout=budget.left())
        doc["verify"] = {"worker": info, "point": {"model": _model_yaml(main_point), "imgsz": args.imgsz,
                                                   "batch": args.batch}}
        if ver is not None:
            doc["verify"].update({"raw": ver, "summary": analyse_verify(ver)})
        shutil.rmtree(cand_dump, ignore_errors=True)
    else:
        doc["skipped"].append(f"compare: candidate dump failed: {info.get('error')}")
    write_outputs(doc, out_dir)

    # ---- 4. growth
    if not args.no_growth:
        _growth(args, doc, common, budget, workdir, out_dir, step, ref_dump)
    shutil.rmtree(ref_dump, ignore_errors=True)

    # ---- 5. CUDA
    _progress(budget, "CUDA")
    cuda, info = run_worker("cuda", {**main_point, "repeats": args.repeats, "keep_dump": str(workdir / "cuda-ref")},
                            timeout=max(5.0, budget.left()))
    doc["cuda"] = cuda if cuda is not None else {"skipped": info.get("error")}
    if cuda and "step" in cuda:
        doc["cuda"]["summary"] = {"step": analyse_step(cuda["step"]), "replay": analyse_replay(cuda["replay"])}


def _note_early_stop(doc: dict, what: str, result: dict, planned: int) -> None:
    if result.get("stopped_early") is not None:
        doc["skipped"].append(f"{what}: {result['stopped_early']} of {planned} planned repeats (time budget)")


def _cost_factor(point: dict, base: dict) -> float:
    """Rough cost of a point relative to the main configuration (compute scales with batch x pixels x model)."""
    scale_cost = {"n": 1.0, "s": 3.3, "m": 10.5, "l": 13.0, "x": 29.0}
    return (point["batch"] / base["batch"]) * (point["imgsz"] / base["imgsz"]) ** 2 * \
        scale_cost.get(point["scale"], 1.0) / scale_cost.get(base["scale"], 1.0)


def _growth(args, doc: dict, common: dict, budget: Budget, workdir: Path, out_dir: Path, main_step: dict,
            main_dump: str) -> None:
    base = {"scale": "n", "imgsz": args.imgsz, "batch": args.batch}
    grid: dict[tuple, set] = {}
    for b in [int(x) for x in args.grid_batch.split(",") if x]:
        grid.setdefault(("n", args.imgsz, b), set()).add("batch")
    for s in [int(x) for x in args.grid_imgsz.split(",") if x]:
        grid.setdefault(("n", s, args.batch), set()).add("imgsz")
    for sc in [x for x in args.grid_scale.split(",") if x]:
        grid.setdefault((sc, args.imgsz, args.batch), set()).add("scale")
    main_summary = analyse_step(main_step)
    unit = (_median(main_summary["plain_step_s"]) or 1.0) + (_median(main_summary["capture_s"]) or 1.0)
    main_dump_s = main_step["dump"]["first_seconds"]
    points = []
    todo = sorted(grid.items(), key=lambda kv: _cost_factor(dict(zip(("scale", "imgsz", "batch"), kv[0])), base))
    doc["growth"] = {"points": points, "fits": {}}
    def estimate(factor: float, r: int, dump: bool) -> float:
        """Seconds: import + memory runs + r x (plain + capture), plus the dump and its compare."""
        return 8 + factor * (unit * (r + 1.5) + (2 * main_dump_s if dump else 0)) * 1.3

    factors = [_cost_factor(dict(zip(("scale", "imgsz", "batch"), key)), base) for key, _ in todo]
    for position, ((scale, imgsz, batch), axes) in enumerate(todo):
        point = {"scale": scale, "imgsz": imgsz, "batch": batch}
        factor = factors[position]
        is_main = (scale, imgsz, batch) == (base["scale"], base["imgsz"], base["batch"])
        repeats = args.growth_repeats
        est = lambda r, dump: estimate(factor, r, dump)  # noqa: E731
        write_dump = factor <= 4.5
        # what the points after this one need at the least (one repeat, capture only), plus CUDA and writing
        reserve = 40.0 + sum(estimate(f, 1, False) for f in factors[position + 1:]
                             if estimate(f, 1, False) < budget.left())
        reserve = min(reserve, max(40.0, budget.left() - est(1, False)))
        while repeats > 1 and est(repeats, write_dump) > budget.left() - reserve:
            repeats -= 1
        if write_dump and est(repeats, True) > budget.left() - reserve:
            write_dump = False
        if est(repeats, write_dump) > budget.left() - reserve:
            doc["skipped"].append(f"growth point {scale}/{imgsz}/b{batch}: not enough time left "
                                  f"(estimated {est(repeats, write_dump):.0f} s, {budget.left():.0f} s left)")
            _progress(budget, f"growth {scale}/{imgsz}/b{batch}: skipped, not enough time left")
            continue
        entry: dict[str, Any] = {**point, "axes": sorted(axes), "repeats": repeats, "dump_written": write_dump,
                                 "model": _model_yaml({**common, "scale": scale})}
        if is_main:
            step = main_step
            entry["repeats"] = len(main_step["series"]["plain"])
            entry["reused_main"] = True
            dump_path = main_dump if Path(main_dump).exists() else None
        else:
            _progress(budget, f"growth {_model_yaml({**common, 'scale': scale})} {imgsz}px batch {batch} "
                              f"({', '.join(sorted(axes))}): "
                              f"{repeats} repeats, {'dump' if write_dump else 'capture only'}")
            dump_path = str(workdir / f"growth-{scale}-{imgsz}-{batch}") if write_dump else None
            step, info = run_worker("step", {**common, **point, "repeats": repeats, "dump": write_dump,
                                             "keep_dump": dump_path, "min_repeats": 1,
                                             "deadline": time.time() + max(30.0, budget.left() - reserve)},
                                    timeout=budget.left())
            entry["worker"] = info
            if step is None:
                doc["skipped"].append(f"growth point {scale}/{imgsz}/b{batch}: {info.get('error')}")
                continue
        entry["step"] = analyse_step(step)
        if not is_main:
            _note_early_stop(doc, f"growth point {scale}/{imgsz}/b{batch}", step, repeats)
        entry["parameters"] = step.get("parameters")
        if step.get("memory_dump"):
            entry["dump_peak_rss_mb"] = step["memory_dump"]["peak_rss_mb"]
            entry["dump_bytes"] = step["dump"]["bytes_on_disk"]
            entry["largest_tensor_bytes"] = step["dump"]["largest_tensor_bytes"]
        if step.get("memory_capture"):
            entry["capture_peak_rss_mb"] = step["memory_capture"]["peak_rss_mb"]
            entry["captured_bytes"] = step["capture_once"]["captured_bytes"]
        entry["base_rss_mb"] = step.get("base_rss_mb")
        entry["plain_peak_rss_mb"] = (step.get("memory_plain_step") or {}).get("peak_rss_mb")
        # compare growth: the dump against itself, one run in a fresh process
        if dump_path and Path(dump_path).exists():
            rate = _median(((doc.get("compare") or {}).get("summary") or {}).get("compare_gbs")) or 0.1
            compare_est = 8 + (entry.get("dump_bytes") or 0) * 2 / (rate * 1e9) * 1.3
            if compare_est < budget.left() - 40:
                _progress(budget, f"growth compare {scale}/{imgsz}/b{batch} (dump against itself)")
                comp, info = run_worker("compare", {**common, "reference": dump_path, "candidate": dump_path,
                                                    "repeats": 0, "backend": "pread"}, timeout=budget.left())
                if comp is not None:
                    entry["compare"] = analyse_compare(comp, None)
            else:
                doc["skipped"].append(f"growth compare {scale}/{imgsz}/b{batch}: not enough time left")
            if not is_main:
                shutil.rmtree(dump_path, ignore_errors=True)
        points.append(entry)
        doc["growth"]["fits"] = growth_fits(points)
        doc["growth"]["compare_memory_fit"] = memory_fit(points)
        write_outputs(doc, out_dir)


# ============================================================================================ output
def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def _cell(entry: dict | None, unit: str = "", digits: int = 3) -> str:
    """`median (min–max) n=k` with a warning mark when the spread is over 20 %."""
    if not entry or entry.get("median") is None:
        return "-"
    text = f"{_fmt(entry['median'], digits)}{unit} ({_fmt(entry['min'], digits)}–{_fmt(entry['max'], digits)}, n={entry['n']})"
    if entry.get("flag"):
        text += f" **±{entry['spread'] * 100:.0f}%**"
    return text


def _met(value: float | None, target: float, *, higher_is_better: bool = False) -> str:
    if value is None:
        return "not measured"
    ok = value >= target if higher_is_better else value <= target
    return "met" if ok else "**missed**"


def write_outputs(doc: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "benchmarks.json").write_text(json.dumps(_jsonable(doc), indent=1, allow_nan=False) + "\n")
    (out_dir / "benchmarks.md").write_text(render_markdown(doc))


def _jsonable(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def render_markdown(doc: dict) -> str:
    m = doc["machine"]
    lines = ["# Benchmarks", "",
             "Generated by `make bench` (`python -m benchmarks.bench`); do not edit by hand. Raw numbers: "
             "[benchmarks.json](benchmarks.json). Every figure is a median over the runs shown as `n`, with "
             "(min–max); a spread over 20 % of the median is marked **±N%**.", ""]
    if doc.get("quick"):
        lines += ["> **Quick mode** (tiny sizes, for tests): these numbers mean nothing.", ""]
    if (doc.get("settings") or {}).get("inprocess"):
        lines += ["> **In-process run** (`--inprocess`): the workers shared one process, so the memory figures "
                  "are not per-stage peaks and mean nothing.", ""]
    load_start, load_end = doc.get("load_average_start"), doc.get("load_average_end")
    quiet = load_start and load_start[0] < 1.5
    lines += ["## Machine", "",
              f"| | |", "| --- | --- |",
              f"| CPU | {m.get('cpu_model')} ({m.get('cpu_family_model')}), {'virtual machine, ' if m.get('hypervisor') else ''}"
              f"SIMD {', '.join(m.get('simd', [])) or '-'} |",
              f"| cores | {m.get('logical_cpus')} logical, {m.get('usable_cpus')} usable |",
              f"| caches | {'; '.join(f'{k}: {v}' for k, v in (m.get('caches') or {}).items()) or '-'} |",
              f"| memory | {m.get('memory_gib')} GiB ({m.get('memory_available_gib_at_start')} GiB available at start) |",
              f"| torch threads | {doc.get('threads')} (interop {m.get('torch_interop_threads')}) |",
              f"| versions | {', '.join(f'{k} {v}' for k, v in (m.get('versions') or {}).items())} |",
              f"| platform | {m.get('platform')} |",
              f"| load average (1/5/15 min) | start {load_start}, end {load_end} |",
              f"| wall time of this run | {_fmt(doc.get('wall_seconds'), 4)} s |", ""]
    stages = doc.get("contention") or []
    busy = [st for st in stages if st["others"] > 0.10]
    if stages:
        total = sum(st["seconds"] for st in stages) or 1.0
        overall = sum(st["others"] * st["seconds"] for st in stages) / total
        lines.insert(lines.index(f"| wall time of this run | {_fmt(doc.get('wall_seconds'), 4)} s |"),
                     f"| CPU used by other processes during the run | {overall:.0%} of the machine on average; "
                     f"highest stage {max(st['others'] for st in stages):.0%} |")
    if (load_start and not quiet) or busy:
        why = []
        if load_start and not quiet:
            why.append(f"the 1-minute load average was {load_start[0]} at the start on {m.get('usable_cpus')} cpus")
        if busy:
            why.append("other processes used more than 10 % of the machine during: " + "; ".join(
                f"{st['stage']} ({st['others']:.0%} over {st['seconds']:.0f} s)" for st in busy))
        lines += [f"> **Taken under load**: {', and '.join(why)}. Timings in those stages are slower and noisier "
                  f"than on an idle machine; ratios of runs interleaved in the same worker are less affected.", ""]
    lines += _headline(doc)
    lines += _capture_section(doc)
    lines += _replay_section(doc)
    lines += _compare_section(doc)
    lines += _verify_section(doc)
    lines += _growth_section(doc)
    lines += _cuda_section(doc)
    lines += _explain_section(doc)
    if doc.get("skipped"):
        lines += ["## Left out of this run", ""] + [f"- {s}" for s in doc["skipped"]] + [""]
    return "\n".join(lines) + "\n"


def _headline(doc: dict) -> list[str]:
    cap = (doc.get("capture") or {}).get("summary") or {}
    rep = (doc.get("replay") or {}).get("summary") or {}
    comp = (doc.get("compare") or {}).get("summary") or {}
    mem = comp.get("memory_pread") or {}
    lines = ["## Headline", "",
             "| figure | median (min–max, n) | target | |", "| --- | --- | --- | --- |"]
    lines.append(f"| full reference dump (disk) / plain training step | {_cell(cap.get('dump_vs_step'), 'x')} | | |")
    c = cap.get("capture_vs_step")
    lines.append(f"| capture, disk excluded (`run_capture`) / plain training step | {_cell(c, 'x')} | ≤ 1.3x | "
                 f"{_met(_median(c), TARGETS['capture_vs_step'])} |")
    c1 = cap.get("capture_single_step_phases_vs_step")
    lines.append(f"| capture of one loss case, forward-to-end phases / plain step (like for like) | {_cell(c1, 'x')} | "
                 f"≤ 1.3x | {_met(_median(c1), TARGETS['capture_vs_step'])} |")
    lines.append(f"| capture / the same run keeping references instead of copies (cost of the copies) | {_cell(cap.get('capture_vs_noop'), 'x')} | | |")
    iso = rep.get("isolated_vs_forward_nograd")
    lines.append(f"| isolated replay / one forward without autograd | {_cell(iso, 'x')} | ≤ 2x | "
                 f"{_met(_median(iso), TARGETS['isolated_vs_forward'])} |")
    lines.append(f"| isolated replay / one train-mode forward with autograd | {_cell(rep.get('isolated_vs_forward_grad'), 'x')} | ≤ 2x | "
                 f"{_met(_median(rep.get('isolated_vs_forward_grad')), TARGETS['isolated_vs_forward'])} |")
    lines.append(f"| chained replay / one forward without autograd | {_cell(rep.get('chained_vs_forward_nograd'), 'x')} | | |")
    cc = comp.get("compare_vs_copy")
    lines.append(f"| compare throughput / memory-copy bandwidth | {_cell(cc, 'x', 2)} | ≥ 0.33x | "
                 f"{_met(_median(cc), TARGETS['compare_vs_copy'], higher_is_better=True)} |")
    fit = (doc.get("growth") or {}).get("compare_memory_fit")
    if fit:
        lines.append(f"| compare peak memory per MiB of the largest tensor pair (fit over {fit['points']} growth points: "
                     f"peak = {_fmt(fit['fixed_mb'])} MiB + slope x pair, worst residual {_fmt(fit['max_residual_mb'])} MiB) | "
                     f"{_fmt(fit['slope_pairs'])} | < 2 | {_met(fit['slope_pairs'], TARGETS['compare_memory_pairs'])} |")
    pairs = mem.get("above_fixed_in_pairs")
    lines.append(f"| compare peak memory above the fixed base (imports, opened dumps, working set), in largest "
                 f"tensor pairs | {_fmt(pairs)} ({_fmt(mem.get('peak_rss_mb'))} MiB peak = "
                 f"{_fmt(mem.get('base_mb'))} base + {_fmt(mem.get('fixed_working_set_mb'))} working set + "
                 f"{_fmt(mem.get('above_fixed_mb'))}; largest pair {_fmt(mem.get('largest_pair_mb'))} MiB) | < 2 | "
                 f"{_met(pairs, TARGETS['compare_memory_pairs'])} |")
    return lines + [""]


def _capture_section(doc: dict) -> list[str]:
    capture = doc.get("capture") or {}
    cap = capture.get("summary")
    if not cap:
        return ["## Capture", "", "Not measured in this run.", ""]
    raw = capture["raw"]
    cfg = raw["config"]
    dump = raw.get("dump") or {}
    mem = raw.get("memory_dump") or {}
    lines = ["## Capture overhead", "",
             f"{cfg['model']}, {cfg['imgsz']}x{cfg['imgsz']}, batch {cfg['batch']}, {cfg['device']}; all timings "
             f"in one worker process, the runs interleaved (plain step, capture, capture without copies, one-case capture, "
             f"dump) so that load changes hit them alike; a warm-up step is excluded.", "",
             "| what | seconds |", "| --- | --- |",
             f"| plain training step (forward + loss + backward) | {_cell(cap['plain_step_s'])} |",
             f"| — forward / loss / backward | {_cell(cap['plain_forward_s'])} / {_cell(cap['plain_loss_s'])} / "
             f"{_cell(cap['plain_backward_s'])} |",
             f"| `run_capture` (disk excluded) | {_cell(cap['capture_s'])} |"]
    for key, label in (("setup", "build, batch, BatchNorm calibration forward, weights"),
                       ("forward", "train forward with hooks, DFL"),
                       ("losses_and_head_grads", "4 loss cases, 12 head-gradient passes"),
                       ("backward_and_describe", "backward, parameter gradients, manifest")):
        noop = (cap.get("noop_phases_s") or {}).get(key)
        lines.append(f"| — {label} | {_cell(cap['capture_phases_s'][key])}; without copies: {_cell(noop)} |")
    lines += [f"| `run_capture` without copies (`Capture.put` keeping references) | {_cell(cap.get('capture_noop_s'))} |",
              f"| `run_capture` of the `default` case only | {_cell(cap.get('capture_single_s'))} |",
              f"| `dump_reference` (written to disk) | {_cell(cap.get('dump_s'))} |", "",
              f"Captured: {cap.get('captured_tensors')} tensors, {_fmt((cap.get('captured_bytes') or 0) / 2 ** 20)} MiB; "
              f"on disk {_fmt((dump.get('bytes_on_disk') or 0) / 2 ** 20)} MiB. Peak resident memory in a fresh "
              f"process (base {_fmt(raw.get('base_rss_mb'))} MiB after imports): one plain training step "
              f"{_fmt((raw.get('memory_plain_step') or {}).get('peak_rss_mb'))} MiB, then one `dump_reference` "
              f"{_fmt(mem.get('peak_rss_mb'))} MiB.", ""]
    contig = raw.get("contiguity") or {}
    if contig:
        lines += [f"Non-contiguous tensors among those captured: {contig.get('tensors')} "
                  f"({_fmt((contig.get('bytes') or 0) / 2 ** 20)} MiB). `Capture.put` copies every tensor to the "
                  f"host once, contiguous, and `DumpWriter.add` writes that copy as it is.", ""]
    lines += _capture_reading(cap)
    return lines


def _capture_reading(cap: dict) -> list[str]:
    ratio = _median(cap.get("capture_vs_step"))
    noop = _median(cap.get("capture_vs_noop"))
    fwd = _median(cap.get("capture_forward_vs_plain_forward"))
    like = _median(cap.get("capture_single_step_phases_vs_step"))
    phases = cap.get("capture_phases_s") or {}
    total = _median(cap.get("capture_s")) or 0
    parts = {k: _median(v) or 0 for k, v in phases.items()}
    lines = ["What the ratio is made of:", ""]
    if total:
        lines.append(f"- setup {parts.get('setup', 0) / total:.0%} of the capture (model build, image loading, the "
                     f"BatchNorm calibration forward that a plain step does not do), forward with hooks "
                     f"{parts.get('forward', 0) / total:.0%}, four loss cases with twelve head-gradient passes "
                     f"{parts.get('losses_and_head_grads', 0) / total:.0%}, backward {parts.get('backward_and_describe', 0) / total:.0%}.")
    if noop:
        lines.append(f"- storing the tensors (the one host copy each) costs {_fmt((noop - 1) * 100, 2)} % of the "
                     f"capture: capture / same run without copies = {_fmt(noop)}x.")
    if fwd:
        lines.append(f"- the forward with every hook recording is {_fmt(fwd)}x the plain forward.")
    if ratio and like:
        lines.append(f"- a like-for-like step (one loss case, from the forward to the end) is {_fmt(like)}x the plain "
                     f"step; the full capture is {_fmt(ratio)}x because it does more work than a training step "
                     f"(setup, calibration, three more loss cases, twelve head-gradient passes), not because "
                     f"recording is slow.")
    return lines + [""]


def _replay_section(doc: dict) -> list[str]:
    rep = (doc.get("replay") or {}).get("summary")
    if not rep:
        return ["## Replay", "", "Not measured in this run.", ""]
    raw = doc["replay"]["raw"]
    lines = ["## Replay cost", "",
             f"`compare_layers` with the built-in candidate on the main configuration's dump, one mode per call "
             f"(`modes=(\"isolated\",)` / `(\"chained\",)`), loading the candidate included; verdicts "
             f"{json.dumps(rep.get('verdicts'))}. Activations compared per call: "
             f"{_fmt(raw.get('activation_bytes', 0) / 2 ** 20)} MiB of reference data.", "",
             "| what | seconds | / forward without autograd | / forward with autograd |",
             "| --- | --- | --- | --- |",
             f"| plain forward, train mode, without autograd | {_cell(rep['forward_nograd_s'])} | 1 | |",
             f"| plain forward, train mode, with autograd | {_cell(rep['forward_grad_s'])} | | 1 |"]
    for mode in ("isolated", "chained"):
        lines.append(f"| {mode} replay | {_cell(rep[f'{mode}_s'])} | {_cell(rep[f'{mode}_vs_forward_nograd'], 'x')} | "
                     f"{_cell(rep[f'{mode}_vs_forward_grad'], 'x')} |")
    lines += ["", "Where the replay's time goes (seconds per call):", "",
              "| mode | load candidate | candidate layers | metrics | reading the dump | other (structure, diagnosis) |",
              "| --- | --- | --- | --- | --- | --- |"]
    for mode in ("isolated", "chained"):
        b = rep[f"{mode}_breakdown_s"]
        lines.append(f"| {mode} | {_cell(b['load_candidate'])} | {_cell(b['candidate'])} | {_cell(b['metrics'])} | "
                     f"{_cell(b['read'])} | {_cell(b['other'])} |")
    lines.append("")
    fwd = _median(rep["forward_nograd_s"])
    iso = rep["isolated_breakdown_s"]
    if fwd:
        parts = {k: (_median(v) or 0.0) / fwd for k, v in iso.items()}
        lines += [f"In units of one forward without autograd, the isolated replay is: loading the candidate "
                  f"{parts['load_candidate']:.2f}, running its layers {parts['candidate']:.2f}, metrics "
                  f"{parts['metrics']:.2f}, reading the reference {parts['read']:.2f}, structure checks and "
                  f"diagnosis {parts['other']:.2f}. Running the layers alone is the floor (about one forward); "
                  f"everything above it is the price of judging every layer output.", ""]
    return lines


def _compare_section(doc: dict) -> list[str]:
    comp = (doc.get("compare") or {}).get("summary")
    if not comp:
        return ["## Compare", "", "Not measured in this run.", ""]
    lines = ["## Compare throughput and memory", "",
             "A streamed dump-against-dump compare (`parity.compare.stream.compare_dumps`: every tensor of the "
             "dump, one pair in memory at a time, `parity.compare.metrics.compare_tensors` under the default profile) of the "
             "main reference against a candidate dump that is the reference plus one float32 ULP on every third "
             "element of each activation, loss and gradient, so those pairs take the full metric path (weights, "
             "batch and init stay bitwise equal and take the fast path). Throughput counts reference + candidate "
             "bytes judged; copy bandwidth counts bytes read + written (STREAM convention), so both count the "
             "bytes that cross the memory bus. The dumps are in the page cache (just written).", "",
             "| what | value |", "| --- | --- |",
             f"| memory copy, torch `copy_` of {_fmt((comp.get('copy_buffer_bytes') or 0) / 2 ** 20)} MiB "
             f"(threads {comp.get('copy_threads')}), before and after the compare runs | {_cell(comp.get('copy_gbs'), ' GB/s')} |",
             f"| memory copy, numpy `copyto` (1 thread) | {_cell(comp.get('numpy_copy_gbs'), ' GB/s')} |",
             f"| streamed compare, {comp.get('tensors')} tensors, {_fmt((comp.get('bytes_judged') or 0) / 2 ** 20)} MiB "
             f"judged | {_cell(comp.get('compare_gbs'), ' GB/s')} |",
             f"| — seconds: total / reading (pread) / metrics | {_cell(comp.get('total_s'))} / {_cell(comp.get('read_s'))} / "
             f"{_cell(comp.get('metrics_s'))} |",
             f"| compare / copy | {_cell(comp.get('compare_vs_copy'), 'x', 2)} |"]
    probe = comp.get("metrics_probe")
    if probe:
        for entry in probe.get("by_size", []):
            lines.append(f"| `compare_tensors` alone, in memory, {entry['elements']:,}-element float32 slice of "
                         f"`{probe['tensor']}` | {_fmt(entry['gbs'])} GB/s; "
                         f"{_cell(entry['seconds_per_call'])} s per call |")
        lines.append(f"| — the whole `{probe['tensor']}` against itself (bitwise-equal fast path: `torch.equal`, then one `torch.aminmax`) | "
                     f"{_cell(probe.get('bitwise_equal_gbs'), ' GB/s')} |")
        ops = probe.get("operators") or {}
        if ops:
            lines.append(f"| operators of one `compare_tensors` on `{probe['tensor']}` | {ops.get('calls_per_chunk')} "
                         f"calls per chunk of {ops.get('chunk_elements'):,} elements; self time: "
                         + ", ".join(f"{o['op'][6:]} ×{o['calls']} {o['share']:.0%}" for o in ops.get("ops", [])) + " |")
        dot = (probe.get("dot") or {})
        if dot:
            lines.append(f"| one float64 chunk of {dot['elements']:,} elements, {dot['threads']} threads: `torch.dot` / "
                         f"`(a * b).sum()`, µs per call | {_cell(dot.get('dot_us'))} / {_cell(dot.get('mul_sum_us'))} |")
    fused = (doc.get("compare") or {}).get("fused") or {}
    if fused.get("fused_gbs"):
        lines.append(f"| the same statistics as one fused kernel (`torch.compile`, compile {_fmt(fused.get('compile_seconds'))} s "
                     f"excluded), on `{fused.get('tensor')}` | {_cell(fused['fused_gbs'], ' GB/s')}; unfused eager "
                     f"{_cell(fused.get('eager_gbs'), ' GB/s')} |")
    elif fused.get("skipped"):
        lines.append(f"| fused-kernel probe | skipped: {fused['skipped']} |")
    lines += [""] + _compare_reading(comp, (doc.get("compare") or {}).get("fused") or {})
    lines += ["Peak resident memory of one compare, each in a fresh process (VmHWM):", "",
              "| reader | peak MiB | fixed base MiB | working set MiB | above both MiB | largest pair MiB | "
              "above both / largest pair |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for key, label in (("memory_pread", "pread (`parity.compare.stream`, default)"),
                       ("memory_mmap", "mmap (`Dump.get`)")):
        mem = comp.get(key)
        if mem:
            lines.append(f"| {label} | {_fmt(mem['peak_rss_mb'])} | {_fmt(mem.get('base_mb'))} | "
                         f"{_fmt(mem.get('fixed_working_set_mb'))} | {_fmt(mem.get('above_fixed_mb'))} | "
                         f"{_fmt(mem['largest_pair_mb'])} | {_fmt(mem.get('above_fixed_in_pairs'))} |")
    lines += ["", "Fixed base: a process with the same imports that opened both dumps and compared nothing. Working "
              "set: its peak above that base while comparing the committed fixture `yolo11-narrow-nc80-96` "
              "(the same 1001 tensor names, all tiny), i.e. the report rows and the metric temporaries. "
              "`Dump.get` returns views of a memory mapping that stays open with the dump, so every page read "
              "stays resident: its peak grows with the whole dump, not with the largest pair.", ""]
    return lines


def _compare_reading(comp: dict, fused: dict) -> list[str]:
    total, metrics, read = (_median(comp.get(k)) for k in ("total_s", "metrics_s", "read_s"))
    gbs, copy = _median(comp.get("compare_gbs")), _median(comp.get("copy_gbs"))
    probe = comp.get("metrics_probe") or {}
    sizes = probe.get("by_size") or []
    lines = ["What limits the compare:", ""]
    if total and metrics is not None and read is not None:
        lines.append(f"- metrics take {metrics / total:.0%} of the streamed compare, reading the two dumps "
                     f"{read / total:.0%}: it is bound by arithmetic, not by memory or the disk.")
    if sizes:
        small, large = sizes[0], sizes[-1]
        per_call = _median(small["seconds_per_call"])
        tensors = comp.get("tensors") or 0
        if per_call and total:
            lines.append(f"- a `compare_tensors` call on {small['elements']} elements takes {per_call * 1e3:.2g} ms "
                         f"(its fixed cost); over the {tensors} tensors of a dump that is about "
                         f"{per_call * tensors:.2g} s of the {total:.2g} s.")
        lines.append(f"- on the largest tensor it runs at {_fmt(large['gbs'])} GB/s"
                     + (f", {large['gbs'] / copy:.2g} of copy bandwidth" if copy else "")
                     + f"; {((probe.get('operators') or {}).get('calls_per_chunk'))} operator calls per chunk, each "
                       f"a pass over the chunk (cache-resident), so the per-byte cost is the operator count.")
    dot = probe.get("dot") or {}
    d, m = _median(dot.get("dot_us")), _median(dot.get("mul_sum_us"))
    if d and m:
        verdict = ("so the BLAS dot products are not what holds the compare back." if d <= m else
                   "BLAS wakes its own threads for every call, so the dot products cost more than a plain loop.")
        lines.append(f"- `torch.dot` on a float64 chunk costs {d:.3g} µs against {m:.3g} µs for `(a * b).sum()`, "
                     + verdict)
    if fused.get("fused_gbs") and copy:
        f = _median(fused["fused_gbs"])
        lines.append(f"- the same statistics as one fused loop reach {_fmt(f)} GB/s ({f / copy:.2g} of copy "
                     f"bandwidth): the float64 arithmetic itself (about 40 operations per element) is the ceiling of "
                     f"this metric set on {comp.get('copy_threads')} threads.")
    if gbs and copy:
        lines.append(f"- target: compare ≥ 1/3 of copy bandwidth = {copy / 3:.3g} GB/s; measured {gbs:.3g} GB/s "
                     f"({gbs / copy:.2g}).")
    return lines + [""]


def _growth_section(doc: dict) -> list[str]:
    growth = doc.get("growth")
    if not growth or not growth.get("points"):
        return ["## Growth", "", "Not measured in this run.", ""]
    lines = ["## Growth", "",
             "Each point in its own worker process (medians of its repeats). Peak memory comes first in the fresh "
             "process, each phase's peak measured from a reset mark: one plain training step, one `run_capture`, "
             "then one `dump_reference` (left out at the biggest points, to fit the time budget). The compare columns are one streamed compare of the dump against itself in a "
             "fresh process: every pair is bitwise equal, so `compare_tensors` takes its fast path; the memory "
             "peak is what grows with the tensors.", "",
             "| model | imgsz | batch | params | plain step s | capture s | capture / step | dump MiB | "
             "peak RSS MiB: plain step / capture / dump | compare s | compare peak MiB | repeats |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p in sorted(growth["points"], key=lambda p: ({"n": 0, "s": 1, "m": 2}.get(p["scale"], 3), p["imgsz"], p["batch"])):
        st = p["step"]
        comp = p.get("compare") or {}
        lines.append(
            f"| {Path(p.get('model') or ('yolo11' + p['scale'])).stem} | {p['imgsz']} | {p['batch']} | {_fmt((p.get('parameters') or 0) / 1e6, 3)}M | "
            f"{_cell(st['plain_step_s'])} | {_cell(st['capture_s'])} | {_cell(st['capture_vs_step'], 'x')} | "
            f"{_fmt((p.get('dump_bytes') or p.get('captured_bytes') or 0) / 2 ** 20)} | "
            f"{_fmt(p.get('plain_peak_rss_mb'))} / {_fmt(p.get('capture_peak_rss_mb'))} / "
            f"{_fmt(p.get('dump_peak_rss_mb'))} | "
            f"{_cell(comp.get('total_s'))} | {_fmt((comp.get('memory_pread') or {}).get('peak_rss_mb'))} | {p['repeats']} |")
    lines += ["", "Fitted growth: exponent k of figure ~ x^k (least squares in log-log) and the factor per doubling "
              "of x (2^k); x is the batch, the image side, or the parameter count for the scale axis.", "",
              "| axis | figure | exponent k | per doubling | points | worst log residual |",
              "| --- | --- | --- | --- | --- | --- |"]
    for axis, figures in (growth.get("fits") or {}).items():
        for figure, fit in figures.items():
            lines.append(f"| {axis} | {figure} | {fit['exponent']:.2f} | {fit['per_doubling']:.2f}x | {fit['points']} | "
                         f"{fit['max_log_residual']:.2f} |")
    return lines + [""]


def _explain_section(doc: dict) -> list[str]:
    summary = (doc.get("explain") or {}).get("summary")
    if not summary:
        return ["## Explainer", "", "Not measured in this run.", ""]
    lines = ["## Explainer time per divergent place", "",
             "`parity.causes.explain_report` on a report of the built-in with one plant (target: at most 20x one "
             "run of the place: one forward of the layer, one stage call, or one loss evaluation for a black "
             "box). `runs` counts trials in runs of the place; setup (loading the candidate and the built-in with "
             "the reference weights) is in the last column, not in the ratio.", "",
             "| plant | place | cause named | runs | explain s | / one run of the place | / one loss evaluation "
             "| whole explain_report s |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in summary:
        vs_loss = _cell(row["vs_loss_eval"], "x") if row["vs_loss_eval"] else "-"
        lines.append(f"| {row['plant']} | {row['place']} | {row['cause'] or 'none'} | {row['runs']:g} | "
                     f"{_cell(row['seconds'], ' s')} | {_cell(row['vs_one_run'], 'x')} | {vs_loss} | "
                     f"{_cell(row['explain_report_seconds'], ' s')} |")
    return lines + [""]


def _cuda_section(doc: dict) -> list[str]:
    cuda = doc.get("cuda") or {}
    lines = ["## CUDA", ""]
    if not cuda or cuda.get("skipped") or "summary" not in cuda:
        lines += [f"Skipped: {cuda.get('skipped') or 'not run'}. The code path (`benchmarks.bench.worker_cuda`) runs the "
                  f"same capture and replay benchmark with `--device cuda`, `torch.cuda.synchronize()` before and "
                  f"after every timed region and the warm-up excluded.", ""]
        return lines
    step, rep = cuda["summary"]["step"], cuda["summary"]["replay"]
    lines += [f"{cuda.get('device_name')}, CUDA {cuda.get('cuda')}.", "",
              "| figure | median (min–max, n) |", "| --- | --- |",
              f"| plain training step, s | {_cell(step['plain_step_s'])} |",
              f"| capture, disk excluded, s | {_cell(step['capture_s'])} |",
              f"| capture / plain step | {_cell(step['capture_vs_step'], 'x')} |",
              f"| capture / without copies | {_cell(step.get('capture_vs_noop'), 'x')} |",
              f"| isolated replay / forward without autograd | {_cell(rep['isolated_vs_forward_nograd'], 'x')} |",
              f"| chained replay / forward without autograd | {_cell(rep['chained_vs_forward_nograd'], 'x')} |", ""]
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
