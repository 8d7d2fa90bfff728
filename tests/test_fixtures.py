"""The committed fixtures are what ultralytics produces today, bit for bit (a behaviour change cannot slip in)."""

import pytest
import torch

from parity.capture import run_capture
from parity.dump.files import Dump
from parity.tools.fixtures import FIXTURES, fixture_path


@pytest.mark.parametrize("name", list(FIXTURES))
def test_fresh_dump_equals_committed_fixture(name):
    committed = Dump(fixture_path(name))
    fresh = run_capture(FIXTURES[name])
    assert sorted(fresh.tensors) == sorted(committed.index), "tensor names changed"
    for tensor_name, tensor in fresh.tensors.items():
        stored = committed.get(tensor_name)
        assert stored.dtype == tensor.dtype and torch.equal(stored, tensor), tensor_name
    for section in ("model", "loss", "hyperparameters", "init"):
        assert fresh.manifest[section] == committed.manifest[section], section


@pytest.mark.parametrize("name", list(FIXTURES))
def test_committed_fixture_checksums_hold(name):
    assert Dump(fixture_path(name)).verify() == []
