"""A candidate loss from what the user named: `builtin` (the clean-room loss, optionally with a planted cause),
`package.module:factory` (called with what its parameters ask for from the spec), an adapter, or a callable."""

from __future__ import annotations

import inspect
from dataclasses import replace
from typing import Any, Callable, Mapping, Sequence

from parity.errors import ParityError
from parity.reimpl.loss import STAGE_INPUTS, build_loss
from parity.replay.factories import call_factory, factory_parameters, required_positionals
from parity.replay.loss.adapter import LossAdapter
from parity.replay.loss.spec import LossSpec


def builtin_loss_adapter(spec: LossSpec, inject: str | None = None) -> LossAdapter:
    """The clean-room loss (`parity.reimpl.loss`), every stage exposed; `inject` plants a known cause
    (`parity.causes`) into it from outside."""
    try:
        loss = build_loss(spec.manifest)
        if inject:
            from parity.causes import plant_loss

            plant_loss(loss, inject)
    except KeyError as error:
        raise ParityError(str(error).strip("'\"")) from None
    except ValueError as error:
        raise ParityError(str(error)) from None
    if spec.end2end:
        stages = {b: {s: loss.branch(b).stage(s) for s in STAGE_INPUTS if s != "output"} for b in spec.branches}
    else:
        stages = {s: loss.stage(s) for s in STAGE_INPUTS}
    return LossAdapter(loss.run, predictions="dict", stages=stages,
                       name="builtin" + (f" (inject {inject})" if inject else ""))


def load_loss_candidate(candidate: Any, spec: LossSpec, *, inject: str | None = None) -> LossAdapter:
    """`builtin`, `package.module:factory` (factory(spec) or factory(nc=..., reg_max=..., strides=...)),
    a LossAdapter, or a plain callable loss."""
    if isinstance(candidate, LossAdapter):
        return candidate
    if candidate is None or candidate == "builtin":
        return builtin_loss_adapter(spec, inject)
    if inject:
        raise ParityError("--inject plants a bug in the built-in candidate; it cannot be combined with a user loss")
    if isinstance(candidate, str):
        factory, module = _import(candidate)
        made = _call_factory(factory, spec, candidate)
        options = getattr(module, "LOSS_ADAPTER", None) or {}
        adapter = _as_adapter(made, options, candidate)
        if adapter.with_gains is None and _takes_gains(factory):
            adapter.with_gains = _rebuild_with_gains(factory, spec, options, candidate)
        return adapter
    if callable(candidate):
        return _as_adapter(candidate, {}, getattr(candidate, "__name__", type(candidate).__name__))
    raise ParityError(f"loss candidate {candidate!r}: expected 'builtin', 'package.module:factory' or a LossAdapter")


def _import(spec: str):
    from parity.replay.candidates import import_factory

    return import_factory(spec, "loss candidate", "'builtin' or 'package.module:factory'")


# Factory parameters filled from the reference: the spec itself, or these of its fields (gains by term name).
FACTORY_PARAMETERS = ("nc", "reg_max", "strides", "hyperparameters", "end2end", "gains", "box", "cls", "dfl")
GAIN_PARAMETERS = ("spec", "hyperparameters", "gains", "box", "cls", "dfl")


def _takes_gains(factory: Callable) -> bool:
    params = factory_parameters(factory)
    return any(p in params for p in GAIN_PARAMETERS) or (not any(k in params for k in FACTORY_PARAMETERS)
                                                         and len(required_positionals(params)) == 1)


def _call_factory(factory: Callable, spec: LossSpec, label: str) -> Any:
    """The factory called with what it names: `spec`, or the spec's fields by name, or the spec by position when
    it takes one argument and names none of them."""
    params = factory_parameters(factory)
    values = {"nc": spec.nc, "reg_max": spec.reg_max, "strides": spec.strides, "end2end": spec.end2end,
              "hyperparameters": spec.hyperparameters, "gains": spec.gains, "box": spec.gains[0],
              "cls": spec.gains[1], "dfl": spec.gains[2]}
    kwargs = {k: values[k] for k in FACTORY_PARAMETERS if k in params}
    label = f"loss candidate {label}"
    if "spec" in params:
        return call_factory(factory, label, spec=spec, **kwargs)
    if kwargs:
        return call_factory(factory, label, **kwargs)
    return call_factory(factory, label, spec) if required_positionals(params) else call_factory(factory, label)


def _rebuild_with_gains(factory: Callable, spec: LossSpec, options: Mapping, label: str) -> Callable:
    """gains -> the candidate's loss built by its own factory with those gains (spec, hyperparameters and the
    manifest's hyperparameters all carry them)."""
    def build(gains: Sequence[float]) -> Callable:
        box, cls, dfl = (float(g) for g in gains)
        hyp = {**spec.hyperparameters, "box": box, "cls": cls, "dfl": dfl}
        manifest = {**spec.manifest, "hyperparameters": {**(spec.manifest.get("hyperparameters") or {}), **hyp}}
        other = replace(spec, hyperparameters=hyp, config=replace(spec.config, box=box, cls=cls, dfl=dfl),
                        manifest=manifest)
        return _as_adapter(_call_factory(factory, other, label), options, label).loss

    return build


ADAPTER_OPTIONS = tuple(p for p in inspect.signature(LossAdapter.__init__).parameters if p not in ("self", "loss"))


def _as_adapter(made: Any, options: Mapping, label: str) -> LossAdapter:
    if isinstance(made, LossAdapter):
        if made.name in (None, "", "function"):
            made.name = label
        return made
    options = {**dict(options), **dict(getattr(made, "loss_adapter", None) or {})}
    if not callable(made):
        raise ParityError(f"loss candidate {label}: the factory returned {type(made).__name__}, not a callable loss")
    unknown = [k for k in options if k not in ADAPTER_OPTIONS]
    if unknown:
        raise ParityError(f"loss candidate {label}: unknown adapter option(s) {', '.join(map(repr, unknown))} in "
                          f"LOSS_ADAPTER / loss_adapter; options: {', '.join(ADAPTER_OPTIONS)}")
    options = dict(options)
    return LossAdapter(made, name=options.pop("name", label), **options)
