"""The streaming dump writer: files bitwise as safetensors writes them, nothing held in memory, atomic."""

import json

import torch
from safetensors.torch import save_file as safetensors_save_file

from parity.dump.files import Dump, DumpWriter

DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.uint16, torch.float16, torch.bfloat16,
          torch.int32, torch.uint32, torch.float32, torch.float64, torch.int64, torch.uint64,
          torch.float8_e4m3fn, torch.float8_e5m2]


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    out = {}
    for index, dtype in enumerate(DTYPES):
        values = torch.randint(0, 2 if dtype == torch.bool else 100, (3, index + 1), generator=generator)
        out[f"act.{(7 * index) % 5}.{index}"] = values.to(dtype)
    out["act.scalar"] = torch.tensor(1.5)
    out["act.empty"] = torch.zeros(0, 3)
    out["act.é"] = torch.ones(2)
    out["act.strided"] = torch.arange(12.0).reshape(3, 4).t()  # not contiguous
    return out


def test_streamed_files_are_bitwise_what_safetensors_writes(tmp_path):
    tensors = _tensors()
    with DumpWriter(tmp_path / "dump", kind="candidate") as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
        writer.commit({})
    safetensors_save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "plain.safetensors"))
    assert (tmp_path / "dump" / "activations.safetensors").read_bytes() == \
        (tmp_path / "plain.safetensors").read_bytes()
    assert sorted(p.name for p in (tmp_path / "dump").iterdir()) == ["activations.safetensors", "manifest.json"]
    dump = Dump(tmp_path / "dump")
    assert list(dump.index) == list(tensors)  # the manifest keeps the order tensors were added in
    for name, tensor in tensors.items():
        stored = dump.get(name)
        assert stored.dtype == tensor.dtype and stored.reshape(-1).view(torch.uint8).equal(
            tensor.contiguous().reshape(-1).view(torch.uint8)), name


def test_a_tensor_edited_after_add_is_dumped_as_it_was(tmp_path):
    tensor = torch.zeros(4)
    with DumpWriter(tmp_path / "dump", kind="candidate") as writer:
        writer.add("act.0", tensor, copy=False)
        tensor.add_(1)
        writer.commit({})
    assert torch.equal(Dump(tmp_path / "dump").get("act.0"), torch.zeros(4))


def test_stats_only_writes_no_spool_and_no_tensor_file(tmp_path):
    with DumpWriter(tmp_path / "dump", kind="candidate", stats_only=True) as writer:
        writer.add("act.0", torch.arange(4.0))
        assert not any(writer._tmp.iterdir())
        writer.commit({})
    manifest = json.loads((tmp_path / "dump" / "manifest.json").read_text())
    assert manifest["tensors"]["act.0"]["file"] is None and manifest["tensors"]["act.0"]["stats"]["max"] == 3.0
    assert [p.name for p in (tmp_path / "dump").iterdir()] == ["manifest.json"]
