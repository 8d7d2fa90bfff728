"""yolo-parity: find where a re-implementation of ultralytics YOLO training departs from ultralytics.

The public API (docs/python-api.md)::

    from parity import assert_parity, compare, dump_reference
    reference = dump_reference("runs/ref", model="yolo11n.yaml", imgsz=320)
    assert_parity(reference, "my_port.model:build")        # raises AssertionError saying where and why

Everything is imported on first use, so `import parity` stays cheap (no torch until a function runs).
"""

__version__ = "0.1.0"

_EXPORTS = {
    "compare": "parity.api", "compare_layers": "parity.api", "compare_loss": "parity.api",
    "dump_reference": "parity.api", "assert_parity": "parity.api", "CompareConfig": "parity.api",
    "ReportFiles": "parity.api", "write_reports": "parity.api",
    "Report": "parity.findings", "Finding": "parity.findings", "Row": "parity.findings",
    "ParityError": "parity.errors", "CaptureConfig": "parity.capture",
}

__all__ = ["__version__", *_EXPORTS]


def public(name: str):
    """The public object `name` (one of `__all__`), imported from the module that defines it."""
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = public(name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'parity' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
