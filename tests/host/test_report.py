"""meterota.campaign.report rendered by a real browser: headless Chromium (Debian's
package, installed by `make chromium`) loads the report from a file:// URL, and
its DOM after the inline script ran, and a screenshot, are checked: one table
row per device, the charts' numbers, the hostile reason shown as text and never
run, and nothing loaded from the network."""

from __future__ import annotations

import os
import re
import struct
import subprocess
import zlib
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from ledger_sample import CID, NASTY, NASTY_DEVICE, Sample, build, merged

from meterota.campaign import report

CHROMIUM = Path("/usr/bin/chromium")
OKABE_ITO_OK = (0x00, 0x9E, 0x73)


@pytest.fixture
def sample(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Sample:
    return build(tmp_path, monkeypatch)


@pytest.fixture
def page(sample: Sample, tmp_path: Path) -> Path:
    p = tmp_path / "report.html"
    p.write_text(report.render(sample.ledger, CID), encoding="utf-8")
    return p


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail("/usr/bin/chromium is missing: `make chromium` installs it")
        pytest.skip("/usr/bin/chromium is missing: `make chromium` installs it")
    profile = tmp_path / "chromium-profile"
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90, env=dict(os.environ, HOME=str(tmp_path)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


class Dom(HTMLParser):
    """The few things the tests look at, from the serialized DOM."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, dict[str, str]]] = []
        self.body: dict[str, str] = {}
        self.tags: dict[str, int] = {}
        self.rows: list[dict[str, Any]] = []          # rows of #devtable's tbody
        self.bars: dict[str, dict[str, dict[str, int]]] = {}   # chart id -> key -> state -> count
        self.bar_sums: dict[str, list[str]] = {}
        self.lines: dict[str, int] = {}
        self.end_labels: list[str] = []
        self.cards: dict[str, int] = {}
        self._chart = ""
        self._key = ""
        self._text: list[str] | None = None

    def _inside(self, tag: str, **attrs: str) -> bool:
        return any(t == tag and all(a.get(k) == v for k, v in attrs.items()) for t, a in self.stack)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags[tag] = self.tags.get(tag, 0) + 1
        if tag == "body":
            self.body = a
        if tag == "svg":
            self._chart = a.get("id", "")
        if tag == "g" and "bar" in a.get("class", "").split():
            self._key = a["data-key"]
            self.bars.setdefault(self._chart, {})[self._key] = {}
        if tag == "rect" and a.get("class") == "seg":
            self.bars[self._chart][self._key][a["data-state"]] = int(a["data-count"])
        if tag == "path" and a.get("class") == "line":
            self.lines[a["data-state"]] = int(a["data-final"])
        if tag == "li" and a.get("class") == "card":
            self.cards[a["data-state"]] = int(a["data-count"])
        if tag == "tr" and self._inside("table", id="devtable") and self._inside("tbody"):
            self.rows.append({"result": a.get("data-result"), "cells": []})
        if tag in ("td", "text"):
            self._text = []
        if tag not in ("br", "meta", "input", "line", "rect", "img", "link"):
            self.stack.append((tag, a))

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._text is not None and self._inside("table", id="devtable") and self.rows:
            self.rows[-1]["cells"].append("".join(self._text))
        if tag == "text" and self._text is not None:
            cls = next((a.get("class", "") for t, a in reversed(self.stack) if t == "text"), "")
            if cls == "bar-sum":
                self.bar_sums.setdefault(self._chart, []).append("".join(self._text))
            if cls == "end-label":
                self.end_labels.append("".join(self._text).strip())
        if tag in ("td", "text"):
            self._text = None
        while self.stack:
            t, _ = self.stack.pop()
            if t == tag:
                break

    def handle_data(self, data: str) -> None:
        if self._text is not None:
            self._text.append(data)


class Attrs(HTMLParser):
    """Every attribute of the document that makes a browser fetch or navigate."""

    LOADS = {"src", "href", "srcset", "action", "formaction", "poster", "data", "background", "xlink:href"}

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found += [(tag, k, v) for k, v in attrs if k in self.LOADS]


def dump_dom(tmp_path: Path, url: str) -> tuple[str, Dom]:
    out = chromium(tmp_path, "--dump-dom", url).stdout
    d = Dom()
    d.feed(out)
    return out, d


def test_the_html_is_self_contained_and_escapes_what_devices_said(sample: Sample, page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    assert 'http-equiv="Content-Security-Policy"' in text
    assert f'content="{report.CSP}"' in text and "default-src 'none'" in report.CSP
    assert not re.search(r"https?://", text)                     # no resource from anywhere
    loads = Attrs()
    loads.feed(text)
    assert loads.found == []                                      # no element that points anywhere
    assert "<link" not in text and "@import" not in text and "url(" not in text
    assert NASTY not in text and NASTY_DEVICE not in text         # only escaped forms
    assert report.esc(NASTY) in text                              # the work orders table, server-rendered
    assert len(re.findall(r"<script", text, re.I)) == 2           # the JSON island and the table script
    island = re.search(r'<script type="application/json" id="data">(.*?)</script>', text, re.S)
    assert island and "<" not in island.group(1) and ">" not in island.group(1)


def test_chromium_runs_the_script_and_draws_the_charts(sample: Sample, page: Path, tmp_path: Path) -> None:
    raw, dom = dump_dom(tmp_path, page.as_uri())
    assert dom.body.get("data-rendered") == "1"                   # the inline script ran to its end
    assert "data-pwned" not in raw and "pwned" not in dom.body    # the hostile reason never ran
    assert dom.tags.get("script") == 2 and "img" not in dom.tags and "b" not in dom.tags

    # the device table: one row per device, in the ledger's state
    assert len(dom.rows) == len(sample.expect) == 13
    by_target = {r["cells"][0]: r for r in dom.rows}
    assert {t: r["result"] for t, r in by_target.items()} == sample.expect
    nasty = by_target[NASTY_DEVICE]
    assert nasty["cells"][1] == NASTY_DEVICE and NASTY in nasty["cells"]   # shown as text, verbatim
    assert by_target["udp:127.0.0.2:1337"]["cells"][3] == "direct"
    assert by_target["meter-0003"]["cells"][-1] == "field"

    # summary cards and the charts carry the numbers
    assert dom.cards == {"OK": 7, "KO": 1, "UNREACHABLE": 1, "ERROR": 1, "CANCELLED": 1, "pending": 2}
    assert {k: v for k, v in dom.bars["chart-groups"].items()} == {g: merged(c) for g, c in sample.groups.items()}
    assert dom.bars["chart-concentrators"] == {v: merged(c) for v, c in sample.vias.items()}
    assert set(dom.bars["chart-concentrators"]) == {"conc-A", "conc-B", "direct"}
    assert "6 devices: OK 1 · KO 1 · ERROR 1 · CANCELLED 1 · pending 2" in dom.bar_sums["chart-groups"]
    assert dom.lines == {"OK": 7, "KO": 1, "UNREACHABLE": 1, "ERROR": 1, "CANCELLED": 1}
    assert "OK 7" in " ".join(dom.end_labels) and "UNREACHABLE 1" in " ".join(dom.end_labels)


@pytest.mark.parametrize("fragment,targets", [
    ("#result=KO", {NASTY_DEVICE}),
    ("#result=pending", {"meter-0010", "udp:127.0.0.9:1337"}),
    ("#q=conc-A", {"meter-0001", "meter-0002", "meter-0003", "meter-0004"}),
    ("#q=SELF-TEST&result=KO", set()),                              # meter-0003's KO was fixed in the field
    ("#q=pwned", {NASTY_DEVICE}),
])
def test_the_filters(page: Path, tmp_path: Path, fragment: str, targets: set[str]) -> None:
    _, dom = dump_dom(tmp_path, page.as_uri() + fragment)
    assert dom.body.get("data-rendered") == "1"
    assert {r["cells"][0] for r in dom.rows} == targets


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    out, i = [], 8
    while i < len(data):
        (n,) = struct.unpack(">I", data[i:i + 4])
        kind, body = data[i + 4:i + 8], data[i + 8:i + 8 + n]
        (crc,) = struct.unpack(">I", data[i + 8 + n:i + 12 + n])
        assert zlib.crc32(kind + body) == crc, kind
        out.append((kind, body))
        i += 12 + n
    assert out[0][0] == b"IHDR" and out[-1][0] == b"IEND"
    return out


def test_the_screenshot_is_a_real_picture_of_the_report(page: Path, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,2000", page.as_uri())
    data = shot.read_bytes()
    chunks = png_chunks(data)
    w, h, depth, ctype = struct.unpack(">IIBB", chunks[0][1][:10])
    assert (w, h, depth) == (1200, 2000, 8) and ctype in (2, 6)
    assert len(zlib.decompress(b"".join(b for k, b in chunks if k == b"IDAT"))) == h * (1 + w * (3 if ctype == 2
                                                                                                  else 4))
    from PIL import Image
    img = Image.open(shot).convert("RGB")
    colors = img.getcolors(maxcolors=1 << 22) or []
    assert len(colors) > 50                                      # text, charts: far from a single colour
    counts: dict[tuple[int, ...], int] = {tuple(c): n for n, c in colors}  # type: ignore[arg-type]
    near_ok = sum(n for c, n in counts.items() if all(abs(a - b) <= 3 for a, b in zip(c, OKABE_ITO_OK)))
    assert near_ok > 2000                                        # the SVG bars were painted
    white = counts.get((255, 255, 255), 0)
    assert white < w * h * 0.97
