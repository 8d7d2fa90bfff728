"""One traced forward of a candidate module: which modules ran, in what order, and the functional ops between them.

A port rarely keeps ultralytics' structure: its modules are registered in its own order, its neck upsamples with
`F.interpolate` and concatenates with `torch.cat` inside a parent's `forward`, its head may be called as
`self.head.forward(p3, p4, p5)` (which skips module hooks). So the harness does not rely on registration order or
hooks. It replaces every sub-module's `forward` on the instance (so direct `.forward()` calls are seen too) and
runs the forward under a `torch.overrides.TorchFunctionMode` that records every torch function call.

The result, a `Trace`, lists events (module calls and ops) in the order they started, each with the module path
stack it ran in, its arguments and its output, and knows which event produced each tensor. `replay` re-runs the
ops that lead from some tensors (the outputs of other layers) to one event's output, with those tensors replaced:
that is how a layer the candidate computes functionally is run on the reference's inputs.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

_TORCH_DIR = os.path.dirname(torch.__file__)
_PARITY_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the package, not this room
# Calls that only read metadata or copy; they are not a layer's computation.
_IGNORED_OPS = {"size", "dim", "numel", "__len__", "__get__", "__bool__", "__format__", "__repr__", "item",
                "tolist", "detach", "requires_grad_", "is_floating_point", "__index__", "__hash__", "contiguous",
                "__iter__", "_has_compatible_shallow_copy_type", "stride", "data_ptr", "type", "get_device"}


@dataclass
class Event:
    seq: int                      # start order over all events
    kind: str                     # "module" | "op"
    name: str                     # module path, or the op's name (`interpolate`, `cat`, `mul`)
    stack: tuple[str, ...]        # module paths running when it started (outermost first)
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    output: Any = None
    func: Callable | None = None  # the op (kind "op")
    site: str | None = None       # file:line in the candidate's own code (ops)
    direct: bool = False          # a module whose forward was called directly (no hooks run)
    end: int = -1                 # seq counter when it ended
    module_ref: nn.Module | None = None

    @property
    def inner(self) -> str | None:
        return self.stack[-1] if self.stack else None


def tensors_in(value: Any) -> list[torch.Tensor]:
    """Every tensor inside a value: a tensor, or mappings, lists and tuples of them, in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in tensors_in(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors_in(v)]
    return []


def user_site(frames=None) -> str | None:
    """file:line of the innermost frame in the candidate's own code (not torch, not this tool)."""
    if frames is None:
        frame = sys._getframe(2)
        while frame is not None:
            path = os.path.abspath(frame.f_code.co_filename)
            if not path.startswith(_TORCH_DIR) and not path.startswith(_PARITY_DIR) and "<" not in path[:1]:
                return f"{_short_path(path)}:{frame.f_lineno}"
            frame = frame.f_back
        return None
    for entry in reversed(frames):
        path = os.path.abspath(entry.filename)
        if not path.startswith(_TORCH_DIR) and not path.startswith(_PARITY_DIR) and "site-packages" not in path:
            return f"{_short_path(path)}:{entry.lineno}"
    return None


def error_site(error: BaseException) -> str | None:
    """Where in the candidate's own code an exception was raised (file:line), if it was."""
    return user_site(traceback.extract_tb(error.__traceback__))


def _short_path(path: str) -> str:
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return rel if not rel.startswith("..") else path


class Trace:
    def __init__(self):
        self.events: list[Event] = []
        # id(tensor) -> the events that returned it, innermost first (a module returns its last op's tensor)
        self.producer: dict[int, list[int]] = {}
        self.keep: list[Any] = []              # holds every recorded tensor so ids stay unique
        self.image: torch.Tensor | None = None
        self.result: Any = None

    def modules(self) -> list[Event]:
        return [e for e in self.events if e.kind == "module"]

    def first_call(self, path: str) -> Event | None:
        return next((e for e in self.events if e.kind == "module" and e.name == path), None)

    def produced_by(self, tensor: torch.Tensor) -> Event | None:
        """The innermost event that returned `tensor` (the op that made it)."""
        seqs = self.producer.get(id(tensor))
        return self.events[seqs[0]] if seqs else None

    def producers(self, tensor: torch.Tensor) -> list[Event]:
        return [self.events[s] for s in self.producer.get(id(tensor), [])]


class _Recorder(TorchFunctionMode):
    def __init__(self, trace: Trace, stack: list[str], skip: Callable[[tuple[str, ...]], bool] | None,
                 torch_paths: set[str]):
        super().__init__()
        self.trace, self.stack, self.skip, self.torch_paths = trace, stack, skip, torch_paths

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in _IGNORED_OPS:
            return func(*args, **kwargs)
        trace = self.trace
        seq = len(trace.events)
        stack = tuple(self.stack)
        out = func(*args, **kwargs)
        produced = tensors_in(out)
        if not produced:
            return out
        # ops inside torch's own modules (a Conv2d's conv2d) are that module's call, which is kept: counted only
        if (stack and stack[-1] in self.torch_paths) or (self.skip is not None and self.skip(stack)):
            trace.events.append(Event(seq, "op", name, stack, end=seq))
            return out
        site = user_site()
        event = Event(seq, "op", name, stack, args, kwargs, out, func, site=site, end=len(trace.events))
        trace.events.append(event)
        trace.keep.append((args, kwargs, out))
        for t in produced:
            trace.producer.setdefault(id(t), []).append(seq)
        return out


@contextmanager
def tracing(root: nn.Module, *, skip: Callable[[tuple[str, ...]], bool] | None = None):
    """Record module calls (every sub-module's forward wrapped on the instance) and torch ops while the body
    runs `root(...)`. `skip(stack)` says which ops need not be kept (inside modules already understood)."""
    trace = Trace()
    stack: list[str] = []
    calling: set[int] = set()       # modules entered through __call__ (so a direct .forward() is told apart)
    wrapped: list[tuple[nn.Module, bool, Any]] = []
    handles = []

    def pre_hook(module, _args):
        calling.add(id(module))

    def post_hook(module, _args, _out):
        calling.discard(id(module))

    seen: set[int] = set()
    torch_paths = {p for p, m in root.named_modules() if type(m).__module__.startswith("torch.")}
    for path, module in root.named_modules():
        if id(module) in seen or module is root:
            continue
        seen.add(id(module))
        wrapped.append((module, "forward" in module.__dict__, module.__dict__.get("forward")))
        module.forward = _recording_forward(trace, stack, calling, path, module)
        handles.append(module.register_forward_pre_hook(pre_hook))
        handles.append(module.register_forward_hook(post_hook, always_call=True))
    try:
        with _Recorder(trace, stack, skip, torch_paths):
            yield trace
    finally:
        for handle in handles:
            handle.remove()
        for module, had_own, own in wrapped:
            if had_own:
                module.forward = own
            else:
                del module.forward


def _recording_forward(trace: Trace, stack: list[str], calling: set[int], path: str, module: nn.Module):
    """`module.forward`, recording its call as a module event: inputs, output, and the module stack it ran in."""
    original = module.forward

    def forward(*args, **kwargs):
        seq = len(trace.events)
        event = Event(seq, "module", path, tuple(stack), args, kwargs, direct=id(module) not in calling,
                      module_ref=module)
        trace.events.append(event)
        stack.append(path)
        try:
            out = original(*args, **kwargs)
        except Exception as error:
            if not hasattr(error, "parity_module_stack"):
                error.parity_module_stack = tuple(stack)    # where it raised, for the report
            raise
        finally:
            stack.pop()
        event.output = out
        event.end = len(trace.events)
        trace.keep.append((args, kwargs, out))
        for t in tensors_in(out):
            trace.producer.setdefault(id(t), []).append(seq)
        return out

    return forward


def run_traced(root: nn.Module, img: torch.Tensor, *, skip=None) -> Trace:
    with tracing(root, skip=skip) as trace:
        trace.image = img
        trace.keep.append(img)
        trace.result = root(img)
        trace.keep.append(trace.result)
    return trace


# ----------------------------------------------------------------------------------------------- replay
def replay(trace: Trace, target: Event, substitute: Callable[[torch.Tensor, list[Event]], torch.Tensor | None],
           stop: Callable[[Event], bool]) -> Any:
    """Re-run `target` (an op or a parameterless module call) on replaced inputs.

    Each tensor argument is traced back through the events that produced it: `substitute(tensor, producers)`
    gives a replacement (the reference's output of the layer that produced it) or None; a producer for which
    `stop(event)` is true and that `substitute` does not replace keeps its recorded value; any other op is run
    again on its own replayed arguments."""
    cache: dict[int, Any] = {}

    def value(tensor: torch.Tensor) -> torch.Tensor:
        new = substitute(tensor, [p for p in trace.producers(tensor) if p is not target])
        if new is not None:
            return new
        producer = trace.produced_by(tensor)
        if producer is None or producer is target or stop(producer):
            return tensor
        out = run(producer)
        return _pick(producer.output, out, tensor)

    def rebuild(obj):
        if isinstance(obj, torch.Tensor):
            return value(obj)
        if isinstance(obj, (list, tuple)):
            items = [rebuild(v) for v in obj]
            return type(obj)(items) if not hasattr(obj, "_fields") else type(obj)(*items)
        if isinstance(obj, dict):
            return {k: rebuild(v) for k, v in obj.items()}
        return obj

    def run(event: Event):
        if event.seq in cache:
            return cache[event.seq]
        args, kwargs = rebuild(event.args), rebuild(event.kwargs)
        if event.kind == "op":
            out = event.func(*args, **kwargs)
        else:
            out = event.module_ref(*args, **kwargs)
        cache[event.seq] = out
        return out

    return run(target)


def _pick(recorded: Any, fresh: Any, tensor: torch.Tensor) -> torch.Tensor:
    """The item of a fresh output standing where `tensor` stood in the recorded output."""
    if recorded is tensor:
        return fresh
    for r, f in zip(tensors_in(recorded), tensors_in(fresh)):
        if r is tensor:
            return f
    return tensor
