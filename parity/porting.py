"""The porting harness: one layer at a time, for ports in any language (docs/porting-protocol.md).

    parity export-layer --reference DUMP --layer 23 --out layer23.safetensors [--candidate SPEC [--map FILE]]
    parity check-layer  --layer-file layer23.safetensors --output port_out.safetensors [--profile P] [--json [PATH]]

`export-layer` writes ONE safetensors file holding everything a port needs to run one layer and nothing else:

    input.{k}                   the layer's reference inputs, in `from` order (manifest model.layers[i].inputs)
    param.{key}                 its parameters and buffers under ultralytics' names (param.model.23.cv2.0.0.conv.weight)
    mapped.{key}                the same tensors under a candidate's own names, when --candidate gives a key mapping
    expected.act.{i}[...]       the reference outputs: the layer's own (act.23.boxes, act.23.scores, act.23.dfl)
                                and its sub-modules' (act.23.cv2.0.2, act.9.m#1, ...)
    expected.init.{...}         Detect head only: init.cls_bias.{l}.stored/.float32/.float64, init.box_bias.{l}.stored

and a `__metadata__` (strings, JSON-encoded where structured): schema, layer, type, from, inputs, outputs,
sub_blocks, nc, strides, reg_max, head_index, batchnorm (eps, momentum, train mode), the reference's versions.

`check-layer` reads the port's output file (tensors under the dump names: `act.23.boxes`, `act.23.cv2.0.2`,
`init.cls_bias.0.stored` or `init.cls_bias.0`), compares each tensor it wrote with the expected one under the
tolerance profile (cpu-fp32 unless told; isolated tolerances, since the port ran on the reference's inputs),
diagnoses foreign layouts and dtypes (`parity.compare.foreign`), judges the port's own Detect bias init with
`parity.diagnose.structure.diagnose_bias_init`, and prints a table and a verdict. Exit 0 parity, 1 divergence,
2 bad input.

`write_candidate_dump` writes what a live candidate computes as a candidate DUMP (the format a port writes),
so that `parity compare --candidate DIR` can be checked against the live replay.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from parity.dump import names
from parity.errors import ParityError

if TYPE_CHECKING:  # torch is imported by the commands, not when the CLI registers them (before prepare())
    import torch

LAYER_SCHEMA = "yolo-parity-layer"
# `parity export-layers`: every layer file in one, each layer's names under `layer.{i}.`.
LAYERS_SCHEMA = "yolo-parity-layers"
LAYERS_PREFIX = "layer."
LAYER_SCHEMA_VERSION = 1
INPUT, PARAM, MAPPED, EXPECTED = "input.", "param.", "mapped.", "expected."
DEFAULT_PROFILE = "cpu-fp32"


# ============================================================================================ export
def _layer_entry(reference, layer: int) -> dict:
    layers = reference.layers
    if not layers:
        raise ParityError(f"{reference.path}: the manifest has no model.layers table, so no layer can be exported")
    for entry in layers:
        if entry.get("index") == layer:
            for key in ("inputs", "outputs"):
                if key not in entry:
                    raise ParityError(f"{reference.path}: model.layers entry {layer} lacks {key!r}")
            return entry
    raise ParityError(f"--layer {layer}: the reference has layers {layers[0].get('index')}..{layers[-1].get('index')}")


def expected_names(reference, entry: dict) -> tuple[list[str], list[str]]:
    """(the layer's own outputs, its sub-module outputs), in capture (execution) order."""
    index = entry["index"]
    head = reference.model.get("head_index")
    own = list(entry["outputs"])
    if index == head and names.act(index, "dfl") in reference and names.act(index, "dfl") not in own:
        own.append(names.act(index, "dfl"))
    sub = [n for n in reference.names(names.act(index) + ".") if n not in own]
    return own, sub


def _mapped_params(reference, layer: int, spec: str, map_file: str | None) -> tuple[dict[str, torch.Tensor], dict]:
    """The layer's reference parameters under a live candidate's names, and {ref_key: [cand_keys]}."""
    from parity.replay.candidates import LazyTensors, ModuleCandidate, load_candidate

    candidate = load_candidate(spec, reference, map_file=map_file)
    if not isinstance(candidate, ModuleCandidate):
        raise ParityError(f"--candidate {spec}: a key mapping needs a live candidate (builtin or package.module:factory), "
                          f"not a dump")
    candidate.prepare(reference)
    mapping = candidate.mapping
    prefix = f"model.{layer}."
    wanted = {rk: entry.cand_keys for rk, entry in mapping.ref_to_cand.items() if rk.startswith(prefix)}
    if not wanted:
        raise ParityError(f"--candidate {spec}: none of layer {layer}'s reference tensors maps onto the candidate")
    under_cand = mapping.reference_to_candidate(LazyTensors(reference, "model."))
    tensors = {f"{MAPPED}{ck}": under_cand[ck] for cks in wanted.values() for ck in cks if ck in under_cand}
    return tensors, wanted


def export_layer(reference, layer: int, out: str | os.PathLike, *, candidate: str | None = None,
                 map_file: str | None = None, force: bool = True) -> Path:
    """Write layer `layer`'s inputs, parameters and expected outputs as one safetensors file (see module doc)."""
    from parity.dump.files import Dump

    if not isinstance(reference, Dump):
        reference = Dump(reference)
    out = Path(out)
    _check_replaceable(out, force, "export-layer", LAYER_SCHEMA)
    tensors, metadata = layer_file_contents(reference, layer, candidate=candidate, map_file=map_file)
    _write_safetensors(tensors, metadata, out)
    return out


def _check_replaceable(out: Path, force: bool, command: str, schema: str) -> None:
    """`out` may be written: one file, and --force replaces only a file this command wrote (a file of the user's
    at --out is never deleted)."""
    if out.is_dir():
        raise ParityError(f"--out {out} is a directory; {command} writes one .safetensors file")
    if out.exists() or out.is_symlink():
        if not force:
            raise ParityError(f"--out {out} already exists")
        from parity.dump.files import check_replaceable_file, read_metadata

        what = "a layer file written by export-layer" if command == "export-layer" else f"a file written by {command}"
        check_replaceable_file(out, what, lambda path: read_metadata(path).get("schema") == schema)


def layer_file_contents(reference, layer: int, *, candidate: str | None = None, map_file: str | None = None
                        ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the `__metadata__` of layer `layer`'s layer file."""
    entry = _layer_entry(reference, layer)
    head = reference.model.get("head_index")
    tensors: dict[str, torch.Tensor] = {}
    for k, source in enumerate(entry["inputs"]):
        try:
            tensors[f"{INPUT}{k}"] = reference.get(source)
        except ParityError as error:
            raise ParityError(f"layer {layer}: cannot read its input {source!r} from the reference: {error}") from None
    params = reference.names(f"model.{layer}.")
    for key in params:
        tensors[f"{PARAM}{key}"] = reference.get(key)
    own, sub = expected_names(reference, entry)
    for name in own + sub:
        tensors[f"{EXPECTED}{name}"] = reference.get(name)
    strides = reference.model.get("strides") or []
    init_names = []
    if layer == head:
        for level in range(len(strides)):
            for kind, variants in (("cls_bias", ("stored", "float32", "float64")), ("box_bias", ("stored",))):
                for variant in variants:
                    name = names.init_bias(kind, level, variant)
                    if name in reference:
                        tensors[f"{EXPECTED}{name}"] = reference.get(name)
                        init_names.append(name)
    mapping = None
    if candidate:
        mapped, mapping = _mapped_params(reference, layer, candidate, map_file)
        tensors.update(mapped)
    metadata = {
        "schema": LAYER_SCHEMA,
        "schema_version": str(LAYER_SCHEMA_VERSION),
        "layer": str(layer),
        "type": str(entry.get("type", "")),
        "from": json.dumps(entry.get("from", [])),
        "inputs": json.dumps(list(entry["inputs"])),
        "outputs": json.dumps(own),
        "output_shapes": json.dumps({name: list(tensors[f"{EXPECTED}{name}"].shape) for name in own}),
        "sub_blocks": json.dumps(sub),
        "init": json.dumps(init_names),
        "params": json.dumps(params),
        "head_index": json.dumps(head),
        "nc": json.dumps(reference.model.get("nc")),
        "reg_max": json.dumps(reference.model.get("reg_max")),
        "strides": json.dumps(strides),
        "end2end": json.dumps(reference.model.get("end2end")),
        "legacy_head": json.dumps(reference.model.get("legacy_head")),
        "model": str(reference.model.get("yaml") or reference.config.get("model") or ""),
        "batchnorm": json.dumps({"eps": 1e-3, "momentum": 0.03, "mode": "train: normalise with the batch's own "
                                 "mean and biased variance over (N, H, W); running_* are not used"}),
        "cls_bias_formula": (reference.manifest.get("init") or {}).get("cls_bias_formula",
                                                                        "log(5 / nc / (640 / stride) ** 2)"),
        "reference": str(reference.path),
        "reference_versions": json.dumps(reference.manifest.get("versions") or {}),
        "reference_environment": json.dumps(reference.manifest.get("environment") or {}),
        "precision": str(reference.config.get("precision", "fp32")),
    }
    if mapping is not None:
        metadata["candidate"] = candidate
        metadata["mapping"] = json.dumps(mapping)
    return tensors, metadata


def export_layers(reference, out: str | os.PathLike, *, layers: list[int] | None = None, force: bool = True) -> Path:
    """Every layer's layer file in ONE safetensors file, so a port loops over one file: layer i's tensors under
    `layer.{i}.` + their layer-file names, its metadata under `layers` (a JSON object keyed by the index)."""
    from parity.dump.files import Dump

    if not isinstance(reference, Dump):
        reference = Dump(reference)
    out = Path(out)
    _check_replaceable(out, force, "export-layers", LAYERS_SCHEMA)
    indices = layers if layers is not None else [e["index"] for e in reference.model.get("layers", [])]
    tensors: dict[str, torch.Tensor] = {}
    per_layer: dict[str, dict[str, str]] = {}
    for index in indices:
        layer_tensors, metadata = layer_file_contents(reference, index)
        tensors.update({f"{LAYERS_PREFIX}{index}.{name}": t for name, t in layer_tensors.items()})
        per_layer[str(index)] = metadata
    _write_safetensors(tensors, {"schema": LAYERS_SCHEMA, "schema_version": str(LAYER_SCHEMA_VERSION),
                                 "layer_indices": json.dumps(indices), "layers": json.dumps(per_layer)}, out)
    return out


def _write_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str], out: Path) -> None:
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


# ========================================================================================= layer file
class LayerFile:
    """An export-layer file, read lazily."""

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        from parity.compare.foreign import check_safetensors_file, errors

        self.path = Path(path)
        if not self.path.exists():
            raise ParityError(f"--layer-file {self.path}: no such file")
        if self.path.is_dir():
            hint = (" (that is a dump: make a layer file from it with `parity export-layer --reference "
                    f"{self.path} --layer N --out FILE`)") if (self.path / "manifest.json").exists() else ""
            raise ParityError(f"--layer-file {self.path} is a directory; expected the .safetensors file written by "
                              f"`parity export-layer`{hint}")
        header, problems = check_safetensors_file(self.path)
        bad = errors(problems)
        if bad:
            raise ParityError("--layer-file: " + "; ".join(p.message for p in bad))
        handle = safe_open(str(self.path), framework="pt")
        self.meta: dict[str, str] = handle.metadata() or {}
        self._handle = handle
        self.names = list(handle.keys())
        schema = self.meta.get("schema")
        if schema != LAYER_SCHEMA:
            raise ParityError(f"--layer-file {self.path}: not a layer file from `parity export-layer` (metadata schema "
                              f"is {schema!r}, expected {LAYER_SCHEMA!r})")
        version = self.meta.get("schema_version")
        if version != str(LAYER_SCHEMA_VERSION):
            raise ParityError(f"--layer-file {self.path}: layer-file schema_version {version!r}; this yolo-parity "
                              f"reads version {LAYER_SCHEMA_VERSION} (re-export it with this version)")
        self.layer = int(self.meta["layer"])
        self.type = self.meta.get("type", "")
        self.outputs: list[str] = json.loads(self.meta.get("outputs", "[]"))
        self.sub_blocks: list[str] = json.loads(self.meta.get("sub_blocks", "[]"))
        self.init: list[str] = json.loads(self.meta.get("init", "[]"))
        self.inputs: list[str] = json.loads(self.meta.get("inputs", "[]"))
        self.strides: list[float] = json.loads(self.meta.get("strides", "[]"))
        self.nc = json.loads(self.meta.get("nc", "null"))
        self.reg_max = json.loads(self.meta.get("reg_max", "null"))
        self.head_index = json.loads(self.meta.get("head_index", "null"))

    def get(self, name: str) -> torch.Tensor:
        return self._handle.get_tensor(name)

    def expected(self, name: str) -> torch.Tensor | None:
        key = f"{EXPECTED}{name}"
        return self._handle.get_tensor(key) if key in self.names else None

    def expected_names(self) -> list[str]:
        return [n[len(EXPECTED):] for n in self.names if n.startswith(EXPECTED)]

    def param_names(self) -> list[str]:
        return [n[len(PARAM):] for n in self.names if n.startswith(PARAM)]


class _LayerFileAsReference:
    """The parts of `parity.dump.files.Dump` that `diagnose_bias_init` reads, served from a layer file."""

    def __init__(self, layer_file: LayerFile):
        self.lf = layer_file
        self.path = layer_file.path
        self.model = {"nc": layer_file.nc, "reg_max": layer_file.reg_max, "strides": layer_file.strides,
                      "head_index": layer_file.head_index, "yaml": layer_file.meta.get("model")}
        self.manifest = {"model": self.model}
        self.index: dict[str, dict] = {}
        for name in layer_file.names:
            if name.startswith(EXPECTED):
                key = name[len(EXPECTED):]
            elif name.startswith(PARAM):
                key = name[len(PARAM):]
            else:
                continue
            self.index[key] = {"file": layer_file.path.name, "name": name,
                               "shape": list(layer_file._handle.get_slice(name).get_shape())}

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


def _port_bias_candidate(biases: dict[int, dict[str, torch.Tensor]], label: str):
    from parity.replay.candidates import Candidate

    class PortBiases(Candidate):
        kind = "port-output"
        live = False

        def fresh_head_biases(self, reference):
            return biases

    candidate = PortBiases()
    candidate.label = label
    return candidate


# ============================================================================================== check
_INIT_ALIAS = re.compile(r"^init\.(cls_bias|box_bias)\.(\d+)$")


def read_port_output(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], list]:
    """The tensors a port wrote (a .safetensors file, or a candidate dump directory) and container problems."""
    from parity.compare.foreign import check_candidate_dump, check_safetensors_file, errors

    path = Path(path)
    if not path.exists():
        raise ParityError(f"--output {path}: no such file")
    if path.is_dir():
        problems = [p for p in check_candidate_dump(path) if p.code not in ("unknown-name",)]
        bad = errors(problems)
        if bad:
            raise ParityError(f"--output {path}: " + "; ".join(p.message for p in bad))
        from parity.dump.files import Dump

        dump = Dump(path)
        return {name: dump.get(name) for name in dump.index}, problems
    _, problems = check_safetensors_file(path)
    bad = errors(problems)
    if bad:
        raise ParityError("--output: " + "; ".join(p.message for p in bad))
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="pt")
        return {name: handle.get_tensor(name) for name in handle.keys()}, problems
    except Exception as error:  # noqa: BLE001 - safetensors raises several types for unreadable files
        raise ParityError(f"--output {path} is not a readable safetensors file: {error}") from None


def _normalise_port_names(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """`init.cls_bias.0` is accepted for `init.cls_bias.0.stored`. Returns (tensors, {protocol name: as written})."""
    out, written = {}, {}
    for name, tensor in tensors.items():
        match = _INIT_ALIAS.match(name)
        key = f"{name}.stored" if match else name
        if key in out:
            raise ParityError(f"the output holds both {written[key]!r} and {name!r}, which mean the same tensor")
        out[key] = tensor
        written[key] = name
    return out, written


def check_layer(layer_file: str | os.PathLike | LayerFile, output: str | os.PathLike, *,
                profile: str | None = None):
    """Judge a port's output file against an export-layer file. Returns a `parity.findings.Report`."""
    from parity.compare.foreign import name_problem, tensor_findings
    from parity.compare.metrics import compare_tensors
    from parity.compare.tolerances import BITWISE, get_profile
    from parity.diagnose import structure
    from parity.findings import Finding, Report, Row

    lf = layer_file if isinstance(layer_file, LayerFile) else LayerFile(layer_file)
    prof = get_profile(profile or DEFAULT_PROFILE)
    raw, container_problems = read_port_output(output)
    produced, written_as = _normalise_port_names(raw)
    layer = lf.layer
    where = f"layer {layer}"
    report = Report(command=f"check-layer --layer {layer}", reference=str(lf.path), candidate=str(output),
                    profile=prof.name)
    report.context.update({"layer": layer, "type": lf.type, "profile": prof.as_dict(),
                           "layers": [{"index": layer, "type": lf.type, "from": json.loads(lf.meta.get("from", "[]"))}],
                           "reference_dump": lf.meta.get("reference"), "model": lf.meta.get("model")})
    for problem in container_problems:
        if problem.severity in ("warning", "error") and problem.code != "unknown-name":
            report.find(Finding(f"foreign-{problem.code}", "output", problem.message, severity="warning"))

    expected = lf.expected_names()
    own = [n for n in lf.outputs if n in expected]
    sub = [n for n in lf.sub_blocks if n in expected]
    init_names = [n for n in expected if n.startswith("init.") and n.endswith(".stored")]
    comparable = set(own) | set(sub)
    known = set(comparable) | set(init_names) | set(lf.param_names())
    # names outside the layer file's vocabulary: say what they probably meant
    ignored_prefixes = (INPUT, PARAM, MAPPED)
    unknown = [n for n in produced if n not in known and not n.startswith(ignored_prefixes)]
    for name in unknown:
        problem = name_problem(written_as.get(name, name), sorted(known))
        if problem is not None:
            report.find(Finding("foreign-name", where, problem.message, severity="warning",
                                evidence={"tensor": written_as.get(name, name), "suggestion": problem.suggestion}))
    covered = [n for n in own + sub if n in produced]
    wrote_init = any(n in produced for n in init_names)
    wrote_weights = any(n in produced for n in lf.param_names())
    if not covered and not wrote_init and not wrote_weights:
        hints = []
        for name in list(produced)[:5]:
            problem = name_problem(written_as.get(name, name), sorted(known))
            if problem and problem.suggestion:
                hints.append(f"{written_as.get(name, name)!r} -> {problem.suggestion!r}")
        raise ParityError(
            f"--output {output}: none of its {len(produced)} tensor(s) is one layer {layer} expects "
            f"(e.g. {', '.join(own[:3]) or ', '.join(sub[:3])})" + (f"; perhaps: {'; '.join(hints)}" if hints else
                                                                    f"; it holds: {', '.join(list(produced)[:6])}"))

    # ---- numbers: the layer's outputs, then its sub-blocks (capture order = execution order)
    first_own: Row | None = None
    first_sub: Row | None = None
    explained: dict[str, str] = {}  # tensor -> the most specific explanation of its failure
    for name in own + sub:
        if name not in produced:
            continue
        ref = lf.expected(name)
        cand = produced[name]
        tol = prof.for_name(name, mode="isolated")
        metrics = compare_tensors(ref, cand, tol)
        section = "isolated" if name in own else f"isolated/layer {layer}"
        note = metrics.summary() if metrics.passed else (metrics.reason or metrics.summary())
        foreign_findings = [] if metrics.passed and cand.dtype == ref.dtype else \
            tensor_findings(name, f"{where}, {name}", ref, cand, tol, passed=metrics.passed)
        foreign = [f.message for f in foreign_findings]
        if not metrics.passed and not foreign and list(ref.shape) == list(cand.shape):
            hint = structure.affine_hint(ref, cand)
            if hint:
                note = f"{note}; {hint}"
        row = report.add(Row(section, where, name, metrics.passed, metrics=metrics.as_dict(), tolerance=tol.as_dict(),
                             note=note))
        explained[name] = foreign[-1] if foreign else note
        for finding in foreign_findings:
            finding.evidence["written_as"] = written_as.get(name, name)
            report.find(finding)
        if not metrics.passed:
            if name in own and first_own is None:
                first_own = row
            if name in sub and first_sub is None:
                first_sub = row
    report.context["first_divergent_layer"] = {"isolated": layer if (first_own or first_sub) else None}
    if first_own is not None or first_sub is not None:
        row = first_own or first_sub
        message = (f"layer {layer} ({lf.type}), run by the port on the reference's own inputs, diverges: "
                   f"{row.name}: {explained[row.name]}")
        if first_sub is not None:
            message += (f". The first diverging sub-block (execution order) is "
                        f"{first_sub.name[len(names.act(layer)) + 1:]}")
        report.find(Finding("layer-divergence", where, message,
                            evidence={"layer": layer, "type": lf.type, "tensor": row.name,
                                      **{k: (row.metrics or {}).get(k) for k in ("max_abs", "max_rel", "cosine",
                                                                                  "mismatched_fraction")}}))
    if first_sub is not None:
        path = first_sub.name[len(names.act(layer)) + 1:]
        report.find(Finding("sub-block-divergence", f"layer {layer}, {path}",
                            f"inside layer {layer} ({lf.type}) the first sub-block that diverges is {path} "
                            f"({first_sub.name}): {explained[first_sub.name]}",
                            evidence={"layer": layer, "sub_block": path, "mode": "isolated"}))

    # ---- weights the port wrote back (after loading the param.* tensors): bitwise
    weight_names = [n for n in lf.param_names() if n in produced]
    bad_weights = []
    for name in weight_names:
        metrics = compare_tensors(lf.get(f"{PARAM}{name}"), produced[name], BITWISE)
        if not metrics.passed:
            bad_weights.append(name)
            report.add(Row("weights", where, name, False, metrics=metrics.as_dict(), tolerance=BITWISE.as_dict(),
                           note=metrics.reason))
    if weight_names:
        report.add(Row("weights", "model", "weights loaded", not bad_weights,
                       note=f"{len(weight_names) - len(bad_weights)} of {len(weight_names)} weight tensors bitwise "
                            f"equal to the layer file's param.* tensors"))
        if bad_weights:
            report.find(Finding("weights-differ", where, f"{len(bad_weights)} weight tensor(s) the port wrote differ "
                                                         f"from the param.* tensors it should have loaded, first "
                                                         f"{bad_weights[0]}", evidence={"tensors": bad_weights[:50]}))

    # ---- the port's own Detect bias init
    if init_names:
        biases: dict[int, dict[str, torch.Tensor]] = {}
        for level in range(len(lf.strides)):
            for kind, short in (("cls_bias", "cls"), ("box_bias", "box")):
                name = names.init_bias(kind, level, "stored")
                if name in produced:
                    biases.setdefault(level, {})[short] = produced[name]
        if biases:
            structure.diagnose_bias_init(_LayerFileAsReference(lf), _port_bias_candidate(biases, str(output)), report)
        else:
            report.coverage.setdefault("not_checked", []).append(
                f"Detect bias init: the output has no init.cls_bias.{{level}} (write the port's freshly initialised "
                f"class/box biases as init.cls_bias.{{level}} / init.box_bias.{{level}})")

    # ---- coverage
    report.coverage["isolated"] = {"reference_tensors": len(own), "compared": sum(n in produced for n in own),
                                   "left_out": [n for n in own if n not in produced]}
    if sub:
        report.coverage["sub_blocks"] = {"layer": layer, "reference": len(sub),
                                         "compared": sum(n in produced for n in sub),
                                         "left_out": [n for n in sub if n not in produced]}
    return report


# ====================================================================================== candidate dump
def write_candidate_dump(reference, candidate, out: str | os.PathLike, *, force: bool = False,
                         inject: str | None = None, weights: bool = True, isolated: bool = False) -> Path:
    """Run a live candidate end to end on the reference's batch and write what it computed as a candidate dump.

    This is what a port in another language writes (docs/porting-protocol.md): `batch.img` it ran on, its
    weights under reference names, every `act.*` it produced, its own fresh Detect biases as
    `init.{cls,box}_bias.{l}.stored`, and a manifest with `kind: "candidate"`. With `isolated`, also each layer
    run alone on the reference's own inputs, as `isolated.act.*`.
    """
    from parity.replay.candidates import Candidate, load_candidate
    from parity.dump.files import Dump, DumpWriter

    if not isinstance(reference, Dump):
        reference = Dump(reference)
    if not isinstance(candidate, Candidate):
        candidate = load_candidate(candidate, reference, inject=inject)
    if not candidate.live:
        raise ParityError("write_candidate_dump needs a live candidate (builtin or package.module:factory)")
    candidate.prepare(reference)
    # the weights as loaded, before the train-mode forward moves BatchNorm's running statistics
    loaded = {name: tensor.detach().clone() for name, tensor in (candidate.weight_tensors() or {}).items()} \
        if weights else {}
    head = reference.model.get("head_index")
    img = reference.get(names.batch_img())
    acts = candidate.run_chained(img, None, head_index=head)
    if isolated:
        for entry in reference.layers:
            inputs = [reference.get(n) for n in entry["inputs"]]
            is_head = entry["index"] == head
            produced = {**candidate.layer_stages(entry["index"], inputs, is_head=is_head),
                        **candidate.run_layer(entry["index"], inputs, is_head=is_head)}
            acts.update({names.isolated(n): t for n, t in produced.items()})
    biases = candidate.fresh_head_biases(reference) or {}
    counts = candidate.param_counts() or {}
    with DumpWriter(out, force=force, kind="candidate") as writer:
        writer.add(names.batch_img(), img)
        for name, tensor in loaded.items():
            writer.add(name, tensor)
        for name, tensor in acts.items():
            writer.add(name, tensor)
        for level, entry in biases.items():
            for short, kind in (("cls", "cls_bias"), ("box", "box_bias")):
                if short in entry:
                    writer.add(names.init_bias(kind, level, "stored"), entry[short])
        layers = [{"index": i, "type": candidate.layer_type(i), "parameters": n} for i, n in sorted(counts.items())]
        manifest = {
            "producer": {"tool": "parity.porting.write_candidate_dump", **candidate.describe()},
            "model": {"nc": reference.model.get("nc"), "reg_max": reference.model.get("reg_max"),
                      "strides": reference.model.get("strides"), "head_index": head, "layers": layers},
        }
        return writer.commit(_jsonable(manifest))


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


# ================================================================================================ CLI
def cmd_export_layer(args) -> int:
    from rich.console import Console

    from parity.dump.files import Dump

    reference = Dump(args.reference)
    path = export_layer(reference, args.layer, args.out, candidate=args.candidate, map_file=args.map_file,
                        force=True)
    lf = LayerFile(path)
    groups: dict[str, int] = {}
    for name in lf.names:
        groups[name.split(".", 1)[0]] = groups.get(name.split(".", 1)[0], 0) + 1
    Console().print(f"[green]layer {lf.layer} ({lf.type})[/green] written to {path}: "
                    + ", ".join(f"{n} {g}.*" for g, n in groups.items())
                    + f"; inputs from {', '.join(lf.inputs)}", highlight=False)
    return 0


def parse_layer_list(text: str) -> list[int]:
    """'0-9,22' -> [0, 1, ..., 9, 22]."""
    indices: list[int] = []
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        try:
            lo, hi = int(first), int(last or first)
        except ValueError:
            raise ParityError(f"--layers {text!r}: expected indices and ranges like 0-9,22; found {part!r}") from None
        if lo < 0 or hi < lo:
            raise ParityError(f"--layers {text!r}: expected ascending non-negative ranges; found {part!r}")
        indices.extend(range(lo, hi + 1))
    return indices


def cmd_export_layers(args) -> int:
    from parity.dump.files import Dump

    reference = Dump(args.reference)
    layers = parse_layer_list(args.layers) if args.layers else None
    out = export_layers(reference, args.out, layers=layers)
    count = len(layers) if layers is not None else len(reference.model.get("layers", []))
    print(f"wrote {out}: {count} layers (layer.<i>.input.k / .param.<name> / .expected.<name>)")
    return 0


def cmd_check_layer(args) -> int:
    from rich.console import Console

    report = check_layer(args.layer_file, args.output, profile=args.profile)
    try:
        from parity.report import text as render
    except ImportError:  # pragma: no cover - render ships with the tool
        render = None
    if args.json is not None:
        text = render.to_json(report, None if args.json == "-" else args.json) if render else \
            json.dumps(report.to_dict(), indent=1, default=str)
        if args.json == "-":
            print(text, end="")
            return report.exit_code
    if render is not None:
        render.render(report, Console(), verbose=args.verbose)
    else:  # pragma: no cover
        Console().print(f"{report.verdict}: {len(report.failed_rows)} of {len(report.rows)} checks failed")
    return report.exit_code


def register(sub) -> None:
    export = sub.add_parser(
        "export-layer", help="write one layer's reference inputs, parameters and expected outputs (for a port)",
        description="Write ONE safetensors file with layer N's reference inputs (input.k), parameters (param.<ultralytics "
                    "name>, and mapped.<candidate name> with --candidate), expected outputs (expected.act.N...) and, "
                    "for the Detect head, the bias init (expected.init...). See docs/porting-protocol.md.")
    export.add_argument("--reference", required=True, help="reference dump directory")
    export.add_argument("--layer", type=int, required=True, help="layer index (e.g. 23, the Detect head of yolo11n)")
    export.add_argument("--out", required=True, help="output .safetensors file")
    export.add_argument("--candidate", help="also write the parameters under this candidate's names: builtin or "
                                            "package.module:factory (key mapping of parity.replay.mapping)")
    export.add_argument("--map", dest="map_file", help="YAML/JSON key_map/layer_map for --candidate")
    export.set_defaults(func=cmd_export_layer)

    every = sub.add_parser(
        "export-layers", help="write every layer's inputs, parameters and expected outputs into one file",
        description="Write ONE safetensors file holding every layer's layer file (see export-layer): layer i's "
                    "tensors as layer.<i>.input.k, layer.<i>.param.<name>, layer.<i>.expected.<name>, and its metadata "
                    "in the JSON metadata entry `layers`. A port loops over the layers of one file.")
    every.add_argument("--reference", required=True, help="reference dump directory")
    every.add_argument("--out", required=True, help="output .safetensors file")
    every.add_argument("--layers", help="layers to export, e.g. 0-9,22 (default: all)")
    every.set_defaults(func=cmd_export_layers)

    check = sub.add_parser(
        "check-layer", help="judge a port's output for one layer against an export-layer file",
        description="Compare the tensors a port wrote (act.N..., init.cls_bias.L) with an export-layer file. "
                    "Exit 0 parity, 1 divergence, 2 bad input.")
    check.add_argument("--layer-file", required=True, help="the file written by `parity export-layer`")
    check.add_argument("--output", required=True, help="the port's output: a .safetensors file (or a candidate dump)")
    check.add_argument("--profile", default=None, help=f"tolerance profile (default {DEFAULT_PROFILE})")
    check.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                       help="write the report as JSON to PATH (bare --json: to stdout, instead of the table)")
    check.add_argument("--verbose", action="store_true", help="show every row")
    check.set_defaults(func=cmd_check_layer)


__all__ = ["LayerFile", "check_layer", "export_layer", "export_layers", "layer_file_contents", "expected_names", "read_port_output", "register",
           "write_candidate_dump"]

