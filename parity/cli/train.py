"""CLI glue for training-step parity: `parity dump --steps N`, `parity compare --what train`, `parity overfit`.

`TrainOptions` are the options parity/cli/dump.py and parity/cli/compare.py add; `register` adds `overfit`.
What the options mean lives in parity/capture/train.py, parity/replay/train.py and parity/diagnose/train.py.
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from parity.errors import ParityError

WIDTH = 80


# ------------------------------------------------------------------------------------------- options
class TrainOptions:
    """The training-step options: the trainer's arguments on `parity dump`, the candidate's on `parity compare`."""

    @staticmethod
    def add_steps(parser: argparse.ArgumentParser) -> None:
        from parity.capture.train import TrainArgs

        d = TrainArgs()
        group = parser.add_argument_group("training steps (docs/training.md)")
        group.add_argument("--steps", type=int, default=0,
                           help="also capture this many steps of ultralytics' trainer (default 0: no training)")
        group.add_argument("--optimizer", default=d.optimizer,
                           help="trainer optimizer: auto, SGD, AdamW, … (default auto)")
        group.add_argument("--epochs", type=int, default=d.epochs, help=f"planned epochs (default {d.epochs})")
        group.add_argument("--batches-per-epoch", type=int, default=d.batches_per_epoch,
                           help=f"batches in an epoch of the one-batch dataset (default {d.batches_per_epoch})")
        group.add_argument("--nbs", type=int, default=d.nbs, help=f"nominal batch size (default {d.nbs})")
        group.add_argument("--cos-lr", action="store_true", help="cosine lr schedule instead of linear")

    @staticmethod
    def train_args(args: argparse.Namespace):
        """The `parity.capture.train.TrainArgs` the trainer options stand for."""
        from parity.capture.train import TrainArgs

        return TrainArgs(optimizer=args.optimizer, epochs=args.epochs, batches_per_epoch=args.batches_per_epoch,
                         nbs=args.nbs, cos_lr=args.cos_lr)

    @staticmethod
    def add_candidate(parser: argparse.ArgumentParser) -> None:
        """`--train` and `--train-steps`, read by `parity compare --what train`."""
        parser.add_argument("--train", dest="train_candidate", default="builtin",
                            help="with --what train: builtin, package.module:factory, or a candidate dump of N steps")
        parser.add_argument("--train-steps", type=int, help="with --what train: compare only the first N steps")


def register(subparsers) -> None:
    """`parity overfit` (`dump --steps` and `compare --what train` are options of those commands)."""
    overfit = subparsers.add_parser("overfit",
                                    help="train the candidate like the reference dump's steps, compare loss curves")
    overfit.add_argument("--reference", required=True, help="a dump written with --steps N (e.g. --batch 1)")
    overfit.add_argument("--train", dest="train_candidate", default="builtin",
                         help="builtin or package.module:factory")
    overfit.add_argument("--part", type=float, default=0.01,
                         help="relative loss difference at which the curves count as parted (default 0.01)")
    overfit.add_argument("--json", dest="json_out", help="also write the curves as JSON here")
    overfit.set_defaults(func=cmd_overfit)


# ------------------------------------------------------------------------------------------- compare
def resolve_train_reference(reference: str | None):
    """The reference dump of a training comparison: it must hold training steps, with values."""
    from parity.dump.files import Dump

    path = Path(reference) if reference else None
    if path is None:
        raise ParityError("--what train needs --reference: a dump written with `parity dump --steps N`")
    if not (path / "manifest.json").exists():
        raise ParityError(f"no reference dump at {path}: a reference dump is a directory holding manifest.json")
    dump = Dump(path)
    if not dump.manifest.get("train"):
        raise ParityError(f"{path} holds no training steps: write it with `parity dump --steps N`")
    if dump.stats_only:
        raise ParityError(f"{path} is statistics-only: a training comparison needs values (compare two "
                          f"statistics-only dumps with --candidate DIR --stats-only)")
    return dump


def run_train_compare(args) -> int:
    from parity.compare.tolerances import get_profile, profile_for_environment
    from parity.diagnose.train import compare_training
    from parity.report.text import to_json
    from parity.replay.train import DumpSteps, candidate_steps

    reference = resolve_train_reference(args.reference)
    mode = "chained" if args.mode == "chained" else "isolated"
    profile = get_profile(args.profile or profile_for_environment(reference.manifest.get("environment"),
                                                                   reference.config.get("precision")))
    cand = candidate_steps(args.train_candidate, reference, steps=args.train_steps, mode=mode)
    if isinstance(cand, DumpSteps):
        mode = "chained"  # a dump's steps ran as the port ran them: nothing could be loaded between them
    report = compare_training(DumpSteps(reference), cand, profile=profile, reference=str(reference.path),
                              candidate=str(args.train_candidate), steps=args.train_steps, mode=mode)
    print(render_train(report))
    if args.json_out:
        to_json(report, args.json_out)
    return report.exit_code


# -------------------------------------------------------------------------------------------- render
def _cell(row) -> str:
    if row is None:
        return "-"
    if not row.passed:
        return "DIFFERS"
    metrics = row.metrics or {}
    if metrics.get("exact") or row.note.startswith("bitwise"):
        return "bitwise"
    rel = metrics.get("max_rel")
    return f"~{rel:.0e}" if isinstance(rel, float) else "ok"


def _number(row, index: int | None = None) -> str:
    if row is None or not row.note:
        return "-"
    values = row.note.split(" (reference")[0].strip("[]").split(", ")
    value = values[index] if index is not None and index < len(values) else values[0]
    try:
        return f"{float(value):.4g}"
    except ValueError:
        return value


def render_train(report) -> str:
    lines = [f"parity compare --what train   candidate {report.candidate}",
             f"reference {report.reference}",
             f"optimizer {report.context.get('optimizer')}, {report.coverage.get('steps_compared')} steps, "
             f"{report.context.get('mode')} (profile {report.profile})"]
    setup = [r for r in report.rows if r.section == "train/setup"]
    bad_setup = [r for r in setup if not r.passed]
    lines.append("setup: " + ("optimizer, group settings and parameter groups match" if not bad_setup else
                              "; ".join(f"{r.name} DIFFERS: {r.note}" for r in bad_setup))[:WIDTH - 7])
    header = f"{'step':>4} {'lr weight':>10} {'lr bias':>9} {'step?':>5} {'loss sum':>9} {'grad norm':>9} " \
             f"{'weights':>8} {'EMA':>8} {'':>8}"
    lines += [header, "-" * len(header)]
    by_step: dict[str, dict[str, object]] = {}
    for row in report.rows:
        if row.section == "train":
            by_step.setdefault(row.where, {})[row.name] = row
    for where, rows in by_step.items():
        if not where.startswith("step "):
            continue
        stepped = rows.get("stepped")
        ok = all(r.passed for r in rows.values())
        lines.append(f"{where[5:]:>4} {_number(rows.get('lr'), 0):>10} {_number(rows.get('lr'), 2):>9} "
                     f"{('yes' if _number(stepped) == '1' else 'no') if stepped else '-':>5} "
                     f"{_number(rows.get('loss_sum')):>9} {_number(rows.get('grad_norm')):>9} "
                     f"{_cell(rows.get('weights')):>8} {_cell(rows.get('ema')):>8} {'ok' if ok else 'DIFFERS':>8}")
    lines.append("")
    if report.verdict == "parity":
        lines.append(f"PARITY: {report.coverage.get('steps_compared')} steps, every recorded quantity within "
                     f"tolerance")
    else:
        first = report.first_divergence()
        lines.append(f"DIVERGENCE at {first.where}, first quantity {first.name}" if first else "DIVERGENCE")
        for finding in report.findings:
            lines += textwrap.wrap(f"{finding.signature} ({finding.where}): {finding.message}", WIDTH,
                                   subsequent_indent="  ")
    left_out = report.coverage.get("train_left_out")
    if left_out:
        lines += textwrap.wrap(f"not recorded by the candidate: {', '.join(left_out)}", WIDTH)
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- overfit
def cmd_overfit(args) -> int:
    import json

    from parity.replay.train import DumpSteps, candidate_steps

    reference = resolve_train_reference(args.reference)
    ref_steps = DumpSteps(reference)
    cand = candidate_steps(args.train_candidate, reference, mode="chained")
    curves = overfit_curves(ref_steps, cand, args.part)
    print(render_overfit(curves, str(args.train_candidate), str(reference.path)))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(curves, indent=1) + "\n")
    return 0 if curves["learns_like_reference"] else 1


def overfit_curves(ref_steps, cand_steps, part: float) -> dict:
    """Both loss curves (loss_sum per step), the first step where they differ by more than `part` relative,
    and whether the candidate's loss fell as far as the reference's."""
    if not 0 < part < 1:
        raise ParityError(f"--part {part}: expected a fraction between 0 and 1")
    ref = [float(r["loss_sum"]) for r in ref_steps]
    cand = [float(c["loss_sum"]) for c in cand_steps if "loss_sum" in c]
    if len(cand) < len(ref):
        raise ParityError(f"the candidate reported loss_sum for {len(cand)} of {len(ref)} steps; overfit needs it "
                          f"every step (return {{'loss_sum': ...}} from step(batch))")
    parted = next((i for i, (r, c) in enumerate(zip(ref, cand)) if abs(c - r) > part * abs(r)), None)
    drop_ref, drop_cand = 1 - ref[-1] / ref[0], 1 - cand[-1] / cand[0]
    learns = parted is None
    return {"reference": ref, "candidate": cand, "parted_at": parted, "part": part,
            "reference_drop": drop_ref, "candidate_drop": drop_cand, "learns_like_reference": bool(learns)}


def render_overfit(curves: dict, candidate: str, reference: str) -> str:
    lines = [f"parity overfit   candidate {candidate}", f"reference {reference}",
             f"{'step':>4} {'reference loss':>15} {'candidate loss':>15} {'rel diff':>9}"]
    for i, (r, c) in enumerate(zip(curves["reference"], curves["candidate"])):
        mark = "  <- curves part" if i == curves["parted_at"] else ""
        lines.append(f"{i:>4} {r:>15.6g} {c:>15.6g} {abs(c - r) / abs(r):>9.2e}{mark}")
    lines.append("")
    drop = f"loss fell {curves['reference_drop']:.1%} (reference) and {curves['candidate_drop']:.1%} (candidate)"
    if curves["parted_at"] is None:
        lines.append(f"LEARNS LIKE THE REFERENCE: the curves stay within {curves['part']:.0%}; {drop}")
    else:
        lines.append(f"LEARNS DIFFERENTLY: the curves part at step {curves['parted_at']} (more than "
                     f"{curves['part']:.0%} apart); {drop}")
    return "\n".join(textwrap.fill(line, WIDTH) if len(line) > WIDTH else line for line in lines)
