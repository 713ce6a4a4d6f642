// Shared by the dashboard's pages.  Everything a slave or a command
// supplies is written with textContent (never as HTML).
"use strict";
const remsh = (function () {
  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  function csrf() {
    const meta = document.querySelector('meta[name="csrf"]');
    return meta ? meta.getAttribute("content") : "";
  }
  function time(epoch) {
    if (epoch === null || epoch === undefined) return "";
    return new Date(epoch * 1000).toISOString().replace(/\.\d+Z$/, "Z");
  }
  function duration(start, end) {
    if (start === null || start === undefined) return "";
    const stop = (end === null || end === undefined) ? Date.now() / 1000 : end;
    const s = Math.max(0, stop - start);
    if (s < 60) return s.toFixed(1) + "s";
    const m = Math.floor(s / 60);
    if (m < 60) return m + "m" + String(Math.floor(s % 60)).padStart(2, "0") + "s";
    return Math.floor(m / 60) + "h" + String(m % 60).padStart(2, "0") + "m";
  }
  function glob(pattern) {
    // fnmatch-style: * ? [...]; everything else literal
    let re = "";
    for (let i = 0; i < pattern.length; i++) {
      const c = pattern[i];
      if (c === "*") re += ".*";
      else if (c === "?") re += ".";
      else if (c === "[") {
        const j = pattern.indexOf("]", i + 1);
        if (j < 0) { re += "\\["; continue; }
        let body = pattern.slice(i + 1, j).replace(/\\/g, "\\\\");
        if (body[0] === "!") body = "^" + body.slice(1);
        re += "[" + body + "]";
        i = j;
      } else re += c.replace(/[.+^${}()|\\\/\]]/g, "\\$&");
    }
    try { return new RegExp("^" + re + "$"); } catch (e) { return null; }
  }
  // An EventSource whose state shows in the #live badge.
  function live(url, onMessage) {
    const badge = document.getElementById("live");
    const source = new EventSource(url);
    source.onopen = function () { if (badge) { badge.textContent = "live"; badge.className = "live on"; } };
    source.onerror = function () {
      if (badge) { badge.textContent = source.readyState === 2 ? "ended" : "reconnecting"; badge.className = "live off"; }
    };
    source.onmessage = function (e) { onMessage(JSON.parse(e.data)); };
    return source;
  }
  function what(rec) {
    if (Array.isArray(rec.argv)) return rec.argv.join(" ");
    if (Array.isArray(rec.paths)) return rec.paths.join(" -> ");
    return "";
  }
  return { el: el, csrf: csrf, time: time, duration: duration, glob: glob, live: live, what: what };
})();
