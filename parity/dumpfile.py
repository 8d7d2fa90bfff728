"""Reading and writing dumps: safetensors files plus manifest.json, as docs/dump-format.md describes.

This module knows the layout, never the meaning of a tensor: names are built by `parity.names`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from parity.errors import DumpError

SCHEMA = "yolo-parity-dump"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"

# The file a tensor goes to when the writer is not told: decided by the first segment of its name.
FILE_OF_GROUP = {
    "model": "weights.safetensors",
    "batch": "batch.safetensors",
    "act": "activations.safetensors",
    "init": "init.safetensors",
    "loss": "loss.safetensors",
    "grad": "grads.safetensors",
    "train": "train.safetensors",
}

_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype))


def tensor_stats(tensor: torch.Tensor) -> dict:
    """What a statistics-only dump keeps of a tensor (docs/dump-format.md, 'Statistics-only dumps')."""
    data = tensor.detach().cpu()
    values = data.double() if data.dtype != torch.float64 else data
    finite = values[torch.isfinite(values)]
    stats = {
        "nan": int(torch.isnan(values).sum()),
        "inf": int(torch.isinf(values).sum()),
        "min": float(finite.min()) if finite.numel() else None,
        "max": float(finite.max()) if finite.numel() else None,
        "mean": float(finite.mean()) if finite.numel() else None,
        "std": float(finite.std(unbiased=False)) if finite.numel() else None,
        "l2": float(finite.norm()) if finite.numel() else None,
    }
    return stats


def checksum(tensor: torch.Tensor) -> str:
    """SHA-256 of the tensor's raw little-endian bytes, as stored."""
    data = tensor.detach().cpu().contiguous()
    if data.numel() == 0:
        return hashlib.sha256(b"").hexdigest()
    return hashlib.sha256(data.reshape(-1).view(torch.uint8).numpy().data).hexdigest()


class DumpWriter:
    """Collects tensors and writes them atomically: a temporary sibling directory renamed into place.

    Use as a context manager; `commit(manifest)` finishes the dump. Leaving the block without a commit, or by
    an exception, removes everything written so far.
    """

    def __init__(self, out: str | os.PathLike, *, force: bool = False, kind: str = "reference",
                 stats_only: bool = False):
        self.out = Path(out)
        self.force = force
        self.kind = kind
        self.stats_only = stats_only
        self._tensors: dict[str, tuple[str, torch.Tensor]] = {}
        self._tmp: Path | None = None
        if self.out.exists() and not force:
            raise DumpError(
                f"output directory {self.out} already exists; pass --force (make: FORCE=1) to replace it"
            )

    def __enter__(self) -> "DumpWriter":
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"
        if self._tmp.exists():
            shutil.rmtree(self._tmp)
        self._tmp.mkdir()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._tmp is not None and self._tmp.exists():
            shutil.rmtree(self._tmp, ignore_errors=True)

    def add(self, name: str, tensor: torch.Tensor, file: str | None = None, *, copy: bool = True) -> None:
        if name in self._tensors:
            raise DumpError(f"tensor {name!r} written twice")
        if not isinstance(tensor, torch.Tensor):
            raise DumpError(f"tensor {name!r}: expected a torch.Tensor, got {type(tensor).__name__}")
        file = file or FILE_OF_GROUP.get(name.split(".", 1)[0], "misc.safetensors")
        # Moving to the host is the one copy capture makes; clone() guards against later in-place edits.
        data = tensor.detach()
        if copy or data.device.type != "cpu":
            data = data.to("cpu", copy=True) if data.device.type != "cpu" else data.clone()
        self._tensors[name] = (file, data.contiguous())

    def names(self) -> list[str]:
        return list(self._tensors)

    def commit(self, manifest: dict) -> Path:
        assert self._tmp is not None, "use DumpWriter as a context manager"
        by_file: dict[str, dict[str, torch.Tensor]] = {}
        index = {}
        for name, (file, data) in self._tensors.items():
            index[name] = {"file": file, "dtype": dtype_name(data.dtype), "shape": list(data.shape),
                           "sha256": checksum(data)}
            if self.stats_only:
                index[name]["file"] = None
                index[name]["stats"] = tensor_stats(data)
            else:
                by_file.setdefault(file, {})[name] = data
        for file, tensors in by_file.items():
            save_file(tensors, str(self._tmp / file))
        manifest = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "kind": self.kind,
                    "stats_only": self.stats_only, **manifest}
        manifest["tensors"] = index
        (self._tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n")
        if self.out.exists():
            shutil.rmtree(self.out)
        os.replace(self._tmp, self.out)
        self._tmp = None
        return self.out


class Dump:
    """A dump on disk, read lazily: tensors are memory-mapped one at a time, never all loaded."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise DumpError(f"dump {self.path} does not exist")
        if self.path.is_file():
            raise DumpError(f"{self.path} is a file; a dump is a directory holding {MANIFEST} and .safetensors files")
        manifest_path = self.path / MANIFEST
        if not manifest_path.exists():
            raise DumpError(f"{self.path} is not a dump: it has no {MANIFEST}")
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise DumpError(f"{manifest_path} is not valid JSON: {error}") from None
        if not isinstance(self.manifest, dict):
            raise DumpError(f"{manifest_path}: expected a JSON object, found {type(self.manifest).__name__}")
        schema = self.manifest.get("schema")
        version = self.manifest.get("schema_version")
        if schema != SCHEMA:
            raise DumpError(f"{manifest_path}: schema is {schema!r}, expected {SCHEMA!r}")
        if version != SCHEMA_VERSION:
            raise DumpError(
                f"{manifest_path}: schema_version is {version!r}; this yolo-parity reads version {SCHEMA_VERSION}"
            )
        self.index: dict[str, dict] = self.manifest.get("tensors") or self._scan_files()
        self._handles: dict[str, object] = {}

    def _scan_files(self) -> dict[str, dict]:
        """A foreign port may leave the index out: then every safetensors file in the directory is read."""
        index = {}
        for file in sorted(self.path.glob("*.safetensors")):
            for name, entry in read_header(file).items():
                index[name] = {"file": file.name, "dtype": entry["dtype"], "shape": entry["shape"]}
        return index

    # -- the manifest's sections, with defaults for the optional parts of a candidate dump
    @property
    def kind(self) -> str:
        return self.manifest.get("kind", "candidate")

    @property
    def stats_only(self) -> bool:
        return bool(self.manifest.get("stats_only"))

    def stats(self, name: str) -> dict:
        """Summary statistics of a tensor: stored in a statistics-only dump, computed otherwise."""
        entry = self.index.get(name) or {}
        return entry["stats"] if "stats" in entry else tensor_stats(self.get(name))

    @property
    def config(self) -> dict:
        return self.manifest.get("config", {})

    @property
    def model(self) -> dict:
        return self.manifest.get("model", {})

    @property
    def layers(self) -> list[dict]:
        return self.model.get("layers", [])

    def names(self, prefix: str = "") -> list[str]:
        return [n for n in self.index if n.startswith(prefix)]

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def _handle(self, file: str):
        if file not in self._handles:
            full = self.path / file
            if not full.exists():
                raise DumpError(f"{self.path}: manifest names {file}, which is missing")
            try:
                self._handles[file] = safe_open(str(full), framework="pt")
            except Exception as error:  # noqa: BLE001 - safetensors raises several types for corrupt files
                raise DumpError(f"{full} is not a readable safetensors file: {error}") from None
        return self._handles[file]

    def get(self, name: str, *, verify: bool = False) -> torch.Tensor:
        entry = self.index.get(name)
        if entry is None:
            close = difflib.get_close_matches(name, list(self.index), n=3, cutoff=0.6)
            hint = f"; nearest: {', '.join(close)}" if close else ""
            raise DumpError(f"{self.path}: no tensor named {name!r}{hint}")
        if entry.get("file") is None:
            raise DumpError(
                f"{self.path} is a statistics-only dump: it holds statistics of {name!r}, not its values"
            )
        handle = self._handle(entry["file"])
        try:
            tensor = handle.get_tensor(name)
        except Exception as error:  # noqa: BLE001
            raise DumpError(f"{self.path / entry['file']}: cannot read {name!r}: {error}") from None
        if list(tensor.shape) != list(entry["shape"]):
            raise DumpError(
                f"{self.path}: {name!r} has shape {list(tensor.shape)} in {entry['file']} "
                f"but the manifest says {entry['shape']}"
            )
        if verify and "sha256" in entry and checksum(tensor) != entry["sha256"]:
            raise DumpError(f"{self.path}: checksum of {name!r} does not match the manifest (file corrupted?)")
        return tensor

    def get_optional(self, name: str) -> torch.Tensor | None:
        return self.get(name) if name in self.index else None

    def tensors(self, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names(prefix):
            yield name, self.get(name)

    def verify(self) -> list[str]:
        """Names whose bytes no longer match their checksum."""
        return [n for n, e in self.index.items()
                if "sha256" in e and e.get("file") and checksum(self.get(n)) != e["sha256"]]

    def nbytes(self) -> int:
        files = {e["file"] for e in self.index.values() if e.get("file")}
        return sum((self.path / f).stat().st_size for f in files) + (self.path / MANIFEST).stat().st_size



class DumpWithDerived(Dump):
    """A dump plus tensors computed from its own (held in memory, listed in `index` with `"derived": true`), so a
    reader written for one layout can read a dump stored in another (e.g. an older ultralytics release's head)."""

    def __init__(self, dump: Dump, derived: dict[str, torch.Tensor]):
        # the same files, manifest and open handles as `dump` (Dump.__init__ would parse the manifest again)
        self.__dict__.update(dump.__dict__)
        self.index = {**dump.index, **{name: {"file": None, "derived": True, "dtype": dtype_name(t.dtype),
                                              "shape": list(t.shape)} for name, t in derived.items()}}
        self._derived = dict(derived)

    def get(self, name: str, *, verify: bool = False) -> torch.Tensor:
        if name in self._derived:
            return self._derived[name]
        return super().get(name, verify=verify)


def read_header(file: str | os.PathLike) -> dict[str, dict]:
    """The JSON header of a safetensors file, checked: a truncated or corrupt file is named as such."""
    file = Path(file)
    size = file.stat().st_size
    with open(file, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise DumpError(f"{file} is truncated: {size} bytes, a safetensors file starts with an 8-byte length")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            raise DumpError(f"{file} is truncated or corrupt: header says {length} bytes, file has {size - 8}")
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DumpError(f"{file} is corrupt: its header is not JSON") from None
    header.pop("__metadata__", None)
    end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if 8 + length + end > size:
        raise DumpError(f"{file} is truncated: tensors need {8 + length + end} bytes, file has {size}")
    return header
