// evgate console: plain JavaScript, served by the gateway's admin listener.
//
// The admin token is asked for once, kept in this tab's sessionStorage and
// sent as "Authorization: Bearer" with every fetch.  Data is put in the
// page with textContent only: nothing from the API is ever parsed as HTML.
"use strict";

const TOKEN_KEY = "evgate.adminToken";
const REFRESH_MS = 2000;
const TAIL_MAX_LINES = 200;

let refreshTimer = null;
let tail = null;  // {api, controller}

function $(id) { return document.getElementById(id); }

function el(tag, attributes, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    if (name === "className") node.className = value;
    else if (name.startsWith("data-")) node.setAttribute(name, value);
    else node[name] = value;
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function token() { return sessionStorage.getItem(TOKEN_KEY); }

function setStatus(text, isError) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", Boolean(isError));
}

class Unauthorized extends Error {}

async function admin(path, options) {
  const headers = Object.assign({}, (options && options.headers) || {}, {Authorization: "Bearer " + token()});
  const response = await fetch(path, Object.assign({}, options || {}, {headers, cache: "no-store"}));
  if (response.status === 401) throw new Unauthorized("the admin token was refused");
  return response;
}

async function adminJson(path) {
  const response = await admin(path);
  const document = await response.json();
  if (!response.ok) throw new Error(document.detail || response.statusText);
  return document;
}

// -- signing in and out

function showLogin(message) {
  stopTail();
  clearTimeout(refreshTimer);
  clearTimeout(chartTimer);
  $("console").hidden = true;
  $("sign-out").hidden = true;
  $("login").hidden = false;
  $("login-error").hidden = !message;
  $("login-error").textContent = message || "";
  setStatus("not signed in");
  $("token").focus();
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  showLogin(message);
}

async function signIn(value) {
  sessionStorage.setItem(TOKEN_KEY, value);
  $("login").hidden = true;
  $("console").hidden = false;
  $("sign-out").hidden = false;
  history = {series: new Map(), since: null, now: 0};
  await refresh();
  refreshCharts();
}

// -- the tables

function chips(values) {
  const cell = el("td");
  for (const value of values) cell.append(el("span", {className: "chip"}, value));
  return cell;
}

function number(value) {
  if (value === null || value === undefined) return "–";
  return typeof value === "number" ? value.toLocaleString("en-US", {maximumFractionDigits: 2}) : String(value);
}

function renderEndpoints(items) {
  const body = $("endpoints");
  body.replaceChildren(...items.map((endpoint) => el("tr", {"data-endpoint": endpoint.name},
    el("td", {className: "mono"}, endpoint.name),
    el("td", null, endpoint.type),
    el("td", null, el("span", {className: "badge " + (endpoint.connected ? "ok" : "bad"), "data-state": "state"},
      endpoint.connected ? "connected" : "disconnected")),
    chips(endpoint.apis))));
}

function renderApis(items) {
  const body = $("apis");
  body.replaceChildren(...items.map((api) => {
    const live = api.live;
    const subscribers = Object.values(live.subscribers).reduce((a, b) => a + b, 0);
    const tailButton = el("button", {className: "link", type: "button", title: "Tail this API"}, "Tail");
    tailButton.addEventListener("click", () => { $("tail-api").value = api.name; startTail(api.name); });
    const specButton = el("button", {className: "link", type: "button", title: "Download its AsyncAPI document"},
      "AsyncAPI");
    specButton.addEventListener("click", () => downloadAsyncApi(api.name));
    return el("tr", {"data-api": api.name},
      el("td", {className: "mono"}, api.name),
      el("td", {className: "mono"}, api.path),
      el("td", null, el("span", {className: "mono"}, api.endpoint), " / ", el("span", {className: "mono"}, api.topic)),
      chips(api.entrypoints),
      chips(api.plans),
      el("td", {className: "num"}, number(subscribers)),
      el("td", {className: "num"}, number(live.rates.messagesInPerSecond)),
      el("td", {className: "num"}, number(live.rates.messagesOutPerSecond)),
      el("td", {className: "num"}, number(live.messagesIn)),
      el("td", {className: "num"}, number(live.messagesOut)),
      el("td", null, tailButton, " ", specButton));
  }));
  fillSelect("tail-api", items);
  fillSelect("publish-api", items.filter((api) => api.topic));
  fillSelect("subscription-api", items.filter((api) => api.entrypoints.includes("webhook")));
  fillSelect("key-api", items.filter((api) => api.plans.includes("api-key")));
}

function fillSelect(id, items) {
  const select = $(id);
  const chosen = select.value;
  select.replaceChildren(...items.map((api) => el("option", {value: api.name}, api.name)));
  if (items.some((api) => api.name === chosen)) select.value = chosen;
}

function renderSubscriptions(items) {
  $("no-subscriptions").hidden = items.length > 0;
  $("subscriptions").replaceChildren(...items.map((s) => el("tr", {"data-subscription": s.id},
    el("td", {className: "mono"}, s.id),
    el("td", {className: "mono"}, s.api),
    el("td", {className: "mono"}, s.callbackUrl),
    el("td", null, el("span", {className: "badge " + ({active: "ok", paused: "warn"}[s.status] || "bad")}, s.status)),
    el("td", {className: "num"}, number((s.counts || {}).delivered)),
    el("td", {className: "num"}, number((s.counts || {}).failedAttempts)),
    el("td", {className: "num"}, number((s.counts || {}).deadLettered)),
    el("td", null, s.lastError ? s.lastError.message : (s.pausedReason || "–")),
    el("td", {className: "actions"},
      s.status === "paused" ? action("Resume", () => subscriptionAction(s, "POST", "/resume"))
        : action("Pause", () => subscriptionAction(s, "POST", "/pause")),
      action("Replay", () => showReplay(s)),
      action("Dead letters", () => showDeadLetters(s)),
      action("Delete", () => {
        if (confirm(`Delete subscription ${s.id}?`)) subscriptionAction(s, "DELETE", "");
      })))));
}

function action(label, onClick) {
  const button = el("button", {className: "link", type: "button", "data-action": label.toLowerCase()}, label);
  button.addEventListener("click", onClick);
  return button;
}

async function send(method, path, body) {
  const options = {method};
  if (body !== undefined) {
    options.headers = {"Content-Type": "application/json"};
    options.body = JSON.stringify(body);
  }
  const response = await admin(path, options);
  const document = response.status === 204 ? null : await response.json();
  if (!response.ok) throw new Error((document && document.detail) || response.statusText);
  return document;
}

function subscriptionPath(s) {
  return `/apis/${encodeURIComponent(s.api)}/subscriptions/${encodeURIComponent(s.id)}`;
}

async function subscriptionAction(s, method, suffix) {
  try {
    await send(method, subscriptionPath(s) + suffix);
    $("subscription-message").textContent = `${s.id}: ${method === "DELETE" ? "deleted" : suffix.slice(1) + "d"}`;
  } catch (error) {
    $("subscription-message").textContent = `${s.id}: ${error.message}`;
  }
  refresh();
}

let replaying = null;

function showReplay(s) {
  replaying = s;
  $("replay-id").textContent = s.id;
  $("replay-form").hidden = false;
  const hourAgo = new Date(Date.now() - 3600 * 1000 - new Date().getTimezoneOffset() * 60000);
  if (!$("replay-at").value) $("replay-at").value = hourAgo.toISOString().slice(0, 19);
}

async function replay() {
  const s = replaying;
  if (!s) return;
  const body = $("replay-kind").value === "from" ? {from: $("replay-from").value.trim()}
    : {at: new Date($("replay-at").value).toISOString()};
  try {
    const document = await send("POST", subscriptionPath(s) + "/replay", body);
    $("subscription-message").textContent = `${s.id}: replaying from ${document.position}`;
    $("replay-form").hidden = true;
    replaying = null;
  } catch (error) {
    $("subscription-message").textContent = `${s.id}: replay refused: ${error.message}`;
  }
  refresh();
}

async function createSubscription() {
  const api = $("subscription-api").value;
  const body = {callbackUrl: $("subscription-url").value.trim()};
  if ($("subscription-filter").value.trim()) body.filter = $("subscription-filter").value.trim();
  try {
    const document = await send("POST", `/apis/${encodeURIComponent(api)}/subscriptions`, body);
    $("subscription-secret-id").textContent = document.id;
    $("subscription-secret-value").textContent = document.secret;
    $("subscription-secret").hidden = false;
    $("subscription-message").textContent = "";
    $("subscription-form").reset();
  } catch (error) {
    $("subscription-message").textContent = "not created: " + error.message;
  }
  refresh();
}

// -- keys

function when(text) { return text ? new Date(text).toLocaleString() : "never"; }

async function refreshKeys() {
  const api = $("key-api").value;
  if (!api) { $("keys").replaceChildren(); $("no-keys").hidden = false; return; }
  const document = await adminJson(`/apis/${encodeURIComponent(api)}/keys`);
  $("no-keys").hidden = document.keys.length > 0;
  $("keys").replaceChildren(...document.keys.map((key) => {
    const path = `/apis/${encodeURIComponent(api)}/keys/${encodeURIComponent(key.id)}`;
    const expiry = el("input", {type: "datetime-local", step: 1, className: "expiry"});
    return el("tr", {"data-key": key.id},
      el("td", {className: "mono"}, key.id),
      el("td", null, key.name),
      el("td", null, when(key.createdAt)),
      el("td", null, when(key.expiresAt)),
      el("td", {className: "actions"}, expiry,
        action("Set expiry", () => keyAction(key, "PATCH", path,
          {expiresAt: expiry.value ? new Date(expiry.value).toISOString() : null})),
        action("Revoke", () => {
          if (confirm(`Revoke key ${key.id} (${key.name})? It stops working at once.`)) {
            keyAction(key, "DELETE", path);
          }
        })));
  }));
}

async function keyAction(key, method, path, body) {
  try {
    await send(method, path, body);
    $("key-message").textContent = `${key.id}: ${method === "DELETE" ? "revoked" : "expiry set"}`;
  } catch (error) {
    $("key-message").textContent = `${key.id}: ${error.message}`;
  }
  refresh();
}

async function issueKey() {
  const api = $("key-api").value;
  const body = {name: $("key-name").value.trim()};
  if ($("key-expires").value) body.expiresAt = new Date($("key-expires").value).toISOString();
  try {
    const document = await send("POST", `/apis/${encodeURIComponent(api)}/keys`, body);
    $("key-issued-id").textContent = document.id;
    $("key-issued-value").textContent = document.key;
    $("key-issued").hidden = false;
    $("key-message").textContent = "";
    $("key-form").reset();
  } catch (error) {
    $("key-message").textContent = "not issued: " + error.message;
  }
  refresh();
}

// -- charts: GET /metrics/history every 5 s, merged into what the page has

const CHART_KINDS = {
  messagesIn: "messages/s", messagesOut: "messages/s", publishLatency: "seconds",
  subscribers: "subscribers", consumerLag: "messages", errors: "errors/s",
};
const CHART_POINTS = 720;
let history = {series: new Map(), since: null, now: 0};
let chartTimer = null;

function seriesName(kind, labels) {
  if (kind === "subscribers") return `${labels.api} ${labels.entrypoint}`;
  if (kind === "consumerLag") return `${labels.api} ${labels.subscription}`;
  if (kind === "errors") return `${labels.api} ${labels.type}`;
  return labels.api;
}

async function refreshCharts() {
  clearTimeout(chartTimer);
  try {
    const query = "/metrics/history?series=" + Object.keys(CHART_KINDS).join(",") +
      (history.since === null ? "" : "&since=" + history.since);
    const document = await adminJson(query);
    for (const s of document.series) {
      if (s.kind === "publishLatency" && s.labels.stat !== "p95") continue;
      const id = s.kind + "\u0000" + JSON.stringify(s.labels);
      let known = history.series.get(id);
      if (!known) history.series.set(id, known = {kind: s.kind, name: seriesName(s.kind, s.labels), points: []});
      known.points.push(...s.points);
      if (known.points.length > CHART_POINTS) known.points.splice(0, known.points.length - CHART_POINTS);
      for (const [t] of s.points) if (history.since === null || t > history.since) history.since = t;
    }
    history.now = document.now;
    drawCharts();
  } catch (error) {
    if (error instanceof Unauthorized) return;
  }
  chartTimer = setTimeout(refreshCharts, 5000);
}

function drawCharts() {
  for (const [kind, unit] of Object.entries(CHART_KINDS)) {
    let series = [...history.series.values()].filter((s) => s.kind === kind);
    // Errors: only the types that happened.
    if (kind === "errors") series = series.filter((s) => s.points.some(([, v]) => v > 0));
    series.sort((a, b) => a.name.localeCompare(b.name));
    Charts.draw($("chart-" + kind), series, history.now, unit);
  }
}

// -- test publish and reload

async function publish() {
  const api = $("publish-api").value;
  const body = {content: $("publish-content").value};
  if ($("publish-key").value.trim()) body.key = $("publish-key").value.trim();
  try {
    const document = await send("POST", `/apis/${encodeURIComponent(api)}/messages`, body);
    $("publish-result").textContent = `published to ${document.topic} at offset ${document.offset}`;
  } catch (error) {
    $("publish-result").textContent = "not published: " + error.message;
  }
}

function planLines(plan) {
  const lines = [];
  for (const what of ["added", "changed", "removed"]) {
    for (const name of plan.apis[what]) lines.push(el("li", {className: what}, `API ${name}: ${what}`));
  }
  for (const what of ["added", "removed"]) {
    for (const name of plan.endpoints[what]) lines.push(el("li", {className: what}, `endpoint ${name}: ${what}`));
  }
  for (const key of plan.gateway.changed) lines.push(el("li", {className: "changed"}, `[gateway] ${key}: changed`));
  if (!lines.length) lines.push(el("li", null, "no change"));
  return lines;
}

async function previewReload() {
  const box = $("reload-plan");
  box.hidden = false;
  const response = await admin("/reload/plan");
  const document = await response.json();
  if (!response.ok) {
    $("reload-apply").hidden = true;
    box.replaceChildren(el("p", {className: "error"}, document.detail));
    return;
  }
  $("reload-apply").hidden = document.empty;
  box.replaceChildren(el("ul", {id: "reload-changes"}, ...planLines(document)),
    el("p", {className: "muted"}, `unchanged: ${document.apis.unchanged.join(", ") || "none"}`));
}

async function applyReload() {
  const box = $("reload-plan");
  const response = await admin("/reload", {method: "POST"});
  const document = await response.json();
  $("reload-apply").hidden = true;
  box.replaceChildren(el("p", {className: response.ok ? "" : "error"},
    response.ok ? "applied: " + (document.detail || "see the APIs above") : document.detail));
  refresh();
}

async function subscriptionsOf(apis) {
  const lists = await Promise.all(apis.filter((api) => api.entrypoints.includes("webhook"))
    .map((api) => adminJson(`/apis/${encodeURIComponent(api.name)}/subscriptions`)
      .then((doc) => doc.items.map((s) => Object.assign({api: api.name}, s)))
      .catch(() => [])));
  return lists.flat();
}

async function refresh() {
  clearTimeout(refreshTimer);
  try {
    const [endpoints, apis] = await Promise.all([adminJson("/endpoints"), adminJson("/apis")]);
    renderEndpoints(endpoints.items);
    renderApis(apis.items);
    renderSubscriptions(await subscriptionsOf(apis.items));
    await refreshKeys();
    setStatus("updated " + new Date().toLocaleTimeString());
  } catch (error) {
    if (error instanceof Unauthorized) {
      signOut("The token was refused; check admin-token in evgate.ini.");
      return;
    }
    setStatus("cannot reach the admin API: " + error.message, true);
  }
  refreshTimer = setTimeout(refresh, REFRESH_MS);
}

async function downloadAsyncApi(name) {
  const response = await admin(`/apis/${encodeURIComponent(name)}/asyncapi`);
  const blob = await response.blob();
  const link = el("a", {href: URL.createObjectURL(blob), download: `${name}.asyncapi.json`});
  document.body.append(link);
  link.click();
  link.remove();
}

// -- the live tail

function tailNotice(text) {
  addTailLine(el("li", {className: "notice"}, text));
}

function addTailLine(line) {
  const list = $("tail-lines");
  list.prepend(line);
  while (list.children.length > TAIL_MAX_LINES) list.lastElementChild.remove();
}

function tailMessage(message) {
  const time = new Date(message.metadata.timestamp).toLocaleTimeString();
  const content = message.encoding === "base64" ? "(base64) " + message.content : message.content;
  addTailLine(el("li", {"data-offset": message.metadata.offset},
    el("span", {className: "muted"}, time),
    el("span", {className: "mono"}, "#" + message.metadata.offset),
    el("span", {className: "mono"}, message.key === null ? "–" : message.key),
    el("span", {className: "content mono"}, content + (message.truncated ? " …" : ""))));
}

function tailDocument(document) {
  if (document.subscribed) tailNotice(`tailing ${document.subscribed.api} from now on`);
  else if (document.skipped) tailNotice(`${document.skipped} messages skipped (the console fell behind)`);
  else if (document.gap) tailNotice("gap: " + document.gap.detail);
  else if (document.end) tailNotice("tail ended: " + document.end);
  else if (document.id) tailMessage(document);
}

function stopTail() {
  if (tail) {
    tail.controller.abort();
    tail = null;
  }
  $("tail-toggle").textContent = "Start";
  $("tail-state").textContent = "stopped";
}

async function startTail(name) {
  stopTail();
  const controller = new AbortController();
  const current = tail = {api: name, controller};
  $("tail-toggle").textContent = "Stop";
  $("tail-state").textContent = "tailing " + name;
  $("tail-lines").replaceChildren();
  try {
    const filter = $("tail-filter").value.trim();
    const query = filter ? "?filter=" + encodeURIComponent(filter) : "";
    const response = await admin(`/apis/${encodeURIComponent(name)}/tail${query}`, {signal: controller.signal});
    if (!response.ok) throw new Error((await response.json()).detail || response.statusText);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let newline;
      while ((newline = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, newline).trim();
        buffer = buffer.slice(newline + 1);
        if (line) tailDocument(JSON.parse(line));
      }
    }
    if (tail === current) tailNotice("the tail ended");
  } catch (error) {
    if (error.name === "AbortError") return;
    if (error instanceof Unauthorized) { signOut("The token was refused."); return; }
    tailNotice("tail failed: " + error.message);
  }
  if (tail === current) stopTail();
}

// -- wiring

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    signIn($("token").value.trim());
  });
  $("sign-out").addEventListener("click", () => signOut());
  const submit = (id, f) => $(id).addEventListener("submit", (event) => { event.preventDefault(); f(); });
  submit("subscription-form", createSubscription);
  submit("replay-form", replay);
  submit("key-form", issueKey);
  submit("publish-form", publish);
  $("replay-cancel").addEventListener("click", () => { $("replay-form").hidden = true; replaying = null; });
  $("replay-kind").addEventListener("change", () => {
    const byCursor = $("replay-kind").value === "from";
    $("replay-from").hidden = !byCursor;
    $("replay-at").hidden = byCursor;
  });
  $("key-api").addEventListener("change", () => refreshKeys());
  $("reload-preview").addEventListener("click", previewReload);
  $("reload-apply").addEventListener("click", applyReload);
  for (const button of document.querySelectorAll("[data-copy]")) {
    button.addEventListener("click", () => {
      navigator.clipboard.writeText($(button.dataset.copy).textContent)
        .then(() => { button.textContent = "Copied"; }, () => { button.textContent = "Select and copy"; });
    });
  }
  $("tail-form").addEventListener("submit", (event) => {
    event.preventDefault();
    if (tail) stopTail();
    else if ($("tail-api").value) startTail($("tail-api").value);
  });
  if (token()) signIn(token());
  else showLogin();
});
