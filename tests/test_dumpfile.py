"""The dump layer: atomic writes, lazy reads, and precise errors for files a port or a crash got wrong."""

import json

import pytest
import torch

from parity.dump.files import Dump, DumpWriter, read_header
from parity.errors import DumpError


def write_dump(path, tensors, **manifest):
    with DumpWriter(path, kind="candidate") as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
        return writer.commit(manifest)


def test_round_trip_keeps_dtype_shape_and_bits(tmp_path):
    tensors = {"act.0": torch.randn(2, 3, 4), "loss.default.assign.fg_mask": torch.rand(2, 5) > 0.5,
               "loss.default.assign.target_gt_idx": torch.arange(10).view(2, 5), "model.0.conv.weight": torch.randn(3)}
    dump = Dump(write_dump(tmp_path / "d", tensors))
    for name, tensor in tensors.items():
        loaded = dump.get(name, verify=True)
        assert loaded.dtype == tensor.dtype and torch.equal(loaded, tensor)
    assert dump.verify() == []
    assert sorted(dump.names("loss.")) == ["loss.default.assign.fg_mask", "loss.default.assign.target_gt_idx"]


def test_writer_leaves_nothing_when_the_block_fails(tmp_path):
    with pytest.raises(RuntimeError):
        with DumpWriter(tmp_path / "d") as writer:
            writer.add("act.0", torch.zeros(2))
            raise RuntimeError("crash mid-capture")
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_to_overwrite_without_force(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(DumpError, match="--force"):
        DumpWriter(tmp_path / "d")


def test_missing_tensor_suggests_the_nearest_names(tmp_path):
    dump = Dump(write_dump(tmp_path / "d", {"act.23.scores": torch.zeros(1), "act.23.boxes": torch.zeros(1)}))
    with pytest.raises(DumpError, match="nearest: act.23.scores"):
        dump.get("act.23.score")


def test_wrong_schema_version_is_named(tmp_path):
    path = write_dump(tmp_path / "d", {"act.0": torch.zeros(1)})
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DumpError, match="schema_version is 99"):
        Dump(path)


def test_corrupt_manifest_is_named(tmp_path):
    path = write_dump(tmp_path / "d", {"act.0": torch.zeros(1)})
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(DumpError, match="not valid JSON"):
        Dump(path)


def test_truncated_safetensors_is_named(tmp_path):
    path = write_dump(tmp_path / "d", {"act.0": torch.randn(100)})
    file = path / "activations.safetensors"
    file.write_bytes(file.read_bytes()[:-50])
    with pytest.raises(DumpError, match="truncated"):
        read_header(file)
    with pytest.raises(DumpError, match="activations.safetensors"):
        Dump(path).get("act.0")


def test_flipped_bytes_fail_the_checksum(tmp_path):
    path = write_dump(tmp_path / "d", {"act.0": torch.zeros(100)})
    file = path / "activations.safetensors"
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF
    file.write_bytes(bytes(data))
    assert Dump(path).verify() == ["act.0"]


def test_index_is_optional_for_foreign_dumps(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "d").mkdir()
    save_file({"act.0": torch.ones(2)}, str(tmp_path / "d" / "mine.safetensors"))
    (tmp_path / "d" / "manifest.json").write_text(json.dumps({"schema": "yolo-parity-dump", "schema_version": 1}))
    dump = Dump(tmp_path / "d")
    assert dump.kind == "candidate" and torch.equal(dump.get("act.0"), torch.ones(2))


def test_stats_only_dump_keeps_statistics_not_values(tmp_path):
    with DumpWriter(tmp_path / "d", stats_only=True) as writer:
        writer.add("act.0", torch.tensor([1.0, 2.0, float("nan"), 3.0]))
        path = writer.commit({})
    dump = Dump(path)
    assert list(path.iterdir()) == [path / "manifest.json"]
    stats = dump.stats("act.0")
    assert stats["nan"] == 1 and stats["min"] == 1.0 and stats["max"] == 3.0 and stats["mean"] == 2.0
    with pytest.raises(DumpError, match="statistics-only"):
        dump.get("act.0")


def test_one_dtype_table_for_the_writer_and_the_foreign_checks(tmp_path):
    """Every dtype the writer names is one the safetensors header check knows, with torch's element size."""
    from parity.compare.foreign import check_safetensors_file
    from parity.dump.header import DTYPE_SIZES, DTYPES, dtype_label, dtype_name

    for info in DTYPES.values():
        if info.torch is not None:
            assert dtype_name(info.torch) == info.name
            assert torch.empty((), dtype=info.torch).element_size() == DTYPE_SIZES[info.name]
    assert dtype_label(torch.float32) == "float32 (F32)"
    out = tmp_path / "d"
    with DumpWriter(out) as writer:
        for dtype in (torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int8, torch.uint8, torch.bool):
            writer.add(f"act.{len(writer.names())}", torch.zeros(2, 3, dtype=dtype))
        writer.commit({})
    entries, problems = check_safetensors_file(out / "activations.safetensors")
    assert not problems and {e["dtype"] for e in entries.values()} == {"F64", "F16", "BF16", "I32", "I8", "U8", "BOOL"}
    assert {e["dtype"] for e in Dump(out).index.values()} == {e["dtype"] for e in entries.values()}
