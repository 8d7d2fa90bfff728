"""The assignment as discrete data: foreground anchors and their ground-truth box per image and per box,
reference against candidate, each flip classified as a near-tie (a harmless tie-break) or real."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from parity.compare.tolerances import Tolerance


@dataclass
class Flip:
    image: int
    anchor: int
    kind: str  # "added" (candidate only), "removed" (reference only), "moved" (another box)
    ref_box: int | None
    cand_box: int | None
    gap: float  # distance of the deciding value from the boundary it crossed (metric, or overlap)
    near_tie: bool


@dataclass
class AssignmentDiff:
    boxes: list[dict]  # per image and box: positives on both sides, anchors added and removed
    flips: list[Flip]
    agree_mask: torch.Tensor  # (B, A) foreground on both sides, same box
    flipped_mask: torch.Tensor  # (B, A)
    common_mask: torch.Tensor  # (B, A) foreground on both sides

    @property
    def real(self) -> list[Flip]:
        return [f for f in self.flips if not f.near_tie]

    @property
    def near_ties(self) -> list[Flip]:
        return [f for f in self.flips if f.near_tie]

    def summary(self) -> str:
        if not self.flips:
            total = sum(b["reference"] for b in self.boxes)
            return f"same foreground anchors and boxes ({total} positives over {len(self.boxes)} boxes)"
        changed = [b for b in self.boxes if b["added"] or b["removed"]]
        parts = [f"image {b['image']} box {b['box']}: {b['reference']} -> {b['candidate']} positives "
                 f"(+{len(b['added'])} -{len(b['removed'])})" for b in changed[:4]]
        more = f", and {len(changed) - 4} more boxes" if len(changed) > 4 else ""
        return (f"{len(self.flips)} anchor flip(s): {len(self.real)} real, {len(self.near_ties)} near-tie; "
                + "; ".join(parts) + more)

    def as_dict(self) -> dict:
        return {"boxes": self.boxes, "flips": [f.__dict__ for f in self.flips[:50]], "real": len(self.real),
                "near_tie": len(self.near_ties)}


def compare_assignment(ref_fg: torch.Tensor, ref_idx: torch.Tensor, cand_fg: torch.Tensor, cand_idx: torch.Tensor,
                       align_metric: torch.Tensor | None, overlaps: torch.Tensor | None,
                       metric_tol: Tolerance, overlap_tol: Tolerance | None = None) -> AssignmentDiff:
    """Foreground anchors and their boxes, reference against candidate, per image and per box.

    A tie-break never changes how many anchors a box gets; it exchanges anchors the reference's own numbers
    cannot tell apart. So, per box, the anchors the candidate added and removed are paired strongest with
    strongest: a pair is a near-tie when the two alignment metrics are equal within tolerance. A box whose count
    of positives changed has real flips. An anchor moved to another box is a near-tie when it overlaps both
    boxes equally within tolerance (the conflict rule keeps the larger overlap).
    """
    overlap_tol = overlap_tol or metric_tol
    ref_fg, cand_fg = ref_fg.bool(), cand_fg.bool()
    ref_idx, cand_idx = ref_idx.long(), cand_idx.long()
    b, a = ref_fg.shape
    agree = ref_fg & cand_fg & (ref_idx == cand_idx)
    flipped = (ref_fg | cand_fg) & ~agree
    moved = ref_fg & cand_fg & (ref_idx != cand_idx)
    if align_metric is not None:
        m = align_metric.shape[1]
    else:
        m = int(max(ref_idx.max(), cand_idx.max())) + 1 if a else 0
    flips: list[Flip] = []
    for image, anchor in moved.nonzero().tolist():
        r_box, c_box = int(ref_idx[image, anchor]), int(cand_idx[image, anchor])
        gap, near = float("nan"), False
        if overlaps is not None:
            o_ref, o_cand = float(overlaps[image, r_box, anchor]), float(overlaps[image, c_box, anchor])
            gap, near = abs(o_cand - o_ref), _within(o_cand, o_ref, overlap_tol)
        flips.append(Flip(image, anchor, "moved", r_box, c_box, gap, near))

    boxes: list[dict] = []
    for image in range(b):
        for box in range(m):
            ref_pos = set((ref_fg[image] & (ref_idx[image] == box)).nonzero().flatten().tolist())
            cand_pos = set((cand_fg[image] & (cand_idx[image] == box)).nonzero().flatten().tolist())
            if not ref_pos and not cand_pos:
                continue
            added, removed = sorted(cand_pos - ref_pos), sorted(ref_pos - cand_pos)
            boxes.append({"image": image, "box": box, "reference": len(ref_pos), "candidate": len(cand_pos),
                          "added": added, "removed": removed})
            flips += _swaps(image, box, [x for x in added if not bool(moved[image, x])],
                            [x for x in removed if not bool(moved[image, x])], align_metric, metric_tol)
    return AssignmentDiff(boxes, flips, agree, flipped, ref_fg & cand_fg)


def _swaps(image: int, box: int, added: list[int], removed: list[int], metric: torch.Tensor | None,
           tol: Tolerance) -> list[Flip]:
    """Flips of one box: paired strongest-with-strongest by the reference's alignment metric."""
    if metric is None:
        return ([Flip(image, x, "added", None, box, float("nan"), False) for x in added]
                + [Flip(image, x, "removed", box, None, float("nan"), False) for x in removed])
    row = metric[image, box]
    added = sorted(added, key=lambda x: -float(row[x]))
    removed = sorted(removed, key=lambda x: -float(row[x]))
    balanced = len(added) == len(removed)  # a tie-break swaps anchors; it never changes the count
    out = []
    for k in range(max(len(added), len(removed))):
        a_val = float(row[added[k]]) if k < len(added) else None
        r_val = float(row[removed[k]]) if k < len(removed) else None
        near = balanced and _within(a_val, r_val, tol)
        gap = abs(a_val - r_val) if a_val is not None and r_val is not None else float("inf")
        if a_val is not None:
            out.append(Flip(image, added[k], "added", None, box, gap, near))
        if r_val is not None:
            out.append(Flip(image, removed[k], "removed", box, None, gap, near))
    return out


def _within(value: float, boundary: float, tol: Tolerance) -> bool:
    """Relative closeness only: alignment metrics are products of small powers (1e-6 is a typical size at
    initialisation), so an absolute tolerance would call anything a tie. A bitwise profile admits exact ties."""
    return value == boundary or abs(value - boundary) <= tol.rtol * max(abs(value), abs(boundary))
