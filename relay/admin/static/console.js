// relay's status console: the admin API and /metrics of the node that served this page.
// No framework and no build step. Everything from the API is written with textContent.
"use strict";

const TOKEN_KEY = "relay-admin-token";
const POLL_MS = 1000;
const POINTS = 120; // two minutes of history in the charts

const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem(TOKEN_KEY);
let status = null; // this node's last /admin/v1/status
let drainWatch = null; // {node, done, last}
let pollTimer = null;
let failingSince = null;
const series = { sessions: [], deliveries: [] };
let lastFrames = null; // [time ms, relay_frames_sent_total]

class Unauthorized extends Error {}

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${token}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(path, {
    method, headers, cache: "no-store",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = null;
  try { data = await res.json(); } catch (_) { /* not JSON */ }
  const why = data && typeof data.error === "string" ? data.error : res.statusText;
  if (res.status === 401) throw new Unauthorized(why);
  if (!res.ok) throw new Error(`${res.status} ${why}`);
  return data;
}

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function badge(state) {
  return el("span", state, `badge state-${state}`);
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const cell of cells) {
    const td = document.createElement("td");
    if (cell instanceof Node) td.append(cell);
    else td.textContent = String(cell);
    if (typeof cell === "number") td.className = "num";
    tr.append(td);
  }
  return tr;
}

// --- login -------------------------------------------------------------------------------

function showLogin(message) {
  stopPolling();
  token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  $("login").hidden = false;
  $("dashboard").hidden = true;
  $("logout").hidden = true;
  $("connection").hidden = true;
  $("login-error").textContent = message || "";
  $("token").value = "";
  $("token").focus();
}

async function login(event) {
  event.preventDefault();
  token = $("token").value.trim();
  $("login-error").textContent = "";
  try {
    status = await api("GET", "/admin/v1/status");
  } catch (err) {
    const reason = err instanceof Unauthorized
      ? `The node refused this token (${err.message}).`
      : `Cannot reach the node's admin API: ${err.message}`;
    showLogin(reason);
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  showDashboard();
}

function showDashboard() {
  $("login").hidden = true;
  $("dashboard").hidden = false;
  $("logout").hidden = false;
  $("connection").hidden = false;
  poll();
}

function stopPolling() {
  if (pollTimer !== null) clearTimeout(pollTimer);
  pollTimer = null;
}

// --- polling -------------------------------------------------------------------------------

async function poll() {
  stopPolling();
  try {
    const [fresh, envs, metrics] = await Promise.all([
      api("GET", "/admin/v1/status"),
      api("GET", "/admin/v1/envs"),
      fetch("/metrics", { cache: "no-store" }).then((r) => r.text()),
    ]);
    status = fresh;
    failingSince = null;
    $("stale").hidden = true;
    render(envs.envs, parseMetrics(metrics));
  } catch (err) {
    if (err instanceof Unauthorized) {
      showLogin(`The node no longer takes this token (${err.message}).`);
      return;
    }
    unreachable(err);
  }
  if (drainWatch && !drainWatch.done) await watchDrain();
  pollTimer = setTimeout(poll, POLL_MS);
}

function unreachable(err) {
  failingSince = failingSince || new Date();
  const stale = $("stale");
  stale.hidden = false;
  const selfDrained = drainWatch && status && drainWatch.node === status.node;
  stale.textContent = selfDrained
    ? `This node (${status.node}) has drained and stopped. Open the console of another node.`
    : `Cannot reach this node since ${failingSince.toLocaleTimeString()}: ${err.message}`;
  setConnection(selfDrained ? "stopped" : "unreachable");
  if (selfDrained) finishDrain(`${drainWatch.node} has drained and stopped.`);
}

function setConnection(state) {
  const c = $("connection");
  c.textContent = state;
  c.className = `badge state-${state === "connected" ? "ready" : "stopped"}`;
}

// --- rendering ------------------------------------------------------------------------------

function render(envs, metrics) {
  setConnection("connected");
  $("node-title").textContent = `node ${status.node} · relay ${status.version}`;
  const summary = $("summary");
  summary.replaceChildren();
  const cards = [
    ["state", badge(status.state)],
    ["uptime", `${Math.round(status.uptime_s)} s`],
    ["store", status.store],
    ["sessions here", status.connections],
    ["environments", status.envs],
    ["loaded here", Object.keys(status.loaded_envs).length],
    ["ring members", status.ring.filter((m) => m.in_ring).length],
  ];
  for (const [label, value] of cards) {
    const card = el("div", null, "card");
    card.dataset.card = label;
    card.append(el("div", label, "label"));
    const v = el("div", null, "value");
    if (value instanceof Node) v.append(value); else v.textContent = String(value);
    card.append(v);
    summary.append(card);
  }
  renderRing();
  renderEnvs(envs);
  renderMetrics(metrics);
}

function renderRing() {
  const body = $("ring").tBodies[0];
  body.replaceChildren();
  const draining = drainWatch && !drainWatch.done;
  for (const m of status.ring) {
    const button = el("button", "Drain…");
    button.type = "button";
    button.dataset.drain = m.node;
    button.disabled = draining || m.state !== "ready" || !m.in_ring;
    button.addEventListener("click", () => openDrainDialog(m));
    const tr = row([m.node, badge(m.state), m.address || "", m.connections || 0,
      m.owned_envs || 0, m.in_ring ? "yes" : "no", button]);
    tr.dataset.node = m.node;
    body.append(tr);
  }
}

function renderEnvs(envs) {
  const body = $("envs").tBodies[0];
  body.replaceChildren();
  if (envs.length === 0) {
    const tr = row(["no environments yet (relay env put ENV --key SDK_KEY)"]);
    tr.firstChild.colSpan = 5;
    body.append(tr);
  }
  for (const e of envs) {
    const here = status.loaded_envs[e.env];
    const tr = row([e.env, e.v, e.keys, e.owner || "?", here ? here.sessions : 0]);
    tr.dataset.env = e.env;
    body.append(tr);
  }
}

// --- metrics and charts ----------------------------------------------------------------------

function parseMetrics(text) {
  const out = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = /^([a-zA-Z_:][\w:]*)(\{([^}]*)\})?\s+(\S+)/.exec(line);
    if (!m) continue;
    const labels = {};
    for (const pair of (m[3] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[pair[1]] = pair[2];
    out.push({ name: m[1], labels, value: Number(m[4]) });
  }
  return out;
}

function sum(metrics, name, filter) {
  return metrics.filter((m) => m.name === name && (!filter || filter(m.labels)))
    .reduce((total, m) => total + m.value, 0);
}

function renderMetrics(metrics) {
  const now = Date.now();
  const sessions = sum(metrics, "relay_connections");
  const frames = sum(metrics, "relay_frames_sent_total");
  let rate = 0;
  if (lastFrames && now > lastFrames[0]) {
    rate = Math.max(0, (frames - lastFrames[1]) / ((now - lastFrames[0]) / 1000));
  }
  lastFrames = [now, frames];
  push(series.sessions, sessions);
  push(series.deliveries, rate);
  draw($("chart-sessions"), series.sessions);
  draw($("chart-deliveries"), series.deliveries);
  $("value-sessions").textContent = String(sessions);
  $("value-deliveries").textContent = `${Math.round(rate)}/s`;

  const body = $("slow").tBodies[0];
  body.replaceChildren();
  body.append(row(["sessions behind now (paused above the high-water mark)",
    sum(metrics, "relay_sessions_behind")]));
  body.append(row(["bytes waiting in session buffers", sum(metrics, "relay_buffered_bytes")]));
  const evictions = metrics.filter((m) => m.name === "relay_evictions_total");
  body.append(row(["evictions (close 4100), in all", evictions.reduce((t, m) => t + m.value, 0)]));
  for (const m of evictions) body.append(row([`  evicted: ${m.labels.reason}`, m.value]));
}

function push(list, value) {
  list.push(value);
  if (list.length > POINTS) list.shift();
}

function draw(canvas, values) {
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = 6;
  ctx.clearRect(0, 0, w, h);
  ctx.strokeStyle = "#d9dde5";
  ctx.beginPath(); ctx.moveTo(pad, h - pad); ctx.lineTo(w - pad, h - pad); ctx.stroke();
  if (values.length < 2) return;
  const top = Math.max(1, ...values) * 1.1;
  ctx.strokeStyle = "#0969da";
  ctx.lineWidth = 2;
  ctx.beginPath();
  const span = Math.max(values.length, 30) - 1; // (fills the width once 30 points are in)
  values.forEach((v, i) => {
    const x = pad + (i * (w - 2 * pad)) / span;
    const y = h - pad - (v / top) * (h - 2 * pad);
    if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
  });
  ctx.stroke();
}

// --- drain -------------------------------------------------------------------------------------

function openDrainDialog(member) {
  const dialog = $("drain-dialog");
  dialog.dataset.node = member.node;
  $("dialog-node").textContent = member.node;
  $("dialog-text").textContent =
    `${member.node} leaves the ring at once (its environments move to the other nodes), ` +
    `sends its ${member.connections || 0} session(s) away spread over the window, and ` +
    "exits once they are gone, or at the deadline. SDKs reconnect through the load " +
    "balancer to the other nodes.";
  $("dialog-error").textContent = "";
  dialog.showModal();
}

async function confirmDrain(event) {
  event.preventDefault();
  const dialog = $("drain-dialog");
  const node = dialog.dataset.node;
  const deadline = Number($("drain-deadline").value);
  const windowS = Number($("drain-window").value);
  if (!(deadline > 0) || !(windowS >= 0) || windowS > deadline) {
    $("dialog-error").textContent = "The deadline must be positive and the window at most the deadline.";
    return;
  }
  try {
    await api("POST", `/admin/v1/nodes/${encodeURIComponent(node)}/drain`,
      { deadline_s: deadline, window_s: windowS });
  } catch (err) {
    $("dialog-error").textContent = `The drain was refused: ${err.message}`;
    return;
  }
  dialog.close();
  drainWatch = { node, done: false, last: null };
  $("drain-panel").hidden = false;
  $("drain-node").textContent = node;
  $("drain-text").textContent = "starting…";
  $("drain-progress").value = 0;
  poll();
}

async function watchDrain() {
  const node = drainWatch.node;
  let info;
  try {
    const answer = status && node === status.node
      ? status : await api("GET", `/admin/v1/nodes/${encodeURIComponent(node)}/status`);
    info = answer.drain;
  } catch (err) {
    if (err instanceof Unauthorized) return;
    // The node answered its last request: after a drain it exits.
    if (drainWatch.last) finishDrain(`${node} has drained and stopped.`);
    else $("drain-text").textContent = `Cannot follow ${node}: ${err.message}`;
    return;
  }
  if (!info) return;
  drainWatch.last = info;
  const total = info.sessions_at_start || 0;
  const left = info.sessions || 0;
  $("drain-progress").value = total ? (total - left) / total : 1;
  const inS = Math.max(0, Math.round(info.deadline_at - Date.now() / 1000));
  $("drain-text").textContent = info.outcome
    ? `${node}: ${info.outcome === "drained" ? "every session sent away" : "deadline reached"}; it stops now.`
    : `${left} of ${total} session(s) left on ${node}; sent away over ${info.window_s} s; deadline in ${inS} s.`;
}

function finishDrain(text) {
  if (!drainWatch || drainWatch.done) return;
  drainWatch.done = true;
  $("drain-progress").value = 1;
  $("drain-text").textContent = text;
  $("drain-panel").dataset.done = "true";
}

// --- start -------------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", login);
  $("logout").addEventListener("click", () => showLogin(""));
  $("drain-form").addEventListener("submit", confirmDrain);
  $("drain-cancel").addEventListener("click", () => $("drain-dialog").close());
  if (token) showDashboard(); else showLogin("");
});
