"""The Snakemake HTML report of the real workflow carries the benchmark figures: render it, open
it in Chromium.

``snakemake --report`` builds the report of a copy of the mini run (config/mini.yaml: DINO,
CLIP and the benchmarks stage, every figure computed from that run's data). Headless Chromium
(Debian ``chromium``; installed through apt when missing and the test runs as root, else the test
skips) loads it; the test checks that the rendered menu names every result category, that each
figure is listed under its category and, once opened, shown as an embedded PNG of the file's
size, that the report embeds the PNG bytes, and that a screenshot of the ROC figure is a real
page with the curves on it. :func:`check_report` is reused by the benchmarks workflow test for
the synthetic-data figures.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from html import unescape as html_unescape
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image

from tests.conftest import copy_run, snakemake

pytestmark = pytest.mark.integration

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


def _browser(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


#: Injected into a copy of the report: opens the category (and subcategory) named by the URL
#: hash, finds the result row carrying the label, clicks its "eye" (preview) button, then records
#: what the page shows in <pre id=check>.
VIEWER_JS = """
<script>
(function () {
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const click = async (text) => {
    const link = [...document.querySelectorAll("nav a")].find(
      (a) => a.textContent.trim() === text);
    if (link) { link.click(); await sleep(800); }
    return !!link;
  };
  async function run() {
    await sleep(1500);
    const want = JSON.parse(decodeURIComponent(location.hash.slice(1)));
    const found = { menu: await click(want.category), eye: false, images: [] };
    if (want.subcategory) { found.subcategory = await click(want.subcategory); }
    const rows = [...document.querySelectorAll("nav tbody tr")];
    found.rows = rows.map((r) => r.textContent);
    const row = rows.find((r) => r.textContent.includes(want.label));
    const eye = row && row.querySelector('a[iconname="eye"]');
    found.eye = !!eye;
    if (eye) { eye.click(); await sleep(1500); }
    found.images = [...document.querySelectorAll("#app img")]
      .filter((i) => i.src.startsWith("data:image/png"))
      .map((i) => [i.naturalWidth, i.naturalHeight]);
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


#: (category, subcategory or None, figure label, PNG under results/plots/) of the mini run.
FIGURES = (
    ("Classification", None, "ROC curves", "dino/roc_linear.demo.png"),
    ("Fairness", None, "subgroup bars", "dino/fairness.demo.png"),
    ("Data", "demo", "real vs synthetic samples", "samples.demo.png"),
    ("Data", "CLIP curation", "curation statistics", "clip/curation.png"),
    ("Summary", None, "all benchmarks", "summary.png"),
    ("Summary", None, "ablations", "ablation.png"),
)


def check_report(
    workdir: Path,
    figures: tuple[tuple[str, str | None, str, str], ...],
    tmp_path: Path,
    config: str = "config/mini.yaml",
) -> Path:
    """Build ``workdir``'s report; assert Chromium shows each figure under its category."""
    binary = chromium()
    report = workdir / "report.html"
    snakemake(workdir, "--report", str(report), config=config)
    html = report.read_text(encoding="utf-8", errors="replace")
    for *_, name in figures:
        png = (workdir / "results/plots" / name).read_bytes()
        assert len(png) > 2000
        assert base64.b64encode(png[:300]).decode()[:200] in html, f"{name} is not embedded"

    # The landing page renders every result category in its menu.
    dom = _browser(binary, tmp_path / "p0", "--virtual-time-budget=10000", "--dump-dom",
                   report.as_uri())  # fmt: skip
    assert dom.returncode == 0, dom.stderr[-2000:]
    app = dom.stdout[dom.stdout.find('<div id="app">') :]
    for category in {f[0] for f in figures}:
        assert f"<span>{category}</span>" in app, f"category {category!r} not rendered"

    # Each figure is listed under its category and opens as an embedded PNG of its size.
    viewer = _viewer(report)
    for k, (category, subcategory, label, name) in enumerate(figures):
        want = {"category": category, "subcategory": subcategory, "label": label}
        url = f"{viewer.as_uri()}#{quote(json.dumps(want))}"
        dom = _browser(binary, tmp_path / f"p{k + 1}", "--virtual-time-budget=15000",
                       "--dump-dom", url)  # fmt: skip
        match = re.search(r'<pre id="check">([^<]*)</pre>', dom.stdout)
        assert match, f"{category}: the check script did not run ({dom.stderr[-1000:]})"
        found = json.loads(html_unescape(match.group(1)))
        assert found["menu"] and found["eye"], (want, found)
        width, height = Image.open(workdir / "results/plots" / name).size
        assert [width, height] in found["images"], (want, found)
    return viewer


def test_report_html_shows_the_plots(mini_run, tmp_path) -> None:
    work = copy_run(mini_run, tmp_path / "run")
    viewer = check_report(work, FIGURES, tmp_path)

    # A screenshot of the ROC figure in the report: a real page, not a blank one.
    binary = chromium()
    shot = tmp_path / "shot.png"
    want = quote(json.dumps({"category": "Classification", "label": "ROC curves"}))
    proc = _browser(binary, tmp_path / "p9", "--virtual-time-budget=15000",
                    "--window-size=1280,900", f"--screenshot={shot}",
                    f"{viewer.as_uri()}#{want}")  # fmt: skip
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 900)
    colours = image.getcolors(maxcolors=1 << 18)
    assert colours is None or len(colours) > 50, "the screenshot is (nearly) blank"
    # The ROC curves are drawn in matplotlib's first colour (#1f77b4): it must be on screen.
    pixels = np.asarray(image).reshape(-1, 3).astype(int)
    blue = np.abs(pixels - [0x1F, 0x77, 0xB4]).sum(axis=1) < 40
    assert blue.sum() > 200, "no ROC curve visible in the screenshot"
