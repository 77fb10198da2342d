"""The dashboard as a person sees it: headless Chromium opens /dashboard on a real server
under load; the bins, charts, numbers and running table must render with live values, the
console must stay clean (a CSP violation or a script error shows up there), and the page is
saved to docs/dashboard.png.

Skips, saying why, only when Chromium, chromedriver or selenium is missing; run
tests/dashboard/install-browser.sh (and `pip install -e '.[dev]'`) to get them.
"""

from __future__ import annotations

import base64
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "dashboard.png"
HISTORY_BEFORE_SCREENSHOT_S = 30.0  # load time behind the charts in the screenshot
WIDTH = 1440

# Everything the test reads from the page, in one round trip.
PROBE = """
const q = (s) => document.querySelectorAll(s);
const painted = (c) => {
  if (!c.width || !c.height) return 0;
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let n = 0;
  for (let i = 3; i < d.length; i += 4) if (d[i]) n++;
  return n;
};
return {
  steps: q('#bins .step').length,
  rows: q('#bins .bin-row').length,
  segs: q('#bins .seg').length,
  pads: q('#bins .pad').length,
  packedMulti: [...q('#bins .packed .bin-row')].some((r) => r.querySelectorAll('.seg').length > 1),
  tps: document.getElementById('kpi-tps').textContent,
  running: document.getElementById('kpi-running').textContent,
  ttft: document.getElementById('kpi-ttft-p50').textContent,
  fill: document.getElementById('kpi-fill').textContent,
  chartPoints: [...q('canvas')].map((c) => Number(c.dataset.points || 0)),
  chartPixels: [...q('canvas')].map(painted),
  tableRows: q('#running-body tr.req').length,
  status: document.getElementById('status').dataset.state,
  height: Math.ceil(document.body.getBoundingClientRect().bottom),
};
"""


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").strip())
    except ValueError:
        return None


def _find(*names: str) -> str | None:
    for name in names:
        found = shutil.which(name) or (name if Path(name).is_file() else None)
        if found:
            return found
    return None


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """Headless Chromium through chromedriver, both from the system (no downloads)."""
    chromium = _find("chromium", "chromium-browser", "/usr/bin/chromium")
    driver_path = _find("chromedriver", "/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip(
            "Chromium/chromedriver not installed (run tests/dashboard/install-browser.sh; "
            f"found chromium={chromium}, chromedriver={driver_path})"
        )
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium not installed (pip install -e '.[dev]')")

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-extensions",
        "--no-first-run",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        f"--window-size={WIDTH},1000",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    try:
        driver.set_page_load_timeout(30)
        driver.set_script_timeout(10)
        yield driver
    finally:
        driver.quit()  # ends chromedriver and the browser it started


def test_dashboard_renders_live(dash_server, load, wait_for, browser) -> None:
    started = time.monotonic()
    browser.get(dash_server.url + "/dashboard")
    assert browser.title.startswith("packserve")

    def live() -> dict | None:
        p = browser.execute_script(PROBE)
        tps = _number(p["tps"])
        ok = (
            p["steps"] >= 1
            and p["rows"] >= p["steps"]
            and p["segs"] >= p["rows"]
            and p["pads"] > 0  # padded batching pads every shorter prompt
            and p["packedMulti"]  # some packed row holds several prompts
            and tps is not None
            and tps > 0
            and p["ttft"] not in ("–", "")
            and all(n > 0 for n in p["chartPoints"])
            and all(n > 0 for n in p["chartPixels"])
            and p["tableRows"] > 0
            and p["status"] in ("live", "idle")
        )
        return p if ok else None

    probe = wait_for(live, 60, "the page to show bins, charts, tokens/s and running requests", 0.5)
    assert len(probe["chartPoints"]) == 4
    assert _number(probe["running"]) is not None and probe["fill"].endswith("%")

    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe

    # Let the charts gather some history under load, then photograph the whole page at a
    # moment when requests are running (the load comes in waves, with gaps between them).
    time.sleep(max(0.0, HISTORY_BEFORE_SCREENSHOT_S - (time.monotonic() - started)))
    browser.set_window_size(WIDTH, 2400)  # taller than the page: nothing below the fold
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(20):
        wait_for(live, 20, "the page to still be live before the screenshot", 0.1)
        height = _screenshot(browser, SCREENSHOT)
        after = browser.execute_script(PROBE)
        if after["tableRows"] > 0 and after["height"] == height:  # no redraw during the shot
            break
    assert SCREENSHOT.stat().st_size > 20_000
    assert not load.errors, load.errors[:3]


def _screenshot(browser: Any, png: Path) -> int:
    """The whole page, cut at its own height (Chrome DevTools' capture, clipped)."""
    height = browser.execute_script(PROBE)["height"]
    clip = {"x": 0, "y": 0, "width": WIDTH, "height": height, "scale": 1}
    shot = browser.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "clip": clip})
    png.write_bytes(base64.b64decode(shot["data"]))
    return height
