"""Side environments anywhere: the directory comes from an option or $PARITY_SIDEENV_DIR, a run inside one starts
in the caller's directory, and only what this module built is ever deleted. (No environment is built here:
that needs PyPI and minutes; tests/test_drift.py builds one when it can.)"""

from __future__ import annotations

import json

import pytest

from parity.capture import sideenv
from parity.cli import sideenv as sideenv_cli
from parity.errors import ParityError


def _fake_env(root, version="8.3.200"):
    """What a finished build leaves: the stamp and a python."""
    target = root / f"ultralytics-{version}"
    (target / "bin").mkdir(parents=True)
    (target / "bin" / "python").write_text("")
    (target / sideenv.STAMP).write_text(json.dumps({"ultralytics": version, "torch": sideenv._current("torch")}))
    return target


def test_directory_from_option_then_environment_then_project(tmp_path, monkeypatch):
    monkeypatch.delenv(sideenv.ENV_VAR, raising=False)
    assert sideenv.envs_root() == sideenv.ENVS_DIR.resolve()
    monkeypatch.setenv(sideenv.ENV_VAR, str(tmp_path / "from-env"))
    assert sideenv.env_dir("8.3.200") == tmp_path / "from-env" / "ultralytics-8.3.200"
    assert sideenv.env_dir("8.3.200", tmp_path / "opt") == tmp_path / "opt" / "ultralytics-8.3.200"
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ParityError, match="expected a directory, found a file"):
        sideenv.envs_root(tmp_path / "a-file")


def test_a_run_starts_in_the_callers_directory_with_the_environments_python(tmp_path, monkeypatch):
    target = _fake_env(tmp_path / "envs")
    assert sideenv.is_ready("8.3.200", tmp_path / "envs")
    seen = {}

    def call(cmd, cwd, env):
        seen.update(cmd=cmd, cwd=cwd, env=env)
        return 0

    monkeypatch.setattr(sideenv.subprocess, "call", call)
    work = tmp_path / "my-project"
    work.mkdir()
    monkeypatch.chdir(work)
    code = sideenv_cli.main(["8.3.200", "--dir", str(tmp_path / "envs"), "--", "dump", "--model", "my.yaml"])
    assert code == 0 and seen["cwd"] == str(work)
    assert seen["cmd"] == [str(target / "bin" / "python"), "-m", "parity", "dump", "--model", "my.yaml"]
    assert seen["env"]["YOLO_OFFLINE"] == "1" and "PYTHONPATH" not in seen["env"]


def test_not_built_says_where_it_looked(tmp_path):
    with pytest.raises(ParityError, match=f"no side environment for ultralytics 8.3.200 in {tmp_path}"):
        sideenv.run_parity("8.3.200", ["--help"], build_if_missing=False, root=tmp_path)


def test_remove_deletes_only_what_it_built(tmp_path, capsys):
    target = _fake_env(tmp_path)
    assert sideenv_cli.main(["8.3.200", "--dir", str(tmp_path), "--remove"]) == 0
    assert not target.exists() and "removed" in capsys.readouterr().out
    assert sideenv_cli.main(["8.3.200", "--dir", str(tmp_path), "--remove"]) == 2
    mine = tmp_path / "ultralytics-8.3.201"
    mine.mkdir()
    (mine / "notes.txt").write_text("a user's file")
    with pytest.raises(ParityError, match="not a side environment built by parity.capture.sideenv"):
        sideenv.remove("8.3.201", tmp_path)
    with pytest.raises(ParityError, match="is not a side environment: not replaced"):
        sideenv.build("8.3.201", root=tmp_path)
    assert (mine / "notes.txt").read_text() == "a user's file"
