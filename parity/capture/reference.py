"""Capture a reference dump from ultralytics: one train-mode forward, the loss on every case, gradients.

Everything is observed from outside: forward hooks on layers and sub-modules, and thin wrappers around the
loss's own methods that record what they return. Nothing ultralytics computes is changed or recomputed,
except two values that ultralytics keeps inline (the classification loss before its gain, and the DFL of the
head's boxes), which are derived with the same operations. `tests/test_capture.py` proves that loss and
gradients with capture on are bitwise equal to a plain run.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from parity.dump import names
from parity.capture import compat
from parity.capture.batch import Batch, calibration_images, load_batch
from parity.capture.train import ReferenceTraining, TrainArgs, check_train_config
from parity.errors import ParityError

INIT_MODES = ("perturbed", "pristine")
PRECISIONS = ("fp32", "tf32", "fp16", "bf16")
# BatchNorm perturbation ranges: wide enough that every layer carries signal far above float32 noise.
BN_WEIGHT_RANGE = (0.5, 1.5)
BN_BIAS_RANGE = (-0.5, 0.5)


@dataclass
class CaptureConfig:
    model: str = "yolo11n.yaml"
    nc: int = 80
    imgsz: int = 640
    batch: int = 2
    seed: int = 0
    device: str = "cpu"
    images: str = "assets"
    init: str = "perturbed"
    precision: str = "fp32"
    deterministic: bool = True
    cases: tuple[str, ...] = names.LOSS_CASES
    gradients: bool = True
    # Training steps after the single-step capture (docs/training.md); 0 leaves the dump as it always was.
    steps: int = 0
    train: TrainArgs = field(default_factory=TrainArgs)


@dataclass
class Capture:
    """What one capture produced: tensors in dump names, and the manifest sections that describe them.

    With a `sink` (a dump writer's `add`) every tensor goes there the moment it is captured and `tensors` stays
    empty, so a capture holds no more memory than ultralytics' own step; without one, `tensors` keeps them all.
    `shapes` names every tensor captured either way."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    sink: Callable[[str, torch.Tensor], None] | None = None
    shapes: dict[str, list[int]] = field(default_factory=dict)

    def __contains__(self, name: str) -> bool:
        return name in self.shapes

    def put(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.shapes:
            raise AssertionError(f"{name} captured twice")
        # The one copy capture makes: to the host (or the sink's file), detached from autograd and from later
        # in-place edits.
        tensor = tensor.detach()
        self.shapes[name] = list(tensor.shape)
        if self.sink is not None:
            self.sink(name, tensor)
        elif tensor.device.type == "cuda":
            # Into pinned memory without waiting: the stream orders it, and `finish()` synchronises once.
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.tensors[name] = host.copy_(tensor, non_blocking=True)
            self._pending_device = tensor.device
        else:
            # Contiguous in the same copy, so the writer never needs a second one.
            self.tensors[name] = tensor.clone(memory_format=torch.contiguous_format)

    def finish(self) -> "Capture":
        """Wait once for every host copy still in flight (CUDA); a no-op on CPU."""
        device = getattr(self, "_pending_device", None)
        if device is not None:
            torch.cuda.synchronize(device)
            self._pending_device = None
        return self

    def names_with_prefix(self, prefix: str) -> list[str]:
        return [name for name in self.shapes if name.startswith(prefix)]


# ---------------------------------------------------------------------------------------------- the model
_HEAD_LEGACY_DEFAULTS: dict[type, Any] | None = None
_MISSING = object()


def _reset_head_class_state() -> None:
    """`parse_model` sets `legacy` on the Detect classes themselves; restore them so builds do not leak."""
    global _HEAD_LEGACY_DEFAULTS
    from ultralytics.nn.modules import head

    classes = [c for c in vars(head).values() if isinstance(c, type) and issubclass(c, head.Detect)]
    if _HEAD_LEGACY_DEFAULTS is None:
        _HEAD_LEGACY_DEFAULTS = {c: c.__dict__.get("legacy", _MISSING) for c in classes}
    for cls, value in _HEAD_LEGACY_DEFAULTS.items():
        if value is _MISSING:
            if "legacy" in cls.__dict__:
                delattr(cls, "legacy")
        else:
            cls.legacy = value


def build_model(model_yaml: str, nc: int, seed: int) -> nn.Module:
    """ultralytics' DetectionModel from yaml; weights depend only on the seed."""
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils import DEFAULT_CFG

    if nc < 1:
        raise ParityError(f"--nc must be at least 1, got {nc}")
    from ultralytics.utils import LOGGER

    _reset_head_class_state()
    torch.manual_seed(seed)
    model_yaml = resolve_model_yaml(model_yaml)
    level = LOGGER.level
    LOGGER.setLevel("ERROR")  # a yaml outside ultralytics' names draws a harmless "no model scale" warning
    try:
        model = DetectionModel(model_yaml, nc=nc, verbose=False)
        # parse_model sets `legacy` on the head's class, and the reset below takes it back; pin it on the instance
        # so the head keeps saying what it was built as (YOLOv8's class branch is the legacy one).
        head = head_of(model)
        head.legacy = bool(getattr(head, "legacy", False))
    except FileNotFoundError as error:
        raise ParityError(
            f"unknown model yaml {model_yaml!r} ({error}); try e.g. yolo11n.yaml, yolov8n.yaml, yolo12n.yaml, yolo26n.yaml"
        ) from None
    finally:
        LOGGER.setLevel(level)
        _reset_head_class_state()
    model.args = get_cfg(DEFAULT_CFG)
    return model


def resolve_model_yaml(model_yaml: str) -> str:
    """A yaml path relative to the project root works from any directory; plain names go to ultralytics."""
    from pathlib import Path

    from parity.runtime import PROJECT_ROOT

    if "/" in model_yaml and not Path(model_yaml).exists() and (PROJECT_ROOT / model_yaml).exists():
        return str(PROJECT_ROOT / model_yaml)
    return model_yaml


def head_of(model: nn.Module) -> nn.Module:
    return model.model[-1]


def is_end2end(model: nn.Module) -> bool:
    return getattr(head_of(model), "one2one_cv2", None) is not None


def perturb_batchnorm(model: nn.Module, seed: int) -> dict:
    """Give every BatchNorm a seeded, non-trivial affine transform (see docs/dump-format.md, 'init')."""
    generator = torch.Generator().manual_seed(seed + 1)
    count = 0
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                low, high = BN_WEIGHT_RANGE
                module.weight.copy_(low + (high - low) * torch.rand(module.weight.shape, generator=generator))
                low, high = BN_BIAS_RANGE
                module.bias.copy_(low + (high - low) * torch.rand(module.bias.shape, generator=generator))
                count += 1
    return {"batchnorm_layers": count, "weight_uniform": list(BN_WEIGHT_RANGE), "bias_uniform": list(BN_BIAS_RANGE),
            "generator_seed": seed + 1}


def calibrate_batchnorm(model: nn.Module, images: torch.Tensor) -> dict:
    """Set running statistics to those of a separate seeded batch (one cumulative-average pass)."""
    batchnorms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [m.momentum for m in batchnorms]
    for m in batchnorms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        model(images)
    for m, momentum in zip(batchnorms, momenta):
        m.momentum = momentum
    return {"calibration_images": list(images.shape), "calibration_seed": "seed + 2000", "passes": 1}


def prepare_model(config: CaptureConfig, batch: Batch) -> tuple[nn.Module, dict]:
    model = build_model(config.model, config.nc, config.seed)
    _check_imgsz(model, config.imgsz)
    init = {"mode": config.init}
    pristine = detect_bias_init(model)
    if config.init == "perturbed":
        init["batchnorm"] = perturb_batchnorm(model, config.seed)
        init["running_stats"] = calibrate_batchnorm(
            model, calibration_images(imgsz=config.imgsz, batch=config.batch, seed=config.seed)
        )
    elif config.init != "pristine":
        raise ParityError(f"--init {config.init!r}: expected one of {', '.join(INIT_MODES)}")
    model = model.to(config.device).train()
    return model, {"init": init, "pristine_bias": pristine}


def _check_imgsz(model: nn.Module, imgsz: int) -> None:
    largest = int(head_of(model).stride.max())
    if imgsz <= 0 or imgsz % largest:
        raise ParityError(f"--imgsz {imgsz} must be a positive multiple of the largest stride ({largest})")


# -------------------------------------------------------------------------------------- Detect bias init
def bias_formula_float32(nc: int, stride: float) -> torch.Tensor:
    """Every step in float32, as numpy evaluates it (measured: one ULP off ultralytics at nc=3, 12, 17, …).

    numpy's float32 log is not correctly rounded. Other float32 arithmetics (glibc `logf`, torch's `log`) land
    one ULP off at other nc, or not at all: the comparison reports what it can tell apart.
    """
    import numpy as np

    f32 = np.float32
    value = np.log(f32(5.0) / f32(nc) / (f32(640.0) / f32(stride)) ** 2)
    return torch.tensor(float(value), dtype=torch.float32)


def bias_formula_float64(nc: int, stride: float) -> torch.Tensor:
    return torch.tensor(math.log(5.0 / nc / (640.0 / float(stride)) ** 2), dtype=torch.float64).float()


def detect_bias_init(model: nn.Module) -> dict[str, torch.Tensor]:
    """The head's biases as ultralytics stored them, and the formula in pure float32 and pure float64."""
    head = head_of(model)
    out = {}
    for level, stride in enumerate(head.stride.tolist()):
        cls_bias = head.cv3[level][-1].bias.detach().clone()
        out[names.init_bias("cls_bias", level, "stored")] = cls_bias
        out[names.init_bias("cls_bias", level, "float32")] = bias_formula_float32(head.nc, stride).expand(head.nc).clone()
        out[names.init_bias("cls_bias", level, "float64")] = bias_formula_float64(head.nc, stride).expand(head.nc).clone()
        out[names.init_bias("box_bias", level, "stored")] = head.cv2[level][-1].bias.detach().clone()
    return out


# ---------------------------------------------------------------------------------------------- layers
def _captured_submodules(layer: nn.Module, is_head: bool):
    """Every sub-module of the head; elsewhere the direct children (looking through ModuleLists).

    The conv and BatchNorm inside an ultralytics Conv block are never captured: the block's output already
    localises them, and they would triple the size of a dump.
    """

    def inside_conv_block(module: nn.Module) -> bool:
        return hasattr(module, "conv") and hasattr(module, "bn")

    def walk(module: nn.Module, prefix: str, deep: bool):
        if inside_conv_block(module):
            return
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if not isinstance(child, nn.ModuleList):
                yield path, child
            if deep or isinstance(child, nn.ModuleList):
                yield from walk(child, path + ".", deep)

    yield from walk(layer, "", is_head)


@contextmanager
def layer_hooks(model: nn.Module, capture: Capture):
    handles = []
    last = len(model.model) - 1
    # Conv's activation is one module shared by every Conv: its hook would fire everywhere, so skip shared ones.
    seen: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        seen[id(module)] = seen.get(id(module), 0) + 1

    def recorder(prefix: str):
        calls = [0]

        def hook(_module, _inputs, output):
            name_of_call = names.nth_call(prefix, calls[0])
            calls[0] += 1
            for name, tensor in names.flatten_output(name_of_call, output).items():
                capture.put(name, tensor)

        return hook

    for index, layer in enumerate(model.model):
        handles.append(layer.register_forward_hook(recorder(names.act(index))))
        for path, module in _captured_submodules(layer, index == last):
            if seen[id(module)] > 1:
                continue
            handles.append(module.register_forward_hook(recorder(names.act(index, path))))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def layer_table(model: nn.Module, capture: Capture) -> list[dict]:
    table = []
    outputs_of: dict[int, list[str]] = {}
    for index, layer in enumerate(model.model):
        sources = [layer.f] if isinstance(layer.f, int) else list(layer.f)
        sources = [index - 1 if s == -1 else s for s in sources]
        if index == 0:
            inputs = [names.batch_img()]
        else:
            inputs = [name for s in sources for name in outputs_of[s]]
        own = [n for n in capture.shapes if n == names.act(index) or _is_direct_output(n, index)]
        outputs_of[index] = own
        table.append({
            "index": index,
            "type": type(layer).__name__,
            "from": sources,
            "inputs": inputs,
            "parameters": sum(p.numel() for p in layer.parameters()),
            **parameter_kinds(layer),
            "outputs": {n: capture.shapes[n] for n in own},
        })
    return table


def parameter_kinds(layer: nn.Module) -> dict[str, int]:
    """What a layer holds, by kind (docs/dump-format.md, "What is counted"): `trainable` parameters, `frozen`
    parameters (requires_grad off: the DFL's fixed bins) and `buffers` (BatchNorm running statistics and
    `num_batches_tracked`). `parameters` stays trainable + frozen, as ultralytics counts them."""
    trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad)
    return {"trainable": trainable, "frozen": sum(p.numel() for p in layer.parameters()) - trainable,
            "buffers": sum(b.numel() for b in layer.buffers())}


def _is_direct_output(name: str, index: int) -> bool:
    """`act.23.boxes` and `act.4.0` are outputs of layer 23/4; `act.23.cv2.0.1` is a sub-module's."""
    parts = name.split(".")
    if parts[:2] != ["act", str(index)] or len(parts) < 3:
        return False
    tail = parts[2:]
    return tail[0].isdigit() and len(tail) == 1 or tail[-1] in names.HEAD_OUTPUTS and (
        len(tail) == 1 or tail[0] in names.E2E_BRANCHES and len(tail) == 2
    )


# ------------------------------------------------------------------------------------------------ loss
class LossRecorder:
    """Wraps one v8DetectionLoss instance's methods to record every stage, per case and branch."""

    def __init__(self, criterion, capture: Capture, branch: str | None):
        self.criterion = criterion
        self.capture = capture
        self.branch = branch
        self.case: str | None = None
        self._undo: list[Callable[[], None]] = []

    def put(self, stage: str, name: str, tensor: torch.Tensor) -> None:
        if self.case is not None:
            self.capture.put(names.loss(self.case, stage, name, self.branch), tensor)

    def _wrap(self, owner: Any, method: str, after: Callable[[tuple, Any], None]) -> None:
        original = getattr(owner, method)

        def wrapper(*args, **kwargs):
            result = original(*args, **kwargs)
            after(args, result)
            return result

        # An instance attribute shadows the class's method for this one object only.
        owner.__dict__[method] = wrapper
        self._undo.append(lambda: owner.__dict__.pop(method, None))

    def install(self) -> "LossRecorder":
        """Wrap what exists in this ultralytics release (parity.capture.compat knows 8.3.x and 8.4.x)."""
        compat.install_recorder(self)
        return self

    def remove(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()


def loss_recorders(model: nn.Module, capture: Capture) -> list[LossRecorder]:
    criterion = model.criterion
    if is_end2end(model):
        return [LossRecorder(criterion.one2many, capture, "one2many").install(),
                LossRecorder(criterion.one2one, capture, "one2one").install()]
    return [LossRecorder(criterion, capture, None).install()]


def head_outputs(preds: Any, end2end: bool) -> dict[str, torch.Tensor]:
    """The train outputs that gradients are taken with respect to, under their dump suffixes (8.4: `boxes`,
    `scores`; 8.3: one per level, `0`, `1`, `2`)."""
    return compat.head_outputs(preds, end2end)


# ---------------------------------------------------------------------------------------------- capture
@contextmanager
def precision_context(config: CaptureConfig):
    """TF32 flags, deterministic algorithms and autocast as the config asks; all restored afterwards."""
    from parity.runtime import restore_tf32, set_tf32

    saved_tf32 = set_tf32(config.precision == "tf32")
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if config.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    try:
        if config.precision in ("fp16", "bf16"):
            dtype = torch.float16 if config.precision == "fp16" else torch.bfloat16
            with torch.autocast(device_type=torch.device(config.device).type, dtype=dtype):
                yield
        else:
            yield
    finally:
        restore_tf32(saved_tf32)
        deterministic, warn_only, torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def check_capture_config(config: CaptureConfig) -> None:
    if config.precision not in PRECISIONS:
        raise ParityError(f"--precision {config.precision!r}: expected one of {', '.join(PRECISIONS)}")
    if config.batch < 1:
        raise ParityError(f"--batch must be at least 1, got {config.batch}")
    if config.nc < 1:
        raise ParityError(f"--nc must be at least 1, got {config.nc}")
    if config.precision in ("tf32", "fp16") and not config.device.startswith("cuda"):
        raise ParityError(f"--precision {config.precision} needs a CUDA device (--device cuda); on the CPU use fp32 "
                          f"or bf16")
    if config.init not in INIT_MODES:
        raise ParityError(f"--init {config.init!r}: expected one of {', '.join(INIT_MODES)}")
    check_train_config(config.steps, config.train, config.precision)


def run_capture(config: CaptureConfig, progress: Callable[[str], None] = lambda step: None, *,
                sink: Callable[[str, torch.Tensor], None] | None = None) -> Capture:
    """One capture of `config`. With `sink` every tensor goes there as it is captured (nothing is kept);
    without, the returned Capture holds them all."""
    check_capture_config(config)
    progress("building the model")
    batch = load_batch(config.images, imgsz=config.imgsz, batch=config.batch, nc=config.nc, seed=config.seed)
    model, init_info = prepare_model(config, batch)
    capture = Capture(sink=sink)
    _capture_inputs(model, batch, init_info, config.cases, capture)
    progress("forward pass")
    end2end = is_end2end(model)
    with precision_context(config):
        with layer_hooks(model, capture):
            preds = model(batch.img.to(config.device))
        head = head_of(model)
        if head.reg_max > 1:
            with torch.no_grad():
                capture.put(names.act(len(model.model) - 1, "dfl"), head.dfl(compat.head_boxes(preds, head, end2end)))
        default_loss = _capture_loss_cases(model, preds, batch, config, capture, progress)
        del preds
        params_without_grad = []
        if config.gradients and default_loss is not None:
            progress("backward pass")
            params_without_grad = _capture_parameter_grads(model, default_loss, capture)
        del default_loss
        capture.finish()
        capture.manifest = describe(model, config, batch, capture, init_info["init"], params_without_grad)
    if config.steps:
        capture.manifest["train"] = capture_training(config, batch, capture, progress)
        capture.finish()
    return capture


def _capture_inputs(model: nn.Module, batch: Batch, init_info: dict, cases, capture: Capture) -> None:
    """Weights before the forward pass, the head's bias initialisation, the batch and every case's targets."""
    for name, tensor in model.state_dict().items():
        capture.put(names.weight(name), tensor)
    for name, tensor in init_info["pristine_bias"].items():
        capture.put(name, tensor)
    capture.put(names.batch_img(), batch.img)
    for case in cases:
        for field_name in ("cls", "bboxes", "batch_idx"):
            capture.put(names.batch_target(case, field_name), getattr(batch.cases[case], field_name))


def _capture_loss_cases(model: nn.Module, preds: Any, batch: Batch, config: CaptureConfig, capture: Capture,
                        progress: Callable[[str], None]) -> torch.Tensor | None:
    """Every case's loss stages, outputs and head gradients; returns the `default` case's loss (its graph kept
    for the parameter gradients), or None without that case. Other cases' graphs are let go as soon as their
    gradients are taken."""
    device = torch.device(config.device)
    model.criterion = model.init_criterion()
    recorders = loss_recorders(model, capture)
    outputs = head_outputs(preds, is_end2end(model))
    default_loss = None
    try:
        for case in config.cases:
            progress(f"loss, case {case}")
            for recorder in recorders:
                compat.start_case(recorder, case)
            loss, items = model.loss(_to_device(batch.as_loss_batch(case), device), preds)
            for recorder in recorders:
                compat.finish_case(recorder, loss, items)
            capture.put(names.loss_output(case, "loss"), loss)
            capture.put(names.loss_output(case, "items"), compat.items_vector(items))
            if config.gradients:
                _capture_head_grads(case, compat.loss_terms(loss, recorders[0], model), outputs, capture)
            if case == "default":
                default_loss = loss
            del loss, items
    finally:
        for recorder in recorders:
            recorder.remove()
    return default_loss


def _capture_head_grads(case: str, terms: list[torch.Tensor], outputs: dict[str, torch.Tensor],
                        capture: Capture) -> None:
    for term_index, term in enumerate(names.LOSS_TERMS):
        grads = torch.autograd.grad(terms[term_index], list(outputs.values()), retain_graph=True, allow_unused=True)
        for suffix, grad, tensor in zip(outputs, grads, outputs.values()):
            capture.put(f"grad.head.{case}.{term}.{suffix}", grad if grad is not None else torch.zeros_like(tensor))


def _capture_parameter_grads(model: nn.Module, default_loss: torch.Tensor, capture: Capture) -> list[str]:
    """The trainer's backward of the default case; returns the parameters that got no gradient."""
    default_loss.sum().backward()
    without = []
    for name, parameter in model.named_parameters():
        if parameter.grad is None:
            without.append(name)
        else:
            capture.put(names.grad_param(name), parameter.grad)
    return without


def capture_training(config: CaptureConfig, batch: Batch, capture: Capture,
                     progress: Callable[[str], None] = lambda step: None) -> dict:
    """Train a fresh copy of the dump's model for `config.steps` steps; tensors into `capture`, the manifest's
    `train` section returned."""
    check_train_config(config.steps, config.train, config.precision)
    model, _ = prepare_model(config, batch)
    training = ReferenceTraining(model, config.train, config.batch, config.nc)
    for step, record in enumerate(training.run(batch.as_loss_batch("default"), config.steps, progress)):
        for quantity, tensor in record.items():
            capture.put(names.train(step, quantity), tensor)
    return {"steps": config.steps, "batch": "the dump's batch (batch.img, case default) at every step",
            **training.static, "records_only_when_stepped": ["grad_norm_clipped", "ema.*", "ema_decay", "optim.*"]}


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def _config_section(config: CaptureConfig) -> dict:
    section = {**asdict(config), "cases": list(config.cases)}
    if not config.steps:  # a dump without training steps keeps the manifest it always had
        del section["steps"], section["train"]
    return section


def describe(model, config: CaptureConfig, batch: Batch, capture: Capture, init: dict, no_grad: list[str]) -> dict:
    from parity.runtime import environment, versions

    head = head_of(model)
    end2end = is_end2end(model)
    criterion = model.criterion.one2many if end2end else model.criterion
    return {
        "versions": versions(),
        "environment": environment(config.device),
        "config": _config_section(config),
        "init": {**init, "cls_bias_formula": "log(5 / nc / (640 / stride) ** 2)",
                 "cls_bias_arithmetic": "ultralytics: division and square in float32 (stride is a float32 tensor "
                                        "element), log in float64, stored as float32"},
        "hyperparameters": compat.hyperparameters(model, criterion),
        "model": {
            "yaml": config.model,
            "scale": model.yaml.get("scale"),
            "nc": head.nc,
            "reg_max": head.reg_max,
            "strides": head.stride.tolist(),
            "head_index": len(model.model) - 1,
            "head_type": type(head).__name__,
            "end2end": end2end,
            "legacy_head": bool(getattr(head, "legacy", False)),
            "parameters": sum(p.numel() for p in model.parameters()),
            "layers": layer_table(model, capture),
        },
        "batch": {"source": batch.source, "shape": list(batch.img.shape), "notes": batch.notes},
        "loss": {
            "criterion": type(model.criterion).__name__,
            "branches": list(names.E2E_BRANCHES) if end2end else [],
            "branch_weights": {"one2many": model.criterion.o2m, "one2one": model.criterion.o2o} if end2end else None,
            "cases": [{"name": c, "boxes": batch.cases[c].count} for c in config.cases],
            "returns": compat.loss_output_note(len(capture.shapes[names.loss_output(config.cases[0], "loss")]))
            if config.cases else None,
            "loss_names": compat.loss_names(criterion),
        },
        "gradients": {"param": "d(model.loss(batch)[0].sum()) / d(parameter), default case",
                      "head": "d(model.loss(batch)[0][term]) / d(head train output)",
                      "parameters_without_grad": no_grad} if config.gradients else None,
    }
