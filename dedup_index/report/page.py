"""The report page: static HTML for the summary, histogram and threshold table, plus a small
inline script that renders the duplicate groups one page at a time from embedded JSON.

Nothing on the page refers to the network: styles, script, plot (inline SVG) and thumbnails
(``data:`` URIs) are all in the one file.  The script uses ``textContent`` for every key, so
a key containing markup is shown, never interpreted.
"""

from __future__ import annotations

import json
from html import escape

STYLE = """
body{font:14px/1.4 "DejaVu Sans",Arial,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px;margin:0 0 12px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
table{border-collapse:collapse}td,th{padding:3px 10px;border-bottom:1px solid #eee;text-align:left}
table.kv th{font-weight:normal;color:#555}table.kv td{font-weight:bold}
table.thresholds td.num,table.thresholds th.num{text-align:right}
tr.run{background:#fff3cd;font-weight:bold}
.note{color:#555;font-size:13px;max-width:900px}
.status-exact{color:#1a7f37}.status-lower{color:#9a6700}.status-unavailable{color:#999}
svg.histogram text{font-size:11px;fill:#333}
svg.histogram text.threshold-label{fill:#c00;font-weight:bold}
.pager{margin:10px 0;display:flex;gap:10px;align-items:center;flex-wrap:wrap}
.pager button{padding:3px 10px}.pager input{width:70px}
.group{border:1px solid #ddd;border-radius:4px;margin:10px 0;padding:8px}
.group-head{font-weight:bold;margin-bottom:6px}
.items{display:flex;flex-wrap:wrap;gap:8px}
.item{width:150px;font-size:12px;border:1px solid #eee;padding:4px;overflow-wrap:anywhere}
.item.kept{border-color:#1a7f37;background:#f0fff4}.item.removed{background:#fff8f8}
.item img,.item .nothumb{display:block;max-width:140px;max-height:140px;margin-bottom:4px}
.item .nothumb{width:96px;height:64px;background:#eee;color:#888;font-size:11px;
display:flex;align-items:center;justify-content:center}
.role{font-weight:bold}.item.kept .role{color:#1a7f37}.item.removed .role{color:#b42318}
.sim{font-family:"DejaVu Sans Mono",monospace}
"""

SCRIPT = r"""
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("report-data").textContent);
  var G = D.g, K = D.k, R = D.r, T = D.t, PS = D.page_size, SHOWN = D.members_shown;
  var pages = Math.max(1, Math.ceil(G.length / PS));
  var page = 1;
  var list = document.getElementById("group-list");
  var infos = document.querySelectorAll(".pageinfo");
  function clamp(p) { p = parseInt(p, 10); if (!(p >= 1)) p = 1; return Math.min(pages, p); }
  function fromHash() { var m = /page=(\d+)/.exec(location.hash); return m ? clamp(m[1]) : 1; }
  function fmt(s) { return s === null ? "n/a" : s.toFixed(D.d); }
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function item(id, kept, sim, dupOf) {
    var box = el("div", "item " + (kept ? "kept" : "removed"));
    if (T[id] !== undefined) {
      var img = el("img"); img.src = "data:image/jpeg;base64," + T[id]; img.alt = K[id];
      box.appendChild(img);
    } else if (D.has_thumbs) {
      box.appendChild(el("div", "nothumb", "no thumbnail"));
    }
    box.appendChild(el("div", "role", kept ? "kept" : "removed"));
    box.appendChild(el("div", "key", K[id]));
    box.appendChild(el("div", "row", "row " + R[id]));
    if (!kept) {
      box.appendChild(el("div", "sim", "similarity " + fmt(sim)));
      if (dupOf >= 0) box.appendChild(el("div", "via", "duplicate of " + K[dupOf]));
    }
    return box;
  }
  function addMembers(items, g, a, b) {
    for (var m = a; m < b; m++) items.appendChild(item(g[2][m], false, g[3][m], g[4][m]));
  }
  function group(index) {
    var g = G[index], n = g[2].length;
    var box = el("div", "group");
    box.appendChild(el("div", "group-head", "Group " + (index + 1) + " of " + G.length +
      ": " + n + " duplicate" + (n === 1 ? "" : "s") + ", highest similarity " + fmt(g[1])));
    var items = el("div", "items");
    items.appendChild(item(g[0], true, null, -1));
    addMembers(items, g, 0, Math.min(n, SHOWN));
    box.appendChild(items);
    if (n > SHOWN) {
      var more = el("button", "more", "show all " + n + " duplicates");
      more.onclick = function () { addMembers(items, g, SHOWN, n); more.remove(); };
      box.appendChild(more);
    }
    return box;
  }
  function render() {
    list.textContent = "";
    var a = (page - 1) * PS, b = Math.min(G.length, a + PS);
    for (var i = a; i < b; i++) list.appendChild(group(i));
    var text = G.length ? "page " + page + " of " + pages + " (groups " + (a + 1) + "\u2013" + b +
      " of " + G.length + ")" : "no duplicate groups";
    infos.forEach(function (e) { e.textContent = text; });
    document.querySelectorAll(".prev").forEach(function (e) { e.disabled = page <= 1; });
    document.querySelectorAll(".next").forEach(function (e) { e.disabled = page >= pages; });
  }
  function go(p) {
    p = clamp(p);
    if (location.hash !== "#page=" + p) { location.hash = "page=" + p; }
    else { page = p; render(); }
  }
  function on(sel, f) { document.querySelectorAll(sel).forEach(function (e) { e.onclick = f; }); }
  on(".prev", function () { go(page - 1); });
  on(".next", function () { go(page + 1); });
  document.querySelectorAll(".jump").forEach(function (f) {
    f.onsubmit = function (ev) { ev.preventDefault(); go(f.querySelector("input").value); };
  });
  window.addEventListener("hashchange", function () { page = fromHash(); render(); });
  page = fromHash();
  render();
  document.body.setAttribute("data-rendered-page", String(page));
})();
"""


def json_for_script(payload: object) -> str:
    """``payload`` as JSON safe inside ``<script type="application/json">``.

    ``<``, ``>`` and ``&`` are written as ``\\u`` escapes, so no key can close the script
    element; NaN is not allowed (it is not JSON).
    """
    text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def pager(pages: int) -> str:
    """Prev / next buttons, the page text and a jump box (wired up by the script)."""
    return (
        '<nav class="pager"><button type="button" class="prev">&lsaquo; prev</button>'
        '<span class="pageinfo"></span>'
        '<button type="button" class="next">next &rsaquo;</button>'
        f'<form class="jump"><label>jump to page <input type="number" min="1" max="{pages}" '
        'name="page"></label> <button type="submit">go</button></form></nav>'
    )


def table(rows: list[list[str]], header: list[str], *, cls: str = "", row_cls=None) -> str:
    """A plain HTML table; cells are escaped here."""
    out = [f'<table class="{cls}">' if cls else "<table>", "<thead><tr>"]
    out += [f"<th>{escape(h)}</th>" for h in header]
    out.append("</tr></thead><tbody>")
    for k, row in enumerate(rows):
        rc = row_cls(k) if row_cls else ""
        out.append(f'<tr class="{rc}">' if rc else "<tr>")
        out += [f"<td>{escape(str(c))}</td>" for c in row]
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)
