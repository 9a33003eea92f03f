"""The explanation report as a reader sees it: rendered by headless Chromium.

Skipped where no Chromium is installed (Debian: ``apt install chromium``). The page is loaded
with a small script appended to a copy of it, which records in the DOM whether every image
decoded and whether anything sticks out to the right of the window; the dumped DOM is then
read back. A screenshot is written next to it for people to look at.
"""

from __future__ import annotations

import html
import json
import shutil
import subprocess

import pytest
import torch

from stylex.explain import AttFind, sufficiency, write_report
from test_explain import planted, planted_result  # noqa: F401 (module fixtures)

BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no Chromium installed (Debian: apt install chromium)")

CHECK = """
<script>
window.addEventListener('load', () => {
  const images = [...document.images];
  const broken = images.filter(i => !(i.complete && i.naturalWidth > 0)).length;
  const width = document.documentElement.clientWidth;
  const wide = [...document.body.querySelectorAll('*')].filter(e => e.getBoundingClientRect().right > width + 1);
  document.body.setAttribute('data-check', JSON.stringify({
    images: images.length, broken, width, scroll: document.documentElement.scrollWidth,
    wide: wide.map(e => e.tagName)}));
});
</script>
"""


def _chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--window-size=1280,900", "--virtual-time-budget=10000", *args],
                          capture_output=True, text=True, timeout=120)


def _check_of(page: str, tmp_path) -> dict:
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", CHECK + "</body>"))
    done = _chromium("--dump-dom", probe.as_uri())
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert 'data-check="' in out, "the check script did not run"
    raw = out[out.index('data-check="') + len('data-check="'):]
    return json.loads(html.unescape(raw[: raw.index('"')]))


def test_report_renders_in_a_browser_with_every_image_and_no_overflow(planted, planted_result, tmp_path):
    finder = AttFind(planted.G, planted.C)
    suff = sufficiency(planted_result, finder.evaluator, ks=[1, 2])
    torch.manual_seed(0)
    real = torch.rand(planted_result.num_images, 3, planted.G.resolution, planted.G.resolution) * 2 - 1
    rep = write_report(tmp_path / "report", planted_result, finder.evaluator, ["pale", "red"], examples=4,
                       sufficiency=suff, inputs=real, image_panels=[0, 1],
                       sections={"run": {"classifier_val_acc": 0.9, "recon_l1": 0.1}})
    page = rep.html.read_text()
    check = _check_of(page, tmp_path)
    expected = page.count("<img ")
    assert check["images"] == expected > 10
    assert check["broken"] == 0, f"{check['broken']} of {check['images']} images did not load"
    assert check["scroll"] <= check["width"] and not check["wide"], f"content overflows the window: {check}"

    shot = tmp_path / "report.png"
    done = _chromium(f"--screenshot={shot}", rep.html.as_uri())
    assert done.returncode == 0 and shot.is_file() and shot.stat().st_size > 10_000


def test_the_browser_check_sees_broken_images_and_overflow(tmp_path):
    # The probe itself must notice what it is there to notice.
    check = _check_of("<html><body><img src='missing.png'><div style='width:3000px'>x</div></body></html>", tmp_path)
    assert check["images"] == 1 and check["broken"] == 1
    assert check["scroll"] > check["width"] and "DIV" in check["wide"]
