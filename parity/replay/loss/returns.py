"""Reading a candidate loss's return value by types and shapes (`read_loss_return`): the loss vector, three
scalars, (loss, items[, intermediates]), a dict or object of terms, or a total alone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from parity.errors import ParityError
from parity.replay.loss.spec import TERMS


@dataclass
class CandidateResult:
    """A candidate loss's return value as read: its terms (or its total alone), items and intermediates."""

    terms: torch.Tensor | None  # (3,) box, cls, dfl as returned, or None when only a total was returned
    total: torch.Tensor
    items: torch.Tensor | None
    tensors: dict[str, torch.Tensor]
    form: str = ""  # how the return value was read, in words ("a tuple of three scalars (box, cls, dfl)")
    per_gain: bool = False  # terms come from calls with one gain at a time (a scalar-only loss)


# Names a loss may give its terms in a returned dict or object (ultralytics' own `loss_names` included).
TERM_ALIASES = {"box": ("box", "box_loss", "loss_box", "iou", "loss_iou", "lbox"),
                "cls": ("cls", "cls_loss", "loss_cls", "lcls"),
                "dfl": ("dfl", "dfl_loss", "loss_dfl", "ldfl")}
RETURN_SHAPES = ("a (3,) loss vector; a tuple/list of three scalars (box, cls, dfl); (vector or scalar, items); "
                 "(vector or scalar, items, {name: tensor}); a dict or object with box/cls/dfl or loss/items/"
                 "tensors; a scalar (docs/loss-adapter.md)")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_scalar(value: Any) -> bool:
    return _is_number(value) or (isinstance(value, torch.Tensor) and value.numel() == 1)


def _is_vector(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.numel() == 3 and value.dim() <= 2


def describe(value: Any, depth: int = 0) -> str:
    """What a candidate returned, in a few words: `tuple(tensor (3,), dict{box, cls})`."""
    if isinstance(value, torch.Tensor):
        return f"tensor {tuple(value.shape)}"
    if _is_number(value):
        return type(value).__name__
    if isinstance(value, Mapping):
        keys = list(value)[:6]
        return "dict{" + ", ".join(str(k) for k in keys) + (", ..." if len(value) > 6 else "") + "}"
    if isinstance(value, (tuple, list)):
        if depth:
            return f"{type(value).__name__} of {len(value)}"
        return f"{type(value).__name__}(" + ", ".join(describe(v, 1) for v in value[:5]) + (
            ", ..." if len(value) > 5 else "") + ")"
    return type(value).__name__


def _copy(value: Any) -> Any:
    """A tensor the comparison owns: the candidate may change its own tensor in place after returning it.
    Autograd history is kept (the gradient rows differentiate the copy)."""
    if isinstance(value, torch.Tensor):
        return value.clone() if value.requires_grad else value.detach().clone()
    return torch.tensor(float(value), dtype=torch.float32) if _is_number(value) else value


def _term_lookup(get: Callable[[str], Any]) -> dict[str, Any] | None:
    found = {}
    for term, aliases in TERM_ALIASES.items():
        for alias in aliases:
            value = get(alias)
            if value is not None:
                found[term] = value
                break
    return found if len(found) == len(TERMS) else None


def _as_items(items: Any, order: Sequence[str]) -> torch.Tensor | None:
    """The detached items (what the loss logs), in box, cls, dfl order when there are three."""
    if items is None:
        return None
    if isinstance(items, Mapping):
        terms = _term_lookup(items.get)
        values = [terms[t] for t in TERMS] if terms else list(items.values())
        if not values or not all(_is_scalar(v) for v in values):
            return None
        return torch.stack([torch.as_tensor(v).detach().reshape(()).float() for v in values]).clone()
    if isinstance(items, (tuple, list)) and items and all(_is_scalar(v) for v in items):
        items = torch.stack([torch.as_tensor(v).detach().reshape(()).float() for v in items])
    if not isinstance(items, torch.Tensor):
        return None
    items = items.detach().clone()
    if items.numel() == 3:
        flat = items.reshape(3)
        return torch.stack([flat[order.index(t)] for t in TERMS])
    return items


def _loss_value(value: Any, order: Sequence[str]) -> tuple[torch.Tensor | None, torch.Tensor, str] | None:
    """(terms in box, cls, dfl order, total, words) of a loss value, or None when it is not one."""
    if _is_vector(value):
        flat = _copy(value).reshape(3)
        terms = torch.stack([flat[order.index(t)] for t in TERMS])
        return terms, terms.sum(), f"a (3,) loss vector ({', '.join(order)})"
    if _is_scalar(value):
        total = _copy(value).reshape(())
        return None, total, "a scalar (the total only)"
    getter = value.get if isinstance(value, Mapping) else None
    if getter is None and not isinstance(value, (tuple, list, torch.Tensor)) and not _is_number(value):
        getter = lambda key: getattr(value, key, None)  # noqa: E731 - an object with term attributes
    if getter is not None:
        terms = _term_lookup(getter)
        if terms and all(_is_scalar(v) for v in terms.values()):
            stacked = torch.stack([_copy(terms[t]).reshape(()) for t in TERMS])
            kind = "a dict" if isinstance(value, Mapping) else f"a {type(value).__name__} object"
            return stacked, stacked.sum(), f"{kind} of the terms box, cls, dfl"
    return None


def read_loss_return(value: Any, order: Sequence[str] = TERMS, label: str = "loss") -> CandidateResult:
    """Read a candidate loss's return value by types and shapes, never by position alone:

    * a tensor of 3 elements: the loss vector, in `order`; a one-element tensor or a number: the total only;
    * a tuple/list of three scalars: (box, cls, dfl) in `order`;
    * (loss, items) and (loss, items, {name: tensor}) with `loss` a vector, scalar or dict of terms;
    * a dict or object with the three terms (also `box_loss`, `loss_cls`, ...), or with `loss` (and `items`,
      `tensors`/`intermediates`), like ultralytics' `LossRun`.

    Anything else, or a tuple that fits no reading on its own, is a ParityError that says what was received.
    Every tensor is copied first: a candidate that changes its tensors in place later cannot change the verdict.
    """
    received = describe(value)

    def fail(why: str) -> ParityError:
        return ParityError(f"loss candidate {label}: returned {received}: {why}; a loss may return {RETURN_SHAPES}")

    direct = _loss_value(value, order)
    if direct is not None:
        return _direct_result(value, direct, order)
    if isinstance(value, torch.Tensor):
        raise fail("a loss tensor must hold 3 elements (box, cls, dfl) or one (the total)")
    if isinstance(value, Mapping) or not isinstance(value, (tuple, list)):
        return _read_holder(value, order, fail)
    return _read_sequence(value, order, fail)


def _getter(value: Any) -> Callable[[str], Any]:
    """Key lookup in a dict, attribute lookup in any other object; None where there is nothing by that name."""
    return value.get if isinstance(value, Mapping) else (lambda key: getattr(value, key, None))


def _direct_result(value: Any, direct: tuple[torch.Tensor | None, torch.Tensor, str], order: Sequence[str]
                   ) -> CandidateResult:
    """A value that is itself a loss (vector, scalar, or holder of the three terms); a holder may carry items and
    intermediates beside its terms."""
    terms, total, words = direct
    if isinstance(value, Mapping) or not isinstance(value, (torch.Tensor, tuple, list)) and not _is_number(value):
        get = _getter(value)
        items = _as_items(get("items"), order)
        tensors = {k: _copy(v) for k, v in dict(get("tensors") or get("intermediates") or {}).items()}
        return CandidateResult(terms, total, items, tensors, words)
    return CandidateResult(terms, total, None, {}, words)


def _read_holder(value: Any, order: Sequence[str], fail: Callable[[str], ParityError]) -> CandidateResult:
    """A dict or object holding `loss` (and `items`, `tensors` / `intermediates`), like ultralytics' `LossRun`."""
    get = _getter(value)
    if get("loss") is None:
        raise fail("no terms box, cls, dfl and no `loss` in it")
    inner = _loss_value(get("loss"), order)
    if inner is None:
        raise fail(f"its `loss` is {describe(get('loss'))}, not a loss vector, scalar or dict of terms")
    tensors = get("tensors")
    tensors = tensors if tensors is not None else get("intermediates")
    if tensors is not None and not isinstance(tensors, Mapping):
        raise fail(f"its intermediates are {describe(tensors)}, expected a dict {{name: tensor}}")
    terms, total, words = inner
    kind = "a dict" if isinstance(value, Mapping) else f"a {type(value).__name__} object"
    return CandidateResult(terms, total, _as_items(get("items"), order),
                           {k: _copy(v) for k, v in dict(tensors or {}).items()}, f"{kind} with loss = {words}")


def _read_sequence(value: tuple | list, order: Sequence[str], fail: Callable[[str], ParityError]) -> CandidateResult:
    """Three scalars (the terms), or (loss, items) and (loss, items, intermediates)."""
    n = len(value)
    if n == 3 and all(_is_scalar(v) for v in value):
        terms = torch.stack([_copy(value[order.index(t)]).reshape(()) for t in TERMS])
        return CandidateResult(terms, terms.sum(), None, {}, f"a {type(value).__name__} of three scalars "
                                                            f"({', '.join(order)})")
    if n not in (2, 3):
        raise fail(f"a {type(value).__name__} of {n} fits no reading")
    inner = _loss_value(value[0], order)
    if inner is None:
        raise fail(f"its first element ({describe(value[0], 1)}) is not a loss vector, scalar or dict of terms, "
                   f"so it is not (loss, items{', intermediates' if n == 3 else ''})")
    items = value[1]
    if items is not None and not (isinstance(items, (torch.Tensor, Mapping)) or _is_number(items) or (
            isinstance(items, (tuple, list)) and all(_is_scalar(v) for v in items))):
        raise fail(f"its second element ({describe(items, 1)}) is not items (a tensor, numbers or a dict)")
    tensors = value[2] if n == 3 else None
    if n == 3 and not isinstance(tensors, Mapping):
        raise fail(f"its third element ({describe(tensors, 1)}) is neither a scalar (for (box, cls, dfl)) "
                   f"nor a dict of intermediates (for (loss, items, intermediates))")
    terms, total, words = inner
    shape = "(loss, items, intermediates)" if n == 3 else "(loss, items)"
    return CandidateResult(terms, total, _as_items(items, order),
                           {k: _copy(v) for k, v in dict(tensors or {}).items()}, f"{shape} with loss = {words}")
