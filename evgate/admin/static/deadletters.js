// evgate console: the dead letters of a webhook subscription, read from the
// API's dlq, with redelivery of one or all of those shown.  Loaded after
// console.js, whose helpers ($, el, action, send, adminJson,
// subscriptionPath, when, number) it uses.
"use strict";

const DEAD_LETTER_PAGES = 20;
const DEAD_LETTERS_SHOWN = 100;
let deadLettersOf = null;  // the subscription whose dead letters are shown

function showDeadLetters(s) {
  deadLettersOf = s;
  $("dead-letters-id").textContent = s.id;
  $("dead-letters").hidden = false;
  $("dead-letter-rows").replaceChildren();
  loadDeadLetters();
}

async function loadDeadLetters() {
  const s = deadLettersOf;
  if (!s) return;
  $("dead-letters-message").textContent = "reading the dead letters…";
  // The dlq is read oldest first; the newest DEAD_LETTERS_SHOWN are kept.
  let items = [];
  let cursor = "";
  let page = null;
  try {
    for (let count = 0; count < DEAD_LETTER_PAGES; count++) {
      page = await adminJson(subscriptionPath(s) + "/dead-letters?limit=200" +
                             (cursor ? "&cursor=" + encodeURIComponent(cursor) : ""));
      items = items.concat(page.items).slice(-DEAD_LETTERS_SHOWN);
      cursor = page.nextCursor;
      if (page.atHead || !cursor) break;
    }
  } catch (error) {
    $("dead-letters-message").textContent = `${s.id}: ${error.message}`;
    return;
  }
  if (deadLettersOf !== s) return;
  $("dead-letters-dlq").textContent = page ? page.dlq : "";
  $("dead-letter-rows").replaceChildren(...items.map(deadLetterRow));
  $("dead-letters-message").textContent = items.length ? `${items.length} dead letter(s)` +
    (page && !page.atHead ? " (more remain: the dlq is long)" : "") : "No dead letters.";
}

function deadLetterRow(item) {
  const m = item.message;
  const why = item.reason + (item.error ? ": " + item.error : "");
  return el("tr", {"data-dead-letter": item.position},
    el("td", null, when(item.deadLetteredAt)),
    el("td", null, why),
    el("td", {className: "num"}, item.attempts === null ? "–" : number(item.attempts)),
    el("td", {className: "mono"}, `${m.topic}/${m.partition}@${m.offset}` + (m.key ? ` key ${m.key}` : "")),
    el("td", {className: "mono preview"}, (item.previewEncoding ? "(base64) " : "") + item.preview +
       (item.truncated ? "…" : "")),
    el("td", {className: "outcome"}, ""),
    el("td", {className: "actions"}, item.redeliverable
      ? action("Redeliver", () => redeliver({positions: [item.position]}))
      : el("span", {className: "muted"}, "not redeliverable")));
}

async function redeliver(body) {
  const s = deadLettersOf;
  if (!s) return;
  try {
    const answer = await send("POST", subscriptionPath(s) + "/dead-letters/redeliver", body);
    for (const result of answer.results) {
      const row = document.querySelector(`tr[data-dead-letter="${CSS.escape(result.position)}"]`);
      if (row) {
        row.querySelector("td.outcome").textContent = result.ok ? `redelivered (${result.status})`
          : `failed: ${result.error}`;
      }
    }
    $("dead-letters-message").textContent = `${answer.redelivered} redelivered, ${answer.failed} failed`;
  } catch (error) {
    $("dead-letters-message").textContent = `redelivery refused: ${error.message}`;
  }
}

function redeliverShown() {
  const positions = Array.from(document.querySelectorAll("#dead-letter-rows tr[data-dead-letter]"))
    .filter((row) => row.querySelector("[data-action=redeliver]"))
    .map((row) => row.dataset.deadLetter);
  if (positions.length) redeliver({positions});
}

document.addEventListener("DOMContentLoaded", () => {
  $("dead-letters-refresh").addEventListener("click", loadDeadLetters);
  $("dead-letters-redeliver-all").addEventListener("click", redeliverShown);
  $("dead-letters-close").addEventListener("click", () => { $("dead-letters").hidden = true; deadLettersOf = null; });
});
