"""The benchmark workers, each run in its own subprocess (`python -m benchmarks.bench --worker KIND JSON`) so
that each has its own memory figures: KIND -> worker(params) -> result (JSON-able)."""

from __future__ import annotations

from benchmarks.workers.compare import worker_compare, worker_compare_base, worker_fused, worker_make_candidate
from benchmarks.workers.cuda import worker_cuda
from benchmarks.workers.explain import worker_explain
from benchmarks.workers.replay import worker_replay
from benchmarks.workers.step import worker_step
from benchmarks.workers.verify import worker_verify

WORKERS = {"step": worker_step, "replay": worker_replay, "make-candidate": worker_make_candidate,
           "compare": worker_compare, "compare-base": worker_compare_base, "fused": worker_fused,
           "cuda": worker_cuda, "verify": worker_verify, "explain": worker_explain}
