"""The user's port, as these tests see it: a model factory and a loss factory.

In a real project this module is your own code (a PyTorch rewrite, a wrapper around a C++/LibTorch build, a
modified loss). Here yolo-parity's built-in re-implementation stands in for it, built from the same yaml as
the reference, so the three tests pass; plant a bug in it (or swap in your own model) and they say where.
"""

from __future__ import annotations


def build_model(model: str, nc: int):
    """`parity` calls a factory with the reference's model yaml and class count (docs/porting-protocol.md)."""
    from parity.reimpl.model import build_detector

    return build_detector(model, nc=nc)


def build_loss(spec):
    """A loss factory receives the reference's `LossSpec` (docs/loss-adapter.md)."""
    from parity.replay.loss import builtin_loss_adapter

    return builtin_loss_adapter(spec)
