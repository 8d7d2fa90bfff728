"""The HTML report (`parity compare --html`): one self-contained file, rendered in a real headless Chromium.

Without a browser the rendering test skips and says why (`.ci/run` installs Debian's `chromium` when missing).
The screenshots are kept under runs/screenshots/ for a person to look at.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import parity
from parity.cli.main import main

# The HTML report: plotly inlined into each file, a headless browser for two of them (several seconds in all,
# most of it one report fixture); make test-fast skips the module, make test runs it.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "runs" / "screenshots"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
RED, GREEN = (0xC6, 0x28, 0x28), (0x2E, 0x7D, 0x32)  # the verdict header's colours


@functools.lru_cache(maxsize=1)
def browser() -> str | None:
    """The first installed browser that really starts headless (a snap stub or a broken install does not)."""
    for path in filter(None, map(shutil.which, BROWSERS)):
        try:
            probe = subprocess.run([path, "--headless=new", "--no-sandbox", "--disable-gpu", "--dump-dom",
                                    "about:blank"], capture_output=True, text=True, timeout=90, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0 and "<html" in probe.stdout:
            return path
    return None


def headless(html: Path, *args: str) -> subprocess.CompletedProcess:
    command = [browser(), "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
               "--disable-extensions", "--window-size=1400,2800", "--virtual-time-budget=10000", *args,
               html.resolve().as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)


@pytest.fixture(scope="module")
def reports(tmp_path_factory, fixtures_dir) -> dict[str, Path]:
    """A clean report and one with a layer bug planted, both written by the CLI."""
    out = tmp_path_factory.mktemp("html")
    reference = str(fixtures_dir / "yolo11-narrow-nc80-96")
    assert main(["--no-progress", "compare", "--reference", reference, "--html", str(out / "clean.html")]) == 0
    assert main(["--no-progress", "compare", "--reference", reference, "--inject", "bn-eps",
                 "--html", str(out / "bn-eps.html")]) == 1
    return {"clean": out / "clean.html", "bn-eps": out / "bn-eps.html"}


def test_the_file_is_self_contained(reports):
    text = reports["bn-eps"].read_text()
    assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)\s*=", text, re.I), "nothing is loaded from outside"
    assert "Plotly.newPlot" in text and len(text) > 1_000_000, "plotly.js is inlined"
    assert '<h1>DIVERGENCE</h1>' in text and "bn-eps" in text and "layer-divergence" in text
    assert "Loss stages by case" in text and "Environment" in text and "ultralytics 8.4.190" in text


def test_the_drill_down_carries_the_worst_element_and_a_histogram(fixtures_dir):
    from parity.report.html import _drill_entry

    report = parity.compare(fixtures_dir / "yolo11-narrow-nc80-96", what="layers", inject="bn-eps", histograms=True)
    row = next(r for r in report.rows if r.section == "isolated" and not r.passed)
    histogram = row.metrics["histogram"]
    assert sum(histogram["counts"]) + histogram["zero"] + histogram["nonfinite"] == row.metrics["numel"]
    assert 10 ** histogram["log10_edges"][-1] >= row.metrics["max_abs"] > 10 ** histogram["log10_edges"][0]
    entry = _drill_entry(report.rows.index(row), row)
    assert f"worst element {row.metrics['worst_index']}" in entry["html"]
    assert entry["histogram"]["data"][0]["type"] == "bar"
    clean = parity.compare(fixtures_dir / "yolo11-narrow-nc80-96", what="layers")
    assert all("histogram" not in (r.metrics or {}) for r in clean.rows), "histograms only when asked for"


@pytest.mark.skipif(browser() is None, reason="no headless browser that starts (chromium, google-chrome) on "
                                              "this machine: `apt-get install chromium`; .ci/run installs it")
@pytest.mark.parametrize("name, verdict, colour", [("clean", "PARITY", GREEN), ("bn-eps", "DIVERGENCE", RED)])
def test_it_renders_in_headless_chromium(reports, name, verdict, colour):
    from PIL import Image

    dom = headless(reports[name], "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = dom.stdout
    assert 'data-rendered="yes"' in page, "the report's script ran to the end"
    growth = page[page.index('id="growth"'):page.index("Loss stages by case")]
    assert "main-svg" in growth and "scatterlayer" in growth, "plotly drew the error-growth chart"
    assert re.search(r'<h1>\s*' + verdict + r'\s*</h1>', page)
    if name == "bn-eps":
        drill = page[page.index('id="drill"'):]
        assert 'id="drill-hist"' in drill and "main-svg" in drill, "the first failing tensor's histogram is drawn"
        assert "worst element" in drill
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shot = SCREENSHOTS / f"report-{name}.png"
    taken = headless(reports[name], f"--screenshot={shot}")
    assert taken.returncode == 0 and shot.exists(), taken.stderr[-2000:]
    with Image.open(shot) as image:
        assert image.size == (1400, 2800)
        assert image.convert("RGB").getpixel((20, 20)) == colour, "the verdict header is at the top, coloured"
