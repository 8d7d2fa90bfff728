"""A user's parity tests: one layer, the loss, the whole model. Run: `pytest examples/pytest`.

The `parity_reference` and `assert_parity` fixtures come from yolo-parity's pytest plugin (installed with the
package; in a source checkout load it by name: `pytest -p parity.pytest_plugin examples/pytest`).
"""

import json

from my_port import build_model

# A loss is named as "module:factory" (a callable passed as loss= is the loss itself, not its factory).
LOSS = "my_port:build_loss"


def head_index(reference) -> int:
    return json.loads((reference / "manifest.json").read_text())["model"]["head_index"]


def test_the_detect_head_matches_layer_by_layer(assert_parity, parity_reference):
    # every sub-block of the Detect head (cv2/cv3 per level, the DFL), fed the reference's own inputs
    assert_parity(build_model, what="layers", layer=head_index(parity_reference), mode="isolated")


def test_the_loss_matches_stage_by_stage(assert_parity):
    assert_parity(what="loss", loss=LOSS)


def test_the_whole_model_and_its_loss_match(assert_parity):
    assert_parity(build_model, loss=LOSS)
