"""Layer replay: where, layer by layer, does a candidate's forward pass leave the reference's?

Two modes, both in train mode (the reference was captured in train mode, so BatchNorm uses batch statistics):

* isolated: every candidate layer is fed the reference's OWN inputs (the outputs of the layers in its `from`
  field, `batch.img` for layer 0, as listed in the manifest's `model.layers[i].inputs`). A layer that diverges
  here is wrong by itself, whatever happened upstream.
* chained: the candidate runs end to end on `batch.img` and every layer output is compared. The first divergent
  layer is where the candidate's own forward pass first leaves the reference's.

Structure checks run first (`parity.diagnose.structure`): parameter counts per layer, BatchNorm settings, the
candidate's own fresh Detect bias init; output shapes come from the replay itself. `layer=N` zooms into one
layer and compares its sub-blocks (`act.{N}.{path}`: for Detect every cv2/cv3 stage per level and the DFL).
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterable

import torch

from parity.dump import names
from parity.replay.candidates import Candidate, load_candidate
from parity.compare.metrics import compare_tensors
from parity.compare.tolerances import Profile, get_profile, profile_for_environment
from parity.diagnose import structure
from parity.dump.files import Dump
from parity.errors import ParityError
from parity.findings import Finding, Report, Row

MODES = ("isolated", "chained")


@contextmanager
def _progress(enabled: bool, total: int, title: str):
    """A rich progress bar on stderr, only on a terminal and only when asked for."""
    if not enabled or not sys.stderr.isatty():
        yield lambda *_: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[step]}"), TimeElapsedColumn(), transient=True) as bar:
        task = bar.add_task(title, total=total, step="")

        def advance(step: str = "") -> None:
            bar.update(task, advance=1, step=step)

        yield advance


def _layer_table(reference: Dump) -> list[dict]:
    layers = reference.layers
    if not layers:
        raise ParityError(f"{reference.path}: the manifest has no model.layers table; a layer replay needs one "
                          f"(index, type, from, inputs, outputs per layer)")
    for entry in layers:
        for key in ("index", "inputs", "outputs"):
            if key not in entry:
                raise ParityError(f"{reference.path}: manifest model.layers entry {entry.get('index', '?')} lacks {key!r}")
    return layers


def _outputs_of(reference: Dump, entry: dict, head: int | None) -> list[str]:
    out = list(entry["outputs"])
    if entry["index"] == head:
        dfl = names.act(head, "dfl")
        if dfl in reference and dfl not in out:
            out.append(dfl)
    return out


def compare_layers(reference: Dump | str, candidate: Candidate | str | Any, *, profile: str | Profile | None = None,
                   layer: int | None = None, modes: Iterable[str] = MODES, progress: bool = True,
                   inject: str | None = None, map_file: str | None = None, device: str = "cpu") -> Report:
    """Compare a candidate with a reference dump, layer by layer. Returns a `parity.findings.Report`."""
    if not isinstance(reference, Dump):
        reference = Dump(reference)
    if getattr(reference, "stats_only", False):
        raise ParityError(f"{reference.path} is a statistics-only dump: a layer replay needs the reference's tensor "
                          f"values (write the reference without --stats-only)")
    modes = tuple(modes)
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ParityError(f"modes {modes!r}: choose from {', '.join(MODES)}")
    if not isinstance(candidate, Candidate):
        candidate = load_candidate(candidate, reference, inject=inject, map_file=map_file, device=device)
    profile = get_profile(profile or profile_for_environment(reference.manifest.get("environment"),
                                                            reference.config.get("precision")))
    layers = _layer_table(reference)
    head = reference.model.get("head_index")
    if layer is not None and not any(e["index"] == layer for e in layers):
        raise ParityError(f"--layer {layer}: the reference has layers 0..{len(layers) - 1}")

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
    started = time.perf_counter()

    # ---- candidate setup and structure
    for finding in candidate.prepare(reference):
        report.find(finding)
    report.context["candidate"] = candidate.describe()     # what preparing it found out (layers, mapping)
    if not candidate.live:
        _check_dump_candidate(reference, candidate, report, profile)
        # A port that ran each layer on the reference's inputs wrote isolated.act.*: judged like a live replay.
        isolated_written = candidate.has_isolated_outputs()
        modes_run = tuple(m for m in modes if m == "chained" or isolated_written)
        if "isolated" in modes and not isolated_written:
            report.coverage.setdefault("not_checked", []).append(
                "isolated mode: the candidate dump holds only its own end-to-end forward pass (write "
                "isolated.act.* for layer-by-layer verdicts, docs/porting-protocol.md)")
    else:
        modes_run = modes
    structure.check_param_counts(reference, candidate, report)
    structure.check_batchnorms(candidate, report)
    structure.diagnose_bias_init(reference, candidate, report)

    for mode, kind in (("isolated", "activation-isolated"), ("chained", "activation")):
        if mode in modes_run and not profile.discriminates(kind):
            report.coverage.setdefault("not_checked", []).append(
                f"{mode} values under profile {profile.name}: its {kind} tolerance is at least the tensors' own "
                f"scale, so {mode} rows only catch shapes and non-finite values (docs/tolerances.md)")
    # ---- numbers
    total = len(layers) * len(modes_run)
    shapes: dict[str, list[int]] = {}
    results: dict[str, dict[int, dict[str, Row]]] = {}
    with _progress(progress, total, f"replaying {len(layers)} layers") as advance:
        if "isolated" in modes_run:
            results["isolated"] = _isolated(reference, candidate, layers, head, profile, report, shapes, advance)
        if "chained" in modes_run:
            results["chained"] = _chained(reference, candidate, layers, head, profile, report, shapes, advance)
    structure.check_output_shapes(reference, shapes, report, mode="chained" if "chained" in modes_run else "isolated")
    _diagnose(reference, candidate, layers, head, profile, report, results)
    if layer is not None:
        _drill_down(reference, candidate, layers, head, layer, profile, report, modes_run)
    _coverage(reference, report, layers, results, head)
    report.context["seconds"] = round(time.perf_counter() - started, 3)
    report.context.pop("_chained_outputs", None)
    _order_rows(report)
    # the bias init is judged on its own: its findings come after the layers' (stable otherwise)
    report.findings.sort(key=lambda f: f.signature.startswith("bias-init"))
    report.context["verdicts"] = part_verdicts(report)
    return report


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


# ------------------------------------------------------------------------------------------- helpers
def _compare_into(report: Report, section: str, index: int, name: str, ref: torch.Tensor, cand: torch.Tensor,
                  profile: Profile, mode: str) -> Row:
    tol = profile.for_name(name, mode=mode)
    metrics = compare_tensors(ref, cand, tol)
    note = metrics.summary() if metrics.passed else (metrics.reason or metrics.summary())
    return report.add(Row(section, structure.layer_where(index), name, metrics.passed, metrics=metrics.as_dict(),
                          tolerance=tol.as_dict(), note=note))


def _error_row(report: Report, section: str, index: int | None, name: str, error: BaseException) -> Row:
    from parity.replay.tracing import error_site

    site = error_site(error)
    text = str(error).splitlines()[0] if str(error) else ""
    message = f"the candidate raised {type(error).__name__}" + (f" at {site}" if site else "") + f": {text}"
    where = structure.layer_where(index) if index is not None else "forward"
    row = report.add(Row(section, where, name, False, note=message))
    what = f"layer {index} could not run in {section} mode" if index is not None else \
        f"the candidate's forward could not run ({section})"
    report.find(Finding("candidate-error", where, f"{what}: {message}",
                        evidence={"layer": index, "mode": section, "error": type(error).__name__, "site": site}))
    return row


def _isolated(reference: Dump, candidate: Candidate, layers: list[dict], head, profile: Profile, report: Report,
              shapes: dict, advance) -> dict[int, dict[str, Row]]:
    out: dict[int, dict[str, Row]] = {}
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
            out[index] = {"error": _error_row(report, "isolated", index, names.act(index), error)}
            continue
        rows = {}
        for name in _outputs_of(reference, entry, head):
            if name not in produced:
                continue
            cand = produced[name]
            shapes.setdefault(name, list(cand.shape))
            rows[name] = _compare_into(report, "isolated", index, name, reference.get(name), cand, profile, "isolated")
        out[index] = rows
        del produced, inputs
    return out


def _chained(reference: Dump, candidate: Candidate, layers: list[dict], head, profile: Profile, report: Report,
             shapes: dict, advance) -> dict[int, dict[str, Row]]:
    out: dict[int, dict[str, Row]] = {}
    if candidate.live:
        img = reference.get(names.batch_img())
        try:
            produced = candidate.run_chained(img, None, head_index=head)
        except Exception as error:  # noqa: BLE001
            index = getattr(candidate, "failing_layer", lambda _e: None)(error)
            _error_row(report, "chained", index, "forward" if index is None else names.act(index), error)
            return out
        report.context["_chained_outputs"] = produced
        get = produced.get
    else:
        produced = None
        get = candidate.get
    for entry in layers:
        index = entry["index"]
        advance(f"chained {index}")
        rows = {}
        for name in _outputs_of(reference, entry, head):
            cand = get(name)
            if cand is None:
                continue
            shapes[name] = list(cand.shape)
            ref = reference.get(name)
            rows[name] = _compare_into(report, "chained", index, name, ref, cand, profile, "chained")
            transposed = sorted(cand.shape) == sorted(ref.shape) and cand.shape != ref.shape
            if not candidate.live and not rows[name].passed and (transposed or cand.dtype != ref.dtype):
                # A foreign port's usual slips: NHWC instead of NCHW, float64 instead of float32.
                from parity.compare.foreign import tensor_findings

                for finding in tensor_findings(name, structure.layer_where(index), ref, cand, profile.for_name(name)):
                    report.find(finding)
        if rows:
            out[index] = rows
    return out


def _check_dump_candidate(reference: Dump, candidate, report: Report, profile: Profile) -> None:
    """Input image and weights of a candidate dump: the port must have run on the reference's input and weights."""
    from parity.compare.foreign import check_candidate_dump, problem_findings

    dump = candidate.dump
    # Names outside the protocol, NHWC layouts, float64 where float32 was expected: said once, up front.
    for finding in problem_findings(check_candidate_dump(dump.path, reference)):
        report.find(finding)
    if dump.kind != "candidate":
        report.context["candidate_manifest_kind"] = dump.kind
    img = dump.get_optional(names.batch_img())
    if img is not None:
        row = _compare_into(report, "structure", 0, names.batch_img(), reference.get(names.batch_img()), img,
                            profile, "input")
        row.where = "input"
        if not row.passed:
            report.find(Finding("input-mismatch", "input",
                                "the candidate dump's batch.img is not the reference's: its activations come from "
                                "another input and cannot be compared meaningfully (load batch.img from the reference)",
                                evidence={"metrics": row.metrics}))
    weights = candidate.weight_tensors()
    if weights is None:
        report.coverage.setdefault("not_checked", []).append("weights (the candidate dump has no model.* tensors)")
        return
    bad, checked = [], 0
    from parity.compare.tolerances import BITWISE

    for name in reference.names("model."):
        if name not in weights:
            continue
        cand = weights[name]
        checked += 1
        metrics = compare_tensors(reference.get(name), cand, BITWISE)
        if not metrics.passed:
            bad.append(name)
            report.add(Row("weights", structure.layer_where(names.layer_of(name) or 0), name, False,
                           metrics=metrics.as_dict(), tolerance=BITWISE.as_dict(), note=metrics.reason))
    report.add(Row("weights", "model", "weights loaded", not bad,
                   note=f"{checked - len(bad)} of {checked} weight tensors bitwise equal to the reference's"))
    if bad:
        report.find(Finding("weights-differ", structure.layer_where(names.layer_of(bad[0]) or 0),
                            f"{len(bad)} weight tensor(s) in the candidate dump differ from the reference weights it "
                            f"should have loaded, first {bad[0]}",
                            evidence={"tensors": bad[:50]}))


# ----------------------------------------------------------------------------------------- diagnosis
def _first_failing(results: dict[int, dict[str, Row]]) -> int | None:
    for index in sorted(results):
        if any(not row.passed for row in results[index].values()):
            return index
    return None


def _worst_row(rows: dict[str, Row]) -> Row:
    failing = [r for r in rows.values() if not r.passed]
    return failing[0] if failing else next(iter(rows.values()))


def _diagnose(reference: Dump, candidate: Candidate, layers: list[dict], head, profile: Profile, report: Report,
              results: dict[str, dict[int, dict[str, Row]]]) -> None:
    by_index = {e["index"]: e for e in layers}
    first = {mode: _first_failing(rows) for mode, rows in results.items()}
    report.context["first_divergent_layer"] = {m: i for m, i in first.items()}
    iso, ch = first.get("isolated"), first.get("chained")
    param_bad = {f.evidence.get("layer") for f in report.findings if f.signature == "param-count-mismatch"}
    bn_bad = {f.evidence.get("layer"): f for f in report.findings if f.signature == "bn-eps"}

    def describe(mode: str, index: int) -> tuple[str, dict]:
        entry = by_index[index]
        row = _worst_row(results[mode][index])
        ev = {"layer": index, "type": entry.get("type"), "mode": mode, "tensor": row.name}
        detail = row.note
        m = row.metrics or {}
        if m.get("max_abs") is not None and m.get("ref_shape") == m.get("cand_shape"):
            ev.update({k: m.get(k) for k in ("max_abs", "max_rel", "mismatched_fraction", "cosine", "min_atol")})
        return detail, ev

    if iso is not None:
        entry = by_index[iso]
        detail, ev = describe("isolated", iso)
        hints = []
        if entry.get("type") == "Upsample" and candidate.live:
            finding = _upsample_check(reference, candidate, entry, head, profile)
            if finding:
                report.find(finding)
                hints.append(finding.message)
        if iso in param_bad:
            hints.append("this layer's parameter count differs from ultralytics'")
        if iso in bn_bad:
            hints.append(bn_bad[iso].message)
        sources = getattr(candidate, "input_sources", None)
        for k, found in enumerate((sources(iso) if callable(sources) else None) or []):
            if found.get("ops") and index_is_functional(candidate, iso):
                hints.append(f"the candidate computes it from its input {k} ({entry['inputs'][k]}) through "
                             + ", ".join(found["ops"][:3]))
        if candidate.live and "error" not in results["isolated"][iso]:
            hint = _affine(reference, candidate, entry, head)
            if hint:
                hints.append(hint)
            inside = _first_sub_block(reference, candidate, entry, head, profile)
            if inside:
                hints.append(inside)
                ev["sub_block"] = inside.split(" is ", 1)[-1].split(" ", 1)[0]
        message = (f"first divergent layer: {iso} ({entry.get('type')}), fed the reference's own inputs "
                   f"(isolated), so the difference is made inside this layer: {ev.get('tensor')}: {detail}")
        if hints:
            message += ". " + ". ".join(hints)
        report.find(Finding("layer-divergence", structure.layer_where(iso), message, evidence=ev))
    if ch is not None:
        _diagnose_chained(reference, candidate, by_index, head, report, results, ch, iso, describe)


def _input_layers(entry: dict) -> list[int]:
    return [names.layer_of(n) for n in entry.get("inputs") or [] if names.layer_of(n) is not None]


def _unchecked_upstream(by_index: dict, iso_results: dict | None, index: int) -> list[int]:
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


# A chained difference this many times its tolerance is no accumulated rounding
DRIFT_LIMIT = 100.0


def _diagnose_chained(reference, candidate, by_index, head, report, results, ch, iso, describe) -> None:
    entry = by_index[ch]
    detail, ev = describe("chained", ch)
    iso_results = results.get("isolated")
    iso_rows = (iso_results or {}).get(ch)
    iso_passed = iso_rows is not None and all(r.passed for r in iso_rows.values())
    inputs_ok = all(_passed_in(results["chained"], reference, name) for name in entry["inputs"])
    unchecked = _unchecked_upstream(by_index, iso_results, ch)
    row = _worst_row(results["chained"][ch])
    metrics = row.metrics or {}
    ratio = None
    if isinstance(metrics.get("max_abs"), (int, float)) and metrics.get("effective_atol"):
        ratio = metrics["max_abs"] / metrics["effective_atol"]
    feeding = set(_input_layers(entry)) | {j for u in unchecked for j in _input_layers(by_index[u])}
    upstream = [_worst_row(results["chained"][j]).metrics or {} for j in sorted(feeding)
                if j in results["chained"]]
    before = max((m.get("max_abs") or 0.0 for m in upstream if isinstance(m.get("max_abs"), (int, float))),
                 default=None)
    jump = (f"the difference jumps from {before:.2g} to {metrics['max_abs']:.2g}"
            if before is not None and isinstance(metrics.get("max_abs"), (int, float)) else "")
    ev.update({"not_compared": unchecked, "tolerance_ratio": ratio})
    # A wrong input is a difference of the tensors' own size, not a rounding the layer amplified: below
    # DRIFT_LIMIT tolerances the inputs' own small differences explain it.
    if iso_passed and inputs_ok and ch != 0 and (ratio is None or ratio >= DRIFT_LIMIT):
        wiring = _wiring_search(reference, candidate, entry, head, report)
        report.find(Finding(
            "layer-wiring", structure.layer_where(ch),
            f"layer {ch} ({entry.get('type')}) diverges end to end although it matches when fed the reference's "
            f"inputs and its inputs ({', '.join(entry['inputs'])}) match in the chained run: the candidate feeds "
            f"this layer something else" + (f": {wiring} (check its `from` wiring)" if wiring else
                                            " (check its `from` wiring / which outputs it concatenates)")
            + f". {detail}", evidence={**ev, "from": entry.get("from"), "wiring": wiring}))
    elif unchecked and iso_passed:
        report.find(Finding(
            "layer-divergence", structure.layer_where(ch),
            f"first divergent layer end to end: {ch} ({entry.get('type')}) matches in isolation, so the difference "
            f"is made in {_span(unchecked)}, which {'was' if len(unchecked) == 1 else 'were'} not compared (the "
            f"candidate exposes no module or operation for {'it' if len(unchecked) == 1 else 'them'}; "
            f"docs/model-adapter.md)" + (f"; {jump}" if jump else "") + f". {detail}", evidence=ev))
    elif iso is None and iso_results is not None and iso_passed and (ratio is None or ratio < DRIFT_LIMIT) \
            and all(i in iso_results for i in by_index if i <= ch):
        report.find(Finding(
            "chained-drift", structure.layer_where(ch),
            f"every layer matches in isolation, but the end-to-end run leaves the tolerance at layer {ch} "
            f"({entry.get('type')}): small differences accumulate beyond the '{report.profile}' profile "
            f"(different arithmetic order, threads or precision?). {detail}", evidence=ev))
    elif iso is None or iso_results is None:
        extra = ""
        if iso_passed and ratio is not None and ratio >= DRIFT_LIMIT:
            extra = (f"; it matches in isolation, but the end-to-end difference is {ratio:.3g}x its tolerance, far "
                     f"beyond accumulated rounding" + (f" ({jump})" if jump else "")
                     + ": the candidate's forward computes something its layers alone do not")
        report.find(Finding(
            "layer-divergence", structure.layer_where(ch),
            f"first divergent layer end to end (chained): {ch} ({entry.get('type')}): {ev.get('tensor')}: {detail}"
            + extra, evidence=ev))
    else:
        report.context.setdefault("notes", []).append(
            f"chained mode first diverges at layer {ch}; isolated mode at layer {iso}")


def _wiring_search(reference: Dump, candidate: Candidate, entry: dict, head, report: Report) -> str:
    """Which reference outputs the candidate feeds this layer: per input, feed each same-shaped earlier reference
    output in isolation and keep the one that reproduces the candidate's own chained output."""
    traced = getattr(candidate, "input_sources", None)
    index = entry["index"]
    inputs = list(entry["inputs"])
    words = []
    strides = reference.model.get("strides") or []

    def which(k: int) -> str:
        if index == head and k < len(strides):
            return f"the head's P{int(round(math.log2(strides[k])))} input"
        return f"its input {k}"

    if callable(traced):
        sources = traced(index)
        if sources:
            for k, (name, found) in enumerate(zip(inputs, sources)):
                expected = names.layer_of(name)
                if found.get("layers") and found["layers"] != [expected]:
                    got = " + ".join(f"layer {j}'s" for j in found["layers"])
                    words.append(f"{which(k)} is {got} output, ultralytics uses layer {expected}'s")
                if found.get("ops"):
                    words.append(f"its input {k} ({name}) passes through "
                                 + ", ".join(found["ops"][:3]) + " outside any layer")
            if words:
                return "; ".join(words)
    produced = report.context.get("_chained_outputs") or {}
    target_names = [n for n in _outputs_of(reference, entry, head) if n in produced]
    if not target_names or not candidate.live:
        return ""
    from parity.compare.tolerances import get_profile

    profile = get_profile(report.profile)
    base = [reference.get(n) for n in inputs]

    def reproduces(feed) -> bool:
        try:
            out = candidate.run_layer(index, feed, is_head=index == head)
        except Exception:  # noqa: BLE001
            return False
        return all(n in out and compare_tensors(produced[n].cpu(), out[n].cpu(),
                                                profile.for_name(n, mode="chained")).passed for n in target_names)

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
                words.append(f"{which(k)} is layer {j}'s output, ultralytics uses layer {expected}'s")
                break
    if len(inputs) > 1 and not words and reproduces(list(reversed(base))):
        words.append("it takes its inputs in the other order")
    return "; ".join(words)


def index_is_functional(candidate: Candidate, index: int) -> bool:
    return index in (getattr(candidate, "functional", None) or {})


def _passed_in(results: dict[int, dict[str, Row]], reference: Dump, name: str) -> bool:
    if name == names.batch_img():
        return True
    index = names.layer_of(name)
    rows = results.get(index, {})
    row = rows.get(name)
    return row is not None and row.passed


def _upsample_check(reference: Dump, candidate: Candidate, entry: dict, head, profile: Profile):
    index = entry["index"]
    inputs = [reference.get(n) for n in entry["inputs"]]
    try:
        produced = candidate.run_layer(index, inputs, is_head=False)
    except Exception:  # noqa: BLE001
        return None
    name = names.act(index)
    if name not in produced:
        return None
    return structure.diagnose_upsample(index, inputs, produced[name].cpu(), reference.get(name),
                                       profile.for_name(name, mode="isolated"))


def _first_sub_block(reference: Dump, candidate: Candidate, entry: dict, head, profile: Profile) -> str:
    """The first of the layer's sub-blocks (execution order) that differs on the reference's inputs, in words."""
    index = entry["index"]
    sub = _sub_names(reference, entry, head)
    if not sub:
        return ""
    try:
        produced = candidate.layer_stages(index, [reference.get(n) for n in entry["inputs"]], is_head=index == head,
                                          reference_paths=[n[len(names.act(index)) + 1:] for n in sub])
    except Exception:  # noqa: BLE001 - the drill-down reports it when asked
        return ""
    ref_names = set(sub)
    compared = 0
    for name in sub:
        cand, _ = _lookup(produced, name, ref_names)
        if cand is None:
            continue
        compared += 1
        if not compare_tensors(reference.get(name), cand.cpu(), profile.for_name(name, mode="isolated")).passed:
            before = "" if compared > 1 else " (the first one)"
            return (f"inside it, the first sub-block that differs is {name[len(names.act(index)) + 1:]}{before} "
                    f"(--layer {index} shows them all)")
    return ""


def _affine(reference: Dump, candidate: Candidate, entry: dict, head) -> str:
    index = entry["index"]
    name = names.act(index)
    if name not in reference or index == head:
        return ""
    try:
        produced = candidate.run_layer(index, [reference.get(n) for n in entry["inputs"]], is_head=False)
    except Exception:  # noqa: BLE001
        return ""
    if name not in produced:
        return ""
    return structure.affine_hint(reference.get(name), produced[name].cpu())


# ---------------------------------------------------------------------------------------- drill-down
def _sub_names(reference: Dump, entry: dict, head) -> list[str]:
    index = entry["index"]
    own = set(entry["outputs"])  # the layer's own outputs; the head's DFL is a stage and stays in
    prefix = names.act(index) + "."
    return [n for n in reference.names(prefix) if n not in own]


def _lookup(produced: dict[str, torch.Tensor], name: str, ref_names: set[str]) -> tuple[torch.Tensor | None, str]:
    """The candidate's tensor for a reference sub-block name; a Sequential's output is its last stage's output."""
    if name in produced:
        return produced[name], ""
    children = [n for n in ref_names if n.startswith(name + ".") and n[len(name) + 1:].isdigit()]
    if children:
        last = max(children, key=lambda n: int(n.rsplit(".", 1)[1]))
        if last in produced:
            return produced[last], f"(= output of its last stage {last.rsplit('.', 1)[1]})"
    return None, ""


def _drill_down(reference: Dump, candidate: Candidate, layers: list[dict], head, index: int, profile: Profile,
                report: Report, modes: tuple[str, ...]) -> None:
    entry = next(e for e in layers if e["index"] == index)
    sub = _sub_names(reference, entry, head)
    report.context["drill_down"] = {"layer": index, "type": entry.get("type"), "sub_blocks": len(sub)}
    if not sub:
        report.coverage.setdefault("not_checked", []).append(
            f"layer {index} sub-blocks: the reference captured none for this layer")
        return
    ref_names = set(sub)
    left_out: set[str] = set()
    first: dict[str, str] = {}
    for mode in modes:
        section = f"{mode}/layer {index}"
        if candidate.live:
            if mode == "isolated":
                inputs = [reference.get(n) for n in entry["inputs"]]
            else:
                img = reference.get(names.batch_img())
                chained = candidate.run_chained(img, None, head_index=head)
                inputs = []
                for name in entry["inputs"]:
                    if name == names.batch_img():
                        inputs.append(img)
                    elif name in chained:
                        inputs.append(chained[name])
                    else:
                        inputs = None
                        break
                del chained
                if inputs is None:
                    report.coverage.setdefault("not_checked", []).append(
                        f"layer {index} sub-blocks, chained: the candidate's chained run lacks this layer's inputs")
                    continue
            try:
                produced = candidate.layer_stages(index, inputs, is_head=index == head,
                                                  reference_paths=[n[len(names.act(index)) + 1:] for n in sub])
            except Exception as error:  # noqa: BLE001
                _error_row(report, section, index, f"act.{index}.*", error)
                continue
            get = lambda n: _lookup(produced, n, ref_names)  # noqa: E731
        else:
            if mode == "isolated":
                continue
            get = lambda n: (candidate.get(n), "")  # noqa: E731
        for name in sub:
            cand, alias = get(name)
            if cand is None:
                left_out.add(name)
                continue
            row = _compare_into(report, section, index, name, reference.get(name), cand, profile, mode)
            if alias:
                row.note = f"{alias} {row.note}"
            if not row.passed and mode not in first:
                first[mode] = name
    compared = {r.name for r in report.rows if r.section.endswith(f"/layer {index}")}
    report.coverage["sub_blocks"] = {"layer": index, "reference": len(sub), "compared": len(compared),
                                     "left_out": sorted(n for n in left_out if n not in compared)}
    for mode, name in first.items():
        path = name[len(names.act(index)) + 1:]
        report.find(Finding(
            "sub-block-divergence", f"layer {index}, {path}",
            f"inside layer {index} ({entry.get('type')}), the first sub-block that diverges in {mode} mode is "
            f"{path} ({name}); sub-blocks are listed in execution order, so the difference starts there",
            evidence={"layer": index, "sub_block": path, "mode": mode}))


# ------------------------------------------------------------------------------------------- coverage
def _coverage(reference: Dump, report: Report, layers: list[dict], results: dict, head) -> None:
    wanted = [n for e in layers for n in _outputs_of(reference, e, head)]
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
