"""Tensor comparison: metrics (`parity.compare.metrics`) under tolerance profiles (`parity.compare.tolerances`)."""

from parity.compare.metrics import TensorMetrics, compare_tensors
from parity.compare.tolerances import PROFILES, Profile, Tolerance, get_profile

__all__ = ["PROFILES", "Profile", "TensorMetrics", "Tolerance", "compare_tensors", "get_profile"]


class _CallablePackage(type(__import__("sys"))):
    """`parity.compare` names both this package and the public function `compare`: once the package is imported
    it shadows the function on `parity`, so calling the package calls the function. The function is looked up
    in the package facade's table of public names (`parity.public`), so this room never names a higher one."""

    def __call__(self, *args, **kwargs):
        from parity import public

        return public("compare")(*args, **kwargs)


__import__("sys").modules[__name__].__class__ = _CallablePackage
