"""Run a candidate's training loop on the reference dump's batch, step by step, and record what it did under
the reference's names (docs/training.md says what a candidate writes).

A training candidate is `package.module:factory`. The factory is called with a `TrainSetup` and returns an
object with

    model        the torch.nn.Module being trained (after `setup.load_reference_weights(model)`)
    optimizer    its torch.optim.Optimizer
    step(batch)  consume one batch; may return a dict with `loss` (the loss vector model.loss() returns),
                 `loss_sum` (the scalar backward() was called on), `grad_norm` (before clipping), `ema_decay`
    ema_state()  optional: the EMA's state_dict (candidate names)
    group_names  optional: a name per optimizer group (else the group's `param_group` key, else its index)

What the step returns is taken as the candidate's word; what the harness can see itself it observes: the
group hyperparameters and the clipped gradient norm from an optimizer step pre-hook, whether `optimizer.step`
ran, weights, EMA and optimizer state after the step. A candidate dump (`train.{step}.…` names and a manifest
`train` section) is read the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from parity.dump import names
from parity.capture.train import group_hyperparameters, grad_norm, optimizer_state
from parity.dump.files import MANIFEST, Dump
from parity.errors import ParityError


@dataclass
class TrainSetup:
    """What a training candidate's factory is told: the run to reproduce."""

    reference: Dump
    model: str
    nc: int
    batch: int                  # the whole batch (over every rank)
    steps: int
    args: dict                  # the trainer arguments as requested (optimizer 'auto' before its choice)
    batches_per_epoch: int
    world_size: int = 1
    rank: int = -1
    mapping: Any = None         # set by load_reference_weights
    _loaded: dict = field(default_factory=dict)

    def load_reference_weights(self, module: nn.Module, *, key_map=None, layer_map=None) -> None:
        """Map the reference's `model.*` weights onto `module` (parity.replay.mapping) and load them in place."""
        from parity.replay.candidates import ModuleCandidate

        candidate = ModuleCandidate(module, label="train candidate", key_map=key_map, layer_map=layer_map,
                                    device=next(module.parameters()).device)
        candidate.prepare(self.reference)
        self.mapping = candidate.mapping
        self._loaded = {k: v.detach().clone() for k, v in module.state_dict().items()}


def setup_from_dump(reference: Dump, *, world_size: int = 1, rank: int = -1) -> TrainSetup:
    train = reference.manifest.get("train")
    if not train:
        raise ParityError(f"{reference.path} holds no training steps: write it with `parity dump --steps N`")
    from parity.replay.candidates import _resolve_model

    return TrainSetup(reference=reference, model=_resolve_model(reference.config.get("model")),
                      nc=int(reference.model.get("nc") or reference.config.get("nc")),
                      batch=int(reference.config.get("batch")), steps=int(train["steps"]),
                      args=dict(train["args"]), batches_per_epoch=int(train["batches_per_epoch"]),
                      world_size=world_size, rank=rank)


def loss_batch_of(dump: Dump) -> dict[str, torch.Tensor]:
    return {"img": dump.get(names.batch_img()), "cls": dump.get(names.batch_target("default", "cls")),
            "bboxes": dump.get(names.batch_target("default", "bboxes")),
            "batch_idx": dump.get(names.batch_target("default", "batch_idx"))}


# ---------------------------------------------------------------------------------------- step records
class DumpSteps:
    """The steps of a dump: `static` (its manifest `train` section) and one lazy mapping per step."""

    def __init__(self, dump: Dump):
        self.dump = dump
        self.static = dump.manifest.get("train") or {}
        steps = {names.train_step_of(n) for n in dump.names("train.")} - {None}
        self.count = max(steps) + 1 if steps else 0

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Mapping[str, torch.Tensor]]:
        for step in range(self.count):
            yield _DumpStep(self.dump, step)


class _DumpStep(Mapping):
    def __init__(self, dump: Dump, step: int):
        self.dump, self.prefix = dump, names.train(step, "")
        self.keys_ = [n[len(self.prefix):] for n in dump.names(self.prefix)]

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.keys_:
            raise KeyError(key)
        return self.dump.get(self.prefix + key)

    def __iter__(self):
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)


@dataclass
class LiveSteps:
    """A candidate run in this process: `static` as a dump's manifest `train` section would hold it."""

    static: dict
    records: list[dict]

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        return iter(self.records)


# ---------------------------------------------------------------------------------------- live candidates
def _to_reference(mapping, tensors: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Candidate-named tensors under reference names, for the entries whose every part is present."""
    out = {}
    for ref_key, entry in mapping.ref_to_cand.items():
        parts = [tensors.get(k) for k in entry.cand_keys]
        if any(p is None for p in parts):
            continue
        out[prefix + ref_key] = parts[0] if len(parts) == 1 or parts[0].dim() == 0 else torch.cat(parts, 0)
    return out


def _group_names(candidate: Any, optimizer: torch.optim.Optimizer) -> list[str]:
    given = getattr(candidate, "group_names", None)
    if given:
        return list(given)
    return [g.get("param_group", f"group{i}") for i, g in enumerate(optimizer.param_groups)]


def describe_candidate(candidate: Any, setup: TrainSetup) -> dict:
    """The manifest-style `train` section of a live candidate: optimizer, settings, group membership."""
    from parity.capture.train import group_settings

    optimizer = candidate.optimizer
    ref_key = _candidate_param_keys(candidate.model, setup.mapping)
    groups = []
    for name, group in zip(_group_names(candidate, optimizer), optimizer.param_groups):
        groups.append({"name": name, "initial_lr": group.get("initial_lr", group["lr"]),
                       "settings": group_settings(group),
                       "params": [ref_key[id(p)] for p in group["params"] if id(p) in ref_key]})
    return {"optimizer": {"type": type(optimizer).__name__, "param_groups": groups}}


def _reference_ordered_parameters(model: nn.Module, mapping) -> list[nn.Parameter]:
    """The candidate's parameters in the reference's order: a norm over them then sums in the same order as
    the reference's own, whatever order the candidate registered its modules in."""
    key_of = _candidate_param_keys(model, mapping)
    order = {key: i for i, key in enumerate(mapping.ref_to_cand)}
    params = list(model.parameters())
    return sorted(params, key=lambda p: order.get(key_of.get(id(p)), len(order)))


def _candidate_param_keys(model: nn.Module, mapping) -> dict[int, str]:
    """id(parameter) -> the reference name of that parameter (one-to-one mapped parameters only)."""
    cand_to_ref = {}
    for ref_key, entry in mapping.ref_to_cand.items():
        if len(entry.cand_keys) == 1:
            cand_to_ref[entry.cand_keys[0]] = ref_key
    return {id(p): cand_to_ref[k] for k, p in model.named_parameters() if k in cand_to_ref}


def run_live(candidate: Any, setup: TrainSetup, loss_batch: dict[str, torch.Tensor],
             progress: Callable[[str], None] = lambda step: None, reference_steps=None) -> LiveSteps:
    """Drive `candidate.step` for `setup.steps` batches and record each step under reference names.

    With `reference_steps` (isolated mode) every step starts from the reference's state after the step before:
    weights, optimizer buffers and EMA are loaded into the candidate first, so a step is judged on its own
    arithmetic. Free-running (chained) steps let rounding differences grow: the assigner's top-k and IoU
    decisions are discontinuous, and a one-ULP change in a weight can move an anchor's assignment."""
    for attribute in ("model", "optimizer", "step"):
        if not hasattr(candidate, attribute):
            raise ParityError(f"training candidate: the factory's result has no {attribute!r} (it needs model, "
                              f"optimizer and step(batch); docs/training.md)")
    if setup.mapping is None:
        raise ParityError("training candidate: the factory never called setup.load_reference_weights(model), so "
                          "its model does not start from the reference's weights")
    optimizer = candidate.optimizer
    key_of = _candidate_param_keys(candidate.model, setup.mapping)
    seen: dict[str, Any] = {}

    in_reference_order = _reference_ordered_parameters(candidate.model, setup.mapping)

    def before_step(opt, *_):
        seen["hyper"] = group_hyperparameters(opt)
        seen["clipped"] = grad_norm(in_reference_order)

    handle = optimizer.register_step_pre_hook(before_step)
    static = describe_candidate(candidate, setup)
    records = []
    restore = _Restorer(candidate, setup, key_of) if reference_steps is not None else None
    previous = iter(reference_steps) if reference_steps is not None else None
    try:
        for step in range(setup.steps):
            progress(f"candidate step {step}")
            if restore is not None and step > 0:
                restore.load(next(previous))
            seen.clear()
            returned = candidate.step(loss_batch) or {}
            records.append(_record(candidate, setup, returned, seen, key_of))
    finally:
        handle.remove()
    return LiveSteps(static=static, records=records)


def _record(candidate, setup: TrainSetup, returned: dict, seen: dict, key_of: dict[int, str]) -> dict:
    stepped = "hyper" in seen
    record = dict(seen["hyper"]) if stepped else group_hyperparameters(candidate.optimizer)
    record["stepped"] = torch.tensor(stepped)
    for key in ("loss", "loss_sum", "grad_norm", "ema_decay"):
        if returned.get(key) is not None:
            value = returned[key]
            record[key] = value.detach().clone() if isinstance(value, torch.Tensor) else \
                torch.tensor(value, dtype=torch.float64)
    if stepped:
        record["grad_norm_clipped"] = seen["clipped"]
        record.update(optimizer_state(candidate.optimizer, key_of))
        ema = _ema_state(candidate)
        if ema is not None:
            record.update(_to_reference(setup.mapping, ema, "ema."))
    record.update(_to_reference(setup.mapping, candidate.model.state_dict(), "weights."))
    return {k: v.detach().clone() for k, v in record.items()}


def _to_candidate(mapping, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reference-named tensors under candidate names, for those present (the EMA holds no integer buffers)."""
    return mapping.reference_to_candidate({k: v for k, v in tensors.items() if k in mapping.ref_to_cand}) \
        if set(mapping.ref_to_cand) <= set(tensors) else _partial_to_candidate(mapping, tensors)


def _partial_to_candidate(mapping, tensors):
    out = {}
    for ref_key, entry in mapping.ref_to_cand.items():
        if ref_key not in tensors:
            continue
        t = tensors[ref_key]
        if len(entry.cand_keys) == 1 or t.dim() == 0:
            out.update({k: t for k in entry.cand_keys})
        else:
            out.update(zip(entry.cand_keys, t.split([mapping.cand_shapes[c][0] for c in entry.cand_keys], 0)))
    return out


class _Restorer:
    """Loads a reference step's state into the candidate (isolated mode). The optimizer and EMA state are only
    recorded on steps that stepped: the last recorded one holds until the next."""

    def __init__(self, candidate, setup: TrainSetup, key_of: dict[int, str]):
        self.candidate, self.mapping = candidate, setup.mapping
        self.param_of = {key: p for p in candidate.model.parameters() for key in [key_of.get(id(p))] if key}
        self.ema = _ema_state(candidate)

    @torch.no_grad()
    def load(self, record: Mapping[str, torch.Tensor]) -> None:
        own = self.candidate.model.state_dict(keep_vars=True)
        weights = {k[len("weights."):]: record[k] for k in record if k.startswith("weights.")}
        for cand_key, tensor in _to_candidate(self.mapping, weights).items():
            own[cand_key].copy_(tensor)
        state = self.candidate.optimizer.state
        for name in record:
            if name.startswith("optim."):
                key, buffer = name[len("optim."):].rsplit(".", 1)
                parameter = self.param_of.get(key)
                if parameter is not None and buffer in state.get(parameter, {}):
                    state[parameter][buffer].copy_(record[name])
        if self.ema is not None:
            ema = {k[len("ema."):]: record[k] for k in record if k.startswith("ema.")}
            if ema:
                for cand_key, tensor in _to_candidate(self.mapping, ema).items():
                    if cand_key in self.ema:
                        self.ema[cand_key].copy_(tensor)


def _ema_state(candidate) -> Mapping[str, torch.Tensor] | None:
    if callable(getattr(candidate, "ema_state", None)):
        return candidate.ema_state()
    ema = getattr(candidate, "ema", None)
    if isinstance(ema, nn.Module):
        return ema.state_dict()
    return None


# --------------------------------------------------------------------------------------------- the built-in
class BuiltinTrainCandidate:
    """The built-in detector, loss and training step (parity.reimpl) as a training candidate."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.model = trainer.model
        self.optimizer = trainer.optimizer
        self.group_names = [g["param_group"] for g in trainer.optimizer.param_groups]

    def step(self, batch):
        return self.trainer.step(batch)

    def ema_state(self):
        return self.trainer.ema.state


def builtin_factory(setup: TrainSetup, trainer_class=None):
    """The built-in's training candidate; `trainer_class` lets a test plant a variant (a Trainer subclass)."""
    from parity.replay.candidates import builtin_candidate
    from parity.reimpl.loss import build_loss
    from parity.reimpl.train import Trainer, TrainConfig

    model = builtin_candidate(setup.model, setup.nc).module
    setup.load_reference_weights(model)
    config = TrainConfig.from_args(setup.args, batch=setup.batch, nc=setup.nc,
                                   batches_per_epoch=setup.batches_per_epoch, world_size=setup.world_size)
    forward = None
    if setup.world_size > 1:  # data parallel: gradients averaged over the ranks on backward
        forward = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    trainer = (trainer_class or Trainer)(model, build_loss(setup.reference.manifest), config, forward=forward)
    return BuiltinTrainCandidate(trainer)


def resolve_train_candidate(spec: str | Callable) -> Callable:
    """`builtin`, `package.module:factory`, or a callable: the factory to call with a TrainSetup."""
    if callable(spec):
        return spec
    if spec == "builtin":
        return builtin_factory
    from parity.replay.candidates import import_factory

    factory, _ = import_factory(spec, what="training candidate", expected="'builtin' or 'package.module:factory'")
    return factory


def candidate_steps(spec: str | Callable, reference: Dump, *, world_size: int = 1, rank: int = -1,
                    steps: int | None = None, mode: str = "isolated",
                    progress: Callable[[str], None] = lambda step: None):
    """The candidate's steps: a dump directory read as is, or a factory run here on the reference's batch (for
    the reference's number of steps, or the first `steps`)."""
    if isinstance(spec, str) and (Path(spec) / MANIFEST).exists():
        return DumpSteps(Dump(spec))
    setup = setup_from_dump(reference, world_size=world_size, rank=rank)
    if steps is not None:
        if not 1 <= steps <= setup.steps:
            raise ParityError(f"--steps {steps}: the reference holds {setup.steps} training steps")
        setup.steps = steps
    factory = resolve_train_candidate(spec)
    try:
        candidate = factory(setup)
    except ParityError:
        raise
    except Exception as error:  # noqa: BLE001 - a user factory may raise anything
        raise ParityError(f"training candidate {spec}: the factory raised {type(error).__name__}: {error}") from None
    batch = loss_batch_of(reference)
    if rank != -1:
        from parity.capture.train import split_batch

        batch = split_batch(batch, rank, world_size)
    if mode not in ("isolated", "chained"):
        raise ParityError(f"--mode {mode!r}: a training comparison is isolated or chained")
    return run_live(candidate, setup, batch, progress,
                    reference_steps=DumpSteps(reference) if mode == "isolated" else None)


def write_train_dump(steps, out: str | Path, *, producer: str = "yolo-parity", force: bool = False) -> Path:
    """Write recorded steps as a candidate dump (`train.{step}.…` tensors, a manifest `train` section): the
    layout a port in another language writes (docs/porting-protocol.md, "Training steps")."""
    from parity.dump.files import DumpWriter

    writer = DumpWriter(out, force=force, kind="candidate")
    with writer:
        for step, record in enumerate(steps):
            for quantity, tensor in record.items():
                writer.add(names.train(step, quantity), tensor)
        return writer.commit({"producer": producer, "train": {"steps": len(steps), **steps.static}})
