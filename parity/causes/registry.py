"""The one registry of known causes, and of the plants (`--inject NAME`) that put a cause into the built-in.

A `Cause` is a named, documented transform of the clean computation at one kind of place:

    kind "model"   a layer type (`applies_to` holds ultralytics' class names, "*" for any layer); `transform`
                   takes a copy of the clean layer module and the searched parameters and returns the module
                   to run instead (replacing or wrapping it).
    kind "loss"    a loss stage (`applies_to` holds stage names, "loss" for the whole loss); `transform` takes a
                   clean `DetectionLoss` object and the parameters and replaces or wraps its stage methods.
    kind "structure"  a property the harness reads without running anything (Detect bias init, BatchNorm
                   settings, branch widths); `transform` is None and the explainer tests it from the evidence.

`params` are the parameter sets the explainer may try ({name: value} each, in order); a `fit` function may propose values
from the candidate's own output instead (a least-squares scale, a top-k read off the positives per box).
Release-history causes carry `release` and are reported as `version-drift`.

A `Plant` is one cause at fixed parameters and places in the built-in (`apply(detector)` or `apply(loss)`):
the injections of `parity compare --inject NAME`. Tests plant them and the explainer names them, from this
one definition.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

__all__ = ["CAUSES", "Cause", "INJECTIONS", "Plant", "REGISTRY", "all_causes", "all_injections", "cause",
           "get", "plant", "register"]


@dataclass(frozen=True)
class Cause:
    signature: str                       # stable id, used as the finding's signature
    kind: str                            # "model", "loss" or "structure"
    applies_to: tuple[str, ...]          # layer types / loss stages this cause can act on
    explanation: str                     # one sentence: what it means, with the fix
    transform: Callable | None = None
    params: tuple[Mapping[str, Any], ...] = ()   # the parameter sets the explainer tries, in this order
    fit: Callable | None = None          # (place) -> [params, ...] proposed from the candidate's own output
    release: str | None = None           # the ultralytics release that changed this (release-history causes)
    benign: bool = False                 # a difference in rounding only: never reported as a bug

    @property
    def finding(self) -> str:
        return "version-drift" if self.release else self.signature

    def applies(self, place: str) -> bool:
        return "*" in self.applies_to or place in self.applies_to

    def describe_params(self, values: Mapping[str, Any]) -> str:
        """`k=0.01`; a fit may word its parameters itself under `_words`."""
        if values.get("_words"):
            return str(values["_words"])
        return ", ".join(f"{k}={_short(v)}" for k, v in values.items() if not k.startswith("_"))


@dataclass(frozen=True)
class Plant:
    """A cause planted in the built-in at fixed parameters: one `--inject` name."""

    name: str
    cause: str                           # a Cause signature
    description: str                     # one line, for --list-injections
    apply: Callable                      # model: apply(detector); loss: apply(loss object)
    kind: str = "model"                  # which half of the built-in it changes: "model" or "loss"
    stages: tuple[str, ...] = ()         # loss stages it replaces

    @property
    def hooks(self) -> dict[str, Callable]:
        """The stages this plant replaces, by name (the loss's replaceable stage methods)."""
        return {stage: self.apply for stage in self.stages}


CAUSES: dict[str, Cause] = {}
REGISTRY: dict[str, Plant] = {}          # plant name -> Plant
INJECTIONS: dict[str, str] = {}          # plant name -> one-line description


def register(entry: Cause) -> Cause:
    if entry.signature in CAUSES:
        raise ValueError(f"cause {entry.signature!r} is already registered")
    CAUSES[entry.signature] = entry
    return entry


def plant(name: str, cause_signature: str, description: str, apply: Callable, *, kind: str | None = None,
          stages: tuple[str, ...] = ()) -> Plant:
    if name in REGISTRY:
        raise ValueError(f"injection {name!r} is already registered")
    if "\n" in description:
        raise ValueError(f"injection {name!r}: the description is one line")
    owner = CAUSES[cause_signature]
    entry = Plant(name, cause_signature, description, apply, kind or ("loss" if owner.kind == "loss" else "model"),
                  tuple(stages))
    REGISTRY[name] = entry
    INJECTIONS[name] = description
    return entry


# The entries live beside their transforms (model_causes, loss_causes, releases), which import this module to
# register them; the package `parity.causes` imports all three, and Python runs it before any of its modules,
# so by the time anything can call the functions below every entry is registered.
def all_causes() -> dict[str, Cause]:
    return dict(CAUSES)


def cause(signature: str) -> Cause:
    if signature not in CAUSES:
        raise KeyError(f"unknown cause {signature!r}; known: {', '.join(sorted(CAUSES))}")
    return CAUSES[signature]


def all_injections() -> dict[str, Plant]:
    return dict(REGISTRY)


def get(name: str) -> Plant:
    """The plant named `name` (KeyError naming the known ones otherwise)."""
    if name not in REGISTRY:
        raise KeyError(f"unknown injection {name!r}; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_short(v) for v in value) + ")"
    return str(value)
