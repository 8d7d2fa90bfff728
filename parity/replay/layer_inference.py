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
    import re

    allowed_res = [re.compile(p) for p in allowed_missing]
    table = reference.layers
    ref_shapes = reference_shapes_from_manifest(reference.manifest)
    blocks: dict[int, list] = {}
    for key, shape in ref_shapes.items():
        parts = key.split(".")
        if len(parts) > 2 and parts[1].isdigit():
            blocks.setdefault(int(parts[1]), []).append((key, shape))
    cand_shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    keys_under: dict[str, list[str]] = {}
    for key in cand_shapes:
        parts = key.split(".")
        for depth in range(1, len(parts)):
            keys_under.setdefault(".".join(parts[:depth]), []).append(key)

    first: dict[str, Event] = {}
    for event in trace.events:
        if event.kind == "module" and event.name not in first:
            first[event.name] = event
    calls = sorted(first.values(), key=lambda e: e.seq)
    inference = Inference()
    assigned: dict[str, int] = {}
    taken: set[str] = set()

    def overlaps(path: str) -> bool:
        return any(path == p or path.startswith(p + ".") or p.startswith(path + ".") for p in assigned)

    def module_layer(index: int, event: Event, differs: bool = False) -> InferredLayer:
        style, arity = call_style(event)
        return InferredLayer(index, "module", event.name, event.seq, style, arity, structure_differs=differs)

    if given:
        for prefix, index in given.items():
            path = prefix.rstrip(".")
            event = first.get(path)
            if event is not None:
                inference.layers[index] = module_layer(index, event)
                assigned[path] = index
                taken.update(keys_under.get(path, []))

    # ---- layers with parameters: block signatures in first-call order
    ref_units = {i: _make_units(items) for i, items in blocks.items()}

    def allowed_numel(units) -> int:
        return sum(_numel(s) for u in units for k, s in u.tensors if any(p.search(k) for p in allowed_res))

    def fits(index: int, path: str) -> bool:
        keys = [k for k in keys_under.get(path, []) if k not in taken]
        if not keys:
            return False
        units = ref_units[index]
        ref_numel = sum(_numel(s) for u in units for _, s in u.tensors)
        cand_numel = sum(_numel(cand_shapes[k]) for k in keys if cand_shapes[k])
        if not ref_numel - allowed_numel(units) <= cand_numel <= ref_numel:
            return False
        res = _solve_block(units, _make_units([(k, cand_shapes[k]) for k in keys]))
        return _ok(res, lambda u: all(any(p.search(k) for p in allowed_res) for k in u.keys))

    last_end = -1
    for entry in table:
        index = entry["index"]
        if index in inference.layers or index not in ref_units:
            if index in inference.layers:
                last_end = max(last_end, first[inference.layers[index].name].end)
            continue
        found = None
        for ordered in (True, False):
            for event in calls:
                if ordered and event.seq < last_end:
                    continue
                if event.name in assigned or overlaps(event.name) or not keys_under.get(event.name):
                    continue
                if fits(index, event.name):
                    found = event
                    break
            if found:
                break
        if found is not None:
            inference.layers[index] = module_layer(index, found)
            assigned[found.name] = index
            taken.update(keys_under.get(found.name, []))
            last_end = max(last_end, found.end)

    # ---- layers with parameters that match no module by shape: the one module that ran between their neighbours
    for entry in table:
        index = entry["index"]
        if index in inference.layers or index not in ref_units:
            continue
        before = [l for i, l in inference.layers.items() if i < index and l.kind == "module"]
        after = [l for i, l in inference.layers.items() if i > index and l.kind == "module"]
        lo = max((first[l.name].end for l in before), default=-1)
        hi = min((first[l.name].seq for l in after), default=math.inf)
        between = [e for e in calls if lo <= e.seq < hi and keys_under.get(e.name) and not overlaps(e.name)
                   and not any(k in taken for k in keys_under[e.name])]
        outermost = [e for e in between if not any(o is not e and e.name.startswith(o.name + ".") for o in between)]
        if len(outermost) == 1:
            inference.layers[index] = module_layer(index, outermost[0], differs=True)
            assigned[outermost[0].name] = index
            taken.update(keys_under.get(outermost[0].name, []))
        else:
            names = ", ".join(e.name for e in outermost[:4]) or "none"
            inference.problems.append(Problem(
                index, f"layer {index} ({entry.get('type')}): no candidate module holds tensors of its shapes "
                       f"(modules that ran between its neighbours: {names})",
                f"name its module in the adapter's layer_map, e.g. layer_map = {{'<module path>': {index}}}"))

    # ---- layers without parameters: modules or ops outside every matched layer, by order, operation and shape
    used: set[int] = set()
    for entry in table:
        index = entry["index"]
        if index in inference.layers or index in ref_units:
            continue
        shapes = [list(s) for s in (entry.get("outputs") or {}).values()]
        if len(shapes) != 1:
            continue
        prev = max((l.seq for i, l in inference.layers.items() if i < index), default=-1)
        event = _find_parameterless(trace, entry.get("type", ""), shapes[0], prev, assigned, used)
        if event is None:
            prev_events = -1
            event = _find_parameterless(trace, entry.get("type", ""), shapes[0], prev_events, assigned, used)
        if event is None:
            inference.problems.append(Problem(
                index, f"layer {index} ({entry.get('type')}, no parameters): no module or operation of the "
                       f"candidate's forward outside its other layers produces a {tuple(shapes[0])} tensor",
                "give it a module of its own and name it in layer_map, or compute it in run_layer"))
            continue
        used.add(event.seq)
        if event.kind == "module":
            # a parameterless module may serve several layers (one `nn.Upsample` called twice): the layer is
            # this call, replayed like an op
            style, arity = call_style(event)
            inference.layers[index] = InferredLayer(index, "op", event.name, event.seq, style, arity,
                                                    module_call=True)
        else:
            inference.layers[index] = InferredLayer(index, "op", event.name, event.seq, "list"
                                                    if event.name in _OPS_FOR["Concat"] else "single",
                                                    len(entry.get("inputs") or []), site=event.site)
    return inference


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
