"""The manifest's JSON Schema (draft 2020-12), and the check every `Dump` makes when it is opened.

`MANIFEST_SCHEMA` is the one definition; docs/schemas/manifest.schema.json is the same document written out for
ports in other languages (C++, Jittor) to validate their manifests with any JSON Schema validator
(tests/test_dump_schema.py keeps the two equal). It constrains what readers rely on: the sections' types, every
tensor entry's `file`, `dtype` and `shape`, the checksums' spelling, the layer rows' fields. Sections the readers
do not interpret (`environment`, `config`, `init`, `producer`, ...) are objects of any content.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import xxhash

from parity.dump.header import DTYPES
from parity.errors import DumpError

SCHEMA = "yolo-parity-dump"
SCHEMA_VERSION = 1

_COUNT = {"type": "integer", "minimum": 0}
_OBJECT = {"type": "object"}
# A section the writer leaves null when it was not captured (gradients=False, no CUDA facts, no training steps).
_SECTION = {"type": ["object", "null"]}

MANIFEST_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "urn:yolo-parity:dump-manifest:1",
    "title": "yolo-parity dump manifest, schema version 1",
    "description": "manifest.json of a yolo-parity dump (docs/dump-format.md). Required of every dump: schema "
                   "and schema_version; a candidate also writes kind and its tensors index.",
    "type": "object",
    "required": ["schema", "schema_version"],
    "properties": {
        "schema": {"const": SCHEMA},
        "schema_version": {"const": SCHEMA_VERSION},
        "kind": {"enum": ["reference", "candidate"]},
        "stats_only": {"type": "boolean"},
        "versions": {"type": "object", "additionalProperties": {"type": ["string", "null"]}},
        "environment": _SECTION,
        "config": _OBJECT,
        "init": _OBJECT,
        "hyperparameters": {
            "type": "object",
            "properties": {"small_box_floor_px": {"type": ["number", "null"]},
                           "small_box_threshold_px": {"type": ["number", "null"]}},
        },
        "model": {"$ref": "#/$defs/model"},
        "batch": _OBJECT,
        "loss": {"$ref": "#/$defs/loss"},
        "gradients": _SECTION,
        "train": _SECTION,
        "tensors": {"type": "object", "additionalProperties": {"$ref": "#/$defs/tensor"}},
    },
    "$defs": {
        "shape": {"type": "array", "items": _COUNT},
        "tensor": {
            "description": "Where a tensor is and what it is. file is null in a statistics-only dump.",
            "type": "object",
            "required": ["file", "shape"],
            "properties": {
                "file": {"type": ["string", "null"]},
                "dtype": {"enum": sorted(DTYPES)},
                "shape": {"$ref": "#/$defs/shape"},
                "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                "xxh3_128": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
                "stats": {"$ref": "#/$defs/stats"},
            },
        },
        "stats": {
            "type": "object",
            "required": ["nan", "inf", "min", "max", "mean", "std", "l2"],
            "properties": {
                "nan": _COUNT, "inf": _COUNT,
                **{key: {"type": ["number", "null"]} for key in ("min", "max", "mean", "std", "l2")},
            },
        },
        "model": {
            "type": "object",
            "properties": {
                "nc": {"type": "integer", "minimum": 1},
                "reg_max": {"type": "integer", "minimum": 1},
                "strides": {"type": "array", "items": {"type": "number", "exclusiveMinimum": 0}},
                "head_index": _COUNT,
                "end2end": {"type": "boolean"},
                "legacy_head": {"type": "boolean"},
                "parameters": _COUNT,
                "layers": {"type": "array", "items": {"$ref": "#/$defs/layer"}},
            },
        },
        "layer": {
            "type": "object",
            "properties": {
                "index": _COUNT,
                "type": {"type": "string"},
                "from": {"type": "array", "items": {"type": "integer"}},
                "inputs": {"type": "array", "items": {"type": "string"}},
                "parameters": _COUNT, "trainable": _COUNT, "frozen": _COUNT, "buffers": _COUNT,
                "outputs": {"type": "object", "additionalProperties": {"$ref": "#/$defs/shape"}},
            },
        },
        "loss": {
            "type": "object",
            "properties": {
                "branches": {"type": "array", "items": {"type": "string"}},
                "cases": {"type": "array", "items": {
                    "type": "object", "required": ["name"],
                    "properties": {"name": {"type": "string"}, "boxes": _COUNT}}},
                "loss_names": {"type": "array", "items": {"type": "string"}},
            },
        },
    },
}


def schema_text() -> str:
    """docs/schemas/manifest.schema.json as it must read."""
    return json.dumps(MANIFEST_SCHEMA, indent=2) + "\n"


@lru_cache(maxsize=1)
def _validator():
    from jsonschema import Draft202012Validator

    Draft202012Validator.check_schema(MANIFEST_SCHEMA)
    return Draft202012Validator(MANIFEST_SCHEMA)


def manifest_violation(manifest: Any) -> str | None:
    """The first way `manifest` departs from the schema, in words ("at PATH: expected ..., found ..."), or None."""
    from jsonschema.exceptions import best_match

    error = best_match(_validator().iter_errors(manifest))
    if error is None:
        return None
    return f"at {_path(error.absolute_path)}: expected {_expected(error)}, found {_found(error)}"


# Digests of manifest texts already found valid: a command (and a test session) opens the same dump many times,
# and validating a reference's index of a thousand tensors takes about 0.1 s.
_VALID_TEXTS: set[str] = set()


def check_manifest_schema(manifest: Any, where: str, *, text: str | None = None) -> None:
    """DumpError (exit 2), in one line, when `manifest` (read from `where`, whose content is `text` when given)
    does not follow the schema."""
    digest = xxhash.xxh3_128_hexdigest(text.encode()) if text is not None else None
    if digest in _VALID_TEXTS:
        return
    violation = manifest_violation(manifest)
    if violation is not None:
        raise DumpError(f"{where} does not follow the dump manifest schema (docs/schemas/manifest.schema.json) "
                        f"{violation}")
    if digest is not None:
        _VALID_TEXTS.add(digest)


def _path(parts) -> str:
    out = "manifest"
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.isidentifier():
            out += f".{part}"
        else:
            out += f"[{json.dumps(part)}]"
    return out


_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
               int: "an integer", float: "a number"}


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _expected(error) -> str:
    kind, value = error.validator, error.validator_value
    if kind == "required":
        missing = [name for name in value if isinstance(error.instance, dict) and name not in error.instance]
        return f"a field {_short(missing[0] if missing else value[0])}"
    if kind == "type":
        types = [value] if isinstance(value, str) else value
        return "a value of type " + " or ".join(types)
    if kind == "const":
        return f"{_short(value)}"
    if kind == "enum":
        return "one of " + ", ".join(_short(v) for v in value)
    if kind == "pattern":
        return f"a string matching {value}"
    if kind in ("minimum", "exclusiveMinimum"):
        return f"a number {'>=' if kind == 'minimum' else '>'} {value}"
    return error.message


def _found(error) -> str:
    if error.validator == "required":
        return "none"
    return f"{_json_type(error.instance)} {_short(error.instance)}"
