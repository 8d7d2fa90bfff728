"""The counterfactual explainer: at each divergent place, apply known causes to the REFERENCE computation on the
reference's own inputs, and name the cause that turns the reference into the candidate.

    explain_report(report, reference, ExplainConfig(candidate="builtin", inject="upsample-bilinear"))

Places (only where the report diverges; a passing report is left alone):

* the first divergent layer in isolated mode: the candidate runs that layer on the reference's inputs
  (`Candidate.run_layer`), the reference computation is the built-in layer loaded with the reference's weights
  (bitwise ultralytics on CPU), transformed by each model cause that applies to the layer type;
* a layer the chained run flags as `layer-wiring`: the layer fed another reference layer's same-shape output;
* the structure checks: Detect bias init (the classification of `parity.diagnose.structure`), BatchNorm
  momentum, the class-branch width (parameter counts);
* each divergent loss stage (its first divergent case): the candidate's stage on the reference's stage inputs,
  against the built-in stage transformed by each loss cause that applies to the stage;
* a black-box loss (no stages exposed): the whole candidate loss against the built-in loss with each cause.

A cause explains a place when every output of the transformed reference equals the candidate's within the
profile's tolerance. Causes are tried in registry order, parameters proposed from the candidate's own output
where a fit exists (a least-squares scale, a top-k read off the positives per box); the search stops at the
first cause that explains, or after `budget` trials (in runs of the place). Each place gets one finding: the
cause, or "no known cause explains it" with the two closest and how much of the residual each removes.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from parity.dump import names
from parity.causes.registry import Cause, all_causes, all_injections
from parity.compare.metrics import compare_tensors
from parity.compare.tolerances import BITWISE, Profile, get_profile, profile_for_environment
from parity.errors import ParityError
from parity.findings import Finding, Report

__all__ = ["ExplainConfig", "Place", "explain_report"]


@dataclass
class ExplainConfig:
    """What the explainer needs beyond the report: how to load the candidate again."""

    candidate: Any = "builtin"            # a spec (as for `compare`) or a loaded `parity.replay.candidates.Candidate`
    loss_candidate: Any = None            # a loss spec or LossAdapter; None: as `compare` chooses
    inject: str | None = None             # a plant in the built-in candidate
    profile: str | Profile | None = None
    map_file: str | None = None
    device: str = "cpu"
    budget: int = 20                      # trials per place, in runs of that place


@dataclass
class Place:
    """One divergent place: the reference's outputs there, the candidate's, and how to run the reference
    computation with a cause applied."""

    where: str
    kind: str                              # layer type, loss stage, "loss" (black box), "wiring"
    reference: dict[str, Any]              # reference outputs by name (the dump's)
    candidate: dict[str, Any]              # candidate outputs by name (or {"error": text})
    run: Callable[[Cause, dict], dict[str, Any]]
    tolerance: Callable[[str], Any]
    inputs: Any = None
    layer: Any = None
    config: Any = None                     # the loss configuration at a loss place
    batch_size: int = 1
    budget: int = 20
    one_run_seconds: float = 0.0
    names_shown: dict[str, str] = field(default_factory=dict)
    cost: Callable[[Cause], float] = lambda cause: 1.0   # one trial, in runs of the whole place

    @property
    def reference_output(self) -> torch.Tensor:
        return self.reference[self.key]

    @property
    def candidate_output(self) -> torch.Tensor:
        return self.candidate[self.key]

    @property
    def key(self) -> str:
        for name in self.reference:
            if name in self.candidate and not _matches(self.reference[name], self.candidate[name],
                                                       self.tolerance(name)):
                return name
        return next(iter(self.reference))


# --------------------------------------------------------------------------------------------- scoring
def _residual(ref: Any, cand: Any) -> float:
    """max |cand - ref| (NaN where only one side is NaN counts as inf; a shape change is inf)."""
    if not isinstance(ref, torch.Tensor) or not isinstance(cand, torch.Tensor):
        return 0.0 if ref == cand else math.inf
    if ref.shape != cand.shape:
        return math.inf
    if ref.numel() == 0:
        return 0.0
    r, c = ref.detach().double().cpu(), cand.detach().double().cpu()
    both_nan = torch.isnan(r) & torch.isnan(c)
    same_inf = torch.isinf(r) & torch.isinf(c) & (r == c)
    d = (r - c).abs()
    d = torch.where(both_nan | same_inf, torch.zeros_like(d), torch.nan_to_num(d, nan=math.inf))
    return float(d.max())


def _matches(ref: Any, cand: Any, tol) -> bool:
    if not isinstance(ref, torch.Tensor) or not isinstance(cand, torch.Tensor):
        return ref == cand
    if ref.shape != cand.shape:
        return False
    if ref.dtype == torch.bool or cand.dtype == torch.bool or not ref.is_floating_point():
        return bool(torch.equal(ref.detach().cpu().to(torch.float64), cand.detach().cpu().to(torch.float64)))
    if ref.dtype == cand.dtype and torch.equal(ref.detach().cpu(), cand.detach().cpu()):
        return True   # bitwise (the usual verdict of a cause that explains): no metrics needed
    return compare_tensors(ref.detach().float(), cand.detach().float(), tol).passed


@dataclass
class Trial:
    cause: Cause
    params: dict
    passing: int                           # outputs within tolerance
    total: int
    residual: float                        # on the place's key tensor
    error: str = ""

    @property
    def explains(self) -> bool:
        return not self.error and self.passing == self.total and self.total > 0


def _score(place: Place, produced: dict[str, Any], key: str) -> tuple[int, int, float]:
    passing = total = 0
    for name, cand in place.candidate.items():
        if name == "error":
            continue
        total += 1
        passing += int(name in produced and _matches(produced[name], cand, place.tolerance(name)))
    if "error" in place.candidate:
        total += 1
        passing += int(produced.get("error") == place.candidate["error"])
    residual = _residual(produced.get(key), place.candidate.get(key)) if key in place.candidate else math.inf
    return passing, total, residual


def search(place: Place, causes: list[Cause]) -> tuple[Trial | None, list[Trial], int]:
    """Try the causes in order; the first that explains the place, every trial, and the number of runs."""
    key = place.key if "error" not in place.candidate else "error"
    trials: list[Trial] = []
    runs = 0
    planned = []
    for cause in causes:
        try:
            proposals = cause.fit(place) if cause.fit is not None else list(cause.params)
        except Exception:  # noqa: BLE001 - a fit that cannot read this place proposes nothing
            proposals = []
        planned.append((cause, proposals))
    # Cheap causes first (a black box re-runs only the stages after the one a cause replaces); then release
    # causes, so that a port of an older release is named as that release and not as a look-alike bug; then
    # the registry's order.
    costs = {cause.signature: place.cost(cause) for cause, _ in planned}
    planned.sort(key=lambda item: (costs[item[0].signature] >= 1, item[0].release is None))
    for cause, proposals in planned:
        for params in proposals:
            if runs + costs[cause.signature] > place.budget + 1e-9:
                return None, trials, runs
            runs += costs[cause.signature]
            try:
                with torch.no_grad() if place.kind not in ("assign",) else _nullcontext():
                    produced = place.run(cause, dict(params))
            except Exception as error:  # noqa: BLE001 - a transform that cannot run here explains nothing
                produced = {"error": _error_text(error)}
            passing, total, residual = _score(place, produced, key)
            trial = Trial(cause, dict(params), passing, total, residual)
            trials.append(trial)
            if trial.explains:
                return trial, trials, runs
    return None, trials, runs


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


# ------------------------------------------------------------------------------------------ findings
def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if math.isinf(value):
        return "inf (shape or NaN)"
    return f"{value:.3g}"


def _explained_finding(place: Place, trial: Trial, before: float, runs: int, seconds: float) -> Finding:
    cause = trial.cause
    params = cause.describe_params(trial.params)
    exact = trial.residual == 0
    key = place.names_shown.get(place.key, place.key)
    lead = f"explained by `{cause.signature}`" + (f" ({params})" if params else "")
    if isinstance(place.candidate.get(place.key), str):   # a raised error or the gradient-carrying outputs
        change = f"{key}: as the candidate's ({place.candidate[place.key] or 'none'})"
    else:
        change = (f"{key} residual {_fmt(before)} -> {_fmt(trial.residual)} "
                  f"({'bitwise' if exact else 'within tolerance'})")
    message = f"{lead}: {change}; {cause.explanation}"
    evidence = {"cause": cause.signature, "params": {k: v for k, v in trial.params.items() if not k.startswith("_")},
                "described": params, "place": place.where, "tensor": place.key,
                "residual_before": before, "residual_after": trial.residual, "runs": runs,
                "seconds": round(seconds, 4), "one_run_seconds": round(place.one_run_seconds, 5)}
    if cause.release:
        from parity.causes.releases import RELEASE_HISTORY

        drift_cause = cause.signature.removeprefix("release-").removesuffix(f"-{cause.release}")
        evidence.update(cause=drift_cause, registry_cause=cause.signature, release=cause.release,
                        tensors=[{"name": place.names_shown.get(place.key, place.key)}],
                        release_history=[f"{v}: {t}" for v, c, t in RELEASE_HISTORY if v == cause.release])
    return Finding(cause.finding, place.where, message, severity="warning" if cause.release else "error",
                   evidence=evidence)


def _unexplained_finding(place: Place, trials: list[Trial], before: float, runs: int, seconds: float) -> Finding:
    ranked = sorted((t for t in trials if not t.error), key=lambda t: (-t.passing, t.residual))
    best: list[Trial] = []
    for trial in ranked:
        if all(b.cause.signature != trial.cause.signature for b in best):
            best.append(trial)
        if len(best) == 2:
            break
    parts = []
    for trial in best:
        removed = 0.0 if not math.isfinite(before) or before == 0 or not math.isfinite(trial.residual) else \
            max(0.0, 1 - trial.residual / before)
        params = trial.cause.describe_params(trial.params)
        parts.append(f"`{trial.cause.signature}`" + (f" ({params})" if params else "")
                     + f" removes {removed:.0%} of the residual")
    if not trials:
        text = "no known cause applies to this place"
    else:
        text = (f"no known cause explains it ({runs:g} tried, the closest reaching no tolerance)"
                + (": closest " + "; ".join(parts) if parts else ""))
    key = place.names_shown.get(place.key, place.key)
    return Finding("unexplained", place.where, f"{text}; {key} residual {_fmt(before)}", severity="info",
                   evidence={"place": place.where, "tensor": place.key, "residual": before, "runs": runs,
                             "seconds": round(seconds, 4), "closest": [
                                 {"cause": t.cause.signature, "params": t.params, "residual": t.residual,
                                  "passing": t.passing, "total": t.total} for t in best]})


def _guarded(context: dict, what: str, fn: Callable, *args):
    """Run one place's explanation; a failure there is said in the report, never the end of the comparison."""
    try:
        return fn(*args)
    except ParityError as error:
        context["not_explained"].append(f"{what}: {error}")
    except Exception as error:  # noqa: BLE001 - a port may make any place unreadable; the replay already judged it
        context["not_explained"].append(f"{what}: the explainer could not run here ({_error_text(error)})")
    return None


def _explain_place(report: Report, place: Place, causes: list[Cause]) -> Finding:
    started = time.perf_counter()
    before = _residual(place.reference.get(place.key), place.candidate.get(place.key)) \
        if "error" not in place.candidate else math.inf
    applicable = [c for c in causes if c.applies(place.kind) and not c.benign
                  and (c.transform is not None or c.signature == "wiring")]
    found, trials, runs = search(place, applicable)
    seconds = time.perf_counter() - started
    finding = (_explained_finding(place, found, before, runs, seconds) if found else
               _unexplained_finding(place, trials, before, runs, seconds))
    report.find(finding)
    report.context.setdefault("explanations", []).append({
        "place": place.where, "kind": place.kind, "cause": found.cause.signature if found else None,
        "params": found.params if found else None, "runs": round(runs, 2), "seconds": round(seconds, 4),
        "one_run_seconds": round(place.one_run_seconds, 5),
        "ratio": round(seconds / place.one_run_seconds, 2) if place.one_run_seconds else None})
    return finding


# ---------------------------------------------------------------------------------------- model places
def _explain_layer(report: Report, context: dict, side: "_ModelSide", index: int, place: Place,
                   causes: list[Cause]) -> None:
    """The first divergent layer. Where it is a Conv (or starts with one), the BatchNorm scale fitted from the
    candidate's own outputs says first whether an eps is at work at all: reduction rounding is reported as such
    and bn-eps is not tried against it (never an eps for noise); an eps no trial reproduces is still named."""
    batchnorm_finding = _guarded(context, f"layer {index} batchnorm", _batchnorm_finding, side, index, place)
    if batchnorm_finding is not None and batchnorm_finding.signature == "bn-reduction-rounding":
        report.find(batchnorm_finding)
        causes = [c for c in causes if c.signature != "bn-eps"]
    found = _guarded(context, f"layer {index}", _explain_place, report, place, causes)
    if batchnorm_finding is not None and batchnorm_finding.signature == "bn-eps" and \
            (found is None or found.signature != "bn-eps"):
        report.find(batchnorm_finding)


def _batchnorm_finding(side: "_ModelSide", index: int, place: Place) -> Finding | None:
    from parity.diagnose import batchnorm

    if "error" in place.candidate or not batchnorm.conv_places(side.reference, index):
        return None
    outputs = dict(place.candidate)
    outputs.update(side.candidate.layer_stages(index, place.inputs, is_head=index == side.head))
    # Only a Conv output that itself diverges says anything about its BatchNorm (a C2f whose cv1 matches
    # diverges further in).
    diverging = {n: t for n, t in outputs.items()
                 if n in side.reference and not _matches(side.reference.get(n), t, place.tolerance(n))}
    return batchnorm.diagnose_layer(side.reference, diverging, index)


class _ModelSide:
    """The candidate and the built-in reference computation (the reference's weights loaded)."""

    def __init__(self, reference, config: ExplainConfig, model_inject: str | None):
        from parity.replay.candidates import Candidate, load_candidate

        self.reference = reference
        if isinstance(config.candidate, Candidate):
            self.candidate = config.candidate
            if getattr(self.candidate, "mapping", "absent") is None:
                self.candidate.prepare(reference)
        else:
            self.candidate = load_candidate(config.candidate, reference, inject=model_inject,
                                            map_file=config.map_file, device=config.device)
            self.candidate.prepare(reference)
        self.clean = load_candidate("builtin", reference)
        self.clean.prepare(reference)
        self.detector = self.clean.module
        self.head = reference.model.get("head_index")
        self.layers = {e["index"]: e for e in reference.layers}

    def outputs(self, index: int, value) -> dict[str, torch.Tensor]:
        from parity.replay.candidates import layer_output_tensors

        return layer_output_tensors(index, value, reg_max=self.clean.reg_max, nc=self.clean.nc,
                                    is_head=index == self.head)

    def call(self, index: int, module, inputs):
        if self.detector.layer_types()[index] in ("Concat", "Detect"):
            return module(list(inputs))
        return module(inputs[0])

    def place(self, index: int, profile: Profile, budget: int) -> Place | None:
        entry = self.layers[index]
        inputs = [self.reference.get(n) for n in entry["inputs"]]
        wanted = [n for n in entry["outputs"] if n in self.reference]
        started = time.perf_counter()
        try:
            produced = self.candidate.run_layer(index, inputs, is_head=index == self.head)
            candidate = {n: produced[n].detach().cpu() for n in wanted if n in produced}
        except Exception as error:  # noqa: BLE001
            candidate = {"error": _error_text(error)}
        one_run = time.perf_counter() - started
        tolerance = lambda n: profile.for_name(n, mode="isolated")  # noqa: E731
        if not candidate or ("error" not in candidate and all(
                _matches(self.reference.get(n), t, tolerance(n)) for n, t in candidate.items())):
            return None   # nothing to explain in isolation (a chained-only divergence is accumulated drift)
        layer = self.detector.layers[index]

        def run(cause: Cause, params: dict) -> dict[str, Any]:
            module = cause.transform(layer, **params)
            return self.outputs(index, self.call(index, module, inputs))

        return Place(f"layer {index} ({entry.get('type')}), isolated", str(entry.get("type")),
                     {n: self.reference.get(n) for n in wanted}, candidate, run,
                     lambda n: profile.for_name(n, mode="isolated"), inputs=inputs, layer=layer, budget=budget,
                     one_run_seconds=one_run)

    def wiring_place(self, index: int, profile: Profile, budget: int) -> Place | None:
        """The layer fed another reference layer's same-shape output in one of its input slots."""
        entry = self.layers[index]
        started = time.perf_counter()
        if self.candidate.live:
            img = self.reference.get(names.batch_img())
            chained = self.candidate.run_chained(img, None, head_index=self.head)
            get = chained.get
        else:
            get = self.candidate.get
        wanted = [n for n in entry["outputs"] if n in self.reference and get(n) is not None]
        candidate = {n: get(n).detach().cpu() for n in wanted}
        one_run = time.perf_counter() - started
        if not candidate:
            return None
        inputs = [self.reference.get(n) for n in entry["inputs"]]
        layer = self.detector.layers[index]
        options = []
        for slot, name in enumerate(entry["inputs"]):
            shape = list(inputs[slot].shape)
            for other in range(index):
                other_name = names.act(other)
                if other_name != name and other_name in self.reference and \
                        list(self.reference.index[other_name]["shape"]) == shape:
                    options.append({"input": slot, "source": other,
                                    "_words": f"input {slot} reads layer {other}'s output instead of "
                                              f"layer {names.layer_of(name)}'s"})

        def run(cause: Cause, params: dict) -> dict[str, Any]:
            fed = list(inputs)
            fed[params["input"]] = self.reference.get(names.act(params["source"]))
            return self.outputs(index, self.call(index, layer, fed))

        place = Place(f"layer {index} ({entry.get('type')}), chained", "wiring",
                      {n: self.reference.get(n) for n in wanted}, candidate, run,
                      lambda n: profile.for_name(n, mode="chained"), inputs=inputs, layer=layer,
                      budget=budget, one_run_seconds=one_run)
        place.wiring_options = options
        return place


def _wiring_cause() -> Cause:
    base = all_causes()["wiring"]
    return Cause(base.signature, base.kind, base.applies_to, base.explanation,
                 transform=lambda *_a, **_k: None, fit=lambda place: list(getattr(place, "wiring_options", [])))


# ------------------------------------------------------------------------------------ structure places
def _explain_structure(report: Report, reference, side: _ModelSide) -> None:
    from parity.diagnose import structure

    failing = [r for r in report.rows if r.section in _STRUCTURE_SECTIONS and not r.passed]
    causes = all_causes()
    if any(r.name.startswith("init.") for r in failing):
        _explain_bias_init(report, reference, side)
    if any(r.name == "batchnorm momentum" for r in failing):
        values = sorted({b["momentum"] for b in side.candidate.batchnorms()
                         if b["momentum"] is None or not math.isclose(b["momentum"], 0.03)}, key=str)
        cause = causes["bn-momentum"]
        report.find(Finding("bn-momentum", "batchnorm (explained)",
                            f"explained by `bn-momentum` (momentum={', '.join(map(str, values))}): {cause.explanation}",
                            evidence={"cause": "bn-momentum", "params": {"momentum": values}}))
    head = side.head
    mismatch = [f for f in report.findings if f.signature == "param-count-mismatch" and f.evidence.get("layer") == head]
    if mismatch:
        _explain_class_width(report, reference, side, mismatch[0])


def _explain_bias_init(report: Report, reference, side: _ModelSide) -> None:
    """The Detect bias init, by the classification of `parity.diagnose.structure` (rerun on the candidate's own
    fresh biases): each variant it recognises is a registered cause; one finding per cause, naming the strides."""
    from parity.diagnose import structure

    causes = all_causes()
    started = time.perf_counter()
    scratch = Report(command="explain", reference=str(reference.path), candidate="", profile="")
    structure.diagnose_bias_init(reference, side.candidate, scratch)
    seconds = time.perf_counter() - started
    head = side.head
    strides: dict[str, list[str]] = {}
    for finding in scratch.findings:
        stride = finding.where.rsplit("stride ", 1)[-1] if "stride " in finding.where else "?"
        strides.setdefault(finding.signature, []).append(stride)
    for signature, at in strides.items():
        if signature == "bias-init-box":
            fresh = side.candidate.fresh_head_biases(reference) or {}
            values = {float(v) for level in fresh.values() for v in level.get("box", torch.empty(0)).flatten()}
            if values != {1.0}:
                continue
            cause = causes["release-box-bias-init-8.4.0"]
            report.find(Finding(cause.finding, f"layer {head}, box bias init",
                                f"explained by `{cause.signature}` (box bias 1.0 at stride {', '.join(at)}): "
                                f"{cause.explanation}", severity="warning",
                                evidence={"cause": "box-bias-init", "release": "8.4.0", "registry_cause": cause.signature,
                                          "tensors": [], "seconds": round(seconds, 4)}))
        elif signature in causes and causes[signature].kind == "structure":
            cause = causes[signature]
            report.find(Finding(signature, f"layer {head}, cls bias init",
                                f"explained by `{signature}` at stride {', '.join(at)}: {cause.explanation}",
                                evidence={"cause": signature, "strides": at, "seconds": round(seconds, 4)}))


def _explain_class_width(report: Report, reference, side: _ModelSide, finding: Finding) -> None:
    from parity.causes.model_causes import CLASS_WIDTH_RULES

    det = side.detector
    wanted = finding.evidence.get("candidate")
    in_channels = [det.specs[s].c_out for s in det.sources[det.head_index]]
    causes = all_causes()
    tried = []
    for legacy in (det.legacy_head, not det.legacy_head):
        for rule, head_class in CLASS_WIDTH_RULES.items():
            head = head_class(det.nc, in_channels, det.reg_max, legacy=legacy)
            count = sum(p.numel() for p in head.parameters())
            tried.append((rule, legacy, count))
            if count != wanted:
                continue
            style = "legacy" if legacy else "depthwise"
            if legacy != det.legacy_head and rule == "max(c, min(nc, 100))" and det.legacy_head:
                cause = causes["release-model-structure-8.3.0"]
                report.find(Finding(cause.finding, f"layer {det.head_index} (Detect), structure",
                                    f"explained by `{cause.signature}` ({style} class head): {count:,} parameters as "
                                    f"the candidate; {cause.explanation}", severity="warning",
                                    evidence={"cause": "model-structure", "release": "8.3.0", "tensors": []}))
                return
            if rule != "max(c, min(nc, 100))" and legacy == det.legacy_head:
                cause = causes["class-branch-width"]
                report.find(Finding(cause.signature, f"layer {det.head_index} (Detect), structure",
                                    f"explained by `class-branch-width` (rule {rule}): {count:,} parameters as the "
                                    f"candidate; {cause.explanation}",
                                    evidence={"cause": cause.signature, "params": {"rule": rule}, "parameters": count}))
                return
    report.find(Finding("unexplained", f"layer {det.head_index} (Detect), structure",
                        f"no class-branch width rule gives the candidate's {wanted:,} parameters "
                        f"(tried {len(tried)})", severity="info", evidence={"tried": tried}))


# ----------------------------------------------------------------------------------------- loss places
class _LossSide:
    def __init__(self, reference, config: ExplainConfig, loss_inject: str | None):
        from parity.dump.layouts import in_current_layout
        from parity.reimpl.loss import build_loss
        from parity.replay.loss import LossSpec, load_loss_candidate

        self.dump = in_current_layout(reference)
        self.spec = LossSpec.from_dump(self.dump)
        self.adapter = load_loss_candidate(config.loss_candidate or "builtin", self.spec, inject=loss_inject)
        self.clean = build_loss(self.spec.manifest)

    def branch_loss(self, branch: str | None):
        return self.clean.branch(branch) if branch else self.clean

    def case(self, case: str):
        from parity.replay.loss import CaseView as _Case  # the replay's own view of a case's stage inputs

        return _Case(self.dump, self.spec, case)

    def stage_place(self, case: str, stage: str, branch: str | None, profile: Profile, budget: int) -> Place | None:
        from parity.replay.loss import ASSIGNER_INPUT_NAMES, REFERENCE_STAGE, STAGE_OUTPUTS

        view = self.case(case)
        fn = self.adapter.stage(stage, branch)
        if fn is None:
            return None
        try:
            inputs = view.stage_inputs(stage, branch)
        except KeyError:
            return None
        ref_stage = REFERENCE_STAGE.get(stage, stage)
        out_branch = None if stage == "output" else branch
        full = {n: view.name(ref_stage, n, out_branch) for n in STAGE_OUTPUTS[stage]}
        reference = {n: view.ref(ref_stage, n, out_branch) for n in STAGE_OUTPUTS[stage]}
        reference = {n: t for n, t in reference.items() if t is not None}

        def feed() -> dict:
            return _stage_feed(stage, inputs)

        def grads(outputs: dict) -> dict:
            return _grad_carriers(stage, outputs, ASSIGNER_INPUT_NAMES)

        def candidate_outputs() -> dict:
            produced = fn(**feed())
            return {**{n: produced[n] for n in reference if n in produced}, **grads(produced)}

        candidate, one_run = _timed(candidate_outputs)
        base = self.branch_loss(branch)
        reference_view = dict(reference)
        if stage == "assign":
            reference_view["carries-grad"] = ""

        def run(cause: Cause, params: dict) -> dict[str, Any]:
            loss = copy.copy(base)
            cause.transform(loss, **params)
            outputs = loss.stage(stage)(**feed())
            return {**{n: outputs[n] for n in reference if n in outputs}, **grads(outputs)}

        where = f"loss {case} {branch + ' ' if branch else ''}{stage}"
        return Place(where, stage, reference_view, candidate, run,
                     lambda n: BITWISE if n in _EXACT_STAGE_OUTPUTS else profile.for_name(full.get(n, n)),
                     inputs=inputs, config=base.config, batch_size=self.spec.batch_size, budget=budget,
                     one_run_seconds=one_run, names_shown=full)

    def black_box_place(self, case: str, profile: Profile, budget: int) -> Place | None:
        from parity.reimpl.loss import build_loss

        view = self.case(case)
        ref_loss = view.ref("output", "loss")
        if ref_loss is None or ref_loss.numel() != 3:
            return None
        spec = self.spec
        branches = list(spec.branches) or [None]
        heads = {b: view.head(b) for b in branches}
        head = heads if spec.end2end else heads[None]
        batch = view.batch()

        def candidate_terms() -> dict:
            result = self.adapter.call(self.adapter.convert_preds(head, spec), self.adapter.convert_batch(batch, spec))
            scale = 1 if self.adapter.batch_scaled else spec.batch_size
            cand = result.terms if result.terms is not None else result.total
            return {"terms": cand.detach() * scale}

        candidate, one_run = _timed(candidate_terms)
        shapes = list(spec.feat_shapes)

        def preds_of(h):
            return {"boxes": h["boxes"], "scores": h["scores"], "feat_shapes": shapes}

        preds = {b: preds_of(heads[b]) for b in branches} if spec.end2end else preds_of(heads[None])
        label = names.loss_output(case, "loss")
        targets = {k: batch[k] for k in ("cls", "bboxes", "batch_idx")}
        black_box = _BlackBoxLoss(build_loss(spec.manifest), branches, spec.end2end, preds, targets, candidate)
        place = Place(f"loss {case} (black box)", "loss", {"terms": ref_loss}, candidate, black_box.run,
                      lambda n: profile.for_name(label), config=self.branch_loss(branches[0]).config,
                      batch_size=spec.batch_size, budget=budget, one_run_seconds=one_run,
                      names_shown={"terms": f"{label} (box, cls, dfl)"}, cost=black_box.cost)
        black_box.place = place
        return place


# Stage outputs that are masks and indices: judged bitwise whatever the profile.
_EXACT_STAGE_OUTPUTS = ("mask_in_gts", "mask_pos", "fg_mask", "target_gt_idx", "target_labels")


def _timed(produce: Callable[[], dict]) -> tuple[dict, float]:
    """The candidate's outputs at a place ({"error": text} when it raises) and the seconds the run took."""
    started = time.perf_counter()
    try:
        candidate = produce()
    except Exception as error:  # noqa: BLE001 - whatever a port raises is the candidate's output here
        candidate = {"error": _error_text(error)}
    return candidate, time.perf_counter() - started


def _stage_feed(stage: str, inputs: dict) -> dict:
    """A stage's inputs for one run; the assigner gets fresh leaves that carry a gradient (whether its outputs
    keep carrying one is part of what is compared)."""
    fed = dict(inputs)
    if stage == "assign":
        for key in ("scores", "pred_bboxes"):
            if fed[key].is_floating_point():
                fed[key] = fed[key].detach().clone().requires_grad_(True)
    return fed


def _grad_carriers(stage: str, outputs: dict, assigner_inputs) -> dict:
    """At the assigner: the outputs (other than its inputs passed through) that still carry a gradient."""
    if stage != "assign":
        return {}
    carrying = sorted(k for k, v in outputs.items() if isinstance(v, torch.Tensor) and v.requires_grad
                      and k not in assigner_inputs)
    return {"carries-grad": ",".join(carrying)}


class _BlackBoxLoss:
    """The built-in loss of one case with a cause applied. Only the stages from the first one the cause
    replaces are run again; the earlier ones are the clean run's."""

    def __init__(self, clean, branches: list, end2end: bool, preds, targets, candidate: dict):
        self.clean = clean
        self.branches = branches
        self.end2end = end2end
        self.preds = preds
        self.targets = targets
        self.candidate = candidate
        self.place: Place | None = None   # the place this runs (a cause's fit reads it to price a trial)
        with torch.no_grad():
            self.cached = clean.run(preds, targets).tensors

    def run(self, cause: Cause, params: dict) -> dict[str, Any]:
        from parity.reimpl.loss import STAGES

        clean = self.clean
        loss = copy.copy(clean)
        parts = [(b, copy.copy(clean.branch(b))) for b in self.branches] if self.end2end else [(None, loss)]
        start = len(STAGES)
        for branch, part in parts:
            if branch:
                setattr(loss, branch, part)
            cause.transform(part, **params)
            start = min(start, _first_replaced_stage(part, clean.branch(branch) if branch else clean))
        reuse = {k: v for k, v in self.cached.items() if not k.startswith("output.")
                 and STAGES.index(k.split(".")[-2]) < start}
        value = loss.run(self.preds, self.targets, reuse=reuse).loss.detach()
        candidate = self.candidate
        return {"terms": value if "terms" not in candidate or value.shape == candidate["terms"].shape
                else value.sum()}

    def cost(self, cause: Cause) -> float:
        """One trial in runs of the whole loss: the assigner is most of a loss evaluation; the stages after it
        are a small part of one."""
        from parity.reimpl.loss import STAGES

        if cause.transform is None:
            return 1.0
        first = self.clean.branch(self.branches[0]) if self.end2end else self.clean
        probe = copy.copy(first)
        try:
            params = (cause.fit(self.place) if cause.fit else list(cause.params)) or [{}]
            cause.transform(probe, **params[0])
        except Exception:  # noqa: BLE001
            return 1.0
        start = STAGES[min(_first_replaced_stage(probe, first), len(STAGES) - 1)]
        return 1.0 if STAGES.index(start) <= STAGES.index("assign") else \
            0.25 if start in ("normalize", "classify", "box") else 0.05


_METHOD_STAGE = {"assigner_inputs": "assign", "assigner": "assign"}


def _first_replaced_stage(loss, clean) -> int:
    """Index (in STAGES) of the first stage a transform replaced on `loss` (a changed config acts on assign)."""
    from parity.reimpl.loss import STAGES

    replaced = [_METHOD_STAGE.get(name, name) for name in vars(loss) if name in STAGES or name in _METHOD_STAGE]
    if loss.config != clean.config:
        replaced.append("assign")
    return min((STAGES.index(s) for s in replaced), default=len(STAGES))


def _divergent_stages(report: Report) -> list[tuple[str, str, str | None]]:
    """(case, stage, branch) of every failing loss stage row, first case per stage and branch."""
    seen, out = set(), []
    for row in report.rows:
        if row.passed or not row.section.startswith("loss/") or " " in row.section:
            continue
        case = row.section.split("/", 1)[1]
        text = row.where.split(" (")[0].split()
        stage, branch = text[-1], (text[0] if len(text) > 1 else None)
        if (stage, branch) not in seen:
            seen.add((stage, branch))
            out.append((case, stage, branch))
    return out


def _black_box_cases(report: Report) -> list[str]:
    out = []
    for row in report.rows:
        if not row.passed and row.section.startswith("loss/") and row.section.endswith(" end-to-end"):
            case = row.section.split("/", 1)[1].rsplit(" ", 1)[0]
            if case not in out:
                out.append(case)
    return out


def _black_box_terms_finding(place: Place, finding: Finding) -> None:
    """Word a black-box explanation per term: "box term equals ultralytics' with topk=13"."""
    if finding.signature == "unexplained" or "terms" not in place.candidate:
        return
    ref, cand = place.reference["terms"], place.candidate["terms"]
    if ref.shape != cand.shape or ref.numel() != 3:
        return
    wrong = [t for i, t in enumerate(names.LOSS_TERMS) if not _matches(ref[i:i + 1], cand[i:i + 1],
                                                                      place.tolerance("terms"))]
    setting = finding.evidence.get("described") or f"`{finding.evidence.get('cause')}`"
    if wrong:
        finding.message = (f"{' and '.join(wrong)} term{'s' if len(wrong) > 1 else ''} "
                           f"equal{'' if len(wrong) > 1 else 's'} ultralytics' with {setting}; " + finding.message)


# ---------------------------------------------------------------------------------------------- entry
def _split(inject: str | None) -> tuple[str | None, str | None]:
    if not inject:
        return None, None
    plants = all_injections()
    if inject not in plants:
        raise ParityError(f"unknown injection {inject!r}; known: {', '.join(sorted(plants))}")
    if plants[inject].kind == "loss":
        return None, inject
    loss_half = inject + "-loss" if inject + "-loss" in plants and plants[inject + "-loss"].kind == "loss" else None
    return inject, loss_half


# The layer replay reports structure checks, and the bias init apart from them (its own section).
_STRUCTURE_SECTIONS = ("structure", "bias init")


def explain_report(report: Report, reference, config: ExplainConfig | None = None) -> list[Finding]:
    """Append counterfactual findings to a divergent `report` (see the module docstring); returns them.
    A passing report is returned untouched."""
    if report.verdict == "parity":
        return []
    config = config or ExplainConfig()
    profile = get_profile(config.profile or profile_for_environment(reference.manifest.get("environment"),
                                                                   reference.config.get("precision")))
    before = len(report.findings)
    model_inject, loss_inject = _split(config.inject)
    # Release causes first: a port that follows an older release is named as that release, not as a look-alike bug.
    causes = sorted(all_causes().values(), key=lambda c: c.release is None)
    context = report.context.setdefault("explainer", {"not_explained": []})
    _explain_model_places(report, reference, config, profile, causes, context, model_inject, before)
    _explain_loss_places(report, reference, config, profile, causes, context, loss_inject)
    return report.findings[before:]


def _explain_model_places(report: Report, reference, config: ExplainConfig, profile: Profile, causes: list[Cause],
                          context: dict, model_inject: str | None, before: int) -> None:
    """The structure checks, the first divergent layer (unless a structure explanation already named it) and
    every layer the chained run flags as miswired. `before`: the report's findings before the explainer ran."""
    first = (report.context.get("first_divergent_layer") or {})
    wiring = [f.evidence.get("layer") for f in report.findings if f.signature == "layer-wiring"]
    structure_failing = any(r.section in _STRUCTURE_SECTIONS and not r.passed for r in report.rows)
    # isolated mode's first divergent layer; with chained mode only, its first one, run here in isolation
    first_layer = first.get("isolated") if "isolated" in first else first.get("chained")
    if first_layer is None and not wiring and not structure_failing:
        return
    side = _guarded(context, "layers: no built-in reference computation", _ModelSide, reference, config,
                    model_inject)
    if side is None:
        return
    if structure_failing:
        _guarded(context, "structure", _explain_structure, report, reference, side)
    explained = {f.where.split(" (")[0] for f in report.findings[before:] if f.signature != "unexplained"}
    index = first_layer
    # A dump's isolated.act.* are its outputs on the reference's inputs: causes are tested against them
    # with no port code.
    runnable = side.candidate.live or side.candidate.has_isolated_outputs()
    if index is not None and runnable and f"layer {index}" not in explained:
        place = _guarded(context, f"layer {index}", side.place, index, profile, config.budget)
        if place is not None:
            _explain_layer(report, context, side, index, place, causes)
    for index in wiring:
        place = _guarded(context, f"layer {index} wiring", side.wiring_place, index, profile, config.budget)
        if place is not None:
            _guarded(context, f"layer {index} wiring", _explain_place, report, place, [_wiring_cause()])


def _explain_loss_places(report: Report, reference, config: ExplainConfig, profile: Profile, causes: list[Cause],
                         context: dict, loss_inject: str | None) -> None:
    """Each divergent loss stage; a loss that exposes no stage, as a black box (its first divergent case)."""
    stages = _divergent_stages(report)
    black_box = _black_box_cases(report)
    if not stages and not black_box:
        return
    if _is_dump(config.candidate) and not config.loss_candidate:
        context["not_explained"].append("loss: a candidate dump's recorded stages are not re-run")
        return
    loss_side = _guarded(context, "loss", _LossSide, reference, config, loss_inject)
    if loss_side is None:
        return
    exposed = set(loss_side.adapter.exposed(None)) | {s for b in loss_side.spec.branches
                                                       for s in loss_side.adapter.exposed(b)}
    for case, stage, branch in stages:
        where = f"loss {case} {stage}"
        place = _guarded(context, where, loss_side.stage_place, case, stage, branch, profile, config.budget)
        if place is not None:
            _guarded(context, where, _explain_place, report, place, causes)
    if not exposed and black_box:
        where = f"loss {black_box[0]} (black box)"
        place = _guarded(context, where, loss_side.black_box_place, black_box[0], profile, config.budget)
        if place is not None:
            finding = _guarded(context, where, _explain_place, report, place, causes)
            if finding is not None:
                _black_box_terms_finding(place, finding)


def _is_dump(candidate: Any) -> bool:
    from pathlib import Path

    from parity.replay.candidates import DumpCandidate

    if isinstance(candidate, DumpCandidate):
        return True
    return isinstance(candidate, (str, Path)) and (Path(str(candidate)) / "manifest.json").exists()
