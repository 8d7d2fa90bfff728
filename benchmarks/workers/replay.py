"""The replay worker: `compare_layers` with the built-in candidate, isolated and chained separately, against one
plain forward, its time split into candidate, metrics, reading and the rest."""

from __future__ import annotations

import time
from contextlib import contextmanager

from benchmarks.workers.common import Repeats, capture_config, log, sync_for, tensor_bytes, timed_forward


def worker_replay(params: dict) -> dict:
    """compare_layers (built-in candidate), isolated and chained separately, vs one plain forward."""
    from parity.capture.batch import load_batch
    from parity.capture.reference import prepare_model
    from parity.dump.files import Dump

    device = params.get("device", "cpu")
    sync = sync_for(device)
    reference = Dump(params["dump"])
    cfg = reference.config
    params = {**params, "model": cfg["model"], "imgsz": cfg["imgsz"], "batch": cfg["batch"], "nc": cfg["nc"]}
    config = capture_config(params)
    batch = load_batch(config.images, imgsz=config.imgsz, batch=config.batch, nc=config.nc, seed=config.seed)
    model, _ = prepare_model(config, batch)
    img = batch.img.to(device)

    timed_forward(model, img, True, sync)
    spent = {"candidate": 0.0, "metrics": 0.0, "read": 0.0}
    with _time_spent_in(spent):
        return _replay_loop(reference, lambda grad: timed_forward(model, img, grad, sync), sync, spent,
                            int(params["repeats"]), device, params)


@contextmanager
def _time_spent_in(spent: dict):
    """Time where compare_layers spends its time, without changing what it does: its metric calls, its dump reads
    and the candidate's layer runs add their seconds to `spent`."""
    from parity.dump.files import Dump
    from parity.replay import candidates
    from parity.replay import layers as replay_layers

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
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def _replay_loop(reference, forward, sync, spent: dict, repeats: int, device: str, params: dict) -> dict:
    from parity.diagnose.layers import compare_layers
    from parity.replay import candidates

    series: dict[str, list] = {"forward_grad": [], "forward_nograd": [], "isolated": [], "chained": []}
    verdicts = {}
    if params.get("warmup", True):
        log("warm-up replay (excluded)")
        compare_layers(reference, candidates.load_candidate("builtin", reference, device=device),
                       modes=("isolated",), progress=False, device=device)
    rounds = Repeats(params)
    for rep in rounds:
        series["forward_grad"].append(forward(True))
        series["forward_nograd"].append(forward(False))
        for mode in ("isolated", "chained"):
            log(f"repeat {rep + 1}/{repeats}: replay {mode}")
            timing, verdicts[mode] = _one_replay(reference, mode, sync, spent, device)
            series[mode].append(timing)
    return {"series": series, "verdicts": verdicts, "dump": params["dump"], "stopped_early": rounds.stopped,
            "activation_bytes": sum(tensor_bytes(e) for n, e in reference.index.items() if n.startswith("act."))}


def _one_replay(reference, mode: str, sync, spent: dict, device: str) -> tuple[dict, dict]:
    from parity.diagnose.layers import compare_layers
    from parity.replay import candidates

    sync()
    t0 = time.perf_counter()
    candidate = candidates.load_candidate("builtin", reference, device=device)
    t_load = time.perf_counter() - t0
    for key in spent:
        spent[key] = 0.0
    report = compare_layers(reference, candidate, modes=(mode,), progress=False, device=device)
    sync()
    total = time.perf_counter() - t0
    other = total - t_load - sum(spent.values())
    timing = {"total": total, "load_candidate": t_load, **dict(spent), "other": other}
    return timing, {"verdict": report.verdict, "rows": len(report.rows), "failed": len(report.failed_rows)}
