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


def _align_in_order(ref: list[_Unit], cand: list[_Unit], allowed: Callable[[_Unit], bool]) -> _BlockResult | None:
    """Both sides in the order their modules run: each reference unit takes the next candidate unit of its shapes,
    or the next few candidate units that concatenate to it (a split conv). None when the orders do not agree."""
    res = _BlockResult()
    j = 0
    for r in ref:
        if j < len(cand) and cand[j].sig == r.sig:
            res.pairs.append((r, [cand[j]]))
            j += 1
            continue
        parts, fit = [], None
        for k in range(j, len(cand)):
            parts.append(cand[k])
            fit = _split_fits(r, parts)
            if fit is not None:
                break
        if fit:
            res.pairs.append((r, parts))
            j += len(parts)
        elif allowed(r):
            res.unmatched.append(r)
        else:
            return None
    return res if j == len(cand) else None


def _same_pairs(a: _BlockResult, b: _BlockResult) -> bool:
    def key(res):
        return sorted((tuple(r.keys), tuple(k for p in parts for k in p.keys)) for r, parts in res.pairs)
    return key(a) == key(b)


def _swaps(res: _BlockResult, limit: int = 8) -> list[_BlockResult]:
    """The block's result with two equal-shaped reference units trading their candidates (first `limit`)."""
    out = []
    pairs = res.pairs
    for x in range(len(pairs)):
        for y in range(x + 1, len(pairs)):
            (rx, px), (ry, py) = pairs[x], pairs[y]
            if rx.sig != ry.sig:       # equal shapes: a split's parts fit the other unit as well
                continue
            alt = _BlockResult(list(pairs), list(res.unmatched), list(res.unused))
            alt.pairs[x], alt.pairs[y] = (rx, py), (ry, px)
            out.append(alt)
            if len(out) >= limit:
                return out
    return out


def _equal_shapes(res: _BlockResult, layer: int) -> str:
    """Words for the reference units of a block that a shape cannot tell apart ("cv1 and cv2 (32, 48, 1, 1)")."""
    groups: dict[tuple, list[str]] = {}
    for r, parts in res.pairs:
        groups.setdefault(r.sig, []).append(_module_name(r.head[0], layer))
    words = [f"{' and '.join(names_)} {_fmt(sig[0])}" for sig, names_ in groups.items() if len(names_) > 1]
    return "; ".join(words[:3])


def _module_name(key: str, layer: int) -> str:
    rel = key[len(f"model.{layer}."):] if key.startswith(f"model.{layer}.") else key
    path = rel.rsplit(".", 1)[0]
    return path[:-len(".conv")] if path.endswith(".conv") else path


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
        # layer -> other assignments of that block's tensors a shape alone cannot rule out ({ref_key: MapEntry}
        # each), and the words for what is ambiguous; `resolved` says how isolated replay settled each one
        self.alternatives: dict[int, list[dict[str, MapEntry]]] = {}
        self.ambiguous: dict[int, str] = {}
        self.resolved: dict[int, str] = {}
        self.order_decided: set[int] = set()    # layers where the call order and the shapes alone disagree

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
        for layer, words in sorted(self.ambiguous.items()):
            lines.append(f"  ambiguous: layer {layer}: {words}: "
                         + self.resolved.get(layer, "matched by shape in the order given, not checked by replay"))
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
                  allow_missing: Sequence[str] = DEFAULT_ALLOWED_MISSING, strict: bool = True,
                  call_order: Mapping[str, float] | None = None,
                  reference_order: Mapping[str, float] | None = None) -> KeyMapping:
    """Map `candidate` onto `reference`.

    reference: {ref_key: tensor | shape | manifest entry} in state_dict order, or an nn.Module (ultralytics').
    candidate: its state_dict (or shapes), or the nn.Module (whose `layer_map` attribute is used if present).
    key_map: {regex: replacement} or [(regex, replacement)], applied in order to candidate names.
    layer_map: {candidate_prefix: reference layer index}.
    allow_missing: regexes of reference keys that may be absent from the candidate (non-trainable tensors).
    strict: raise MappingError on a required reference tensor without candidate or an unexpected candidate
    tensor; otherwise record them in `missing` / `unexpected`.
    call_order / reference_order: {key: rank} of the module each tensor belongs to, in the order the modules
    run (a traced candidate; the reference dump's sub-block order). Inside a layer-map block, equal shapes are
    then matched in that order first; the shape-only match is kept as an alternative where it differs.
    """
    if layer_map is None and isinstance(candidate, nn.Module):
        layer_map = getattr(candidate, "layer_map", None)
    search = _MappingSearch(_shapes(reference), _shapes(candidate), allow_missing, strict, call_order,
                            reference_order)
    search.match_identity()                               # (a) identity
    search.match_renames(_compile_key_map(key_map))       # (b) user renames
    search.match_blocks(layer_map)                        # (c, d) blocks by order and shape
    return search.result()


class _MappingSearch:
    """The state of one `build_mapping`: what is mapped so far, what is taken, and what went wrong."""

    def __init__(self, ref_shapes: dict[str, Shape], cand_shapes: dict[str, Shape], allow_missing: Sequence[str],
                 strict: bool, call_order: Mapping[str, float] | None, reference_order: Mapping[str, float] | None):
        self.ref_shapes, self.cand_shapes = ref_shapes, cand_shapes
        self.allowed_res = [_compile_entry("allow_missing", p) for p in allow_missing]
        self.strict = strict
        self.call_order, self.reference_order = call_order, reference_order
        self.ref_to_cand: dict[str, MapEntry] = {}
        self.taken: set[str] = set()
        self.notes: list[str] = []
        self.errors: list[MappingError] = []
        self.missing: list[str] = []
        self.unexpected: list[str] = []
        self.reordered: list[int] = []
        self.block_of_cand: dict[str, int] = {}
        self.alternatives: dict[int, list[_BlockResult]] = {}
        self.ambiguous: dict[int, str] = {}
        self.order_decided: set[int] = set()

    def allowed_key(self, k: str) -> bool:
        return any(p.search(k) for p in self.allowed_res)

    def allowed_unit(self, u: _Unit) -> bool:
        return all(self.allowed_key(k) for k in u.keys)

    def shape_error(self, rk: str, ck: str, how: str) -> MappingError:
        rs, cs = self.ref_shapes[rk], self.cand_shapes[ck]
        return MappingError(f"reference tensor {rk} {_fmt(rs)} and candidate tensor {ck} {_fmt(cs)} match by "
                            f"{how} but not by shape", ref_key=rk, ref_shape=rs, layer=ref_layer_of(rk),
                            nearest=[(ck, cs)], cand_key=ck, cand_shape=cs)

    def _shape_mismatch(self, rk: str, ck: str, how: str) -> None:
        """Raised at once in strict mode, recorded otherwise."""
        if self.strict:
            raise self.shape_error(rk, ck, how)
        self.errors.append(self.shape_error(rk, ck, how))

    # (a) identity
    def match_identity(self) -> None:
        for rk, rs in self.ref_shapes.items():
            if rk in self.cand_shapes:
                if self.cand_shapes[rk] != rs:
                    self._shape_mismatch(rk, rk, "name")
                    continue
                self.ref_to_cand[rk] = MapEntry([rk], "identity")
                self.taken.add(rk)

    # (b) user renames
    def match_renames(self, rules: list[tuple[re.Pattern, str]]) -> None:
        if not rules:
            return
        used_rules: set[int] = set()
        for ck in self.cand_shapes:
            if ck in self.taken:
                continue
            new, touched = _renamed(ck, rules)
            if new == ck or new not in self.ref_shapes:
                continue
            used_rules.update(touched)
            if new in self.ref_to_cand:
                raise MappingError(f"key_map sends {ck} onto {new}, which is already mapped to "
                                   f"{self.ref_to_cand[new].cand_keys}", ref_key=new, cand_key=ck)
            if self.cand_shapes[ck] != self.ref_shapes[new]:
                self._shape_mismatch(new, ck, "key_map")
                continue
            self.ref_to_cand[new] = MapEntry([ck], "rename")
            self.taken.add(ck)
        unused = [rules[n][0].pattern for n in range(len(rules)) if n not in used_rules]
        if unused:
            raise ParityError(f"key_map entry {unused[0]!r} renames no candidate tensor onto a reference tensor "
                              f"(of {len(rules)} entries, {len(unused)} unused): fix or remove it")

    # (c, d) blocks by order and shape
    def match_blocks(self, layer_map: Mapping[str, int] | None) -> None:
        ref_blocks: dict[int, list[tuple[str, Shape]]] = {}
        for k, s in self.ref_shapes.items():
            if k not in self.ref_to_cand:
                i = ref_layer_of(k)
                ref_blocks.setdefault(-1 if i is None else i, []).append((k, s))
        layer_of = layer_of_from_map(layer_map) if layer_map else (lambda k: None)
        cand_blocks: dict[int, list[tuple[str, Shape]]] = {}
        stream: list[tuple[str, Shape]] = []
        for k, s in self.cand_shapes.items():
            if k not in self.taken:
                i = layer_of(k)
                (stream if i is None else cand_blocks.setdefault(i, [])).append((k, s))
        self.block_of_cand = {k: i for i, items in cand_blocks.items() for k, _ in items}
        # blocks given by the layer map
        stream_layers = []
        for i in sorted(ref_blocks):
            if i in cand_blocks:
                self.record(i, self.solve_layer(i, ref_blocks[i], cand_blocks.pop(i)))
            else:
                stream_layers.append(i)
        for i, items in cand_blocks.items():      # layer-map blocks with no reference tensors left
            self.unexpected.extend(k for k, _ in items)
        self.match_stream(stream_layers, ref_blocks, _make_units(stream))

    def record(self, layer: int, res: _BlockResult) -> None:
        for r, parts in res.pairs:
            split = len(parts) > 1
            how = "split" if split else "shape"
            for j, (rk, _) in enumerate(r.tensors):
                self.ref_to_cand[rk] = MapEntry([p.tensors[j][0] for p in parts], how)
            # scalars (num_batches_tracked): pair in order; a split scalar goes to every part that has one
            for j, (rk, _) in enumerate(r.scalars):
                cks = [p.scalars[j][0] for p in parts if j < len(p.scalars)]
                if cks:
                    self.ref_to_cand[rk] = MapEntry(cks if split else cks[:1], how)
                else:
                    self.missing.append(rk)
            for p in parts:
                for ck, _ in p.scalars[len(r.scalars):]:
                    self.unexpected.append(ck)
        if res.reordered:
            self.reordered.append(layer)
        for r in res.unmatched:
            self.missing.extend(r.keys)
            if not self.allowed_unit(r):
                self.errors.append(_fail_unmatched(r, layer if layer >= 0 else None, res.unused))
        for c in res.unused:
            self.unexpected.extend(c.keys)

    def solve_layer(self, i: int, ref_items, cand_items) -> _BlockResult:
        """One layer-map block by shape; with call orders, matched in order first and the shape-only match kept
        as an alternative where it differs."""
        units, cunits = _make_units(ref_items), _make_units(cand_items)
        res = _solve_block(units, cunits)
        others: list[_BlockResult] = []
        if self.call_order is not None and self.reference_order is not None:
            ordered = _align_in_order(sorted(units, key=lambda u: self.reference_order.get(u.head[0], math.inf)),
                                      sorted(cunits, key=lambda u: self.call_order.get(u.head[0], math.inf)),
                                      self.allowed_unit)
            if ordered is not None:
                ordered.unmatched = [r for r in units if any(r is u for u in ordered.unmatched)]
                if not _same_pairs(ordered, res) and _ok(res, self.allowed_unit):
                    others.append(res)
                    self.order_decided.add(i)
                res = ordered
        others += [alt for alt in _swaps(res) if not any(_same_pairs(alt, o) for o in others)]
        if others:
            self.alternatives[i] = others
            self.ambiguous[i] = _equal_shapes(res, i) or "tensors of equal shapes"
        return res

    def match_stream(self, stream_layers: list[int], ref_blocks: dict[int, list[tuple[str, Shape]]],
                     sunits: list[_Unit]) -> None:
        """The layers no layer map gives, by order: each reference layer takes the shortest run of candidate
        units that matches it completely (so a tensor whose shape fits two layers goes to the shallower one)."""
        p = 0
        for i in stream_layers:
            units = _make_units(ref_blocks[i])
            best = self._shortest_run(units, sunits, p)
            if best is None:
                best = self._closest_run(i, units, sunits, p)
            w, res = best
            for c in sunits[p:p + w]:
                for k in c.keys:
                    self.block_of_cand[k] = i
            self.record(i, res)
            p += w
        for c in sunits[p:]:
            self.unexpected.extend(c.keys)

    def _shortest_run(self, units: list[_Unit], sunits: list[_Unit], p: int) -> tuple[int, _BlockResult] | None:
        best = None
        for w in range(0, len(sunits) - p + 1):
            res = _solve_block(units, sunits[p:p + w])
            if _ok(res, self.allowed_unit):
                best = (w, res)
                break
        if best is None:
            return None
        # the run may also cover units that may be missing (a DFL conv) when the candidate has them
        while p + best[0] < len(sunits):
            nxt = _solve_block(units, sunits[p:p + best[0] + 1])
            if not (_ok(nxt, self.allowed_unit) and len(nxt.unmatched) < len(best[1].unmatched)):
                break
            best = (best[0] + 1, nxt)
        return best

    def _closest_run(self, i: int, units: list[_Unit], sunits: list[_Unit], p: int) -> tuple[int, _BlockResult]:
        """No run matches: report from the run that matched the most reference units."""
        scored = []
        for w in range(0, min(len(sunits) - p, 4 * len(units) + 8) + 1):
            res = _solve_block(units, sunits[p:p + w])
            scored.append((len(res.pairs), -w, res))
        _npairs, negw, res = max(scored, key=lambda x: (x[0], x[1]))
        best = (-negw, res)
        first = next((r for r in res.unmatched if not self.allowed_unit(r)), None)
        if first is None:
            c = res.unused[0]
            err = MappingError(f"candidate tensor {c.head[0]} {_fmt(c.head[1])} sits among layer {i}'s "
                               f"tensors but matches none of them", layer=i, cand_key=c.head[0],
                               cand_shape=c.head[1])
        else:
            err = _fail_unmatched(first, i if i >= 0 else None, res.unused + sunits[p + best[0]:p + best[0] + 6])
        if self.strict:
            raise err
        self.errors.append(err)
        return best

    def result(self) -> KeyMapping:
        if self.reordered:
            self.notes.append("groups matched by their shapes, not their registration order, in layer(s) "
                              + ", ".join(map(str, sorted(self.reordered))))
        if self.strict and self.errors:
            raise self.errors[0]
        cand_shapes, ref_shapes = self.cand_shapes, self.ref_shapes
        hard_unexpected = [k for k in self.unexpected if len(cand_shapes[k]) > 0]
        if self.strict and hard_unexpected:
            k = hard_unexpected[0]
            raise MappingError(f"candidate tensor {k} {_fmt(cand_shapes[k])} matches no reference tensor "
                               f"(unexpected: {len(hard_unexpected)} tensors)", cand_key=k, cand_shape=cand_shapes[k],
                               layer=self.block_of_cand.get(k),
                               nearest=_nearest(cand_shapes[k], [(r, ref_shapes[r]) for r in self.missing]))
        order = {k: n for n, k in enumerate(ref_shapes)}
        ref_to_cand = dict(sorted(self.ref_to_cand.items(), key=lambda kv: order[kv[0]]))
        mapping = KeyMapping(ref_shapes, cand_shapes, ref_to_cand, sorted(set(self.missing), key=order.get),
                             self.unexpected, self.allowed_key, self.notes, self.block_of_cand, self.errors)
        for i, others in self.alternatives.items():
            mapping.alternatives[i] = [_entries(alt) for alt in others]
            mapping.ambiguous[i] = self.ambiguous[i]
        mapping.order_decided = self.order_decided
        return mapping


def _renamed(key: str, rules: list[tuple[re.Pattern, str]]) -> tuple[str, list[int]]:
    """`key` after every rule in order, and the rules that changed it."""
    new, touched = key, []
    for n, (pat, rep) in enumerate(rules):
        renamed = pat.sub(rep, new)
        if renamed != new:
            touched.append(n)
        new = renamed
    return new, touched


def _entries(res: _BlockResult) -> dict[str, MapEntry]:
    out = {}
    for r, parts in res.pairs:
        how = "split" if len(parts) > 1 else "shape"
        for j, (rk, _) in enumerate(r.tensors):
            out[rk] = MapEntry([p.tensors[j][0] for p in parts], how)
        for j, (rk, _) in enumerate(r.scalars):
            cks = [p.scalars[j][0] for p in parts if j < len(p.scalars)]
            if cks:
                out[rk] = MapEntry(cks if len(parts) > 1 else cks[:1], how)
    return out


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


# ----------------------------------------------------------------------------------------------------------------
# structure differences in words

# ultralytics' class of a layer type's repeated children (`m.{j}`), for the words of a structure finding
_CHILD_CLASS = {"C2f": "Bottleneck", "C3k2": "Bottleneck", "C3": "Bottleneck", "C2PSA": "PSABlock", "C3k": "Bottleneck"}
_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _module_pairs(mapping: KeyMapping, index: int) -> dict[str, str]:
    """Candidate module path -> reference module path (inside layer `index`), read off the mapped tensors."""
    pairs: dict[str, str] = {}
    prefix = f"model.{index}."
    for rk, entry in mapping.ref_to_cand.items():
        if not rk.startswith(prefix) or len(entry.cand_keys) != 1:
            continue
        r, c = rk[len(prefix):].split("."), entry.cand_keys[0].split(".")
        while r and c and r[-1] == c[-1]:
            r, c = r[:-1], c[:-1]
        while r and c:
            pairs.setdefault(".".join(c), ".".join(r))
            r, c = r[:-1], c[:-1]
    return pairs


def describe_block_difference(mapping: KeyMapping, index: int, layer_type: str | None = None) -> str:
    """"layer 12: 2 extra Bottlenecks m.1, m.2; cv2 (32, 80, 1, 1) vs (32, 48, 1, 1)": the candidate's extra or
    missing sub-modules in ultralytics' names, and the tensors whose shapes differ (candidate vs reference)."""
    prefix = f"model.{index}."
    missing = [k for k in mapping.missing if k.startswith(prefix) and k.rsplit(".", 1)[-1] not in _STATS
               and not mapping._allowed(k)]
    unexpected = [k for k in mapping.unexpected if mapping._layer_of_cand.get(k) == index
                  and k.rsplit(".", 1)[-1] not in _STATS]
    if not missing and not unexpected:
        return ""
    pairs = _module_pairs(mapping, index)
    parts: list[str] = []
    # whole extra sub-modules: an unmapped candidate module whose parent has a reference counterpart
    extra: dict[str, list[str]] = {}
    for key in unexpected:
        path = key.split(".")[:-1]
        for depth in range(len(path) - 1, 0, -1):
            parent, child = ".".join(path[:depth]), path[depth]
            if parent in pairs and ".".join(path[:depth + 1]) not in pairs:
                extra.setdefault(pairs[parent], []).append(child)
                break
    grouped_keys = set()
    for ref_parent, children in extra.items():
        children = list(dict.fromkeys(children))
        cls = _CHILD_CLASS.get(layer_type or "", "sub-module") if ref_parent.split(".")[-1] == "m" else "sub-module"
        plural = cls + ("s" if len(children) > 1 else "")
        parts.append(f"{len(children)} extra {plural} " + ", ".join(f"{ref_parent}.{c}" for c in children))
        for key in unexpected:
            for c in children:
                cand_parent = next(cp for cp, rp in pairs.items() if rp == ref_parent)
                if key.startswith(f"{cand_parent}.{c}."):
                    grouped_keys.add(key)
    # reference sub-modules the candidate lacks entirely
    missing_modules: dict[str, None] = {}
    for key in missing:
        rel = key[len(prefix):].split(".")[:-1]
        for depth in range(1, len(rel) + 1):
            path = ".".join(rel[:depth])
            if path not in pairs.values():
                missing_modules.setdefault(path, None)
                break
    # tensors left over on both sides: pair them in order as "shape differs"
    left_cand = [k for k in unexpected if k not in grouped_keys and len(mapping.cand_shapes[k]) >= 2]
    left_ref = [k for k in missing if len(mapping.ref_shapes[k]) >= 2]
    shapes = []
    for rk, ck in zip(left_ref, left_cand):
        name = rk[len(prefix):].rsplit(".", 1)[0]
        name = name[:-len(".conv")] if name.endswith(".conv") else name
        shapes.append(f"{name} {_fmt(mapping.cand_shapes[ck])} vs {_fmt(mapping.ref_shapes[rk])}")
    paired = {k[len(prefix):].split(".")[0] for k in left_ref[:len(left_cand)]}
    lacking = [m for m in missing_modules if m.split(".")[0] not in paired and not any(
        m.startswith(p) for p in paired)]
    if lacking:
        parts.append("missing " + ", ".join(lacking))
    parts.extend(shapes)
    extra_cand = left_cand[len(left_ref):]
    if extra_cand:
        parts.append("extra tensors " + ", ".join(f"{k} {_fmt(mapping.cand_shapes[k])}" for k in extra_cand[:3]))
    return f"layer {index}: " + "; ".join(parts) + " (candidate vs ultralytics)" if parts else ""
