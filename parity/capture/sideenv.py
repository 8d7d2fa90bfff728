"""Side environments: a separate virtualenv per ultralytics release, for reference dumps of older versions.

`ULTRALYTICS=8.3.200 make dump-reference` (and `python -m parity.cli.sideenv 8.3.200 -- dump ...`) builds
`ultralytics-8.3.200/` once under the side-environment directory and runs `python -m parity ...` inside it:

* a fresh venv made by the interpreter the project runs on (Python 3.11 here);
* `ultralytics==X.Y.Z` with the *same* torch and torchvision as the project's own environment (pip takes
  torch 2.14.1 / torchvision 0.29.1 from this machine's disk: nothing of torch is downloaded), plus the
  project's other run-time dependencies (numpy, safetensors, rich, pyyaml);
* this project in editable mode, without its dependencies (its pyproject pins the current ultralytics).

Where: the directory given (`root`), else `$PARITY_SIDEENV_DIR`, else `runs/envs/` in the project. Any directory
works (outside the project, on another disk); a `parity` run inside the environment starts in the caller's working directory, so
a user's own model yaml and output paths resolve as they typed them. One environment takes several GB (torch
is most of it); `python -m parity.cli.sideenv 8.3.200 --remove` deletes it (only a directory this module built:
one that holds its `parity-env.json`).

The environment is described in `<dir>/ultralytics-X.Y.Z/parity-env.json` (versions, build time); a
build that fails leaves no half-made environment under the final name. Only exact versions are accepted
(`8.3.200`, not `8.3.x`): a reference dump must say which release it came from.

Needs the package registry (PyPI) on the first build of a version; later runs are offline.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from parity.errors import ParityError
from parity.runtime import PROJECT_ROOT

ENVS_DIR = PROJECT_ROOT / "runs" / "envs"  # the default; a directory given, or $PARITY_SIDEENV_DIR, chooses another
ENV_VAR = "PARITY_SIDEENV_DIR"
STAMP = "parity-env.json"
VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")
def extra_requirements() -> list[str]:
    """The project's own dependencies from pyproject.toml, without torch, torchvision and ultralytics (pinned
    apart): a side environment must import every parity module the old release's dump goes through (xxhash for
    the checksums, jsonschema for the manifest check, ...), and a hand-kept list went stale."""
    import tomllib

    from packaging.requirements import Requirement

    declared = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return [spec for spec in declared if Requirement(spec).name not in ("torch", "torchvision", "ultralytics")]


def check_version(version: str) -> str:
    version = (version or "").strip()
    if version.startswith("ultralytics=="):
        version = version.split("==", 1)[1]
    if not VERSION_RE.match(version):
        raise ParityError(
            f"ULTRALYTICS={version!r}: give an exact release such as 8.3.200 (a reference dump must name the "
            f"release it came from; `pip index versions ultralytics` lists them)"
        )
    return version


def envs_root(directory: str | os.PathLike | None = None) -> Path:
    """Where side environments live: `directory`, else $PARITY_SIDEENV_DIR, else the project's runs/envs."""
    chosen = directory or os.environ.get(ENV_VAR) or ENVS_DIR
    root = Path(chosen).expanduser()
    if root.exists() and not root.is_dir():
        raise ParityError(f"side-environment directory {root}: expected a directory, found a file")
    return root.resolve()


def env_dir(version: str, root: str | os.PathLike | None = None) -> Path:
    return envs_root(root) / f"ultralytics-{check_version(version)}"


def env_python(version: str, root: str | os.PathLike | None = None) -> Path:
    return env_dir(version, root) / "bin" / "python"


def _current(dist: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # noqa: BLE001
        return None


def torch_pins() -> list[str]:
    """torch (and torchvision) exactly as installed in the running environment: results must not move by torch."""
    pins = []
    for dist in ("torch", "torchvision"):
        v = _current(dist)
        if v:
            pins.append(f"{dist}=={v.split('+', 1)[0]}")
    return pins


def read_stamp(version: str, root: str | os.PathLike | None = None) -> dict | None:
    path = env_dir(version, root) / STAMP
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def is_ready(version: str, root: str | os.PathLike | None = None) -> bool:
    stamp = read_stamp(version, root)
    return bool(stamp and stamp.get("ultralytics") == check_version(version) and env_python(version, root).exists()
                and stamp.get("torch") == _current("torch"))


def remove(version: str, root: str | os.PathLike | None = None) -> Path:
    """Delete the environment of `version`; only a directory this module built (it holds parity-env.json)."""
    target = env_dir(version, root)
    if not target.exists():
        raise ParityError(f"no side environment for ultralytics {version} in {target.parent}")
    if not (target / STAMP).exists():
        raise ParityError(f"{target} holds no {STAMP}: not a side environment built by parity.capture.sideenv; "
                          f"left as it is")
    shutil.rmtree(target)
    return target


def _run(cmd: list[str], log, *, env: dict | None = None) -> None:
    log("$ " + " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise ParityError(f"building the side environment failed at `{' '.join(cmd[:6])} ...`:\n{tail}")


def base_python() -> str:
    """The interpreter to make venvs with: the one this project runs on (a venv's python makes a fine base)."""
    return sys.executable


def build(version: str, *, rebuild: bool = False, log=lambda line: print(line, file=sys.stderr),
          root: str | os.PathLike | None = None) -> Path:
    """Make (or reuse) the environment for ultralytics `version` under `root` (`envs_root`); returns its python."""
    version = check_version(version)
    final = env_dir(version, root)
    if is_ready(version, root) and not rebuild:
        return env_python(version, root)
    start = time.perf_counter()
    final.parent.mkdir(parents=True, exist_ok=True)
    # venvs hard-code their own path in scripts: build in place under a temporary name would break them, so a
    # failed build is cleaned up instead (and `parity-env.json` is written last: its presence marks success).
    if final.exists():
        if any(final.iterdir()) and not (final / STAMP).exists() and not (final / "pyvenv.cfg").exists():
            raise ParityError(f"{final} exists and is not a side environment: not replaced")
        shutil.rmtree(final)
    try:
        _run([base_python(), "-m", "venv", str(final)], log)
        py = str(final / "bin" / "python")
        env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        _run([py, "-m", "pip", "install", "-q", f"ultralytics=={version}", *torch_pins(), *extra_requirements()],
             log, env=env)
        _run([py, "-m", "pip", "install", "-q", "--no-deps", "-e", str(PROJECT_ROOT)], log, env=env)
        probe = subprocess.run(
            [py, "-c", "import json, importlib.metadata as m; print(json.dumps({d: m.version(d) for d in "
                       "('ultralytics', 'torch', 'torchvision', 'numpy', 'safetensors')}))"],
            capture_output=True, text=True, check=False, env={**env, "YOLO_OFFLINE": "1"},
        )
        if probe.returncode:
            raise ParityError(f"the side environment was built but cannot report its versions: {probe.stderr[-2000:]}")
        versions = json.loads(probe.stdout.strip().splitlines()[-1])
        if versions["ultralytics"] != version:
            raise ParityError(f"asked for ultralytics {version}, the side environment has {versions['ultralytics']}")
        if versions["torch"] != _current("torch"):
            raise ParityError(
                f"the side environment got torch {versions['torch']}, the project runs torch {_current('torch')}: "
                f"dumps would differ by torch as well as by ultralytics"
            )
    except BaseException:
        shutil.rmtree(final, ignore_errors=True)
        raise
    seconds = time.perf_counter() - start
    stamp = {**versions, "python": sys.version.split()[0], "built_seconds": round(seconds, 1),
             "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "project": str(PROJECT_ROOT)}
    (final / STAMP).write_text(json.dumps(stamp, indent=1) + "\n")
    log(f"side environment for ultralytics {version} ready in {seconds:.0f} s: {final}")
    return final / "bin" / "python"


def run_parity(version: str, argv: list[str], *, build_if_missing: bool = True,
               root: str | os.PathLike | None = None, cwd: str | os.PathLike | None = None) -> int:
    """Run `python -m parity ARGV` with ultralytics `version` in `cwd` (default: the project); its exit code."""
    if build_if_missing:
        python = build(version, root=root)
    elif not is_ready(version, root):
        raise ParityError(f"no side environment for ultralytics {version} in {envs_root(root)}; build it first "
                          f"(`build`)")
    else:
        python = env_python(version, root)
    env = {**os.environ, "YOLO_OFFLINE": "1",
           "YOLO_CONFIG_DIR": os.environ.get("YOLO_CONFIG_DIR", str(PROJECT_ROOT / "runs" / "ultralytics-config"))}
    env.pop("PYTHONPATH", None)
    return subprocess.call([str(python), "-m", "parity", *argv], cwd=str(cwd or PROJECT_ROOT), env=env)
