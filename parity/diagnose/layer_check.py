"""One layer of a port, judged against its layer file (docs/porting-protocol.md, `parity check-layer`).

The port ran the layer on the layer file's inputs and wrote its outputs (`act.23.boxes`, `act.23.cv2.0.2`,
`init.cls_bias.0.stored` or `init.cls_bias.0`). `check_layer` checks the names it wrote, compares each tensor
with the expected one under the tolerance profile (cpu-fp32 unless told; isolated tolerances, since the port ran
on the reference's inputs), diagnoses foreign layouts and dtypes (`parity.compare.foreign`), checks the weights
it wrote back bitwise and judges its own Detect bias init (`parity.diagnose.structure.diagnose_bias_init`).
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from parity.compare.foreign import name_problem, tensor_findings
from parity.compare.layer_file import (LAYER_FILE_PREFIXES, Expected, OutputCheck, PortOutput, compare_outputs,
                                       compare_port_weights, expected_of, open_layer_file, read_port_output)
from parity.compare.tolerances import Profile, get_profile
from parity.diagnose import structure
from parity.diagnose.layers import (add_weight_check, divergence_metrics, layer_divergence, not_checked,
                                    sub_block_divergence, sub_block_path)
from parity.dump import names
from parity.dump.layer_file import DEFAULT_PROFILE, LayerFile, LayerFileAsReference
from parity.errors import ParityError
from parity.findings import Finding, Report, Row

if TYPE_CHECKING:
    import torch


def check_layer(layer_file: str | os.PathLike | LayerFile, output: str | os.PathLike, *,
                profile: str | None = None) -> Report:
    """Judge a port's output file against a layer file. Returns a `parity.findings.Report`."""
    lf = layer_file if isinstance(layer_file, LayerFile) else open_layer_file(layer_file)
    prof = get_profile(profile or DEFAULT_PROFILE)
    port = read_port_output(output)
    report = _new_report(lf, str(output), port, prof)
    expected = expected_of(lf)
    _check_names(report, lf, expected, port)
    _check_outputs(report, lf, expected, port, prof)
    _check_weights(report, lf, port)
    if expected.init:
        _check_bias_init(report, lf, port, str(output))
    _coverage(report, lf, expected, port)
    return report


def _new_report(lf: LayerFile, label: str, port: PortOutput, prof: Profile) -> Report:
    layer = lf.layer
    report = Report(command=f"check-layer --layer {layer}", reference=str(lf.path), candidate=label,
                    profile=prof.name)
    report.context.update({"layer": layer, "type": lf.type, "profile": prof.as_dict(),
                           "layers": [{"index": layer, "type": lf.type, "from": json.loads(lf.meta.get("from", "[]"))}],
                           "reference_dump": lf.meta.get("reference"), "model": lf.meta.get("model")})
    for problem in port.problems:
        if problem.severity in ("warning", "error") and problem.code != "unknown-name":
            report.find(Finding(f"foreign-{problem.code}", "output", problem.message, severity="warning"))
    return report


# ================================================================================================ names
def _check_names(report: Report, lf: LayerFile, expected: Expected, port: PortOutput) -> None:
    """Names outside the layer file's vocabulary: say what they probably meant; none known at all is bad input."""
    known = sorted(expected.known)
    unknown = [n for n in port.tensors if n not in expected.known and not n.startswith(LAYER_FILE_PREFIXES)]
    for name in unknown:
        problem = name_problem(port.as_written(name), known)
        if problem is not None:
            report.find(Finding("foreign-name", f"layer {lf.layer}", problem.message, severity="warning",
                                evidence={"tensor": port.as_written(name), "suggestion": problem.suggestion}))
    if not any(n in port for n in expected.own + expected.sub + expected.init + expected.params):
        raise ParityError(_nothing_known(lf, expected, port, known))


def _nothing_known(lf: LayerFile, expected: Expected, port: PortOutput, known: list[str]) -> str:
    hints = []
    for name in list(port.tensors)[:5]:
        problem = name_problem(port.as_written(name), known)
        if problem and problem.suggestion:
            hints.append(f"{port.as_written(name)!r} -> {problem.suggestion!r}")
    examples = ", ".join(expected.own[:3]) or ", ".join(expected.sub[:3])
    return (f"the port's output {port.path}: none of its {len(port.tensors)} tensor(s) is one layer {lf.layer} "
            f"expects (e.g. {examples})" + (f"; perhaps: {'; '.join(hints)}" if hints else
                                           f"; it holds: {', '.join(list(port.tensors)[:6])}"))


# ============================================================================================== outputs
def _check_outputs(report: Report, lf: LayerFile, expected: Expected, port: PortOutput, prof: Profile) -> None:
    """The layer's outputs, then its sub-blocks: one row each; the first of each that diverges is a finding."""
    first_own: Row | None = None
    first_sub: Row | None = None
    explained: dict[str, str] = {}  # tensor -> the most specific explanation of its failure
    for check in compare_outputs(lf, expected, port, prof):
        row, explained[check.name] = _output_row(report, lf.layer, check, port)
        if not row.passed:
            if check.own and first_own is None:
                first_own = row
            if not check.own and first_sub is None:
                first_sub = row
    report.context["first_divergent_layer"] = {"isolated": lf.layer if (first_own or first_sub) else None}
    _divergence_findings(report, lf, first_own, first_sub, explained)


def _output_row(report: Report, layer: int, check: OutputCheck, port: PortOutput) -> tuple[Row, str]:
    """The row of one compared tensor, its foreign-layout findings, and the words that explain a failure."""
    where = f"layer {layer}"
    metrics, ref, cand = check.metrics, check.expected, check.produced
    note = metrics.summary() if metrics.passed else (metrics.reason or metrics.summary())
    foreign_findings = [] if metrics.passed and cand.dtype == ref.dtype else \
        tensor_findings(check.name, f"{where}, {check.name}", ref, cand, check.tolerance, passed=metrics.passed)
    foreign = [f.message for f in foreign_findings]
    if not metrics.passed and not foreign and list(ref.shape) == list(cand.shape):
        hint = structure.affine_hint(ref, cand)
        if hint:
            note = f"{note}; {hint}"
    section = "isolated" if check.own else f"isolated/layer {layer}"
    row = report.add(Row(section, where, check.name, metrics.passed, metrics=metrics.as_dict(),
                         tolerance=check.tolerance.as_dict(), note=note))
    for finding in foreign_findings:
        finding.evidence["written_as"] = port.as_written(check.name)
        report.find(finding)
    return row, foreign[-1] if foreign else note


def _divergence_findings(report: Report, lf: LayerFile, first_own: Row | None, first_sub: Row | None,
                         explained: dict[str, str]) -> None:
    layer = lf.layer
    if first_own is not None or first_sub is not None:
        row = first_own or first_sub
        message = (f"layer {layer} ({lf.type}), run by the port on the reference's own inputs, diverges: "
                   f"{row.name}: {explained[row.name]}")
        if first_sub is not None:
            message += f". The first diverging sub-block (execution order) is {sub_block_path(layer, first_sub.name)}"
        report.find(layer_divergence(layer, message, {"layer": layer, "type": lf.type, "tensor": row.name,
                                                      **divergence_metrics(row.metrics)}))
    if first_sub is not None:
        path = sub_block_path(layer, first_sub.name)
        report.find(sub_block_divergence(layer, first_sub.name, (
            f"inside layer {layer} ({lf.type}) the first sub-block that diverges is {path} ({first_sub.name}): "
            f"{explained[first_sub.name]}"), "isolated"))


# ======================================================================================= weights, bias
def _check_weights(report: Report, lf: LayerFile, port: PortOutput) -> None:
    """Weights the port wrote back (after loading the param.* tensors): bitwise."""
    check = compare_port_weights(lf, port)
    if check.checked:
        add_weight_check(report, check, where_of=lambda _name: f"layer {lf.layer}",
                         compared_to="the layer file's param.* tensors", written_by="the port wrote",
                         should_match="param.* tensors")


def _check_bias_init(report: Report, lf: LayerFile, port: PortOutput, label: str) -> None:
    """The port's own freshly initialised Detect biases, judged like a live candidate's."""
    biases: dict[int, dict[str, torch.Tensor]] = {}
    for level in range(len(lf.strides)):
        for kind, short in (("cls_bias", "cls"), ("box_bias", "box")):
            name = names.init_bias(kind, level, "stored")
            if name in port:
                biases.setdefault(level, {})[short] = port.tensors[name]
    if biases:
        structure.diagnose_bias_init(LayerFileAsReference(lf), _port_bias_candidate(biases, label), report)
    else:
        not_checked(report, "Detect bias init: the output has no init.cls_bias.{level} (write the port's freshly "
                            "initialised class/box biases as init.cls_bias.{level} / init.box_bias.{level})")


def _port_bias_candidate(biases: dict[int, dict[str, torch.Tensor]], label: str):
    from parity.replay.candidates import Candidate

    class PortBiases(Candidate):
        kind = "port-output"
        live = False

        def fresh_head_biases(self, reference):
            return biases

    candidate = PortBiases()
    candidate.label = label
    return candidate


def _coverage(report: Report, lf: LayerFile, expected: Expected, port: PortOutput) -> None:
    own, sub = expected.own, expected.sub
    report.coverage["isolated"] = {"reference_tensors": len(own), "compared": sum(n in port for n in own),
                                   "left_out": [n for n in own if n not in port]}
    if sub:
        report.coverage["sub_blocks"] = {"layer": lf.layer, "reference": len(sub),
                                         "compared": sum(n in port for n in sub),
                                         "left_out": [n for n in sub if n not in port]}


__all__ = ["DEFAULT_PROFILE", "check_layer"]
