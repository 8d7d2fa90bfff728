"""What the loss replay saw, for `parity.diagnose.loss` to judge: `LossEvidence` of every case, `CaseEvidence`
of one, `StageEvidence` of one candidate stage fed the reference's inputs (or of the whole candidate run), and
`BroadcastWatch`, the torch-function mode candidate code runs under to see element-wise operations whose
operands broadcast against each other."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

# Element-wise binary operations whose operands broadcast (names as torch reports them to a function mode).
_ELEMENTWISE = {
    "mul", "add", "sub", "div", "true_divide", "rsub", "pow", "minimum", "maximum", "where", "atan2",
    "__mul__", "__rmul__", "__add__", "__radd__", "__sub__", "__rsub__", "__truediv__", "__rtruediv__", "__pow__",
    "__imul__", "__iadd__", "__isub__", "__itruediv__", "mul_", "add_", "sub_", "div_",
    "eq", "ne", "gt", "lt", "ge", "le", "__eq__", "__ne__", "__gt__", "__lt__", "__ge__", "__le__",
    "__and__", "__or__", "__iand__", "__ior__", "logical_and", "logical_or",
    "binary_cross_entropy_with_logits", "l1_loss", "mse_loss", "smooth_l1_loss",
}
# The message torch raises when two shapes cannot broadcast.
BROADCAST_ERROR = re.compile(r"size of tensor a \((\d+)\) must match the size of tensor b \((\d+)\) "
                              r"at non-singleton dimension (\d+)")


# ------------------------------------------------------------------------------------------ broadcasting
@dataclass
class BroadcastEvent:
    op: str
    shapes: list[list[int]]
    result: list[int] | None
    kind: str  # "outer": a vector broadcast against itself into a square; "error": broadcasting failed
    message: str = ""

    def describe(self) -> str:
        a, b = (tuple(s) for s in self.shapes[:2])
        if self.kind == "error":
            return f"{self.op} of {a} with {b} failed to broadcast"
        return f"{self.op} of {a} with {b} broadcast to {tuple(self.result or [])}"


class BroadcastWatch(TorchFunctionMode):
    """Records element-wise operations whose two tensor operands broadcast against EACH OTHER along axes of the
    same size (`(n, 1) * (n,) -> (n, n)`: a per-item vector meeting itself), and those that fail to broadcast.

    Broadcasting different sizes against each other (`(M, 1)` against `(A,)`: all pairs of boxes and anchors)
    is how pairwise code is written and is not recorded. Values are never changed.
    """

    def __init__(self):
        super().__init__()
        self.events: list[BroadcastEvent] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        operands = [a for a in args if isinstance(a, torch.Tensor)][:2] if name in _ELEMENTWISE else []
        try:
            result = func(*args, **kwargs)
        except RuntimeError as error:
            if len(operands) == 2 and BROADCAST_ERROR.search(str(error)):
                self.events.append(BroadcastEvent(name, [list(o.shape) for o in operands], None, "error", str(error)))
            raise
        if len(operands) == 2 and isinstance(result, torch.Tensor) and _self_outer(*operands):
            self.events.append(BroadcastEvent(name, [list(o.shape) for o in operands], list(result.shape), "outer"))
        return result


def _self_outer(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when a and b each stretch over an axis where the other holds the same size n > 1."""
    rank = max(a.dim(), b.dim())
    sa = [1] * (rank - a.dim()) + list(a.shape)
    sb = [1] * (rank - b.dim()) + list(b.shape)
    stretched_a = {sb[i] for i in range(rank) if sa[i] == 1 and sb[i] > 1}
    stretched_b = {sa[i] for i in range(rank) if sb[i] == 1 and sa[i] > 1}
    return bool(stretched_a & stretched_b)


# --------------------------------------------------------------------------------------------- evidence
@dataclass
class StageEvidence:
    """One candidate stage fed the reference's inputs (or the whole candidate run, stage "end-to-end")."""

    case: str
    branch: str | None
    stage: str
    reference: dict[str, torch.Tensor] = field(default_factory=dict)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)
    error: str | None = None
    broadcasts: list[BroadcastEvent] = field(default_factory=list)
    carries_grad: list[str] = field(default_factory=list)  # outputs that should be constants but carry grad
    exception: dict | None = None  # candidate code raised: {"call", "type", "message", "at"} (file:line)
    mutated: list[str] = field(default_factory=list)  # inputs the candidate changed in place

    @property
    def label(self) -> str:
        return f"{self.branch} {self.stage}" if self.branch else self.stage


@dataclass
class CaseEvidence:
    case: str
    batch_size: int
    stages: list[StageEvidence] = field(default_factory=list)  # conditioned stage replays
    run: dict[str | None, StageEvidence] = field(default_factory=dict)  # end-to-end intermediates per branch
    run_error: str | None = None
    run_exception: dict | None = None  # the whole candidate loss raised: {"call", "type", "message", "at"}
    run_broadcasts: list[BroadcastEvent] = field(default_factory=list)
    ref_loss: torch.Tensor | None = None
    cand_loss: torch.Tensor | None = None  # in the reference's convention (x B for a declared per-image mean)
    values_passed: bool | None = None  # every end-to-end loss value within tolerance
    grads_passed: bool | None = None  # every end-to-end gradient within tolerance
    conditioned_grads_passed: bool | None = None
    grad_failures: list[str] = field(default_factory=list)
    positive_logits_finite: bool | None = None  # probe: the candidate's non-finite loss turns finite on |logits|


@dataclass
class LossEvidence:
    cases: list[CaseEvidence] = field(default_factory=list)
    gains: tuple[float, float, float] = (7.5, 0.5, 1.5)
    batch_scaled: bool = True
    tolerance: Any = None  # the loss Tolerance: closeness for "equals" in the diagnosis's checks
