// evgate API portal: plain JavaScript, no build step.
//
// The page reads <portal>/apis.json (the list) or <portal>/apis/<name>.json
// (one API) and builds itself with textContent only: nothing from the
// server is parsed as HTML.  "Try it" talks to the API itself with fetch:
// fetch can send the credential as a header, which EventSource cannot.
"use strict";

const PORTAL = document.body.dataset.portal;
const ORIGIN = location.origin;
let subscription = null;  // AbortController of the "try it" stream

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

function chips(values) { return values.map((value) => el("span", {className: "chip"}, value)); }

async function getJson(path) {
  const response = await fetch(path, {cache: "no-store"});
  if (!response.ok) throw new Error(response.status === 404 ? "missing" : response.statusText);
  return response.json();
}

// -- the list

async function showIndex() {
  const document_ = await getJson(`${PORTAL}/apis.json`);
  $("index").hidden = false;
  $("no-apis").hidden = document_.apis.length > 0;
  $("api-list").replaceChildren(...document_.apis.map((api) => el("li", {"data-api": api.name},
    el("a", {href: `${PORTAL}/apis/${encodeURIComponent(api.name)}`}, api.name),
    el("div", null, el("code", null, api.path)),
    el("div", null, ...chips(api.entrypoints)),
    el("div", {className: "muted"}, "auth: " + api.plans.join(", ")))));
}

// -- one API

// How the examples send a credential: the first plan that takes one.
function credentialOf(api) {
  const plan = api.auth.plans.find((p) => p.plan !== "keyless");
  if (!plan) return null;
  if (plan.plan === "api-key") {
    return {header: plan.header, value: "$API_KEY", query: plan.query, placeholder: "YOUR_API_KEY", plan};
  }
  return {header: "Authorization", prefix: "Bearer ", value: "$TOKEN", query: plan.query, placeholder: "YOUR_TOKEN",
    plan};
}

function examplesOf(api) {
  const url = ORIGIN + api.path;
  const credential = credentialOf(api);
  const curlAuth = credential ? ` \\\n  -H "${credential.header}: ${credential.prefix || ""}${credential.value}"` : "";
  const queryAuth = credential && credential.query
    ? `?${credential.query}=\${encodeURIComponent(${credential.plan.plan === "api-key" ? "apiKey" : "token"})}` : "";
  const jsCredential = credential
    ? `const ${credential.plan.plan === "api-key" ? "apiKey" : "token"} = "${credential.placeholder}";\n` : "";
  const pyAuth = credential
    ? `headers["${credential.header}"] = "${credential.prefix || ""}${credential.placeholder}"\n` : "";
  const has = (name) => api.entrypoints.includes(name);
  const examples = [];
  if (has("http-post")) {
    examples.push(["curl: publish", `curl -i -X POST ${url}${curlAuth} \\\n  -H "Content-Type: application/json" \\\n` +
      `  -d '{"hello": "world"}'`]);
  }
  if (has("sse")) {
    examples.push(["curl: subscribe (Server-Sent Events)", `curl -N ${url}${curlAuth} \\\n  -H "Accept: text/event-stream"`]);
    const note = credential && !credential.query
      ? "// This API takes no credential in the query: EventSource cannot send it; use fetch() streaming.\n" : "";
    examples.push(["Browser: EventSource", note + jsCredential +
      `const events = new EventSource(\`${url}${queryAuth}\`);\n` +
      `events.onmessage = (e) => console.log(e.lastEventId, e.data);  // the id is the resume cursor\n` +
      `events.addEventListener("error", (e) => console.log("stream ended", e.data));`]);
  }
  if (has("http-get")) {
    examples.push(["curl: long poll", `curl -s "${url}?timeout=10000&limit=100"${curlAuth}`]);
  }
  if (has("websocket")) {
    examples.push(["Browser: WebSocket", jsCredential +
      `const socket = new WebSocket(\`${url.replace(/^http/, "ws")}${queryAuth}\`, "evgate.json");\n` +
      `socket.onmessage = (e) => console.log(JSON.parse(e.data));` +
      (api.websocketPublish ? `\nsocket.onopen = () => socket.send(JSON.stringify({type: "publish", content: "hello"}));` : "")]);
  }
  if (has("http-post")) {
    examples.push(["Python: publish", `import json, urllib.request\n\nheaders = {"Content-Type": "application/json"}\n` +
      pyAuth + `request = urllib.request.Request("${url}", data=json.dumps({"hello": "world"}).encode(),\n` +
      `                                 headers=headers, method="POST")\n` +
      `with urllib.request.urlopen(request) as response:\n    print(response.status, response.read().decode())`]);
  }
  if (has("sse")) {
    examples.push(["Python: subscribe", `import urllib.request\n\nheaders = {"Accept": "text/event-stream"}\n` + pyAuth +
      `with urllib.request.urlopen(urllib.request.Request("${url}", headers=headers)) as stream:\n` +
      `    for line in stream:\n        line = line.decode().rstrip("\\n")\n` +
      `        if line.startswith("data:"):\n            print(line[5:].strip())`]);
  }
  if (has("webhook")) {
    examples.push(["Webhook receiver: check the signature (Standard Webhooks)",
      `import base64, hashlib, hmac, time\n\n` +
      `def verify(secret: str, headers: dict, body: bytes, tolerance: int = 300) -> bool:\n` +
      `    """secret is the whsec_... shown once when the subscription was created."""\n` +
      `    key = base64.b64decode(secret.removeprefix("whsec_"))\n` +
      `    msg_id, timestamp = headers["webhook-id"], headers["webhook-timestamp"]\n` +
      `    if abs(time.time() - int(timestamp)) > tolerance:\n        return False  # stale: a replay\n` +
      `    signed = f"{msg_id}.{timestamp}.".encode() + body\n` +
      `    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()\n` +
      `    return any(hmac.compare_digest(expected, s.split(",", 1)[1])\n` +
      `               for s in headers["webhook-signature"].split() if s.startswith("v1,"))\n` +
      `# Answer 2xx once stored; drop webhook-id values you have seen (retries).`]);
  }
  return examples;
}

function messageOf(asyncapi) {
  const messages = Object.values((asyncapi.components || {}).messages || {});
  const box = [];
  if (!messages.length) return [el("p", {className: "muted"}, "No message description.")];
  for (const message of messages) {
    if (message.description || message.summary) box.push(el("p", null, message.description || message.summary));
    box.push(el("p", null, "Content type: ", el("code", null, message.contentType || asyncapi.defaultContentType
      || "any")));
    if (message.payload && Object.keys(message.payload).length) {
      box.push(el("p", {className: "muted"}, "Schema:"), el("pre", null, JSON.stringify(message.payload, null, 2)));
    } else {
      box.push(el("p", {className: "muted"}, "No schema is declared: any bytes are carried as they are."));
    }
    for (const example of message.examples || []) {
      box.push(el("p", {className: "muted"}, "Example" + (example.name ? ` (${example.name})` : "") + ":"),
        el("pre", null, typeof example.payload === "string" ? example.payload
          : JSON.stringify(example.payload, null, 2)));
    }
  }
  return box;
}

function authLines(api) {
  return api.auth.plans.map((plan) => {
    const parts = [el("strong", null, plan.plan), ": " + plan.description];
    if (plan.header) {
      parts.push(" Send ", el("code", null, plan.header + ": " + (plan.scheme ? plan.scheme + " " : "") + "<credential>"));
      if (plan.query) parts.push(", or ", el("code", null, `?${plan.query}=<credential>`), " where a header cannot be set");
      parts.push(".");
    }
    return el("li", {"data-plan": plan.plan}, ...parts);
  });
}

async function showApi(name) {
  let api;
  try {
    api = await getJson(`${PORTAL}/apis/${encodeURIComponent(name)}.json`);
  } catch (error) {
    $("missing").hidden = false;
    return;
  }
  document.title = `${api.name} · API portal`;
  $("api").hidden = false;
  $("api-name").textContent = api.name;
  $("api-path").textContent = ORIGIN + api.path;
  $("api-entrypoints").replaceChildren(...chips(api.entrypoints));
  $("api-description").textContent = (api.asyncapi.info || {}).description || "";
  $("api-message").replaceChildren(...messageOf(api.asyncapi));
  $("api-auth").replaceChildren(...authLines(api));
  $("examples").replaceChildren(...examplesOf(api).map(([title, code]) => {
    const block = el("pre", null, code);
    const copy = el("button", {className: "link", type: "button"}, "Copy");
    copy.addEventListener("click", () => navigator.clipboard.writeText(code).then(
      () => { copy.textContent = "Copied"; }, () => { copy.textContent = "Select and copy"; }));
    return el("div", {className: "example", "data-example": title},
      el("div", {className: "example-head"}, el("h4", null, title), copy), block);
  }));
  setUpTry(api);
}

// -- try it

function tryHeaders(api, extra) {
  const headers = Object.assign({}, extra || {});
  const credential = credentialOf(api);
  const value = $("try-credential").value.trim();
  if (credential && value) headers[credential.header] = (credential.prefix || "") + value;
  return headers;
}

function tryLine(text, notice) {
  const list = $("try-messages");
  list.prepend(el("li", {className: notice ? "notice" : ""}, text));
  while (list.children.length > 100) list.lastElementChild.remove();
}

async function problemText(response) {
  try {
    const problem = await response.json();
    return `${response.status} ${problem.title || ""}: ${problem.detail || ""}`;
  } catch (error) {
    return `${response.status} ${response.statusText}`;
  }
}

async function subscribe(api) {
  if (subscription) {
    subscription.abort();
    subscription = null;
    $("try-subscribe").textContent = "Subscribe";
    $("try-state").textContent = "not subscribed";
    return;
  }
  const controller = subscription = new AbortController();
  $("try-subscribe").textContent = "Stop";
  $("try-state").textContent = "connecting";
  try {
    const response = await fetch(api.path, {headers: tryHeaders(api, {Accept: "text/event-stream"}),
      signal: controller.signal, cache: "no-store"});
    if (!response.ok) throw new Error(await problemText(response));
    $("try-state").textContent = "subscribed";
    tryLine("subscribed: new messages appear here", true);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true}).replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block.split("\n").filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, "")).join("\n");
        const event = (block.split("\n").find((line) => line.startsWith("event:")) || "").slice(6).trim();
        if (event === "error") tryLine("the stream ended: " + data, true);
        else if (data) tryLine(data);
      }
    }
    tryLine("the stream ended", true);
  } catch (error) {
    if (error.name !== "AbortError") tryLine("not subscribed: " + error.message, true);
  }
  if (subscription === controller) {
    subscription = null;
    $("try-subscribe").textContent = "Subscribe";
    $("try-state").textContent = "not subscribed";
  }
}

async function publish(api) {
  const content = $("try-content").value;
  try {
    const response = await fetch(api.path, {method: "POST", body: content, cache: "no-store",
      headers: tryHeaders(api, {"Content-Type": /^\s*[[{]/.test(content) ? "application/json" : "text/plain"})});
    $("try-result").textContent = response.ok ? "published" : await problemText(response);
    $("try-result").classList.toggle("error", !response.ok);
  } catch (error) {
    $("try-result").textContent = error.message;
  }
}

function setUpTry(api) {
  const canSubscribe = api.entrypoints.includes("sse");
  const canPublish = api.entrypoints.includes("http-post");
  if (!canSubscribe && !canPublish) { $("try").hidden = true; return; }
  $("try-subscribe").hidden = !canSubscribe;
  $("try-publish").hidden = !canPublish;
  $("try-credential").hidden = !credentialOf(api);
  $("try-form").addEventListener("submit", (event) => { event.preventDefault(); subscribe(api); });
  $("try-subscribe").addEventListener("click", () => subscribe(api));
  $("try-publish").addEventListener("submit", (event) => { event.preventDefault(); publish(api); });
}

document.addEventListener("DOMContentLoaded", () => {
  const rest = location.pathname.slice(PORTAL.length).replace(/\/$/, "");
  const match = rest.match(/^\/apis\/([^/]+)$/);
  if (match) showApi(decodeURIComponent(match[1]));
  else showIndex();
});
