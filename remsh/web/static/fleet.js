// The fleet page: one row per slave, kept by name; a live update touches
// only the cells that changed, and a new slave is inserted in place.
//
// With thousands of slaves: rows are blocks with content-visibility: auto
// (style.css), so the browser lays out only those on screen, and a full
// table is built in chunks: the first screenful at once, the rest between
// frames.  A row's data is kept from the start (counts and filters see every
// slave); its elements exist once its chunk is built.
//
// On masters sharing a PostgreSQL store the feed has every slave of the
// cluster, each with its master: the Master column shows (body.cluster),
// and a slave another master holds is marked "remote".  Its job link works
// here (the job store is shared, and so is Cancel on the job's page).
"use strict";
(function () {
  const FIELDS = ["name", "state", "transport", "peer", "platform", "since", "job", "master"];
  const STATES = ["idle", "busy", "away", "resuming"];
  const FIRST = 100;
  const CHUNK = 1000;
  const tbody = document.getElementById("slaves");
  const globInput = document.getElementById("glob");
  const stateSelect = document.getElementById("state");
  const countsEl = document.getElementById("counts");
  const here = (document.querySelector('meta[name="master"]') || {}).content || "";
  const rows = new Map();
  let names = [];
  let built = 0;   // names[0 .. built) have their elements, in order, in tbody
  let building = false;
  let pattern = null;
  let wanted = "";

  const template = remsh.el("div", "row");
  template.setAttribute("role", "row");
  for (const f of FIELDS) {
    const cell = remsh.el("div", "f-" + f);
    cell.setAttribute("role", "cell");
    template.appendChild(cell);
  }

  function visible(entry) {
    return (!pattern || pattern.test(entry.data.name)) && (!wanted || entry.data.state === wanted);
  }
  function show(entry, f) {
    const v = entry.data[f];
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
    if (f === "state" || f === "master") {
      entry.tr.className = "row state-" + (STATES.indexOf(entry.data.state) >= 0 ? entry.data.state : "other") +
        (entry.data.master && entry.data.master !== here ? " remote" : "");
    }
    if (f === "master") {
      td.title = v ? (v === here ? "held by this master" : "held by master " + v) : "";
      if (v) document.body.classList.add("cluster");
    }
  }
  function update(entry, data) {
    for (const f of FIELDS) {
      const v = data[f] === null || data[f] === undefined ? "" : String(data[f]);
      if (entry.data[f] === v) continue;
      entry.data[f] = v;
      if (entry.tr) show(entry, f);
    }
    if (entry.tr) entry.tr.hidden = !visible(entry);
  }
  function materialise(entry) {
    entry.tr = template.cloneNode(true);
    entry.cells = {};
    for (let i = 0; i < FIELDS.length; i++) entry.cells[FIELDS[i]] = entry.tr.children[i];
    for (const f of FIELDS) show(entry, f);
    entry.tr.hidden = !visible(entry);
    return entry.tr;
  }
  function buildSome(count) {
    const frag = document.createDocumentFragment();
    const end = Math.min(names.length, built + count);
    for (; built < end; built++) frag.appendChild(materialise(rows.get(names[built])));
    tbody.appendChild(frag);
    if (built < names.length) {
      building = true;
      setTimeout(function () { buildSome(CHUNK); }, 0);
    } else {
      building = false;
      document.body.dataset.built = String(built);
    }
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
    const old = rows.get(data.name);
    if (old) { update(old, data); return; }
    const entry = { tr: null, cells: null, data: {} };
    update(entry, data);
    const i = position(data.name);
    names.splice(i, 0, data.name);
    rows.set(data.name, entry);
    if (i < built) {  // among the built rows: in place now; otherwise its chunk builds it
      tbody.insertBefore(materialise(entry), rows.get(names[i + 1]).tr);
      built++;
    } else if (!building && i === built) {
      tbody.appendChild(materialise(entry));
      built++;
    }
  }
  function remove(name) {
    const entry = rows.get(name);
    if (!entry) return;
    const i = position(name);
    if (entry.tr) { entry.tr.remove(); built--; }
    rows.delete(name);
    names.splice(i, 1);
  }
  function reset(all) {
    all.sort(function (a, b) { return a.name < b.name ? -1 : a.name > b.name ? 1 : 0; });
    rows.clear();
    tbody.replaceChildren();
    names = all.map(function (d) { return d.name; });
    for (const data of all) {
      const entry = { tr: null, cells: null, data: {} };
      update(entry, data);
      rows.set(data.name, entry);
    }
    built = 0;
    if (!building) buildSome(FIRST);
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
    for (const entry of rows.values()) if (entry.tr) entry.tr.hidden = !visible(entry);
  }
  globInput.addEventListener("input", refilter);
  stateSelect.addEventListener("change", refilter);
  document.getElementById("filters").addEventListener("submit", function (e) { e.preventDefault(); });
  remsh.live("/api/live/fleet", function (m) {
    if (m.reset) {
      reset(m.reset);
      if (!document.body.dataset.paintMs) {
        // after the frame that shows the first rows: first paint, layout included
        requestAnimationFrame(function () {
          setTimeout(function () { document.body.dataset.paintMs = String(Math.round(performance.now())); }, 0);
        });
      }
    }
    for (const data of m.set || []) upsert(data);
    for (const name of m.del || []) remove(name);
    counts();
    document.body.dataset.ready = "yes";
  });
})();
