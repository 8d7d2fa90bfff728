"""What a port is given and what it is measured against, written from a reference (docs/porting-protocol.md).

`export_layer` writes one layer file (`parity.dump.layer_file`: the layer's reference inputs, parameters and
expected outputs), `export_layers` every layer's in one file, and `write_candidate_dump` runs a live candidate end
to end and writes what it computed as a candidate dump, the format a port in another language writes, so that
`parity compare` on that dump can be checked against the live replay.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from parity import jsonio
from parity.dump import names
from parity.dump.layer_file import (EXPECTED, INPUT, LAYER_SCHEMA, LAYER_SCHEMA_VERSION, LAYERS_PREFIX, LAYERS_SCHEMA,
                                    MAPPED, PARAM, check_replaceable, write_safetensors)
from parity.errors import ParityError

if TYPE_CHECKING:
    import torch

    from parity.dump.files import Dump

LAYER_FILE_WRITER = "a layer file written by export-layer"
LAYERS_FILE_WRITER = "a file written by export-layers"
# The Detect head's bias-init tensors a layer file carries, per level.
INIT_VARIANTS = (("cls_bias", ("stored", "float32", "float64")), ("box_bias", ("stored",)))


# ============================================================================================ layer files
def _as_dump(reference) -> Dump:
    from parity.dump.files import Dump

    return reference if isinstance(reference, Dump) else Dump(reference)


def _layer_entry(reference: Dump, layer: int) -> dict:
    layers = reference.layers
    if not layers:
        raise ParityError(f"{reference.path}: the manifest has no model.layers table, so no layer can be exported")
    for entry in layers:
        if entry.get("index") == layer:
            for key in ("inputs", "outputs"):
                if key not in entry:
                    raise ParityError(f"{reference.path}: model.layers entry {layer} lacks {key!r}")
            return entry
    raise ParityError(f"layer {layer}: the reference has layers {layers[0].get('index')}..{layers[-1].get('index')}")


def expected_names(reference: Dump, entry: dict) -> tuple[list[str], list[str]]:
    """(the layer's own outputs, its sub-module outputs), in capture (execution) order."""
    index = entry["index"]
    head = reference.model.get("head_index")
    own = list(entry["outputs"])
    if index == head and names.act(index, "dfl") in reference and names.act(index, "dfl") not in own:
        own.append(names.act(index, "dfl"))
    sub = [n for n in reference.names(names.act(index) + ".") if n not in own]
    return own, sub


def _mapped_params(reference: Dump, layer: int, spec: str, map_file: str | None) -> tuple[dict[str, torch.Tensor], dict]:
    """The layer's reference parameters under a live candidate's names, and {ref_key: [cand_keys]}."""
    from parity.replay.candidates import LazyTensors, ModuleCandidate, load_candidate

    candidate = load_candidate(spec, reference, map_file=map_file)
    if not isinstance(candidate, ModuleCandidate):
        raise ParityError(f"candidate {spec}: a key mapping needs a live candidate (builtin or package.module:factory), "
                          f"not a dump")
    candidate.prepare(reference)
    mapping = candidate.mapping
    prefix = f"model.{layer}."
    wanted = {rk: entry.cand_keys for rk, entry in mapping.ref_to_cand.items() if rk.startswith(prefix)}
    if not wanted:
        raise ParityError(f"candidate {spec}: none of layer {layer}'s reference tensors maps onto the candidate")
    under_cand = mapping.reference_to_candidate(LazyTensors(reference, "model."))
    tensors = {f"{MAPPED}{ck}": under_cand[ck] for cks in wanted.values() for ck in cks if ck in under_cand}
    return tensors, wanted


def export_layer(reference, layer: int, out: str | os.PathLike, *, candidate: str | None = None,
                 map_file: str | None = None, force: bool = True) -> Path:
    """Write layer `layer`'s inputs, parameters and expected outputs as one layer file (`parity.dump.layer_file`)."""
    reference = _as_dump(reference)
    out = Path(out)
    check_replaceable(out, force=force, what=LAYER_FILE_WRITER, schema=LAYER_SCHEMA)
    tensors, metadata = layer_file_contents(reference, layer, candidate=candidate, map_file=map_file)
    write_safetensors(tensors, metadata, out)
    return out


def layer_file_contents(reference: Dump, layer: int, *, candidate: str | None = None, map_file: str | None = None
                        ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the `__metadata__` of layer `layer`'s layer file."""
    entry = _layer_entry(reference, layer)
    tensors = _inputs_and_params(reference, entry)
    own, sub = expected_names(reference, entry)
    for name in own + sub:
        tensors[f"{EXPECTED}{name}"] = reference.get(name)
    init_names = _head_init_names(reference, layer)
    tensors.update({f"{EXPECTED}{name}": reference.get(name) for name in init_names})
    mapping = None
    if candidate:
        mapped, mapping = _mapped_params(reference, layer, candidate, map_file)
        tensors.update(mapped)
    metadata = _layer_metadata(reference, entry, own, sub, init_names, tensors)
    if mapping is not None:
        metadata["candidate"] = candidate
        metadata["mapping"] = json.dumps(mapping)
    return tensors, metadata


def _inputs_and_params(reference: Dump, entry: dict) -> dict[str, torch.Tensor]:
    layer = entry["index"]
    tensors: dict[str, torch.Tensor] = {}
    for k, source in enumerate(entry["inputs"]):
        try:
            tensors[f"{INPUT}{k}"] = reference.get(source)
        except ParityError as error:
            raise ParityError(f"layer {layer}: cannot read its input {source!r} from the reference: {error}") from None
    for key in reference.names(f"model.{layer}."):
        tensors[f"{PARAM}{key}"] = reference.get(key)
    return tensors


def _head_init_names(reference: Dump, layer: int) -> list[str]:
    """The Detect head's bias-init tensors the reference holds (none for any other layer)."""
    if layer != reference.model.get("head_index"):
        return []
    found = []
    for level in range(len(reference.model.get("strides") or [])):
        for kind, variants in INIT_VARIANTS:
            found += [n for n in (names.init_bias(kind, level, v) for v in variants) if n in reference]
    return found


def _layer_metadata(reference: Dump, entry: dict, own: list[str], sub: list[str], init_names: list[str],
                    tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    model = reference.model
    return {
        "schema": LAYER_SCHEMA,
        "schema_version": str(LAYER_SCHEMA_VERSION),
        "layer": str(entry["index"]),
        "type": str(entry.get("type", "")),
        "from": json.dumps(entry.get("from", [])),
        "inputs": json.dumps(list(entry["inputs"])),
        "outputs": json.dumps(own),
        "output_shapes": json.dumps({name: list(tensors[f"{EXPECTED}{name}"].shape) for name in own}),
        "sub_blocks": json.dumps(sub),
        "init": json.dumps(init_names),
        "params": json.dumps(reference.names(f"model.{entry['index']}.")),
        "head_index": json.dumps(model.get("head_index")),
        "nc": json.dumps(model.get("nc")),
        "reg_max": json.dumps(model.get("reg_max")),
        "strides": json.dumps(model.get("strides") or []),
        "end2end": json.dumps(model.get("end2end")),
        "legacy_head": json.dumps(model.get("legacy_head")),
        "model": str(model.get("yaml") or reference.config.get("model") or ""),
        "batchnorm": json.dumps({"eps": 1e-3, "momentum": 0.03, "mode": "train: normalise with the batch's own "
                                 "mean and biased variance over (N, H, W); running_* are not used"}),
        "cls_bias_formula": (reference.manifest.get("init") or {}).get("cls_bias_formula",
                                                                        "log(5 / nc / (640 / stride) ** 2)"),
        "reference": str(reference.path),
        "reference_versions": json.dumps(reference.manifest.get("versions") or {}),
        "reference_environment": json.dumps(reference.manifest.get("environment") or {}),
        "precision": str(reference.config.get("precision", "fp32")),
    }


def export_layers(reference, out: str | os.PathLike, *, layers: list[int] | None = None, force: bool = True) -> Path:
    """Every layer's layer file in ONE safetensors file, so a port loops over one file: layer i's tensors under
    `layer.{i}.` + their layer-file names, its metadata under `layers` (a JSON object keyed by the index)."""
    reference = _as_dump(reference)
    out = Path(out)
    check_replaceable(out, force=force, what=LAYERS_FILE_WRITER, schema=LAYERS_SCHEMA)
    indices = layers if layers is not None else [e["index"] for e in reference.model.get("layers", [])]
    tensors: dict[str, torch.Tensor] = {}
    per_layer: dict[str, dict[str, str]] = {}
    for index in indices:
        layer_tensors, metadata = layer_file_contents(reference, index)
        tensors.update({f"{LAYERS_PREFIX}{index}.{name}": t for name, t in layer_tensors.items()})
        per_layer[str(index)] = metadata
    write_safetensors(tensors, {"schema": LAYERS_SCHEMA, "schema_version": str(LAYER_SCHEMA_VERSION),
                                "layer_indices": json.dumps(indices), "layers": json.dumps(per_layer)}, out)
    return out


# ====================================================================================== candidate dump
def write_candidate_dump(reference, candidate, out: str | os.PathLike, *, force: bool = False,
                         inject: str | None = None, weights: bool = True, isolated: bool = False) -> Path:
    """Run a live candidate end to end on the reference's batch and write what it computed as a candidate dump.

    This is what a port in another language writes (docs/porting-protocol.md): `batch.img` it ran on, its
    weights under reference names, every `act.*` it produced, its own fresh Detect biases as
    `init.{cls,box}_bias.{l}.stored`, and a manifest with `kind: "candidate"`. With `isolated`, also each layer
    run alone on the reference's own inputs, as `isolated.act.*`.
    """
    from parity.dump.files import DumpWriter
    from parity.replay.candidates import Candidate, load_candidate

    reference = _as_dump(reference)
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
        acts.update(_isolated_outputs(reference, candidate, head))
    biases = candidate.fresh_head_biases(reference) or {}
    with DumpWriter(out, force=force, kind="candidate") as writer:
        writer.add(names.batch_img(), img)
        for tensors in (loaded, acts):
            for name, tensor in tensors.items():
                writer.add(name, tensor)
        for level, entry in biases.items():
            for short, kind in (("cls", "cls_bias"), ("box", "box_bias")):
                if short in entry:
                    writer.add(names.init_bias(kind, level, "stored"), entry[short])
        return writer.commit(jsonio.plain(_candidate_manifest(reference, candidate, head)))


def _isolated_outputs(reference: Dump, candidate, head: int | None) -> dict[str, torch.Tensor]:
    """Each layer (and its stages) run alone on the reference's own inputs, under `isolated.act.*`."""
    out: dict[str, torch.Tensor] = {}
    for entry in reference.layers:
        inputs = [reference.get(n) for n in entry["inputs"]]
        is_head = entry["index"] == head
        produced = {**candidate.layer_stages(entry["index"], inputs, is_head=is_head),
                    **candidate.run_layer(entry["index"], inputs, is_head=is_head)}
        out.update({names.isolated(n): t for n, t in produced.items()})
    return out


def _candidate_manifest(reference: Dump, candidate, head: int | None) -> dict:
    counts = candidate.param_counts() or {}
    layers = [{"index": i, "type": candidate.layer_type(i), "parameters": n} for i, n in sorted(counts.items())]
    return {
        "producer": {"tool": "parity.replay.export.write_candidate_dump", **candidate.describe()},
        "model": {"nc": reference.model.get("nc"), "reg_max": reference.model.get("reg_max"),
                  "strides": reference.model.get("strides"), "head_index": head, "layers": layers},
    }


__all__ = ["expected_names", "export_layer", "export_layers", "layer_file_contents", "write_candidate_dump"]
