"""Capture N training steps of ultralytics' own trainer (`parity dump --steps N`).

The reference is ultralytics' code, run in-process and offline on the dump's fixed batch (the `default` case,
every step). `BaseTrainer` itself cannot be constructed without a dataset on disk, so its methods are called
unbound on a small object holding the attributes they read (`_TrainerState`):

    BaseTrainer.build_optimizer        the parameter groups, optimizer=auto's choice and lr0
    BaseTrainer._setup_scheduler       lf (linear or cosine) and the LambdaLR scheduler
    BaseTrainer._get_warmup_iterations the warmup length
    BaseTrainer._model_train           train mode (frozen BatchNorms in eval)
    BaseTrainer.optimizer_step         GradScaler unscale, clip_grad_norm_(max_norm=10), step, zero_grad, EMA
    ultralytics' ModelEMA              the EMA and its decay ramp

Four pieces of the trainer are inline in long methods and are mirrored here line for line, nothing else
(ultralytics 8.4.190, `ultralytics/engine/trainer.py`):

    `_build_train_pipeline`  accumulate = max(round(nbs / batch), 1); weight_decay scaled by
                             batch * accumulate / nbs; accumulate capped at batches * epochs; the planned
                             iterations that optimizer=auto reads          (`_mirror_pipeline`)
    `_setup_train`           the `.dfl` parameters frozen                  (`_mirror_freeze`)
    `_do_train`              the warmup block (np.interp of accumulate, lr per group, momentum) and the
                             accumulation rule `ni - last_opt_step >= accumulate`   (`_mirror_warmup`, `run`)
    `_do_train`              `loss.sum()`, `*= world_size` under DDP, backward; the scheduler stepped at each
                             epoch's start after `scheduler.last_epoch = start_epoch - 1`   (`run`)

Everything is observed from outside: hyperparameters read from `optimizer.param_groups` before the step, the
gradient norm of the accumulated gradients before `optimizer_step` (what `clip_grad_norm_` computes), the
clipped one from an optimizer step pre-hook, weights, EMA and optimizer state after the step; none of these
reads writes anything the trainer uses (tests/test_train.py: step 0's loss is bitwise the dump's own loss).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import torch
from torch import nn

from parity.dump import names
from parity.errors import ParityError

# What `clip_grad_norm_` is called with in `BaseTrainer.optimizer_step`.
MAX_GRAD_NORM = 10.0
OPTIMIZER_BUFFERS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "step")


@dataclass
class TrainArgs:
    """The trainer arguments a training capture uses. Names and defaults are ultralytics' (`default.yaml`)
    except three the harness must choose, since it trains on one fixed batch rather than a dataset:

    - `epochs` 10 and `batches_per_epoch` 4 (a dataset of 4 copies of the dump's batch): 10 steps cross two
      epoch boundaries (the schedule moves) and stay inside the 12-iteration warmup;
    - `nbs` 8 instead of 64: at batch 2, 64 accumulates up to 32 batches and the optimizer would step once in
      10 steps; 8 gives a nominal accumulate of 4, ramped 1, 1, 2, 2, … during warmup.
    """

    optimizer: str = "auto"
    epochs: int = 10
    batches_per_epoch: int = 4
    nbs: int = 8
    lr0: float = 0.01
    lrf: float = 0.01
    momentum: float = 0.937
    weight_decay: float = 0.0005
    warmup_epochs: float = 3.0
    warmup_momentum: float = 0.8
    warmup_bias_lr: float = 0.1
    cos_lr: bool = False

    def overrides(self) -> dict:
        out = asdict(self)
        out.pop("batches_per_epoch")
        return out


def check_train_config(steps: int, train: TrainArgs, precision: str) -> None:
    if steps < 0:
        raise ParityError(f"--steps must be 0 or more, got {steps}")
    if not steps:
        return
    if precision != "fp32":
        raise ParityError(f"--steps runs the trainer without AMP: it needs --precision fp32, got {precision}")
    if train.batches_per_epoch < 1 or train.epochs < 1:
        raise ParityError(f"--batches-per-epoch and --epochs must be at least 1, got {train.batches_per_epoch} "
                          f"and {train.epochs}")
    planned = train.batches_per_epoch * train.epochs
    if steps > planned:
        raise ParityError(f"--steps {steps} is more than the {planned} iterations planned "
                          f"({train.epochs} epochs x {train.batches_per_epoch} batches per epoch)")


# ----------------------------------------------------------------------------------------- observation
def group_hyperparameters(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """lr, momentum (Adam: beta1) and weight decay of every parameter group, float64, in group order."""
    def momentum(group: dict) -> float:
        return group["momentum"] if "momentum" in group else group.get("betas", (float("nan"),))[0]

    groups = optimizer.param_groups
    return {"lr": torch.tensor([g["lr"] for g in groups], dtype=torch.float64),
            "momentum": torch.tensor([momentum(g) for g in groups], dtype=torch.float64),
            "weight_decay": torch.tensor([g["weight_decay"] for g in groups], dtype=torch.float64)}


def grad_norm(parameters) -> torch.Tensor:
    """The total 2-norm `clip_grad_norm_` computes over the gradients that exist."""
    grads = [p.grad for p in parameters if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads, 2.0) if grads else torch.tensor(0.0)


def optimizer_state(optimizer: torch.optim.Optimizer, key_of: dict[int, str]) -> dict[str, torch.Tensor]:
    """Per parameter, its optimizer buffers (`optim.{key}.momentum_buffer`, `.exp_avg`, `.exp_avg_sq`, `.step`)."""
    out = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            key = key_of.get(id(p))
            if key is None:
                continue
            for buffer, value in optimizer.state.get(p, {}).items():
                if buffer in OPTIMIZER_BUFFERS and isinstance(value, torch.Tensor):
                    out[f"optim.{key}.{buffer}"] = value.detach().clone()
    return out


def describe_optimizer(optimizer: torch.optim.Optimizer, key_of: dict[int, str]) -> dict:
    """The optimizer's class, constant settings and which parameter is in which group (manifest `train`)."""
    groups = []
    for index, group in enumerate(optimizer.param_groups):
        groups.append({"name": group.get("param_group", f"group{index}"),
                       "initial_lr": group.get("initial_lr", group["lr"]),
                       "settings": group_settings(group),
                       "params": [key_of[id(p)] for p in group["params"] if id(p) in key_of]})
    return {"type": type(optimizer).__name__, "param_groups": groups}


def group_settings(group: dict) -> dict:
    """A group's constant settings (nesterov, betas, eps, dampening, …): what changes per step is recorded
    per step, and the optimizer's `defaults` are not what the groups were built with."""
    skip = ("params", "lr", "momentum", "weight_decay", "initial_lr", "param_group", "foreach", "fused",
            "differentiable", "capturable")
    out = {}
    for key, value in group.items():
        if key in skip:
            continue
        if isinstance(value, tuple):
            value = list(value)
        if isinstance(value, (bool, int, float, str, list, type(None))):
            out[key] = value
    return out


# ------------------------------------------------------------------------------------- the trainer state
class _TrainerState(SimpleNamespace):
    """The attributes of `BaseTrainer` that its methods called here read and write."""


def trainer_args(train: TrainArgs, batch: int):
    from ultralytics.cfg import get_cfg
    from ultralytics.utils import DEFAULT_CFG

    return get_cfg(DEFAULT_CFG, {**train.overrides(), "batch": batch, "amp": False, "val": False, "plots": False})


def _mirror_pipeline(state: _TrainerState, dataset_length: int, batches: int) -> float:
    """`_build_train_pipeline`: accumulate and the scaled weight decay (before accumulate is capped), then
    the planned iterations optimizer=auto reads."""
    args = state.args
    state.accumulate = max(round(args.nbs / state.batch_size), 1)
    weight_decay = args.weight_decay * state.batch_size * state.accumulate / args.nbs
    state.accumulate = min(state.accumulate, batches * state.epochs)
    state.iterations = math.ceil(dataset_length / max(state.batch_size, args.nbs)) * state.epochs
    return weight_decay


def _mirror_freeze(model: nn.Module) -> list[str]:
    """`_setup_train`: every parameter whose name contains `.dfl` is frozen (freeze=None freezes no layer)."""
    frozen = []
    for key, parameter in model.named_parameters():
        if ".dfl" in key:
            parameter.requires_grad = False
            frozen.append(key)
    return frozen


def _mirror_warmup(state: _TrainerState, ni: int, nw: int, acc0: int, epoch: int) -> None:
    """The warmup block of `_do_train`, with the same numpy calls."""
    import numpy as np

    if not (nw and ni <= nw):
        return
    xi = [0, nw]
    state.accumulate = max(1, int(np.interp(ni, xi, [1, acc0]).round()))
    for x in state.optimizer.param_groups:
        x["lr"] = float(np.interp(ni, xi, [state.args.warmup_bias_lr if x.get("param_group") == "bias" else 0.0,
                                           x["initial_lr"] * state.lf(epoch)]))
        if "momentum" in x:
            x["momentum"] = float(np.interp(ni, xi, [state.args.warmup_momentum, state.args.momentum]))


# ------------------------------------------------------------------------------------------- the loop
@dataclass
class TrainWorld:
    """Data parallel: this process's rank among `size` (torch.distributed already initialised)."""

    rank: int = -1
    size: int = 1


def split_batch(loss_batch: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s share of the batch, as a DistributedSampler with batch // world images per rank gives it
    for a dataset in this order: consecutive images, ground truth renumbered from 0."""
    images = loss_batch["img"].shape[0]
    if world < 2:
        return loss_batch
    if images % world:
        raise ParityError(f"--batch {images} does not split over {world} ranks")
    per_rank = images // world
    first = rank * per_rank
    keep = (loss_batch["batch_idx"] >= first) & (loss_batch["batch_idx"] < first + per_rank)
    return {"img": loss_batch["img"][first:first + per_rank], "cls": loss_batch["cls"][keep],
            "bboxes": loss_batch["bboxes"][keep], "batch_idx": loss_batch["batch_idx"][keep] - first}


class ReferenceTraining:
    """ultralytics' trainer on one model, step by step. `static` describes the setup; `run(steps)` yields one
    record per step (names as in docs/dump-format.md, without the `train.{step}.` prefix)."""

    def __init__(self, model: nn.Module, train: TrainArgs, batch_size: int, nc: int,
                 world: TrainWorld | None = None):
        from ultralytics.engine.trainer import BaseTrainer
        from ultralytics.utils import LOGGER
        from ultralytics.utils.torch_utils import ModelEMA

        self.world = world or TrainWorld()
        args = trainer_args(train, batch_size)
        self.train = train
        state = self.state = _TrainerState(args=args, data={"nc": nc}, epochs=train.epochs, batch_size=batch_size,
                                           world_size=self.world.size if self.world.rank != -1 else 0,
                                           device=next(model.parameters()).device)
        model.args = args  # set_model_attributes
        frozen = _mirror_freeze(model)
        state.freeze_layer_names = [".dfl"]
        if self.world.rank != -1:
            model = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        state.model = model
        batches = train.batches_per_epoch
        weight_decay = _mirror_pipeline(state, dataset_length=batches * batch_size, batches=batches)
        level = LOGGER.level
        LOGGER.setLevel("ERROR")  # build_optimizer logs its choice; the manifest records it
        try:
            requested = args.optimizer
            state.optimizer = BaseTrainer.build_optimizer(state, model=model, name=args.optimizer, lr=args.lr0,
                                                          momentum=args.momentum, decay=weight_decay,
                                                          iterations=state.iterations)
        finally:
            LOGGER.setLevel(level)
        BaseTrainer._setup_scheduler(state)
        state.ema = ModelEMA(model)
        state.scaler = _disabled_grad_scaler()
        state.scheduler.last_epoch = -1  # start_epoch - 1
        self.nw = BaseTrainer._get_warmup_iterations(state, batches)
        self.acc0 = state.accumulate
        self._trainer = BaseTrainer
        self.bare = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        self.key_of = {id(p): k for k, p in self.bare.named_parameters()}
        self.static = {
            "args": {**train.overrides(), "batch": batch_size, "amp": False},
            # what optimizer=auto made of them (build_optimizer rewrites args.optimizer, lr0, warmup_bias_lr)
            "resolved": {"optimizer": args.optimizer, "lr0": args.lr0,
                         "momentum": float(group_hyperparameters(state.optimizer)["momentum"][0]),
                         "warmup_bias_lr": args.warmup_bias_lr, "requested_optimizer": requested},
            "optimizer": describe_optimizer(state.optimizer, self.key_of),
            "batches_per_epoch": batches, "weight_decay_scaled": weight_decay,
            "accumulate_nominal": self.acc0, "warmup_iterations": self.nw, "planned_iterations": state.iterations,
            "max_grad_norm": MAX_GRAD_NORM, "frozen": frozen,
            "ema": {"decay": 0.9999, "tau": 2000, "averages": "every floating-point state_dict entry"},
            "world_size": self.world.size, "rank": self.world.rank,
        }

    def run(self, loss_batch: dict[str, torch.Tensor], steps: int,
            progress: Callable[[str], None] = lambda step: None) -> Iterator[dict[str, torch.Tensor]]:
        state, trainer = self.state, self._trainer
        nb = self.train.batches_per_epoch
        if self.world.rank != -1:
            loss_batch = split_batch(loss_batch, self.world.rank, self.world.size)
        loss_batch = {k: v.to(state.device) for k, v in loss_batch.items()}
        clipped: list[torch.Tensor] = []
        handle = state.optimizer.register_step_pre_hook(
            lambda optimizer, *_: clipped.append(grad_norm(state.model.parameters())))
        last_opt_step = -1
        state.optimizer.zero_grad()
        try:
            for ni in range(steps):
                epoch, i = divmod(ni, nb)
                if i == 0:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # as the trainer: "lr_scheduler.step() before optimizer.step()"
                        state.scheduler.step()
                    trainer._model_train(state)
                _mirror_warmup(state, ni, self.nw, self.acc0, epoch)
                progress(f"training step {ni}")
                record = group_hyperparameters(state.optimizer)
                record["accumulate"] = torch.tensor(state.accumulate)
                loss, _items = state.model(loss_batch)
                total = loss.sum()
                if self.world.rank != -1:
                    total = total * state.world_size
                total.backward()
                record.update(loss=loss.detach(), loss_sum=total.detach(), grad_norm=grad_norm(state.model.parameters()))
                stepped = ni - last_opt_step >= state.accumulate
                if stepped:
                    trainer.optimizer_step(state)
                    last_opt_step = ni
                    record["grad_norm_clipped"] = clipped.pop()
                    record.update(optimizer_state(state.optimizer, self.key_of))
                    record.update({f"ema.{k}": v for k, v in state.ema.ema.state_dict().items()
                                   if v.dtype.is_floating_point})
                    record["ema_decay"] = torch.tensor(state.ema.decay(state.ema.updates), dtype=torch.float64)
                record["stepped"] = torch.tensor(stepped)
                record["ema_updates"] = torch.tensor(state.ema.updates)
                record.update({f"weights.{k}": v for k, v in self.bare.state_dict().items()})
                if i == nb - 1 and hasattr(self.bare.criterion, "update"):
                    self.bare.criterion.update()  # the epoch's end
                yield {k: v.detach().clone() for k, v in record.items()}
        finally:
            handle.remove()


def _disabled_grad_scaler():
    """The scaler the trainer builds without AMP: every call passes through."""
    return torch.amp.GradScaler("cuda", enabled=False)
