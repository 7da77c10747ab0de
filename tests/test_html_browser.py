"""The ``--html`` page of a real run, loaded from disk in a real headless browser with the network off.

Runs the bundled example for real (local backend, two cells, traced), then opens the page in
Debian's ``chromium``: the figures must be in the DOM, the screenshot must show something, and
the browser's console must stay silent. A proxy that points nowhere disables the network, and
the page is checked to name no external resource, so it cannot have needed one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import REPO
from .test_report_html import external_refs

pytestmark = pytest.mark.browser

NO_NETWORK = ["--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>"]  # port 9: discard, nothing listens


def browse(chromium: str, page: Path, profile: Path, *flags: str) -> subprocess.CompletedProcess:
    """One headless chromium run on ``file://page`` (no sandbox: CI runs as root; no GPU: none there)."""
    cmd = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           "--hide-scrollbars", f"--user-data-dir={profile}", *NO_NETWORK, "--enable-logging=stderr", "--v=0", *flags,
           page.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "HOME": str(profile)})


def console_lines(stderr: str) -> list[str]:
    """What the page wrote to the browser's console (chromium logs each call as ``...CONSOLE...``)."""
    return [ln for ln in stderr.splitlines() if "CONSOLE" in ln]


def test_the_report_of_a_real_run_renders_offline_in_chromium(chromium: str, example: Path, tmp_path: Path) -> None:
    page, out = tmp_path / "report.html", tmp_path / "out"
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "harness", "matrix", str(example), "--backend", "local",
                          "--threads", "1,2", "--determinism", "strict", "--trace", "--no-progress",
                          "-o", str(out), "--html", str(page)],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    t_run = time.perf_counter() - t0
    html = page.read_text(encoding="utf-8")
    assert external_refs(html) == [] and "<script" not in html.lower()
    assert (out / "cpu-strict-t1" / "record.json").is_file()  # the page is beside the records, not instead

    t1 = time.perf_counter()
    dom = browse(chromium, page, tmp_path / "profile", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count("<svg") == 3, "loss curves, deltas and attribution are drawn"
    assert dom.stdout.count("<path") > 20  # the figures hold their lines, not empty frames
    assert "cpu-strict-t2" in dom.stdout and "reproduced" in dom.stdout
    assert console_lines(dom.stderr) == []

    shot = tmp_path / "shot.png"
    snap = browse(chromium, page, tmp_path / "profile", "--window-size=1200,2000", f"--screenshot={shot}")
    assert snap.returncode == 0 and shot.is_file(), snap.stderr[-2000:]
    assert console_lines(snap.stderr) == []
    t_browser = time.perf_counter() - t1

    from PIL import Image, ImageStat

    with Image.open(shot) as im:
        rgb = im.convert("RGB")
        colours = rgb.getcolors(maxcolors=1 << 20) or []
        spread = ImageStat.Stat(rgb.convert("L")).stddev[0]
        # the figures' area (below the tables) is not blank either
        lower = ImageStat.Stat(rgb.crop((0, rgb.height // 3, rgb.width, rgb.height)).convert("L")).stddev[0]
    assert len(colours) > 50 and spread > 10 and lower > 5, (len(colours), spread, lower)
    print(f"page {len(html.encode()) / 1024:.0f} KiB; run {t_run:.1f}s; browser {t_browser:.1f}s")


def test_the_console_check_sees_a_page_that_logs_an_error(chromium: str, tmp_path: Path) -> None:
    # Without this, a chromium that stopped logging the console would pass the test above silently.
    probe = tmp_path / "probe.html"
    probe.write_text('<!DOCTYPE html><html><body><p>x</p><script>console.error("harness-probe")</script></body></html>')
    got = browse(chromium, probe, tmp_path / "profile", "--dump-dom")
    assert any("harness-probe" in ln for ln in console_lines(got.stderr)), got.stderr[-2000:]
