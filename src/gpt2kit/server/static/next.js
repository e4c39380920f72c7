// Next token and sampling: the distribution before and after temperature -> top-k -> top-p
// (transformers' order), click a token to append it, or draw one with a shown seed.
"use strict";

import { $, Latest, apiJSON, el, percent, renderTokens, setStatus, state, tokenNode } from "./common.js";

const latest = new Latest();

export function samplingOptions() {
  const topK = parseInt($("top-k").value || "0", 10);
  const topP = parseFloat($("top-p").value);
  return {
    temperature: parseFloat($("temperature").value),
    top_k: topK > 0 ? topK : null,
    top_p: topP < 1 ? topP : null,
  };
}

export function showSamplingValues() {
  $("temperature-value").textContent = parseFloat($("temperature").value).toFixed(2);
  const k = parseInt($("top-k").value || "0", 10);
  $("top-k-value").textContent = k > 0 ? `${k}` : "off";
  const p = parseFloat($("top-p").value);
  $("top-p-value").textContent = p < 1 ? p.toFixed(2) : "off";
}

// Also refreshes the prompt's token boxes and state.next, so it runs on every refresh.
export async function refreshNext(appendAndRefresh) {
  const ticket = latest.start();
  const data = await apiJSON("/api/next", { text: $("prompt").value, k: 20, ...samplingOptions() });
  if (latest.stale(ticket)) return;
  state.next = data;
  renderTokens(data.prompt_tokens);
  renderBars(data, appendAndRefresh);
}

function renderBars(data, appendAndRefresh) {
  const bars = $("bars");
  bars.replaceChildren();
  const top = data.tokens.length ? Math.max(data.tokens[0].prob, ...data.tokens.map((t) => t.kept_prob)) : 1;
  for (const c of data.tokens) {
    const before = el("span", { className: "bar-fill before" });
    before.style.width = `${(100 * c.prob) / top}%`;
    const after = el("span", { className: "bar-fill after" });
    after.style.width = `${(100 * c.kept_prob) / top}%`;
    const label = tokenNode(c.token);
    label.className = "bar-label";
    const row = el(
      "button",
      {
        className: c.kept_prob > 0 ? "bar-row" : "bar-row dropped",
        title: `id ${c.id}: click to append`,
        data: { id: c.id, token: c.token, prob: c.prob, kept: c.kept_prob },
      },
      [
        label,
        el("span", { className: "bar-track" }, [before, after]),
        el("span", { className: "bar-prob", text: percent(c.prob) }),
        el("span", { className: "bar-prob kept", text: c.kept_prob > 0 ? percent(c.kept_prob) : "dropped" }),
      ],
    );
    row.type = "button";
    row.addEventListener("click", () => appendAndRefresh(c.token));
    bars.appendChild(row);
  }
  const opts = samplingOptions();
  const filters = [];
  if (opts.top_k) filters.push(`top-k ${opts.top_k}`);
  if (opts.top_p) filters.push(`top-p ${opts.top_p}`);
  $("kept-note").textContent = filters.length
    ? `${filters.join(" then ")} keep ${data.kept.toLocaleString()} token${data.kept === 1 ? "" : "s"}; ` +
      "the dark bars are their renormalised probabilities."
    : "No top-k or top-p: every token can be drawn (dark bar = light bar).";
}

// One draw with the seed in the box (as `gpt2kit generate --seed` would draw it), appended.
export async function sampleOnce(appendAndRefresh) {
  const seed = parseInt($("seed").value || "0", 10);
  const data = await apiJSON("/api/next", { text: $("prompt").value, k: 1, seed, ...samplingOptions() });
  const s = data.sampled;
  $("sample-result").replaceChildren(
    el("span", { text: `seed ${seed} drew ` }),
    Object.assign(tokenNode(s.token), { className: "tok" }),
    el("span", { text: ` (${percent(s.kept_prob)} after the filters, ${percent(s.prob)} before)` }),
  );
  $("seed").value = seed + 1; // the next draw differs; the shown seed reproduces this one
  setStatus("");
  appendAndRefresh(s.token);
}
