// The RankFed dashboard: reads the coordinator's state from /dashboard/events (Server-Sent
// Events, one JSON document per status change) and renders it with plain DOM and inline SVG.
// Read-only; no libraries, nothing loaded from anywhere but this coordinator.
"use strict";

// The operator token, when the page was opened as /dashboard?token=...: EventSource cannot
// send headers, so it travels in the query string of the event stream too.
const token = new URLSearchParams(location.search).get("token");
const withToken = (path) => token ? `${path}?token=${encodeURIComponent(token)}` : path;

let state = null;

const $ = (id) => document.getElementById(id);
const mib = (n) => (n / 1048576).toFixed(2);
const size = (n) => n < 1048576 ? `${(n / 1024).toFixed(1)} KiB` : `${mib(n)} MiB`;
const fmt = (x, digits = 3) => (x === undefined || x === null) ? "–" : Number(x).toFixed(digits);

function text(el, value) { if (el.textContent !== String(value)) el.textContent = value; }

function cell(row, value, cls) {
  const td = document.createElement("td");
  td.textContent = value;
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function renderCards() {
  text($("federation-id"), state.federation_id);
  const cur = state.current;
  text($("round"), cur ? `${cur.round} / ${state.total_rounds}` : `0 / ${state.total_rounds}`);
  const phase = state.done ? "done (federation finished)" : (cur ? cur.phase.replaceAll("_", " ") : "waiting for clients");
  text($("phase"), phase);
  $("phase").className = "value state-" + (cur ? cur.phase : "");
  text($("online"), state.devices.filter((d) => d.online).length + " of " + state.devices.length);
  text($("model"), `${state.model_id} (${state.mode.replaceAll("_", " ")})`);
  renderDeadline();
}

function renderDeadline() {
  if (!state) return;
  const cur = state.current;
  if (!cur || cur.phase !== "training") { text($("deadline"), cur && cur.finished_at ? "closed" : "–"); return; }
  const left = Math.max(0, Math.round(cur.deadline - Date.now() / 1000));
  const at = new Date(cur.deadline * 1000).toLocaleTimeString();
  text($("deadline"), `${at} (${left}s)`);
}

function renderDevices() {
  const body = $("devices").tBodies[0];
  body.replaceChildren();
  for (const d of state.devices) {
    const row = document.createElement("tr");
    row.dataset.device = d.name;
    cell(row, d.name);
    cell(row, d.device_class);
    cell(row, fmt(d.gflops, 1), "num");
    cell(row, d.rank, "num");
    cell(row, d.tier);
    cell(row, d.state, "state-" + d.state);
    cell(row, size(d.bytes_down), "num");
    cell(row, size(d.bytes_up), "num");
    cell(row, d.rounds_completed, "num");
    body.appendChild(row);
  }
}

function evalKey(rounds) {
  for (const r of rounds) for (const k of Object.keys(r.metrics)) if (k.startsWith("eval_")) return k;
  return null;
}

function renderRounds() {
  const body = $("rounds").tBodies[0];
  body.replaceChildren();
  const rounds = state.history.slice();
  if (state.current && !rounds.some((r) => r.round === state.current.round)) rounds.push(state.current);
  const key = evalKey(rounds);
  for (const r of rounds) {
    const row = document.createElement("tr");
    cell(row, r.round, "num");
    cell(row, r.phase.replaceAll("_", " "), "state-" + r.phase);
    cell(row, r.metrics.updates ?? "–", "num");
    cell(row, fmt(r.metrics.loss_last), "num");
    cell(row, key ? fmt(r.metrics[key]) : "–", "num");
    cell(row, r.metrics.bytes_up !== undefined ? mib(r.metrics.bytes_up) : "–", "num");
    cell(row, r.failure_reason || "");
    body.appendChild(row);
  }
  const done = state.history.filter((r) => r.phase === "done");
  chart($("chart-loss"), done.map((r) => [r.round, r.metrics.loss_last]), "line");
  chart($("chart-eval"), key ? done.map((r) => [r.round, r.metrics[key]]) : [], "line", key ? key.slice(5) : "no eval reported");
  chart($("chart-bytes"), done.map((r) => [r.round, (r.metrics.bytes_up || 0) / 1048576]), "bar");
}

const SVG = "http://www.w3.org/2000/svg";
function svgEl(name, attrs, content) {
  const el = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (content !== undefined) el.textContent = content;
  return el;
}

// A small chart of (round, value) points: a line (or bars), min/max labels on the y axis.
function chart(svg, points, kind, caption) {
  points = points.filter(([, y]) => typeof y === "number" && isFinite(y));
  svg.replaceChildren();
  const W = 320, H = 160, L = 40, R = 10, T = 10, B = 22;
  svg.appendChild(svgEl("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }));
  svg.appendChild(svgEl("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }));
  if (!points.length) {
    svg.appendChild(svgEl("text", { x: L + 10, y: H / 2 }, caption || "no finished round yet"));
    return;
  }
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  let lo = Math.min(...ys), hi = Math.max(...ys);
  if (kind === "bar") lo = 0;
  if (hi === lo) { hi += 1; lo = kind === "bar" ? 0 : lo - 1; }
  const x0 = Math.min(...xs), x1 = Math.max(...xs);
  const px = (x) => x1 === x0 ? (L + W - R) / 2 : L + 12 + (x - x0) * (W - R - L - 24) / (x1 - x0);
  const py = (y) => H - B - (y - lo) * (H - B - T) / (hi - lo);
  svg.appendChild(svgEl("text", { x: 2, y: T + 8 }, hi.toPrecision(3)));
  svg.appendChild(svgEl("text", { x: 2, y: H - B }, lo.toPrecision(3)));
  for (const x of xs) svg.appendChild(svgEl("text", { x: px(x) - 3, y: H - 6 }, String(x)));
  if (kind === "bar") {
    const w = Math.max(4, Math.min(24, (W - L - R) / (points.length * 2)));
    for (const [x, y] of points) svg.appendChild(svgEl("rect", { class: "bar", x: px(x) - w / 2, y: py(y), width: w, height: H - B - py(y) }));
  } else {
    svg.appendChild(svgEl("polyline", { class: "line", points: points.map(([x, y]) => `${px(x)},${py(y)}`).join(" ") }));
    for (const [x, y] of points) svg.appendChild(svgEl("circle", { class: "dot", cx: px(x), cy: py(y), r: 3 }));
  }
  if (caption) svg.appendChild(svgEl("text", { x: W - R - 80, y: T + 8 }, caption));
}

function render(next) {
  state = next;
  renderCards();
  renderDevices();
  renderRounds();
  document.body.dataset.round = state.current ? state.current.round : 0;
  document.body.dataset.phase = state.current ? state.current.phase : "";
}

function connect() {
  const badge = $("connection");
  const events = new EventSource(withToken("/dashboard/events"));
  events.onopen = () => { badge.textContent = "live"; badge.className = "badge live"; };
  events.onmessage = (e) => render(JSON.parse(e.data));
  events.addEventListener("done", () => {
    events.close();
    badge.textContent = "federation finished";
    badge.className = "badge";
  });
  // EventSource reconnects by itself (the stream asks for 2 s) after a coordinator restart.
  events.onerror = () => { badge.textContent = "reconnecting…"; badge.className = "badge lost"; };
}

setInterval(renderDeadline, 1000);
connect();
