// Kairos's page: replicas, timelines, states, diffs, proposals and their what-if, with
// live events. Every element is built with textContent: data never becomes markup.

const TOKEN_KEY = "kairos-token";
const main = document.getElementById("main");
const ROLE_ORDER = ["viewer", "proposer", "reviewer", "committer", "admin"];
const CONTENT_VIEW_BYTES_MAX = 256 * 1024;
let me = null;          // {party, role, replicas}
let view = null;        // the current view's event handler, if any
window.kairosTimings = {}; // measured by the browser test

// ---- DOM and API helpers ------------------------------------------------------------

function h(tag, attrs, ...children) {
  const element = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) element.addEventListener(key.slice(2), value);
    else if (key === "class") element.className = value;
    // Through the CSSOM: the page's CSP allows no style attributes.
    else if (key === "style") element.style.cssText = value;
    else element.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return element;
}

function short(id) { return id ? String(id).slice(0, 12) : "—"; }
function when(text) {
  if (!text) return "—";
  const date = new Date(text);
  return isNaN(date) ? String(text) : date.toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
}
function bytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0; let v = Number(n);
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return (i ? v.toFixed(1) : v) + " " + units[i];
}
function may(role) { return me && ROLE_ORDER.indexOf(me.role) >= ROLE_ORDER.indexOf(role); }
function enc(text) { return encodeURIComponent(text); }

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (token()) headers["Authorization"] = "Bearer " + token();
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method: options.method || "GET",
    headers,
    body: options.body === undefined ? undefined : JSON.stringify(options.body),
  });
  if (options.raw) {
    if (!response.ok) throw await apiError(response);
    return response;
  }
  if (!response.ok) throw await apiError(response);
  if (response.status === 204) return null;
  return response.json();
}

async function apiError(response) {
  let message = response.status + " " + response.statusText;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) { /* not JSON */ }
  const error = new Error(message);
  error.status = response.status;
  return error;
}

function banner(message, kind) {
  const element = document.getElementById("banner");
  if (!message) { element.hidden = true; return; }
  element.hidden = false;
  element.className = "banner" + (kind ? " " + kind : "");
  element.textContent = message;
}

function toast(message, kind) {
  const element = h("div", { class: "toast " + (kind || "") }, message);
  document.getElementById("toasts").append(element);
  setTimeout(() => element.remove(), 6000);
}

function crumbs(...links) {
  const nav = document.getElementById("crumbs");
  nav.replaceChildren(...links.map(([text, href]) => h("a", { href }, text)));
}

function show(...children) { main.replaceChildren(...children); }
// A view shows itself only if the page is still where it was asked for: a slower view
// of a page left meanwhile never replaces the one now shown.
function showIf(here, ...children) {
  if (location.hash !== here) return false;
  show(...children);
  return true;
}

async function guard(action) {
  try { banner(null); return await action(); } catch (error) {
    if (error.status === 401) { sessionStorage.removeItem(TOKEN_KEY); signIn(error.message); return; }
    banner(error.message);
    throw error;
  }
}

// ---- sign-in --------------------------------------------------------------------------

function signIn(reason) {
  crumbs();
  view = null;
  const input = h("input", { type: "password", id: "token", placeholder: "kairos_…", autocomplete: "off" });
  const form = h("form", { class: "panel signin", id: "signin", onsubmit: async (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    await start();
  } },
    h("h1", {}, "Sign in"),
    h("p", { class: "muted" }, "With a party's token (`kairos party add NAME --role ROLE` prints one). A node without parties needs none."),
    reason ? h("p", { class: "badge bad" }, reason) : null,
    input,
    h("div", { class: "actions" }, h("button", { class: "primary", type: "submit" }, "Sign in")));
  show(form);
}

async function start() {
  try {
    me = await api("/api/whoami");
  } catch (error) {
    if (error.status === 401) {
      const given = token();
      sessionStorage.removeItem(TOKEN_KEY);
      signIn(given ? error.message : null);
      return;
    }
    banner(error.message); return;
  }
  document.getElementById("who").textContent = (me.party || "local") + " · " + me.role;
  connectEvents();
  route();
}

// ---- live events (server-sent events over fetch, so the token goes in a header) -------

let eventsController = null;
// Reconnecting starts from the last event seen (events at that instant come again and
// are dropped by id), so a dropped stream loses nothing.
let lastEventTime = null;
const seenEvents = new Set();
async function connectEvents() {
  if (eventsController) eventsController.abort();
  eventsController = new AbortController();
  const live = document.getElementById("live");
  for (;;) {
    try {
      const headers = token() ? { Authorization: "Bearer " + token() } : {};
      const from = lastEventTime ? "?since=" + encodeURIComponent(lastEventTime) : "";
      const response = await fetch("/api/events" + from, { headers, signal: eventsController.signal });
      if (response.status === 401) {
        live.className = "live off";
        sessionStorage.removeItem(TOKEN_KEY);
        signIn((await apiError(response)).message);
        return;
      }
      if (!response.ok) throw await apiError(response);
      live.className = "live on";
      live.title = "live updates";
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const data = block.split("\n").filter((line) => line.startsWith("data:")).map((line) => line.slice(5).trim()).join("\n");
          if (data) onEvent(JSON.parse(data));
        }
      }
      // The stream ended: the token may have been revoked meanwhile.
      const check = await fetch("/api/whoami", { headers });
      if (check.status === 401) {
        live.className = "live off";
        sessionStorage.removeItem(TOKEN_KEY);
        signIn((await apiError(check)).message);
        return;
      }
    } catch (error) {
      if (error.name === "AbortError") return;
      live.title = "live updates are off: " + error.message;
    }
    live.className = "live off";
    await new Promise((resolve) => setTimeout(resolve, live.title.includes("too many") ? 10000 : 2000));
  }
}

function onEvent(event) {
  if (seenEvents.has(event.id)) return;
  seenEvents.add(event.id);
  if (seenEvents.size > 4096) seenEvents.delete(seenEvents.values().next().value);
  lastEventTime = event.time;
  const arrived = Date.now();
  const lag = arrived - Date.parse(event.time);
  window.kairosTimings.lastEvent = { event: event.event, id: event.id, lag_ms: lag, details: event.details };
  (window.kairosTimings.events = window.kairosTimings.events || []).push({ event: event.event, lag_ms: lag, status: event.details && event.details.status });
  if (["commit", "rollback", "revert", "approval", "review", "interference", "proposal"].includes(event.event)) {
    const status = event.details && event.details.status ? " " + event.details.status : "";
    const kind = event.event === "rollback" || status.includes("rolled_back") ? "bad" : (status.includes("committed") ? "good" : "");
    toast(event.event + status + " on " + event.replica + "/" + event.timeline + " by " + event.party, kind);
  }
  if (view) view(event);
}

// ---- routing --------------------------------------------------------------------------

function route() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").map((part) => {
    try { return decodeURIComponent(part); } catch (_) { return ""; }
  });
  view = null;
  // Re-renders the page left had scheduled would draw it over the new one.
  for (const key of Object.keys(timers)) clearTimeout(timers[key]);
  if (!parts[0]) return home();
  if (parts[0] === "replica" && parts[1]) {
    if (parts[2] === "proposals") return proposals(parts[1]);
    if (parts[2] === "proposal" && parts[3]) return whatIf(parts[1], parts[3]);
    return timeline(parts[1], parts[2] || "main");
  }
  home();
}
window.addEventListener("hashchange", () => { if (me) route(); });

// ---- replicas -------------------------------------------------------------------------

async function home() {
  const here = location.hash;
  crumbs(["Replicas", "#/"]);
  const [status, replicas] = await guard(() => Promise.all([api("/api/status"), api("/api/replicas")]));
  const logs = await Promise.all(replicas.map((replica) => api("/api/replicas/" + enc(replica.name) + "/log").catch(() => ({ entries: [] }))));
  const uptimeMinutes = Math.max(status.uptime_ms / 60000, 1 / 60);
  const rows = replicas.map((replica, index) => {
    const state = status.replicas.find((r) => r.name === replica.name) || {};
    const entries = logs[index].entries || [];
    const lastOf = (names) => [...entries].reverse().find((entry) => names.includes(entry.event));
    const commit = lastOf(["commit", "revert"]);
    const rollback = lastOf(["rollback"]);
    const healthy = state.watching && !state.last_error;
    return h("tr", {},
      h("td", {}, h("a", { href: "#/replica/" + enc(replica.name) }, replica.name)),
      h("td", {}, h("span", { class: "badge " + (healthy ? "good" : "bad"), title: state.last_error || "" }, healthy ? "healthy" : (state.last_error ? "capture failing" : "not watched"))),
      h("td", { class: "mono" }, short(state.last_frame)),
      h("td", {}, ((state.captures || 0) / uptimeMinutes).toFixed(1) + "/min", h("span", { class: "muted" }, " (" + (state.captures_unchanged || 0) + " unchanged)")),
      h("td", {}, commit ? (commit.details.status || commit.event) + " · " + when(commit.time) : "—"),
      h("td", {}, rollback ? when(rollback.time) : "—"));
  });
  if (!showIf(here, h("h1", {}, "Replicas"),
    h("div", { class: "panel" }, h("table", { id: "replicas" },
      h("thead", {}, h("tr", {}, ["Replica", "Health", "Latest frame", "Captures", "Last commit", "Last rollback"].map((t) => h("th", {}, t)))),
      h("tbody", {}, rows))))) return;
  view = (event) => { if (["frame", "commit", "rollback", "revert"].includes(event.event)) debounce("home", home, 500); };
}

const timers = {};
const selections = {};

/// Runs an action with its button disabled meanwhile (no double commits).
async function busy(button, action) {
  button.disabled = true;
  try { await action(); } catch (_) { /* shown by guard */ } finally { button.disabled = false; }
}
function debounce(key, action, ms) { clearTimeout(timers[key]); timers[key] = setTimeout(action, ms); }

// ---- timeline, state, diff ------------------------------------------------------------

function tabs(name, active) {
  return h("div", { class: "tabs" },
    h("a", { href: "#/replica/" + enc(name), class: active === "timeline" ? "active" : "" }, "Timeline"),
    h("a", { href: "#/replica/" + enc(name) + "/proposals", class: active === "proposals" ? "active" : "" }, "Proposals"));
}

async function timeline(name, timelineName) {
  const here = location.hash;
  crumbs(["Replicas", "#/"], [name, "#/replica/" + enc(name)]);
  const started = performance.now();
  const [timelines, log, series] = await guard(() => Promise.all([
    api("/api/replicas/" + enc(name) + "/timelines"),
    api("/api/replicas/" + enc(name) + "/log").catch(() => ({ entries: [] })),
    api("/api/replicas/" + enc(name) + "/series?from=" + enc("7d")).catch(() => []),
  ]));
  // The chosen timeline, main and up to six more are drawn (each is one request).
  const lanes = [...new Set([timelineName, "main", ...timelines.map((t) => t.name)])]
    .filter((lane) => timelines.some((t) => t.name === lane)).slice(0, 8);
  const histories = {};
  await guard(() => Promise.all(lanes.map(async (lane) => {
    histories[lane] = await api("/api/replicas/" + enc(name) + "/history?timeline=" + enc(lane));
  })));
  const drawnTimelines = timelines.filter((t) => lanes.includes(t.name));
  const fetched = performance.now();
  const frames = histories[timelineName] || [];
  const select = h("select", { id: "timeline-select", onchange: () => { location.hash = "#/replica/" + enc(name) + "/" + enc(select.value); } },
    timelines.map((t) => h("option", { value: t.name, selected: t.name === timelineName }, t.name + (t.fork ? " (fork)" : ""))));
  const canvas = h("canvas", { id: "timeline-canvas", height: 40 + 26 * drawnTimelines.length });
  const metricsCanvas = h("canvas", { id: "metrics-canvas", height: 110 });
  const range = h("input", { type: "range", id: "scrubber", min: 0, max: Math.max(frames.length - 1, 0), value: Math.max(frames.length - 1, 0) });
  const label = h("span", { id: "scrub-label", class: "mono" });
  const statePanel = h("div", { id: "state" });
  const compare = { pinned: null };
  const pinButton = h("button", { id: "pin", onclick: () => { compare.pinned = frames[Number(range.value)]; pinButton.textContent = "Compare with " + short(compare.pinned.frame) + " (pinned)"; refreshDiff(); } }, "Pin this frame to compare");
  const diffPanel = h("div", { id: "diff" });
  const revertButton = may("committer") && timelineName === "main"
    ? h("button", { class: "danger", id: "revert", onclick: () => revert(name, frames[Number(range.value)]) }, "Revert the replica to this frame…") : null;

  if (!showIf(here, h("h1", {}, name), tabs(name, "timeline"),
    h("div", { class: "panel" },
      h("div", { class: "actions" }, "Timeline ", select, h("span", { class: "muted" }, frames.length + " frames"),
        timelines.length > drawnTimelines.length ? h("span", { class: "muted" }, " · " + (timelines.length - drawnTimelines.length) + " more timelines not drawn (choose one above)") : null),
      canvas,
      h("div", { class: "legend" }, h("span", {}, "▮ frame"), h("span", {}, "▲ commit"), h("span", {}, "✕ rollback")),
      metricsCanvas,
      h("div", { class: "scrub" }, range, label),
      h("div", { class: "actions" }, pinButton, revertButton)),
    h("div", { class: "grid3" }, statePanel, h("div", { class: "panel" }, h("h2", {}, "Diff"), diffPanel)))) return;

  const marks = (log.entries || []).filter((e) => ["commit", "rollback", "revert"].includes(e.event));
  const drawn = drawTimeline(canvas, drawnTimelines, histories, timelineName, marks, frames, Number(range.value));
  drawMetrics(metricsCanvas, series, drawn);
  window.kairosTimings.timeline = { frames: frames.length, fetch_ms: fetched - started, render_ms: performance.now() - fetched };

  let request = 0;
  async function showFrame() {
    const frame = frames[Number(range.value)];
    if (!frame) { statePanel.replaceChildren(h("p", { class: "muted" }, "No frames yet.")); return; }
    label.textContent = short(frame.frame) + " · " + when(frame.time);
    const asked = ++request;
    const t0 = performance.now();
    const state = await guard(() => api("/api/replicas/" + enc(name) + "/state?at=" + enc(frame.frame)));
    if (asked !== request) return;
    renderState(statePanel, name, state);
    drawTimeline(canvas, drawnTimelines, histories, timelineName, marks, frames, Number(range.value));
    window.kairosTimings.scrub = { frame: frame.frame, ms: performance.now() - t0 };
    refreshDiff();
  }
  async function refreshDiff() {
    if (!compare.pinned) { diffPanel.replaceChildren(h("p", { class: "muted" }, "Pin a frame, then move the scrubber: the diff between the two shows here.")); return; }
    const frame = frames[Number(range.value)];
    const diff = await guard(() => api("/api/replicas/" + enc(name) + "/diff?from=" + enc(compare.pinned.frame) + "&to=" + enc(frame.frame)));
    diffPanel.replaceChildren(renderDiff(diff));
  }
  range.addEventListener("input", showFrame);
  await showFrame();
  // Live: a new frame is added where the user is (the scrubber, pin and open file stay);
  // commits and rollbacks are marked; a fork or deletion is announced, not forced.
  view = (event) => {
    if (event.replica !== name) return;
    if (event.event === "frame" && histories[event.timeline]) {
      const list = histories[event.timeline];
      if (list.some((f) => f.frame === event.details.frame)) return;
      list.push({ frame: event.details.frame, time: event.time, timeline: event.timeline, parent: event.details.parent });
      if (event.timeline === timelineName) {
        const atEnd = Number(range.value) === frames.length - 2;
        range.max = String(frames.length - 1);
        if (atEnd) { range.value = String(frames.length - 1); showFrame(); return; }
      }
      drawTimeline(canvas, drawnTimelines, histories, timelineName, marks, frames, Number(range.value));
    } else if (["commit", "rollback", "revert"].includes(event.event)) {
      marks.push({ event: event.event, time: event.time, timeline: event.timeline, details: event.details });
      drawTimeline(canvas, drawnTimelines, histories, timelineName, marks, frames, Number(range.value));
    } else if (["fork", "timeline_deleted"].includes(event.event)) {
      banner("Timeline " + event.timeline + (event.event === "fork" ? " was forked" : " was deleted") + " by " + event.party + "; reload the page to see it.", "info");
    }
  };
}

function drawTimeline(canvas, timelines, histories, current, marks, frames, selected) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 900;
  const height = Number(canvas.getAttribute("height"));
  canvas.width = width * ratio; canvas.height = height * ratio;
  canvas.style.height = height + "px";
  const g = canvas.getContext("2d");
  g.scale(ratio, ratio);
  let min = Infinity, max = -Infinity;
  for (const t of timelines) for (const f of histories[t.name] || []) { const x = Date.parse(f.time); if (x < min) min = x; if (x > max) max = x; }
  if (!isFinite(min)) return { min: 0, max: 1, left: 90, right: width - 10 };
  if (max === min) max = min + 1000;
  const left = 90, right = width - 10;
  const x = (time) => left + (right - left) * (Date.parse(time) - min) / (max - min);
  g.font = "12px system-ui, sans-serif";
  timelines.forEach((t, lane) => {
    const y = 20 + lane * 26;
    const list = histories[t.name] || [];
    g.fillStyle = t.name === current ? "#1d2127" : "#6a7079";
    g.fillText(t.name.length > 12 ? t.name.slice(0, 11) + "…" : t.name, 4, y + 4);
    g.strokeStyle = "#c9ced6"; g.lineWidth = 2;
    if (list.length) {
      g.beginPath(); g.moveTo(x(list[0].time), y); g.lineTo(x(list[list.length - 1].time), y); g.stroke();
    }
    // A fork branches from its base on main.
    if (t.fork && list.length) {
      g.strokeStyle = "#8aa4d6"; g.beginPath(); g.moveTo(x(list[0].time), 20); g.lineTo(x(list[0].time), y); g.stroke();
    }
    g.fillStyle = t.name === current ? "#2457c5" : "#8a94a3";
    const step = Math.max(1, Math.floor(list.length / (right - left)));
    let drawn = 0;
    for (let i = 0; i < list.length; i += step) { g.fillRect(x(list[i].time) - 1.5, y - 4, 3, 8); drawn++; }
    if (t.name === current) window.kairosTimings.drawn = { marks: drawn, first: list.length ? x(list[0].time) : null, last: list.length ? x(list[list.length - 1].time) : null };
    for (const mark of marks.filter((m) => m.timeline === t.name)) {
      const mx = x(mark.time);
      if (mark.event === "rollback" || (mark.details && mark.details.status === "rolled_back")) {
        g.strokeStyle = "#c0392b"; g.lineWidth = 2;
        g.beginPath(); g.moveTo(mx - 4, y - 9); g.lineTo(mx + 4, y - 1); g.moveTo(mx + 4, y - 9); g.lineTo(mx - 4, y - 1); g.stroke();
      } else {
        g.fillStyle = "#1f8a4c"; g.beginPath(); g.moveTo(mx, y - 12); g.lineTo(mx - 5, y - 5); g.lineTo(mx + 5, y - 5); g.fill();
      }
    }
  });
  const chosen = frames[selected];
  if (chosen) {
    const sx = x(chosen.time);
    g.strokeStyle = "#c0392b"; g.lineWidth = 1;
    g.beginPath(); g.moveTo(sx, 4); g.lineTo(sx, height - 4); g.stroke();
  }
  return { min, max, left, right };
}

function drawMetrics(canvas, samples, span) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 900, height = 110;
  canvas.width = width * ratio; canvas.height = height * ratio; canvas.style.height = height + "px";
  const g = canvas.getContext("2d");
  g.scale(ratio, ratio);
  g.font = "12px system-ui, sans-serif"; g.fillStyle = "#6a7079";
  if (!samples.length) { g.fillText("no runtime samples in the last 7 days", 90, 60); return; }
  const left = span.left || 90, right = span.right || width - 10;
  let min = span.min, max = span.max;
  for (const s of samples) { const t = Date.parse(s.at); if (t < min) min = t; if (t > max) max = t; }
  if (!(max > min)) max = min + 1000;
  const x = (t) => left + (right - left) * (t - min) / (max - min);
  const cpuMax = Math.max(1, ...samples.map((s) => s.cpu_percent_max || s.cpu_percent));
  const rssMax = Math.max(1, ...samples.map((s) => s.memory_rss_bytes_max || s.memory_rss_bytes));
  const line = (value, top, color) => {
    g.strokeStyle = color; g.lineWidth = 1.5; g.beginPath();
    samples.forEach((s, i) => { const px = x(Date.parse(s.at)), py = top + 40 - 38 * value(s); if (i) g.lineTo(px, py); else g.moveTo(px, py); });
    g.stroke();
  };
  g.fillText("CPU %", 4, 24); g.fillText("≤ " + cpuMax.toFixed(0) + "%", 4, 38);
  line((s) => s.cpu_percent / cpuMax, 8, "#2457c5");
  g.fillStyle = "#6a7079"; g.fillText("RSS", 4, 78); g.fillText("≤ " + bytes(rssMax), 4, 92);
  line((s) => s.memory_rss_bytes / rssMax, 62, "#1f8a4c");
}

function renderState(panel, name, state) {
  const files = state.entries || [];
  const shown = files.slice(0, 1000);
  const content = h("div", { id: "content" });
  panel.replaceChildren(h("div", { class: "panel" },
    h("h2", {}, "State at " + short(state.frame.id) + " · " + when(state.frame.time)),
    h("div", { class: "grid2" },
      h("div", {},
        h("h3", {}, "Files (" + files.length + ")"),
        h("table", { id: "files" }, h("tbody", {}, shown.map((entry) => h("tr", {},
          h("td", { class: "mono" }, entry.kind === "file"
            ? h("a", { href: "#", onclick: (event) => { event.preventDefault(); openFile(content, name, state.frame.id, entry); } }, entry.path)
            : entry.path + (entry.kind === "dir" ? "/" : "")),
          h("td", { class: "muted" }, entry.kind === "file" ? bytes(entry.size) : entry.kind),
          h("td", { class: "mono muted" }, entry.mode || ""))))),
        files.length > shown.length ? h("p", { class: "muted" }, (files.length - shown.length) + " more files (kairos show lists them all)") : null),
      h("div", {},
        h("h3", {}, "Config keys (" + (state.config || []).length + ")"),
        h("table", { id: "config" }, h("tbody", {}, (state.config || []).slice(0, 1000).map((key) => h("tr", {},
          h("td", { class: "mono" }, key.file), h("td", { class: "mono" }, key.key), h("td", { class: "mono" }, String(key.value)))))),
        h("h3", {}, "Processes (" + (state.processes || []).length + ")"),
        h("table", {}, h("tbody", {}, (state.processes || []).map((p) => h("tr", {},
          h("td", { class: "mono" }, p.pid), h("td", { class: "mono" }, p.name || ""), h("td", { class: "mono muted" }, (p.cmdline || []).join ? (p.cmdline || []).join(" ") : String(p.cmdline || "")))))),
        h("h3", {}, "Metrics"),
        h("table", {}, h("tbody", {},
          h("tr", {}, h("td", {}, "CPU"), h("td", {}, ((state.metrics_nearest || state.metrics).cpu_percent || 0).toFixed(1) + "%")),
          h("tr", {}, h("td", {}, "RSS"), h("td", {}, bytes((state.metrics_nearest || state.metrics).memory_rss_bytes))),
          h("tr", {}, h("td", {}, "Files"), h("td", {}, state.metrics.files)),
          h("tr", {}, h("td", {}, "Disk"), h("td", {}, bytes(state.metrics.disk_allocated_bytes))))))),
    content));
}

let objectUrl = null;
async function openFile(panel, name, frame, entry, whole) {
  if (objectUrl) { URL.revokeObjectURL(objectUrl); objectUrl = null; }
  if (entry.size > 16 * CONTENT_VIEW_BYTES_MAX && !whole) {
    panel.replaceChildren(h("h3", {}, entry.path), h("p", { class: "badge warn", id: "large" }, "large file: " + bytes(entry.size) + ", not loaded"), " ",
      h("button", { onclick: () => openFile(panel, name, frame, entry, true) }, "Load it"));
    return;
  }
  const response = await guard(() => api("/api/replicas/" + enc(name) + "/file?path=" + enc(entry.path) + "&at=" + enc(frame), { raw: true }));
  const blob = await response.blob();
  const head = new Uint8Array(await blob.slice(0, CONTENT_VIEW_BYTES_MAX).arrayBuffer());
  let text = null;
  try { text = new TextDecoder("utf-8", { fatal: true }).decode(head, { stream: blob.size > CONTENT_VIEW_BYTES_MAX }); } catch (_) { text = null; }
  if (text !== null && text.includes("\u0000")) text = null;
  objectUrl = URL.createObjectURL(blob);
  const download = h("a", { href: objectUrl, download: entry.path.split("/").pop() }, "download (" + bytes(blob.size) + ")");
  panel.replaceChildren(h("h3", {}, entry.path + " "), download,
    text === null ? h("p", { class: "badge warn", id: "binary" }, "binary content: " + bytes(blob.size) + ", not shown")
      : h("div", {},
        blob.size > CONTENT_VIEW_BYTES_MAX ? h("p", { class: "badge warn", id: "truncated" }, "first " + bytes(CONTENT_VIEW_BYTES_MAX) + " of " + bytes(blob.size) + " shown") : null,
        h("pre", { class: "content", id: "file-content" }, text)));
}

function renderDiff(diff) {
  const files = diff.files || [], config = diff.config || [];
  if (!files.length && !config.length) return h("p", { class: "muted" }, "No change between " + short(diff.from.id) + " and " + short(diff.to.id) + ".");
  return h("div", {},
    h("p", { class: "muted" }, short(diff.from.id) + " → " + short(diff.to.id)),
    h("table", { id: "diff-files" }, h("tbody", {}, files.map((f) => h("tr", { class: f.change === "added" ? "added" : f.change === "removed" ? "removed" : "changed" },
      h("td", {}, f.change), h("td", { class: "mono" }, f.path))))),
    config.length ? h("table", { id: "diff-config" }, h("tbody", {}, config.map((c) => h("tr", { class: "changed" },
      h("td", { class: "mono" }, c.file + " " + c.key), h("td", { class: "mono" }, c.from === null || c.from === undefined ? "∅" : String(c.from)), h("td", {}, "→"), h("td", { class: "mono" }, c.to === null || c.to === undefined ? "∅" : String(c.to)))))) : null);
}

async function revert(name, frame) {
  const head = await guard(() => api("/api/replicas/" + enc(name) + "/frame?at=latest"));
  const diff = await guard(() => api("/api/replicas/" + enc(name) + "/diff?from=latest&to=" + enc(frame.frame)));
  const dialog = h("div", { class: "panel", id: "revert-preview" },
    h("h2", {}, "Revert " + name + " to " + short(frame.frame) + "?"),
    h("p", {}, "The live replica goes from its head (" + short(head.frame ? head.frame.id : head.id) + ") to the state of " + when(frame.time) + ". This changes:"),
    renderDiff(diff),
    h("div", { class: "actions" },
      h("button", { class: "danger", id: "revert-confirm", onclick: (event) => busy(event.target, async () => {
        const now = await guard(() => api("/api/replicas/" + enc(name) + "/frame?at=latest"));
        const nowId = now.frame ? now.frame.id : now.id;
        const seenId = head.frame ? head.frame.id : head.id;
        if (nowId !== seenId) {
          banner("Not reverted: the replica moved since this preview (its head was " + short(seenId) + ", it is " + short(nowId) + " now). Open the preview again.");
          dialog.remove();
          return;
        }
        const record = await guard(() => api("/api/replicas/" + enc(name) + "/revert", { method: "POST", body: { to: frame.frame } }));
        toast("revert " + (record.status || "done"), record.status === "committed" ? "good" : "bad");
        dialog.remove();
      }) }, "Revert"),
      h("button", { onclick: () => dialog.remove() }, "Cancel")));
  main.prepend(dialog);
}

// ---- proposals and the what-if ---------------------------------------------------------

function confidenceBadge(prediction) {
  if (!prediction) return h("span", { class: "muted" }, "no prediction");
  if (prediction.abstain) return h("span", { class: "badge warn" }, "abstains: unlike anything seen");
  const trusted = prediction.confidence >= 0.7;
  return h("span", {},
    h("span", { class: "badge " + (prediction.p_error >= 0.5 ? "bad" : "good") }, "P(error) " + (prediction.p_error * 100).toFixed(0) + "%"), " ",
    h("span", { class: "badge " + (trusted ? "" : "warn") }, (trusted ? "confidence " : "low confidence ") + (prediction.confidence * 100).toFixed(0) + "%"));
}

async function proposals(name) {
  const here = location.hash;
  crumbs(["Replicas", "#/"], [name, "#/replica/" + enc(name)], ["Proposals", "#/replica/" + enc(name) + "/proposals"]);
  const list = await guard(() => api("/api/replicas/" + enc(name) + "/proposals"));
  if (!showIf(here, h("h1", {}, name), tabs(name, "proposals"),
    h("div", { class: "panel" }, list.length === 0 ? h("p", { class: "muted" }, "No proposals yet (kairos propose).") :
      h("table", { id: "proposals" },
        h("thead", {}, h("tr", {}, ["Proposal", "Author", "Timeline", "Base", "Status", "Reviews", "Check", "Prediction"].map((t) => h("th", {}, t)))),
        h("tbody", {}, list.map((p) => h("tr", {},
          h("td", {}, h("a", { href: "#/replica/" + enc(name) + "/proposal/" + enc(p.proposal) }, p.title || short(p.proposal)), h("div", { class: "mono muted" }, short(p.proposal))),
          h("td", {}, p.author), h("td", {}, p.timeline), h("td", { class: "mono" }, short(p.base)),
          h("td", {}, h("span", { class: "badge " + (p.status === "committed" ? "good" : ["rolled_back", "rejected", "failed", "conflict"].includes(p.status) ? "bad" : "") }, p.status)),
          h("td", {}, (p.approvals || []).map((a) => "✓ " + (a.party || a)).join(", "), (p.rejections || []).length ? " ✕ " + p.rejections.map((r) => r.party || r).join(", ") : "",
            (p.interference || []).length ? h("div", { class: "badge warn" }, "interferes") : null),
          h("td", {}, p.check ? h("span", { class: "badge " + (p.check.passed ? "good" : "bad") }, p.check.passed ? "passed" : "failed") : "—"),
          h("td", {}, confidenceBadge(p.prediction))))))))) return;
  view = (event) => { if (event.replica === name && ["proposal", "review", "approval", "commit", "sandbox", "prediction", "interference"].includes(event.event)) debounce("proposals", () => proposals(name), 300); };
}

async function whatIf(name, id) {
  const here = location.hash;
  crumbs(["Replicas", "#/"], [name, "#/replica/" + enc(name)], ["Proposals", "#/replica/" + enc(name) + "/proposals"], [short(id), location.hash]);
  const started = performance.now();
  const [proposal, list] = await guard(() => Promise.all([
    api("/api/replicas/" + enc(name) + "/proposals/" + enc(id)),
    api("/api/replicas/" + enc(name) + "/proposals"),
  ]));
  const summary = list.find((p) => p.proposal === proposal.id) || {};
  // What this page shows is of the timeline's head now: acting after it moved would act
  // on a what-if nobody looked at.
  const headNow = async () => {
    const timelines = await api("/api/replicas/" + enc(name) + "/timelines");
    const line = timelines.find((t) => t.name === proposal.timeline);
    return line && line.head ? line.head.id : null;
  };
  const seenHead = await guard(headNow);
  // The chosen ops (kept across live re-renders of this page).
  const chosen = selections[proposal.id] || (selections[proposal.id] = new Set((proposal.ops || []).map((_, i) => i + 1)));
  // A preview: the chosen ops applied to a copy of the base, and their prediction;
  // nothing is stored (looking at a page changes nothing).
  const sandbox = chosen.size
    ? await guard(() => api("/api/replicas/" + enc(name) + "/proposals/" + enc(proposal.id) + "/preview?ops=" + [...chosen].sort((a, b) => a - b).join(",")))
    : null;
  const base = await guard(() => api("/api/replicas/" + enc(name) + "/state?at=" + enc(proposal.base)));
  const prediction = (sandbox && sandbox.prediction) || summary.prediction || null;
  const series = await api("/api/replicas/" + enc(name) + "/series?from=" + enc("30m")).catch(() => []);
  const changedKeys = new Map(((sandbox && sandbox.diff.config) || []).map((c) => [c.file + "\u0000" + c.key, c]));
  const changedFiles = new Map(((sandbox && sandbox.diff.files) || []).map((f) => [f.path, f]));

  const left = h("div", { class: "panel side", id: "current" }, h("h3", {}, "Current: base " + short(proposal.base)),
    h("table", {}, h("tbody", {}, (base.config || []).map((key) => h("tr", { class: changedKeys.has(key.file + "\u0000" + key.key) ? "changed" : "" },
      h("td", { class: "mono" }, key.file), h("td", { class: "mono" }, key.key), h("td", { class: "mono" }, String(key.value)))))),
    h("h3", {}, "Files"), h("table", {}, h("tbody", {}, (base.entries || []).slice(0, 300).map((entry) => h("tr", { class: changedFiles.has(entry.path) ? "changed" : "" },
      h("td", { class: "mono" }, entry.path), h("td", { class: "muted" }, entry.kind === "file" ? bytes(entry.size) : entry.kind))))));
  const predictedConfig = (base.config || []).map((key) => {
    const change = changedKeys.get(key.file + "\u0000" + key.key);
    return { file: key.file, key: key.key, value: change ? change.to : key.value, changed: !!change, removed: change && (change.to === null || change.to === undefined) };
  });
  for (const change of changedKeys.values()) {
    if (!(base.config || []).some((k) => k.file === change.file && k.key === change.key)) predictedConfig.push({ file: change.file, key: change.key, value: change.to, changed: true, added: true });
  }
  const right = h("div", { class: "panel side", id: "predicted" }, h("h3", {}, sandbox ? "Predicted: the sandbox state of ops " + [...chosen].sort((a, b) => a - b).join(", ") : "Predicted: choose at least one op"),
    h("table", {}, h("tbody", {}, predictedConfig.map((key) => h("tr", { class: key.added ? "added" : key.removed ? "removed" : key.changed ? "changed" : "" },
      h("td", { class: "mono" }, key.file), h("td", { class: "mono" }, key.key), h("td", { class: "mono" }, key.value === null || key.value === undefined ? "∅ (removed)" : String(key.value)))))),
    h("h3", {}, "Files changed"), h("table", {}, h("tbody", {}, [...changedFiles.values()].map((f) => h("tr", { class: f.change === "added" ? "added" : f.change === "removed" ? "removed" : "changed" },
      h("td", { class: "mono" }, f.path), h("td", {}, f.change))))));

  const meterColor = prediction && !prediction.abstain ? (prediction.p_error >= 0.5 ? "#c0392b" : "#1f8a4c") : "#b7791f";
  const predictionPanel = h("div", { class: "panel", id: "prediction" }, h("h2", {}, "Prediction"),
    prediction ? h("div", {},
      h("div", { class: "big", id: "p-error" }, prediction.abstain ? "No estimate" : (prediction.p_error * 100).toFixed(0) + "% chance of error"),
      prediction.abstain ? null : h("div", { class: "meter" }, h("div", { style: "width:" + (prediction.p_error * 100).toFixed(0) + "%;background:" + meterColor })),
      h("p", { class: "verdict", id: "confidence" }, prediction.abstain
        ? "The model abstains (P(error) " + (prediction.p_error * 100).toFixed(0) + "% means nothing here): this change is unlike anything it has seen. Run the check."
        : (prediction.confidence >= 0.7 ? "Confidence " : "Low confidence ") + (prediction.confidence * 100).toFixed(0) + "%" + (prediction.confidence >= 0.7 ? "." : ": a guess, not a verdict. Run the check.")),
      h("h3", {}, "Why"), h("ul", { id: "explanation" }, (prediction.explanation || []).map((line) => h("li", {}, line))),
      h("h3", {}, "Predicted resources"), deltasView(prediction.resource_deltas, series))
      : h("p", { class: "muted" }, "No prediction yet."));

  const opBoxes = (proposal.ops || []).map((op, index) => h("label", { style: "display:block" },
    h("input", { type: "checkbox", class: "op", value: index + 1, checked: chosen.has(index + 1), onchange: (event) => {
      if (event.target.checked) chosen.add(index + 1); else chosen.delete(index + 1);
      debounce("whatif", () => whatIf(name, id), 250);
    } }), " ", (index + 1) + ". " + describeOp(op)));
  const checkResult = h("div", { id: "check-result" }, summary.check ? checkView(summary.check) : h("span", { class: "muted" }, "The real check has not run on this proposal."));
  const actions = h("div", { class: "panel", id: "proposal-actions" }, h("h2", {}, proposal.title || short(proposal.id)),
    h("p", { class: "muted" }, "by " + proposal.author + " on " + proposal.timeline + " · base " + short(proposal.base) + " · status " + (summary.status || "open")),
    h("h3", {}, "Ops"), opBoxes,
    h("div", { class: "actions" },
      h("button", { id: "run-check", disabled: !may("proposer"), onclick: (event) => busy(event.target, async () => {
        checkResult.replaceChildren(h("span", { class: "muted" }, "running the check in a scratch copy…"));
        const result = await guard(() => api("/api/replicas/" + enc(name) + "/proposals/" + enc(proposal.id) + "/sandbox", { method: "POST", body: { run_check: true, ops: [...chosen] } }));
        checkResult.replaceChildren(checkView(result.check));
      }) }, "Run the sandbox check"),
      h("button", { id: "approve", disabled: !may("reviewer"), onclick: () => review("approve") }, "Approve"),
      h("button", { id: "reject", disabled: !may("reviewer"), onclick: () => review("reject") }, "Reject"),
      h("button", { class: "primary", id: "commit", disabled: !may("committer"), onclick: (event) => busy(event.target, async () => {
        const ops = [...chosen].sort((a, b) => a - b);
        if (!ops.length) { banner("choose at least one op to commit"); return; }
        const head = await guard(headNow);
        if (head !== seenHead) {
          banner("Not committed: timeline " + proposal.timeline + " moved since this page was loaded (its head was " + short(seenHead) + ", it is " + short(head) + " now). Reload to see the what-if against the current state, then commit.");
          return;
        }
        const record = await guard(() => api("/api/replicas/" + enc(name) + "/proposals/" + enc(proposal.id) + "/commit", { method: "POST", body: { ops } }));
        toast("commit " + record.status, record.status === "committed" ? "good" : "bad");
        if (record.status !== "committed") banner("commit " + record.status + (record.note ? ": " + record.note : ""));
        whatIf(name, id);
      }) }, "Commit the chosen ops")),
    checkResult);
  async function review(verdict) {
    await guard(() => api("/api/replicas/" + enc(name) + "/proposals/" + enc(proposal.id) + "/review", { method: "POST", body: { verdict } }));
    toast(verdict + " recorded", "good");
  }

  if (!showIf(here, h("h1", {}, "What if: " + (proposal.title || short(proposal.id))), tabs(name, "proposals"),
    h("div", { class: "grid3" }, h("div", {}, h("div", { class: "grid2" }, left, right), actions), predictionPanel))) return;
  window.kairosTimings.whatIf = { ms: performance.now() - started };
  view = (event) => {
    if (event.replica === name && event.details && event.details.proposal === proposal.id && ["commit", "review", "approval"].includes(event.event)) {
      debounce("whatif", () => whatIf(name, id), 300);
    }
  };
}

function describeOp(op) {
  switch (op.op) {
    case "set_config": return "set " + op.file + " " + op.key + " = " + JSON.stringify(op.value);
    case "unset_config": return "unset " + op.file + " " + op.key;
    case "put_file": return "write " + op.path;
    case "patch_file": return "patch " + op.path;
    case "delete": return "delete " + op.path;
    case "action": return "run action " + op.name;
    default: return op.op;
  }
}

function checkView(check) {
  if (!check) return h("span", { class: "muted" }, "no check configured");
  const passed = check.passed !== undefined ? check.passed : check.exit_code === 0;
  return h("div", {}, h("span", { class: "badge " + (passed ? "good" : "bad"), id: "check-badge" }, passed ? "check passed" : "check failed"),
    check.duration_ms !== undefined ? h("span", { class: "muted" }, " in " + check.duration_ms + " ms") : null,
    check.output || check.stderr ? h("pre", { class: "content" }, check.output || check.stderr) : null);
}

function deltasView(deltas, series) {
  const canvas = h("canvas", { id: "deltas", height: 90 });
  requestAnimationFrame(() => {
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth || 300, height = 90;
    canvas.width = width * ratio; canvas.height = height * ratio; canvas.style.height = height + "px";
    const g = canvas.getContext("2d"); g.scale(ratio, ratio);
    g.font = "12px system-ui, sans-serif"; g.fillStyle = "#6a7079";
    const cpu = series.map((s) => s.cpu_percent);
    const recent = cpu.length ? cpu.reduce((a, b) => a + b, 0) / cpu.length : null;
    const delta = deltas && deltas.cpu_percent !== null && deltas.cpu_percent !== undefined ? deltas.cpu_percent : null;
    if (!cpu.length) { g.fillText("no recent CPU samples to compare with", 4, 20); }
    const top = Math.max(1, ...cpu, (recent || 0) + Math.max(delta || 0, 0));
    const y = (v) => height - 14 - (height - 24) * v / top;
    g.strokeStyle = "#2457c5"; g.beginPath();
    cpu.forEach((v, i) => { const px = 4 + (width * 0.7 - 8) * i / Math.max(cpu.length - 1, 1); if (i) g.lineTo(px, y(v)); else g.moveTo(px, y(v)); });
    g.stroke();
    if (recent !== null && delta !== null) {
      g.setLineDash([4, 3]); g.strokeStyle = delta > 0 ? "#c0392b" : "#1f8a4c";
      g.beginPath(); g.moveTo(width * 0.7, y(recent)); g.lineTo(width - 4, y(Math.max(recent + delta, 0))); g.stroke(); g.setLineDash([]);
    }
    g.fillStyle = "#6a7079";
    g.fillText("CPU, last 30 min" + (delta !== null ? " → predicted " + (delta >= 0 ? "+" : "") + delta.toFixed(1) + " points" : " (no predicted change)"), 4, height - 2);
  });
  return h("div", {}, canvas,
    h("p", { class: "muted" }, "RSS: " + (deltas && deltas.rss_bytes !== null && deltas.rss_bytes !== undefined ? (deltas.rss_bytes >= 0 ? "+" : "−") + bytes(Math.abs(deltas.rss_bytes)) : "no predicted change")));
}

start();
