"""The one JSON sanitiser: what the tool writes is strict JSON (RFC 8259), which C++, Jittor and browser readers
parse without Python's NaN/Infinity extension.

Non-finite floats become the strings "nan", "inf" and "-inf"; tuples become lists; a one-element tensor
becomes its value; anything else that is not JSON becomes its `str`."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any


def plain(value: Any) -> Any:
    """`value` as strict-JSON-ready Python objects (dict keys as strings)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "numel", lambda: 2)() == 1:
        return plain(value.item())  # a one-element tensor that slipped into evidence
    if isinstance(value, (str, int, bool)) or value is None or isinstance(value, float):
        return value
    return str(value)


def dumps(value: Any, **options: Any) -> str:
    """Strict JSON text of `value` (after `plain`); raises if anything non-finite were left."""
    return json.dumps(plain(value), allow_nan=False, **options)
