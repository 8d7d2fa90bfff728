"""The cause registry and the counterfactual explainer: every cause planted into the built-in is named first by
the explainer (parameters at a value the search must find: scale 0.01, topk 13), and nothing is named on the
clean built-in or on the benign variants (hand-written SiLU, the attention scale order, thread-count noise)."""

from __future__ import annotations

import json

import pytest
import torch

from parity.dump import names
from parity.replay.candidates import load_candidate
from parity.causes import all_causes, all_injections, get
from parity.diagnose.explain import ExplainConfig, explain_report
from parity.compare.metrics import compare_tensors
from parity.compare.tolerances import get_profile, profile_for_environment
from parity.dump.files import Dump
from parity.diagnose.loss import compare_loss
from parity.replay.loss import LossAdapter
from parity.findings import Report, Row

V8, V11, V26 = "yolov8-narrow-nc12-96", "yolo11-narrow-nc80-96", "yolo26-narrow-nc12-64"


@pytest.fixture(scope="module")
def dumps(fixtures_dir):
    return {name: Dump(fixtures_dir / name) for name in (V8, V11, V26)}


def profile_of(dump):
    return get_profile(profile_for_environment(dump.manifest.get("environment"), dump.config.get("precision")))


def isolated_report(dump, inject=None):
    """The isolated layer replay's verdict, kept to what the explainer reads: the first layer whose outputs,
    fed the reference's own inputs, leave the profile's tolerance (a row per compared layer output)."""
    candidate = load_candidate("builtin", dump, inject=inject)
    candidate.prepare(dump)
    profile = profile_of(dump)
    report = Report("compare --what layers", str(dump.path), candidate.label, profile.name)
    head = dump.model["head_index"]
    first = None
    for entry in dump.layers:
        index = entry["index"]
        produced = candidate.run_layer(index, [dump.get(n) for n in entry["inputs"]], is_head=index == head)
        for name in entry["outputs"]:
            if name not in produced or name not in dump:
                continue
            tol = profile.for_name(name, mode="isolated")
            passed = compare_tensors(dump.get(name), produced[name], tol).passed
            report.add(Row("isolated", f"layer {index}", name, passed))
            if not passed and first is None:
                first = index
        if first is not None:
            break
    report.context["first_divergent_layer"] = {"isolated": first}
    return report, candidate


def named(findings):
    return [f for f in findings if f.signature != "unexplained"]


# ------------------------------------------------------------------------------------------ registry
def test_every_plant_names_a_registered_cause_with_an_explanation():
    causes, plants = all_causes(), all_injections()
    for plant in plants.values():
        assert plant.cause in causes, plant.name
        assert plant.description and "\n" not in plant.description
    for cause in causes.values():
        assert cause.explanation and "\n" not in cause.explanation
        assert cause.kind in ("model", "loss", "structure")
        assert cause.applies_to
    # every release-history entry is a cause reported as version-drift
    from parity.causes.releases import RELEASE_HISTORY

    for version, what, _ in RELEASE_HISTORY:
        assert causes[f"release-{what}-{version}"].finding == "version-drift"
    with pytest.raises(KeyError, match="unknown injection"):
        get("no-such-bug")


def test_the_reimplementation_has_no_bug_switches():
    import inspect

    import parity.reimpl.blocks as blocks
    import parity.reimpl.loss as loss
    import parity.reimpl.model as model

    for module in (blocks, model, loss):
        text = inspect.getsource(module)
        for switch in ("tweaks", "bn_eps=", "duplicate_last", "post_assign", "int-division", "bias_init ==",
                       "loss_inject", "reimpl.inject"):
            assert switch not in text, (module.__name__, switch)


def test_drift_and_the_reimplementation_do_not_import_each_other():
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "parity"
    drift_modules = ("compare/drift.py", "diagnose/drift.py", "report/drift.py", "cli/drift.py")
    for module in drift_modules:
        drift = ast.parse((root / module).read_text())
        imported = {n.module for n in ast.walk(drift) if isinstance(n, ast.ImportFrom) and n.module}
        assert not any(m.startswith("parity.reimpl") for m in imported), module
    for path in (root / "reimpl").glob("*.py"):
        tree = ast.parse(path.read_text())
        modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not any(m.endswith(".drift") for m in modules), path.name


# --------------------------------------------------------------------------------------- model causes
MODEL_PLANTS = [
    # plant, fixture, cause named first, words the finding must carry
    ("upsample-bilinear", V8, "upsample-mode", "bilinear"),
    ("feature-scale", V8, "feature-scale", "k=0.01"),
    ("input-scale", V8, "input-scale", "input=1, k=0.01"),
    ("bn-eps", V8, "bn-eps", "eps=1e-05"),
    ("activation-relu", V8, "activation", "act=relu"),
    ("activation-missing", V8, "activation", "act=identity"),
    ("shortcut-flipped", V8, "residual-shortcut", "block=0"),
    ("concat-order", V8, "concat-order", "order=(1, 0)"),
    ("concat-channels", V8, "concat-duplicate", "explained by `concat-duplicate`"),
    ("sppf-zero-padding", V11, "sppf-padding", "padding=zero"),
    ("shortcut-flipped", V11, "residual-shortcut", "block=0"),
    ("upsample-bilinear", V11, "upsample-mode", "align_corners=False"),
]


@pytest.mark.parametrize("plant,fixture,cause,words", MODEL_PLANTS)
def test_a_planted_model_cause_is_named_first(dumps, plant, fixture, cause, words):
    dump = dumps[fixture]
    report, candidate = isolated_report(dump, plant)
    index = report.context["first_divergent_layer"]["isolated"]
    assert index is not None, f"{plant} did not diverge"
    found = named(explain_report(report, dump, ExplainConfig(candidate=candidate, inject=plant)))
    assert found and found[0].signature == cause, [f.message for f in found]
    first = found[0]
    assert first.where.startswith(f"layer {index} (") and words in first.message
    assert "residual" in first.message and "-> 0 (bitwise)" in first.message
    assert first.evidence["residual_after"] == 0 < first.evidence["residual_before"]


def test_wiring_names_the_layer_read_instead(dumps, tmp_path):
    from parity.cli.main import main

    out = tmp_path / "r.json"
    assert main(["compare", "--no-progress", "--reference", str(dumps[V8].path), "--inject", "wiring",
                 "--what", "layers", "--json", str(out)]) == 1
    report = json.loads(out.read_text())
    found = [f for f in report["findings"] if f["signature"] == "wiring"]
    assert found, [f["signature"] for f in report["findings"]]
    assert found[0]["where"].endswith("chained") and "reads layer" in found[0]["message"]
    assert "instead of layer" in found[0]["message"]


@pytest.mark.parametrize("plant,fixture,cause,words", [
    ("bias-init-float32", V8, "bias-init-float32", "stride 8, 16"),
    ("bias-init-skipped", V8, "bias-init-skipped", "stride 8, 16, 32"),
    ("bias-init-int-division", V8, "bias-init-nonfinite", "integer division"),
    ("bn-momentum", V8, "bn-momentum", "momentum=0.1"),
    ("class-branch-narrow", V11, "class-branch-width", "rule c (no nc floor)"),
    ("as-of-8.3", V8, "version-drift", "release-box-bias-init-8.4.0"),
    ("as-of-8.3.0-head", V8, "version-drift", "release-model-structure-8.3.0"),
])
def test_a_planted_structure_cause_is_named(dumps, plant, fixture, cause, words):
    from parity.diagnose.layers import compare_layers

    dump = dumps[fixture]
    candidate = load_candidate("builtin", dump, inject=plant)
    report = compare_layers(dump, candidate, modes=("isolated",), progress=False)
    before = len(report.findings)
    found = named(explain_report(report, dump, ExplainConfig(candidate=candidate, inject=plant)))
    assert len(report.findings) > before
    assert found and found[0].signature == cause and words in found[0].message, [f.message for f in found]
    assert found[0].message.startswith("explained by `")


def test_planted_causes_change_the_clean_layer(dumps):
    """Run against the clean built-in, every model cause at its plant's parameters changes the layer's output
    beyond tolerance: applied to a layer that already matches, no cause could reproduce it (none fires)."""
    from parity.causes import model_causes as mc

    dump = dumps[V11]
    clean = load_candidate("builtin", dump)
    clean.prepare(dump)
    detector, profile = clean.module, profile_of(dump)
    types = detector.layer_types()
    trials = {"upsample-mode": [{"mode": "bilinear", "align_corners": False}], "feature-scale": [{"k": 0.01}],
              "input-scale": [{"input": 1, "k": 0.01}],
              "residual-shortcut": [{"block": 0}], "bn-eps": [{"eps": 1e-5}], "activation": [{"act": "relu"}],
              "concat-order": [{"order": (1, 0)}], "concat-duplicate": [{}], "sppf-padding": [{"padding": "zero"}]}
    for signature, params in trials.items():
        cause = all_causes()[signature]
        index = next(i for i, t in enumerate(types) if cause.applies(t) and t != "Detect")
        entry = dump.layers[index]
        inputs = [dump.get(n) for n in entry["inputs"]]
        with torch.no_grad():
            module = cause.transform(detector.layers[index], **params[0])
            out = module(list(inputs)) if types[index] == "Concat" else module(inputs[0])
        ref = dump.get(names.act(index))
        tol = profile.for_name(names.act(index), mode="isolated")
        assert not compare_tensors(ref, out, tol).passed, signature
    assert mc.CLASS_WIDTH_RULES


# ---------------------------------------------------------------------------------------- loss causes
LOSS_PLANTS = [
    # plant, fixture, case, cause named first, words
    ("missing-sigmoid", V8, "default", "missing-sigmoid", "assign"),
    ("double-sigmoid", V8, "default", "double-sigmoid", "assign"),
    ("no-detach", V8, "default", "no-detach", "carries-grad"),
    ("all-anchors-positive", V8, "default", "all-anchors-positive", "assign"),
    ("topk-13", V8, "default", "topk", "topk=13"),
    ("tal-alpha-1", V8, "default", "tal-alpha", "alpha=1"),
    ("tal-beta-4", V8, "default", "tal-beta", "beta=4"),
    ("small-box-floor-8", V8, "default", "small-box-floor-size", "side=8"),
    ("unclamped-target-scores-sum", V8, "no_boxes", "unclamped-target-scores-sum", "normalize"),
    ("weights-broadcast", V11, "default", "weights-broadcast", "classify"),
    ("iou-weight-broadcast", V8, "default", "iou-weight-broadcast", "box"),
    ("iou-giou", V8, "default", "iou-variant", "iou=giou"),
    ("reg-max-4", V8, "default", "reg-max", "reg_max=4"),
    ("dfl-view-transposed", V8, "default", "dfl-decode", "layout=bins-sides-transposed"),
    ("ltrb-order", V8, "default", "dfl-decode", "layout=tlbr"),
    ("targets-xywh-as-xyxy", V8, "default", "box-format", "preprocess"),
    ("anchors-coarse-first", V8, "default", "level-order", "anchors"),
    ("gain-swap", V8, "default", "gain-mismatch", "box term x dfl gain 1.5; dfl term x box gain 7.5"),
    ("gain-twice", V8, "default", "gain-mismatch", "box term x box gain 7.5 x box gain 7.5"),
    ("no-batch-scale", V8, "default", "batch-scale", "factor=none"),
    ("world-size-scale", V8, "default", "batch-scale", "factor=Bx2"),
    ("as-of-8.3-loss", V8, "small_box", "version-drift", "release-small-box-floor-8.4.0"),
    ("as-of-8.4.0-loss", V8, "default", "version-drift", "release-small-box-floor-8.4.137"),
    ("loss-output-scalar", V8, "default", "version-drift", "release-loss-output-shape-8.3.99"),
    ("missing-sigmoid", V26, "default", "missing-sigmoid", "one2many assign"),
]


@pytest.mark.parametrize("plant,fixture,case,cause,words", LOSS_PLANTS)
def test_a_planted_loss_cause_is_named_first(dumps, plant, fixture, case, cause, words):
    dump = dumps[fixture]
    report = compare_loss(dump, "builtin", inject=plant, cases=[case], progress=False)
    assert report.verdict == "divergence"
    found = named(explain_report(report, dump, ExplainConfig(candidate="builtin", inject=plant)))
    assert found and found[0].signature == cause, [f.message for f in found]
    text = found[0].where + " " + found[0].message
    assert words in text and found[0].message.startswith("explained by `")
    assert "unexplained" not in {f.signature for f in report.findings if f.where == found[0].where}


@pytest.mark.parametrize("plant,words", [("topk-13", "box and cls and dfl terms equal ultralytics' with topk=13"),
                                         ("gain-twice", "box term equals ultralytics' with box term x box gain 7.5"),
                                         ("no-batch-scale", "with factor=none")])
def test_a_black_box_loss_is_explained_per_term(dumps, plant, words):
    from parity.causes.plant import planted_loss
    from parity.reimpl.loss import build_loss

    dump = dumps[V8]
    planted = planted_loss(dump.manifest, plant)
    adapter = LossAdapter(lambda preds, batch: planted(preds, batch), name=f"black box {plant}")
    report = compare_loss(dump, adapter, cases=["default"], progress=False)
    found = named(explain_report(report, dump, ExplainConfig(loss_candidate=adapter)))
    assert found and found[0].where == "loss default (black box)" and words in found[0].message, \
        [f.message for f in found]
    assert found[0].evidence["runs"] <= 20


def test_nothing_explains_an_unknown_difference(dumps):
    """A loss term scaled by 1.01: no registered cause reaches tolerance, so none is named; the two closest
    are listed with how much of the residual they remove."""
    from parity.causes.plant import planted_loss
    from parity.reimpl.loss import build_loss

    dump = dumps[V8]
    clean = build_loss(dump.manifest)

    def odd(preds, batch):
        loss, items = clean(preds, batch)
        return loss * torch.tensor([1.01, 1.0, 1.0]), items

    adapter = LossAdapter(odd, name="odd")
    report = compare_loss(dump, adapter, cases=["default"], progress=False)
    found = explain_report(report, dump, ExplainConfig(loss_candidate=adapter))
    assert [f.signature for f in found] == ["unexplained"]
    assert "no known cause explains it" in found[0].message and "closest `" in found[0].message
    assert "of the residual" in found[0].message and found[0].severity == "info"


# ------------------------------------------------------------------------------------ nothing fires
def test_a_passing_report_is_left_alone(dumps):
    report, candidate = isolated_report(dumps[V8])
    report.rows = [r for r in report.rows if r.passed]
    assert report.verdict == "parity"
    assert explain_report(report, dumps[V8], ExplainConfig(candidate=candidate)) == []
    assert "explanations" not in report.context


@pytest.mark.parametrize("plant,fixture", [(None, V8), (None, V11), ("silu-handwritten", V8),
                                           ("silu-handwritten", V11), ("attention-scale-order", V11)])
def test_clean_and_benign_variants_pass_and_name_nothing(dumps, plant, fixture):
    dump = dumps[fixture]
    report, candidate = isolated_report(dump, plant)
    assert report.context["first_divergent_layer"]["isolated"] is None, plant
    assert report.verdict == "parity"
    assert explain_report(report, dump, ExplainConfig(candidate=candidate, inject=plant)) == []


def test_thread_count_noise_names_nothing(dumps):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report, candidate = isolated_report(dumps[V11])
    finally:
        torch.set_num_threads(before)
    assert report.verdict == "parity"
    assert explain_report(report, dumps[V11], ExplainConfig(candidate=candidate)) == []


def test_the_clean_loss_names_nothing(dumps):
    report = compare_loss(dumps[V8], "builtin", progress=False)
    assert report.verdict == "parity"
    assert explain_report(report, dumps[V8], ExplainConfig()) == []


# ------------------------------------------------------------------------------------ through the CLI
def test_compare_names_the_cause_in_80_columns(dumps, tmp_path, capsys, monkeypatch):
    from parity.cli.main import main

    monkeypatch.setenv("COLUMNS", "80")
    out = tmp_path / "r.json"
    code = main(["compare", "--no-progress", "--reference", str(dumps[V8].path), "--inject", "topk-13",
                 "--what", "loss", "--json", str(out)])
    assert code == 1
    report = json.loads(out.read_text())
    topk = [f for f in report["findings"] if f["signature"] == "topk"]
    assert topk and topk[0]["evidence"]["params"] == {"topk": 13}
    assert report["context"]["explanations"][0]["cause"] == "topk"
    printed = capsys.readouterr().out
    assert "topk" in printed and all(len(line) <= 80 for line in printed.splitlines())


def test_docs_list_every_cause_and_plant():
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "causes.md").read_text()
    missing = [c for c in all_causes() if f"`{c}`" not in text]
    missing += [p for p in all_injections() if f"`{p}`" not in text]
    assert not missing, missing


def test_chained_mode_alone_explains_its_first_divergent_layer_in_isolation(dumps, tmp_path):
    """The issue's case: a feature scaled by 0.01 (cosine ~1) run in chained mode only is named `feature-scale`
    with k = 0.01, not chained drift."""
    from parity.cli.main import main

    out = tmp_path / "r.json"
    assert main(["compare", "--no-progress", "--reference", str(dumps[V8].path), "--inject", "feature-scale",
                 "--what", "layers", "--mode", "chained", "--json", str(out)]) == 1
    report = json.loads(out.read_text())
    found = [f for f in report["findings"] if f["signature"] == "feature-scale"]
    assert found and found[0]["evidence"]["params"] == {"k": 0.01} and "k=0.01" in found[0]["message"]
    assert not any(f["signature"] == "chained-drift" for f in report["findings"])
