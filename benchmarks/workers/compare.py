"""The compare workers: a 1-ULP candidate dump, the streamed dump-against-dump compare against memory-copy
bandwidth, its fixed memory base, `compare_tensors` alone by tensor size and by operator, and the fused-kernel
probe (how fast the metric set could be as one kernel)."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from benchmarks.stats import summarize
from benchmarks.system import Phase, hwm_mb, rss_mb
from benchmarks.workers.common import Repeats, log


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
    from parity.dump.files import Dump

    repeats = int(params["repeats"])
    # base: imports done, both dumps opened (manifests parsed), nothing compared
    reference, candidate = Dump(params["reference"]), Dump(params["candidate"])
    out: dict[str, Any] = {"base_rss_mb": rss_mb()}
    backend = params.get("backend", "pread")
    log(f"compare once, backend {backend} (memory)")
    out[f"memory_{backend}"] = _compare_memory(params, backend)
    if repeats == 0:
        return out
    copy_bytes = int(params.get("copy_bytes", 256 << 20))
    out["copy"] = copy_bandwidth(copy_bytes, max(3, repeats))
    rounds = Repeats(params)
    out["series"] = [_timed_compare(params, backend, rep, repeats) for rep in rounds]
    out["stopped_early"] = rounds.stopped
    out["copy_after"] = copy_bandwidth(copy_bytes, 3)
    if params.get("metrics_probe"):
        out["metrics_probe"] = metrics_probe(reference, candidate, repeats)
    return out


def _compare_memory(params: dict, backend: str) -> dict:
    from parity.compare.stream import compare_dumps
    from parity.dump.files import Dump

    with Phase() as phase:
        report = compare_dumps(Dump(params["reference"]), Dump(params["candidate"]), prefix=params.get("prefix", ""),
                               backend=backend)
    return {**phase.as_dict(), "verdict": report.verdict, "bytes_judged": report.context["bytes_judged"],
            "largest_pair_bytes": report.context["largest_pair_bytes"], "rows": len(report.rows),
            "failed": len(report.failed_rows), "read_seconds": report.context["read_seconds"],
            "metrics_seconds": report.context["metrics_seconds"]}


def _timed_compare(params: dict, backend: str, rep: int, repeats: int) -> dict:
    from parity.compare.stream import compare_dumps
    from parity.dump.files import Dump

    log(f"repeat {rep + 1}/{repeats}: streamed compare")
    t0 = time.perf_counter()
    report = compare_dumps(Dump(params["reference"]), Dump(params["candidate"]), prefix=params.get("prefix", ""),
                           backend=backend)
    total = time.perf_counter() - t0
    return {"total": total, "bytes": report.context["bytes_judged"], "read": report.context["read_seconds"],
            "metrics": report.context["metrics_seconds"], "gbs": report.context["bytes_judged"] / total / 1e9,
            "tensors": len(report.rows)}


def _largest_activation_pair(reference, candidate):
    """The name and flattened copies of the largest float32 activation both dumps hold."""
    acts = [n for n in reference.names("act.") if n in candidate and reference.index[n]["dtype"] == "F32"]
    name = max(acts, key=lambda n: math.prod(reference.index[n]["shape"]))
    return name, reference.get(name).clone().reshape(-1), candidate.get(name).clone().reshape(-1)


def metrics_probe(reference, candidate, repeats: int) -> dict[str, Any]:
    """`compare_tensors` alone, in memory: throughput by tensor size (fixed per-call cost vs per-byte cost), a
    bitwise-equal pair, and where its time goes by operator (torch profiler) on the largest activation pair."""
    from parity.compare.metrics import compare_tensors
    from parity.compare.tolerances import get_profile

    name, ref_t, cand_t = _largest_activation_pair(reference, candidate)
    tol = get_profile(None).for_name(name)
    sizes = sorted({min(s, ref_t.numel()) for s in (256, 1 << 16, 1 << 20, ref_t.numel())})
    by_size = [_metrics_at_size(ref_t, cand_t, tol, size, repeats) for size in sizes]
    equal = []
    for _ in range(max(3, repeats)):
        t0 = time.perf_counter()
        compare_tensors(ref_t, ref_t, tol)
        equal.append(2 * ref_t.numel() * 4 / (time.perf_counter() - t0) / 1e9)
    return {"tensor": name, "elements": ref_t.numel(), "by_size": by_size, "bitwise_equal_gbs": summarize(equal),
            "operators": operator_profile(ref_t, cand_t, tol), "dot": dot_probe(repeats)}


def _metrics_at_size(ref_t, cand_t, tol, size: int, repeats: int) -> dict[str, Any]:
    from parity.compare.metrics import compare_tensors

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
    return {"elements": size, "pair_bytes": 2 * size * 4, "seconds_per_call": seconds,
            "gbs": 2 * size * 4 / seconds["median"] / 1e9}


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


# views, copies and allocations the profile leaves out: they are not the arithmetic of the metric set
_PROFILE_SKIP = {"aten::slice", "aten::view", "aten::as_strided", "aten::reshape", "aten::detach", "aten::alias",
                 "aten::lift_fresh", "aten::item", "aten::_local_scalar_dense", "aten::empty", "aten::empty_strided",
                 "aten::resolve_conj", "aten::resolve_neg", "aten::to", "aten::_to_copy", "aten::empty_like",
                 "aten::zeros", "aten::fill_", "aten::zero_", "aten::expand"}


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
    events = [e for e in prof.key_averages() if e.key.startswith("aten::") and e.key not in _PROFILE_SKIP]
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

    name, r, c = _largest_activation_pair(Dump(params["reference"]), Dump(params["candidate"]))
    t0 = time.perf_counter()
    try:
        fused = torch.compile(fused_metrics, dynamic=True)
        fused(r, c, 1e-5, 1e-5, 4)
    except Exception as error:  # noqa: BLE001 - a missing compiler is a result, not a crash
        return {"skipped": f"torch.compile failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"}
    out = {"tensor": name, "compile_seconds": time.perf_counter() - t0}
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
