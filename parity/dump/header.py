"""The safetensors container, read by one parser: an 8-byte little-endian header length, a JSON header, raw bytes.

The dtype table names every safetensors dtype once (its size, and the torch dtype where torch has one); the
dump reader (`parity.dump.files`) and the foreign-port diagnostics (`parity.compare.foreign`) both read headers
through `parse_header` and word what it finds each in their own terms.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class Dtype:
    name: str  # safetensors' name, as the manifest's `dtype` spells it
    size: int  # bytes per element
    torch: torch.dtype | None  # None where torch has no such dtype (or none this tool writes)
    label: str  # how a message names it

    @property
    def exact(self) -> bool:
        """Compared exactly (bool and integer data): no tolerance applies."""
        return self.name == "BOOL" or self.name[0] in "IU"


DTYPES: dict[str, Dtype] = {d.name: d for d in (
    Dtype("F64", 8, torch.float64, "float64"), Dtype("F32", 4, torch.float32, "float32"),
    Dtype("F16", 2, torch.float16, "float16"), Dtype("BF16", 2, torch.bfloat16, "bfloat16"),
    Dtype("I64", 8, torch.int64, "int64"), Dtype("I32", 4, torch.int32, "int32"),
    Dtype("I16", 2, torch.int16, "int16"), Dtype("I8", 1, torch.int8, "int8"),
    Dtype("U8", 1, torch.uint8, "uint8"), Dtype("U16", 2, getattr(torch, "uint16", None), "uint16"),
    Dtype("U32", 4, getattr(torch, "uint32", None), "uint32"), Dtype("U64", 8, getattr(torch, "uint64", None), "uint64"),
    Dtype("BOOL", 1, torch.bool, "bool"),
    Dtype("F8_E4M3", 1, getattr(torch, "float8_e4m3fn", None), "float8_e4m3"),
    Dtype("F8_E5M2", 1, getattr(torch, "float8_e5m2", None), "float8_e5m2"),
)}
DTYPE_SIZES = {name: d.size for name, d in DTYPES.items()}
EXACT_DTYPES = frozenset(name for name, d in DTYPES.items() if d.exact)
_BY_TORCH = {d.torch: d for d in DTYPES.values() if d.torch is not None}

# Sanity bound for a header: the header of a 10 000-tensor file is well under this. A larger length whose bytes
# read big-endian fit the file is a length written in the wrong byte order.
MAX_HEADER_BYTES = 100 * 1024 * 1024


def dtype_name(dtype: torch.dtype) -> str:
    """safetensors' name of a torch dtype (`torch.float32` -> "F32")."""
    found = _BY_TORCH.get(dtype)
    return found.name if found else str(dtype)


def dtype_label(dtype: torch.dtype) -> str:
    """A torch dtype for a message: "float32 (F32)"."""
    found = _BY_TORCH.get(dtype)
    return f"{found.label} ({found.name})" if found else str(dtype)


@dataclass(frozen=True)
class HeaderRead:
    """What the first bytes of a file say. `fault` is None when `header` was read; otherwise one of

    "short": fewer than 8 bytes; "big-endian": the length prefix is big-endian (`big_endian_length`);
    "past-end": the length runs past the end of the file; "not-json": the header is not UTF-8 JSON (`detail`:
    the decoder's words); "not-object": it is JSON but not an object (`detail`: the JSON type's name)."""

    size: int  # of the whole file, in bytes
    length: int | None = None  # the header length the prefix claims
    header: dict[str, Any] | None = None  # the entries, without `__metadata__`
    metadata: Any = None  # `__metadata__` as written (None when absent)
    fault: str | None = None
    detail: str = ""
    big_endian_length: int | None = None

    @property
    def data_size(self) -> int:
        """Bytes after the header: the data section."""
        return self.size - 8 - (self.length or 0)


def parse_header(file: str | os.PathLike) -> HeaderRead:
    """Read a safetensors file's header without judging its entries. Raises OSError only (a missing or
    unreadable file); bad content is a `fault`."""
    size = Path(file).stat().st_size
    with open(file, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            return HeaderRead(size, fault="short")
        (length,) = struct.unpack("<Q", prefix)
        (swapped,) = struct.unpack(">Q", prefix)
        if length > MAX_HEADER_BYTES and swapped <= size - 8:
            return HeaderRead(size, length, fault="big-endian", big_endian_length=swapped)
        if length > size - 8:
            return HeaderRead(size, length, fault="past-end")
        raw = handle.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return HeaderRead(size, length, fault="not-json", detail=str(error))
    if not isinstance(header, dict):
        return HeaderRead(size, length, fault="not-object", detail=type(header).__name__)
    metadata = header.pop("__metadata__", None)
    return HeaderRead(size, length, header=header, metadata=metadata)
