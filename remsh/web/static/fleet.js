// The fleet page: one row per slave, kept by name; a live update touches
// only the cells that changed, and a new slave is inserted in place.
"use strict";
(function () {
  const FIELDS = ["name", "state", "transport", "peer", "platform", "since", "job"];
  const STATES = ["idle", "busy", "away", "resuming"];
  const tbody = document.getElementById("slaves");
  const globInput = document.getElementById("glob");
  const stateSelect = document.getElementById("state");
  const countsEl = document.getElementById("counts");
  const rows = new Map();
  let names = [];
  let pattern = null;
  let wanted = "";

  function visible(entry) {
    return (!pattern || pattern.test(entry.data.name)) && (!wanted || entry.data.state === wanted);
  }
  function fill(entry, data) {
    for (const f of FIELDS) {
      const v = data[f] === null || data[f] === undefined ? "" : String(data[f]);
      if (entry.data[f] === v) continue;
      entry.data[f] = v;
      const td = entry.cells[f];
      if (f === "job") {
        td.textContent = "";
        if (v) {
          const a = remsh.el("a", null, v);
          a.href = "/jobs/" + encodeURIComponent(v);
          td.appendChild(a);
        }
      } else {
        td.textContent = v;
      }
      if (f === "state") entry.tr.className = "state-" + (STATES.indexOf(v) >= 0 ? v : "other");
    }
    entry.tr.hidden = !visible(entry);
  }
  function make(data) {
    const tr = document.createElement("tr");
    const entry = { tr: tr, cells: {}, data: {} };
    for (const f of FIELDS) {
      const td = remsh.el("td", "f-" + f);
      tr.appendChild(td);
      entry.cells[f] = td;
    }
    fill(entry, data);
    return entry;
  }
  function position(name) {
    let lo = 0, hi = names.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (names[mid] < name) lo = mid + 1; else hi = mid;
    }
    return lo;
  }
  function upsert(data) {
    const entry = rows.get(data.name);
    if (entry) { fill(entry, data); return; }
    const fresh = make(data);
    const i = position(data.name);
    const next = i < names.length ? rows.get(names[i]).tr : null;
    names.splice(i, 0, data.name);
    rows.set(data.name, fresh);
    tbody.insertBefore(fresh.tr, next);
  }
  function remove(name) {
    const entry = rows.get(name);
    if (!entry) return;
    entry.tr.remove();
    rows.delete(name);
    names.splice(position(name), 1);
  }
  function reset(all) {
    rows.clear();
    all.sort(function (a, b) { return a.name < b.name ? -1 : a.name > b.name ? 1 : 0; });
    names = all.map(function (d) { return d.name; });
    const frag = document.createDocumentFragment();
    for (const data of all) {
      const entry = make(data);
      rows.set(data.name, entry);
      frag.appendChild(entry.tr);
    }
    tbody.replaceChildren(frag);
  }
  function counts() {
    const n = {};
    for (const entry of rows.values()) n[entry.data.state] = (n[entry.data.state] || 0) + 1;
    const parts = [rows.size + " slaves"];
    for (const s of STATES) if (n[s]) parts.push(n[s] + " " + s);
    countsEl.textContent = parts.join(", ");
  }
  function refilter() {
    pattern = globInput.value ? remsh.glob(globInput.value) : null;
    wanted = stateSelect.value;
    for (const entry of rows.values()) entry.tr.hidden = !visible(entry);
  }
  globInput.addEventListener("input", refilter);
  stateSelect.addEventListener("change", refilter);
  document.getElementById("filters").addEventListener("submit", function (e) { e.preventDefault(); });
  remsh.live("/api/live/fleet", function (m) {
    if (m.reset) reset(m.reset);
    for (const data of m.set || []) upsert(data);
    for (const name of m.del || []) remove(name);
    counts();
    document.body.dataset.ready = "yes";
  });
})();
