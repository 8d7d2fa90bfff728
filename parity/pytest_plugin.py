"""pytest plugin (entry point `pytest11`; docs/python-api.md): check a port from the user's own test suite.

Fixtures:

* `parity_reference` (session): the reference dump the tests compare against: `--parity-reference DIR`, or a
  small one made once per session from ultralytics' own YOLO11 yaml at a quarter of the `n` width (nc 80,
  96 pixels, batch 2: a few seconds on a CPU), kept in the session's temporary directory. Override
  `parity_capture_config` in a conftest.py to dump another configuration.
* `assert_parity`: `assert_parity(candidate="builtin", **options)` runs `parity.assert_parity` against
  `parity_reference`; a failure's message ends with the report's path. With `--parity-html DIR` every failing
  check also writes `DIR/<test id>.html`, and the session's summary lists the reports written.

The module imports nothing heavy: pytest loads it in every session of an environment where yolo-parity is installed.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

NARROW_WIDTH = 0.0625  # a quarter of YOLO11n's 0.25: every layer kept, a dump of a few MB
_REPORTS_KEY = pytest.StashKey[list]()


def pytest_addoption(parser) -> None:
    group = parser.getgroup("parity", "yolo-parity (compare a port with ultralytics)")
    group.addoption("--parity-reference", metavar="DIR", default=None,
                    help="reference dump for the parity_reference fixture (default: dump a small one per session)")
    group.addoption("--parity-html", metavar="DIR", default=None,
                    help="write one self-contained HTML report per failing parity check into DIR")


def pytest_configure(config) -> None:
    config.stash[_REPORTS_KEY] = []


def narrow_yolo11_yaml(directory: Path) -> Path:
    """ultralytics' own yolo11.yaml with the `n` scale at a quarter of its width (the committed fixtures' model)."""
    import ultralytics
    import yaml

    source = Path(ultralytics.__file__).parent / "cfg" / "models" / "11" / "yolo11.yaml"
    document = yaml.safe_load(source.read_text())
    depth, _, max_channels = document["scales"]["n"]
    document["scales"] = {"n": [depth, NARROW_WIDTH, max_channels]}
    path = directory / "yolo11-narrow.yaml"  # its only scale is the one built, as for the committed fixtures
    path.write_text("# ultralytics yolo11.yaml, scale n at a quarter width (written by parity.pytest_plugin)\n"
                    + yaml.safe_dump(document, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def parity_capture_config(tmp_path_factory):
    """What `parity_reference` dumps when no `--parity-reference` is given (override in a conftest.py)."""
    from parity.capture import CaptureConfig

    models = tmp_path_factory.mktemp("parity-models")
    return CaptureConfig(model=str(narrow_yolo11_yaml(models)), nc=80, imgsz=96, batch=2, seed=0)


@pytest.fixture(scope="session")
def parity_reference(request, tmp_path_factory) -> Path:
    """The reference dump directory (see the module docstring)."""
    from parity.dump.files import MANIFEST
    from parity.runtime import prepare

    prepare()
    given = request.config.getoption("parity_reference")
    if given:
        path = Path(given)
        if not (path / MANIFEST).exists():
            raise pytest.UsageError(f"--parity-reference {given}: expected a reference dump directory holding "
                                    f"{MANIFEST}, found none")
        return path
    config = request.getfixturevalue("parity_capture_config")
    from parity.api import dump_reference

    return dump_reference(tmp_path_factory.getbasetemp() / "parity-reference", config=config)


@pytest.fixture
def assert_parity(request, parity_reference, tmp_path):
    """`assert_parity(candidate="builtin", **options)`: `parity.assert_parity` against `parity_reference`."""
    import parity.api

    html_dir = request.config.getoption("parity_html")
    test = f"{Path(request.node.path).name}::{request.node.name}"
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", test).strip("_") or "parity"

    def check(candidate="builtin", **options):
        __tracebackhide__ = True  # the failure is the message, not parity's own frames
        options.setdefault("html", html_dir is not None)
        try:
            return parity.api.assert_parity(parity_reference, candidate, report_dir=Path(html_dir or tmp_path).resolve(),
                                            name=name, **options)
        except AssertionError as error:
            written = [line[len("report: "):] for line in str(error).splitlines() if line.startswith("report: ")]
            request.config.stash[_REPORTS_KEY].append((test, written))
            raise

    return check


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    reports = config.stash.get(_REPORTS_KEY, [])
    if not reports:
        return
    terminalreporter.section("parity reports")
    for nodeid, paths in reports:
        for path in paths:
            terminalreporter.write_line(f"{nodeid}: {path}")
