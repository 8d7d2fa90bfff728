"""A port's output for one layer against its layer file: the containers checked, the tensors compared.

The port writes its tensors under the dump names (`act.23.boxes`, `act.23.cv2.0.2`, `init.cls_bias.0.stored` or
`init.cls_bias.0`) into a .safetensors file or a candidate dump. The comparisons here are pure judgements
(`TensorMetrics` against a tolerance); `parity.diagnose.layer_check` turns them into a report.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from parity.compare.foreign import check_candidate_dump, check_safetensors_file, errors
from parity.compare.metrics import TensorMetrics, compare_tensors
from parity.compare.tolerances import BITWISE, Profile, Tolerance
from parity.dump.layer_file import INPUT, MAPPED, PARAM, LayerFile
from parity.errors import ParityError

if TYPE_CHECKING:
    import torch

    from parity.compare.foreign import Problem

_INIT_ALIAS = re.compile(r"^init\.(cls_bias|box_bias)\.(\d+)$")
# Names a port may copy over from its layer file without their being judged as outputs.
LAYER_FILE_PREFIXES = (INPUT, PARAM, MAPPED)


def open_layer_file(path: str | os.PathLike) -> LayerFile:
    """A layer file whose safetensors container was checked first (a truncated file is a clear error)."""
    path = Path(path)
    if path.is_file():
        bad = errors(check_safetensors_file(path)[1])
        if bad:
            raise ParityError("the layer file: " + "; ".join(p.message for p in bad))
    return LayerFile(path)


# ============================================================================================ port output
@dataclass
class PortOutput:
    """The tensors a port wrote, under their protocol names, and what its container got wrong."""
    path: Path
    tensors: dict[str, torch.Tensor]
    written_as: dict[str, str]  # protocol name -> the name the port wrote
    problems: list[Problem] = field(default_factory=list)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def as_written(self, name: str) -> str:
        return self.written_as.get(name, name)


def read_port_output(path: str | os.PathLike) -> PortOutput:
    """The tensors a port wrote: a .safetensors file, or a candidate dump directory."""
    path = Path(path)
    tensors, problems = _read_tensors(path)
    normalised, written = _normalise_port_names(tensors)
    return PortOutput(path, normalised, written, problems)


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], list]:
    if not path.exists():
        raise ParityError(f"the port's output {path}: no such file")
    if path.is_dir():
        problems = [p for p in check_candidate_dump(path) if p.code not in ("unknown-name",)]
        bad = errors(problems)
        if bad:
            raise ParityError(f"the port's output {path}: " + "; ".join(p.message for p in bad))
        from parity.dump.files import Dump

        dump = Dump(path)
        return {name: dump.get(name) for name in dump.index}, problems
    _, problems = check_safetensors_file(path)
    bad = errors(problems)
    if bad:
        raise ParityError("the port's output: " + "; ".join(p.message for p in bad))
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="pt")
        return {name: handle.get_tensor(name) for name in handle.keys()}, problems
    except Exception as error:  # noqa: BLE001 - safetensors raises several types for unreadable files
        raise ParityError(f"the port's output {path} is not a readable safetensors file: {error}") from None


def _normalise_port_names(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """`init.cls_bias.0` is accepted for `init.cls_bias.0.stored`. Returns (tensors, {protocol name: as written})."""
    out, written = {}, {}
    for name, tensor in tensors.items():
        key = f"{name}.stored" if _INIT_ALIAS.match(name) else name
        if key in out:
            raise ParityError(f"the output holds both {written[key]!r} and {name!r}, which mean the same tensor")
        out[key] = tensor
        written[key] = name
    return out, written


# ============================================================================================ comparisons
@dataclass
class Expected:
    """What the layer file asks of the port: its own outputs and sub-blocks (execution order), its bias init."""
    own: list[str]
    sub: list[str]
    init: list[str]
    params: list[str]

    @property
    def known(self) -> set[str]:
        return set(self.own) | set(self.sub) | set(self.init) | set(self.params)


def expected_of(layer_file: LayerFile) -> Expected:
    present = layer_file.expected_names()
    return Expected(own=[n for n in layer_file.outputs if n in present],
                    sub=[n for n in layer_file.sub_blocks if n in present],
                    init=[n for n in present if n.startswith("init.") and n.endswith(".stored")],
                    params=layer_file.param_names())


@dataclass
class OutputCheck:
    """One tensor the port wrote, compared with the expected one."""
    name: str
    own: bool  # the layer's own output (else a sub-block)
    expected: torch.Tensor
    produced: torch.Tensor
    tolerance: Tolerance
    metrics: TensorMetrics


def compare_outputs(layer_file: LayerFile, expected: Expected, port: PortOutput, profile: Profile
                    ) -> list[OutputCheck]:
    """The layer's outputs, then its sub-blocks (capture order = execution order), those the port wrote."""
    checks = []
    for name in expected.own + expected.sub:
        if name not in port:
            continue
        ref, cand = layer_file.expected(name), port.tensors[name]
        tol = profile.for_name(name, mode="isolated")
        checks.append(OutputCheck(name, name in expected.own, ref, cand, tol, compare_tensors(ref, cand, tol)))
    return checks


@dataclass
class WeightCheck:
    """Weights a candidate wrote back, bitwise against those it should have loaded."""
    checked: list[str]
    mismatches: list[tuple[str, TensorMetrics]]

    @property
    def bad(self) -> list[str]:
        return [name for name, _ in self.mismatches]


def compare_weights(pairs) -> WeightCheck:
    """`pairs`: (name, expected, written) for every weight written; bitwise, in the order given."""
    checked, mismatches = [], []
    for name, expected, written in pairs:
        checked.append(name)
        metrics = compare_tensors(expected, written, BITWISE)
        if not metrics.passed:
            mismatches.append((name, metrics))
    return WeightCheck(checked, mismatches)


def compare_port_weights(layer_file: LayerFile, port: PortOutput) -> WeightCheck:
    """The param.* tensors the port wrote back after loading them."""
    return compare_weights((name, layer_file.get(f"{PARAM}{name}"), port.tensors[name])
                           for name in layer_file.param_names() if name in port)


__all__ = ["Expected", "LAYER_FILE_PREFIXES", "OutputCheck", "PortOutput", "WeightCheck", "compare_outputs",
           "compare_port_weights", "compare_weights", "expected_of", "open_layer_file", "read_port_output"]
