"""Load the thing being compared with the reference: a candidate.

A candidate is one of

* `builtin`: the clean-room detector in `parity.reimpl` (optionally with an injected bug, `inject=`);
* `package.module:factory`: a callable returning an `nn.Module` (a class works too). Its parameters are mapped
  onto ultralytics' names by `parity.replay.mapping`; a `layer_map` ({candidate_prefix: layer_index}) and a `key_map`
  ({regex: replacement}) may be given as attributes of the module, as module-level names beside the factory
  (`layer_map`/`LAYER_MAP`, `key_map`/`KEY_MAP`), or in a YAML/JSON file passed as `map_file` (`--map`):

      layer_map: {"backbone.stem.": 0, "backbone.stage1.": 1, ...}
      key_map: {"^backbone\\.stem\\.": "model.0.", ...}

  (a file holding neither key is taken as a key_map). Without a layer map only the model's output is compared;
* a module built from ultralytics' own classes (layers carrying ultralytics' `.f`/`.i` attributes, e.g. a
  `DetectionModel` or its `.model` Sequential): needs no map at all;
* a candidate DUMP: a directory holding `manifest.json` (docs/dump-format.md) written by a port in any language.
  Its activations are read from the dump instead of running anything; it is compared on what it has, and the
  report's `coverage` lists what it left out.

Live candidates get the reference's weights through the key mapping (`prepare`), run in train mode (the
reference was captured in train mode: BatchNorm uses batch statistics), and are rebuilt fresh, without
loading any weights, to read their own Detect bias initialisation.
"""

from __future__ import annotations

import importlib
import json
import math
import re
import sys
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from parity.dump import names
from parity.dump.files import MANIFEST, Dump
from parity.errors import ParityError
from parity.findings import Finding
from parity.replay.tracing import tensors_in

# ultralytics' initialize_weights() sets these on every BatchNorm2d; the reference dump was built with them.
REFERENCE_BN_EPS = 1e-3
REFERENCE_BN_MOMENTUM = 0.03


# ------------------------------------------------------------------------------------------- outputs
def layer_output_tensors(index: int, value: Any, *, reg_max: int | None = None, nc: int | None = None,
                         is_head: bool = False) -> dict[str, torch.Tensor]:
    """A layer's output under its dump names (`act.{i}`, `act.{i}.{k}`, `act.{i}.boxes`/`.scores`)."""
    if is_head and reg_max and nc:
        value = head_outputs(value, reg_max, nc)
    return names.flatten_output(names.act(index), value)


def head_outputs(value: Any, reg_max: int, nc: int) -> Any:
    """A head's train-mode output as ultralytics 8.4's {boxes (B, 4*reg_max, A), scores (B, nc, A)} where it
    can be recognised: a dict with those keys, per-level (B, 4*reg_max + nc, H, W) maps (ultralytics <= 8.3), per-level
    box and class maps (two lists, or one list of pairs), or a (boxes, scores) tuple of flat tensors."""
    if isinstance(value, Mapping) and ("boxes" in value or "scores" in value):
        return value
    flat = tensors_in(value)
    if not flat:
        return value
    box_c, both = 4 * reg_max, 4 * reg_max + nc
    b = flat[0].shape[0]
    if all(t.dim() == 4 and t.shape[1] == both for t in flat):
        from parity.dump.layouts import levels_to_dict

        return levels_to_dict(flat, reg_max, nc)
    if all(t.dim() == 4 for t in flat) and len(flat) % 2 == 0:
        if box_c != nc:
            boxes = [t for t in flat if t.shape[1] == box_c]
            scores = [t for t in flat if t.shape[1] == nc]
        else:
            boxes, scores = flat[: len(flat) // 2], flat[len(flat) // 2:]
        if len(boxes) == len(scores) == len(flat) // 2:
            return {"boxes": torch.cat([t.reshape(b, box_c, -1) for t in boxes], -1),
                    "scores": torch.cat([t.reshape(b, nc, -1) for t in scores], -1)}
    if len(flat) == 2 and all(t.dim() == 3 for t in flat):
        first, second = flat
        if first.shape[1] == box_c and second.shape[1] == nc:
            return {"boxes": first, "scores": second}
        if first.shape[1] == nc and second.shape[1] == box_c:
            return {"boxes": second, "scores": first}
    if len(flat) == 1 and flat[0].dim() == 3 and flat[0].shape[1] == both:
        return {"boxes": flat[0][:, :box_c], "scores": flat[0][:, box_c:]}
    return value


@contextmanager
def capture_outputs(modules: Mapping[str, nn.Module], sink: dict[str, torch.Tensor]):
    """Forward hooks writing each module's output into `sink` under the given prefix; a module called more than
    once gets `#1`, `#2`, … on its later outputs (as the reference capture names them)."""
    handles = []

    def recorder(prefix: str):
        calls = [0]

        def hook(_module, _inputs, output):
            name = names.nth_call(prefix, calls[0])
            calls[0] += 1
            for key, tensor in names.flatten_output(name, output).items():
                sink[key] = tensor.detach()

        return hook

    for prefix, module in modules.items():
        handles.append(module.register_forward_hook(recorder(prefix)))
    try:
        yield sink
    finally:
        for handle in handles:
            handle.remove()


class LazyTensors(Mapping):
    """A read-only mapping over a dump's tensors that reads each tensor only when asked (no whole-dump copies)."""

    def __init__(self, dump: Dump, prefix: str = ""):
        self.dump = dump
        self.keys_ = dump.names(prefix)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.dump:
            raise KeyError(key)
        return self.dump.get(key)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self.dump

    def __iter__(self):
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)


# ----------------------------------------------------------------------------------------- candidates
class Candidate:
    """What the layer replay needs from a candidate. Live candidates run; dump candidates only answer `get`."""

    kind = "abstract"
    live = False
    label = "candidate"

    def prepare(self, reference: Dump) -> list[Finding]:
        return []

    def describe(self) -> dict:
        return {"kind": self.kind, "label": self.label}

    # -- structure
    def layer_count(self) -> int | None:
        return None

    def layer_type(self, index: int) -> str | None:
        return None

    def param_counts(self) -> dict[int, int] | None:
        return None

    def fresh_head_biases(self, reference: Dump) -> dict[int, dict[str, torch.Tensor]] | None:
        """{level: {"cls": bias, "box": bias}} as the candidate initialises them, before any weight loading."""
        return None

    def batchnorms(self) -> list[dict]:
        """[{layer, path, eps, momentum}] for every BatchNorm the candidate has (live torch modules only)."""
        return []

    def weight_tensors(self) -> Mapping[str, torch.Tensor] | None:
        """The candidate's weights under reference names (after `prepare`), for a dump candidate as written."""
        return None

    # -- numbers
    def has_layer(self, index: int) -> bool:
        return False

    def has_isolated_outputs(self) -> bool:
        """Whether the candidate holds outputs it computed on the reference's own inputs without being run
        (a candidate dump's isolated.act.*); a live candidate computes them when asked instead."""
        return False

    def run_layer(self, index: int, inputs: list[torch.Tensor], *, is_head: bool = False) -> dict[str, torch.Tensor]:
        """Layer `index` alone on `inputs`; its outputs under dump names."""
        raise NotImplementedError

    def run_chained(self, img: torch.Tensor, on_layer: Callable[[int], None] | None = None, *,
                    head_index: int | None = None) -> dict[str, torch.Tensor]:
        """Every available `act.*` tensor of one end-to-end train-mode forward on `img`."""
        raise NotImplementedError

    def layer_stages(self, index: int, inputs: list[torch.Tensor], *, is_head: bool = False,
                     reference_paths: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Sub-block outputs of layer `index` on `inputs`, under `act.{index}.{path}` names."""
        return {}

    def get(self, name: str) -> torch.Tensor | None:
        return None


# ------------------------------------------------------------------------------------------ mappings
def read_map_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ParityError(f"--map {path}: no such file")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as error:  # noqa: BLE001 - yaml and json raise different types
        raise ParityError(f"--map {path}: cannot parse it ({error})") from None
    if not isinstance(data, dict):
        raise ParityError(f"--map {path}: expected a mapping with key_map and/or layer_map")
    if "key_map" in data or "layer_map" in data:
        return {"key_map": data.get("key_map"), "layer_map": data.get("layer_map")}
    return {"key_map": data, "layer_map": None}


def normalize_layer_map(layer_map: Mapping | None) -> dict[str, int] | None:
    """Accept {prefix: index} or {index: prefix}; return {prefix_with_trailing_dot: index}."""
    if not layer_map:
        return None
    out = {}
    for key, value in layer_map.items():
        if isinstance(value, str) and (isinstance(key, int) or str(key).lstrip("-").isdigit()):
            key, value = value, int(key)
        if not isinstance(value, int) and not str(value).isdigit():
            raise ParityError(f"layer_map entry {key!r}: {value!r} is not a layer index")
        prefix = str(key)
        if prefix and not prefix.endswith("."):
            prefix += "."
        out[prefix] = int(value)
    return out


def _ultralytics_layers(module: nn.Module) -> tuple[str, list[nn.Module]] | None:
    """A module made of ultralytics layers: (key prefix of layer 0, layers) — `DetectionModel` gives ("model.", …)."""
    for prefix, seq in (("model.", getattr(module, "model", None)), ("", module)):
        if isinstance(seq, (nn.Sequential, nn.ModuleList)) and len(seq) and all(
            hasattr(layer, "f") and hasattr(layer, "i") for layer in seq
        ):
            return prefix, list(seq)
    return None


class ModuleCandidate(Candidate):
    """A live torch module: the built-in detector, a user's port, or a model built from ultralytics classes."""

    kind = "module"
    live = True

    def __init__(self, module: nn.Module, *, label: str, freshly_built: bool = False, key_map=None,
                 layer_map: Mapping | None = None, kind: str | None = None, device: str | torch.device = "cpu"):
        self.module = module
        self.label = label
        # The bias-init check needs the biases the candidate's own init produced, before the reference's weights
        # are loaded over them: keep the 1-D tensors (biases, norms) of a module built here from its factory.
        self.fresh_vectors = ({k: v.detach().clone() for k, v in module.state_dict().items() if v.dim() == 1}
                              if freshly_built else None)
        self.key_map = key_map
        self.device = torch.device(device)
        if kind:
            self.kind = kind
        self.mapping = None
        self.mapping_findings: list[Finding] = []
        self.reg_max: int | None = getattr(module, "reg_max", None)
        self.nc: int | None = getattr(module, "nc", None)
        self.layers: dict[int, nn.Module] = {}
        self.layer_paths: dict[int, str] = {}
        # A plain module without an adapter of its own: its layers are read off one traced forward (`prepare`)
        self.traced = False
        self.trace = None
        self.inference = None
        self.functional: dict[int, Any] = {}
        self.layer_inputs: dict[int, list[str]] = {}
        self.reference: Dump | None = None
        ultra = _ultralytics_layers(module)
        self.ultralytics_classes = ultra is not None
        if ultra is not None:
            prefix, seq = ultra
            self.layers = dict(enumerate(seq))
            self.layer_paths = {i: f"{prefix}{i}" for i in self.layers}
            self.layer_map = {f"{prefix}{i}.": i for i in self.layers}
            if prefix == "" and key_map is None:
                self.key_map = {r"^(\d+)\.": r"model.\1."}
            self.kind = kind or "ultralytics-classes"
        else:
            self.layer_map = normalize_layer_map(layer_map if layer_map is not None else getattr(module, "layer_map", None))
            if self.layer_map:
                for prefix, index in self.layer_map.items():
                    path = prefix.rstrip(".")
                    try:
                        self.layers[index] = module.get_submodule(path) if path else module
                    except AttributeError:
                        raise ParityError(f"layer_map names {prefix!r} for layer {index}, but the candidate has no "
                                          f"sub-module {path!r}") from None
                    self.layer_paths[index] = path
            self.traced = not hasattr(module, "run_layer") and not hasattr(module, "forward_layers")
            self.user_layer_map = dict(self.layer_map or {})
        self.module.to(self.device)
        self.module.train()

    def describe(self) -> dict:
        info = {"kind": self.kind, "label": self.label, "class": type(self.module).__name__,
                "layers_known": len(self.layers), "parameters": sum(p.numel() for p in self.module.parameters())}
        if self.mapping is not None:
            info["mapping"] = self.mapping.counts()
            info["mapping_missing"] = list(self.mapping.missing)
            info["mapping_unexpected"] = list(self.mapping.unexpected)
            info["mapping_notes"] = list(self.mapping.notes)
        return info

    # -- weights
    def prepare(self, reference: Dump) -> list[Finding]:
        from parity.replay.mapping import MappingError, build_mapping, reference_shapes_from_manifest

        findings: list[Finding] = []
        ref_shapes = reference_shapes_from_manifest(reference.manifest)
        if not ref_shapes:
            raise ParityError(f"{reference.path}: the reference dump has no model.* weights to load into the candidate")
        model = reference.model
        self.nc = self.nc or model.get("nc")
        self.reg_max = self.reg_max or model.get("reg_max")
        self.reference = reference
        self.layer_inputs = {e["index"]: list(e.get("inputs") or []) for e in reference.layers if "index" in e}
        if self.traced:
            findings.extend(self._infer_layers(reference))
        orders = self._orders(reference, ref_shapes) if self.traced and self.trace is not None else (None, None)
        try:
            self.mapping = build_mapping(ref_shapes, self.module.state_dict(), key_map=self.key_map,
                                         layer_map=self.layer_map, strict=False, call_order=orders[0],
                                         reference_order=orders[1])
        except MappingError as error:
            raise ParityError(f"cannot map the candidate's parameters onto the reference's: {error}") from None
        self._check_user_layer_map(reference)
        findings.extend(self._unmapped_findings(reference))
        findings.extend(self._never_run_findings())
        try:
            self.mapping.load_reference_into(self.module, LazyTensors(reference, "model."))
        except MappingError as error:
            raise ParityError(f"cannot load the reference weights into the candidate: {error}") from None
        self.module.to(self.device).train()
        findings.extend(self._resolve_ambiguities(reference))
        self.mapping_findings = findings
        return findings

    def _orders(self, reference: Dump, ref_shapes) -> tuple[dict[str, float], dict[str, float]]:
        """{key: rank} by the order the owning modules ran: the candidate's from its trace, the reference's from
        the order of its sub-block activations in the dump (`act.{i}.{path}`)."""
        first: dict[str, int] = {}
        for event in self.trace.events:
            if event.kind == "module":
                first.setdefault(event.name, event.seq)
        cand = {}
        for key in self.module.state_dict():
            parts = key.split(".")[:-1]
            while parts and ".".join(parts) not in first:
                parts = parts[:-1]
            cand[key] = first.get(".".join(parts), math.inf) if parts else math.inf
        act_rank: dict[str, int] = {}
        for n, name in enumerate(reference.names("act.")):
            act_rank.setdefault(name[len("act."):], n)
        ref = {}
        for n, key in enumerate(ref_shapes):
            parts = key.split(".")[1:-1]          # "12", "m", "0", "cv1", "conv"
            rank = math.inf
            while parts:
                if ".".join(parts) in act_rank:
                    rank = act_rank[".".join(parts)]
                    break
                parts = parts[:-1]
            ref[key] = rank + n / 1e6
        return cand, ref

    def _resolve_ambiguities(self, reference: Dump) -> list[Finding]:
        """Where equal shapes leave a layer's tensors ambiguous, replay the layer alone under each assignment and
        keep the first that reproduces the reference's output (the call-order match is tried first)."""
        from parity.compare.tolerances import get_profile, profile_for_environment

        mapping = self.mapping
        # a candidate with its own adapter (run_layer, a layer map it keeps in its own order) is not second-guessed
        if not mapping.alternatives or not self.traced:
            return []
        profile = get_profile(profile_for_environment(reference.manifest.get("environment"),
                                                      reference.config.get("precision")))
        entries = {e["index"]: e for e in reference.layers if "index" in e}
        findings = []
        for index, alternatives in sorted(mapping.alternatives.items()):
            finding = self._resolve_layer(reference, index, alternatives, entries, profile)
            if finding is not None:
                findings.append(finding)
        # the replays ran in train mode and moved BatchNorm's running statistics: load the reference's again
        mapping.load_reference_into(self.module, LazyTensors(reference, "model."))
        self.module.to(self.device).train()
        return findings

    def _reproduces(self, reference: Dump, entry: dict | None, profile) -> bool | None:
        """Whether layer `entry` run alone on the reference's inputs gives the reference's outputs (None: it cannot
        be run alone)."""
        from parity.compare.metrics import compare_tensors

        if entry is None or not self.has_layer(entry["index"]):
            return None
        index = entry["index"]
        try:
            out = self.run_layer(index, [reference.get(n) for n in entry["inputs"]],
                                 is_head=index == reference.model.get("head_index"))
        except Exception:  # noqa: BLE001 - reported by the replay itself
            return None
        wanted = [n for n in entry["outputs"] if n in out]
        return bool(wanted) and all(compare_tensors(reference.get(n), out[n].cpu(),
                                                    profile.for_name(n, mode="isolated")).passed for n in wanted)

    def _apply_assignment(self, reference: Dump, assignment: dict) -> None:
        mapping = self.mapping
        mapping.ref_to_cand.update(assignment)
        subset = {k: reference.get(k) for k in assignment}
        sub = type(mapping)(mapping.ref_shapes, mapping.cand_shapes, dict(assignment), [], [], lambda _k: True, [], {})
        sub.load_reference_into(self.module, subset)

    def _resolve_layer(self, reference: Dump, index: int, alternatives: list[dict], entries: dict,
                       profile) -> Finding | None:
        """Try the mapping's assignment of layer `index`, then each alternative; keep the first that reproduces
        the reference (or the mapping's own when none does) and say what was found."""
        mapping = self.mapping
        default = {k: e for k, e in mapping.ref_to_cand.items() if k in alternatives[0]}
        first = self._reproduces(reference, entries.get(index), profile)
        if first is None:
            return None
        ambiguous = mapping.ambiguous[index]
        if first:
            mapping.resolved[index] = (f"the {'call-order' if self.traced else 'shape'} match reproduces the "
                                       f"reference in isolation")
            if index not in mapping.order_decided:
                return None
            return Finding(
                "mapping-ambiguous", f"layer {index}",
                f"layer {index}: {ambiguous} have equal shapes and the shapes alone would match them differently; "
                f"matched in the order the modules run, which isolated replay confirms (it reproduces the "
                f"reference)", severity="info", evidence={"layer": index, "ambiguous": ambiguous, "resolved": True})
        for kept, alternative in enumerate(alternatives, 1):
            self._apply_assignment(reference, alternative)
            if self._reproduces(reference, entries.get(index), profile):
                mapping.resolved[index] = (f"resolved by isolated replay: of {len(alternatives) + 1} assignments "
                                           f"only #{kept + 1} reproduces the reference, and it is kept")
                return Finding("mapping-ambiguous", f"layer {index}",
                               f"layer {index}: {ambiguous} have equal shapes; {mapping.resolved[index]}",
                               severity="info", evidence={"layer": index, "ambiguous": ambiguous, "resolved": True,
                                                          "kept": kept + 1})
        self._apply_assignment(reference, default)
        mapping.resolved[index] = (f"none of the {len(alternatives) + 1} assignments tried reproduces the "
                                   f"reference in isolation")
        return Finding(
            "mapping-ambiguous", f"layer {index}",
            f"layer {index}: {ambiguous} have equal shapes and none of the {len(alternatives) + 1} assignments "
            f"tried reproduces the reference in isolation: a divergence here may come from the mapping, not the "
            f"port. Fix: pin them with key_map entries (`parity scaffold` writes them)", severity="warning",
            evidence={"layer": index, "ambiguous": ambiguous, "tried": len(alternatives) + 1})

    def _check_user_layer_map(self, reference: Dump) -> None:
        """A layer_map entry the mapping never used is an error naming it (nothing is dropped silently)."""
        given = getattr(self, "user_layer_map", None) or {}
        params = {e["index"]: int(e.get("parameters") or 0) for e in reference.layers if "index" in e}
        keys = list(self.mapping.cand_shapes)
        if not params:          # a dump without a layer table (weights and init only): nothing to check against
            return
        for prefix, index in given.items():
            if index not in params:
                raise ParityError(f"layer_map entry {prefix!r}: {index}: the reference has no layer {index} "
                                  f"(layers 0..{max(params, default=-1)})")
            if params[index] and prefix and not any(k.startswith(prefix) for k in keys):
                raise ParityError(f"layer_map entry {prefix!r}: {index}: no candidate tensor starts with {prefix!r}, "
                                  f"but ultralytics' layer {index} has {params[index]:,} parameters")

    def _never_run_findings(self) -> list[Finding]:
        """Candidate modules holding mapped weights that the traced forward never called."""
        if self.trace is None:
            return []
        ran = {e.name for e in self.trace.events if e.kind == "module"}
        cand_to_ref = self.mapping.cand_to_ref
        idle: dict[str, str] = {}
        for key, ref_key in cand_to_ref.items():
            path = key.rsplit(".", 1)[0] if "." in key else ""
            if self.mapping._allowed(ref_key):       # a frozen DFL conv runs at inference only
                continue
            if path and path not in ran and not any(p == path or path.startswith(p + ".") for p in idle):
                parts = path.split(".")
                while len(parts) > 1 and ".".join(parts[:-1]) not in ran:
                    parts = parts[:-1]
                idle.setdefault(".".join(parts), ref_key)
        findings = []
        for path, ref_key in idle.items():
            layer = names.layer_of(ref_key)
            findings.append(Finding(
                "module-not-run", f"layer {layer}" if layer is not None else "model",
                f"candidate module {path} holds weights mapped to {ref_key.rsplit('.', 1)[0]}, but the candidate's "
                f"forward never runs it: those weights are loaded and unused. Fix: call it in forward, or if another "
                f"module does its work, remove it (or map that one with a key_map entry)",
                evidence={"module": path, "reference": ref_key, "layer": layer}))
        return findings

    def _unmapped_findings(self, reference: Dump) -> list[Finding]:
        """One `weight-unmapped` finding per layer whose tensors do not all map, naming the difference."""
        from parity.replay.mapping import describe_block_difference

        mapping = self.mapping
        per_layer: dict[Any, dict[str, list[str]]] = {}
        for key in mapping.missing_required:
            per_layer.setdefault(names.layer_of(key), {}).setdefault("reference", []).append(key)
        for key in mapping.unexpected:
            if mapping.cand_shapes.get(key):
                per_layer.setdefault(mapping.layer_of_candidate(key), {}).setdefault("candidate", []).append(key)
        types = {e["index"]: e.get("type") for e in reference.layers if "index" in e}
        findings = []
        for layer, keys in sorted(per_layer.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
            ref_keys, cand_keys = keys.get("reference", []), keys.get("candidate", [])
            detail = describe_block_difference(mapping, layer, types.get(layer)) if layer is not None else ""
            if not detail:
                what = []
                if ref_keys:
                    what.append(f"reference tensor {ref_keys[0]} {list(mapping.ref_shapes[ref_keys[0]])}"
                                + (f" and {len(ref_keys) - 1} more" if len(ref_keys) > 1 else "")
                                + " have no counterpart in the candidate")
                if cand_keys:
                    what.append(f"candidate tensor {cand_keys[0]} {list(mapping.cand_shapes[cand_keys[0]])}"
                                + (f" and {len(cand_keys) - 1} more" if len(cand_keys) > 1 else "")
                                + " match no reference tensor")
                detail = "; ".join(what)
            findings.append(Finding(
                "weight-unmapped", f"layer {layer}" if layer is not None else "model",
                f"{detail}: those tensors keep their own initial values",
                evidence={"layer": layer, "reference_keys": ref_keys[:50], "candidate_keys": cand_keys[:50],
                          "reference_key": ref_keys[0] if ref_keys else None,
                          "candidate_key": cand_keys[0] if cand_keys else None}))
        return findings

    def weight_tensors(self) -> Mapping[str, torch.Tensor] | None:
        if self.mapping is None:
            return None
        state = self.module.state_dict()
        return self.mapping.candidate_to_reference(state)

    def _infer_layers(self, reference: Dump) -> list[Finding]:
        """Trace one forward on the reference's image and read the layers off it (`parity.replay.layer_inference`)."""
        from parity.replay.layer_inference import infer_layers
        from parity.replay.tracing import error_site, run_traced

        img = reference.get(names.batch_img()).to(self.device)
        with torch.no_grad():
            try:
                trace = run_traced(self.module, img)
            except Exception as error:  # noqa: BLE001 - a port may raise anything
                site = error_site(error)
                stack = getattr(error, "parity_module_stack", ())
                raise ParityError(f"candidate {self.label}: its forward raised {type(error).__name__} on the "
                                  f"reference's batch.img {list(img.shape)}"
                                  + (f" in module {stack[-1]}" if stack else "")
                                  + (f" at {site}" if site else "") + f": {error}") from None
        inference = infer_layers(self.module, trace, reference, given=self.layer_map)
        self.trace, self.inference = trace, inference
        for index, layer in inference.layers.items():
            if layer.kind == "module":
                self.layers[index] = self.module.get_submodule(layer.name)
                self.layer_paths[index] = layer.name
        self.functional = {i: l for i, l in inference.layers.items() if l.kind == "op"}
        self.layer_map = {**(self.layer_map or {}), **inference.layer_map}
        self.kind = "traced"
        findings = []
        for problem in inference.problems:
            findings.append(Finding("layer-not-inferred", f"layer {problem.index}",
                                    f"{problem.message}; it is not compared. Fix: {problem.fix} "
                                    f"(docs/model-adapter.md)", severity="warning",
                                    evidence={"layer": problem.index, "fix": problem.fix}))
        return findings

    # -- structure
    def layer_count(self) -> int | None:
        return len(self.layers) or None

    def layer_type(self, index: int) -> str | None:
        types = getattr(self.module, "layer_types", None)
        if callable(types):
            try:
                return types()[index]
            except (IndexError, TypeError):
                return None
        layer = self.layers.get(index)
        return getattr(layer, "type", None) and str(layer.type).split(".")[-1] or (type(layer).__name__ if layer else None)

    def param_counts(self) -> dict[int, int] | None:
        if self.traced and self.mapping is not None:
            return self._mapped_param_counts()
        if self.layers:
            counts = {i: sum(p.numel() for p in layer.parameters()) for i, layer in self.layers.items()}
            return dict(sorted(counts.items()))
        if self.mapping is not None:
            from parity.replay.mapping import param_counts_by_layer

            return param_counts_by_layer(self.mapping.cand_shapes, self.mapping.layer_of_candidate)
        return None

    def _mapped_param_counts(self) -> dict[int, int]:
        """Per reference layer: the candidate's parameters and the buffers the mapping gave reference tensors
        (a frozen DFL kept as a buffer still counts, as ultralytics counts its DFL conv)."""
        mapped = self.mapping.cand_to_ref
        params = {k for k, _ in self.module.named_parameters()}
        counts: dict[int, int] = {}
        for key, shape in self.mapping.cand_shapes.items():
            if key.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked"):
                continue
            if key not in params and key not in mapped:
                continue
            layer = self.mapping.layer_of_candidate(key)
            if layer is not None:
                counts[layer] = counts.get(layer, 0) + math.prod(shape)
        return dict(sorted(counts.items()))

    def batchnorms(self) -> list[dict]:
        out = []
        owner = {}
        for index, path in self.layer_paths.items():
            owner[path] = index
        cand_to_ref = self.mapping.cand_to_ref if self.mapping is not None else {}
        for path, module in self.module.named_modules():
            if not isinstance(module, nn.modules.batchnorm._BatchNorm):
                continue
            layer = None
            ref_key = cand_to_ref.get(f"{path}.weight")
            if ref_key is not None:
                layer = names.layer_of(ref_key)
            if layer is None:
                for prefix, index in sorted(owner.items(), key=lambda kv: -len(kv[0])):
                    if path == prefix or path.startswith(prefix + ".") or prefix == "":
                        layer = index
                        break
            out.append({"layer": layer, "path": path, "reference_path": ref_key.rsplit(".", 1)[0] if ref_key else None,
                        "eps": float(module.eps),
                        "momentum": None if module.momentum is None else float(module.momentum)})
        return out

    def fresh_head_biases(self, reference: Dump) -> dict[int, dict[str, torch.Tensor]] | None:
        if self.fresh_vectors is None or self.mapping is None:
            return None
        state = self.fresh_vectors
        head = reference.model.get("head_index")
        out: dict[int, dict[str, torch.Tensor]] = {}
        for level in range(len(reference.model.get("strides", []))):
            entry = {}
            for branch, kind in (("cv3", "cls"), ("cv2", "box")):
                key = final_conv_bias_key(reference, head, branch, level)
                if key is None or key not in self.mapping.ref_to_cand:
                    continue
                cand_keys = self.mapping.ref_to_cand[key].cand_keys
                parts = [state[k].detach().clone() for k in cand_keys if k in state]
                if parts:
                    entry[kind] = parts[0] if len(parts) == 1 else torch.cat(parts)
            if entry:
                out[level] = entry
        return out

    # -- running
    def has_layer(self, index: int) -> bool:
        return index in self.layers or index in self.functional or (
            hasattr(self.module, "run_layer") and self.layer_count() is not None)

    def _call_layer(self, index: int, inputs: list[torch.Tensor]):
        if hasattr(self.module, "run_layer") and not self.ultralytics_classes:
            return self.module.run_layer(index, inputs)
        if index in self.functional:
            return self._replay_functional(index, inputs)
        layer = self.layers[index]
        inferred = self.inference.layers.get(index) if self.inference is not None else None
        if inferred is None or self.ultralytics_classes:
            return layer(inputs[0] if len(inputs) == 1 else list(inputs))
        # the way the candidate's own forward called it: one tensor, one list, or positional tensors
        if inferred.call == "positional":
            if len(inputs) != inferred.arity:
                raise ParityError(f"{inferred.name} takes {inferred.arity} positional tensors in the candidate's "
                                  f"forward, ultralytics layer {index} has {len(inputs)} inputs")
            return layer(*inputs)
        if inferred.call == "list":
            return layer(list(inputs))
        if len(inputs) != 1:
            raise ParityError(f"{inferred.name} takes one tensor in the candidate's forward, ultralytics layer "
                              f"{index} has {len(inputs)} inputs")
        return layer(inputs[0])

    def failing_layer(self, error: BaseException) -> int | None:
        """The inferred layer whose module was running when the candidate's forward raised `error`."""
        stack = getattr(error, "parity_module_stack", ())
        by_path = {p: i for i, p in self.layer_paths.items()}
        for path in reversed(stack):
            if path in by_path:
                return by_path[path]
        return None

    def input_sources(self, index: int) -> list[dict] | None:
        """Per input of layer `index` in the candidate's own forward: the layers whose outputs reach it and the
        operations outside any layer on the way ("mul at port.py:57")."""
        if self.inference is None or index not in self.inference.layers:
            return None
        trace, layer = self.trace, self.inference.layers[index]
        event = trace.events[layer.seq]
        args = list(event.args[0]) if layer.call == "list" and event.args else list(event.args)
        layer_events = self._layer_events()
        layer_paths = {l.name for l in self.inference.layers.values() if l.kind == "module"}
        out = []
        for arg in args:
            found = {"layers": [], "ops": []}
            seen: set[int] = set()
            todo = tensors_in(arg)
            while todo:
                tensor = todo.pop()
                if trace.image is not None and tensor is trace.image:
                    continue
                source = next((layer_events[p.seq] for p in trace.producers(tensor) if p.seq in layer_events
                               and p.seq != layer.seq), None)
                if source is not None:
                    if source not in found["layers"]:
                        found["layers"].append(source)
                    continue
                producer = trace.produced_by(tensor)
                if producer is None or producer.seq in seen or any(p in layer_paths for p in producer.stack):
                    continue
                seen.add(producer.seq)
                if producer.kind == "op" and producer.name not in ("__getitem__", "chunk", "split", "view",
                                                                     "reshape", "unbind"):
                    found["ops"].append(producer.name + (f" at {producer.site}" if producer.site else ""))
                todo.extend(tensors_in((producer.args, producer.kwargs)))
            found["layers"].sort()
            out.append(found)
        return out

    def _layer_events(self) -> dict[int, int]:
        """trace seq of each inferred layer's event -> layer index"""
        return {l.seq: i for i, l in self.inference.layers.items()}

    def _replay_functional(self, index: int, inputs: list[torch.Tensor]):
        """A layer the candidate computes with ops inside a parent's forward: the ops from its source layers'
        outputs to it are run again with those outputs replaced by `inputs` (the reference's)."""
        from parity.replay.tracing import replay

        trace, layer = self.trace, self.functional[index]
        by_layer = {}
        for name, tensor in zip(self.layer_inputs.get(index, []), inputs):
            by_layer[-1 if name == names.batch_img() else names.layer_of(name)] = tensor
        layer_events = self._layer_events()
        layer_paths = {l.name for l in self.inference.layers.values() if l.kind == "module"}

        def substitute(tensor, producers):
            if trace.image is not None and tensor is trace.image:
                return by_layer.get(-1, self.reference.get(names.batch_img()).to(self.device))
            for producer in producers:
                source = layer_events.get(producer.seq)
                if source is not None:
                    if source in by_layer:
                        return by_layer[source]
                    name = names.act(source)
                    return self.reference.get(name).to(self.device) if name in self.reference else None
            return None

        def inside_a_layer(event) -> bool:
            return any(p in layer_paths for p in event.stack) or (event.kind == "module" and event.name in layer_paths)

        return replay(trace, trace.events[layer.seq], substitute, inside_a_layer)

    def _head_extras(self, index: int, flat: dict[str, torch.Tensor], is_head: bool) -> None:
        """The DFL of the head's boxes (`act.{head}.dfl`), when the candidate can compute it."""
        boxes = flat.get(names.act(index, "boxes"))
        if not is_head or boxes is None or not self.reg_max or self.reg_max <= 1:
            return
        dfl = getattr(self.module, "dfl", None)
        if callable(dfl) and not isinstance(dfl, nn.Module):
            flat[names.act(index, "dfl")] = dfl(boxes)
            return
        head = self.layers.get(index)
        module = getattr(head, "dfl", None)
        if isinstance(module, nn.Module):
            flat[names.act(index, "dfl")] = module(boxes)

    def run_layer(self, index: int, inputs: list[torch.Tensor], *, is_head: bool = False) -> dict[str, torch.Tensor]:
        inputs = [t.to(self.device) for t in inputs]
        with torch.no_grad():
            out = self._call_layer(index, inputs)
            flat = layer_output_tensors(index, out, reg_max=self.reg_max, nc=self.nc, is_head=is_head)
            self._head_extras(index, flat, is_head)
        return flat

    def run_chained(self, img: torch.Tensor, on_layer: Callable[[int], None] | None = None, *,
                    head_index: int | None = None) -> dict[str, torch.Tensor]:
        img = img.to(self.device)
        flat: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            if self.traced and self.inference is not None:
                for index, out in sorted(self._traced_outputs(img).items()):
                    flat.update(layer_output_tensors(index, out, reg_max=self.reg_max, nc=self.nc,
                                                     is_head=index == head_index))
                    if on_layer:
                        on_layer(index)
            elif hasattr(self.module, "forward_layers") and not self.ultralytics_classes:
                outs = self.module.forward_layers(img)
                for index, out in enumerate(outs):
                    flat.update(layer_output_tensors(index, out, reg_max=self.reg_max, nc=self.nc,
                                               is_head=index == head_index))
                    if on_layer:
                        on_layer(index)
            elif self.layers:
                raw: dict[str, Any] = {}
                handles = []

                def keep(index):
                    def hook(_m, _i, output):
                        raw.setdefault(index, output)
                        if on_layer:
                            on_layer(index)
                    return hook

                for index, layer in self.layers.items():
                    handles.append(layer.register_forward_hook(keep(index)))
                try:
                    result = self.module(img)
                finally:
                    for handle in handles:
                        handle.remove()
                for index, out in sorted(raw.items()):
                    flat.update(layer_output_tensors(index, out, reg_max=self.reg_max, nc=self.nc,
                                               is_head=index == head_index))
                if head_index is not None and head_index not in self.layers:
                    flat.update(layer_output_tensors(head_index, result, reg_max=self.reg_max, nc=self.nc, is_head=True))
            else:
                result = self.module(img)
                if head_index is not None:
                    flat.update(layer_output_tensors(head_index, result, reg_max=self.reg_max, nc=self.nc, is_head=True))
            if head_index is not None:
                self._head_extras(head_index, flat, True)
        return flat

    def _traced_outputs(self, img: torch.Tensor) -> dict[int, Any]:
        """One traced forward: each inferred layer's output (first call of its module, or its op)."""
        from parity.replay.tracing import run_traced

        paths = {l.name: i for i, l in self.inference.layers.items() if l.kind == "module"}
        trace = run_traced(self.module, img, skip=lambda stack: any(p in paths for p in stack))
        out: dict[int, Any] = {}
        for event in trace.events:
            if event.kind == "module" and event.name in paths and paths[event.name] not in out:
                out[paths[event.name]] = event.output
        for index, layer in self.functional.items():
            event = trace.events[layer.seq] if layer.seq < len(trace.events) else None
            if event is not None and event.name == layer.name:
                out[index] = event.output
        self.last_trace = trace
        return out

    def layer_stages(self, index: int, inputs: list[torch.Tensor], *, is_head: bool = False,
                     reference_paths: list[str] | None = None) -> dict[str, torch.Tensor]:
        inputs = [t.to(self.device) for t in inputs]
        out: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            if hasattr(self.module, "layer_stages") and not self.ultralytics_classes:
                stages = self.module.layer_stages(index, list(inputs))
                for path, tensor in stages.items():
                    out.update(names.flatten_output(names.act(index, path), tensor))
                return out
            modules = self._submodules_for(index, reference_paths or [], is_head)
            if not modules:
                return out
            with capture_outputs(modules, out):
                self._call_layer(index, inputs)
        return out

    def _submodules_for(self, index: int, reference_paths: list[str], is_head: bool) -> dict[str, nn.Module]:
        """Candidate sub-modules standing for the reference's `act.{index}.{path}` tensors."""
        modules: dict[str, nn.Module] = {}
        layer = self.layers.get(index)
        if layer is None:
            return modules
        if self.ultralytics_classes:
            named = dict(layer.named_modules())
            shared = {}
            for _, m in self.module.named_modules(remove_duplicate=False):
                shared[id(m)] = shared.get(id(m), 0) + 1
            for path in reference_paths:
                base = path.split("#", 1)[0]
                m = named.get(base)
                if m is not None and shared.get(id(m), 0) <= 1:
                    modules[names.act(index, base)] = m
            return modules
        if self.mapping is None:
            return modules
        # through the key mapping: the candidate module holding every parameter of the reference sub-module
        named = dict(self.module.named_modules())
        for path in reference_paths:
            base = path.split("#", 1)[0]
            prefix = f"model.{index}.{base}."
            cand_keys = [c for r, e in self.mapping.ref_to_cand.items() if r.startswith(prefix) for c in e.cand_keys]
            if not cand_keys:
                continue
            common = _common_module_path(cand_keys)
            own = [k for k in self.mapping.cand_shapes if k.startswith(common + ".")] if common else []
            # the candidate module must hold exactly the reference sub-module's tensors (not a larger block)
            if common and common in named and sorted(own) == sorted(set(cand_keys)):
                modules[names.act(index, base)] = named[common]
        return modules


def _common_module_path(keys: list[str]) -> str:
    parts = [k.split(".")[:-1] for k in keys]
    common = []
    for items in zip(*parts):
        if len(set(items)) != 1:
            break
        common.append(items[0])
    return ".".join(common)


def final_conv_bias_key(reference: Dump, head: int | None, branch: str, level: int) -> str | None:
    """`model.{head}.{branch}.{level}.{last}.bias` of the reference (the last conv of that branch and level)."""
    if head is None:
        return None
    pattern = re.compile(rf"^model\.{head}\.{branch}\.{level}\.(\d+)\.bias$")
    found = [(int(m.group(1)), k) for k in reference.names(f"model.{head}.{branch}.{level}.")
             if (m := pattern.match(k))]
    return max(found)[1] if found else None


class DumpCandidate(Candidate):
    """A candidate dump: tensors a port wrote, compared on what it has."""

    kind = "dump"
    live = False

    def __init__(self, dump: Dump):
        self.dump = dump
        self.label = str(dump.path)

    def describe(self) -> dict:
        return {"kind": self.kind, "label": self.label, "tensors": len(self.dump.index),
                "manifest_kind": self.dump.kind, "versions": self.dump.manifest.get("versions")}

    def layer_count(self) -> int | None:
        return len(self.dump.layers) or None

    def layer_type(self, index: int) -> str | None:
        for entry in self.dump.layers:
            if entry.get("index") == index:
                return entry.get("type")
        return None

    def param_counts(self) -> dict[int, int] | None:
        counts = {e["index"]: int(e["parameters"]) for e in self.dump.layers
                  if "index" in e and e.get("parameters") is not None}
        return counts or None

    def fresh_head_biases(self, reference: Dump) -> dict[int, dict[str, torch.Tensor]] | None:
        out: dict[int, dict[str, torch.Tensor]] = {}
        for level in range(len(reference.model.get("strides", []))):
            entry = {}
            for kind, name in (("cls", "cls_bias"), ("box", "box_bias")):
                tensor = self.dump.get_optional(names.init_bias(name, level, "stored"))
                if tensor is not None:
                    entry[kind] = tensor
            if entry:
                out[level] = entry
        return out or None

    def weight_tensors(self) -> Mapping[str, torch.Tensor] | None:
        return LazyTensors(self.dump, "model.") if self.dump.names("model.") else None

    def has_layer(self, index: int) -> bool:
        return bool(self._outputs(names.act(index)) or self._outputs(names.isolated(names.act(index))))

    def has_isolated_outputs(self) -> bool:
        return bool(self.dump.names(names.isolated("act.")))

    def _outputs(self, prefix: str) -> list[str]:
        return [n for n in self.dump.index if n == prefix or n.startswith((prefix + ".", prefix + "#"))]

    def run_layer(self, index: int, inputs: list[torch.Tensor], *, is_head: bool = False) -> dict[str, torch.Tensor]:
        """What the port computed for layer `index` on the reference's own inputs (`isolated.act.{index}…`, under
        their `act.*` names); `inputs` are the reference's, which the port read from its export-layers file."""
        return {n[len(names.ISOLATED):]: self.dump.get(n) for n in self._outputs(names.isolated(names.act(index)))}

    def layer_stages(self, index: int, inputs: list[torch.Tensor], *, is_head: bool = False,
                     reference_paths: list[str] | None = None) -> dict[str, torch.Tensor]:
        return {n: t for n, t in self.run_layer(index, inputs, is_head=is_head).items() if n != names.act(index)}

    def get(self, name: str) -> torch.Tensor | None:
        return self.dump.get_optional(name)


# ---------------------------------------------------------------------------------------------- loading
def builtin_candidate(model: str, nc: int, inject: str | None = None, device: str = "cpu") -> ModuleCandidate:
    from parity.causes.plant import planted_detector

    if inject:
        from parity.causes import get as get_injection

        try:
            get_injection(inject)
        except KeyError as error:
            raise ParityError(str(error.args[0])) from None

    label = "builtin" + (f" (inject {inject})" if inject else "")
    try:
        module = planted_detector(model, nc, inject)
    except (FileNotFoundError, NotImplementedError) as error:
        raise ParityError(f"the built-in candidate cannot build {model!r}: {error}") from None
    return ModuleCandidate(module, label=label, freshly_built=True, kind="builtin", device=device)


def import_factory(spec: str, what: str = "candidate",
                   expected: str = "'builtin', 'package.module:factory' or a dump directory") -> tuple[Callable, Any]:
    """`package.module:factory` -> (the callable, its module); the module is looked up from the working directory too."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ParityError(f"{what} {spec!r}: expected {expected}")
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ParityError(f"{what} {spec!r}: cannot import {module_name!r} ({error})") from None
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise ParityError(f"{what} {spec!r}: module {module_name!r} has no attribute {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ParityError(f"{what} {spec!r}: {attr!r} is not callable")
    return factory, module


def _call_factory(factory: Callable, nc: int | None, model: str | None, spec: str) -> nn.Module:
    from parity.replay.factories import call_factory, factory_parameters

    params = factory_parameters(factory)
    kwargs = {key: value for key, value in (("nc", nc), ("model", model)) if value is not None and key in params}
    # No file:line here: a model factory's message has always been the exception alone (tests assert it).
    built = call_factory(factory, f"candidate {spec}", show_frame=False, **kwargs)
    if not isinstance(built, nn.Module):
        raise ParityError(f"candidate {spec}: the factory returned {type(built).__name__}, expected a torch.nn.Module")
    return built


def module_candidate(factory: Callable[..., nn.Module] | nn.Module, *, label: str, nc: int | None = None,
                     model: str | None = None, key_map=None, layer_map=None, owner_module: Any = None,
                     device: str = "cpu") -> ModuleCandidate:
    """A candidate from a factory (its fresh biases kept for the bias-init check) or an already built module."""
    freshly_built = not isinstance(factory, nn.Module)
    module = _call_factory(factory, nc, model, label) if freshly_built else factory

    if key_map is None:
        key_map = getattr(module, "key_map", None)
        if key_map is None and owner_module is not None:
            key_map = getattr(owner_module, "key_map", None) or getattr(owner_module, "KEY_MAP", None)
    if layer_map is None:
        layer_map = getattr(module, "layer_map", None)
        if layer_map is None and owner_module is not None:
            layer_map = getattr(owner_module, "layer_map", None) or getattr(owner_module, "LAYER_MAP", None)
        if callable(layer_map):
            layer_map = layer_map()
    return ModuleCandidate(module, label=label, freshly_built=freshly_built, key_map=key_map, layer_map=layer_map,
                           device=device)


def load_candidate(spec: str | nn.Module | Callable, reference: Dump, *, inject: str | None = None,
                   map_file: str | None = None, device: str = "cpu") -> Candidate:
    """Resolve a candidate spec (see the module docstring). The model yaml and nc come from the reference."""
    model = _resolve_model(reference.config.get("model") or reference.model.get("yaml"))
    nc = reference.model.get("nc") or reference.config.get("nc")
    if inject and spec != "builtin":
        raise ParityError("--inject plants a bug in the built-in candidate; it needs --candidate builtin")
    maps = read_map_file(map_file) if map_file else {"key_map": None, "layer_map": None}
    if isinstance(spec, (nn.Module,)) or (callable(spec) and not isinstance(spec, str)):
        return module_candidate(spec, label=getattr(spec, "__name__", type(spec).__name__), nc=nc, model=model,
                                key_map=maps["key_map"], layer_map=maps["layer_map"], device=device)
    if spec == "builtin":
        if not model:
            raise ParityError(f"{reference.path}: the manifest names no model yaml, so the built-in candidate "
                              f"does not know what to build")
        return builtin_candidate(model, int(nc), inject, device)
    path = Path(spec)
    if path.is_dir() or (path.exists() and path.name == MANIFEST):
        dump = Dump(path if path.is_dir() else path.parent)
        if dump.stats_only:
            raise ParityError(f"candidate dump {dump.path} is statistics-only: a layer comparison needs tensor values")
        return DumpCandidate(dump)
    if ":" in spec:
        factory, owner = import_factory(spec)
        return module_candidate(factory, label=spec, nc=nc, model=model, key_map=maps["key_map"],
                                layer_map=maps["layer_map"], owner_module=owner, device=device)
    if path.suffix or "/" in spec:
        raise ParityError(f"candidate {spec!r}: no such dump directory (a dump holds {MANIFEST})")
    raise ParityError(f"candidate {spec!r}: expected 'builtin', 'package.module:factory' or a dump directory")


def _resolve_model(model: str | None) -> str | None:
    """A model yaml path recorded relative to the project root (fixtures/models/...) works from any directory."""
    if not model:
        return model
    path = Path(model)
    if path.suffix in (".yaml", ".yml") and not path.is_absolute() and not path.exists():
        from parity.runtime import PROJECT_ROOT

        if (PROJECT_ROOT / path).exists():
            return str(PROJECT_ROOT / path)
    return model


def default_conv_bias_bound(fan_in: int) -> float:
    """PyTorch's Conv2d bias init is uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    return 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
