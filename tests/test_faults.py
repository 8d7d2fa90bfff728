"""Fault injection: bad input, corrupted dumps, killed and concurrent writers, a read-only or full disk, odd paths.

Every case asserts the exit code, the one line the person reads, and that nothing was lost or left behind.
Dumps here are small: written by DumpWriter from a few tensors, or copies of committed fixtures in tmp_path
(the fixtures themselves are never touched).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from parity.cli.main import main
from parity.dump.files import Dump, DumpWriter, read_header
from parity.errors import DumpError
from parity.tools.fixtures import fixture_path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
SMALL = ["--model", "fixtures/models/yolo11-narrow.yaml", "--imgsz", "64"]


# --------------------------------------------------------------------------------------------- helpers
def run_cli(capsys, *argv):
    code = main(["--no-progress", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    """The error output must be exactly one non-empty line; return it."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n{err}"
    assert "Traceback" not in err
    return lines[0]


def tiny_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "batch.img": torch.rand(1, 3, 8, 8, generator=g),
        "model.0.conv.weight": torch.randn(4, 3, 3, 3, generator=g),
        "act.0": torch.randn(1, 4, 8, 8, generator=g),
        "grad.param.model.0.conv.weight": torch.randn(4, 3, 3, 3, generator=g),
        "loss.default.output.items": torch.rand(3, generator=g) + 0.5,
    }


def write_dump(path: Path, tensors: dict | None = None, *, kind: str = "reference", force: bool = False,
               notice=None) -> Path:
    kwargs = {"notice": notice} if notice is not None else {}
    with DumpWriter(path, kind=kind, force=force, **kwargs) as writer:
        for name, tensor in (tensors or tiny_tensors()).items():
            writer.add(name, tensor)
        return writer.commit({"config": {"precision": "fp32"}})


def flip_bit(dump: Path, name: str, bit: int, element: int = 0) -> None:
    """Flip one bit of one float32 element of `name` in its safetensors file (bit 0: lowest mantissa bit;
    bit 30: the top exponent bit)."""
    entry = Dump(dump).index[name]
    file = dump / entry["file"]
    header = read_header(file)
    raw = bytearray(file.read_bytes())
    (length,) = struct.unpack("<Q", raw[:8])
    at = 8 + length + header[name]["data_offsets"][0] + 4 * element + bit // 8
    raw[at] ^= 1 << (bit % 8)
    file.write_bytes(bytes(raw))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def subprocess_env(**extra) -> dict:
    env = dict(os.environ)
    env.update({"PYTHONPATH": str(ROOT), "YOLO_OFFLINE": "1",
                "YOLO_CONFIG_DIR": str(ROOT / "runs" / "ultralytics-config"), **extra})
    return env


# ------------------------------------------------------------------------------------- 1. --force
def test_force_onto_a_plain_file_is_exit_2_and_keeps_it(tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    code, _, err = run_cli(capsys, "dump", *SMALL, "--out", str(target), "--force")
    assert code == 2
    assert one_line(err) == (f"error: --force replaces only a dump directory: {target} is a file; remove it "
                             f"yourself or choose another --out")
    assert target.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    code, _, err = run_cli(capsys, "dump", *SMALL, "--out", str(target))
    assert code == 2
    assert one_line(err) == f"error: --out {target} is a file, not a dump directory; choose another --out"
    assert target.read_text() == "mine"


def test_force_onto_a_repository_is_exit_2_and_deletes_nothing(tmp_path, capsys):
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (repo / "notes.md").write_text("my notes")
    before = snapshot(repo)
    code, _, err = run_cli(capsys, "dump", *SMALL, "--out", str(repo), "--force")
    assert code == 2
    assert one_line(err) == (f"error: --force replaces only a dump: {repo} has no manifest.json (holds .git/, "
                             f"notes.md); remove it yourself or choose another --out")
    assert snapshot(repo) == before and leftovers(tmp_path) == []


def test_force_onto_a_foreign_manifest_is_exit_2(tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"schema": "someone-else", "files": []}))
    code, _, err = run_cli(capsys, "dump", *SMALL, "--out", str(other), "--force")
    assert code == 2
    assert one_line(err) == (f"error: --force replaces only a dump: {other / 'manifest.json'} is not a "
                             f"yolo-parity-dump manifest (schema: 'someone-else'); remove it yourself or choose "
                             f"another --out")
    assert json.loads((other / "manifest.json").read_text())["schema"] == "someone-else"


def test_force_onto_a_dump_holding_a_users_file_is_exit_2(tmp_path, capsys):
    dump = write_dump(tmp_path / "dump")
    (dump / "analysis.ipynb").write_text("{}")
    before = snapshot(dump)
    code, _, err = run_cli(capsys, "dump", *SMALL, "--out", str(dump), "--force")
    assert code == 2
    assert one_line(err) == (f"error: --force replaces only a dump: {dump} also holds analysis.ipynb, which no "
                             f"dump writes; remove it yourself or choose another --out")
    assert snapshot(dump) == before


def test_force_replaces_a_dump(tmp_path):
    first = write_dump(tmp_path / "dump", tiny_tensors(0))
    write_dump(first, tiny_tensors(1), force=True)
    assert torch.equal(Dump(first).get("act.0"), tiny_tensors(1)["act.0"])
    assert leftovers(tmp_path) == []


def test_export_layer_onto_a_foreign_file_is_exit_2(tmp_path, capsys):
    target = tmp_path / "weights.bin"
    target.write_bytes(b"\x00" * 64)
    code, _, err = run_cli(capsys, "export-layer", "--reference", str(fixture_path("yolo11-narrow-nc80-96")),
                           "--layer", "0", "--out", str(target))
    assert code == 2
    assert one_line(err) == (f"error: --force replaces only a layer file written by export-layer: {target} is "
                             f"not one; remove it yourself or choose another --out")
    assert target.read_bytes() == b"\x00" * 64


def test_envelope_force_onto_a_foreign_file_is_exit_2(tmp_path, capsys):
    target = tmp_path / "results.json"
    target.write_text('{"mine": true}')
    code, _, err = run_cli(capsys, "envelope", *SMALL, "--device", "cpu", "--out", str(target), "--force")
    assert code == 2
    assert one_line(err) == (f"error: --force replaces only a noise envelope file: {target} is not one; remove it "
                             f"yourself or choose another --out")
    assert target.read_text() == '{"mine": true}'


# --------------------------------------------------------------------------- 2. verify what is read
FLIPS = [(name, bit) for name in ("model.0.conv.weight", "act.0", "grad.param.model.0.conv.weight",
                                  "loss.default.output.items") for bit in (0, 30)]


@pytest.mark.parametrize("name, bit", FLIPS, ids=[f"{n}-bit{b}" for n, b in FLIPS])
@pytest.mark.parametrize("mode", ["--streamed", "--stats-only"])
def test_a_flipped_bit_in_the_reference_is_exit_2_never_parity_nor_blame(tmp_path, capsys, name, bit, mode):
    reference = write_dump(tmp_path / "ref")
    candidate = write_dump(tmp_path / "cand", kind="candidate")
    flip_bit(reference, name, bit)
    file = reference / Dump(reference).index[name]["file"]
    code, out, err = run_cli(capsys, "compare", "--reference", str(reference), "--candidate", str(candidate), mode)
    assert code == 2 and "PARITY" not in out and "DIVERGENCE" not in out
    assert one_line(err) == f"error: reference dump corrupted: {name} does not match its checksum ({file})"


def test_a_flipped_bit_in_the_candidate_dump_is_named_as_the_candidates(tmp_path, capsys):
    reference = write_dump(tmp_path / "ref")
    candidate = write_dump(tmp_path / "cand", kind="candidate")
    flip_bit(candidate, "act.0", 30)
    code, _, err = run_cli(capsys, "compare", "--reference", str(reference), "--candidate", str(candidate),
                           "--streamed")
    assert code == 2
    assert one_line(err) == (f"error: candidate dump corrupted: act.0 does not match its checksum "
                             f"({candidate / 'activations.safetensors'})")


def test_exponent_flip_in_a_real_reference_does_not_blame_the_candidate(tmp_path, capsys):
    """The issue's case: a flipped exponent bit in model.5.conv.weight used to make layer 5 'the first divergent
    layer'. Now the replay stops at the first read of that tensor."""
    reference = tmp_path / "ref"
    shutil.copytree(fixture_path("yolov8-narrow-nc12-96"), reference)
    flip_bit(reference, "model.5.conv.weight", 30, element=7)
    code, out, err = run_cli(capsys, "compare", "--reference", str(reference), "--what", "layers")
    assert code == 2 and "first divergent" not in out and "PARITY" not in out
    assert one_line(err) == (f"error: reference dump corrupted: model.5.conv.weight does not match its checksum "
                             f"({reference / 'weights.safetensors'})")


def test_no_verify_reads_corrupted_data_and_the_report_says_so(tmp_path, capsys):
    reference = write_dump(tmp_path / "ref")
    candidate = write_dump(tmp_path / "cand", kind="candidate")
    flip_bit(reference, "act.0", 30)
    report = tmp_path / "report.json"
    code, out, err = run_cli(capsys, "--no-verify", "compare", "--reference", str(reference), "--candidate",
                             str(candidate), "--streamed", "--json", str(report))
    document = json.loads(report.read_text())
    assert code == 1  # the person opted out: the corrupted tensor is judged, and fails
    assert document["context"]["checksums"].startswith("not verified (--no-verify)")
    assert any("--no-verify" in item for item in document["coverage"]["not_checked"])
    assert "--no-verify" in " ".join(out.split())


def test_stats_only_says_where_its_checksums_come_from(tmp_path, capsys):
    with DumpWriter(tmp_path / "ref", stats_only=True) as writer:
        for name, tensor in tiny_tensors().items():
            writer.add(name, tensor)
        reference = writer.commit({})
    candidate = write_dump(tmp_path / "cand", kind="candidate")
    report = tmp_path / "report.json"
    code, _, _ = run_cli(capsys, "compare", "--reference", str(reference), "--candidate", str(candidate),
                         "--stats-only", "--json", str(report))
    assert code == 0
    assert json.loads(report.read_text())["context"]["checksums"] == (
        "reference: from its manifest (a statistics-only dump holds no values to hash); "
        "candidate: recomputed from the values and checked against its manifest")


def test_each_tensor_is_hashed_once(tmp_path, monkeypatch):
    import parity.dump.files as dumpfile

    dump = Dump(write_dump(tmp_path / "ref"))
    calls = []
    real_fast, real_sha = dumpfile.fast_checksum, dumpfile.checksum
    monkeypatch.setattr(dumpfile, "fast_checksum", lambda t: calls.append("xxh3") or real_fast(t))
    monkeypatch.setattr(dumpfile, "checksum", lambda t: calls.append("sha256") or real_sha(t))
    for _ in range(3):
        dump.get("act.0")
    assert calls == ["xxh3"]  # once, and with the fast hash the writer recorded (not SHA-256)


def test_a_dump_without_the_fast_hash_is_checked_against_its_sha256(tmp_path):
    """A port's dump (or one written before xxh3_128 existed) carries sha256 only: reads check that."""
    reference = write_dump(tmp_path / "ref")
    manifest = json.loads((reference / "manifest.json").read_text())
    for entry in manifest["tensors"].values():
        del entry["xxh3_128"]
    (reference / "manifest.json").write_text(json.dumps(manifest))
    Dump(reference).get("act.0")  # intact: passes its SHA-256
    flip_bit(reference, "act.0", 0)
    with pytest.raises(DumpError, match="act.0 does not match its checksum"):
        Dump(reference).get("act.0")


def test_a_truncated_file_is_exit_2_naming_it(tmp_path, capsys):
    reference = write_dump(tmp_path / "ref")
    candidate = write_dump(tmp_path / "cand", kind="candidate")
    file = reference / "activations.safetensors"
    size = file.stat().st_size
    file.write_bytes(file.read_bytes()[:-100])
    code, _, err = run_cli(capsys, "compare", "--reference", str(reference), "--candidate", str(candidate),
                           "--streamed")
    assert code == 2
    assert one_line(err) == f"error: {file} is truncated: tensors need {size} bytes, file has {size - 100}"


def test_a_corrupt_manifest_is_exit_2(tmp_path, capsys):
    reference = write_dump(tmp_path / "ref")
    (reference / "manifest.json").write_text('{"schema": "yolo-parity-dump", ')
    code, _, err = run_cli(capsys, "inspect", str(reference))
    assert code == 2 and one_line(err).startswith(f"error: {reference / 'manifest.json'} is not valid JSON: ")


# ------------------------------------------------------------------------------------- 3. exit codes
@pytest.mark.parametrize("argv, message", [
    (["dump", *SMALL[:2], "--imgsz", "0"], "--imgsz must be a positive multiple of the largest stride (32), got 0"),
    (["dump", *SMALL[:2], "--imgsz", "-32"],
     "--imgsz must be a positive multiple of the largest stride (32), got -32"),
    (["dump", *SMALL[:2], "--imgsz", "33"], "--imgsz must be a positive multiple of the largest stride (32), got 33"),
    (["dump", *SMALL, "--batch", "0"], "--batch must be at least 1, got 0"),
    (["dump", *SMALL, "--nc", "-3"], "--nc must be at least 1, got -3"),
    (["dump", *SMALL, "--seed", "-1"], "--seed must be between 0 and 4294967295, got -1"),
    (["--threads", "0", "dump", *SMALL], "--threads must be between 1 and 1024, got 0"),
    (["compare", "--layer", "-1"], "--layer must be a layer index, 0 or more, got -1"),
    (["envelope", "--threads-list", "2", "0"], "--threads-list values must be between 1 and 1024, got 0"),
    (["export-layer", "--reference", "x", "--layer", "-2", "--out", "y"],
     "--layer must be a layer index, 0 or more, got -2"),
    (["drift", "a", "b", "--limit", "0"], "--limit must be at least 1, got 0"),
    (["dump", "--imgsz", "big"], "parity dump: argument --imgsz: invalid int value: 'big' (see parity dump --help)"),
])
def test_numeric_options_are_checked_before_any_work(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and one_line(err) == f"error: {message}"
    assert list(tmp_path.iterdir()) == []


def test_an_invalid_regex_in_a_map_file_is_exit_2_naming_the_entry(tmp_path, capsys, monkeypatch):
    (tmp_path / "faults_regex_port.py").write_text(
        "def build(nc, model):\n    from parity.reimpl.model import build_detector\n"
        "    return build_detector(model, nc=nc)\n")
    map_file = tmp_path / "map.yaml"
    map_file.write_text("key_map:\n  '^backbone\\.(\\d+\\.': 'model.\\1.'\n")
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "map", "--reference", str(fixture_path("yolo11-narrow-nc80-96")),
                           "--candidate", "faults_regex_port:build", "--map", str(map_file))
    assert code == 2
    assert one_line(err).startswith("error: key_map entry '^backbone\\\\.(\\\\d+\\\\.' is not a valid regular "
                                    "expression: missing ), unterminated subpattern")


def test_an_internal_error_is_exit_3_one_line_and_a_traceback_file(tmp_path, capsys, monkeypatch):
    import parity.cli.main as cli
    import parity.dump.inspect

    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero in a planted bug")

    monkeypatch.setattr(parity.dump.inspect, "render_inspect", broken)
    monkeypatch.setattr(cli, "CRASH_DIR", tmp_path / "crashes")
    code, _, err = run_cli(capsys, "inspect", str(fixture_path("yolo26-narrow-nc12-64")))
    line = one_line(err)
    (crash,) = (tmp_path / "crashes").iterdir()
    assert code == 3
    assert line == (f"internal error (a bug in yolo-parity, not in your input): ZeroDivisionError: division by zero "
                    f"in a planted bug; traceback in {crash}; please report it with that file")
    text = crash.read_text()
    assert "Traceback (most recent call last)" in text and "planted bug" in text and "inspect" in text.splitlines()[0]


@pytest.mark.slow
def test_make_passes_paths_with_spaces_and_non_ascii_and_says_which_codes_it_returns(tmp_path):
    folder = tmp_path / "my dumps ü"
    out = folder / "ré f"
    make = ["make", "-s", "--no-print-directory", f"PY={PY}", "STAMP="]
    done = subprocess.run([*make, "dump-reference", "MODEL=fixtures/models/yolo11-narrow.yaml", "IMGSZ=64",
                           f"OUT={out}"], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert (out / "manifest.json").exists() and leftovers(folder) == []
    shown = subprocess.run([*make, "inspect", f"OUT={out}"], cwd=ROOT, env=subprocess_env(), capture_output=True,
                           text=True, timeout=300)
    assert shown.returncode == 0 and "Detect" in shown.stdout
    # bad input: parity exits 2, make reports parity's code in its own line and exits 2 (README, exit codes)
    missing = folder / "no such"
    bad = subprocess.run([*make, "inspect", f"OUT={missing}"], cwd=ROOT, env=subprocess_env(), capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2
    assert f"error: dump {missing} does not exist" in bad.stderr and "Error 2" in bad.stderr


def test_the_cli_takes_paths_with_spaces_and_non_ascii(tmp_path, capsys):
    reference = tmp_path / "réf dump ü"
    shutil.copytree(fixture_path("yolo26-narrow-nc12-64"), reference)
    code, out, _ = run_cli(capsys, "inspect", str(reference), "--verify")
    assert code == 0 and "Detect" in out


# -------------------------------------------------------------------------------- 5. crash safety
KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys, torch
    import parity.dump.files as dumpfile
    point, out, force = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    real_save, real_replace, saves = dumpfile.save_file, os.replace, []
    def save(tensors, path, *a, **k):
        real_save(tensors, path, *a, **k)
        saves.append(path)
        if point == "save" and len(saves) == 2:
            die()
    def replace(src, dst):
        if point == "rename" and ".partial-" in str(src):
            die()
        real_replace(src, dst)
        if point == "swap" and ".replaced-" in str(dst):
            die()
    dumpfile.save_file, os.replace = save, replace
    with dumpfile.DumpWriter(out, force=force, kind="candidate") as writer:
        for i in range(4):
            writer.add(f"act.{i}", torch.full((256,), float(i)))
        writer.add("model.0.conv.weight", torch.ones(8))
        if point == "capture":
            die()
        writer.commit({})
""")


@pytest.mark.slow
@pytest.mark.parametrize("point", ["capture", "save", "rename", "swap"])
def test_a_killed_writer_loses_nothing_and_the_next_run_cleans_up(tmp_path, point):
    out = tmp_path / "out"
    force = point == "swap" or point == "save"
    if force:
        write_dump(out, {"act.0": torch.zeros(3)})
    before = snapshot(out) if force else None
    killed = subprocess.run([PY, "-c", KILL_SCRIPT, point, str(out), "1" if force else "0"], cwd=ROOT,
                            env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left = leftovers(tmp_path)
    assert any(name.startswith(".out.partial-") or name.startswith(".out.replaced-") for name in left), left
    if point == "swap":
        assert not out.exists()  # killed between the two renames: the old dump is aside, the new one beside it
    elif force:
        assert snapshot(out) == before  # the old dump untouched
    else:
        assert not out.exists()
    notices = []
    if point == "swap":  # the next writer puts the old dump back first, so replacing it again needs --force
        with pytest.raises(DumpError, match="already exists; pass --force"):
            write_dump(out, notice=notices.append)
        assert snapshot(out) == before
        assert notices[0].startswith(f"restored {out} from .out.replaced-")
    write_dump(out, tiny_tensors(3), force=force, notice=notices.append)
    partials = [n for n in left if n.startswith(".out.partial-")]
    for name in partials:
        assert (f"removed stale partial dump {tmp_path / name} left by pid {name.rsplit('-', 1)[1]}, which is no "
                f"longer running") in notices
    assert torch.equal(Dump(out).get("act.0"), tiny_tensors(3)["act.0"])
    assert leftovers(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_stale_partial_is_removed_by_the_next_cli_run_which_says_so(tmp_path, capsys):
    out = tmp_path / "dump"
    stale = tmp_path / ".dump.partial-999999999"
    stale.mkdir()
    (stale / "weights.safetensors").write_bytes(b"\x00" * 1000)
    code, _, err = run_cli(capsys, "dump", *SMALL, "--out", str(out))
    assert code == 0
    assert f"removed stale partial dump {stale} left by pid 999999999, which is no longer running" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dump"]


HOLD_SCRIPT = textwrap.dedent("""
    import sys, torch
    from parity.dump.files import DumpWriter
    with DumpWriter(sys.argv[1], kind="candidate") as writer:
        writer.add("act.0", torch.arange(5.0))
        print("locked", flush=True)
        sys.stdin.readline()
        writer.commit({"writer": "first"})
""")


@pytest.mark.slow  # 2-11 s here (a subprocess, a browser or full-size builds); make test-fast skips it
def test_a_second_writer_of_the_same_out_is_exit_2_naming_the_first(tmp_path, capsys):
    out = tmp_path / "dump"
    first = subprocess.Popen([PY, "-c", HOLD_SCRIPT, str(out)], cwd=ROOT, env=subprocess_env(),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "locked"
        for extra in ([], ["--force"]):
            code, _, err = run_cli(capsys, "dump", *SMALL, "--out", str(out), *extra)
            assert code == 2
            assert one_line(err) == (f"error: {out} is being written by pid {first.pid}; wait for it to finish or "
                                     f"choose another --out")
        first.stdin.write("\n")
        first.stdin.flush()
        assert first.wait(timeout=120) == 0
    finally:
        if first.poll() is None:
            first.kill()
    assert Dump(out).manifest["writer"] == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dump"]
    code, _, err = run_cli(capsys, "dump", *SMALL, "--out", str(out))  # after it: an existing dump, not a race
    assert code == 2 and "already exists; pass --force" in one_line(err)


@contextmanager
def read_only(folder: Path):
    """`folder` read-only for this process: mode 0555 for a normal user; for root (whom modes do not stop) a
    tmpfs mounted there and remounted read-only. Skips where neither is possible."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    content = folder.with_name(folder.name + ".content")
    shutil.copytree(folder, content)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        shutil.rmtree(content)
        pytest.skip("running as root and cannot mount a tmpfs: no way to make a folder read-only")
    try:
        shutil.copytree(content, folder, dirs_exist_ok=True)
        shutil.rmtree(content)
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True, capture_output=True)
        yield
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


def test_a_read_only_parent_is_exit_2_before_any_work(tmp_path, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    with read_only(parent):
        code, _, err = run_cli(capsys, "dump", *SMALL, "--out", str(parent / "dump"))
        assert code == 2
        assert one_line(err) == f"error: cannot write {parent / 'dump'}: {parent} is not writable"
        assert list(parent.iterdir()) == []


def test_a_read_only_out_is_not_half_deleted_by_force(tmp_path, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    write_dump(parent / "dump")
    before = snapshot(parent)
    with read_only(parent):
        code, _, err = run_cli(capsys, "dump", *SMALL, "--out", str(parent / "dump"), "--force")
        assert code == 2
        assert one_line(err) == f"error: cannot replace {parent / 'dump'}: it is read-only; nothing was changed"
        assert snapshot(parent) == before


FULL_SCRIPT = textwrap.dedent("""
    import resource, sys
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
    from parity.cli.main import main
    raise SystemExit(main(sys.argv[1:]))
""")


@pytest.mark.slow  # 2-11 s here (a subprocess, a browser or full-size builds); make test-fast skips it
def test_a_full_disk_is_exit_2_and_leaves_nothing(tmp_path):
    out = tmp_path / "dump"
    done = subprocess.run([PY, "-c", FULL_SCRIPT, "--no-progress", "dump", *SMALL, "--out", str(out)], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr
    assert one_line(done.stderr) == (f"error: cannot write {out}: a file exceeds the file-size limit; nothing was "
                                     f"written, what was there is unchanged")
    assert list(tmp_path.iterdir()) == []


def test_files_follow_the_umask_consistently(tmp_path):
    old = os.umask(0o027)
    try:
        dump = write_dump(tmp_path / "dump")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in dump.iterdir()}
    assert set(modes.values()) == {0o640}, modes
    assert dump.stat().st_mode & 0o777 == 0o750

