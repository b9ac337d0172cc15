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
  await refresh();
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
  const select = $("tail-api");
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
    el("td", null, s.lastError ? s.lastError.message : "–"))));
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
    const response = await admin(`/apis/${encodeURIComponent(name)}/tail`, {signal: controller.signal});
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
  $("tail-form").addEventListener("submit", (event) => {
    event.preventDefault();
    if (tail) stopTail();
    else if ($("tail-api").value) startTail($("tail-api").value);
  });
  if (token()) signIn(token());
  else showLogin();
});
