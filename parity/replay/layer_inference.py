"""Which part of a plain `nn.Module` is which ultralytics layer, read off one traced forward (`parity.replay.tracing`).

A layer with parameters is the candidate module whose tensors match the reference layer's block by block, taken
in the order the candidate's modules first ran (not their registration order); where a module and its only
child both match, the shallower one (it starts first) is the layer. A layer without parameters (Upsample,
Concat) is the first event outside every matched module, after the previous layer, of a fitting operation and
output shape: an `nn.Upsample` module, an `F.interpolate`, a `torch.cat`, ...

What cannot be inferred is returned as a `Problem` that says what to add to the adapter (a `layer_map` entry).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from parity.replay.mapping import DEFAULT_ALLOWED_MISSING, _make_units, _ok, _solve_block, reference_shapes_from_manifest
from parity.replay.tracing import Event, Trace, tensors_in

_OPS_FOR = {
    "Upsample": {"interpolate", "upsample", "upsample_nearest2d", "upsample_bilinear2d", "repeat_interleave"},
    "Concat": {"cat", "concat", "concatenate"},
}
_MODULE_WORDS = {"Upsample": ("upsample", "interp", "resize"), "Concat": ("concat", "cat")}


@dataclass
class InferredLayer:
    index: int
    kind: str                    # "module" or "op"
    name: str                    # module path or op name
    seq: int                     # the event's position in the trace
    call: str = "single"         # "single" (one tensor), "list" (one list of tensors) or "positional"
    arity: int = 1
    site: str | None = None
    structure_differs: bool = False
    module_call: bool = False    # kind "op" standing for one call of a parameterless module

    def describe(self) -> str:
        if self.kind == "module" or self.module_call:
            return self.name
        return f"{self.name} at {self.site}" if self.site else self.name


@dataclass
class Problem:
    index: int
    message: str
    fix: str


@dataclass
class Inference:
    layers: dict[int, InferredLayer] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    @property
    def layer_map(self) -> dict[str, int]:
        return {f"{l.name}.": i for i, l in self.layers.items() if l.kind == "module"}


def call_style(event: Event) -> tuple[str, int]:
    args = event.args
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        return "list", len(args[0])
    if len(args) == 1:
        return "single", 1
    return "positional", len(args)


def _numel(shape) -> int:
    return math.prod(shape) if shape else 1


def infer_layers(module: nn.Module, trace: Trace, reference, *, given: dict[str, int] | None = None,
                 allowed_missing=DEFAULT_ALLOWED_MISSING) -> Inference:
    """Candidate layers for every reference layer (`given`: a user layer_map already fixing some)."""
    search = _LayerSearch(module, trace, reference, allowed_missing)
    search.apply_given(given or {})
    search.match_by_signature()
    search.match_between_neighbours()
    search.match_parameterless()
    return search.inference


class _LayerSearch:
    """The state of one inference: which candidate module or op each reference layer is, and which candidate
    modules and tensors are taken."""

    def __init__(self, module: nn.Module, trace: Trace, reference, allowed_missing):
        import re

        self.trace = trace
        self.allowed_res = [re.compile(p) for p in allowed_missing]
        self.table = reference.layers
        blocks: dict[int, list] = {}
        for key, shape in reference_shapes_from_manifest(reference.manifest).items():
            parts = key.split(".")
            if len(parts) > 2 and parts[1].isdigit():
                blocks.setdefault(int(parts[1]), []).append((key, shape))
        self.ref_units = {i: _make_units(items) for i, items in blocks.items()}
        self.cand_shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        self.keys_under: dict[str, list[str]] = {}
        for key in self.cand_shapes:
            parts = key.split(".")
            for depth in range(1, len(parts)):
                self.keys_under.setdefault(".".join(parts[:depth]), []).append(key)
        self.first: dict[str, Event] = {}
        for event in trace.events:
            if event.kind == "module" and event.name not in self.first:
                self.first[event.name] = event
        self.calls = sorted(self.first.values(), key=lambda e: e.seq)
        self.inference = Inference()
        self.assigned: dict[str, int] = {}
        self.taken: set[str] = set()

    def overlaps(self, path: str) -> bool:
        return any(path == p or path.startswith(p + ".") or p.startswith(path + ".") for p in self.assigned)

    def assign_module(self, index: int, event: Event, differs: bool = False) -> None:
        style, arity = call_style(event)
        self.inference.layers[index] = InferredLayer(index, "module", event.name, event.seq, style, arity,
                                                     structure_differs=differs)
        self.assigned[event.name] = index
        self.taken.update(self.keys_under.get(event.name, []))

    def apply_given(self, given: dict[str, int]) -> None:
        for prefix, index in given.items():
            event = self.first.get(prefix.rstrip("."))
            if event is not None:
                self.assign_module(index, event)

    def _allowed(self, key: str) -> bool:
        return any(p.search(key) for p in self.allowed_res)

    def fits(self, index: int, path: str) -> bool:
        """Whether the untaken tensors under `path` are layer `index`'s, by count and shapes."""
        keys = [k for k in self.keys_under.get(path, []) if k not in self.taken]
        if not keys:
            return False
        units = self.ref_units[index]
        ref_numel = sum(_numel(s) for u in units for _, s in u.tensors)
        allowed_numel = sum(_numel(s) for u in units for k, s in u.tensors if self._allowed(k))
        cand_numel = sum(_numel(self.cand_shapes[k]) for k in keys if self.cand_shapes[k])
        if not ref_numel - allowed_numel <= cand_numel <= ref_numel:
            return False
        res = _solve_block(units, _make_units([(k, self.cand_shapes[k]) for k in keys]))
        return _ok(res, lambda u: all(self._allowed(k) for k in u.keys))

    def match_by_signature(self) -> None:
        """Layers with parameters: block signatures in first-call order (modules after the previous match
        first, then any)."""
        last_end = -1
        for entry in self.table:
            index = entry["index"]
            if index in self.inference.layers or index not in self.ref_units:
                if index in self.inference.layers:
                    last_end = max(last_end, self.first[self.inference.layers[index].name].end)
                continue
            found = self._first_fitting(index, last_end)
            if found is not None:
                self.assign_module(index, found)
                last_end = max(last_end, found.end)

    def _first_fitting(self, index: int, last_end: int) -> Event | None:
        for ordered in (True, False):
            for event in self.calls:
                if ordered and event.seq < last_end:
                    continue
                if event.name in self.assigned or self.overlaps(event.name) or not self.keys_under.get(event.name):
                    continue
                if self.fits(index, event.name):
                    return event
        return None

    def match_between_neighbours(self) -> None:
        """Layers with parameters that match no module by shape: the one module that ran between their
        neighbours."""
        layers, first = self.inference.layers, self.first
        for entry in self.table:
            index = entry["index"]
            if index in layers or index not in self.ref_units:
                continue
            lo = max((first[l.name].end for i, l in layers.items() if i < index and l.kind == "module"), default=-1)
            hi = min((first[l.name].seq for i, l in layers.items() if i > index and l.kind == "module"),
                     default=math.inf)
            between = [e for e in self.calls if lo <= e.seq < hi and self.keys_under.get(e.name)
                       and not self.overlaps(e.name) and not any(k in self.taken for k in self.keys_under[e.name])]
            outermost = [e for e in between if not any(o is not e and e.name.startswith(o.name + ".")
                                                       for o in between)]
            if len(outermost) == 1:
                self.assign_module(index, outermost[0], differs=True)
            else:
                names = ", ".join(e.name for e in outermost[:4]) or "none"
                self.inference.problems.append(Problem(
                    index, f"layer {index} ({entry.get('type')}): no candidate module holds tensors of its shapes "
                           f"(modules that ran between its neighbours: {names})",
                    f"name its module in the adapter's layer_map, e.g. layer_map = {{'<module path>': {index}}}"))

    def match_parameterless(self) -> None:
        """Layers without parameters: modules or ops outside every matched layer, by order, operation and
        shape."""
        used: set[int] = set()
        for entry in self.table:
            index = entry["index"]
            if index in self.inference.layers or index in self.ref_units:
                continue
            shapes = [list(s) for s in (entry.get("outputs") or {}).values()]
            if len(shapes) != 1:
                continue
            prev = max((l.seq for i, l in self.inference.layers.items() if i < index), default=-1)
            event = _find_parameterless(self.trace, entry.get("type", ""), shapes[0], prev, self.assigned, used)
            if event is None:
                event = _find_parameterless(self.trace, entry.get("type", ""), shapes[0], -1, self.assigned, used)
            if event is None:
                self.inference.problems.append(Problem(
                    index, f"layer {index} ({entry.get('type')}, no parameters): no module or operation of the "
                           f"candidate's forward outside its other layers produces a {tuple(shapes[0])} tensor",
                    "give it a module of its own and name it in layer_map, or compute it in run_layer"))
                continue
            used.add(event.seq)
            self.inference.layers[index] = _parameterless_layer(index, event, entry)


def _parameterless_layer(index: int, event: Event, entry: dict) -> InferredLayer:
    if event.kind == "module":
        # a parameterless module may serve several layers (one `nn.Upsample` called twice): the layer is this
        # call, replayed like an op
        style, arity = call_style(event)
        return InferredLayer(index, "op", event.name, event.seq, style, arity, module_call=True)
    return InferredLayer(index, "op", event.name, event.seq, "list" if event.name in _OPS_FOR["Concat"] else "single",
                         len(entry.get("inputs") or []), site=event.site)


def _find_parameterless(trace: Trace, ref_type: str, shape: list[int], after: int, assigned: dict[str, int],
                        used: set[int]) -> Event | None:
    ops = _OPS_FOR.get(ref_type)
    words = _MODULE_WORDS.get(ref_type, ())
    for event in trace.events:
        if event.seq <= after or event.seq in used or event.output is None:
            continue
        if any(p == s or s.startswith(p + ".") for s in event.stack for p in assigned):
            continue
        outs = tensors_in(event.output)
        if len(outs) != 1 or list(outs[0].shape) != shape:
            continue
        if event.kind == "op":
            if ops is not None and event.name not in ops:
                continue
        else:
            if event.module_ref is None or any(True for _ in event.module_ref.parameters()):
                continue
            cls = type(event.module_ref).__name__.lower()
            if ops is not None and not any(w in cls for w in words):
                continue
        return event
    return None


def tensor_roots(trace: Trace, event: Event, layer_of_event: dict[int, int]) -> list[int]:
    """The layers (or -1 for the image) whose outputs reach `event` through ops that are no layer."""
    seen: set[int] = set()
    roots: list[int] = []

    def visit(tensor: torch.Tensor):
        if trace.image is not None and tensor is trace.image:
            if -1 not in roots:
                roots.append(-1)
            return
        layer = next((p for p in trace.producers(tensor) if p.seq in layer_of_event and p is not event), None)
        if layer is not None:
            if layer_of_event[layer.seq] not in roots:
                roots.append(layer_of_event[layer.seq])
            return
        producer = trace.produced_by(tensor)
        if producer is None or producer.seq in seen:
            return
        seen.add(producer.seq)
        for t in tensors_in((producer.args, producer.kwargs)):
            visit(t)

    for t in tensors_in((event.args, event.kwargs)):
        visit(t)
    return roots
