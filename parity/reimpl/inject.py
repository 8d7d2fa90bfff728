"""Known bugs that can be injected into the built-in re-implementation, to show what the tool reports for them.

The registry is shared: model-side bugs are registered here, loss-side bugs in `parity.reimpl.loss_inject`
(which calls `register(..., kind="loss", ...)`). Each entry is a name, a one-line description and hooks:

    model-side:  configure(tweaks: ModelTweaks) -> None     changes how `build_detector` builds the model
    loss-side:   whatever hooks the loss re-implementation looks up (`get(name).hooks[...]`)

`INJECTIONS` is the plain name -> description view (for `--inject` help and listings).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

__all__ = ["INJECTIONS", "Injection", "REGISTRY", "all_injections", "apply_model_injection", "get", "register"]


@dataclass(frozen=True)
class Injection:
    name: str
    description: str
    kind: str = "model"                       # "model" or "loss"
    hooks: dict[str, Callable] = field(default_factory=dict)


REGISTRY: dict[str, Injection] = {}
INJECTIONS: dict[str, str] = {}               # name -> one-line description


def register(name: str, description: str, kind: str = "model", **hooks: Callable) -> Injection:
    """Add an injected bug. Names are unique across model and loss bugs."""
    if name in REGISTRY:
        raise ValueError(f"injection {name!r} is already registered")
    inj = Injection(name, description, kind, dict(hooks))
    REGISTRY[name] = inj
    INJECTIONS[name] = description
    return inj


def _load_other_registries() -> None:
    # Loss-side bugs live in their own module; importing it registers them. It may not exist yet.
    try:
        from . import loss_inject  # noqa: F401
    except ImportError:
        pass
    from parity import drift  # the as-of-8.3 modes: an older ultralytics release, planted like a bug

    drift.register_injections()


def all_injections() -> dict[str, Injection]:
    _load_other_registries()
    return dict(REGISTRY)


def get(name: str) -> Injection:
    if name not in REGISTRY:
        _load_other_registries()
    if name not in REGISTRY:
        raise KeyError(f"unknown injection {name!r}; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def apply_model_injection(name: str, tweaks) -> None:
    """Apply a bug's model hook to `tweaks` (a `ModelTweaks`). Loss-side bugs leave the model alone."""
    inj = get(name)
    hook = inj.hooks.get("configure") if inj.kind == "model" else None
    if hook is not None:
        hook(tweaks)


# ---- model-side bugs ---------------------------------------------------------------------------------------------

def _set(attr: str, value) -> Callable:
    def configure(tweaks) -> None:
        setattr(tweaks, attr, value)
    return configure


def _bn_eps_layer4(tweaks) -> None:
    tweaks.bn_eps[4] = 1e-5


register("bias-init-float32",
         "Detect class bias log(5/nc/(640/stride)^2) computed entirely in float32 (one ULP off at e.g. nc=12)",
         configure=_set("bias_init", "float32"))
register("bias-init-float64",
         "Detect class bias computed entirely in float64, rounded once (one ULP off at e.g. nc=8)",
         configure=_set("bias_init", "float64"))
register("bias-init-skipped",
         "Detect bias_init never called: PyTorch's default uniform conv bias init remains",
         configure=_set("bias_init", "skipped"))
register("bias-init-int-division",
         "Detect class bias with C-style integer division 5 / nc: 0 for nc > 5, log(0) = -inf",
         configure=_set("bias_init", "int-division"))
register("concat-channels",
         "the first neck Concat appends an extra copy of its last input; the next layer is built wider for it",
         configure=_set("duplicate_concat", "first-neck"))
register("upsample-bilinear",
         "Upsample layers use bilinear interpolation instead of nearest",
         configure=_set("upsample_mode", "bilinear"))
register("bn-eps",
         "every BatchNorm of layer 4 uses PyTorch's default eps 1e-5 instead of ultralytics' 1e-3",
         configure=_bn_eps_layer4)
