// Surprise: every token coloured by the rank the model gave it (GLTR's buckets), its
// log-probability on hover, and the text's total bits and bits per byte.
"use strict";

import { $, Latest, apiJSON, el, tokenNode } from "./common.js";

const latest = new Latest();
export const BUCKETS = [
  { name: "top 10", max: 10, className: "r10" },
  { name: "top 100", max: 100, className: "r100" },
  { name: "top 1000", max: 1000, className: "r1000" },
  { name: "beyond", max: Infinity, className: "rmore" },
];

export function bucketOf(rank) {
  return BUCKETS.find((b) => rank <= b.max);
}

// Fills `box` with the coloured tokens and `summary` with the totals; returns the data.
export async function renderSurprise(text, box, summary) {
  box.replaceChildren();
  summary.textContent = "";
  if (!text) {
    summary.textContent = "Type some text to score it.";
    return null;
  }
  const data = await apiJSON("/api/surprise", { text });
  const counts = new Map(BUCKETS.map((b) => [b.className, 0]));
  data.tokens.forEach((t, i) => {
    const bucket = bucketOf(t.rank);
    counts.set(bucket.className, counts.get(bucket.className) + 1);
    const node = tokenNode(t.token);
    node.className = `sp ${bucket.className}`;
    node.dataset.rank = t.rank;
    node.dataset.logprob = t.logprob;
    const p = Math.exp(t.logprob);
    node.title =
      `${JSON.stringify(t.token)} (position ${i}): rank ${t.rank}, ` +
      `logprob ${t.logprob.toFixed(3)} (p = ${(100 * p).toPrecision(3)}%, ${(-t.logprob / Math.LN2).toFixed(2)} bits)`;
    box.appendChild(node);
  });
  summary.replaceChildren(
    el("span", { className: "total-bits", text: `${data.total_bits.toFixed(1)} bits` }),
    el("span", { text: ` over ${data.tokens.length} tokens and ${data.n_bytes} bytes: ` }),
    el("strong", { className: "bpb", text: `${data.bits_per_byte.toFixed(3)} bits per byte` }),
    el("span", {
      className: "muted",
      text: "  ·  " + BUCKETS.map((b) => `${b.name}: ${counts.get(b.className)}`).join(", "),
    }),
  );
  return data;
}

export async function refreshSurprise() {
  const ticket = latest.start();
  const text = $("prompt").value;
  const box = el("div");
  const summary = el("div");
  await renderSurprise(text, box, summary);
  if (latest.stale(ticket)) return;
  $("surprise-tokens").replaceChildren(...box.childNodes);
  $("surprise-summary").replaceChildren(...summary.childNodes);
}

export function legend() {
  return el(
    "div",
    { className: "legend" },
    BUCKETS.map((b) => el("span", { className: `sp ${b.className}`, text: b.name })),
  );
}
