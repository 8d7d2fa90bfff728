"""`parity map`: print how a candidate's parameters map onto ultralytics' names (and the layers a traced forward
inferred), without comparing any values."""

from __future__ import annotations

import argparse

from parity.cli.compare import resolve_reference
from parity.cli.options import CaptureOptions


def register(subparsers) -> None:
    parser = subparsers.add_parser("map", help="print how a candidate's parameters map onto ultralytics' names")
    parser.add_argument("--reference", help="reference dump")
    parser.add_argument("--candidate", default="builtin")
    parser.add_argument("--map", dest="map_file")
    CaptureOptions.add(parser)
    parser.set_defaults(func=cmd_map)


def cmd_map(args: argparse.Namespace) -> int:
    import time

    from rich.console import Console

    from rich.markup import escape

    from parity.replay.candidates import load_candidate
    from parity.runtime import check_device

    check_device(args.device)
    reference = resolve_reference(args.reference, CaptureOptions.config(args))
    started = time.perf_counter()
    candidate = load_candidate(args.candidate, reference, map_file=args.map_file)
    findings = candidate.prepare(reference)
    mapping = getattr(candidate, "mapping", None)
    console = Console()
    if mapping is None:
        console.print(f"candidate {candidate.label} has no parameters to map (a dump candidate is compared by name)")
        return 0
    inference = getattr(candidate, "inference", None)
    if inference is not None:
        _print_inference(console, inference, {e["index"]: e.get("type") for e in reference.layers})
    # Plain text: each line ends in "[how]", which rich would take for a style tag and drop. One print of the
    # whole table, unwrapped, also costs a fraction of rich's wrapping of a 50 KB string.
    console.print(mapping.describe(verbose=True), highlight=False, markup=False, soft_wrap=True)
    for finding in findings:
        style = {"error": "red", "warning": "yellow"}.get(finding.severity, "cyan")
        console.print(f"[{style}]{finding.signature}[/{style}] {escape(f'{finding.where}: {finding.message}')}",
                      highlight=False)
    console.print(f"mapped in {time.perf_counter() - started:.1f} s", highlight=False)
    return 1 if any(f.severity == "error" for f in findings) else 0


def _print_inference(console, inference, types: dict) -> None:
    """The layers one traced forward found, how each is computed, and the ones it could not place."""
    console.print(f"layers inferred from one traced forward ({len(inference.layers)} of {len(types)}):",
                  highlight=False)
    for index, layer in sorted(inference.layers.items()):
        how = ("module" if layer.kind == "module" else
               "one call of a parameterless module" if layer.module_call else "an operation in a parent's forward")
        call = f", called with {layer.arity} positional tensors" if layer.call == "positional" else ""
        console.print(f"  {index:>3} {types.get(index, '?'):<9} {layer.describe()} ({how}{call})", highlight=False)
    for problem in inference.problems:
        console.print(f"  [yellow]{problem.index:>3} not inferred[/yellow]: {problem.message}. Fix: {problem.fix}",
                      highlight=False)
