"""Compare a candidate's training steps with ultralytics' and name the first thing that differs.

Quantities are judged in the order a step computes them, setup first:

    setup     optimizer class and group settings (nesterov, betas, eps), which parameter is in which group
    per step  weight_decay, lr, momentum, stepped, loss, loss_sum, grad_norm, grad_norm_clipped,
              optimizer state, weights, ema_decay, EMA weights

The first (step, quantity) outside tolerance is diagnosed with one signature and one sentence of evidence;
what differs after it is reported as rows only (it follows from the first difference). Tolerances: the
float64 hyperparameters (lr, momentum, weight decay, EMA decay) at rtol 1e-12, since a hand-written linear
interpolation can differ from numpy's in the last bit; `stepped` exactly; the loss under the profile's
chained-loss tolerance; gradient norms, optimizer state, weights and EMA under its chained-gradient tolerance
(docs/training.md: why, and what was measured).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from parity.compare.metrics import compare_tensors
from parity.compare.tolerances import Profile, Tolerance
from parity.findings import Finding, Report, Row

HYPER_TOLERANCE = Tolerance(1e-15, 1e-12, source="float64 hyperparameters: last-bit differences of an interpolation")
ORDER = ("weight_decay", "lr", "momentum", "stepped", "loss", "loss_sum", "grad_norm", "grad_norm_clipped",
         "optim", "weights", "ema_decay", "ema")
TENSOR_FAMILIES = ("optim", "weights", "ema")
SETTINGS_COMPARED = ("nesterov", "betas", "eps", "dampening", "amsgrad")


@dataclass
class GroupAlignment:
    """Candidate group index for every reference group, and the parameters found in another group."""

    cand_index: list[int | None]
    misplaced: list[tuple[str, str, str]]  # (parameter, reference group, candidate group)


def align_groups(ref_groups: list[dict], cand_groups: list[dict]) -> GroupAlignment:
    cand_group_of = {p: i for i, g in enumerate(cand_groups) for p in g["params"]}
    index: list[int | None] = []
    for group in ref_groups:
        votes: dict[int, int] = {}
        for p in group["params"]:
            if p in cand_group_of:
                votes[cand_group_of[p]] = votes.get(cand_group_of[p], 0) + 1
        index.append(max(votes, key=votes.get) if votes else None)
    misplaced = []
    for ref_i, group in enumerate(ref_groups):
        for p in group["params"]:
            cand_i = cand_group_of.get(p)
            if cand_i is not None and cand_i != index[ref_i]:
                misplaced.append((p, group["name"], cand_groups[cand_i]["name"]))
    return GroupAlignment(index, misplaced)


class TrainComparison:
    def __init__(self, ref_static: dict, cand_static: dict, profile: Profile, report: Report, mode: str):
        self.ref_static, self.cand_static, self.profile, self.report = ref_static, cand_static, profile, report
        # isolated: each step started from the reference's state, so only that step's arithmetic differs
        self.isolated = mode == "isolated"
        self.ref_groups = ref_static["optimizer"]["param_groups"]
        self.cand_groups = cand_static.get("optimizer", {}).get("param_groups") or []
        self.alignment = align_groups(self.ref_groups, self.cand_groups) if self.cand_groups else None
        self.diagnosed = False

    # ---- the setup
    def compare_setup(self) -> None:
        ref_opt, cand_opt = self.ref_static["optimizer"], self.cand_static.get("optimizer")
        if not cand_opt:
            self.report.add(Row("train/setup", "setup", "optimizer", True, note="not given by the candidate"))
            return
        same_type = ref_opt["type"] == cand_opt["type"]
        self.report.add(Row("train/setup", "setup", "optimizer", same_type,
                            note=f"{cand_opt['type']} (reference {ref_opt['type']})"))
        if not same_type:
            resolved = self.ref_static.get("resolved", {})
            self.diagnose("optimizer-mismatch", "setup", (
                f"the candidate uses {cand_opt['type']}, ultralytics {ref_opt['type']}"
                + (f" (optimizer=auto chose it with lr0 {resolved.get('lr0')}: AdamW for runs of at most 10,000 "
                   f"iterations)" if resolved.get("requested_optimizer") == "auto" else "")),
                candidate=cand_opt["type"], reference=ref_opt["type"])
        self._compare_settings()
        self._compare_membership()

    def _compare_settings(self) -> None:
        for ref_i, group in enumerate(self.ref_groups):
            cand_i = self.alignment.cand_index[ref_i] if self.alignment else None
            if cand_i is None:
                continue
            cand_settings = self.cand_groups[cand_i]["settings"]
            for key in SETTINGS_COMPARED:
                if key not in group["settings"]:
                    continue
                ref_value, cand_value = group["settings"][key], cand_settings.get(key)
                same = cand_value == ref_value
                self.report.add(Row("train/setup", "setup", f"{group['name']}.{key}", same,
                                    note=f"{cand_value} (reference {ref_value})"))
                if not same:
                    self.diagnose("optimizer-mismatch", "setup", (
                        f"{key} is {cand_value} in the candidate's {self.cand_groups[cand_i]['name']} group, "
                        f"{ref_value} in ultralytics' {group['name']} group"), key=key, candidate=cand_value,
                        reference=ref_value)

    def _compare_membership(self) -> None:
        alignment = self.alignment
        missing = [g["name"] for g, i in zip(self.ref_groups, alignment.cand_index) if i is None]
        ok = not alignment.misplaced and not missing and len(self.cand_groups) == len(self.ref_groups)
        note = (f"{len(self.cand_groups)} groups" if ok else
                f"{len(alignment.misplaced)} parameters in another group; candidate groups "
                f"{[g['name'] for g in self.cand_groups]}, reference {[g['name'] for g in self.ref_groups]}")
        self.report.add(Row("train/setup", "setup", "param_groups", ok, note=note))
        if ok:
            return
        if alignment.misplaced:
            param, ref_name, cand_name = alignment.misplaced[0]
            text = (f"{len(alignment.misplaced)} parameters sit in another group than ultralytics puts them, e.g. "
                    f"{param} in '{cand_name}' (ultralytics: '{ref_name}')")
        else:
            text = f"ultralytics' groups {missing} have no counterpart among the candidate's {len(self.cand_groups)}"
        self.diagnose("param-group-mismatch", "setup", text, misplaced=len(alignment.misplaced),
                      example=list(alignment.misplaced[0]) if alignment.misplaced else None)

    # ---- one step
    def compare_step(self, step: int, ref: Mapping[str, torch.Tensor], cand: Mapping[str, torch.Tensor]) -> None:
        for quantity in ORDER:
            if quantity in TENSOR_FAMILIES:
                self._compare_family(step, quantity, ref, cand)
            elif quantity in ref:
                self._compare_scalar(step, quantity, ref, cand)

    def _compare_scalar(self, step: int, quantity: str, ref, cand) -> None:
        where = f"step {step}"
        if quantity not in cand:
            # a quantity the candidate does not report (or, after a step it skipped, cannot have)
            self.report.coverage.setdefault("train_left_out", set()).add(quantity)
            return
        ref_value, cand_value = ref[quantity], cand[quantity]
        if quantity in ("lr", "momentum", "weight_decay"):
            cand_value = self._aligned(cand_value)
            if cand_value is None or cand_value.shape != ref_value.shape:
                self.report.add(Row("train", where, quantity, False, note="group count differs"))
                return
        tolerance = self._tolerance(quantity)
        metrics = compare_tensors(ref_value, cand_value.to(ref_value.dtype), tolerance)
        self.report.add(Row("train", where, quantity, metrics.passed, metrics=metrics.as_dict(),
                            tolerance=tolerance.as_dict(), note=_values(ref_value, cand_value)))
        if not metrics.passed:
            self.explain(step, quantity, ref, cand, ref_value, cand_value)

    def _compare_family(self, step: int, family: str, ref, cand) -> None:
        prefix = family + "."
        ref_names = [k for k in ref if k.startswith(prefix)]
        if not ref_names:
            return
        cand_names = {k for k in cand if k.startswith(prefix)}
        shared = [k for k in ref_names if k in cand_names]
        if not shared:
            self.report.add(Row("train", f"step {step}", family, True, note="not given by the candidate"))
            self.report.coverage.setdefault("train_left_out", set()).add(family)
            return
        tolerance = self.profile.for_kind("grad-isolated" if self.isolated else "grad")
        failed, worst, exact = [], None, True
        for name in shared:
            r, c = ref[name], cand[name]
            if r.shape == c.shape and r.dtype == c.dtype and torch.equal(r, c):
                continue  # the common case on CPU: no metrics needed
            metrics = compare_tensors(r, c, tolerance)
            exact = exact and metrics.exact
            if not metrics.passed:
                failed.append(name)
            if worst is None or (metrics.max_rel or 0) > (worst[1].max_rel or 0):
                worst = (name, metrics)
        if worst is None:
            worst = (shared[0], compare_tensors(ref[shared[0]], cand[shared[0]], tolerance))
        note = ("bitwise equal" if exact else f"worst {worst[0]}: {worst[1].summary()}") + \
            (f"; {len(failed)} of {len(shared)} out of tolerance, first {failed[0]}" if failed else
             f"; {len(shared)} tensors")
        self.report.add(Row("train", f"step {step}", family, not failed, metrics=worst[1].as_dict(),
                            tolerance=tolerance.as_dict(), note=note))
        if failed:
            self.explain_family(step, family, failed, shared)

    def _aligned(self, values: torch.Tensor) -> torch.Tensor | None:
        if self.alignment is None:
            return values
        if any(i is None or i >= values.numel() for i in self.alignment.cand_index):
            return None
        return values[torch.tensor(self.alignment.cand_index)]

    def _tolerance(self, quantity: str) -> Tolerance:
        if quantity in ("lr", "momentum", "weight_decay", "ema_decay"):
            return HYPER_TOLERANCE
        if quantity in ("loss", "loss_sum"):
            return self.profile.for_kind("loss" if self.isolated else "loss-chained")
        if quantity == "stepped":
            return Tolerance(0.0, 0.0, 0, source="exact")
        return self.profile.for_kind("grad-isolated" if self.isolated else "grad")

    # ---- naming the first difference
    def diagnose(self, signature: str, where: str, message: str, **evidence) -> None:
        if self.diagnosed:
            return
        self.diagnosed = True
        self.report.find(Finding(signature, where, message, evidence=evidence))

    def explain(self, step, quantity, ref, cand, ref_value, cand_value) -> None:
        where = f"step {step}"
        names = [g["name"] for g in self.ref_groups]
        differing = [i for i in range(ref_value.numel()) if not _close(ref_value.flatten()[i], cand_value.flatten()[i])]
        if quantity == "weight_decay":
            self._explain_decay(where, names, differing, ref_value, cand_value)
        elif quantity == "lr":
            self._explain_lr(step, where, names, differing, ref_value, cand_value)
        elif quantity == "momentum":
            warm = step <= self.ref_static["warmup_iterations"]
            g = differing[0]
            self.diagnose("warmup-mismatch" if warm else "optimizer-mismatch", where, (
                f"momentum of the {names[g]} group is {_f(cand_value[g])} at step {step}, ultralytics "
                f"{_f(ref_value[g])}" + (f" (warmed from warmup_momentum {self.ref_static['args']['warmup_momentum']} "
                                         f"over {self.ref_static['warmup_iterations']} iterations)" if warm else "")),
                group=names[g], candidate=float(cand_value[g]), reference=float(ref_value[g]))
        elif quantity == "stepped":
            acc = int(ref["accumulate"]) if "accumulate" in ref else None
            did = "stepped the optimizer" if bool(cand_value) else "only accumulated gradients"
            ref_did = "steps" if bool(ref_value) else "accumulates"
            self.diagnose("accumulate-mismatch", where, (
                f"at step {step} the candidate {did}; ultralytics {ref_did} (accumulate {acc}: it steps once "
                f"ni - last_opt_step >= accumulate, ramped from 1 to {self.ref_static['accumulate_nominal']} "
                f"during warmup)"), accumulate=acc)
        elif quantity in ("loss", "loss_sum", "grad_norm"):
            self._explain_scale(step, where, quantity, ref_value, cand_value)
        elif quantity == "grad_norm_clipped":
            limit = self.ref_static["max_grad_norm"]
            c, r = float(cand_value), float(ref_value)
            if c > limit * (1 + 1e-4) >= r:
                self.diagnose("clip-missing", where, (
                    f"the gradient norm at optimizer.step is {c:.4g} at step {step}; ultralytics clips it to "
                    f"max_norm {limit:g} ({r:.4g})"), candidate=c, reference=r)
            else:
                self.diagnose("clip-mismatch", where, f"the clipped gradient norm is {c:.4g} at step {step}, "
                                                      f"ultralytics {r:.4g} (max_norm {limit:g})", candidate=c, reference=r)
        elif quantity == "ema_decay":
            c, r = float(cand_value), float(ref_value)
            updates = int(ref["ema_updates"]) if "ema_updates" in ref else None
            self.diagnose("ema-mismatch", where, (
                f"the EMA decay is {c:.6g} at update {updates}, ultralytics {r:.6g} = 0.9999 * (1 - exp(-updates / "
                f"2000)), a ramp from 0"), candidate=c, reference=r, updates=updates)

    def _explain_decay(self, where, names, differing, ref_value, cand_value) -> None:
        g = differing[0]
        r, c = float(ref_value[g]), float(cand_value[g])
        if r == 0.0:
            self.diagnose("param-group-mismatch", where, (
                f"the {names[g]} group is decayed (weight_decay {c:g}); ultralytics decays only conv and linear "
                f"weights, never BatchNorm weights or biases"), group=names[g], candidate=c)
            return
        a = self.ref_static["args"]
        self.diagnose("weight-decay-scaling", where, (
            f"weight decay of the {names[g]} group is {c:g}, ultralytics {r:g} = weight_decay {a['weight_decay']:g} "
            f"x batch {a['batch']} x accumulate {self.ref_static['accumulate_nominal']} / nbs {a['nbs']}"),
            group=names[g], candidate=c, reference=r, ratio=c / r)

    def _explain_lr(self, step, where, names, differing, ref_value, cand_value) -> None:
        static = self.ref_static
        nw, nb = static["warmup_iterations"], static["batches_per_epoch"]
        epoch = step // nb
        targets = torch.tensor([g["initial_lr"] for g in self.ref_groups], dtype=torch.float64) * \
            _lr_factor(static["args"], epoch)
        values = ", ".join(f"{names[i]} {_f(cand_value[i])} (ultralytics {_f(ref_value[i])})" for i in differing)
        evidence = dict(groups=[names[i] for i in differing], candidate=cand_value.tolist(),
                        reference=ref_value.tolist(), epoch=epoch)
        in_warmup = nw and step <= nw
        if in_warmup and torch.allclose(cand_value, targets, rtol=1e-9, atol=0) and \
                not torch.allclose(ref_value, targets, rtol=1e-9, atol=0):
            self.diagnose("warmup-missing", where, (
                f"lr at step {step} is already the warmup target lr0 x lf(epoch) in every group ({values}); "
                f"ultralytics ramps it over {nw} iterations"), **evidence)
        elif in_warmup and epoch == 0 or (in_warmup and step % nb):
            which = "bias lr (warmup_bias_lr " + f"{static['resolved']['warmup_bias_lr']:g})" \
                if [names[i] for i in differing] == ["bias"] else "lr"
            self.diagnose("warmup-mismatch", where, f"{which} at step {step} during warmup: {values}", **evidence)
        else:
            self.diagnose("lr-schedule-mismatch", where, (
                f"lr moves differently at the start of epoch {epoch} (step {step}): {values}; ultralytics' "
                f"{'cosine' if static['args'].get('cos_lr') else 'linear'} lf({epoch}) = "
                f"{_lr_factor(static['args'], epoch):.6g}"), **evidence)

    def _explain_scale(self, step, where, quantity, ref_value, cand_value) -> None:
        r, c = float(ref_value.double().sum()), float(cand_value.double().sum())
        ratio = c / r if r else float("inf")
        factors = {self.ref_static["args"]["batch"], max(self.ref_static.get("world_size", 1), 1), 2, 4, 8}
        for k in sorted(factors):
            for factor, word in ((k, f"multiplied by {k}"), (1 / k, f"divided by {k}")):
                if k > 1 and math.isclose(ratio, factor, rel_tol=1e-3):
                    self.diagnose("loss-scale", where, (
                        f"{quantity} is {c:.6g} at step {step}, ultralytics {r:.6g}: the loss is {word} (batch "
                        f"size {self.ref_static['args']['batch']}, world size {self.ref_static.get('world_size', 1)})"),
                        candidate=c, reference=r, ratio=ratio)
                    return
        hint = "before any update: compare the forward and the loss (--what layers, --what loss)" if step == 0 else \
            "although the previous steps matched"
        self.diagnose("loss-mismatch" if quantity != "grad_norm" else "gradient-mismatch", where,
                      f"{quantity} is {c:.6g} at step {step}, ultralytics {r:.6g}, {hint}", candidate=c, reference=r)

    def explain_family(self, step: int, family: str, failed: list[str], shared: list[str]) -> None:
        where = f"step {step}"
        buffers_only = all(_is_buffer(n) for n in failed)
        if family == "ema":
            what = ("only the BatchNorm buffers (running mean/var) differ: they are averaged by ultralytics' EMA"
                    if buffers_only else f"{len(failed)} of {len(shared)} EMA tensors differ, first {failed[0]}")
            self.diagnose("ema-mismatch", where, f"EMA weights after step {step}: {what}", first=failed[0])
        elif family == "weights" and buffers_only:
            self.diagnose("batchnorm-stats", where, (
                f"after step {step} only BatchNorm running statistics differ (first {failed[0]}): momentum, or "
                f"statistics synchronised across ranks (ultralytics does not use SyncBatchNorm)"), first=failed[0])
        else:
            self.diagnose("optimizer-mismatch", where, (
                f"{family} after step {step} differ ({len(failed)} of {len(shared)} tensors, first {failed[0]}) while "
                f"lr, momentum, weight decay and the clipped gradients matched: the update rule differs"),
                first=failed[0], family=family)


def _is_buffer(name: str) -> bool:
    return name.endswith(("running_mean", "running_var", "num_batches_tracked")) or ".running_" in name


def _lr_factor(args: dict, epoch: int) -> float:
    """lf(epoch) as ultralytics defines it (for the evidence sentence only)."""
    epochs, lrf = args["epochs"], args["lrf"]
    if args.get("cos_lr"):
        return max((1 - math.cos(epoch * math.pi / epochs)) / 2, 0) * (lrf - 1) + 1
    return max(1 - epoch / epochs, 0) * (1.0 - lrf) + lrf


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = float(a), float(b)
    return abs(a - b) <= 1e-15 + 1e-12 * abs(a)


def _f(value) -> str:
    return f"{float(value):.6g}"


def _values(ref: torch.Tensor, cand: torch.Tensor) -> str:
    if ref.numel() > 4:
        return ""
    return f"{[round(float(v), 8) for v in cand.flatten()]} (reference {[round(float(v), 8) for v in ref.flatten()]})"


def compare_training(ref_steps, cand_steps, *, profile: Profile, reference: str, candidate: str,
                     steps: int | None = None, mode: str = "isolated") -> Report:
    """Report on every step both sides recorded (the first `steps` only, when given); the first divergence is
    named (see the module docstring)."""
    report = Report(command="compare --what train", reference=reference, candidate=candidate, profile=profile.name)
    comparison = TrainComparison(ref_steps.static, cand_steps.static, profile, report, mode)
    report.context["mode"] = mode
    comparison.compare_setup()
    compared = 0
    for step, (ref, cand) in enumerate(zip(ref_steps, cand_steps)):
        if steps is not None and step >= steps:
            break
        comparison.compare_step(step, ref, cand)
        compared += 1
    left_out = sorted(report.coverage.pop("train_left_out", set()))
    report.coverage.update({"steps_reference": len(ref_steps), "steps_candidate": len(cand_steps),
                            "steps_compared": compared, "train_left_out": left_out})
    if len(cand_steps) < min(len(ref_steps), steps or len(ref_steps)):
        report.add(Row("train", f"step {compared}", "steps", False,
                       note=f"the candidate recorded {len(cand_steps)} steps, the reference {len(ref_steps)}"))
    first = report.first_divergence()
    report.context["first_divergence"] = {"where": first.where, "quantity": first.name} if first else None
    report.context["optimizer"] = ref_steps.static["optimizer"]["type"]
    report.context["steps"] = len(ref_steps)
    return report
