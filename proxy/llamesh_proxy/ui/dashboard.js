// llamesh dashboard: polls /ui/state and redraws; no framework, nothing loaded from elsewhere.
// The API key (when the gateway asks for one) stays in this tab's sessionStorage and goes out as a Bearer header.
"use strict";

const KEY_ITEM = "llamesh-api-key";
const POLL_MS = 1500;
const LOG_KEEP = 300;
const TERMINAL = new Set(["Stopped", "Failed"]);

let logNext = 0;
let polling = false;
let timer = null;
let pending = null; // the poll under way: polls never overlap, so no log line is shown twice

function apiKey() { return sessionStorage.getItem(KEY_ITEM) || ""; }

function headers(extra) {
  const all = Object.assign({}, extra || {});
  if (apiKey()) all["Authorization"] = "Bearer " + apiKey();
  return all;
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function fillBody(table, rows, columns, emptyText) {
  const body = document.querySelector(`#${table} tbody`);
  body.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { class: "empty", colspan: columns }, emptyText))]));
}

function age(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 60) return `${Math.round(seconds)}s`;
  if (seconds < 3600) return `${Math.round(seconds / 60)}m`;
  return `${(seconds / 3600).toFixed(1)}h`;
}

function mb(used, max) {
  const shown = (v) => (v >= 1024 ? `${(v / 1024).toFixed(1)} GB` : `${v} MB`);
  return max ? `${shown(used)} / ${shown(max)}` : `${shown(used)} / no limit`;
}

function setConnection(text, kind) {
  const badge = document.getElementById("connection");
  badge.textContent = text;
  badge.className = "badge " + (kind || "");
}

function poll() {
  if (pending === null) pending = fetchState().finally(() => { pending = null; });
  return pending;
}

async function fetchState() {
  let response;
  try {
    response = await fetch(`/ui/state?since=${logNext}`, { headers: headers(), cache: "no-store" });
  } catch (err) {
    setConnection("disconnected", "bad");
    return;
  }
  if (response.status === 401) {
    stopPolling();
    showKeyForm(apiKey() ? "That key was not accepted." : "");
    return;
  }
  if (!response.ok) {
    setConnection(`error ${response.status}`, "bad");
    return;
  }
  const state = await response.json();
  setConnection(state.gateway.draining ? "draining" : "live", state.gateway.draining ? "bad" : "ok");
  render(state);
}

async function pollForever() {
  try {
    await poll();
  } catch (err) { // e.g. a body that is not JSON: say so, and keep polling
    setConnection(`error: ${err.message}`, "bad");
  }
  if (polling) timer = setTimeout(pollForever, POLL_MS);
}

function startPolling() {
  document.getElementById("key-form").hidden = true;
  document.getElementById("dashboard").hidden = false;
  if (!polling) {
    polling = true;
    pollForever();
  }
}

function stopPolling() {
  polling = false;
  if (timer !== null) clearTimeout(timer);
  timer = null;
}

function showKeyForm(message) {
  document.getElementById("dashboard").hidden = true;
  document.getElementById("key-form").hidden = false;
  document.getElementById("key-error").textContent = message;
  setConnection("key needed", "bad");
}

document.getElementById("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY_ITEM, document.getElementById("key-input").value.trim());
  logNext = 0;
  startPolling();
});

// --- actions (the admin endpoints; the gateway checks the key) -------------------------------

async function act(path, body, label) {
  const result = document.getElementById("action-result");
  result.textContent = `${label}…`;
  try {
    const response = await fetch(path, {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify(body || {}),
    });
    const answer = await response.json().catch(() => ({}));
    const message = answer.error ? answer.error.message : answer.message || response.statusText;
    result.textContent = `${label}: ${message}`;
    result.dataset.status = String(response.status);
  } catch (err) {
    result.textContent = `${label}: ${err}`;
  }
  poll();
}

// --- rendering --------------------------------------------------------------------------------

function render(state) {
  const g = state.gateway;
  document.getElementById("gateway-line").textContent = `gateway ${g.id} on ${g.node} · v${g.version}`;
  const t = state.totals;
  const last = state.history.length ? state.history[state.history.length - 1] : null;
  document.getElementById("summary").replaceChildren(
    card("requests", t.requests_total),
    card("errors", t.errors_total),
    card("in flight", t.current_requests),
    card("queued", t.queue_length),
    card("tokens", t.tokens_total),
    card("req/s", last ? last.requests_per_s.toFixed(2) : "–"),
  );
  renderCharts(state.history);
  renderNodes(state);
  renderModels(state.models);
  renderInstances(state.instances);
  fillBody("queues", state.queues.map((q) =>
    el("tr", { "data-queue": q.model }, el("td", {}, q.model), el("td", { class: "queued" }, q.queued))), 2, "no queues yet");
  renderLog(state.log);
}

function card(label, value) {
  return el("div", { class: "card" }, el("span", { class: "muted" }, label), el("b", {}, value));
}

function renderCharts(points) {
  chart("chart-requests", points.map((p) => p.requests_per_s));
  chart("chart-tokens", points.map((p) => p.tokens_per_s));
  chart("chart-queue", points.map((p) => p.queue_length));
  const last = points.length ? points[points.length - 1] : null;
  document.getElementById("rate-now").textContent = last ? last.requests_per_s.toFixed(2) : "";
  document.getElementById("tokens-now").textContent = last ? last.tokens_per_s.toFixed(1) : "";
  document.getElementById("queue-now").textContent = last ? String(last.queue_length) : "";
}

function chart(id, values) {
  const svg = document.getElementById(id);
  if (values.length < 2) { svg.replaceChildren(); return; }
  const top = Math.max(1, ...values);
  const step = 300 / (values.length - 1);
  const coords = values.map((v, i) => `${(i * step).toFixed(1)},${(58 - (v / top) * 56).toFixed(1)}`).join(" ");
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", coords);
  svg.replaceChildren(line);
}

function renderNodes(state) {
  const rows = state.nodes.map((n) => {
    const c = n.llama_cpp;
    const building = c.is_building || c.rebuild_pending;
    const stateText = n.draining ? "draining" : n.ready ? "ready" : "not ready";
    const gpu = n.gpu.available ? mb(n.gpu.vram_used_mb, n.gpu.vram_total_mb) : "no telemetry";
    let build = c.version || "none";
    if (building) build += c.is_building ? " · building…" : " · rebuild queued";
    else if (c.last_build_error) build += " · last build failed";
    const rebuild = n.name === state.gateway.node
      ? el("button", { "data-rebuild": n.name, disabled: building,
          onclick: () => act("/admin/rebuild-llama", {}, `rebuild llama.cpp on ${n.name}`) }, "Rebuild")
      : null;
    return el("tr", { "data-node": n.name },
      el("td", {}, n.name),
      el("td", {}, stateText, el("span", { class: "muted" }, ` · seen ${age(n.heartbeat_age_s)} ago`)),
      el("td", {}, `${n.active_instances} / ${n.max_instances}`),
      el("td", {}, mb(n.memory.vram_used_mb, n.memory.vram_max_mb)),
      el("td", {}, mb(n.memory.sysmem_used_mb, n.memory.sysmem_max_mb)),
      el("td", {}, gpu),
      el("td", { class: "build", title: c.last_build_error || "" }, build),
      el("td", {}, rebuild));
  });
  fillBody("nodes", rows, 8, "no node has registered yet");
  const buildLog = document.getElementById("build-log");
  buildLog.hidden = state.build_log.length === 0;
  buildLog.textContent = state.build_log.map((r) => `${r.timestamp} ${r.message}`).join("\n");
}

function renderModels(models) {
  const rows = [];
  for (const m of models) {
    for (const p of m.profiles) {
      rows.push(el("tr", { "data-profile": p.display },
        el("td", { title: p.description || m.description || "" }, p.display),
        el("td", {}, p.capability),
        el("td", {}, `${p.ready_instances} ready / ${p.instances} (max ${p.max_instances || "∞"})`),
        el("td", {}, `${p.queued} / ${p.max_queue || "∞"}`),  // 0: no limit
        el("td", {}, p.idle_timeout_seconds ? age(p.idle_timeout_seconds) : "never"),
        el("td", {}, el("button", { "data-prewarm": p.display,
          onclick: () => act("/admin/prewarm", { model: p.display }, `prewarm ${p.display}`) }, "Prewarm"))));
    }
  }
  fillBody("models", rows, 6, "no models are served");
}

function renderInstances(instances) {
  const rows = instances.map((i) => {
    const phase = i.draining && !TERMINAL.has(i.phase) && i.phase !== "Draining" ? `${i.phase} (draining)` : i.phase;
    const memory = [i.memory.sysmem_mb !== null ? `${i.memory.sysmem_mb} MB RAM` : null,
      i.memory.vram_mb ? `${i.memory.vram_mb} MB VRAM` : null].filter(Boolean).join(", ") || "–";
    const canDrain = !i.draining && !TERMINAL.has(i.phase);
    return el("tr", { "data-instance": i.name },
      el("td", { title: i.message || "" }, i.name),
      el("td", {}, i.model),
      el("td", { class: `phase phase-${i.phase}` }, phase),
      el("td", {}, i.node || "unbound"),
      el("td", {}, i.port === null ? "–" : i.port),
      el("td", { class: "in-flight" }, i.in_flight),
      el("td", {}, i.slots === null ? "–" : i.slots),
      el("td", {}, memory),
      el("td", {}, age(i.age_s)),
      el("td", {}, i.last_request_age_s === null ? "never" : `${age(i.last_request_age_s)} ago`),
      el("td", {}, canDrain ? el("button", { "data-drain": i.name,
        onclick: () => act("/admin/drain", { instance: i.name }, `drain ${i.name}`) }, "Drain") : null));
  });
  fillBody("instances", rows, 11, "no instances: the first request to a model starts one");
}

function renderLog(log) {
  const pre = document.getElementById("log");
  if (log.next < logNext) { // the gateway restarted and numbers its records from 0 again
    pre.replaceChildren();
    logNext = 0;
    return;
  }
  logNext = log.next;
  if (!log.records.length) return;
  for (const record of log.records) {
    const { seq, ...fields } = record;
    pre.append(el("span", { class: record.level, "data-seq": seq }, JSON.stringify(fields) + "\n"));
  }
  while (pre.childNodes.length > LOG_KEEP) pre.firstChild.remove();
  if (document.getElementById("follow").checked) pre.scrollTop = pre.scrollHeight;
}

startPolling();
