"""The static HTML report: self-contained (no external assets), and rendered by a real headless
browser with its tables and plot images in place.

The browser test needs Chromium (Debian: ``apt-get install -y chromium``; or set
``PEFTBENCH_CHROMIUM`` to a Chromium/Chrome binary); without one it is skipped with that reason.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from test_leaderboard import REFERENCE, VTAB, add_record, make_vtab_store

from peftbench.results.write import write_leaderboard

BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-extensions", "--hide-scrollbars", "--mute-audio"]


def find_chromium() -> str | None:
    env = os.environ.get("PEFTBENCH_CHROMIUM")
    if env:
        return env if Path(env).exists() else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


class Dom(HTMLParser):
    """Tables (id -> number of body rows) and images (attributes) of a page."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, int] = {}
        self.images: list[dict] = []
        self.body: dict = {}
        self.links: list[str] = []
        self._table: str | None = None
        self._in_body = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._table = a.get("id", "")
            self.tables[self._table] = 0
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._table is not None and self._in_body:
            self.tables[self._table] += 1
        elif tag == "img":
            self.images.append(a)
        elif tag == "body":
            self.body = a
        for k in ("src", "href"):
            if k in a:
                self.links.append(a[k])

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        elif tag == "tbody":
            self._in_body = False


def parse(html: str) -> Dom:
    d = Dom()
    d.feed(html)
    return d


def reported_rows() -> int:
    import csv

    with open(REFERENCE / "vtab-top1.csv", newline="") as fh:
        return sum(1 for _ in csv.DictReader(fh))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("html")
    runs = make_vtab_store(root / "runs")
    (runs / "vpt-deep" / "dtd" / "0123456789abcdef.json").write_text("{ not json")  # a corrupt file
    add_record(runs, config="vpt-deep", task="dtd", seed=7, status="failed", error="Traceback\nValueError: x<y & z")
    out = root / "out"
    write_leaderboard(runs, out, "vtab", reference_dir=REFERENCE, warn=lambda msg: None)
    return out / "vtab-report.html"


def test_report_is_self_contained(report):
    html = report.read_text(encoding="utf-8")
    dom = parse(html)
    assert {"leaderboard-table", "task-table", "vs-reported-table", "sources-table", "problems-table",
            "skipped-table"} <= set(dom.tables)
    n = 4 + reported_rows()  # 4 reproduced configurations + every reported row of the reference CSV
    assert dom.tables["leaderboard-table"] == n
    assert dom.tables["task-table"] == n
    assert dom.tables["problems-table"] == 4  # failed, diverged, running (linear) + the failed vpt-deep run
    assert dom.tables["skipped-table"] == 1
    assert len(dom.images) == 2
    assert all(img["src"].startswith("data:image/svg+xml;base64,") for img in dom.images)
    # no external assets: every src/href is a data URI or an in-page anchor
    assert all(link.startswith(("data:", "#")) for link in dom.links), [link[:60] for link in dom.links]
    assert not re.search(r"<link\b|@import|url\(\s*['\"]?https?:", html)
    assert "ValueError: x&lt;y &amp; z" in html  # error text is escaped
    assert "0123456789abcdef.json" in html


def test_report_renders_in_headless_chromium(report, tmp_path):
    browser = find_chromium()
    if browser is None:
        if os.environ.get("PEFTBENCH_REQUIRE_CHROMIUM") == "1":  # CI installs it: absence is a failure there
            pytest.fail("PEFTBENCH_REQUIRE_CHROMIUM=1 but no Chromium was found")
        pytest.skip("no Chromium found (Debian: apt-get install -y chromium; or set PEFTBENCH_CHROMIUM)")
    flags = [browser, *BROWSER_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000"]
    url = report.resolve().as_uri()
    res = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    dom = parse(res.stdout)
    assert dom.body.get("data-loaded") == "yes", "the page's load handler did not run"
    n = 4 + reported_rows()
    assert dom.tables.get("leaderboard-table") == n and dom.tables.get("task-table") == n
    assert "vs-reported-table" in dom.tables and "problems-table" in dom.tables
    assert [img.get("data-rendered") for img in dom.images] == ["yes", "yes"], "a plot image did not decode"
    for cfg in ("vpt-deep", "bitfit", "E^2VPT", "LoRA (NOAH)"):
        assert f">{cfg}<" in res.stdout
    shot = tmp_path / "shot.png"
    res = subprocess.run([*flags, "--window-size=1400,2000", f"--screenshot={shot}", url], capture_output=True,
                         text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000  # a page with tables and plots, not blank


def test_report_without_runs_or_reference(tmp_path):
    root = tmp_path / "runs"
    add_record(root, config="linear", task=VTAB[0], seed=1, top1=50.0)
    write_leaderboard(root, tmp_path / "out", "vtab", reference_dir=False)
    html = (tmp_path / "out" / "vtab-report.html").read_text()
    dom = parse(html)
    assert dom.tables["leaderboard-table"] == 1
    assert "vs-reported-table" not in dom.tables and 'id="problems-none"' in html


LAYOUT_PROBE = """<script>window.addEventListener('load',function(){
var out={vw:window.innerWidth,sw:document.documentElement.scrollWidth,cols:{}};
document.querySelectorAll('#leaderboard-table thead th').forEach(function(th){
var r=th.getBoundingClientRect();out.cols[th.textContent]=[r.left,r.right];});
document.body.setAttribute('data-layout',JSON.stringify(out));});</script>"""


def test_parameter_columns_visible_at_1400px(report, tmp_path):
    """At 1400 px the configuration, its Tuned/Total % and its parameter counts are on screen without any
    horizontal scroll (wider columns may scroll inside the table's own box, never the page)."""
    import json

    browser = find_chromium()
    if browser is None:
        if os.environ.get("PEFTBENCH_REQUIRE_CHROMIUM") == "1":
            pytest.fail("PEFTBENCH_REQUIRE_CHROMIUM=1 but no Chromium was found")
        pytest.skip("no Chromium found (Debian: apt-get install -y chromium; or set PEFTBENCH_CHROMIUM)")
    page = tmp_path / "probe.html"
    page.write_text(report.read_text(encoding="utf-8").replace("</body>", LAYOUT_PROBE + "</body>"), encoding="utf-8")
    flags = [browser, *BROWSER_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000",
             "--window-size=1400,1000"]
    res = subprocess.run([*flags, "--dump-dom", page.resolve().as_uri()], capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    layout = json.loads(parse(res.stdout).body["data-layout"])
    assert 1300 <= layout["vw"] <= 1400, layout["vw"]
    assert layout["sw"] <= layout["vw"], "the page itself scrolls sideways"
    cols = layout["cols"]
    for name in ("rank", "config", "Tuned/Total %", "trainable params", "tuned params", "seeds"):
        left, right = cols[name]
        assert 0 <= left and right <= layout["vw"], f"{name!r} is off screen at 1400 px: {cols[name]}"
    assert cols["config"][0] < cols["Tuned/Total %"][0] < cols["trainable params"][0] < cols["tuned params"][0]
    shot = tmp_path / "shot-1400.png"
    res = subprocess.run([*flags, f"--screenshot={shot}", report.resolve().as_uri()], capture_output=True, text=True,
                         timeout=180)
    assert res.returncode == 0 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
