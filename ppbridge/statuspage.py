"""The admin status page at ``/``: one self-contained HTML document, no external assets.

The server renders the frame (the health line, links and the raw ``/status`` document,
HTML-escaped, for a browser without JavaScript); a small inline script then fetches
``status`` (a relative URL, so the page works behind a reverse proxy's sub-path) every few
seconds and rebuilds the tables with ``createElement``/``textContent`` only: a proxy name or
an error text is never parsed as HTML. The Content-Security-Policy allows exactly this
script (by hash), this style sheet and fetches to the same origin.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
from typing import Any

REFRESH_MS = 3000

STYLE = """
body{font:15px/1.4 system-ui,sans-serif;margin:0 auto;padding:.5em 1em;max-width:70em;color:#222}
h1{font-size:1.4em;margin:.3em 0}h2{font-size:1.15em;margin:1.2em 0 .3em}
.bad{color:#b00020}.ok{color:#0a6b2d}.muted{color:#666}
nav a{margin-right:.8em}
.wrap{overflow-x:auto}
table{border-collapse:collapse;width:100%;margin:.3em 0}
th,td{text-align:left;padding:.25em .6em;border-bottom:1px solid #ddd;white-space:nowrap}
th{background:#f4f4f4}
.summary{margin:.2em 0;word-break:break-word}
code,.fp{font-family:ui-monospace,monospace}
pre{white-space:pre-wrap;word-break:break-all;font-size:12px;background:#f8f8f8;padding:.5em}
@media (max-width:600px){
 table,thead,tbody,tr,th,td{display:block}thead{display:none}
 tr{border:1px solid #ddd;margin:.4em 0;padding:.2em}
 td{border:0;white-space:normal}
 td::before{content:attr(data-label) ": ";font-weight:600;font-family:system-ui,sans-serif}
}
"""

SCRIPT = """
(function () {
  "use strict";
  var REFRESH = %(refresh)d;
  function el(tag, text, cls) {
    var e = document.createElement(tag);
    if (text !== undefined && text !== null) { e.textContent = String(text); }
    if (cls) { e.className = cls; }
    return e;
  }
  function dur(s) {
    if (s === null || s === undefined || typeof s !== "number" || !isFinite(s)) { return "\\u2014"; }
    if (s < 1) { return Math.round(s * 1000) + " ms"; }
    if (s < 60) { return s.toFixed(1) + " s"; }
    var m = Math.floor(s / 60), h = Math.floor(m / 60), d = Math.floor(h / 24);
    if (d) { return d + " d " + (h %% 24) + " h"; }
    if (h) { return h + " h " + (m %% 60) + " min"; }
    return m + " min " + Math.floor(s %% 60) + " s";
  }
  function val(v) { return (v === null || v === undefined) ? "\\u2014" : String(v); }
  var COLUMNS = [["instance", "Instance"], ["key_fingerprint", "Key fingerprint"], ["key_age_s", "Key age"],
                 ["messages", "Messages"], ["rotations", "Rotations"], ["period_s", "Period"]];
  function table(rows, first) {
    var t = el("table"), head = el("thead"), hr = el("tr"), body = el("tbody");
    COLUMNS.forEach(function (c) { hr.appendChild(el("th", c[0] === "instance" ? first : c[1])); });
    head.appendChild(hr); t.appendChild(head);
    rows.forEach(function (r) {
      var tr = el("tr");
      COLUMNS.forEach(function (c) {
        var v = r[c[0]], text = (c[0] === "key_age_s" || c[0] === "period_s") ? dur(v) : val(v);
        var td = el("td", text, c[0] === "key_fingerprint" ? "fp" : (c[0] === "key_age_s" ? "age" : ""));
        td.setAttribute("data-label", c[0] === "instance" ? first : c[1]);
        tr.appendChild(td);
      });
      body.appendChild(tr);
    });
    if (!rows.length) {
      var tr = el("tr"), td = el("td", "no live " + first.toLowerCase() + " with a key", "bad");
      td.colSpan = COLUMNS.length; tr.appendChild(td); body.appendChild(tr);
    }
    t.appendChild(body);
    var w = el("div", null, "wrap"); w.appendChild(t); return w;
  }
  function section(name, p, rows, first) {
    var s = el("section", null, "proxy");
    s.setAttribute("data-proxy", name);
    var h = el("h2"), up = rows.length > 0;
    h.appendChild(el("span", name, "name"));
    h.appendChild(el("span", up ? " \\u2014 up" : " \\u2014 DOWN", up ? "ok" : "bad"));
    s.appendChild(h);
    var sum = el("p", null, "summary");
    sum.appendChild(el("span", "Last minute: "));
    sum.appendChild(el("span", val(p.requests_1m), "requests"));
    sum.appendChild(el("span", " requests, "));
    sum.appendChild(el("span", val(p.errors_1m), p.errors_1m ? "errors bad" : "errors"));
    sum.appendChild(el("span", " errors. "));
    if (p.upgraded !== undefined) {
      sum.appendChild(el("span", val(p.upgraded), "upgraded"));
      sum.appendChild(el("span", " upgraded connections open. "));
    }
    sum.appendChild(el("span", "Last error: "));
    sum.appendChild(el("span", val(p.last_error), p.last_error ? "last-error bad" : "last-error muted"));
    s.appendChild(sum);
    s.appendChild(table(rows, first));
    return s;
  }
  function render(doc) {
    var h1 = document.querySelector("h1");
    h1.textContent = "ppbridge: " + (doc.healthy ? "healthy" : "UNHEALTHY");
    h1.className = doc.healthy ? "ok" : "bad";
    document.getElementById("version").textContent = val(doc.version);
    document.getElementById("uptime").textContent = dur(doc.uptime_s);
    document.getElementById("redis").textContent = doc.redis_connected ? "connected" : "NOT connected";
    document.getElementById("redis").className = doc.redis_connected ? "ok" : "bad";
    document.getElementById("role").textContent = doc.proxies ? "forwarder " + val(doc.forwarder)
      : "proxy " + val(doc.proxy) + " (instance " + val(doc.instance) + ")";
    var box = el("div");
    box.id = "proxies";
    if (doc.proxies) {
      Object.keys(doc.proxies).sort().forEach(function (name) {
        var p = doc.proxies[name];
        box.appendChild(section(name, p, (p.instances || []).filter(function (i) {
          return i.key_fingerprint; }), "Instance"));
      });
    } else {
      var f = doc.forwarders || {};
      var rows = Object.keys(f).sort().map(function (id) {
        var r = Object.assign({}, f[id]); r.instance = id; r.period_s = doc.period_s; return r; });
      box.appendChild(section(val(doc.proxy), doc, rows, "Forwarder"));
    }
    var old = document.getElementById("proxies");
    old.parentNode.replaceChild(box, old);
    document.getElementById("raw").textContent = JSON.stringify(doc, null, 2);
    document.getElementById("updated").textContent = new Date().toLocaleTimeString();
    document.getElementById("stale").textContent = "";
  }
  function refresh() {
    fetch("status", {cache: "no-store", credentials: "same-origin"}).then(function (r) {
      if (!r.ok) { throw new Error("HTTP " + r.status); }
      return r.json();
    }).then(render).catch(function (e) {
      document.getElementById("stale").textContent = " (update failed: " + e.message + ")";
    }).then(function () { setTimeout(refresh, REFRESH); });
  }
  refresh();
})();
""" % {"refresh": REFRESH_MS}


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


# Only this script and this style sheet, fetches to our own origin, nothing else.
CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; script-src {_csp_hash(SCRIPT)}; style-src {_csp_hash(STYLE)}; "
    "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def render(doc: dict[str, Any], healthy: bool) -> bytes:
    """The page, with ``doc`` (the /status document) escaped into its fallback ``<pre>``."""
    health = "healthy" if healthy else "UNHEALTHY"
    raw = html.escape(json.dumps(doc, indent=2, sort_keys=True))
    page = (
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
        "<meta name=viewport content=\"width=device-width, initial-scale=1\">"
        f"<title>ppbridge status</title><style>{STYLE}</style></head><body>\n"
        f"<h1>ppbridge: {health}</h1>\n"
        f"<p class=muted><span id=role></span> \u00b7 version <span id=version>{html.escape(str(doc.get('version')))}"
        "</span> \u00b7 up <span id=uptime></span> \u00b7 Redis <span id=redis></span>"
        " \u00b7 updated <span id=updated>never</span><span id=stale class=bad></span></p>\n"
        "<nav><a href=status>/status</a> <a href=metrics>/metrics</a> <a href=healthz>/healthz</a> "
        "<a href=readyz>/readyz</a> <a href=livez>/livez</a></nav>\n"
        "<div id=proxies><p class=muted>loading\u2026 (needs JavaScript; the raw document is below)</p></div>\n"
        f"<details><summary>raw /status</summary><pre id=raw>{raw}</pre></details>\n"
        f"<script>{SCRIPT}</script>\n</body></html>\n"
    )
    return page.encode("utf-8")
