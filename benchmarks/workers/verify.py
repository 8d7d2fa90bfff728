"""The verification worker: what checking every tensor against its manifest checksum costs (`Dump.check`, on by
default) in the streamed compare and the built-in replay, and the throughput of the hashes themselves."""

from __future__ import annotations

import time
from typing import Any

from benchmarks.workers.common import Repeats, log


def _hash_throughput(reference) -> dict[str, Any]:
    """SHA-256 and XXH3-128 (the hash reads check) over every stored tensor of the reference."""
    from parity.dump.files import checksum, fast_checksum

    tensors = [reference.get(n) for n in reference.names() if reference.index[n].get("file")]
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    out: dict[str, Any] = {}
    for key, hash_fn in (("sha256", checksum), ("xxh3_128", fast_checksum)):
        t0 = time.perf_counter()
        for tensor in tensors:
            hash_fn(tensor)
        out[key] = {"bytes": nbytes, "seconds": time.perf_counter() - t0}
        out[key]["gbs"] = nbytes / out[key]["seconds"] / 1e9
    return out


def worker_verify(params: dict) -> dict:
    """The streamed compare and the built-in replay (`parity compare --what layers`), each timed with
    verification on and off in alternating rounds (fresh `Dump`s each round, so every tensor is hashed again),
    plus the throughput of the hash reads check (XXH3-128) and of SHA-256 over the reference's bytes."""
    from parity.compare.stream import compare_dumps
    from parity.dump.files import Dump

    ref_path, cand_path = params["reference"], params["candidate"]
    out = _hash_throughput(Dump(ref_path, verify=False))
    kinds = {"streamed": lambda verify: compare_dumps(Dump(ref_path, verify=verify), Dump(cand_path, verify=verify))}
    if params.get("replay", True):
        from parity.diagnose.layers import compare_layers

        kinds["replay"] = lambda verify: compare_layers(Dump(ref_path, verify=verify), "builtin", progress=False)
    for kind, run in kinds.items():
        series = {"on": [], "off": []}
        run(True)  # warm: page cache, imports, the candidate's first build
        for rep in Repeats(params):
            for verify in ((True, False) if rep % 2 == 0 else (False, True)):
                log(f"{kind} compare, verification {'on' if verify else 'off'}, repeat {rep + 1}")
                started = time.perf_counter()
                run(verify)
                series["on" if verify else "off"].append(time.perf_counter() - started)
        out[kind] = series
    return out
