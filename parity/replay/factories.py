"""Calling a user's factory defensively: which parameters it names, a call whose every failure becomes a
ParityError naming the candidate, and the candidate's own frame in a traceback (not torch, not the harness,
not the standard library), so that a message points at the user's line."""

from __future__ import annotations

import inspect
import sysconfig
import traceback
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from parity.errors import ParityError

# Frames under these directories are never the candidate's own: torch, this package, the standard library.
_HARNESS_PATHS = tuple(str(p) for p in (Path(torch.__file__).resolve().parent, Path(__file__).resolve().parents[1],
                                        Path(sysconfig.get_paths()["stdlib"]).resolve()))


def own_frame(error: BaseException) -> str | None:
    """`file:line (in function)` of the innermost traceback frame in the candidate's own code."""
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        path = str(Path(frame.filename).resolve())
        if path.startswith(_HARNESS_PATHS) or frame.filename.startswith("<"):
            continue
        try:
            shown = str(Path(path).relative_to(Path.cwd()))
        except ValueError:
            shown = path
        return f"{shown}:{frame.lineno} (in {frame.name})"
    return None


def factory_parameters(factory: Callable) -> Mapping[str, inspect.Parameter]:
    """The factory's parameters by name; none when its signature cannot be read (a builtin, a C extension)."""
    try:
        return inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return {}


def required_positionals(params: Mapping[str, inspect.Parameter]) -> list[inspect.Parameter]:
    """Parameters a call must fill by position or keyword (no default)."""
    return [p for p in params.values() if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY,
                                                                              p.POSITIONAL_OR_KEYWORD)]


def call_factory(factory: Callable, label: str, /, *args: Any, show_frame: bool = True, **kwargs: Any) -> Any:
    """factory(*args, **kwargs). A ParityError passes through; anything else the factory raises becomes a
    ParityError "{label}: the factory raised {type}: {message}", with " at file:line (in function)" of the
    candidate's own frame when `show_frame`."""
    try:
        return factory(*args, **kwargs)
    except ParityError:
        raise
    except Exception as error:  # noqa: BLE001 - a user factory may raise anything; say whose it was
        at = own_frame(error) if show_frame else None
        raise ParityError(f"{label}: the factory raised {type(error).__name__}: {error}"
                          f"{f' at {at}' if at else ''}") from None
