"""Layer comparison: where, layer by layer, does a candidate's forward pass leave the reference's?

`compare_layers` checks the structure first (`parity.diagnose.structure`: parameter counts per layer, BatchNorm
settings, the candidate's own fresh Detect bias init; output shapes come from the replay itself), runs the layer
replay (`parity.replay.layers`: isolated and chained modes) and turns its evidence into findings: the first
divergent layer in each mode and why (made inside the layer, wired to other inputs, drift, a layer not
compared), and with `layer=N` the first divergent sub-block. The finding builders shared with the one-layer
check of a port (`parity.diagnose.layer_check`) live here too.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterable

import torch

from parity.compare.foreign import problem_findings
from parity.compare.layer_file import WeightCheck
from parity.compare.metrics import TensorMetrics
from parity.compare.tolerances import BITWISE, Profile, get_profile, profile_for_environment
from parity.diagnose import structure
from parity.dump import names
from parity.dump.files import Dump
from parity.errors import ParityError
from parity.findings import Finding, Report, Row
from parity.progress import steps
from parity.replay import layers as replay
from parity.replay.candidates import Candidate, load_candidate
from parity.replay.layers import MODES, LayerRows, layer_where

# A chained difference this many times its tolerance is no accumulated rounding
DRIFT_LIMIT = 100.0
DIVERGENCE_METRICS = ("max_abs", "max_rel", "cosine", "mismatched_fraction")


# ====================================================================================== shared builders
def layer_divergence(layer: int, message: str, evidence: dict) -> Finding:
    """The first layer that diverges (in a mode, or of a port's one-layer output)."""
    return Finding("layer-divergence", layer_where(layer), message, evidence=evidence)


def sub_block_divergence(layer: int, name: str, message: str, mode: str) -> Finding:
    """The first of a layer's sub-blocks (execution order) that diverges; `name` is its act.{layer}.{path}."""
    path = sub_block_path(layer, name)
    return Finding("sub-block-divergence", f"layer {layer}, {path}", message,
                   evidence={"layer": layer, "sub_block": path, "mode": mode})


def sub_block_path(layer: int, name: str) -> str:
    return name[len(names.act(layer)) + 1:]


def candidate_error(error: replay.ReplayError) -> Finding:
    what = f"layer {error.layer} could not run in {error.mode} mode" if error.layer is not None else \
        f"the candidate's forward could not run ({error.mode})"
    return Finding("candidate-error", error.where, f"{what}: {error.message}",
                   evidence={"layer": error.layer, "mode": error.mode, "error": error.error_type, "site": error.site})


def add_weight_check(report: Report, check: WeightCheck, *, where_of: Callable[[str], str], compared_to: str,
                     written_by: str, should_match: str) -> None:
    """Rows for the weights that differ, one summary row, and `weights-differ` when any does."""
    for name, metrics in check.mismatches:
        report.add(Row("weights", where_of(name), name, False, metrics=metrics.as_dict(), tolerance=BITWISE.as_dict(),
                       note=metrics.reason))
    bad = check.bad
    report.add(Row("weights", "model", "weights loaded", not bad,
                   note=f"{len(check.checked) - len(bad)} of {len(check.checked)} weight tensors bitwise equal to "
                        f"{compared_to}"))
    if bad:
        report.find(Finding("weights-differ", where_of(bad[0]),
                            f"{len(bad)} weight tensor(s) {written_by} differ from the {should_match} it should have "
                            f"loaded, first {bad[0]}", evidence={"tensors": bad[:50]}))


def not_checked(report: Report, what: str) -> None:
    report.coverage.setdefault("not_checked", []).append(what)


# ========================================================================================= entry point
def compare_layers(reference: Dump | str, candidate: Candidate | str | Any, *, profile: str | Profile | None = None,
                   layer: int | None = None, modes: Iterable[str] = MODES, progress: bool = True,
                   inject: str | None = None, map_file: str | None = None, device: str = "cpu") -> Report:
    """Compare a candidate with a reference dump, layer by layer. Returns a `parity.findings.Report`."""
    reference = _replayable(reference)
    modes = _checked_modes(modes)
    if not isinstance(candidate, Candidate):
        candidate = load_candidate(candidate, reference, inject=inject, map_file=map_file, device=device)
    profile = get_profile(profile or profile_for_environment(reference.manifest.get("environment"),
                                                            reference.config.get("precision")))
    layers = replay.layer_table(reference)
    head = reference.model.get("head_index")
    if layer is not None and not any(e["index"] == layer for e in layers):
        raise ParityError(f"layer {layer}: the reference has layers 0..{len(layers) - 1}")
    report = _new_report(reference, candidate, profile, layers, layer, modes)
    started = time.perf_counter()
    modes_run = _prepare(reference, candidate, profile, report, modes)
    runs = _walk(reference, candidate, layers, head, profile, report, modes_run, progress)
    results = {mode: run.layers for mode, run in runs.items()}
    chained = runs["chained"].outputs if "chained" in runs else None
    _diagnose(reference, candidate, layers, head, profile, report, results, chained)
    del runs, chained
    if layer is not None:
        _drill_down(reference, candidate, next(e for e in layers if e["index"] == layer), head, profile, report,
                    modes_run)
    _coverage(reference, report, layers, results, head)
    report.context["seconds"] = round(time.perf_counter() - started, 3)
    _order_rows(report)
    # the bias init is judged on its own: its findings come after the layers' (stable otherwise)
    report.findings.sort(key=lambda f: f.signature.startswith("bias-init"))
    report.context["verdicts"] = part_verdicts(report)
    return report


def _replayable(reference: Dump | str) -> Dump:
    if not isinstance(reference, Dump):
        reference = Dump(reference)
    if getattr(reference, "stats_only", False):
        raise ParityError(f"{reference.path} is a statistics-only dump: a layer replay needs the reference's tensor "
                          f"values (write the reference without --stats-only)")
    return reference


def _checked_modes(modes: Iterable[str]) -> tuple[str, ...]:
    modes = tuple(modes)
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ParityError(f"modes {modes!r}: choose from {', '.join(MODES)}")
    return modes


def _new_report(reference: Dump, candidate: Candidate, profile: Profile, layers: list[dict], layer: int | None,
                modes: tuple[str, ...]) -> Report:
    report = Report(command="compare --what layers" + (f" --layer {layer}" if layer is not None else ""),
                    reference=str(reference.path), candidate=candidate.label, profile=profile.name)
    report.context.update({
        "modes": list(modes),
        "profile": profile.as_dict(),
        "candidate": candidate.describe(),
        "reference_model": {k: reference.model.get(k) for k in ("yaml", "nc", "reg_max", "strides", "head_index",
                                                                 "head_type", "parameters")},
        "layers": [{"index": e["index"], "type": e.get("type"), "from": e.get("from")} for e in layers],
        "threads": {"replay": torch.get_num_threads(),
                    "reference": (reference.manifest.get("environment") or {}).get("threads")},
        "drill_down": layer,
    })
    return report


def _prepare(reference: Dump, candidate: Candidate, profile: Profile, report: Report,
             modes: tuple[str, ...]) -> tuple[str, ...]:
    """Candidate setup and structure checks; returns the modes the candidate can be judged in."""
    for finding in candidate.prepare(reference):
        report.find(finding)
    report.context["candidate"] = candidate.describe()     # what preparing it found out (layers, mapping)
    modes_run = modes
    if not candidate.live:
        _judge_dump_candidate(report, replay.check_dump_candidate(reference, candidate, profile))
        # A port that ran each layer on the reference's inputs wrote isolated.act.*: judged like a live replay.
        isolated_written = candidate.has_isolated_outputs()
        modes_run = tuple(m for m in modes if m == "chained" or isolated_written)
        if "isolated" in modes and not isolated_written:
            not_checked(report, "isolated mode: the candidate dump holds only its own end-to-end forward pass (write "
                                "isolated.act.* for layer-by-layer verdicts, docs/porting-protocol.md)")
    structure.check_param_counts(reference, candidate, report)
    structure.check_batchnorms(candidate, report)
    structure.diagnose_bias_init(reference, candidate, report)
    for mode, kind in (("isolated", "activation-isolated"), ("chained", "activation")):
        if mode in modes_run and not profile.discriminates(kind):
            not_checked(report, f"{mode} values under profile {profile.name}: its {kind} tolerance is at least the "
                                f"tensors' own scale, so {mode} rows only catch shapes and non-finite values "
                                f"(docs/tolerances.md)")
    return modes_run


def _judge_dump_candidate(report: Report, check: replay.DumpCandidateCheck) -> None:
    """Input image and weights of a candidate dump: the port must have run on the reference's input and weights."""
    # Names outside the protocol, NHWC layouts, float64 where float32 was expected: said once, up front.
    for finding in problem_findings(check.problems):
        report.find(finding)
    if check.kind != "candidate":
        report.context["candidate_manifest_kind"] = check.kind
    row = check.input_row
    if row is not None:
        report.add(row)
        if not row.passed:
            report.find(Finding("input-mismatch", "input",
                                "the candidate dump's batch.img is not the reference's: its activations come from "
                                "another input and cannot be compared meaningfully (load batch.img from the reference)",
                                evidence={"metrics": row.metrics}))
    if check.weights is None:
        not_checked(report, "weights (the candidate dump has no model.* tensors)")
        return
    add_weight_check(report, check.weights, where_of=lambda name: layer_where(names.layer_of(name) or 0),
                     compared_to="the reference's", written_by="in the candidate dump",
                     should_match="reference weights")


def _walk(reference: Dump, candidate: Candidate, layers: list[dict], head, profile: Profile, report: Report,
          modes_run: tuple[str, ...], progress: bool) -> dict[str, replay.ModeRun]:
    """The replay in each mode; its rows and errors go into the report, then the output shapes are judged."""
    shapes: dict[str, list[int]] = {}
    runs: dict[str, replay.ModeRun] = {}
    with steps(progress, len(layers) * len(modes_run), f"replaying {len(layers)} layers") as advance:
        if "isolated" in modes_run:
            runs["isolated"] = replay.run_isolated(reference, candidate, layers, head, profile, shapes, advance)
        if "chained" in modes_run:
            runs["chained"] = replay.run_chained(reference, candidate, layers, head, profile, shapes, advance)
    for run in runs.values():
        report.rows.extend(run.rows)
        for error in run.errors:
            report.find(candidate_error(error))
        for finding in run.foreign:
            report.find(finding)
    structure.check_output_shapes(reference, shapes, report, mode="chained" if "chained" in modes_run else "isolated")
    return runs


def part_verdicts(report: Report) -> dict[str, str]:
    """The layers and the Detect bias init judged apart: a port exact but for its bias init reads
    layers: parity, bias_init: divergence."""
    def is_bias(signature: str) -> bool:
        return signature.startswith("bias-init")

    bias_rows = [r for r in report.rows if r.section == structure.BIAS_SECTION]
    layer_rows = [r for r in report.rows if r.section != structure.BIAS_SECTION]
    layers_bad = any(not r.passed for r in layer_rows) or any(
        f.severity == "error" and not is_bias(f.signature) for f in report.findings)
    bias_bad = any(not r.passed for r in bias_rows) or any(
        f.severity == "error" and is_bias(f.signature) for f in report.findings)
    return {"layers": "divergence" if layers_bad else "parity",
            "bias_init": "divergence" if bias_bad else ("parity" if bias_rows else "not checked")}


# ============================================================================================ diagnosis
def _first_failing(results: LayerRows) -> int | None:
    for index in sorted(results):
        if any(not row.passed for row in results[index].values()):
            return index
    return None


def _worst_row(rows: dict[str, Row]) -> Row:
    failing = [r for r in rows.values() if not r.passed]
    return failing[0] if failing else next(iter(rows.values()))


class _Divergence:
    """What the diagnosis reads of the replay: the layers, their rows per mode, the first failing per mode."""

    def __init__(self, reference: Dump, candidate: Candidate, layers: list[dict], head, profile: Profile,
                 report: Report, results: dict[str, LayerRows], chained: dict[str, torch.Tensor] | None):
        self.reference, self.candidate, self.head, self.profile, self.report = reference, candidate, head, profile, report
        self.by_index = {e["index"]: e for e in layers}
        self.results = results
        self.chained = chained
        self.first = {mode: _first_failing(rows) for mode, rows in results.items()}

    def describe(self, mode: str, index: int) -> tuple[str, dict]:
        entry = self.by_index[index]
        row = _worst_row(self.results[mode][index])
        ev = {"layer": index, "type": entry.get("type"), "mode": mode, "tensor": row.name}
        m = row.metrics or {}
        if m.get("max_abs") is not None and m.get("ref_shape") == m.get("cand_shape"):
            ev.update({k: m.get(k) for k in ("max_abs", "max_rel", "mismatched_fraction", "cosine", "min_atol")})
        return row.note, ev


def _diagnose(reference: Dump, candidate: Candidate, layers: list[dict], head, profile: Profile, report: Report,
              results: dict[str, LayerRows], chained: dict[str, torch.Tensor] | None) -> None:
    seen = _Divergence(reference, candidate, layers, head, profile, report, results, chained)
    report.context["first_divergent_layer"] = dict(seen.first)
    if seen.first.get("isolated") is not None:
        _diagnose_isolated(seen, seen.first["isolated"])
    if seen.first.get("chained") is not None:
        _diagnose_chained(seen, seen.first["chained"], seen.first.get("isolated"))


def _diagnose_isolated(seen: _Divergence, iso: int) -> None:
    entry = seen.by_index[iso]
    detail, ev = seen.describe("isolated", iso)
    hints = _isolated_hints(seen, entry, ev)
    message = (f"first divergent layer: {iso} ({entry.get('type')}), fed the reference's own inputs "
               f"(isolated), so the difference is made inside this layer: {ev.get('tensor')}: {detail}")
    if hints:
        message += ". " + ". ".join(hints)
    seen.report.find(layer_divergence(iso, message, ev))


def _isolated_hints(seen: _Divergence, entry: dict, ev: dict) -> list[str]:
    """What else is known about the layer that diverges by itself (`ev` gains the sub-block)."""
    report, candidate, iso = seen.report, seen.candidate, entry["index"]
    hints = []
    if entry.get("type") == "Upsample" and candidate.live:
        finding = _upsample_check(seen, entry)
        if finding:
            report.find(finding)
            hints.append(finding.message)
    if any(f.signature == "param-count-mismatch" and f.evidence.get("layer") == iso for f in report.findings):
        hints.append("this layer's parameter count differs from ultralytics'")
    bn_bad = {f.evidence.get("layer"): f for f in report.findings if f.signature == "bn-eps"}
    if iso in bn_bad:
        hints.append(bn_bad[iso].message)
    sources = getattr(candidate, "input_sources", None)
    for k, found in enumerate((sources(iso) if callable(sources) else None) or []):
        if found.get("ops") and index_is_functional(candidate, iso):
            hints.append(f"the candidate computes it from its input {k} ({entry['inputs'][k]}) through "
                         + ", ".join(found["ops"][:3]))
    if candidate.live and "error" not in seen.results["isolated"][iso]:
        hint = _affine(seen, entry)
        if hint:
            hints.append(hint)
        inside = _first_sub_block(seen, entry)
        if inside:
            hints.append(inside)
            ev["sub_block"] = inside.split(" is ", 1)[-1].split(" ", 1)[0]
    return hints


def index_is_functional(candidate: Candidate, index: int) -> bool:
    return index in (getattr(candidate, "functional", None) or {})


def _upsample_check(seen: _Divergence, entry: dict) -> Finding | None:
    ran = replay.rerun_isolated(seen.reference, seen.candidate, entry)
    name = names.act(entry["index"])
    if ran is None or name not in ran[1]:
        return None
    inputs, produced = ran
    return structure.diagnose_upsample(entry["index"], inputs, produced[name].cpu(), seen.reference.get(name),
                                       seen.profile.for_name(name, mode="isolated"))


def _affine(seen: _Divergence, entry: dict) -> str:
    name = names.act(entry["index"])
    if name not in seen.reference or entry["index"] == seen.head:
        return ""
    ran = replay.rerun_isolated(seen.reference, seen.candidate, entry)
    if ran is None or name not in ran[1]:
        return ""
    return structure.affine_hint(seen.reference.get(name), ran[1][name].cpu())


def _first_sub_block(seen: _Divergence, entry: dict) -> str:
    """The first of the layer's sub-blocks (execution order) that differs on the reference's inputs, in words."""
    found = replay.first_divergent_sub_block(seen.reference, seen.candidate, entry, seen.head, seen.profile)
    if found is None:
        return ""
    name, compared = found
    index = entry["index"]
    before = "" if compared > 1 else " (the first one)"
    return (f"inside it, the first sub-block that differs is {sub_block_path(index, name)}{before} "
            f"(--layer {index} shows them all)")


# ---------------------------------------------------------------------------------------------- chained
def _input_layers(entry: dict) -> list[int]:
    return [names.layer_of(n) for n in entry.get("inputs") or [] if names.layer_of(n) is not None]


def _passed_in(results: LayerRows, name: str) -> bool:
    if name == names.batch_img():
        return True
    row = results.get(names.layer_of(name), {}).get(name)
    return row is not None and row.passed


def _unchecked_upstream(by_index: dict, iso_results: LayerRows | None, index: int) -> list[int]:
    """Layers feeding `index` (transitively, stopping at compared ones) that isolated mode could not compare."""
    if iso_results is None:
        return []
    found: set[int] = set()
    todo = _input_layers(by_index[index])
    while todo:
        j = todo.pop()
        if j in found or j not in by_index:
            continue
        if j in iso_results and "error" not in iso_results[j]:
            continue
        found.add(j)
        todo.extend(_input_layers(by_index[j]))
    return sorted(found)


def _span(layers: list[int]) -> str:
    if len(layers) == 1:
        return f"layer {layers[0]}"
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"layers {layers[0]}\u2013{layers[-1]}"
    return "layers " + ", ".join(map(str, layers))


class _ChainedFacts:
    """The first layer that diverges end to end, and what the isolated run and its inputs say about it."""

    def __init__(self, seen: _Divergence, ch: int):
        self.entry = entry = seen.by_index[ch]
        self.detail, self.ev = seen.describe("chained", ch)
        chained = seen.results["chained"]
        self.iso_results = iso_results = seen.results.get("isolated")
        iso_rows = (iso_results or {}).get(ch)
        self.iso_passed = iso_rows is not None and all(r.passed for r in iso_rows.values())
        self.inputs_ok = all(_passed_in(chained, name) for name in entry["inputs"])
        self.unchecked = _unchecked_upstream(seen.by_index, iso_results, ch)
        metrics = _worst_row(chained[ch]).metrics or {}
        self.ratio = None
        if isinstance(metrics.get("max_abs"), (int, float)) and metrics.get("effective_atol"):
            self.ratio = metrics["max_abs"] / metrics["effective_atol"]
        self.jump = self._jump(seen, metrics)
        self.ev.update({"not_compared": self.unchecked, "tolerance_ratio": self.ratio})

    def _jump(self, seen: _Divergence, metrics: dict) -> str:
        chained = seen.results["chained"]
        feeding = set(_input_layers(self.entry)) | {j for u in self.unchecked for j in _input_layers(seen.by_index[u])}
        upstream = [_worst_row(chained[j]).metrics or {} for j in sorted(feeding) if j in chained]
        before = max((m.get("max_abs") or 0.0 for m in upstream if isinstance(m.get("max_abs"), (int, float))),
                     default=None)
        return (f"the difference jumps from {before:.2g} to {metrics['max_abs']:.2g}"
                if before is not None and isinstance(metrics.get("max_abs"), (int, float)) else "")

    @property
    def far_beyond_rounding(self) -> bool:
        # A wrong input is a difference of the tensors' own size, not a rounding the layer amplified: below
        # DRIFT_LIMIT tolerances the inputs' own small differences explain it.
        return self.ratio is None or self.ratio >= DRIFT_LIMIT

    @property
    def within_drift(self) -> bool:
        """Small enough for rounding accumulated over the layers (or not measurable)."""
        return self.ratio is None or self.ratio < DRIFT_LIMIT


def _diagnose_chained(seen: _Divergence, ch: int, iso: int | None) -> None:
    facts = _ChainedFacts(seen, ch)
    entry, ev, detail, report = facts.entry, facts.ev, facts.detail, seen.report
    kind = f"{ch} ({entry.get('type')})"
    if facts.iso_passed and facts.inputs_ok and ch != 0 and facts.far_beyond_rounding:
        _wiring_finding(seen, facts, ch)
    elif facts.unchecked and facts.iso_passed:
        one = len(facts.unchecked) == 1
        report.find(layer_divergence(ch, (
            f"first divergent layer end to end: {kind} matches in isolation, so the difference "
            f"is made in {_span(facts.unchecked)}, which {'was' if one else 'were'} not compared (the "
            f"candidate exposes no module or operation for {'it' if one else 'them'}; "
            f"docs/model-adapter.md)" + (f"; {facts.jump}" if facts.jump else "") + f". {detail}"), ev))
    elif iso is None and facts.iso_results is not None and facts.iso_passed and facts.within_drift \
            and all(i in facts.iso_results for i in seen.by_index if i <= ch):
        report.find(Finding(
            "chained-drift", layer_where(ch),
            f"every layer matches in isolation, but the end-to-end run leaves the tolerance at layer {kind}: "
            f"small differences accumulate beyond the '{report.profile}' profile "
            f"(different arithmetic order, threads or precision?). {detail}", evidence=ev))
    elif iso is None or facts.iso_results is None:
        extra = ""
        if facts.iso_passed and facts.ratio is not None and facts.ratio >= DRIFT_LIMIT:
            extra = (f"; it matches in isolation, but the end-to-end difference is {facts.ratio:.3g}x its tolerance, "
                     f"far beyond accumulated rounding" + (f" ({facts.jump})" if facts.jump else "")
                     + ": the candidate's forward computes something its layers alone do not")
        report.find(layer_divergence(ch, f"first divergent layer end to end (chained): {kind}: {ev.get('tensor')}: "
                                         f"{detail}" + extra, ev))
    else:
        report.context.setdefault("notes", []).append(
            f"chained mode first diverges at layer {ch}; isolated mode at layer {iso}")


def _wiring_finding(seen: _Divergence, facts: _ChainedFacts, ch: int) -> None:
    entry = facts.entry
    evidence = replay.wiring_search(seen.reference, seen.candidate, entry, seen.head, seen.profile, seen.chained)
    wiring = _wiring_words(seen, entry, evidence)
    seen.report.find(Finding(
        "layer-wiring", layer_where(ch),
        f"layer {ch} ({entry.get('type')}) diverges end to end although it matches when fed the reference's "
        f"inputs and its inputs ({', '.join(entry['inputs'])}) match in the chained run: the candidate feeds "
        f"this layer something else" + (f": {wiring} (check its `from` wiring)" if wiring else
                                        " (check its `from` wiring / which outputs it concatenates)")
        + f". {facts.detail}", evidence={**facts.ev, "from": entry.get("from"), "wiring": wiring}))


def _wiring_words(seen: _Divergence, entry: dict, evidence: replay.WiringEvidence) -> str:
    """Which reference outputs the candidate feeds this layer, in words."""
    strides = seen.reference.model.get("strides") or []

    def which(k: int) -> str:
        if entry["index"] == seen.head and k < len(strides):
            return f"the head's P{int(round(math.log2(strides[k])))} input"
        return f"its input {k}"

    words = []
    for traced in evidence.traced:
        if traced.other_layers:
            got = " + ".join(f"layer {j}'s" for j in traced.layers)
            words.append(f"{which(traced.k)} is {got} output, ultralytics uses layer {traced.expected}'s")
        if traced.ops:
            words.append(f"its input {traced.k} ({traced.name}) passes through "
                         + ", ".join(traced.ops[:3]) + " outside any layer")
    for k, used, expected in evidence.fed_from:
        words.append(f"{which(k)} is layer {used}'s output, ultralytics uses layer {expected}'s")
    if evidence.swapped:
        words.append("it takes its inputs in the other order")
    return "; ".join(words)


# ========================================================================================== drill-down
def _drill_down(reference: Dump, candidate: Candidate, entry: dict, head, profile: Profile, report: Report,
                modes: tuple[str, ...]) -> None:
    drill = replay.drill_down(reference, candidate, entry, head, profile, modes)
    index = drill.layer
    report.context["drill_down"] = {"layer": index, "type": drill.type, "sub_blocks": len(drill.sub)}
    if not drill.sub:
        not_checked(report, f"layer {index} sub-blocks: the reference captured none for this layer")
        return
    report.rows.extend(drill.rows)
    for error in drill.errors:
        report.find(candidate_error(error))
    for note in drill.not_checked:
        not_checked(report, note)
    compared = drill.compared
    report.coverage["sub_blocks"] = {"layer": index, "reference": len(drill.sub), "compared": len(compared),
                                     "left_out": sorted(n for n in drill.left_out if n not in compared)}
    for mode, name in drill.first.items():
        report.find(sub_block_divergence(index, name, (
            f"inside layer {index} ({drill.type}), the first sub-block that diverges in {mode} mode is "
            f"{sub_block_path(index, name)} ({name}); sub-blocks are listed in execution order, so the difference "
            f"starts there"), mode))


# ============================================================================================ coverage
def _coverage(reference: Dump, report: Report, layers: list[dict], results: dict, head) -> None:
    wanted = [n for e in layers for n in replay.outputs_of(reference, e, head)]
    for mode, per_layer in results.items():
        got = {name for rows in per_layer.values() for name in rows if name != "error"}
        missing = [n for n in wanted if n not in got]
        report.coverage[mode] = {"reference_tensors": len(wanted), "compared": len(got), "left_out": missing}
    if not results:
        report.coverage["compared"] = 0


def _order_rows(report: Report) -> None:
    """Structure first, then isolated, chained and drill-down rows; stable within a section."""
    order = {"structure": 0, "weights": 1, "isolated": 2, "chained": 3, structure.BIAS_SECTION: 6}

    def key(row: Row) -> int:
        return order.get(row.section, 4 if row.section.startswith("isolated/") else 5)

    report.rows.sort(key=key)


def divergence_metrics(metrics: TensorMetrics | dict | None) -> dict:
    """The numbers a divergence finding carries as evidence."""
    values = metrics.as_dict() if isinstance(metrics, TensorMetrics) else (metrics or {})
    return {k: values.get(k) for k in DIVERGENCE_METRICS}


__all__ = ["DRIFT_LIMIT", "MODES", "add_weight_check", "candidate_error", "compare_layers", "divergence_metrics",
           "index_is_functional", "layer_divergence", "part_verdicts", "sub_block_divergence", "sub_block_path"]
