// The jobs page: newest first, one row per job kept by id.
"use strict";
(function () {
  const FIELDS = ["id", "kind", "state", "started", "duration", "ok", "failed", "what"];
  const tbody = document.getElementById("rows");
  const countsEl = document.getElementById("counts");
  const rows = new Map();

  function cells(rec) {
    const states = Object.values(rec.slaves || {}).map(function (s) { return s.state; });
    const count = function (which) { return states.filter(function (s) { return which.indexOf(s) >= 0; }).length; };
    return { id: rec.id, kind: rec.kind, state: rec.state, started: remsh.time(rec.started),
             duration: remsh.duration(rec.started, rec.finished), ok: count(["ok"]),
             failed: count(["failed", "lost"]), what: remsh.what(rec) };
  }
  function fill(entry, rec) {
    entry.rec = rec;
    const values = cells(rec);
    for (const f of FIELDS) {
      const v = String(values[f]);
      if (entry.shown[f] === v) continue;
      entry.shown[f] = v;
      const td = entry.cells[f];
      if (f === "id") {
        const a = remsh.el("a", null, v);
        a.href = "/jobs/" + encodeURIComponent(v);
        td.replaceChildren(a);
      } else td.textContent = v;
    }
    entry.tr.className = "job-" + rec.state;
  }
  function upsert(rec) {
    let entry = rows.get(rec.id);
    if (!entry) {
      entry = { tr: document.createElement("tr"), cells: {}, shown: {} };
      for (const f of FIELDS) { entry.cells[f] = remsh.el("td", "f-" + f); entry.tr.appendChild(entry.cells[f]); }
      let next = null;
      for (const [id, other] of rows) if (id < rec.id && (!next || id > next[0])) next = [id, other];
      tbody.insertBefore(entry.tr, next ? next[1].tr : null);
      rows.set(rec.id, entry);
    }
    fill(entry, rec);
  }
  function counts() {
    const n = {};
    for (const e of rows.values()) n[e.rec.state] = (n[e.rec.state] || 0) + 1;
    const parts = [rows.size + " jobs"];
    for (const s of ["running", "done", "failed", "cancelled"]) if (n[s]) parts.push(n[s] + " " + s);
    countsEl.textContent = parts.join(", ");
  }
  remsh.live("/api/live/jobs", function (m) {
    if (m.reset) {
      rows.clear();
      tbody.replaceChildren();
      m.reset.sort(function (a, b) { return a.id < b.id ? 1 : -1; });
      for (const rec of m.reset) upsert(rec);
    }
    for (const rec of m.set || []) upsert(rec);
    for (const id of m.del || []) { const e = rows.get(id); if (e) { e.tr.remove(); rows.delete(id); } }
    counts();
    document.body.dataset.ready = "yes";
  });
  setInterval(function () {
    for (const e of rows.values()) if (e.rec.state === "running") fill(e, e.rec);
  }, 1000);
})();
