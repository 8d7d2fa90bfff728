"""Dump-against-dump comparison that streams one tensor pair at a time, so its memory stays about one pair.

`Dump.get` memory-maps: the tensor it returns is a view of the file mapping, and every page read stays mapped
(and counted in the process's resident memory) while the dump's file handle is open, so reading a whole dump
through it grows resident memory to the size of the dump (measured in docs/benchmarks.md). `TensorReader`
instead reads each tensor with `pread(2)` into memory of its own, which is freed as soon as the caller drops
the tensor: peak memory is the largest pair plus the comparison's fixed working set. Both ways read from the
page cache at memory speed once the dump has been read or written recently.

`compare_dumps` judges every tensor two dumps have in common with `parity.compare.metrics.compare_tensors`
under a tolerance profile, and falls back to `parity.compare.stats.compare_stats` when either dump is
statistics-only. It reports, besides the rows, how many bytes it judged and where its time went.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

import torch

from parity.dump import names
from parity.compare.metrics import compare_tensors
from parity.compare.tolerances import Profile, get_profile, profile_for_environment
from parity.dump.files import Dump, read_header
from parity.errors import DumpError, ParityError
from parity.findings import Finding, Report, Row

BACKENDS = ("pread", "mmap")


class TensorReader:
    """Reads one tensor at a time from a dump. `backend="pread"` copies into private memory (freed with the
    tensor); `backend="mmap"` is `Dump.get` (no copy, but mapped pages stay resident until `close`). Either way
    each tensor is checked against its manifest checksum as it is read (`Dump.check`)."""

    def __init__(self, dump: Dump, backend: str = "pread"):
        if backend not in BACKENDS:
            raise ParityError(f"backend {backend!r}: choose from {', '.join(BACKENDS)}")
        self.dump = dump
        self.backend = backend
        self._handles: dict[str, object] = {}

    def _handle(self, file: str):
        if file not in self._handles:
            from safetensors import safe_open

            full = self.dump.path / file
            if not full.exists():
                raise DumpError(f"{self.dump.path}: manifest names {file}, which is missing")
            read_header(full)  # a truncated or corrupt file is named as such, in one line
            try:
                self._handles[file] = safe_open(str(full), framework="pt", backend="pread")
            except Exception as error:  # noqa: BLE001 - safetensors raises several types for corrupt files
                raise DumpError(f"{full} is not a readable safetensors file: {error}") from None
        return self._handles[file]

    def get(self, name: str) -> torch.Tensor:
        if self.backend == "mmap":
            return self.dump.get(name)
        entry = self.dump.index.get(name)
        if entry is None or not entry.get("file"):
            return self.dump.get(name)  # raises the dump's own, explanatory error
        try:
            tensor = self._handle(entry["file"]).get_tensor(name)
        except DumpError:
            raise
        except Exception as error:  # noqa: BLE001
            raise DumpError(f"{self.dump.path / entry['file']}: cannot read {name!r}: {error}") from None
        self.dump.check(name, tensor)  # shape, and the checksum once per tensor: the dump's own rule
        return tensor

    def close(self) -> None:
        self._handles.clear()


def iter_pairs(reference: Dump, candidate: Dump, tensor_names: Iterable[str], *, backend: str = "pread",
               timing: dict | None = None) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, reference tensor, candidate tensor), one pair alive at a time when the caller drops each pair."""
    ref_reader, cand_reader = TensorReader(reference, backend), TensorReader(candidate, backend)
    try:
        for name in tensor_names:
            started = time.perf_counter()
            ref = ref_reader.get(name)
            cand = cand_reader.get(name)
            if timing is not None:
                timing["read_s"] = timing.get("read_s", 0.0) + time.perf_counter() - started
            yield name, ref, cand
            del ref, cand
    finally:
        ref_reader.close()
        cand_reader.close()


def _section(name: str) -> str:
    return {"model": "weights", "batch": "batch", "act": "activations", "init": "init", "loss": "loss",
            "grad": "gradients"}.get(name.split(".", 1)[0], "other")


def compare_dumps(reference: Dump | str, candidate: Dump | str, *, profile: str | Profile | None = None,
                  prefix: str = "", backend: str = "pread",
                  progress: Callable[[str], None] | None = None) -> Report:
    """Compare every tensor two dumps share, element-wise, one pair in memory at a time."""
    reference = reference if isinstance(reference, Dump) else Dump(reference)
    candidate = candidate if isinstance(candidate, Dump) else Dump(candidate)
    if reference.stats_only or candidate.stats_only:
        from parity.compare.stats import compare_stats

        return compare_stats(reference, candidate, profile=profile, prefix=prefix)
    profile = get_profile(profile or profile_for_environment(reference.manifest.get("environment"),
                                                            reference.config.get("precision")))
    report = Report(command="compare dumps", reference=str(reference.path), candidate=str(candidate.path),
                    profile=profile.name)
    ref_names = reference.names(prefix)
    if not ref_names:
        raise ParityError(f"{reference.path}: no tensors" + (f" under {prefix!r}" if prefix else ""))
    cand_names = set(candidate.names(prefix))
    common = [n for n in ref_names if n in cand_names]
    timing = {"read_s": 0.0, "metrics_s": 0.0}
    judged_bytes = 0
    largest_pair = 0
    started = time.perf_counter()
    masks: dict[str, torch.Tensor] = {}
    for name, ref, cand in iter_pairs(reference, candidate, common, backend=backend, timing=timing):
        if progress is not None:
            progress(name)
        pair_bytes = ref.numel() * ref.element_size() + cand.numel() * cand.element_size()
        judged_bytes += pair_bytes
        largest_pair = max(largest_pair, pair_bytes)
        report.add(_judge_pair(name, ref, cand, profile, reference, masks, timing))
        del ref, cand
    seconds = time.perf_counter() - started
    report.coverage.update({
        "compared": len(common),
        "left_out": [n for n in ref_names if n not in cand_names],
        "extra_in_candidate": sorted(cand_names.difference(ref_names)),
    })
    report.context.update({
        "mode": "element-wise, streamed one tensor pair at a time",
        "backend": backend,
        "profile": profile.as_dict(),
        "bytes_judged": judged_bytes,
        "largest_pair_bytes": largest_pair,
        "seconds": round(seconds, 4),
        "read_seconds": round(timing["read_s"], 4),
        "metrics_seconds": round(timing["metrics_s"], 4),
    })
    _add_first_divergence(report, len(common))
    return report


def _judge_pair(name: str, ref: torch.Tensor, cand: torch.Tensor, profile: Profile, reference: Dump,
                masks: dict[str, torch.Tensor], timing: dict) -> Row:
    """The report row of one tensor pair under the profile's tolerance for its name (compare time into
    `timing["metrics_s"]`)."""
    tol = profile.for_name(name)
    ref, cand, note_prefix = _foreground_only(name, ref, cand, reference, masks)
    t0 = time.perf_counter()
    metrics = compare_tensors(ref, cand, tol)
    timing["metrics_s"] += time.perf_counter() - t0
    note = note_prefix + (metrics.summary() if metrics.passed else (metrics.reason or metrics.summary()))
    return Row(_section(name), names.place_of(name), name, metrics.passed, metrics=metrics.as_dict(),
               tolerance=tol.as_dict(), note=note)


def _foreground_only(name: str, ref: torch.Tensor, cand: torch.Tensor, reference: Dump,
                     masks: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, str]:
    """A tensor whose background rows are filler is judged on the reference's foreground anchors only.
    `masks` caches the last mask read (consecutive tensors share one)."""
    mask_name = names.foreground_mask_for(name)
    if mask_name and mask_name in reference and ref.shape == cand.shape:
        if mask_name not in masks:
            masks.clear()
            masks[mask_name] = reference.get(mask_name).bool()
        fg = masks[mask_name]
        if fg.shape == ref.shape[: fg.dim()]:
            return ref[fg], cand[fg], "foreground anchors only: "
    return ref, cand, ""


def _add_first_divergence(report: Report, compared: int) -> None:
    first = report.first_divergence()
    if first is not None:
        report.find(Finding("tensor-divergence", first.where,
                            f"first tensor outside tolerance, in dump order: {first.name}: {first.note} "
                            f"({len(report.failed_rows)} of {compared} tensors fail)",
                            evidence={"tensor": first.name, "failed": len(report.failed_rows)}))


__all__ = ["BACKENDS", "TensorReader", "compare_dumps", "iter_pairs"]
