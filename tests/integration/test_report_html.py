"""The Snakemake HTML report carries the benchmark figures: render it, open it in Chromium.

A tiny workflow (written to a temp folder) computes real figures with
:mod:`cxrfoundry.eval.plots` from seeded data — ROC curves from a predictions table, subgroup
bars from a fairness audit, the summary table — declares them as ``report(...)`` outputs with
the project's captions (``report/*.rst``) and categories, runs, then builds
``snakemake --report report.html``. Headless Chromium (Debian ``chromium``; installed through
apt when missing and the test runs as root, else the test skips) loads the report; the test
checks the rendered DOM names every figure and category, that the report embeds the PNGs, and
that the screenshot is a real page (not blank).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from html import unescape as html_unescape
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration

SNAKEFILE = r"""
import numpy as np
import pyarrow as pa

from cxrfoundry import io as cio
from cxrfoundry.eval import fairness, plots


rule all:
    input:
        "plots/roc.png",
        "plots/fairness.png",
        "plots/summary.png",


rule predictions:
    output:
        "results/pred.parquet",
    run:
        rng = np.random.default_rng(0)
        y = rng.random((120, 2)) < 0.4
        s = y + rng.normal(0, 0.8, y.shape)
        cols = {"image_id": [f"i{i}" for i in range(120)]}
        for j, c in enumerate(["cardiomegaly", "pleural_effusion"]):
            cols[f"label.{c}"] = y[:, j].astype(np.int8)
            cols[f"valid.{c}"] = np.ones(120, bool)
            cols[f"score.{c}"] = s[:, j]
        cio.write_parquet(output[0], pa.table(cols))


rule roc:
    input:
        "results/pred.parquet",
    output:
        report(
            "plots/roc.png",
            caption="@REPO@/report/summary.rst",
            category="Classification",
            labels={"model": "demo", "figure": "ROC curves"},
        ),
    run:
        plots.roc_curves(input[0], output[0], title="demo")


rule fairness_bars:
    output:
        report(
            "plots/fairness.png",
            caption="@REPO@/report/summary.rst",
            category="Fairness",
            labels={"model": "demo", "figure": "subgroup bars"},
        ),
    run:
        rng = np.random.default_rng(1)
        n = 300
        sex = np.where(rng.random(n) < 0.5, "F", "M").astype(object)
        y = rng.random((n, 2)) < 0.4
        s = y + rng.normal(0, 1, y.shape) * np.where(sex == "F", 1.5, 0.5)[:, None]
        audit = fairness.subgroup_audit(s, y, np.arange(n), {"sex": sex}, n_boot=200)
        plots.fairness_bars(
            {"model": "demo", "dataset": "toy", "metric": "auroc_gap_sex",
              "subgroups": audit.rows},
            output[0],
        )


rule summary:
    output:
        report(
            "plots/summary.png",
            caption="@REPO@/report/summary.rst",
            category="Summary",
            labels={"figure": "benchmark table"},
        ),
    run:
        rows = [{"model": "demo", "task": "probe_linear", "dataset": "toy",
                  "metric": "auroc_macro", "value": 0.8, "ci_low": 0.7, "ci_high": 0.9,
                  "n": 120}]
        plots.table_figure(rows, output[0], title="summary")
"""

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
)


def chromium() -> str:
    """Path of a Chromium binary; installs Debian's ``chromium`` when root with apt, else skips."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("chromium is not installed and cannot be installed (not root or no apt)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if proc.returncode != 0:
            pytest.skip(f"{' '.join(cmd)} failed: {proc.stderr[-500:]}")
    found = shutil.which("chromium")
    if not found:
        pytest.skip("apt installed chromium but no chromium binary is on PATH")
    return found


def _snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--cores", "1", "--directory", str(workdir), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _browser(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


#: Injected into a copy of the report: opens the category named by the URL hash, clicks the
#: first result's "eye" (preview) button, then records what the page shows in <pre id=check>.
VIEWER_JS = """
<script>
(function () {
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  async function run() {
    await sleep(1500);
    const category = decodeURIComponent(location.hash.slice(1));
    const link = [...document.querySelectorAll("nav a")].find(
      (a) => a.textContent.trim() === category);
    const found = { menu: !!link, eye: false, images: [] };
    if (link) {
      link.click();
      await sleep(800);
      found.rows = [...document.querySelectorAll("nav tbody tr")].map((r) => r.textContent);
      const eye = document.querySelector('a[iconname="eye"]');
      found.eye = !!eye;
      if (eye) { eye.click(); await sleep(1500); }
      found.images = [...document.querySelectorAll("#app img")]
        .filter((i) => i.src.startsWith("data:image/png"))
        .map((i) => [i.naturalWidth, i.naturalHeight]);
    }
    const out = document.createElement("pre");
    out.id = "check";
    out.textContent = JSON.stringify(found);
    document.body.appendChild(out);
  }
  run();
})();
</script>
"""


def _viewer(report: Path) -> Path:
    html = report.read_text(encoding="utf-8")
    end = html.rfind("</body>")  # the last one: the report's scripts contain the string too
    assert end > 0, f"{report}: no </body>"
    viewer = report.with_name("viewer.html")
    viewer.write_text(html[:end] + VIEWER_JS + html[end:], encoding="utf-8")
    return viewer


FIGURES = {  # category -> (figure label, PNG under plots/)
    "Classification": ("ROC curves", "roc.png"),
    "Fairness": ("subgroup bars", "fairness.png"),
    "Summary": ("benchmark table", "summary.png"),
}


def test_report_html_shows_the_plots(tmp_path) -> None:
    binary = chromium()
    work = tmp_path / "wf"
    work.mkdir()
    (work / "Snakefile").write_text(SNAKEFILE.replace("@REPO@", str(REPO)))
    _snakemake(work, "--snakefile", str(work / "Snakefile"))
    report = work / "report.html"
    _snakemake(work, "--snakefile", str(work / "Snakefile"), "--report", str(report))
    html = report.read_text(encoding="utf-8", errors="replace")
    for _, name in FIGURES.values():
        png = (work / "plots" / name).read_bytes()
        assert len(png) > 2000
        assert base64.b64encode(png[:300]).decode()[:200] in html, f"{name} is not embedded"

    # The landing page renders the result categories in its menu.
    dom = _browser(binary, tmp_path / "p0", "--virtual-time-budget=10000", "--dump-dom",
                   report.as_uri())  # fmt: skip
    assert dom.returncode == 0, dom.stderr[-2000:]
    app = dom.stdout[dom.stdout.find('<div id="app">') :]
    for category in FIGURES:
        assert f"<span>{category}</span>" in app, f"category {category!r} not rendered"

    # Each category lists its figure and shows it as an embedded PNG of the right size.
    viewer = _viewer(report)
    for k, (category, (label, name)) in enumerate(FIGURES.items()):
        url = f"{viewer.as_uri()}#{category}"
        dom = _browser(binary, tmp_path / f"p{k + 1}", "--virtual-time-budget=15000",
                       "--dump-dom", url)  # fmt: skip
        match = re.search(r'<pre id="check">([^<]*)</pre>', dom.stdout)
        assert match, f"{category}: the check script did not run ({dom.stderr[-1000:]})"
        found = json.loads(html_unescape(match.group(1)))
        assert found["menu"] and found["eye"], found
        assert any(label in row for row in found["rows"]), found
        width, height = Image.open(work / "plots" / name).size
        assert [width, height] in found["images"], (category, found)

    # A screenshot of the ROC figure in the report: a real page, not a blank one.
    shot = tmp_path / "shot.png"
    proc = _browser(binary, tmp_path / "p9", "--virtual-time-budget=15000",
                    "--window-size=1280,900", f"--screenshot={shot}",
                    f"{viewer.as_uri()}#Classification")  # fmt: skip
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 900)
    colours = image.getcolors(maxcolors=1 << 18)
    assert colours is None or len(colours) > 50, "the screenshot is (nearly) blank"
    # The ROC curves are drawn in matplotlib's first colour (#1f77b4): it must be on screen.
    pixels = np.asarray(image).reshape(-1, 3).astype(int)
    blue = np.abs(pixels - [0x1F, 0x77, 0xB4]).sum(axis=1) < 40
    assert blue.sum() > 200, "no ROC curve visible in the screenshot"
