"""Two-rank data-parallel training steps on this machine: torch.distributed with the gloo backend, one process
per rank (torch.multiprocessing), for the reference (ultralytics' trainer under DistributedDataParallel) and
for a candidate, on the reference dump's batch split over the ranks.

What data parallel changes, and what the two-rank comparison therefore checks (docs/training.md):
  - each rank computes the loss on batch // world_size images (consecutive images of the batch);
  - ultralytics multiplies the loss by the world size (`self.loss *= self.world_size` when RANK != -1);
  - DistributedDataParallel all-reduces the gradients on backward, averaging them: every rank steps with the
    same gradients and keeps the same weights;
  - BatchNorm is not synchronised (no SyncBatchNorm): each rank's running statistics follow its own images.
Each rank writes its reference and candidate steps as dumps; the parent compares them rank by rank. Steps run
free (chained): an isolated step would need every rank's own BatchNorm statistics from the reference.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from parity.errors import ParityError

WORLD = 2


@dataclass
class RankDumps:
    reference: list[Path]               # per rank
    candidates: list[list[Path]]        # per candidate, per rank


def _worker(rank: int, reference: str, candidates: list[str], steps: int, out: str, world: int) -> None:
    import torch.distributed as dist

    from parity.runtime import prepare

    prepare(1)  # one thread per rank: two ranks share this machine's cores
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)
    try:
        from parity.dump import names
        from parity.capture.batch import load_batch
        from parity.capture.reference import CaptureConfig, prepare_model
        from parity.capture.train import ReferenceTraining, TrainArgs, TrainWorld
        from parity.dump.files import Dump, DumpWriter
        from parity.replay.train import candidate_steps, loss_batch_of, write_train_dump

        dump = Dump(reference)
        keep = set(CaptureConfig.__dataclass_fields__) - {"train", "cases"}
        config = CaptureConfig(**{k: v for k, v in dump.config.items() if k in keep})
        train_args = TrainArgs(**{k: v for k, v in dump.manifest["train"]["args"].items()
                                  if k in TrainArgs.__dataclass_fields__},
                               batches_per_epoch=dump.manifest["train"]["batches_per_epoch"])
        batch = load_batch(config.images, imgsz=config.imgsz, batch=config.batch, nc=config.nc, seed=config.seed)
        model, _ = prepare_model(config, batch)
        training = ReferenceTraining(model, train_args, config.batch, config.nc, world=TrainWorld(rank, world))
        writer = DumpWriter(Path(out) / f"reference-rank{rank}", kind="reference")
        with writer:
            for step, record in enumerate(training.run(loss_batch_of(dump), steps)):
                for quantity, tensor in record.items():
                    writer.add(names.train(step, quantity), tensor)
            writer.commit({"train": {"steps": steps, **training.static}})
        for index, candidate in enumerate(candidates):
            cand = candidate_steps(candidate, dump, world_size=world, rank=rank, steps=steps, mode="chained")
            write_train_dump(cand, Path(out) / f"candidate{index}-rank{rank}")
            dist.barrier()
    finally:
        dist.destroy_process_group()


def run_two_ranks(reference: str | Path, candidates: list[str], steps: int, out: str | Path | None = None, *,
                  timeout: float = 600.0, world: int = WORLD) -> RankDumps:
    """Spawn `world` ranks; each writes `reference-rank{r}` and, per candidate spec (`builtin`,
    `package.module:factory`), `candidate{i}-rank{r}` dumps under `out`."""
    import torch.multiprocessing as mp

    out = Path(out or tempfile.mkdtemp(prefix="parity-ddp-"))
    out.mkdir(parents=True, exist_ok=True)
    context = mp.start_processes(_worker, args=(str(reference), list(candidates), steps, str(out), world), nprocs=world,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise ParityError(f"the {world}-rank training run did not finish within {timeout:.0f} s")
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as error:
        raise ParityError(f"a rank failed: {str(error).strip().splitlines()[-1]}") from None
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return RankDumps([out / f"reference-rank{r}" for r in range(world)],
                     [[out / f"candidate{i}-rank{r}" for r in range(world)] for i in range(len(candidates))])
