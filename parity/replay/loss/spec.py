"""What the reference dump says the loss is: `LossSpec` (what a candidate loss factory is told), the replay's
stage vocabulary (which stages, where the reference keeps their outputs, what each output set is), and
`CaseView`, one dump's tensors for one loss case by stage and name."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from parity.dump import names
from parity.dump.files import Dump
from parity.errors import ParityError
from parity.reimpl.loss import INPUT_SOURCES, STAGE_INPUTS, LossConfig

TERMS = names.LOSS_TERMS
# Stage replay order: `assigner` (the assigner proper, fed the reference's assigner inputs) follows `assign`.
REPLAY_STAGES = ("anchors", "preprocess", "decode", "assign", "assigner", "normalize", "classify", "box", "gains",
                 "output")
ASSIGNER_INPUT_NAMES = ("pd_scores", "pd_bboxes", "anc_points")
REFERENCE_STAGE = {"assigner": "assign"}  # where the reference keeps a replay stage's outputs
STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {
    **names.LOSS_STAGES,
    "assigner": tuple(n for n in names.LOSS_STAGES["assign"] if n not in ASSIGNER_INPUT_NAMES),
    "output": names.LOSS_OUTPUT,
}
# What a wrong stage means, in the words of the summary table.
CATEGORY = {"head": "head outputs", "anchors": "anchors", "preprocess": "targets", "decode": "head decode", "assign": "assigner",
            "assigner": "assigner", "normalize": "normalizer", "classify": "loss math", "box": "loss math",
            "gains": "gain", "output": "batch scaling"}


@dataclass
class LossSpec:
    """What a candidate loss factory is told about the reference it will be compared with."""

    nc: int
    reg_max: int
    strides: tuple[float, ...]
    end2end: bool
    branches: tuple[str, ...]
    batch_size: int
    imgsz: tuple[int, int]
    feat_shapes: list[tuple[int, int]]
    hyperparameters: dict
    branch_weights: dict
    config: LossConfig
    manifest: dict = field(repr=False, default_factory=dict)

    @classmethod
    def from_dump(cls, dump: Dump) -> "LossSpec":
        model = dump.model
        if "nc" not in model or "head_index" not in model:
            raise ParityError(f"{dump.path}: the manifest's `model` section lacks nc/head_index; a loss comparison "
                              f"needs a reference dump (docs/dump-format.md)")
        head = int(model["head_index"])
        end2end = bool(model.get("end2end", False))
        branches = tuple((dump.manifest.get("loss") or {}).get("branches") or (names.E2E_BRANCHES if end2end else ()))
        scores = names.act(head, branches[0], "scores") if end2end else names.act(head, "scores")
        if scores not in dump:
            raise ParityError(f"{dump.path}: no {scores}: the loss replay needs the head's train outputs")
        batch_size = int(dump.index[scores]["shape"][0])
        feat_shapes = _feature_shapes(dump, head)
        strides = tuple(float(s) for s in model.get("strides", (8, 16, 32)))
        if names.batch_img() in dump:
            imgsz = tuple(int(v) for v in dump.index[names.batch_img()]["shape"][2:])
        else:
            imgsz = (int(feat_shapes[0][0] * strides[0]), int(feat_shapes[0][1] * strides[0]))
        loss = dump.manifest.get("loss") or {}
        return cls(nc=int(model["nc"]), reg_max=int(model.get("reg_max", 16)), strides=strides, end2end=end2end,
                   branches=branches, batch_size=batch_size, imgsz=imgsz, feat_shapes=feat_shapes,
                   hyperparameters=dict(dump.manifest.get("hyperparameters") or {}),
                   branch_weights=dict(loss.get("branch_weights") or {}),
                   config=LossConfig.from_manifest(dump.manifest), manifest=dump.manifest)

    @property
    def gains(self) -> tuple[float, float, float]:
        return self.config.gains

    def branch_weight(self, branch: str | None) -> float | None:
        if branch is None:
            return None
        default = {"one2many": 0.8, "one2one": 1.0 - 0.8}
        return float(self.branch_weights.get(branch, default[branch]))


def _feature_shapes(dump: Dump, head: int) -> list[tuple[int, int]]:
    """(H, W) of each level: the outputs of the layers feeding the head (feats are not stored)."""
    layers = dump.layers
    if head < len(layers) and layers[head].get("from"):
        shapes = []
        for source in layers[head]["from"]:
            shape = (layers[source].get("outputs") or {}).get(names.act(source))
            if shape is None and names.act(source) in dump:
                shape = dump.index[names.act(source)]["shape"]
            if shape is None:
                break
            shapes.append((int(shape[2]), int(shape[3])))
        else:
            return shapes
    # Fall back: square levels at the strides, from the image size.
    img = dump.index.get(names.batch_img())
    if img is None:
        raise ParityError(f"{dump.path}: cannot tell the head's feature map sizes (no layer table, no batch.img)")
    h, w = img["shape"][2:]
    return [(int(h // s), int(w // s)) for s in dump.model.get("strides", (8, 16, 32))]


class CaseView:
    """One dump's tensors for one loss case, by stage and name (the reference's, or a candidate dump's, whose
    missing batch tensors and head index come from `fallback`, the reference)."""

    def __init__(self, dump: Dump, spec: LossSpec, case: str, fallback: Dump | None = None):
        self.dump, self.spec, self.case, self.fallback = dump, spec, case, fallback
        self.head_index = int((fallback or dump).model["head_index"])

    def _get(self, name: str) -> torch.Tensor:
        if name not in self.dump and self.fallback is not None and name.startswith("batch."):
            return self.fallback.get(name)
        return self.dump.get(name)

    def name(self, stage: str, tensor: str, branch: str | None = None) -> str:
        if stage == "output":
            return names.loss_output(self.case, tensor)
        return names.loss(self.case, stage, tensor, branch)

    def ref(self, stage: str, tensor: str, branch: str | None = None) -> torch.Tensor | None:
        return self.dump.get_optional(self.name(stage, tensor, branch))

    def head(self, branch: str | None) -> dict[str, torch.Tensor]:
        path = (branch,) if branch else ()
        return {o: self.dump.get(names.act(self.head_index, *path, o)) for o in names.HEAD_OUTPUTS}

    def has_head(self, branch: str | None) -> bool:
        path = (branch,) if branch else ()
        return all(names.act(self.head_index, *path, o) in self.dump for o in names.HEAD_OUTPUTS)

    def batch(self) -> dict[str, torch.Tensor]:
        out = {f: self._get(names.batch_target(self.case, f)) for f in ("cls", "bboxes", "batch_idx")}
        if names.batch_img() in self.dump or (self.fallback is not None and names.batch_img() in self.fallback):
            out["img"] = self._get(names.batch_img())
        return out

    def given(self, branch: str | None) -> dict[str, Any]:
        """Stage inputs that come from the head and the batch rather than from an earlier stage."""
        batch = self.batch()
        h, w = self.spec.imgsz
        return {"feat_shapes": list(self.spec.feat_shapes), "batch_size": self.spec.batch_size,
                "imgsz": torch.tensor([h, w], dtype=torch.float32), **self.head(branch),
                "batch_idx": batch["batch_idx"], "cls": batch["cls"], "bboxes": batch["bboxes"]}

    def stage_inputs(self, stage: str, branch: str | None) -> dict[str, Any]:
        given = self.given(branch)
        out = {}
        for name in STAGE_INPUTS[stage]:
            source = INPUT_SOURCES[name]
            group, tensor = source.split(".", 1)
            if group in ("head", "batch"):
                out[name] = given[name]
                continue
            value = self.ref(group, tensor, branch)
            if value is None:
                raise KeyError(self.name(group, tensor, branch))
            out[name] = value
        return out

