"""Known training errors planted into the built-in training step from outside: each variant is a subclass of
`parity.reimpl.train.Trainer` that does one thing the way a real port got it wrong.

`factory(variant)` gives a `--train` factory: `parity compare --what train --train tests.ports.train.planted:no_clip`.
"""

from __future__ import annotations

import torch

from parity.reimpl.train import Trainer, split_parameters
from parity.replay.train import builtin_factory


class NoWarmup(Trainer):
    """lr, momentum and accumulate start at their targets (a port that skipped the warmup block)."""

    def warmup(self, ni, epoch):
        return None


class BiasWarmupFromZero(Trainer):
    """Every group, biases included, warms up from lr 0 (warmup_bias_lr ignored)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bias_warmup_start = 0.0


class NoMomentumWarmup(Trainer):
    """lr warms up, momentum does not (it stays at 0.937 from the first step)."""

    def warmup(self, ni, epoch):
        super().warmup(ni, epoch)
        for group in self.optimizer.param_groups:
            if "momentum" in group:
                group["momentum"] = self.momentum


class NoAccumulation(Trainer):
    """The optimizer steps after every batch."""

    def should_update(self):
        return True


class DecayWithoutAccumulate(Trainer):
    """Weight decay scaled by batch / nbs, forgetting the accumulation factor."""

    def decay_scale(self, accumulate):
        return self.config.batch / self.config.nbs


class DecayedBatchNorm(Trainer):
    """BatchNorm weights in the decayed group (a port that splits on `ndim > 1` only by name 'bias')."""

    def parameter_groups(self):
        groups = split_parameters(self.model)
        groups["weight"] += groups["bn"]
        groups["bn"] = []
        return groups


class NoClip(Trainer):
    """No gradient clipping (the norm is still reported)."""

    def clip(self):
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


class EmaWithoutRamp(Trainer):
    """The EMA decays at 0.9999 from the first update."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ema.decay_at = lambda updates: self.ema.decay


class EmaParametersOnly(Trainer):
    """The EMA averages parameters only; BatchNorm buffers are copied from the model."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        buffers = {k for k, _ in self.model.named_buffers()}
        ema, model = self.ema, self.model
        original = ema.update

        def update():
            d = original()
            current = model.state_dict()
            for key in buffers & set(ema.state):
                ema.state[key].copy_(current[key])
            return d

        ema.update = update


class CosineSchedule(Trainer):
    """A cosine lr schedule where the run asked for ultralytics' linear one."""

    def lr_factor(self, epoch):
        import math

        c = self.config
        return (1 - math.cos(epoch * math.pi / c.epochs)) / 2 * (c.lrf - 1) + 1


class AutoPicksSGD(Trainer):
    """optimizer=auto taken as SGD at lr0 0.01 (the pre-8.1 ultralytics rule for short runs)."""

    def choose_optimizer(self, iterations):
        return "SGD", self.config.lr0, self.config.momentum


class SGDWithoutNesterov(Trainer):
    """Plain momentum SGD: ultralytics builds it with nesterov=True."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for group in self.optimizer.param_groups:
            group["nesterov"] = False


class LossTimesBatch(Trainer):
    """The loss multiplied by the batch size a second time (model.loss already returns it times the batch)."""

    def scale_loss(self, loss):
        return super().scale_loss(loss) * self.config.batch


class NoWorldSizeScale(Trainer):
    """Data parallel without multiplying the loss by the world size (DDP then averages it down)."""

    def scale_loss(self, loss):
        return loss.sum()


class ReferenceOrderNorm(Trainer):
    """Not an error: the built-in with its gradient norm summed in the reference's parameter order (which the
    harness knows from the weight mapping). Shows that this order is the only arithmetic that differs."""

    order: list = []

    def gradient_parameters(self):
        return self.order


def reference_order_norm(setup):
    from parity.replay.train import _reference_ordered_parameters

    candidate = builtin_factory(setup, trainer_class=ReferenceOrderNorm)
    candidate.trainer.order = _reference_ordered_parameters(candidate.model, setup.mapping)
    return candidate


def factory(variant: type[Trainer]):
    def build(setup):
        return builtin_factory(setup, trainer_class=variant)

    build.__name__ = variant.__name__
    return build


no_warmup = factory(NoWarmup)
bias_warmup_from_zero = factory(BiasWarmupFromZero)
no_momentum_warmup = factory(NoMomentumWarmup)
no_accumulation = factory(NoAccumulation)
decay_without_accumulate = factory(DecayWithoutAccumulate)
decayed_batchnorm = factory(DecayedBatchNorm)
no_clip = factory(NoClip)
ema_without_ramp = factory(EmaWithoutRamp)
ema_parameters_only = factory(EmaParametersOnly)
cosine_schedule = factory(CosineSchedule)
auto_picks_sgd = factory(AutoPicksSGD)
sgd_without_nesterov = factory(SGDWithoutNesterov)
loss_times_batch = factory(LossTimesBatch)
no_world_size_scale = factory(NoWorldSizeScale)
