"""The layer file: ONE safetensors file holding everything a port needs to run one layer (docs/porting-protocol.md).

    input.{k}                   the layer's reference inputs, in `from` order (manifest model.layers[i].inputs)
    param.{key}                 its parameters and buffers under ultralytics' names (param.model.23.cv2.0.0.conv.weight)
    mapped.{key}                the same tensors under a candidate's own names, when exported with a key mapping
    expected.act.{i}[...]       the reference outputs: the layer's own (act.23.boxes, act.23.scores, act.23.dfl)
                                and its sub-modules' (act.23.cv2.0.2, act.9.m#1, ...)
    expected.init.{...}         Detect head only: init.cls_bias.{l}.stored/.float32/.float64, init.box_bias.{l}.stored

and a `__metadata__` (strings, JSON-encoded where structured): schema, layer, type, from, inputs, outputs,
sub_blocks, nc, strides, reg_max, head_index, batchnorm (eps, momentum, train mode), the reference's versions.

The layers file (`parity export-layers`) holds every layer file in one: layer i's names under `layer.{i}.`, its
metadata under `layers`. This module reads and writes the format; `parity.replay.export` fills it from a reference.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from parity.errors import ParityError

if TYPE_CHECKING:  # torch is imported when a file is read or written, not when the CLI registers its commands
    import torch

LAYER_SCHEMA = "yolo-parity-layer"
LAYERS_SCHEMA = "yolo-parity-layers"
LAYERS_PREFIX = "layer."
LAYER_SCHEMA_VERSION = 1
INPUT, PARAM, MAPPED, EXPECTED = "input.", "param.", "mapped.", "expected."
# The tolerance profile a port's output is judged under unless told: the reference's inputs on a CPU, in float32.
DEFAULT_PROFILE = "cpu-fp32"


class LayerFile:
    """A layer file, read lazily. The container itself is checked by `parity.compare.layer_file.open_layer_file`."""

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        self.path = Path(path)
        _check_is_a_file(self.path)
        try:
            handle = safe_open(str(self.path), framework="pt")
        except Exception as error:  # noqa: BLE001 - safetensors raises several types for unreadable files
            raise ParityError(f"layer file {self.path} is not a readable safetensors file: {error}") from None
        self.meta: dict[str, str] = handle.metadata() or {}
        self._handle = handle
        self.names = list(handle.keys())
        self._check_schema()
        self.layer = int(self.meta["layer"])
        self.type = self.meta.get("type", "")
        self.outputs: list[str] = self._listed("outputs")
        self.sub_blocks: list[str] = self._listed("sub_blocks")
        self.init: list[str] = self._listed("init")
        self.inputs: list[str] = self._listed("inputs")
        self.strides: list[float] = self._listed("strides")
        self.nc = json.loads(self.meta.get("nc", "null"))
        self.reg_max = json.loads(self.meta.get("reg_max", "null"))
        self.head_index = json.loads(self.meta.get("head_index", "null"))

    def _listed(self, key: str) -> list:
        return json.loads(self.meta.get(key, "[]"))

    def _check_schema(self) -> None:
        schema = self.meta.get("schema")
        if schema != LAYER_SCHEMA:
            raise ParityError(f"layer file {self.path}: not a layer file from `parity export-layer` (metadata schema "
                              f"is {schema!r}, expected {LAYER_SCHEMA!r})")
        version = self.meta.get("schema_version")
        if version != str(LAYER_SCHEMA_VERSION):
            raise ParityError(f"layer file {self.path}: layer-file schema_version {version!r}; this yolo-parity "
                              f"reads version {LAYER_SCHEMA_VERSION} (re-export it with this version)")

    def get(self, name: str) -> torch.Tensor:
        return self._handle.get_tensor(name)

    def shape(self, name: str) -> list[int]:
        return list(self._handle.get_slice(name).get_shape())

    def expected(self, name: str) -> torch.Tensor | None:
        key = f"{EXPECTED}{name}"
        return self._handle.get_tensor(key) if key in self.names else None

    def expected_names(self) -> list[str]:
        return [n[len(EXPECTED):] for n in self.names if n.startswith(EXPECTED)]

    def param_names(self) -> list[str]:
        return [n[len(PARAM):] for n in self.names if n.startswith(PARAM)]


def _check_is_a_file(path: Path) -> None:
    if not path.exists():
        raise ParityError(f"layer file {path}: no such file")
    if path.is_dir():
        hint = (" (that is a dump: make a layer file from it with `parity export-layer --reference "
                f"{path} --layer N --out FILE`)") if (path / "manifest.json").exists() else ""
        raise ParityError(f"layer file {path} is a directory; expected the .safetensors file written by "
                          f"`parity export-layer`{hint}")


class LayerFileAsReference:
    """The parts of `parity.dump.files.Dump` that the Detect bias-init judgement reads, served from a layer file."""

    def __init__(self, layer_file: LayerFile):
        self.lf = layer_file
        self.path = layer_file.path
        self.model = {"nc": layer_file.nc, "reg_max": layer_file.reg_max, "strides": layer_file.strides,
                      "head_index": layer_file.head_index, "yaml": layer_file.meta.get("model")}
        self.manifest = {"model": self.model}
        self.index: dict[str, dict] = {}
        for name in layer_file.names:
            for prefix in (EXPECTED, PARAM):
                if name.startswith(prefix):
                    self.index[name[len(prefix):]] = {"file": layer_file.path.name, "name": name,
                                                      "shape": layer_file.shape(name)}
                    break

    @property
    def layers(self) -> list[dict]:
        return [{"index": self.lf.layer, "type": self.lf.type}]

    @property
    def config(self) -> dict:
        return {}

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def names(self, prefix: str = "") -> list[str]:
        return [n for n in self.index if n.startswith(prefix)]

    def get(self, name: str, **_: Any) -> torch.Tensor:
        if name not in self.index:
            raise ParityError(f"{self.path}: no tensor named {name!r}")
        return self.lf.get(self.index[name]["name"])

    def get_optional(self, name: str) -> torch.Tensor | None:
        return self.get(name) if name in self.index else None


# ============================================================================================= writing
def check_replaceable(out: Path, *, force: bool, what: str, schema: str) -> None:
    """`out` may be written: one file, and `force` replaces only a file of `schema` (`what` wrote it); a file of
    the user's at `out` is never deleted."""
    if out.is_dir():
        raise ParityError(f"{out} is a directory; {what} is one .safetensors file")
    if out.exists() or out.is_symlink():
        if not force:
            raise ParityError(f"{out} already exists")
        from parity.dump.files import check_replaceable_file, read_metadata

        check_replaceable_file(out, what, lambda path: read_metadata(path).get("schema") == schema)


def write_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str], out: Path) -> None:
    """One safetensors file written beside `out` and renamed into place (nothing half-written), with the umask's mode."""
    from safetensors.torch import save_file

    from parity.dump.files import current_umask

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o666 & ~current_umask())  # safetensors creates the file 0600
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


__all__ = ["DEFAULT_PROFILE", "EXPECTED", "INPUT", "LAYERS_PREFIX", "LAYERS_SCHEMA", "LAYER_SCHEMA", "LAYER_SCHEMA_VERSION", "MAPPED",
           "PARAM", "LayerFile", "LayerFileAsReference", "check_replaceable", "write_safetensors"]
