"""Map a candidate model's state_dict onto ultralytics' parameter names (`model.23.cv3.0.2.bias`).

A port names its tensors its own way. To load the reference weights into it, and to compare its tensors with
the reference's, every reference tensor needs its candidate counterpart. Strategies, tried in order:

  identity  the candidate uses ultralytics' names (a model built from ultralytics classes)
  rename    a user `key_map`: regex -> replacement, applied in order to the candidate's names
  shape     whole blocks matched by order and shape: reference tensors are grouped by layer (`model.{i}.`),
            candidate tensors by a `layer_map` {candidate_prefix: layer_index} when given (a module may carry
            one as its `layer_map` attribute), else by order. Inside a block, tensors are grouped into units
            (a conv weight with its bias / BatchNorm tensors) and units are matched by their shape sequence:
            in order when the orders agree, otherwise each reference unit takes the first unused candidate
            unit of the same shapes (so groups registered in another order still match, and equal-shaped
            groups keep their relative order).
  split     one reference unit written as several candidate units whose shapes concatenate along dim 0 to
            the reference shape (a C2f `cv1` written as two convs).

Non-trainable tensors may be missing from the candidate (a port without a DFL conv, a norm without
`num_batches_tracked`); they are reported in `missing`. Anything else that does not map raises
`MappingError`, naming the first unmatched reference tensor, its shape and the nearest candidates' shapes.
Nothing is guessed silently: units matched out of order are listed in `notes` (and `describe()`).

Give tensors in registration order (a state_dict, a manifest's index) where possible: a norm's vectors are
matched by name (so sorted names still map), but equal-shaped groups keep the relative order they are given in.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from parity.errors import ParityError

__all__ = ["DEFAULT_ALLOWED_MISSING", "KeyMapping", "MapEntry", "MappingError", "build_mapping",
           "compare_param_counts", "layer_of_from_map", "param_counts_by_layer", "ref_layer_of",
           "reference_shapes_from_manifest"]

Shape = tuple[int, ...]

# Non-trainable reference tensors a port may legitimately lack.
DEFAULT_ALLOWED_MISSING = (r"(^|\.)num_batches_tracked$", r"(^|\.)dfl\.conv\.weight$")
# Buffers that hold statistics, not parameters (excluded from parameter counts).
_STAT_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
# Canonical order of a norm layer's vectors, so that name order (e.g. a sorted manifest) does not matter.
_NORM_ORDER = {"weight": 0, "bias": 1, "running_mean": 2, "running_var": 3}
_REF_LAYER = re.compile(r"^model\.(\d+)\.")


class MappingError(ParityError):
    """A reference tensor has no candidate counterpart (or a candidate tensor matches nothing).

    Attributes: `ref_key`, `ref_shape`, `layer` (reference layer index or None), `nearest` [(key, shape)],
    `cand_key`/`cand_shape` for an unexpected candidate tensor."""

    def __init__(self, message: str, *, ref_key: str | None = None, ref_shape: Shape | None = None,
                 layer: int | None = None, nearest: Sequence[tuple[str, Shape]] = (),
                 cand_key: str | None = None, cand_shape: Shape | None = None):
        super().__init__(message)
        self.ref_key, self.ref_shape, self.layer = ref_key, ref_shape, layer
        self.nearest = list(nearest)
        self.cand_key, self.cand_shape = cand_key, cand_shape


@dataclass
class MapEntry:
    cand_keys: list[str]
    how: str                  # "identity" | "rename" | "shape" | "split"


# ----------------------------------------------------------------------------------------------------------------
# inputs

def _shape_of(v) -> Shape:
    if isinstance(v, torch.Tensor):
        return tuple(v.shape)
    if isinstance(v, Mapping):                       # a manifest tensor entry {"shape": [...], ...}
        return tuple(int(x) for x in v["shape"])
    return tuple(int(x) for x in v)


def _shapes(obj) -> dict[str, Shape]:
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    return {k: _shape_of(v) for k, v in obj.items()}


def reference_shapes_from_manifest(manifest: Mapping) -> dict[str, Shape]:
    """The `model.…` weights of a dump manifest, key -> shape, in the manifest's order."""
    return {k: _shape_of(v) for k, v in manifest["tensors"].items() if k.startswith("model.")}


def ref_layer_of(key: str) -> int | None:
    """Layer index of a reference key (`model.12.cv1.conv.weight` -> 12)."""
    m = _REF_LAYER.match(key)
    return int(m.group(1)) if m else None


def layer_of_from_map(layer_map: Mapping[str, int]) -> Callable[[str], int | None]:
    """A `layer_of` for candidate keys from a {prefix: layer_index} map (longest prefix wins)."""
    prefixes = sorted(layer_map, key=len, reverse=True)

    def layer_of(key: str) -> int | None:
        for p in prefixes:
            if key.startswith(p):
                return layer_map[p]
        return None
    return layer_of


# ----------------------------------------------------------------------------------------------------------------
# units: a conv weight together with its bias / norm vectors

@dataclass
class _Unit:
    tensors: list[tuple[str, Shape]]       # non-scalar tensors, canonical order (weights, then vectors)
    scalars: list[tuple[str, Shape]]       # 0-d tensors (num_batches_tracked)

    @property
    def sig(self) -> tuple[Shape, ...]:
        return tuple(s for _, s in self.tensors)

    @property
    def head(self) -> tuple[str, Shape]:
        return self.tensors[0] if self.tensors else self.scalars[0]

    @property
    def keys(self) -> list[str]:
        return [k for k, _ in self.tensors] + [k for k, _ in self.scalars]


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def _canonical(tensors: list[tuple[str, Shape]]) -> list[tuple[str, Shape]]:
    weights = [t for t in tensors if len(t[1]) >= 2]
    vectors = [t for t in tensors if len(t[1]) == 1]
    names = [k.rsplit(".", 1)[-1] for k, _ in vectors]
    if len(set(names)) == len(names) and all(n in _NORM_ORDER for n in names):
        vectors = sorted(vectors, key=lambda t: _NORM_ORDER[t[0].rsplit(".", 1)[-1]])
    return weights + vectors


def _make_units(items: list[tuple[str, Shape]]) -> list[_Unit]:
    """Group tensors into units. Tensors of one module (same path but the last name) stay together; a module
    holding only vectors/scalars (a norm) joins the weight-holding module beside it (same parent), preferring the
    one before it (registration order conv -> norm), else the one after (e.g. sorted names: bn < conv)."""
    modules: list[tuple[str, list[tuple[str, Shape]]]] = []
    for k, s in items:
        leaf = _parent(k)
        # a weight that is not its module's first starts a new unit (flat names: everything in one "module")
        if modules and modules[-1][0] == leaf and not (len(s) >= 2 and any(len(t) >= 2 for _, t in modules[-1][1])):
            modules[-1][1].append((k, s))
        else:
            modules.append((leaf, [(k, s)]))
    has_weight = [any(len(s) >= 2 for _, s in ts) for _, ts in modules]
    owner = list(range(len(modules)))
    for m, (leaf, _) in enumerate(modules):
        if has_weight[m]:
            continue
        prev = next((j for j in range(m - 1, -1, -1) if has_weight[j]), None)
        nxt = next((j for j in range(m + 1, len(modules)) if has_weight[j]), None)
        par = _parent(leaf)
        if prev is not None and _parent(modules[prev][0]) == par:
            owner[m] = prev
        elif nxt is not None and _parent(modules[nxt][0]) == par:
            owner[m] = nxt
        elif prev is not None:
            owner[m] = prev
        elif nxt is not None:
            owner[m] = nxt
    groups: dict[int, list[tuple[str, Shape]]] = {}
    for m, (_, ts) in enumerate(modules):
        groups.setdefault(owner[m], []).extend(ts)
    units = []
    for m in sorted(groups):
        ts = groups[m]
        units.append(_Unit(_canonical([t for t in ts if len(t[1]) > 0]), [t for t in ts if len(t[1]) == 0]))
    return units


def _split_fits(r: _Unit, parts: list[_Unit]) -> bool | None:
    """True: the parts concatenate along dim 0 to `r`; None: not yet (dim 0 still short); False: cannot."""
    if len(parts) < 1:
        return None
    for p in parts:
        if len(p.tensors) != len(r.tensors):
            return False
        for (_, ps), (_, rs) in zip(p.tensors, r.tensors):
            if len(ps) != len(rs) or ps[1:] != rs[1:]:
                return False
    short = False
    for j, (_, rs) in enumerate(r.tensors):
        total = sum(p.tensors[j][1][0] for p in parts)
        if total > rs[0]:
            return False
        short |= total < rs[0]
    if short:
        return None
    # every tensor of the unit must split the same way (a conv's out channels and its norm's channels)
    return len(parts) >= 2


@dataclass
class _BlockResult:
    pairs: list[tuple[_Unit, list[_Unit]]] = field(default_factory=list)
    unmatched: list[_Unit] = field(default_factory=list)     # reference units
    unused: list[_Unit] = field(default_factory=list)        # candidate units
    reordered: bool = False


def _solve_block(ref: list[_Unit], cand: list[_Unit]) -> _BlockResult:
    res = _BlockResult()
    used = [False] * len(cand)
    pending: list[_Unit] = []
    last_pos = -1
    for r in ref:   # exact shape sequences: the first unused candidate unit with r's shapes
        j = next((j for j, c in enumerate(cand) if not used[j] and c.sig == r.sig), None)
        if j is None:
            pending.append(r)
            continue
        used[j] = True
        res.pairs.append((r, [cand[j]]))
        res.reordered |= j < last_pos
        last_pos = j
    for r in pending:   # splits: consecutive unused candidate units concatenating to r along dim 0
        found = None
        free = [j for j in range(len(cand)) if not used[j]]
        for a in range(len(free)):
            parts = []
            for b in range(a, len(free)):
                if b > a and free[b] != free[b - 1] + 1:
                    break
                parts.append(cand[free[b]])
                fit = _split_fits(r, parts)
                if fit is None:
                    continue
                if fit:
                    found = free[a:b + 1]
                break
            if found:
                break
        if found:
            for j in found:
                used[j] = True
            res.pairs.append((r, [cand[j] for j in found]))
        else:
            res.unmatched.append(r)
    res.unused = [c for j, c in enumerate(cand) if not used[j]]
    unmatched = {id(u) for u in res.unmatched}
    res.unmatched = [r for r in ref if id(r) in unmatched]          # keep reference order
    return res


def _ok(res: _BlockResult, allowed: Callable[[_Unit], bool]) -> bool:
    return not res.unused and all(allowed(u) for u in res.unmatched)


# ----------------------------------------------------------------------------------------------------------------
# the mapping

class KeyMapping:
    """Reference key -> candidate keys, and how each was found.

    `ref_to_cand`: {ref_key: MapEntry}; `missing`: reference keys with no candidate (`missing_required` those
    that are not allowed to be missing); `unexpected`: candidate keys mapped to nothing; `notes`: anything the
    matcher assumed (units matched out of registration order); `errors`: with strict=False, the MappingErrors
    strict mode would have raised, first one first."""

    def __init__(self, ref_shapes: dict[str, Shape], cand_shapes: dict[str, Shape],
                 ref_to_cand: dict[str, MapEntry], missing: list[str], unexpected: list[str],
                 allowed_missing: Callable[[str], bool], notes: list[str], layer_of_cand: dict[str, int],
                 errors: list[MappingError] | None = None):
        self.ref_shapes = ref_shapes
        self.cand_shapes = cand_shapes
        self.ref_to_cand = ref_to_cand
        self.missing = missing
        self.unexpected = unexpected
        self.notes = notes
        self._allowed = allowed_missing
        self._layer_of_cand = layer_of_cand
        self.errors = list(errors or [])        # what strict mode would have raised (strict=False only)

    @property
    def missing_required(self) -> list[str]:
        return [k for k in self.missing if not self._allowed(k)]

    @property
    def cand_to_ref(self) -> dict[str, str]:
        return {c: r for r, e in self.ref_to_cand.items() for c in e.cand_keys}

    def layer_of_candidate(self, key: str) -> int | None:
        """Reference layer index a candidate key belongs to (through the mapping, or the block it was in)."""
        r = self.cand_to_ref.get(key)
        return ref_layer_of(r) if r is not None else self._layer_of_cand.get(key)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.ref_to_cand.values():
            out[e.how] = out.get(e.how, 0) + 1
        return out

    # ---- moving tensors across ----------------------------------------------------------------------------
    def reference_to_candidate(self, ref_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Reference tensors under the candidate's names (split along dim 0 where one maps to several)."""
        out: dict[str, torch.Tensor] = {}
        for rk, e in self.ref_to_cand.items():
            if rk not in ref_state:
                raise MappingError(f"the reference tensors lack {rk!r}", ref_key=rk, ref_shape=self.ref_shapes[rk])
            t = ref_state[rk]
            if len(e.cand_keys) == 1:
                out[e.cand_keys[0]] = t
            elif t.dim() == 0:                     # a scalar (num_batches_tracked) goes to every part
                for ck in e.cand_keys:
                    out[ck] = t
            else:
                for ck, part in zip(e.cand_keys, t.split([self.cand_shapes[c][0] for c in e.cand_keys], 0)):
                    out[ck] = part
        return out

    @torch.no_grad()
    def load_reference_into(self, candidate: nn.Module, ref_tensors: Mapping[str, torch.Tensor]) -> list[str]:
        """Copy the reference weights into `candidate` in place (dtype and device of the candidate kept).
        Returns the candidate keys that received nothing (`unexpected`)."""
        own = candidate.state_dict(keep_vars=True)
        for ck, t in self.reference_to_candidate(ref_tensors).items():
            dst = own[ck]
            if tuple(dst.shape) != tuple(t.shape):
                raise MappingError(f"candidate tensor {ck} has shape {tuple(dst.shape)}, the mapping expects "
                                   f"{tuple(t.shape)}", cand_key=ck, cand_shape=tuple(dst.shape))
            dst.copy_(t)
        return list(self.unexpected)

    def candidate_to_reference(self, cand_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Candidate tensors under the reference names (split parts concatenated back)."""
        out: dict[str, torch.Tensor] = {}
        for rk, e in self.ref_to_cand.items():
            ts = [cand_state[c] for c in e.cand_keys]
            out[rk] = ts[0] if len(ts) == 1 or ts[0].dim() == 0 else torch.cat(ts, 0)
        return out

    # ---- reporting -----------------------------------------------------------------------------------------
    def describe(self, verbose: bool = True) -> str:
        c = self.counts()
        lines = [f"{len(self.ref_to_cand)} of {len(self.ref_shapes)} reference tensors mapped ("
                 + ", ".join(f"{n} {h}" for h, n in sorted(c.items())) + ")"]
        if verbose:
            width = max((len(k) for k in self.ref_to_cand), default=0)
            for rk, e in self.ref_to_cand.items():
                cands = ", ".join(e.cand_keys)
                lines.append(f"  {rk:<{width}}  <- {cands}  [{e.how}]")
        for k in self.missing:
            why = "allowed: not trainable" if self._allowed(k) else "REQUIRED"
            lines.append(f"  missing    {k} {list(self.ref_shapes[k])} ({why})")
        for k in self.unexpected:
            lines.append(f"  unexpected {k} {list(self.cand_shapes[k])}")
        lines.extend(f"  note: {n}" for n in self.notes)
        lines.extend(f"  error: {e}" for e in self.errors)
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"KeyMapping({self.counts()}, missing={len(self.missing)}, unexpected={len(self.unexpected)})"


def _compile_key_map(key_map) -> list[tuple[re.Pattern, str]]:
    if not key_map:
        return []
    pairs = key_map.items() if isinstance(key_map, Mapping) else key_map
    return [(_compile_entry("key_map", p), r) for p, r in pairs]


def _compile_entry(section: str, pattern: str) -> re.Pattern:
    """A user's regular expression, or exit 2 naming the entry (never a re.error traceback)."""
    try:
        return re.compile(pattern)
    except (re.error, TypeError) as error:
        raise ParityError(f"{section} entry {pattern!r} is not a valid regular expression: {error}") from None


def _nearest(shape: Shape, pool: Iterable[tuple[str, Shape]], n: int = 3) -> list[tuple[str, Shape]]:
    def score(item):
        _, s = item
        same_rank = len(s) == len(shape)
        equal_dims = sum(a == b for a, b in zip(s, shape)) if same_rank else 0
        return (not same_rank, -equal_dims, abs(math.prod(s) - math.prod(shape)) / max(1, math.prod(shape)))
    pool = list(pool)
    same_rank = [t for t in pool if len(t[1]) == len(shape)]
    pool = same_rank or pool
    order = sorted(range(len(pool)), key=lambda i: (score(pool[i]), i))
    return [pool[i] for i in order[:n]]


def _fmt(shape: Shape) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


def _fail_unmatched(r: _Unit, layer: int | None, pool: list[_Unit]) -> MappingError:
    key, shape = r.head
    near = _nearest(shape, [t for u in pool for t in u.tensors])
    where = f" (layer {layer})" if layer is not None else ""
    if near:
        cands = "; ".join(f"{k} {_fmt(s)}" for k, s in near)
        msg = (f"reference tensor {key} {_fmt(shape)}{where} has no candidate tensor of that shape; "
               f"nearest candidates: {cands}")
    else:
        msg = f"reference tensor {key} {_fmt(shape)}{where} has no candidate tensor left to match"
    msg += ". Give a key_map or layer_map, or check this layer's shapes."
    return MappingError(msg, ref_key=key, ref_shape=shape, layer=layer, nearest=near)


def build_mapping(reference, candidate, key_map=None, layer_map: Mapping[str, int] | None = None,
                  allow_missing: Sequence[str] = DEFAULT_ALLOWED_MISSING, strict: bool = True) -> KeyMapping:
    """Map `candidate` onto `reference`.

    reference: {ref_key: tensor | shape | manifest entry} in state_dict order, or an nn.Module (ultralytics').
    candidate: its state_dict (or shapes), or the nn.Module (whose `layer_map` attribute is used if present).
    key_map: {regex: replacement} or [(regex, replacement)], applied in order to candidate names.
    layer_map: {candidate_prefix: reference layer index}.
    allow_missing: regexes of reference keys that may be absent from the candidate (non-trainable tensors).
    strict: raise MappingError on a required reference tensor without candidate or an unexpected candidate
    tensor; otherwise record them in `missing` / `unexpected`.
    """
    if layer_map is None and isinstance(candidate, nn.Module):
        layer_map = getattr(candidate, "layer_map", None)
    ref_shapes = _shapes(reference)
    cand_shapes = _shapes(candidate)
    allowed_res = [_compile_entry("allow_missing", p) for p in allow_missing]

    def allowed_key(k: str) -> bool:
        return any(p.search(k) for p in allowed_res)

    def allowed_unit(u: _Unit) -> bool:
        return all(allowed_key(k) for k in u.keys)

    ref_to_cand: dict[str, MapEntry] = {}
    taken: set[str] = set()
    notes: list[str] = []
    errors: list[MappingError] = []

    def shape_error(rk: str, ck: str, how: str) -> MappingError:
        rs, cs = ref_shapes[rk], cand_shapes[ck]
        return MappingError(f"reference tensor {rk} {_fmt(rs)} and candidate tensor {ck} {_fmt(cs)} match by "
                            f"{how} but not by shape", ref_key=rk, ref_shape=rs, layer=ref_layer_of(rk),
                            nearest=[(ck, cs)], cand_key=ck, cand_shape=cs)

    # (a) identity
    for rk, rs in ref_shapes.items():
        if rk in cand_shapes:
            if cand_shapes[rk] != rs:
                if strict:
                    raise shape_error(rk, rk, "name")
                errors.append(shape_error(rk, rk, "name"))
                continue
            ref_to_cand[rk] = MapEntry([rk], "identity")
            taken.add(rk)
    # (b) user renames
    rules = _compile_key_map(key_map)
    if rules:
        for ck in cand_shapes:
            if ck in taken:
                continue
            new = ck
            for pat, rep in rules:
                new = pat.sub(rep, new)
            if new != ck and new in ref_shapes:
                if new in ref_to_cand:
                    raise MappingError(f"key_map sends {ck} onto {new}, which is already mapped to "
                                       f"{ref_to_cand[new].cand_keys}", ref_key=new, cand_key=ck)
                if cand_shapes[ck] != ref_shapes[new]:
                    if strict:
                        raise shape_error(new, ck, "key_map")
                    errors.append(shape_error(new, ck, "key_map"))
                    continue
                ref_to_cand[new] = MapEntry([ck], "rename")
                taken.add(ck)

    # (c, d) blocks by order and shape
    ref_left = [(k, s) for k, s in ref_shapes.items() if k not in ref_to_cand]
    cand_left = [(k, s) for k, s in cand_shapes.items() if k not in taken]
    ref_blocks: dict[int, list[tuple[str, Shape]]] = {}
    for k, s in ref_left:
        i = ref_layer_of(k)
        ref_blocks.setdefault(-1 if i is None else i, []).append((k, s))
    layer_of = layer_of_from_map(layer_map) if layer_map else (lambda k: None)
    cand_blocks: dict[int, list[tuple[str, Shape]]] = {}
    stream: list[tuple[str, Shape]] = []
    for k, s in cand_left:
        i = layer_of(k)
        (stream if i is None else cand_blocks.setdefault(i, [])).append((k, s))
    block_of_cand: dict[str, int] = {k: i for i, items in cand_blocks.items() for k, _ in items}

    missing: list[str] = []
    unexpected: list[str] = []
    reordered: list[int] = []

    def record(layer: int, res: _BlockResult) -> None:
        for r, parts in res.pairs:
            split = len(parts) > 1
            how = "split" if split else "shape"
            for j, (rk, _) in enumerate(r.tensors):
                ref_to_cand[rk] = MapEntry([p.tensors[j][0] for p in parts], how)
            # scalars (num_batches_tracked): pair in order; a split scalar goes to every part that has one
            for j, (rk, _) in enumerate(r.scalars):
                cks = [p.scalars[j][0] for p in parts if j < len(p.scalars)]
                if cks:
                    ref_to_cand[rk] = MapEntry(cks if split else cks[:1], how)
                else:
                    missing.append(rk)
            for p in parts:
                for ck, _ in p.scalars[len(r.scalars):]:
                    unexpected.append(ck)
        if res.reordered:
            reordered.append(layer)
        for r in res.unmatched:
            missing.extend(r.keys)
            if not allowed_unit(r):
                errors.append(_fail_unmatched(r, layer if layer >= 0 else None, res.unused))
        for c in res.unused:
            unexpected.extend(c.keys)

    # blocks given by the layer map
    stream_layers = []
    for i in sorted(ref_blocks):
        if i in cand_blocks:
            units = _make_units(ref_blocks[i])
            res = _solve_block(units, _make_units(cand_blocks.pop(i)))
            record(i, res)
        else:
            stream_layers.append(i)
    for i, items in cand_blocks.items():      # layer-map blocks with no reference tensors left
        unexpected.extend(k for k, _ in items)
    # the others, by order: each reference layer takes the shortest run of candidate units that matches it
    # completely (so a tensor whose shape fits two layers goes to the shallower one)
    sunits = _make_units(stream)
    p = 0
    for i in stream_layers:
        units = _make_units(ref_blocks[i])
        best = None
        for w in range(0, len(sunits) - p + 1):
            res = _solve_block(units, sunits[p:p + w])
            if _ok(res, allowed_unit):
                best = (w, res)
                break
        if best is not None:
            # the run may also cover units that may be missing (a DFL conv) when the candidate has them
            while p + best[0] < len(sunits):
                nxt = _solve_block(units, sunits[p:p + best[0] + 1])
                if not (_ok(nxt, allowed_unit) and len(nxt.unmatched) < len(best[1].unmatched)):
                    break
                best = (best[0] + 1, nxt)
        else:
            # no run matches: report from the run that matched the most reference units
            scored = []
            for w in range(0, min(len(sunits) - p, 4 * len(units) + 8) + 1):
                res = _solve_block(units, sunits[p:p + w])
                scored.append((len(res.pairs), -w, res))
            npairs, negw, res = max(scored, key=lambda x: (x[0], x[1]))
            best = (-negw, res)
            first = next((r for r in res.unmatched if not allowed_unit(r)), None)
            if first is None:
                c = res.unused[0]
                err = MappingError(f"candidate tensor {c.head[0]} {_fmt(c.head[1])} sits among layer {i}'s "
                                   f"tensors but matches none of them", layer=i, cand_key=c.head[0],
                                   cand_shape=c.head[1])
            else:
                err = _fail_unmatched(first, i if i >= 0 else None, res.unused + sunits[p + best[0]:p + best[0] + 6])
            if strict:
                raise err
            errors.append(err)
        w, res = best
        for c in sunits[p:p + w]:
            for k in c.keys:
                block_of_cand[k] = i
        record(i, res)
        p += w
    for c in sunits[p:]:
        unexpected.extend(c.keys)

    if reordered:
        notes.append("groups matched by their shapes, not their registration order, in layer(s) "
                     + ", ".join(map(str, sorted(reordered))))
    if strict and errors:
        raise errors[0]
    hard_unexpected = [k for k in unexpected if len(cand_shapes[k]) > 0]
    if strict and hard_unexpected:
        k = hard_unexpected[0]
        raise MappingError(f"candidate tensor {k} {_fmt(cand_shapes[k])} matches no reference tensor "
                           f"(unexpected: {len(hard_unexpected)} tensors)", cand_key=k, cand_shape=cand_shapes[k],
                           layer=block_of_cand.get(k),
                           nearest=_nearest(cand_shapes[k], [(r, ref_shapes[r]) for r in missing]))
    order = {k: n for n, k in enumerate(ref_shapes)}
    ref_to_cand = dict(sorted(ref_to_cand.items(), key=lambda kv: order[kv[0]]))
    return KeyMapping(ref_shapes, cand_shapes, ref_to_cand, sorted(set(missing), key=order.get), unexpected,
                      allowed_key, notes, block_of_cand, errors)


# ----------------------------------------------------------------------------------------------------------------
# parameter counts

def param_counts_by_layer(shapes: Mapping, layer_of: Callable[[str], int | None] = ref_layer_of) -> dict[int, int]:
    """Parameters per layer: the sum of numel over keys (statistics buffers excluded), by `layer_of(key)`.
    Keys whose layer is None are left out."""
    out: dict[int, int] = {}
    for k, v in shapes.items():
        if k.rsplit(".", 1)[-1] in _STAT_BUFFERS:
            continue
        i = layer_of(k)
        if i is None:
            continue
        n = 1
        for d in _shape_of(v):
            n *= d
        out[i] = out.get(i, 0) + n
    return dict(sorted(out.items()))


def compare_param_counts(ref_counts: Mapping[int, int],
                         cand_counts: Mapping[int, int]) -> list[tuple[int, int, int, int]]:
    """Layers whose parameter counts differ: [(layer, reference, candidate, candidate - reference)]."""
    rows = []
    for i in sorted(set(ref_counts) | set(cand_counts)):
        r, c = ref_counts.get(i, 0), cand_counts.get(i, 0)
        if r != c:
            rows.append((i, r, c, c - r))
    return rows
