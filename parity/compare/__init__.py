"""Tensor comparison: metrics (`parity.compare.metrics`) under tolerance profiles (`parity.compare.tolerances`)."""

from parity.compare.metrics import TensorMetrics, compare_tensors
from parity.compare.tolerances import PROFILES, Profile, Tolerance, get_profile

__all__ = ["PROFILES", "Profile", "TensorMetrics", "Tolerance", "compare_tensors", "get_profile"]


class _CallablePackage(type(__import__("sys"))):
    """`parity.compare` names both this package and the public function `parity.api.compare`: once the package
    is imported it shadows the function on `parity`, so calling the package calls the function."""

    def __call__(self, *args, **kwargs):
        from parity.api import compare

        return compare(*args, **kwargs)


__import__("sys").modules[__name__].__class__ = _CallablePackage
