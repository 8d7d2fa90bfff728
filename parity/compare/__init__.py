"""Tensor comparison: metrics (`parity.compare.metrics`) under tolerance profiles (`parity.compare.tolerances`)."""

from parity.compare.metrics import TensorMetrics, compare_tensors
from parity.compare.tolerances import PROFILES, Profile, Tolerance, get_profile

__all__ = ["PROFILES", "Profile", "TensorMetrics", "Tolerance", "compare_tensors", "get_profile"]
