"""Layer replay: run a candidate layer by layer against a reference dump and collect the evidence.

Two modes, both in train mode (the reference was captured in train mode, so BatchNorm uses batch statistics):

* isolated: every candidate layer is fed the reference's OWN inputs (the outputs of the layers in its `from`
  field, `batch.img` for layer 0, as listed in the manifest's `model.layers[i].inputs`). A layer that diverges
  here is wrong by itself, whatever happened upstream.
* chained: the candidate runs end to end on `batch.img` and every layer output is compared. The first divergent
  layer is where the candidate's own forward pass first leaves the reference's.

This module runs the candidate and the comparators and returns what it saw (`ModeRun`, `DrillDown`,
`DumpCandidateCheck`, `WiringEvidence`, ...); `parity.diagnose.layers` turns that evidence into findings and a
report. A drill-down into one layer compares its sub-blocks (`act.{N}.{path}`: for Detect every cv2/cv3 stage
per level and the DFL).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from parity.compare.foreign import Problem, check_candidate_dump, tensor_findings
from parity.compare.layer_file import WeightCheck, compare_weights
from parity.compare.metrics import compare_tensors
from parity.compare.tolerances import Profile
from parity.dump import names
from parity.dump.files import Dump
from parity.errors import ParityError
from parity.findings import Finding, Row
from parity.replay.candidates import Candidate

MODES = ("isolated", "chained")
Advance = Callable[[str], None]
LayerRows = dict[int, dict[str, Row]]  # per layer index, the row of each output compared ("error": it raised)


def layer_where(index: int) -> str:
    return f"layer {index}"


def layer_table(reference: Dump) -> list[dict]:
    """The manifest's model.layers table, checked for what a replay reads of it."""
    layers = reference.layers
    if not layers:
        raise ParityError(f"{reference.path}: the manifest has no model.layers table; a layer replay needs one "
                          f"(index, type, from, inputs, outputs per layer)")
    for entry in layers:
        for key in ("index", "inputs", "outputs"):
            if key not in entry:
                raise ParityError(f"{reference.path}: manifest model.layers entry {entry.get('index', '?')} lacks {key!r}")
    return layers


def outputs_of(reference: Dump, entry: dict, head: int | None) -> list[str]:
    """A layer's own outputs; the head's DFL stage counts as one of them."""
    out = list(entry["outputs"])
    if entry["index"] == head:
        dfl = names.act(head, "dfl")
        if dfl in reference and dfl not in out:
            out.append(dfl)
    return out


# ============================================================================================= evidence
@dataclass
class ReplayError:
    """The candidate raised while running a layer (or, with no layer, its whole forward)."""
    mode: str  # the row section it was running for: "isolated", "chained", "isolated/layer 23"
    layer: int | None
    name: str
    error_type: str
    site: str | None
    text: str

    @property
    def where(self) -> str:
        return layer_where(self.layer) if self.layer is not None else "forward"

    @property
    def message(self) -> str:
        return f"the candidate raised {self.error_type}" + (f" at {self.site}" if self.site else "") + f": {self.text}"

    def row(self) -> Row:
        return Row(self.mode, self.where, self.name, False, note=self.message)


def _replay_error(mode: str, layer: int | None, name: str, error: BaseException) -> ReplayError:
    from parity.replay.tracing import error_site

    text = str(error).splitlines()[0] if str(error) else ""
    return ReplayError(mode, layer, name, type(error).__name__, error_site(error), text)


@dataclass
class ModeRun:
    """One mode's walk over the layers: every row in the order compared, grouped per layer too."""
    mode: str
    rows: list[Row] = field(default_factory=list)
    layers: LayerRows = field(default_factory=dict)
    errors: list[ReplayError] = field(default_factory=list)
    foreign: list[Finding] = field(default_factory=list)  # a dump candidate's layout/dtype slips
    outputs: dict[str, torch.Tensor] | None = None  # chained, live: what the candidate's forward produced

    def fail(self, error: ReplayError) -> Row:
        self.errors.append(error)
        return self._add(error.row())

    def _add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def compare(self, index: int, name: str, ref: torch.Tensor, cand: torch.Tensor, profile: Profile,
                section: str | None = None) -> Row:
        return self._add(compare_row(section or self.mode, index, name, ref, cand, profile, self.mode))


def compare_row(section: str, index: int, name: str, ref: torch.Tensor, cand: torch.Tensor, profile: Profile,
                mode: str) -> Row:
    tol = profile.for_name(name, mode=mode)
    metrics = compare_tensors(ref, cand, tol)
    note = metrics.summary() if metrics.passed else (metrics.reason or metrics.summary())
    return Row(section, layer_where(index), name, metrics.passed, metrics=metrics.as_dict(), tolerance=tol.as_dict(),
               note=note)


# ============================================================================================== walks
def run_isolated(reference: Dump, candidate: Candidate, layers: list[dict], head, profile: Profile,
                 shapes: dict[str, list[int]], advance: Advance) -> ModeRun:
    """Each layer fed the reference's own inputs."""
    run = ModeRun("isolated")
    for entry in layers:
        index = entry["index"]
        advance(f"isolated {index}")
        if not candidate.has_layer(index):
            continue
        try:
            inputs = [reference.get(n) for n in entry["inputs"]]
        except ParityError as error:
            raise ParityError(f"layer {index}: cannot read its inputs from the reference: {error}") from None
        try:
            produced = candidate.run_layer(index, inputs, is_head=index == head)
        except Exception as error:  # noqa: BLE001 - a port may raise anything; it is reported, not fatal
            run.layers[index] = {"error": run.fail(_replay_error("isolated", index, names.act(index), error))}
            continue
        rows = {}
        for name in outputs_of(reference, entry, head):
            if name not in produced:
                continue
            cand = produced[name]
            shapes.setdefault(name, list(cand.shape))
            rows[name] = run.compare(index, name, reference.get(name), cand, profile)
        run.layers[index] = rows
        del produced, inputs
    return run


def run_chained(reference: Dump, candidate: Candidate, layers: list[dict], head, profile: Profile,
                shapes: dict[str, list[int]], advance: Advance) -> ModeRun:
    """The candidate's own forward pass (live) or the activations it wrote (a dump), layer by layer."""
    run = ModeRun("chained")
    if candidate.live:
        img = reference.get(names.batch_img())
        try:
            run.outputs = candidate.run_chained(img, None, head_index=head)
        except Exception as error:  # noqa: BLE001
            index = getattr(candidate, "failing_layer", lambda _e: None)(error)
            run.fail(_replay_error("chained", index, "forward" if index is None else names.act(index), error))
            return run
        get = run.outputs.get
    else:
        get = candidate.get
    for entry in layers:
        index = entry["index"]
        advance(f"chained {index}")
        rows = {}
        for name in outputs_of(reference, entry, head):
            cand = get(name)
            if cand is None:
                continue
            shapes[name] = list(cand.shape)
            ref = reference.get(name)
            rows[name] = run.compare(index, name, ref, cand, profile)
            if not candidate.live and not rows[name].passed:
                run.foreign += _foreign_slips(index, name, ref, cand, profile)
        if rows:
            run.layers[index] = rows
    return run


def _foreign_slips(index: int, name: str, ref: torch.Tensor, cand: torch.Tensor, profile: Profile) -> list[Finding]:
    """A foreign port's usual slips: NHWC instead of NCHW, float64 instead of float32."""
    transposed = sorted(cand.shape) == sorted(ref.shape) and cand.shape != ref.shape
    if not (transposed or cand.dtype != ref.dtype):
        return []
    return tensor_findings(name, layer_where(index), ref, cand, profile.for_name(name))


# ====================================================================================== dump candidate
@dataclass
class DumpCandidateCheck:
    """A candidate dump's container, its input image and its weights: the port must have run on the reference's."""
    problems: list[Problem]
    kind: str | None
    input_row: Row | None
    weights: WeightCheck | None  # None: the dump holds no model.* tensors


def check_dump_candidate(reference: Dump, candidate: Candidate, profile: Profile) -> DumpCandidateCheck:
    dump = candidate.dump
    problems = check_candidate_dump(dump.path, reference)
    img = dump.get_optional(names.batch_img())
    input_row = None
    if img is not None:
        input_row = compare_row("structure", 0, names.batch_img(), reference.get(names.batch_img()), img, profile,
                                "input")
        input_row.where = "input"
    weights = candidate.weight_tensors()
    check = None
    if weights is not None:
        check = compare_weights((name, reference.get(name), weights[name]) for name in reference.names("model.")
                                if name in weights)
    return DumpCandidateCheck(problems, dump.kind, input_row, check)


# ============================================================================================== probes
def rerun_isolated(reference: Dump, candidate: Candidate, entry: dict, *, is_head: bool = False
                   ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]] | None:
    """(the reference inputs, what the layer makes of them), or None when the candidate raises."""
    inputs = [reference.get(n) for n in entry["inputs"]]
    try:
        return inputs, candidate.run_layer(entry["index"], inputs, is_head=is_head)
    except Exception:  # noqa: BLE001 - a probe for a hint; the replay itself reports the error
        return None


def sub_block_names(reference: Dump, entry: dict) -> list[str]:
    """The layer's sub-block outputs the reference captured, in execution order (the head's DFL stays in)."""
    own = set(entry["outputs"])
    return [n for n in reference.names(names.act(entry["index"]) + ".") if n not in own]


def _sub_paths(index: int, sub: list[str]) -> list[str]:
    return [n[len(names.act(index)) + 1:] for n in sub]


def lookup_stage(produced: dict[str, torch.Tensor], name: str, ref_names: set[str]
                 ) -> tuple[torch.Tensor | None, str]:
    """The candidate's tensor for a reference sub-block name; a Sequential's output is its last stage's output."""
    if name in produced:
        return produced[name], ""
    children = [n for n in ref_names if n.startswith(name + ".") and n[len(name) + 1:].isdigit()]
    if children:
        last = max(children, key=lambda n: int(n.rsplit(".", 1)[1]))
        if last in produced:
            return produced[last], f"(= output of its last stage {last.rsplit('.', 1)[1]})"
    return None, ""


def first_divergent_sub_block(reference: Dump, candidate: Candidate, entry: dict, head, profile: Profile
                              ) -> tuple[str, int] | None:
    """(the first of the layer's sub-blocks that differs on the reference's inputs, how many were compared up to
    it), in execution order; None when none differs or the stages cannot be run."""
    index = entry["index"]
    sub = sub_block_names(reference, entry)
    if not sub:
        return None
    try:
        produced = candidate.layer_stages(index, [reference.get(n) for n in entry["inputs"]], is_head=index == head,
                                          reference_paths=_sub_paths(index, sub))
    except Exception:  # noqa: BLE001 - the drill-down reports it when asked
        return None
    ref_names = set(sub)
    compared = 0
    for name in sub:
        cand, _ = lookup_stage(produced, name, ref_names)
        if cand is None:
            continue
        compared += 1
        if not compare_tensors(reference.get(name), cand.cpu(), profile.for_name(name, mode="isolated")).passed:
            return name, compared
    return None


# ---------------------------------------------------------------------------------------------- wiring
@dataclass
class TracedInput:
    """What tracing saw feed input `k` (reference name `name`, made by layer `expected`)."""
    k: int
    name: str
    expected: int | None
    layers: list[int]  # as tracing gave them
    ops: list[str]

    @property
    def other_layers(self) -> bool:
        return bool(self.layers) and self.layers != [self.expected]


@dataclass
class WiringEvidence:
    """Which reference outputs the candidate feeds a layer: traced, else found by feeding earlier outputs."""
    traced: list[TracedInput] = field(default_factory=list)  # only inputs tracing found something odd about
    fed_from: list[tuple[int, int, int | None]] = field(default_factory=list)  # (input k, layer used, expected)
    swapped: bool = False  # two inputs, reproduced in the other order


def wiring_search(reference: Dump, candidate: Candidate, entry: dict, head, profile: Profile,
                  chained: dict[str, torch.Tensor] | None) -> WiringEvidence:
    """Traced input sources when the candidate has them; otherwise, per input, feed each same-shaped earlier
    reference output in isolation and keep the one that reproduces the candidate's own chained output."""
    traced = _traced_inputs(candidate, entry)
    if traced:
        return WiringEvidence(traced=traced)
    targets = [n for n in outputs_of(reference, entry, head) if n in (chained or {})]
    if not targets or not candidate.live:
        return WiringEvidence()
    return _search_feeds(reference, candidate, entry, head, profile, {n: chained[n] for n in targets})


def _traced_inputs(candidate: Candidate, entry: dict) -> list[TracedInput]:
    sources = getattr(candidate, "input_sources", None)
    found = (sources(entry["index"]) if callable(sources) else None) or []
    traced = [TracedInput(k, name, names.layer_of(name), seen.get("layers") or [], seen.get("ops") or [])
              for k, (name, seen) in enumerate(zip(entry["inputs"], found))]
    return [t for t in traced if t.other_layers or t.ops]


def _search_feeds(reference: Dump, candidate: Candidate, entry: dict, head, profile: Profile,
                  targets: dict[str, torch.Tensor]) -> WiringEvidence:
    index = entry["index"]
    inputs = list(entry["inputs"])
    base = [reference.get(n) for n in inputs]

    def reproduces(feed) -> bool:
        try:
            out = candidate.run_layer(index, feed, is_head=index == head)
        except Exception:  # noqa: BLE001
            return False
        return all(n in out and compare_tensors(t.cpu(), out[n].cpu(), profile.for_name(n, mode="chained")).passed
                   for n, t in targets.items())

    evidence = WiringEvidence()
    earlier = [e["index"] for e in reference.layers if e["index"] < index]
    for k, name in enumerate(inputs):
        expected = names.layer_of(name)
        shape = list(base[k].shape)
        for j in reversed(earlier):
            other = names.act(j)
            if j == expected or other not in reference or list(reference.index[other]["shape"]) != shape:
                continue
            feed = list(base)
            feed[k] = reference.get(other)
            if reproduces(feed):
                evidence.fed_from.append((k, j, expected))
                break
    evidence.swapped = len(inputs) > 1 and not evidence.fed_from and reproduces(list(reversed(base)))
    return evidence


# ========================================================================================== drill-down
@dataclass
class DrillDown:
    """One layer's sub-blocks compared in each mode (section `{mode}/layer {N}`)."""
    layer: int
    type: str | None
    sub: list[str]
    rows: list[Row] = field(default_factory=list)
    errors: list[ReplayError] = field(default_factory=list)
    left_out: set[str] = field(default_factory=set)
    first: dict[str, str] = field(default_factory=dict)  # mode -> the first sub-block that diverges
    not_checked: list[str] = field(default_factory=list)

    @property
    def compared(self) -> set[str]:
        return {r.name for r in self.rows}


def drill_down(reference: Dump, candidate: Candidate, entry: dict, head, profile: Profile,
               modes: tuple[str, ...]) -> DrillDown:
    index = entry["index"]
    drill = DrillDown(index, entry.get("type"), sub_block_names(reference, entry))
    if not drill.sub:
        return drill
    for mode in modes:
        get = _stage_source(reference, candidate, entry, head, mode, drill)
        if get is not None:
            _compare_stages(reference, drill, mode, get, profile)
    return drill


StageGetter = Callable[[str], "tuple[torch.Tensor | None, str]"]


def _stage_source(reference: Dump, candidate: Candidate, entry: dict, head, mode: str, drill: DrillDown
                  ) -> StageGetter | None:
    """Where mode `mode` reads the candidate's sub-block outputs from; None when it cannot (said in `drill`)."""
    index = entry["index"]
    if not candidate.live:
        return None if mode == "isolated" else (lambda n: (candidate.get(n), ""))
    inputs = _stage_inputs(reference, candidate, entry, head, mode)
    if inputs is None:
        drill.not_checked.append(
            f"layer {index} sub-blocks, chained: the candidate's chained run lacks this layer's inputs")
        return None
    try:
        produced = candidate.layer_stages(index, inputs, is_head=index == head,
                                          reference_paths=_sub_paths(index, drill.sub))
    except Exception as error:  # noqa: BLE001
        failure = _replay_error(f"{mode}/layer {index}", index, f"act.{index}.*", error)
        drill.errors.append(failure)
        drill.rows.append(failure.row())
        return None
    ref_names = set(drill.sub)
    return lambda n: lookup_stage(produced, n, ref_names)


def _stage_inputs(reference: Dump, candidate: Candidate, entry: dict, head, mode: str) -> list[torch.Tensor] | None:
    """The layer's inputs: the reference's (isolated) or the candidate's own forward's (chained)."""
    if mode == "isolated":
        return [reference.get(n) for n in entry["inputs"]]
    img = reference.get(names.batch_img())
    chained = candidate.run_chained(img, None, head_index=head)
    inputs = []
    for name in entry["inputs"]:
        if name == names.batch_img():
            inputs.append(img)
        elif name in chained:
            inputs.append(chained[name])
        else:
            return None
    return inputs


def _compare_stages(reference: Dump, drill: DrillDown, mode: str, get: StageGetter, profile: Profile) -> None:
    section = f"{mode}/layer {drill.layer}"
    for name in drill.sub:
        cand, alias = get(name)
        if cand is None:
            drill.left_out.add(name)
            continue
        row = compare_row(section, drill.layer, name, reference.get(name), cand, profile, mode)
        drill.rows.append(row)
        if alias:
            row.note = f"{alias} {row.note}"
        if not row.passed and mode not in drill.first:
            drill.first[mode] = name


__all__ = ["MODES", "DrillDown", "DumpCandidateCheck", "LayerRows", "ModeRun", "ReplayError", "TracedInput",
           "WiringEvidence", "check_dump_candidate", "compare_row", "drill_down", "first_divergent_sub_block",
           "layer_table", "layer_where", "lookup_stage", "outputs_of", "rerun_isolated", "run_chained", "run_isolated",
           "sub_block_names", "wiring_search"]
