// A job's page: per slave its state, exit status, duration, a progress
// bar (put/get) and its output, stdout and stderr told apart, live.
"use strict";
(function () {
  const jobId = decodeURIComponent(location.pathname.split("/").pop());
  const container = document.getElementById("slaves");
  const cancelButton = document.getElementById("cancel");
  const message = document.getElementById("message");
  const note = document.getElementById("progress-note");
  const slaves = new Map();
  let record = null;
  let source = null;
  let sawProgress = false;

  function section(name) {
    let s = slaves.get(name);
    if (s) return s;
    const box = remsh.el("section", "slave");
    const head = remsh.el("h2");
    const title = remsh.el("span", "name", name);
    const state = remsh.el("span", "state");
    const exit = remsh.el("span", "exit");
    const took = remsh.el("span", "took");
    head.append(title, " ", state, " ", exit, " ", took);
    const bar = document.createElement("progress");
    bar.hidden = true;
    const barText = remsh.el("span", "progress-text");
    const error = remsh.el("p", "error");
    const out = remsh.el("pre", "output");
    box.append(head, bar, barText, error, out);
    box.dataset.slave = name;
    container.appendChild(box);
    s = { box: box, state: state, exit: exit, took: took, bar: bar, barText: barText, error: error, out: out,
          last: null, lastStream: null };
    slaves.set(name, s);
    return s;
  }
  function showRecord(rec) {
    record = rec;
    document.getElementById("job-id").textContent = rec.id;
    const st = document.getElementById("job-state");
    st.textContent = rec.state;
    st.className = "state job-" + rec.state;
    document.getElementById("job-kind").textContent = rec.kind;
    document.getElementById("job-what").textContent = remsh.what(rec);
    document.title = "remsh: job " + rec.id;
    cancelButton.hidden = rec.state !== "running";
    for (const [name, r] of Object.entries(rec.slaves || {})) {
      const s = section(name);
      s.state.textContent = r.state;
      s.box.className = "slave slave-" + r.state;
      s.exit.textContent = r.exit_status === null || r.exit_status === undefined ? "" : "exit " + r.exit_status;
      s.took.textContent = remsh.duration(r.started, r.finished);
      s.error.textContent = r.error || "";
    }
    if (rec.kind === "put" || rec.kind === "get") {
      note.hidden = sawProgress;
      note.textContent = "No transfer progress reported yet.";
    } else {
      note.hidden = true;
    }
  }
  function refresh() {
    return fetch("/api/jobs/" + encodeURIComponent(jobId), { credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (rec) { if (rec) showRecord(rec); });
  }
  function output(ev) {
    const s = section(ev.slave);
    if (s.last && s.lastStream === ev.stream) {
      s.last.appendChild(document.createTextNode(ev.text));
    } else {
      s.last = remsh.el("span", ev.stream === "stderr" ? "stderr" : "stdout", ev.text);
      s.lastStream = ev.stream;
      s.out.appendChild(s.last);
    }
  }
  function progress(ev) {
    const s = section(ev.slave);
    sawProgress = true;
    note.hidden = true;
    s.bar.hidden = false;
    if (ev.total !== undefined && ev.total !== null && ev.total > 0) {
      s.bar.max = ev.total;
      s.bar.value = Math.min(ev.done, ev.total);
      s.barText.textContent = " " + ev.done + " / " + ev.total + " bytes";
    } else {
      s.bar.removeAttribute("value");
      s.barText.textContent = " " + ev.done + " bytes";
    }
  }
  function onEvents(events) {
    let changed = false;
    for (const ev of events) {
      if (ev.ev === "jobrec") {
        for (const s of slaves.values()) { s.out.replaceChildren(); s.last = null; s.lastStream = null; }
      } else if (ev.ev === "begin") {
        for (const name of ev.names || []) section(name);
      } else if (ev.ev === "out") {
        output(ev);
      } else if (ev.ev === "progress") {
        progress(ev);
      } else if (ev.ev === "end" || ev.ev === "state") {
        changed = true;
      } else if (ev.ev === "done") {
        if (source) source.close();
        document.getElementById("live").textContent = "ended";
        changed = true;
      } else if (ev.ev === "fail") {
        message.textContent = ev.message || "";
      }
    }
    if (changed) refresh();
  }
  cancelButton.addEventListener("click", function () {
    cancelButton.disabled = true;
    fetch("/api/jobs/" + encodeURIComponent(jobId) + "/cancel",
          { method: "POST", credentials: "same-origin", headers: { "X-CSRF-Token": remsh.csrf() } })
      .then(function (r) { return r.json().then(function (body) { return [r.ok, body]; }); })
      .then(function (res) {
        message.textContent = res[0] ? "cancelling" : (res[1].error || "cannot cancel");
        cancelButton.disabled = false;
        return refresh();
      });
  });
  refresh().then(function () {
    source = remsh.live("/api/live/jobs/" + encodeURIComponent(jobId), onEvents);
    document.body.dataset.ready = "yes";
  });
  setInterval(function () { if (record && record.state === "running") refresh(); }, 1000);
})();
