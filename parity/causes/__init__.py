"""Known causes of divergence: one registry (`registry`), the transforms behind it (`model_causes`,
`loss_causes`, `releases`), planting into the built-in (`plant`), and the counterfactual explainer
(`explain`), which applies each cause to the reference computation at a divergent place and names the one
that turns the reference into the candidate. docs/causes.md lists every cause."""

from parity.causes.registry import (CAUSES, INJECTIONS, REGISTRY, Cause, Plant, all_causes, all_injections, cause,
                                    get)
from parity.causes import loss_causes, model_causes, releases  # noqa: E402,F401 - the entries register on import
from parity.causes.plant import plant_detector, plant_loss  # noqa: E402

__all__ = ["CAUSES", "INJECTIONS", "REGISTRY", "Cause", "ExplainConfig", "Plant", "all_causes", "all_injections",
           "cause", "explain_report", "get", "plant_detector", "plant_loss"]


def __getattr__(name):
    # The explainer pulls in the replays; load it only when asked for.
    if name in ("ExplainConfig", "explain_report"):
        from parity.causes import explain

        return getattr(explain, name)
    raise AttributeError(name)
