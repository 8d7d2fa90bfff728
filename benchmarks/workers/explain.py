"""The explainer worker: `explain_report` at every divergent place of one plant per cause family, against one
run of that place (one forward of the layer, one stage call, one loss evaluation for a black box)."""

from __future__ import annotations

import time

# One plant per cause family: (plant, fixture, what). `what` is "layers", "loss" or "loss-CASE" (the built-in's
# loss replay on that case), or "black-box" (the planted loss as a black-box adapter).
EXPLAIN_PLANTS = [
    ("upsample-bilinear", "yolov8-narrow-nc12-96", "layers"), ("feature-scale", "yolov8-narrow-nc12-96", "layers"),
    ("bn-eps", "yolov8-narrow-nc12-96", "layers"), ("activation-relu", "yolov8-narrow-nc12-96", "layers"),
    ("shortcut-flipped", "yolov8-narrow-nc12-96", "layers"), ("concat-order", "yolov8-narrow-nc12-96", "layers"),
    ("concat-channels", "yolov8-narrow-nc12-96", "layers"), ("sppf-zero-padding", "yolo11-narrow-nc80-96", "layers"),
    ("missing-sigmoid", "yolov8-narrow-nc12-96", "loss"), ("double-sigmoid", "yolov8-narrow-nc12-96", "loss"),
    ("no-detach", "yolov8-narrow-nc12-96", "loss"), ("all-anchors-positive", "yolov8-narrow-nc12-96", "loss"),
    ("topk-13", "yolov8-narrow-nc12-96", "loss"), ("tal-alpha-1", "yolov8-narrow-nc12-96", "loss"),
    ("tal-beta-4", "yolov8-narrow-nc12-96", "loss"), ("small-box-floor-8", "yolov8-narrow-nc12-96", "loss"),
    ("unclamped-target-scores-sum", "yolov8-narrow-nc12-96", "loss-no_boxes"),
    ("weights-broadcast", "yolo11-narrow-nc80-96", "loss"), ("iou-weight-broadcast", "yolov8-narrow-nc12-96", "loss"),
    ("iou-giou", "yolov8-narrow-nc12-96", "loss"), ("reg-max-4", "yolov8-narrow-nc12-96", "loss"),
    ("dfl-view-transposed", "yolov8-narrow-nc12-96", "loss"), ("ltrb-order", "yolov8-narrow-nc12-96", "loss"),
    ("targets-xywh-as-xyxy", "yolov8-narrow-nc12-96", "loss"), ("anchors-coarse-first", "yolov8-narrow-nc12-96", "loss"),
    ("gain-twice", "yolov8-narrow-nc12-96", "loss"), ("no-batch-scale", "yolov8-narrow-nc12-96", "loss"),
    ("as-of-8.3-loss", "yolov8-narrow-nc12-96", "loss"), ("loss-output-scalar", "yolov8-narrow-nc12-96", "loss"),
    ("topk-13", "yolov8-narrow-nc12-96", "black-box"), ("gain-twice", "yolov8-narrow-nc12-96", "black-box"),
]


def _isolated_report(dump, inject):
    """The isolated replay's verdict up to the first divergent layer (what the explainer reads), and the
    loaded candidate."""
    from parity.compare.metrics import compare_tensors
    from parity.compare.tolerances import get_profile, profile_for_environment
    from parity.findings import Report, Row
    from parity.replay.candidates import load_candidate

    candidate = load_candidate("builtin", dump, inject=inject)
    candidate.prepare(dump)
    profile = get_profile(profile_for_environment(dump.manifest.get("environment"), dump.config.get("precision")))
    report = Report("compare --what layers", str(dump.path), candidate.label, profile.name)
    head, first = dump.model["head_index"], None
    for entry in dump.layers:
        index = entry["index"]
        produced = candidate.run_layer(index, [dump.get(n) for n in entry["inputs"]], is_head=index == head)
        for name in entry["outputs"]:
            if name in produced and name in dump:
                ok = compare_tensors(dump.get(name), produced[name], profile.for_name(name, mode="isolated")).passed
                report.add(Row("isolated", f"layer {index}", name, ok))
                first = index if first is None and not ok else first
        if first is not None:
            break
    report.context["first_divergent_layer"] = {"isolated": first}
    return report, candidate


def _planted_report(dump, plant: str, what: str):
    """The report of the built-in with one plant, and the explainer's configuration for it."""
    from parity.causes.plant import planted_loss
    from parity.diagnose.explain import ExplainConfig
    from parity.diagnose.loss import compare_loss
    from parity.replay.loss import LossAdapter

    if what == "layers":
        report, candidate = _isolated_report(dump, plant)
        return report, ExplainConfig(candidate=candidate, inject=plant)
    if what == "black-box":
        planted = planted_loss(dump.manifest, plant)
        adapter = LossAdapter(lambda p, b, planted=planted: planted(p, b), name=plant)
        return compare_loss(dump, adapter, cases=["default"], progress=False), ExplainConfig(loss_candidate=adapter)
    case = what.partition("-")[2] or "default"
    return compare_loss(dump, "builtin", inject=plant, cases=[case], progress=False), ExplainConfig(inject=plant)


def _one_loss_evaluation(dump) -> float:
    """Seconds of one evaluation of the re-implemented loss on the dump's head outputs (after a warm one)."""
    from parity.reimpl.loss import build_loss

    loss = build_loss(dump.manifest)
    head = dump.model["head_index"]
    preds = {"boxes": dump.get(f"act.{head}.boxes"), "scores": dump.get(f"act.{head}.scores"),
             "feat_shapes": [tuple(dump.index[f"act.{i}"]["shape"][2:]) for i in dump.layers[head]["from"]]}
    batch = {k: dump.get(f"batch.default.{k}") for k in ("cls", "bboxes", "batch_idx")}
    loss.run(preds, batch)
    t0 = time.perf_counter()
    loss.run(preds, batch)
    return time.perf_counter() - t0


def worker_explain(params: dict) -> dict:
    """Time the explainer at every divergent place of each plant, against one run of that place."""
    from parity.diagnose.explain import explain_report
    from parity.dump.files import Dump
    from parity.runtime import PROJECT_ROOT

    rows = []
    plants = EXPLAIN_PLANTS[: params.get("limit") or None]
    for repeat in range(max(1, params.get("repeats", 1))):
        for plant, fixture, what in plants:
            dump = Dump(PROJECT_ROOT / "fixtures" / fixture)
            report, config = _planted_report(dump, plant, what)
            t0 = time.perf_counter()
            explain_report(report, dump, config)
            total = time.perf_counter() - t0
            loss_eval = _one_loss_evaluation(dump) if what != "layers" else None
            for entry in report.context.get("explanations", []):
                rows.append({"repeat": repeat, "plant": plant, "fixture": fixture, "place": entry["place"],
                             "cause": entry["cause"], "runs": entry["runs"], "seconds": entry["seconds"],
                             "one_run_seconds": entry["one_run_seconds"], "loss_eval_seconds": loss_eval,
                             "explain_report_seconds": total})
    return {"rows": rows}
