"""The dump manifest's JSON Schema (docs/schemas/manifest.schema.json): the committed fixtures follow it, the
published file is the one the reader checks with, and a manifest that departs from it is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from parity.cli.main import main
from parity.dump.files import Dump
from parity.dump.schema import MANIFEST_SCHEMA, manifest_violation, schema_text
from parity.errors import DumpError

ROOT = Path(__file__).resolve().parent.parent
FIXTURE_MANIFESTS = sorted(ROOT.glob("fixtures/*/manifest.json"))
SCHEMA_FILE = ROOT / "docs" / "schemas" / "manifest.schema.json"


def test_the_published_schema_is_the_one_the_reader_uses():
    assert SCHEMA_FILE.read_text() == schema_text(), (
        "docs/schemas/manifest.schema.json is stale: write it again with python -c 'from parity.dump.schema "
        "import schema_text; open(\"docs/schemas/manifest.schema.json\", \"w\").write(schema_text())'")
    Draft202012Validator.check_schema(json.loads(SCHEMA_FILE.read_text()))


@pytest.mark.parametrize("manifest", FIXTURE_MANIFESTS, ids=lambda p: p.parent.name)
def test_every_committed_fixture_follows_the_schema(manifest):
    assert FIXTURE_MANIFESTS, "no fixture manifests found"
    document = json.loads(manifest.read_text())
    assert manifest_violation(document) is None
    errors = list(Draft202012Validator(json.loads(SCHEMA_FILE.read_text())).iter_errors(document))
    assert not errors, errors[0].message  # any validator, from the published file alone


def test_a_minimal_candidate_manifest_follows_the_schema():
    """What docs/porting-protocol.md asks of a port, and nothing more."""
    assert manifest_violation({"schema": "yolo-parity-dump", "schema_version": 1, "kind": "candidate",
                               "tensors": {"act.0": {"file": "out.safetensors", "dtype": "F32", "shape": [1, 2]}}}) is None


@pytest.mark.parametrize("section", ["gradients", "environment", "train"])
def test_a_section_the_writer_left_null_follows_the_schema(section):
    """The capture writes `gradients: null` when asked for no gradients (the LibTorch example's reference does);
    the schema first refused such dumps. Another type in the same place is still refused."""
    manifest = json.loads((ROOT / "fixtures" / "yolov8-narrow-nc12-96" / "manifest.json").read_text())
    manifest[section] = None
    assert manifest_violation(manifest) is None
    manifest[section] = "none"
    assert f"manifest.{section}: expected" in manifest_violation(manifest)


def _planted(tmp_path: Path, change) -> Path:
    manifest = json.loads((ROOT / "fixtures" / "yolov8-narrow-nc12-96" / "manifest.json").read_text())
    change(manifest)
    dump = tmp_path / "planted"
    dump.mkdir()
    (dump / "manifest.json").write_text(json.dumps(manifest))
    return dump


def test_a_missing_required_field_is_refused_in_one_line(tmp_path):
    dump = _planted(tmp_path, lambda m: m["tensors"]["act.0"].pop("shape"))
    with pytest.raises(DumpError) as caught:
        Dump(dump)
    assert str(caught.value) == (
        f"{dump / 'manifest.json'} does not follow the dump manifest schema (docs/schemas/manifest.schema.json) "
        f"at manifest.tensors[\"act.0\"]: expected a field \"shape\", found none")
    assert caught.value.exit_code == 2


def test_a_wrong_type_is_refused_in_one_line(tmp_path, capsys):
    dump = _planted(tmp_path, lambda m: m["model"].update(nc="12"))
    with pytest.raises(DumpError, match=r"at manifest\.model\.nc: expected a value of type integer, found a "
                                        r"string \"12\"$"):
        Dump(dump)
    assert main(["inspect", str(dump)]) == 2
    err = capsys.readouterr().err
    assert "at manifest.model.nc: expected a value of type integer" in " ".join(err.split())


@pytest.mark.parametrize("change, words", [
    (lambda m: m["tensors"]["act.0"].update(dtype="F33"), 'at manifest.tensors["act.0"].dtype: expected one of'),
    (lambda m: m["tensors"]["act.0"].update(sha256="xyz"), 'at manifest.tensors["act.0"].sha256: expected a string '
                                                           'matching ^[0-9a-f]{64}$, found a string "xyz"'),
    (lambda m: m["model"]["layers"][2].update(index=-1), "at manifest.model.layers[2].index: expected a number >= 0, "
                                                         "found an integer -1"),
    (lambda m: m.update(kind="ref"), 'at manifest.kind: expected one of "reference", "candidate", found a string "ref"'),
])
def test_violations_name_the_path_what_was_expected_and_what_was_found(tmp_path, change, words):
    with pytest.raises(DumpError) as caught:
        Dump(_planted(tmp_path, change))
    message = str(caught.value)
    assert words in message and "\n" not in message


def test_schema_and_version_keep_their_own_messages(tmp_path):
    """The two fields every reader checks first are worded as before (what they are, what this tool reads)."""
    with pytest.raises(DumpError, match="schema_version is 2; this yolo-parity reads version 1"):
        Dump(_planted(tmp_path, lambda m: m.update(schema_version=2)))
    assert MANIFEST_SCHEMA["properties"]["schema_version"] == {"const": 1}
