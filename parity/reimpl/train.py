"""A clean-room training step for the built-in detector: parameter groups, warmup, gradient accumulation,
clipping, an EMA of the weights and the learning-rate schedule, written to train the way ultralytics 8.4 does.

    trainer = Trainer(model, loss_fn, TrainConfig(batch=2, nc=80))
    for batch in batches:
        out = trainer.step(batch)          # {"loss", "loss_sum", "grad_norm", "stepped", "ema_decay"}

What a step does, in order (`ni` counts batches from 0, `nb` batches make an epoch):
  1. at an epoch's first batch, the schedule sets every group's lr to lr0 * factor(epoch);
  2. during warmup (`ni <= warmup_iterations`) the accumulation count and every group's lr and momentum are
     interpolated linearly from their warmup start values towards their targets;
  3. forward, loss (times the world size when data parallel), backward: gradients add up over batches;
  4. once `accumulate` batches have gone by since the last update: clip the gradient norm at 10, step, zero
     the gradients and update the EMA.
Each of these is one short method, so a variant that does one thing differently (tests/ports/train/) is a
subclass that overrides one method; nothing here switches behaviour on a flag.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

GROUPS = ("weight", "bn", "bias")


@dataclass
class TrainConfig:
    batch: int = 2              # the whole batch, over every rank
    nc: int = 80
    optimizer: str = "auto"     # auto, SGD, AdamW, Adam
    epochs: int = 10
    batches_per_epoch: int = 4
    nbs: int = 8                # nominal batch size: gradients accumulate until about this many images
    lr0: float = 0.01
    lrf: float = 0.01           # final lr as a fraction of lr0
    momentum: float = 0.937     # SGD momentum, Adam beta1
    weight_decay: float = 0.0005
    warmup_epochs: float = 3.0
    warmup_momentum: float = 0.8
    warmup_bias_lr: float = 0.1
    cos_lr: bool = False
    max_grad_norm: float = 10.0
    ema_decay: float = 0.9999
    ema_tau: float = 2000.0
    world_size: int = 1         # data-parallel ranks (each computes the loss on batch // world_size images)

    @classmethod
    def from_args(cls, args: dict, **extra) -> "TrainConfig":
        known = {k: v for k, v in args.items() if k in cls.__dataclass_fields__}
        return cls(**{**known, **extra})


# ------------------------------------------------------------------------------------------ parameter groups
def split_parameters(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """weight: conv and linear weights (decayed); bn: the weights of normalisation layers; bias: every bias."""
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {g: [] for g in GROUPS}
    for module_name, module in model.named_modules():
        is_norm = "Norm" in type(module).__name__ and isinstance(module, nn.Module) and \
            type(module).__module__.startswith("torch.nn")
        for name, parameter in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            if name == "bias" or name.endswith("bias"):
                groups["bias"].append((full, parameter))
            elif is_norm:
                groups["bn"].append((full, parameter))
            else:
                groups["weight"].append((full, parameter))
    return groups


def auto_optimizer(config: TrainConfig, iterations: int) -> tuple[str, float, float]:
    """optimizer=auto: (name, lr0, momentum). Short runs get AdamW at an lr fitted to the class count."""
    if iterations > 10_000:
        raise NotImplementedError("optimizer=auto picks MuSGD for runs over 10,000 iterations; not built in")
    return "AdamW", round(0.002 * 5 / (4 + config.nc), 6), 0.9


def make_optimizer(name: str, groups: dict[str, list[nn.Parameter]], lr: float, momentum: float,
                   decay: float) -> torch.optim.Optimizer:
    decays = {"weight": decay, "bn": 0.0, "bias": 0.0}
    if name in ("Adam", "AdamW"):
        settings = {"lr": lr, "betas": (momentum, 0.999)}
    elif name == "SGD":
        settings = {"lr": lr, "momentum": momentum, "nesterov": True}
    else:
        raise NotImplementedError(f"optimizer {name!r} is not built in (SGD, Adam, AdamW, auto)")
    param_groups = [{"params": groups[g], **settings, "weight_decay": decays[g], "param_group": g}
                    for g in ("weight", "bn", "bias")]
    return getattr(torch.optim, name)(param_groups)


def clip_gradients(parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale all gradients together so their joint 2-norm is at most `max_norm`; returns the norm before."""
    grads = [p.grad for p in parameters if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale)
    return norm


class EMA:
    """An exponential moving average of every floating-point tensor of the model's state (weights and BatchNorm
    statistics), its decay ramping from 0 towards `decay` with the number of updates."""

    def __init__(self, model: nn.Module, decay: float, tau: float):
        self.model = model
        self.decay, self.tau = decay, tau
        self.updates = 0
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items() if v.dtype.is_floating_point}

    def decay_at(self, updates: int) -> float:
        return self.decay * (1 - math.exp(-updates / self.tau))

    @torch.no_grad()
    def update(self) -> float:
        self.updates += 1
        d = self.decay_at(self.updates)
        current = self.model.state_dict()
        for key, average in self.state.items():
            average.lerp_(current[key], 1 - d)
        return d


# ------------------------------------------------------------------------------------------------- trainer
class Trainer:
    """One model, its optimizer, schedule and EMA. `step(batch)` consumes one batch."""

    def __init__(self, model: nn.Module, loss_fn: Callable, config: TrainConfig, *,
                 frozen: Callable[[str], bool] = lambda name: False, forward: nn.Module | None = None):
        # `forward`: what the batch goes through, e.g. DistributedDataParallel(model); the EMA, the groups and
        # the weights are always the bare model's.
        self.model, self.loss_fn, self.config = model, loss_fn, config
        self.forward = forward or model
        for name, parameter in model.named_parameters():
            if frozen(name):
                parameter.requires_grad_(False)
        nominal = max(round(config.nbs / config.batch), 1)
        self.weight_decay = config.weight_decay * self.decay_scale(nominal)
        self.accumulate_target = min(nominal, config.batches_per_epoch * config.epochs)
        self.accumulate = self.accumulate_target
        iterations = math.ceil(config.batches_per_epoch * config.batch / max(config.batch, config.nbs)) * config.epochs
        self.optimizer_name, self.lr0, self.momentum = self.choose_optimizer(iterations)
        self.bias_warmup_start = 0.0 if config.optimizer == "auto" else config.warmup_bias_lr
        self.groups = self.parameter_groups()
        self.optimizer = make_optimizer(self.optimizer_name, {g: [p for _, p in ps] for g, ps in self.groups.items()},
                                        self.lr0, self.momentum, self.weight_decay)
        self.ema = EMA(model, config.ema_decay, config.ema_tau)
        self.warmup_iterations = self.warmup_length()
        self.ni = 0
        self.last_update = -1
        self.optimizer.zero_grad()

    # ---- the parts a variant may do differently
    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        return split_parameters(self.model)

    def decay_scale(self, accumulate: int) -> float:
        """Weight decay is given per nominal batch: scale it to the images one update really sees."""
        return self.config.batch * accumulate / self.config.nbs

    def choose_optimizer(self, iterations: int) -> tuple[str, float, float]:
        c = self.config
        if c.optimizer == "auto":
            return auto_optimizer(c, iterations)
        return c.optimizer, c.lr0, c.momentum

    def lr_factor(self, epoch: int) -> float:
        c = self.config
        if c.cos_lr:
            return max((1 - math.cos(epoch * math.pi / c.epochs)) / 2, 0) * (c.lrf - 1) + 1
        return max(1 - epoch / c.epochs, 0) * (1.0 - c.lrf) + c.lrf

    def warmup_length(self) -> int:
        epochs = min(self.config.warmup_epochs, max(self.config.epochs - 1, 0))
        return round(epochs * self.config.batches_per_epoch) if epochs > 0 else 0

    def warmup(self, ni: int, epoch: int) -> None:
        """Move accumulate, lr and momentum along straight lines from their warmup start values (accumulate 1,
        lr 0 or warmup_bias_lr for biases, momentum warmup_momentum) to their targets."""
        n = self.warmup_iterations
        if not n or ni > n:
            return
        self.accumulate = max(1, round(ramp(ni, n, 1, self.accumulate_target)))
        for group in self.optimizer.param_groups:
            start = self.bias_warmup_start if group["param_group"] == "bias" else 0.0
            group["lr"] = ramp(ni, n, start, self.lr0 * self.lr_factor(epoch))
            if "momentum" in group:  # Adam's beta1 is not warmed up
                group["momentum"] = ramp(ni, n, self.config.warmup_momentum, self.momentum)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss is per-rank batch sized; data parallel averages gradients over ranks, so multiply it back."""
        total = loss.sum()
        return total * self.config.world_size if self.config.world_size > 1 else total

    def should_update(self) -> bool:
        return self.ni - self.last_update >= self.accumulate

    def gradient_parameters(self) -> list[nn.Parameter]:
        """The parameters whose gradient norm is taken, in the order its per-parameter norms are summed."""
        return list(self.model.parameters())

    def clip(self) -> torch.Tensor:
        return clip_gradients(self.gradient_parameters(), self.config.max_grad_norm)

    def gradient_norm(self) -> torch.Tensor:
        grads = [p.grad for p in self.gradient_parameters() if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))

    # ---- one batch
    def start_epoch(self, epoch: int) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr0 * self.lr_factor(epoch)
        self.model.train()

    def step(self, batch: dict[str, torch.Tensor]) -> dict:
        epoch, index = divmod(self.ni, self.config.batches_per_epoch)
        if index == 0:
            self.start_epoch(epoch)
        self.warmup(self.ni, epoch)
        loss, _ = self.loss_fn(self.forward(batch["img"]), batch)
        total = self.scale_loss(loss)
        total.backward()
        out = {"loss": loss.detach(), "loss_sum": total.detach(), "stepped": False}
        if self.should_update():
            out["grad_norm"] = self.clip()
            self.optimizer.step()
            self.optimizer.zero_grad()
            out["ema_decay"] = self.ema.update()
            out["stepped"] = True
            self.last_update = self.ni
        else:
            out["grad_norm"] = self.gradient_norm()
        self.ni += 1
        return out


def ramp(x: float, length: float, start: float, end: float) -> float:
    """The straight line from (0, start) to (length, end), at x (exactly `end` from x = length on)."""
    if x >= length:
        return float(end)
    return (end - start) / length * x + start
