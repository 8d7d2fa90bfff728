"""Known causes of divergence: one registry (`registry`), the transforms behind it (`model_causes`,
`loss_causes`, `releases`) and planting into the built-in (`plant`). The counterfactual explainer, which applies
each cause to the reference computation at a divergent place, is a diagnosis: `parity.diagnose.explain`.
docs/causes.md lists every cause."""

from parity.causes.registry import (CAUSES, INJECTIONS, REGISTRY, Cause, Plant, all_causes, all_injections, cause,
                                    get)
from parity.causes import loss_causes, model_causes, releases  # noqa: E402,F401 - the entries register on import
from parity.causes.plant import plant_detector, plant_loss, planted_detector, planted_loss  # noqa: E402

__all__ = ["CAUSES", "INJECTIONS", "REGISTRY", "Cause", "Plant", "all_causes", "all_injections", "cause", "get",
           "plant_detector", "plant_loss", "planted_detector", "planted_loss"]
