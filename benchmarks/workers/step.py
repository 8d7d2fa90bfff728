"""The capture worker: one plain ultralytics training step against the capture (no disk) and the dump (disk)
on the same batch, with each one's peak memory measured first in the fresh process."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from benchmarks.system import Phase, rss_mb
from benchmarks.workers.common import Repeats, capture_config, log, sync_for, tensor_bytes, timed_forward


class PlainStep:
    """One plain training step (forward + loss + backward) of the configuration's model on its batch."""

    def __init__(self, config, device: str, sync):
        from parity.capture.batch import load_batch
        from parity.capture.reference import prepare_model

        batch = load_batch(config.images, imgsz=config.imgsz, batch=config.batch, nc=config.nc, seed=config.seed)
        self.model, _ = prepare_model(config, batch)
        self.img = batch.img.to(device)
        self.loss_batch = {k: v.to(device) for k, v in batch.as_loss_batch("default").items()}
        self.sync = sync

    def __call__(self) -> dict[str, float]:
        sync = self.sync
        sync()
        t0 = time.perf_counter()
        preds = self.model(self.img)
        sync()
        t1 = time.perf_counter()
        loss, _items = self.model.loss(self.loss_batch, preds)
        sync()
        t2 = time.perf_counter()
        loss.sum().backward()
        sync()
        t3 = time.perf_counter()
        self.model.zero_grad(set_to_none=True)
        return {"total": t3 - t0, "forward": t1 - t0, "loss": t2 - t1, "backward": t3 - t2}

    def forward(self, grad: bool) -> float:
        return timed_forward(self.model, self.img, grad, self.sync)


def capture_timed(config, sync) -> dict[str, float]:
    """run_capture with its phases timed from the progress callbacks it already makes."""
    from parity.capture import run_capture

    stamps: list[tuple[str, float]] = []
    sync()
    t0 = time.perf_counter()
    capture = run_capture(config, lambda step: stamps.append((step, time.perf_counter())))
    sync()
    end = time.perf_counter()
    marks = stamps + [("end", end)]

    def at(prefix: str) -> float | None:
        return next((t for s, t in marks if s.startswith(prefix)), None)

    fwd, loss, bwd = at("forward pass"), at("loss, case"), at("backward pass")
    times = {"total": end - t0,
             "setup": (fwd - t0) if fwd else None,
             "forward": (loss - fwd) if fwd and loss else None,
             "losses_and_head_grads": ((bwd or end) - loss) if loss else None,
             "backward_and_describe": (end - bwd) if bwd else None,
             "captured_bytes": sum(t.numel() * t.element_size() for t in capture.tensors.values()),
             "captured_tensors": len(capture.tensors)}
    del capture
    return times


def worker_step(params: dict) -> dict:
    """Plain training step vs capture (no disk) vs dump (disk) for one configuration."""
    device = params.get("device", "cpu")
    sync = sync_for(device)
    config = capture_config(params)
    out: dict[str, Any] = {"config": {"model": config.model, "imgsz": config.imgsz, "batch": config.batch,
                                      "device": device}, "base_rss_mb": rss_mb()}
    plain = PlainStep(config, device, sync)
    out["parameters"] = sum(p.numel() for p in plain.model.parameters())
    _memory_runs(out, params, config, plain, sync)
    plain()  # warm-up, excluded
    rounds = Repeats(params)
    out["series"] = _timed_rounds(params, config, plain, sync, rounds)
    out["stopped_early"] = rounds.stopped
    out["contiguity"] = _contiguity_probe(config) if params.get("contiguity") else None
    return out


def _memory_runs(out: dict, params: dict, config, plain: PlainStep, sync) -> None:
    """Memory first, in a fresh process: one plain step, then one capture, then (unless left out for the
    biggest points) one dump."""
    with Phase() as phase:
        plain()
    out["memory_plain_step"] = phase.as_dict()
    log("capture once (memory)")
    with Phase() as phase:
        first = capture_timed(config, sync)
    out["memory_capture"] = phase.as_dict()
    out["capture_once"] = first
    if params.get("dump"):
        _dump_once(out, params, config)


def _dump_once(out: dict, params: dict, config) -> None:
    from parity.capture import dump_reference
    from parity.dump.files import Dump

    keep = params.get("keep_dump")
    log("dump once (memory)")
    with Phase() as phase:
        target = Path(keep) if keep else Path(params["workdir"]) / "mem-dump"
        dump_reference(config, target, force=True)
    out["memory_dump"] = phase.as_dict()
    dump = Dump(target)
    sizes = [tensor_bytes(e) for e in dump.index.values()]
    out["dump"] = {"bytes_on_disk": dump.nbytes(), "tensors": len(dump.index), "tensor_bytes": sum(sizes),
                   "largest_tensor_bytes": max(sizes), "first_seconds": phase.seconds,
                   "parameters": dump.model.get("parameters")}
    if not keep:
        shutil.rmtree(target, ignore_errors=True)


def _timed_rounds(params: dict, config, plain: PlainStep, sync, rounds: Repeats) -> dict[str, list]:
    """The timed runs, interleaved in each round so that load changes hit them alike."""
    from parity.capture.reference import Capture

    series: dict[str, list] = {k: [] for k in ("plain", "capture", "capture_noop", "capture_single", "dump",
                                               "forward_grad", "forward_nograd")}
    for rep in rounds:
        log(f"repeat {rep + 1}/{rounds.total}: plain step, capture" + (", dump" if params.get("dump_each") else ""))
        series["plain"].append(plain())
        series["forward_grad"].append(plain.forward(True))
        series["forward_nograd"].append(plain.forward(False))
        series["capture"].append(capture_timed(config, sync))
        if params.get("noop"):
            original_put = Capture.put
            Capture.put = _put_reference  # same work, references kept instead of copies
            try:
                series["capture_noop"].append(capture_timed(config, sync))
            finally:
                Capture.put = original_put
        if params.get("single_case"):
            series["capture_single"].append(capture_timed(capture_config(params, cases=("default",)), sync))
        if params.get("dump_each"):
            series["dump"].append(_timed_dump(config, Path(params["workdir"]) / f"timed-dump-{rep}", sync))
    return {k: v for k, v in series.items() if v}


def _timed_dump(config, target: Path, sync) -> dict[str, float]:
    from parity.capture import dump_reference

    sync()
    t0 = time.perf_counter()
    dump_reference(config, target, force=True)
    seconds = time.perf_counter() - t0
    shutil.rmtree(target, ignore_errors=True)
    return {"total": seconds}


def _put_reference(self, name, tensor) -> None:
    """`Capture.put` without the copy: keeps a reference, so a capture does all its work but copies nothing.
    It records the shape as `put` does: the manifest is described from `shapes`."""
    self.shapes[name] = list(tensor.shape)
    self.tensors[name] = tensor.detach()


def _contiguity_probe(config) -> dict:
    """How many captured tensors are not contiguous (DumpWriter.add then copies them a second time)."""
    from parity.capture import run_capture

    capture = run_capture(config)
    odd = [(n, t.numel() * t.element_size()) for n, t in capture.tensors.items() if not t.is_contiguous()]
    return {"tensors": len(odd), "bytes": sum(b for _, b in odd), "examples": [n for n, _ in odd[:4]]}
