"""The ``--html`` page of a real run, loaded from disk in a real headless browser with the network off.

Runs the bundled example for real (local backend, two cells, traced), then opens the page in
Debian's ``chromium``: the figures must be in the DOM, the screenshot must show something, and
the browser's console must stay silent. A proxy that points nowhere disables the network, and
the page is checked to name no external resource, so it cannot have needed one.
"""

from __future__ import annotations

import functools
import json
import os
import re
import struct
import subprocess
import sys
import time
from html import unescape
from pathlib import Path

import pytest

from tests.conftest import REPO, patience
from tests.unit.test_report_html import external_refs

pytestmark = pytest.mark.browser

NO_NETWORK = ["--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>"]  # port 9: discard, nothing listens


def browse(chromium: str, page: Path, profile: Path, *flags: str) -> subprocess.CompletedProcess:
    """One headless chromium run on ``file://page`` (no sandbox: CI runs as root; no GPU: none there)."""
    cmd = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           "--hide-scrollbars", f"--user-data-dir={profile}", *NO_NETWORK, "--enable-logging=stderr", "--v=0", *flags,
           page.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=patience(180),
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
                         capture_output=True, text=True, timeout=patience(600), cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert f"report: {page}" in run.stderr.splitlines()  # where the page is, to click or copy
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


# --------------------------------------------------------------------------- the page at 1280 px

WIDTH = 1280
# Run in a copy of the page (the page itself has no script): what a reader at WIDTH px would see, written into the
# document as JSON, before and after every row's disclosure is opened.
MEASURE = """
(function () {
  const d = document.documentElement, out = [];
  function box(e) { const r = e.getBoundingClientRect(); return [Math.round(r.left), Math.round(r.right)]; }
  function measure(state) {
    const over = [];
    document.querySelectorAll("body *").forEach(function (e) {
      if (e.getBoundingClientRect().right > d.clientWidth + 0.5)
        over.push(e.tagName + " " + (e.textContent || "").replace(/\\s+/g, " ").slice(0, 60));
    });
    const tables = [], rows = [];
    document.querySelectorAll("table").forEach(function (t) {
      tables.push({right: box(t)[1], scroll: t.parentElement.scrollWidth - t.parentElement.clientWidth});
      const heads = Array.from(t.querySelectorAll("thead th")).map(function (h) { return h.textContent.trim(); });
      const v = heads.indexOf("verdict"), ev = heads.indexOf("evidence");
      if (v < 0) return;
      t.querySelectorAll("tbody tr").forEach(function (tr) {
        rows.push({verdict: box(tr.cells[v]), evidence: ev < 0 ? null : box(tr.cells[ev]),
                   text: tr.cells[v].textContent.trim()});
      });
    });
    out.push({state: state, viewport: d.clientWidth, scrollWidth: d.scrollWidth, over: over.slice(0, 20),
              tables: tables, rows: rows});
  }
  measure("closed");
  document.querySelectorAll("details").forEach(function (x) { x.open = true; });
  measure("open");
  const pre = document.createElement("pre");
  pre.id = "measured";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
})();
"""


def wide_matrix_page() -> tuple[str, int]:
    """A docker matrix as a page: 16 traced cells with long names, a digest-like one, a failed one, a seed band,
    where each cell parts and why. Returns the page and its number of Results rows."""
    from harness.diverge import parts_at_column
    from harness.judge import Tolerances, compare
    from harness.record import ImageInfo, Status
    from harness.report_html import RunPage, run_page

    from tests.records import record, seed_band, with_env
    from tests.unit.test_report_html import _trace

    names = [f"{cu}-{torch}-{'cpu' if cu == 'cpu' else 'cuda'}-{mode}" for cu in ("cpu", "cu126", "cu128", "cu130")
             for torch in ("torch2.12", "torch2.14") for mode in ("strict-tdef-baseline", "default-t4-native-avx512")]
    names[-1] = "cell_" + "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"  # no break in 69 chars
    base = [1.0 / (1 + i / 10) for i in range(120)]
    records, traces, causes = [], {}, {}
    for i, name in enumerate(names):
        gpu = not name.startswith("cpu")
        rec = with_env(record(name, r2=0.9 + (i % 3) * 1e-3, loss=0.1 + i * 1e-5, sha=f"{i:064x}"),
                       "2.14.1+cu130" if gpu else "2.14.1+cpu", "13.0" if gpu else None)
        rec.backend = "docker"
        rec.image = ImageInfo(id="sha256:" + "ab" * 32, tag=f"harness:{name[:15]}-af6da31a97f9")
        rec.trace = {"file": "trace.jsonl", "steps": len(base)}
        rec.determinism["matmul_allow_tf32"] = gpu
        records.append(rec)
        traces[name] = _trace([v * (1 + (i % 3) * 1e-7 * (k > 50)) for k, v in enumerate(base)])
        causes[name] = "nondeterministic reduction" if i % 3 else "—"
    parts = parts_at_column(traces, names)
    parts[names[5]] = "refused: trace.jsonl is a symbolic link; a trace is never read through a link"
    broken = record("cu130-torch2.14-cuda-strict-tdef-broken", status=Status.FAILED,
                    message="CUDA error: an illegal memory access was encountered")
    records = seed_band([0.9, 0.901, 0.899, 0.9005, 0.8995]) + records + [broken]
    page = run_page(RunPage(command="matrix", records=records, comparison=compare(records, Tolerances()),
                            bundle="optuna_best", traces=traces, parts_at=parts, causes=causes))
    return page, len(names) + 1


@functools.cache
def wide_matrix_html() -> tuple[str, int]:
    return wide_matrix_page()


def assert_fits(chromium: str, html: str, n_rows: int, width: int, tmp_path: Path) -> None:
    """Load ``html`` in a ``width`` px window; in every Results row the verdict and its evidence lie inside the
    window, no table scrolls sideways and nothing is drawn past the right edge, disclosures closed or open."""
    probe = tmp_path / f"measured-{width}.html"
    probe.write_text(html.replace("</body>", f"<script>{MEASURE}</script></body>"), encoding="utf-8")
    dom = browse(chromium, probe, tmp_path / "profile", f"--window-size={width},1600", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    found = re.search(r'<pre id="measured">(.*?)</pre>', dom.stdout, re.S)
    assert found, dom.stdout[-2000:]
    for m in json.loads(unescape(found.group(1))):
        what = f"{width} px, {m['state']} disclosures"
        assert m["viewport"] == width, m["viewport"]  # the window is what the test says it is
        assert len(m["rows"]) == n_rows and {"failed", "same distribution"} <= {r["text"] for r in m["rows"]}
        for r in m["rows"]:  # the verdict and its evidence, in every row, without scrolling sideways
            assert 0 <= r["verdict"][0] and r["verdict"][1] <= width, (what, r)
            assert r["evidence"] is not None and 0 <= r["evidence"][0] and r["evidence"][1] <= width, (what, r)
        assert m["scrollWidth"] <= width, (what, m["scrollWidth"], m["over"])
        assert all(t["right"] <= width and t["scroll"] <= 0 for t in m["tables"]), (what, m["tables"])
        assert m["over"] == [], (what, m["over"])  # nothing drawn past the right edge, clipped or not
    assert console_lines(dom.stderr) == []


def test_a_wide_matrix_fits_a_1280_px_window_with_every_verdict_in_view(chromium: str, tmp_path: Path) -> None:
    html, n_rows = wide_matrix_html()
    assert_fits(chromium, html, n_rows, WIDTH, tmp_path)

    page = tmp_path / "report.html"
    page.write_text(html, encoding="utf-8")
    shot = tmp_path / "report-1280.png"
    snap = browse(chromium, page, tmp_path / "profile", f"--window-size={WIDTH},2400", f"--screenshot={shot}")
    assert snap.returncode == 0 and shot.is_file(), snap.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (WIDTH, 2400)
    from PIL import Image

    with Image.open(shot) as im:
        im.verify()  # a whole, readable PNG, not only its header


def test_a_narrow_window_stacks_the_rows_and_scrolls_nothing_sideways(chromium: str, tmp_path: Path) -> None:
    html, n_rows = wide_matrix_html()
    assert_fits(chromium, html, n_rows, 600, tmp_path)  # a phone-sized window: each row one block
