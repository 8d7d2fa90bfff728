"""`parity scaffold --candidate module:factory`: a starter adapter file for a PyTorch port.

It runs what `parity compare` runs first (one traced forward, the layer inference, the key mapping with its
replay checks) and writes down what was found: the proposed `layer_map`, the layers computed by operations
inside a parent's forward, `key_map` entries that pin tensors a shape alone cannot tell apart, and comments on
what could not be inferred and how to add it. The file is itself a candidate (`--candidate <file>:build`).
docs/model-adapter.md walks through it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from parity.errors import OutputExists, ParityError


@dataclass
class ScaffoldConfig:
    candidate: str                 # package.module:factory
    reference: str                 # a reference dump directory
    out: str | None = None         # where to write (default: <module>_adapter.py in the working directory)
    force: bool = False


def scaffold_text(spec: str, reference_path: str) -> str:
    """The adapter file for candidate `spec` against the reference dump at `reference_path`."""
    from parity.dump.files import Dump
    from parity.replay.candidates import load_candidate

    reference = Dump(reference_path)
    candidate = load_candidate(spec, reference)
    if not getattr(candidate, "traced", False):
        raise ParityError(f"candidate {spec}: it brings its own adapter (run_layer / forward_layers / ultralytics "
                          f"classes) or is a dump; there is nothing to scaffold")
    findings = candidate.prepare(reference)
    types = {e["index"]: e.get("type") for e in reference.layers}
    lines = _header(spec, reference.path)
    lines += _layer_map(candidate.inference, types)
    lines += _key_map(candidate.mapping)
    unmapped = [f for f in findings if f.signature in ("weight-unmapped", "module-not-run")]
    if unmapped:
        lines += ["", "# Weights that did not map (compare reports them):"]
        lines += [f"#   {f.where}: {f.message}" for f in unmapped]
    return "\n".join(lines) + "\n"


def _header(spec: str, reference_path) -> list[str]:
    """The docstring, the import of the candidate's factory, and `build`."""
    module_name, _, factory = spec.partition(":")
    return [f'"""Adapter for {spec}, written by `parity scaffold` against {reference_path}.',
            "",
            "Everything below was inferred from one traced forward of the candidate; edit what is wrong and run",
            f"    parity compare --reference {reference_path} --candidate {{this module}}:build --what layers",
            'See docs/model-adapter.md for the contract."""',
            "",
            f"from {module_name} import {factory.split('.')[0]} as _factory",
            "",
            "",
            "def build(nc=None):",
            "    return _factory() if nc is None else _factory(nc=nc)",
            ""]


def _layer_map(inference, types: dict) -> list[str]:
    """`layer_map`, then comments on the layers computed inside a parent's forward and on what was not inferred."""
    lines = ["", "# Candidate module -> ultralytics layer index, in the order the modules ran.", "layer_map = {"]
    for index, layer in sorted(inference.layers.items()):
        if layer.kind == "module":
            note = f"  # {types.get(index)}" + ("; its structure differs (see parity compare)"
                                                 if layer.structure_differs else "")
            lines.append(f"    {layer.name + '.'!r}: {index},{note}")
    lines.append("}")
    functional = [(i, l) for i, l in sorted(inference.layers.items()) if l.kind == "op"]
    if functional:
        lines += ["", "# Computed inside a parent's forward; the harness replays these itself (no entry needed):"]
        for index, layer in functional:
            lines.append(f"#   layer {index} {types.get(index)}: {layer.describe()}")
    if inference.problems:
        lines += ["", "# NOT inferred (not compared until you add them):"]
        for problem in inference.problems:
            lines.append(f"#   {problem.message}")
            lines.append(f"#     fix: {problem.fix}")
    return lines


def _key_map(mapping) -> list[str]:
    """`key_map`: a rule for each tensor the shapes and the call order could not place, and the others as comments."""
    lines = ["", "# Tensors whose shapes alone do not say which is which. The harness matched them in the order the",
             "# modules run and checked the result by replaying the layer alone; entries here pin the match.",
             "key_map = {"]
    for index in sorted(mapping.ambiguous):
        resolved = mapping.resolved.get(index, "not checked")
        needed = "none of the" in resolved
        lines.append(f"    # layer {index}: {mapping.ambiguous[index]} ({resolved})")
        if not needed and index not in mapping.order_decided:
            continue        # the shapes and the call order agree, and the replay confirmed it
        for ref_key, entry in mapping.ref_to_cand.items():
            if not ref_key.startswith(f"model.{index}.") or ref_key.endswith("num_batches_tracked"):
                continue
            if not _in_ambiguous_group(mapping, index, ref_key):
                continue
            if len(entry.cand_keys) > 1:
                lines.append(f"    # {ref_key} <- {' + '.join(entry.cand_keys)} (a split: no key_map form, the "
                             f"harness concatenates them along dim 0)")
                continue
            rule = f"    {'^' + re.escape(entry.cand_keys[0]) + '$'!r}: {ref_key!r},"
            lines.append(rule if needed else "    # " + rule.strip())
    lines.append("}")
    return lines


def _in_ambiguous_group(mapping, index: int, ref_key: str) -> bool:
    """A reference tensor of one of the layer's equal-shaped sub-modules named in `mapping.ambiguous`."""
    words = mapping.ambiguous.get(index, "")
    rel = ref_key[len(f"model.{index}."):].rsplit(".", 1)[0]
    rel = rel.rsplit(".", 1)[0] if rel.endswith((".conv", ".bn")) else rel
    return re.search(rf"(^|[ ;]){re.escape(rel)}( |$)", words) is not None


def write_scaffold(config: ScaffoldConfig) -> Path:
    text = scaffold_text(config.candidate, config.reference)
    module_name = config.candidate.partition(":")[0].rsplit(".", 1)[-1]
    out = Path(config.out or f"{module_name}_adapter.py")
    if out.exists() and not config.force:
        raise OutputExists(out, "adapter file")
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    return out
