"""A campaign's report as ONE self-contained HTML file: no external resources (a
Content-Security-Policy forbids any network load), charts as inline SVG drawn
here so they show without JavaScript, and a device table that a small inline
script builds from an embedded JSON island, with a text and a result filter.

Everything that comes from the ledger (device ids, reasons, group names: some of
it comes from devices) is escaped: html.escape for markup, and the JSON island
has its '<', '>' and '&' as \\u escapes so it cannot close its <script> element.
"""

from __future__ import annotations

import html
import json
import time
from datetime import datetime, timezone
from typing import Any, Iterable

from .export import campaign_header, campaign_row, device_rows, iso, totals, workorder_rows
from .ledger import FINAL, Ledger

# Okabe & Ito's colour-blind safe palette; black text on every one of them has a contrast >= 5.4:1.
# Colour is never the only cue: every segment, line and card also carries its state as text.
COLORS = {
    "OK": "#009E73",           # bluish green
    "KO": "#D55E00",           # vermillion
    "UNREACHABLE": "#E69F00",  # orange
    "ERROR": "#CC79A7",        # reddish purple
    "CANCELLED": "#999999",    # grey
    "pending": "#56B4E9",      # sky blue (pending and running)
}
SHOWN = tuple(COLORS)                                   # the states of the summary and the bars
DASH = {"OK": "", "KO": "7 4", "UNREACHABLE": "2 4", "ERROR": "9 3 2 3", "CANCELLED": "1 5"}
CSP = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:"


def esc(v: Any) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def _merge_running(counts: dict[str, int]) -> dict[str, int]:
    out = {s: int(counts.get(s, 0)) for s in SHOWN}
    out["pending"] += int(counts.get("running", 0))
    return out


def _short(s: str, n: int = 24) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _nice_step(span: float, ticks: int = 5) -> int:
    raw = max(span / ticks, 1)
    mag = 10 ** len(str(int(raw))) // 10 or 1
    for m in (1, 2, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def _fmt_time(t: float, span: float) -> str:
    d = datetime.fromtimestamp(t, timezone.utc)
    if span < 120:
        return d.strftime("%H:%M:%S")
    if span < 2 * 86400:
        return d.strftime("%H:%M")
    return d.strftime("%m-%d %H:%M")


# -- charts ----------------------------------------------------------------------------------------
def timeline(ledger: Ledger, cid: str, created: float, finished: float | None, total: int) -> str:
    """Cumulative devices per final state over time, as step lines. A device counts in the state of
    its latest 'result' or 'field' event (a field upgrade moves it from KO to OK, say)."""
    rows = ledger.devices(cid)
    canon: dict[str, str] = {}
    for r in rows:
        canon[r["target"]] = r["target"]
        if r["device"]:
            canon.setdefault(r["device"], r["target"])
    evs = [e for e in ledger.events(cid) if e["kind"] in ("result", "field") and e["result"] in FINAL
           and e["target"] is not None]
    current: dict[str, str] = {}
    n = {s: 0 for s in FINAL}
    steps: dict[str, list[tuple[float, int]]] = {s: [] for s in FINAL}
    for e in evs:
        key = canon.get(e["target"], e["target"])
        old, new = current.get(key), str(e["result"])
        if old == new:
            continue
        if old is not None:
            n[old] -= 1
            steps[old].append((float(e["t"]), n[old]))
        n[new] += 1
        steps[new].append((float(e["t"]), n[new]))
        current[key] = new
    states = [s for s in FINAL if s != "CANCELLED" or steps[s]]
    t0 = min([created] + [float(e["t"]) for e in evs])
    t1 = max([t0 + 1.0, finished or 0.0] + [float(e["t"]) for e in evs])
    span = t1 - t0
    W, H, L, R, T, B = 960, 320, 56, 170, 16, 48
    pw, ph = W - L - R, H - T - B
    ymax = max(total, 1)

    def x(t: float) -> float:
        return L + (t - t0) / span * pw

    def y(v: int) -> float:
        return T + ph - v / ymax * ph

    out = [f'<svg class="chart" id="chart-time" viewBox="0 0 {W} {H}" role="img" '
           f'aria-labelledby="chart-time-title chart-time-desc">',
           '<title id="chart-time-title">Outcomes over time</title>',
           '<desc id="chart-time-desc">' + esc("Devices per result over time: " + ", ".join(
               f"{s} {n[s]}" for s in states) + f" of {total}.") + "</desc>"]
    step = _nice_step(ymax)
    for v in range(0, ymax + 1, step):
        out.append(f'<line class="grid" x1="{L}" x2="{L + pw}" y1="{y(v):.1f}" y2="{y(v):.1f}"/>'
                   f'<text class="tick" x="{L - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v}</text>')
    for i in range(6):
        t = t0 + span * i / 5
        anchor = "start" if i == 0 else "end" if i == 5 else "middle"
        out.append(f'<line class="axis" x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{T + ph}" y2="{T + ph + 5}"/>'
                   f'<text class="tick" x="{x(t):.1f}" y="{T + ph + 18}" text-anchor="{anchor}">'
                   f'{esc(_fmt_time(t, span))}</text>')
    out.append(f'<line class="axis" x1="{L}" x2="{L + pw}" y1="{T + ph}" y2="{T + ph}"/>'
               f'<line class="axis" x1="{L}" x2="{L}" y1="{T}" y2="{T + ph}"/>'
               f'<text class="axis-label" x="{L + pw / 2:.0f}" y="{H - 6}" text-anchor="middle">'
               f'time (UTC), from {esc(iso(t0))}</text>'
               f'<text class="axis-label" transform="translate(14 {T + ph / 2:.0f}) rotate(-90)" '
               f'text-anchor="middle">devices</text>')
    labels: list[tuple[float, str]] = []
    for s in states:
        d = [f"M{x(t0):.1f} {y(0):.1f}"]
        for t, v in steps[s]:
            d.append(f"H{x(t):.1f} V{y(v):.1f}")
        d.append(f"H{x(t1):.1f}")
        dash = f' stroke-dasharray="{DASH[s]}"' if DASH[s] else ""
        out.append(f'<path class="line" data-state="{s}" data-final="{n[s]}" d="{" ".join(d)}" '
                   f'stroke="{COLORS[s]}"{dash}><title>{s}: {n[s]}</title></path>')
        labels.append((y(n[s]) + 4, s))
    labels.sort()                                   # then keep the end labels 14 px apart
    for i in range(1, len(labels)):
        labels[i] = (max(labels[i][0], labels[i - 1][0] + 14), labels[i][1])
    for ly, s in labels:
        out.append(f'<text class="end-label" data-state="{s}" x="{L + pw + 8}" y="{ly:.1f}">'
                   f'<tspan fill="{COLORS[s]}">■</tspan> {s} {n[s]}</text>')
    out.append("</svg>")
    return "\n".join(out)


def stacked_bars(chart_id: str, title: str, what: str, counts: dict[str, dict[str, int]]) -> str:
    """One horizontal bar per key, a segment per state, widths to one common scale; each segment
    has its count inside when it fits, and the whole breakdown is written under the bar as text."""
    keys = sorted(counts)
    rows = [(k, _merge_running(counts[k])) for k in keys]
    W, L, BW, ROW = 960, 200, 720, 46
    H = max(ROW * len(rows), ROW) + 8
    most = max([sum(c.values()) for _, c in rows] + [1])
    out = [f'<svg class="chart bars" id="{chart_id}" viewBox="0 0 {W} {H}" role="img" '
           f'aria-labelledby="{chart_id}-title">', f'<title id="{chart_id}-title">{esc(title)}</title>']
    if not rows:
        out.append(f'<text class="tick" x="{L}" y="24">no devices</text>')
    for i, (k, c) in enumerate(rows):
        y0 = 6 + i * ROW
        total = sum(c.values())
        out.append(f'<g class="bar" data-key="{esc(k)}" data-total="{total}">'
                   f'<title>{esc(k)}: {esc(", ".join(f"{s} {c[s]}" for s in SHOWN if c[s]))}</title>'
                   f'<text class="bar-label" x="{L - 8}" y="{y0 + 15}" text-anchor="end">{esc(_short(k))}</text>')
        x0 = float(L)
        for s in SHOWN:
            if not c[s]:
                continue
            w = c[s] / most * BW
            out.append(f'<rect class="seg" data-state="{s}" data-count="{c[s]}" x="{x0:.1f}" y="{y0}" '
                       f'width="{w:.1f}" height="22" fill="{COLORS[s]}"/>')
            if w >= 9 * len(str(c[s])) + 6:
                out.append(f'<text class="seg-label" x="{x0 + w / 2:.1f}" y="{y0 + 15}" '
                           f'text-anchor="middle">{c[s]}</text>')
            x0 += w
        summary = " · ".join(f"{s} {c[s]}" for s in SHOWN if c[s])
        out.append(f'<text class="bar-sum" x="{L}" y="{y0 + 36}">{esc(f"{_plural(total, what)}: {summary}")}'
                   f'</text></g>')
    out.append("</svg>")
    return "\n".join(out)


# -- tables ----------------------------------------------------------------------------------------
def _table(cls: str, caption: str, head: Iterable[str], rows: Iterable[Iterable[Any]],
           nowrap: Iterable[int] = ()) -> str:
    keep = set(nowrap)
    out = [f'<div class="scroll"><table class="{cls}"><caption>{esc(caption)}</caption><thead><tr>']
    out += [f'<th scope="col">{esc(h)}</th>' for h in head]
    out.append("</tr></thead><tbody>")
    for r in rows:
        out.append("<tr>" + "".join(f'<td class="nowrap">{esc(v)}</td>' if i in keep else f"<td>{esc(v)}</td>"
                                    for i, v in enumerate(r)) + "</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def _when(s: str | None) -> str:
    """ISO 8601 UTC -> '2024-06-11 10:02:55' (the page says its times are UTC)."""
    return "" if not s else s.replace("T", " ")[:19]


def _json_island(doc: Any) -> str:
    s = json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
    return (s.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


STYLE = """
:root { --fg: #1a1a1a; --muted: #555; --line: #ccc; --bg: #fff; }
* { box-sizing: border-box; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: var(--fg);
       background: var(--bg); margin: 0 auto; padding: 1.5rem; max-width: 1280px; }
h1 { font-size: 1.6rem; margin: 0 0 .3rem; } h2 { font-size: 1.2rem; margin: 2rem 0 .6rem; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: .15rem 1rem; margin: .5rem 0 0; }
dl.meta dt { color: var(--muted); } dl.meta dd { margin: 0; overflow-wrap: anywhere; }
code { font: .9em ui-monospace, "DejaVu Sans Mono", monospace; }
.state { display: inline-block; padding: 0 .45em; border-radius: 3px; border: 1px solid #0003; color: #000;
         font-weight: 600; }
.cards { display: flex; flex-wrap: wrap; gap: .6rem; padding: 0; margin: 1rem 0 0; list-style: none; }
.card { border: 1px solid var(--line); border-left: .6rem solid; border-radius: 4px; padding: .4rem .8rem;
        min-width: 9.5rem; }
.card .n { font-size: 1.6rem; font-weight: 700; display: block; } .card .pct { color: var(--muted); }
svg.chart { width: 100%; height: auto; display: block; font-size: 13px; }
svg .grid { stroke: #e3e3e3; } svg .axis { stroke: #444; } svg .tick, svg .axis-label, svg .bar-sum { fill: #333; }
svg .line { fill: none; stroke-width: 2.5; } svg .end-label { font-weight: 600; fill: #000; }
svg .bar-label { fill: #000; } svg .seg { stroke: #fff; stroke-width: 1; } svg .seg-label { fill: #000; font-weight: 700; }
table { border-collapse: collapse; width: 100%; margin: .4rem 0 1rem; font-size: 13px; }
caption { text-align: left; color: var(--muted); padding-bottom: .3rem; }
th, td { border-bottom: 1px solid var(--line); padding: .25rem .4rem; text-align: left; vertical-align: top;
         overflow-wrap: break-word; }
th { background: #f3f3f3; }
.nowrap { white-space: nowrap; } .scroll { overflow-x: auto; }
.controls { display: flex; flex-wrap: wrap; gap: 1rem; align-items: center; margin: .5rem 0; }
.controls input, .controls select { font: inherit; padding: .2rem .4rem; }
.muted { color: var(--muted); }
@media print {
  body { padding: 0; max-width: none; font-size: 11pt; }
  .controls { display: none; }
  .scroll { overflow: visible; }
  table { font-size: 8.5pt; }
  section, svg.chart, tr { break-inside: avoid; }
  * { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
}
"""

SCRIPT = """
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("data").textContent);
  var cols = ["target", "device", "group", "concentrator", "versions", "result", "reason", "attempts",
              "finished", "verified", "source"];
  var nowrap = {group: 1, versions: 1, result: 1};
  var tbody = document.querySelector("#devtable tbody");
  var q = document.getElementById("q"), sel = document.getElementById("result");
  var shown = document.getElementById("shown");
  function text(c, v) {
    if (v === null || v === undefined) return "";
    if (c === "last_attempt" || c === "finished") return String(v).replace("T", " ").slice(0, 19);
    if (c === "verified") return v ? "yes" : "no";
    if (c === "concentrator" && v === "") return "direct";
    return String(v);
  }
  function render() {
    var needle = q.value.trim().toLowerCase(), want = sel.value, n = 0;
    var frag = document.createDocumentFragment();
    data.devices.forEach(function (d) {
      var state = d.result === "running" ? "pending" : d.result;
      if (want && state !== want) return;
      var cells = cols.map(function (c) {
        if (c === "versions") return (d.from_version || "?") + " \u2192 " + (d.to_version || "?");
        return text(c, c === "concentrator" ? (d[c] || "direct") : d[c]);
      });
      if (needle && cells.join("\\u0000").toLowerCase().indexOf(needle) < 0) return;
      var tr = document.createElement("tr");
      tr.dataset.result = d.result;
      cells.forEach(function (v, i) {
        var td = document.createElement("td");
        if (nowrap[cols[i]]) td.className = "nowrap";
        if (cols[i] === "result") {
          var b = document.createElement("span");
          b.className = "state";
          b.style.background = data.colors[state] || "#fff";
          b.textContent = v;
          td.appendChild(b);
        } else {
          td.textContent = v;
        }
        tr.appendChild(td);
      });
      frag.appendChild(tr);
      n++;
    });
    tbody.replaceChildren(frag);
    shown.textContent = n + " of " + data.devices.length + " devices shown";
  }
  // The filters live in the address too (report.html#result=KO&q=conc-A), to share a view.
  var start = new URLSearchParams(location.hash.slice(1));
  q.value = start.get("q") || "";
  if (start.get("result")) sel.value = start.get("result");
  function changed() {
    var h = new URLSearchParams();
    if (q.value) h.set("q", q.value);
    if (sel.value) h.set("result", sel.value);
    try { history.replaceState(null, "", h.toString() ? "#" + h.toString() : location.pathname); } catch (e) {}
    render();
  }
  q.addEventListener("input", changed);
  sel.addEventListener("change", changed);
  render();
  document.body.dataset.rendered = "1";
})();
"""


def render(ledger: Ledger, cid: str) -> str:
    """The campaign's report: one HTML document as text (write it to a .html file and open it)."""
    c = campaign_row(ledger, cid)             # UnknownCampaign when there is no such campaign
    header = campaign_header(ledger, cid)
    rows = device_rows(ledger, cid)
    n = _merge_running(totals(rows))
    total = len(rows)
    running = sum(1 for r in rows if r["result"] == "running")
    wos = workorder_rows(ledger, cid)
    jobs = ledger.jobs(cid)
    title = f"Campaign {c['name']} ({cid})"

    meta = [("Campaign", f"{c['name']}"), ("Id", cid), ("Image version", c["version"]),
            ("Image hash", c["image_hash"]), ("State", c["state"]), ("Reason", c["reason"] or "—"),
            ("Created", _when(header["created"])), ("Finished", _when(header["finished"]) or "—"),
            ("Plan", c["plan_file"] or "—")]
    p: list[str] = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta name="generator" content="meterota report">',
        f"<title>{esc(title)}</title>", f"<style>{STYLE}</style>", "</head>", "<body>",
        "<header>", f"<h1>{esc(title)}</h1>", '<dl class="meta">',
    ]
    for k, v in meta:
        val = f"<code>{esc(v)}</code>" if k in ("Id", "Image hash") else esc(v)
        p.append(f"<dt>{esc(k)}</dt><dd>{val}</dd>")
    p.append(f'</dl><p class="muted">Report generated {esc(_when(iso(time.time())))}; '
             "times are UTC.</p></header>")

    p.append('<section id="summary" aria-labelledby="h-summary"><h2 id="h-summary">Summary</h2>'
             f'<p>{_plural(total, "device")} in the campaign.</p><ul class="cards">')
    for s in SHOWN:
        pct = f"{100 * n[s] / total:.1f} %" if total else "–"
        extra = f" ({running} running)" if s == "pending" and running else ""
        p.append(f'<li class="card" data-state="{s}" data-count="{n[s]}" style="border-left-color:{COLORS[s]}">'
                 f'<span class="n">{n[s]}</span> {s}{extra} <span class="pct">{pct}</span></li>')
    p.append("</ul></section>")

    p.append('<section id="timeline" aria-labelledby="h-time"><h2 id="h-time">Outcomes over time</h2>')
    p.append(timeline(ledger, cid, float(c["created"]), c["finished"], total))
    p.append("</section>")
    p.append('<section id="groups" aria-labelledby="h-groups"><h2 id="h-groups">By group</h2>')
    p.append(stacked_bars("chart-groups", "Results per group", "device", ledger.counts(cid, by="grp")))
    p.append("</section>")
    p.append('<section id="concentrators" aria-labelledby="h-conc"><h2 id="h-conc">By concentrator</h2>'
             '<p class="muted">Devices upgraded over a direct link (serial, UDP) are under “direct”.</p>')
    p.append(stacked_bars("chart-concentrators", "Results per concentrator", "device",
                          ledger.counts(cid, by="via")))
    if jobs:
        p.append(_table("jobs", f"Concentrator jobs ({len(jobs)})", ("concentrator", "round", "job", "state",
                                                                      "created"),
                        ((j["concentrator"], j["round"], "" if j["job"] is None else j["job"], j["state"],
                          _when(iso(j["created"]))) for j in jobs), nowrap=(4,)))
    p.append("</section>")

    n_open = sum(1 for w in wos if w["state"] == "open")
    p.append('<section id="workorders" aria-labelledby="h-wo"><h2 id="h-wo">Work orders</h2>')
    if wos:
        p.append(_table("workorders", f"{n_open} open, {len(wos) - n_open} closed",
                        ("id", "device", "concentrator", "result", "reason", "created", "state", "closed",
                         "closed by"),
                        ((w["id"], w["device"], w["concentrator"] or "direct", w["result"], w["reason"],
                          _when(w["created"]), w["state"], _when(w["closed"]),
                          "" if w["closed_by"] is None else f"upgrade #{w['closed_by']}") for w in wos),
                        nowrap=(3, 5, 7, 8)))
    else:
        p.append("<p>No work orders.</p>")
    p.append("</section>")

    p.append('<section id="devices" aria-labelledby="h-dev"><h2 id="h-dev">Devices</h2>'
             '<div class="controls"><label>Filter <input id="q" type="search" '
             'placeholder="device, group, reason…"></label>'
             '<label>Result <select id="result"><option value="">all</option>')
    for s in SHOWN:
        p.append(f'<option value="{s}">{s}</option>')
    p.append('</select></label><span id="shown" role="status"></span></div>'
             '<noscript><p>The device table needs JavaScript; the exports (meterota export) have the same '
             'rows.</p></noscript>'
             '<div class="scroll"><table id="devtable"><caption>One row per device</caption><thead><tr>')
    for h in ("target", "device", "group", "concentrator", "version", "result", "reason", "attempts",
              "finished", "verified", "source"):
        p.append(f'<th scope="col">{esc(h)}</th>')
    p.append("</tr></thead><tbody></tbody></table></div></section>")

    island = {"campaign": header, "colors": COLORS,
              "devices": [{k: v for k, v in r.items() if k not in ("record", "mac", "campaign")} for r in rows]}
    p.append(f'<script type="application/json" id="data">{_json_island(island)}</script>')
    p.append(f"<script>{SCRIPT}</script>")
    p.append("</body></html>")
    return "\n".join(p) + "\n"
