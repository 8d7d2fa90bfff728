"""What the benchmarks read from the machine: resident memory and its peak (/proc/self), the CPU, caches and
memory (/proc/cpuinfo, /sys, /proc/meminfo), the load, and how much CPU other processes took (/proc/stat)."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any


# ------------------------------------------------------------------------------------------------ memory
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


# ----------------------------------------------------------------------------------------------- machine
def _cpuinfo() -> dict[str, str]:
    """The first value of every key of /proc/cpuinfo (the first CPU's)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if ":" in line:
                key, value = (s.strip() for s in line.split(":", 1))
                fields.setdefault(key, value)
    except OSError:
        pass
    return fields


def _caches() -> dict[str, str]:
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
    return caches


def _memory() -> dict[str, float]:
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        return {"memory_gib": round(int(meminfo["MemTotal"].split()[0]) / 2 ** 20, 1),
                "memory_available_gib_at_start": round(int(meminfo["MemAvailable"].split()[0]) / 2 ** 20, 1)}
    except (OSError, KeyError, ValueError):
        return {}


def _usable_cpus() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


def machine_info() -> dict[str, Any]:
    cpuinfo = _cpuinfo()
    flags = cpuinfo.get("flags", "").split()
    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_model": cpuinfo.get("model name") or platform.processor() or platform.machine(),
            "cpu_family_model": f"family {cpuinfo.get('cpu family', '?')} model {cpuinfo.get('model', '?')}",
            "simd": [f for f in ("avx2", "avx512f", "fma") if f in flags], "hypervisor": "hypervisor" in flags,
            "logical_cpus": os.cpu_count(), "usable_cpus": _usable_cpus(), "caches": _caches(), **_memory()}


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


# -------------------------------------------------------------------------------------------- contention
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
