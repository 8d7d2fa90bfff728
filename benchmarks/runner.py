"""Running a worker: in a fresh subprocess (its result on a tagged stdout line, its peak memory from wait4), or,
for the tests, in this process."""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.system import hwm_mb
from benchmarks.workers import WORKERS

RESULT_TAG = "PARITY-BENCH-RESULT "
ROOT = Path(__file__).resolve().parent.parent
INPROCESS = False  # `--inprocess` (tests): workers run in this process; memory figures then mean little


def run_worker_main(kind: str, params_json: str) -> int:
    """The worker side: `python -m benchmarks.bench --worker KIND JSON`."""
    from parity.runtime import prepare

    params = json.loads(params_json)
    prepare(params.get("threads"))
    result = WORKERS[kind](params)
    result["worker_hwm_mb"] = hwm_mb()
    print(RESULT_TAG + json.dumps(result, default=str), flush=True)
    return 0


def run_worker(kind: str, params: dict, *, timeout: float) -> tuple[dict | None, dict]:
    """A worker subprocess; returns (its result, {wall, maxrss_mb (wait4), error})."""
    if INPROCESS:
        t0 = time.perf_counter()
        result = json.loads(json.dumps(WORKERS[kind](params), default=str))
        result["worker_hwm_mb"] = hwm_mb()
        return result, {"wall": time.perf_counter() - t0, "maxrss_mb": hwm_mb(), "exit": 0, "inprocess": True}
    command = [sys.executable, "-m", "benchmarks.bench", "--worker", kind, json.dumps(params)]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=None, env=env, text=True, cwd=ROOT)
    output, timed_out = _read_until(proc, t0 + max(timeout, 5))
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


def _read_until(proc: subprocess.Popen, deadline: float) -> tuple[list[str], bool]:
    """The worker's stdout lines until it closes them, or until `deadline` (then the worker is killed)."""
    output = []
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
    return output, timed_out
