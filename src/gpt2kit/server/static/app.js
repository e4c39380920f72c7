// The GPT-2 Explorer: plain ES modules over the server's JSON endpoints (/api/*) and the
// streaming /v1/completions. No build step. This file wires the prompt, the tabs and
// generation; each view lives in its own module.
"use strict";

import { refreshAttention, refreshHead, resetAttention } from "./attention.js";
import { refreshAttribution } from "./attribution.js";
import { $, api, apiJSON, debounce, setStatus, state } from "./common.js";
import { runCompare } from "./compare.js";
import { refreshLens, resetLens } from "./lens.js";
import { refreshNext, sampleOnce, samplingOptions, showSamplingValues } from "./next.js";
import { legend, refreshSurprise } from "./surprise.js";

let controller = null; // the running generation, if any

const VIEWS = {
  "panel-next": async () => {},
  "panel-surprise": refreshSurprise,
  "panel-attention": () => refreshAttention(openHead),
  "panel-lens": refreshLens,
  "panel-attribution": refreshAttribution,
  "panel-compare": async () => {},
};

// The next-token request always runs (it draws the prompt's token boxes); then the open view.
async function refresh() {
  try {
    await refreshNext(appendAndRefresh);
    await VIEWS[state.tab]();
    if (!$("status").classList.contains("error") && !controller) setStatus("");
  } catch (e) {
    setStatus(`error: ${e.message}`, true);
  }
}

function promptChanged() {
  resetAttention();
  resetLens();
  setStatus("");
  return refresh();
}

function appendAndRefresh(text) {
  $("prompt").value += text;
  promptChanged();
}

function openHead(layer, head) {
  $("layer").value = layer;
  $("head").value = head;
  refreshHead().catch((e) => setStatus(`error: ${e.message}`, true));
  $("head-view").scrollIntoView({ behavior: "smooth", block: "start" });
}

// --- generation (streams from /v1/completions) ----------------------------------------

async function generate() {
  const n = Math.max(1, Math.min(256, parseInt($("gen-n").value || "20", 10)));
  controller = new AbortController();
  $("generate").disabled = true;
  $("stop").disabled = false;
  setStatus("generating…");
  let count = 0;
  const { temperature, top_p } = samplingOptions();
  try {
    const res = await api(
      "/v1/completions",
      { model: state.modelName, prompt: $("prompt").value, max_tokens: n, temperature, top_p: top_p ?? 1, stream: true },
      { signal: controller.signal },
    );
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut).replace(/^data: /, "");
        buffer = buffer.slice(cut + 2);
        if (line === "[DONE]") continue;
        const chunk = JSON.parse(line);
        if (chunk.error) throw new Error(chunk.error.message);
        for (const choice of chunk.choices) {
          $("prompt").value += choice.text;
          if (choice.text) count += 1;
        }
      }
    }
    setStatus(`generated ${count} pieces of text`);
  } catch (e) {
    if (e.name === "AbortError") setStatus("stopped");
    else setStatus(`error: ${e.message}`, true);
  } finally {
    $("generate").disabled = false;
    $("stop").disabled = true;
    controller = null;
    resetAttention();
    resetLens();
    refresh();
  }
}

// --- wiring ---------------------------------------------------------------------------

function fillSelect(select, n) {
  select.replaceChildren();
  for (let i = 0; i < n; i++) {
    const opt = document.createElement("option");
    opt.value = i;
    opt.textContent = i;
    select.appendChild(opt);
  }
}

function showTab(panel) {
  state.tab = panel;
  for (const t of document.querySelectorAll(".tab")) t.classList.toggle("active", t.dataset.panel === panel);
  for (const p of document.querySelectorAll(".panel")) p.classList.toggle("hidden", p.id !== panel);
  if (panel === "panel-compare" && !$("compare-a").value) $("compare-a").value = $("prompt").value;
  refresh();
}

async function init() {
  const health = await (await fetch("/health")).json();
  state.modelName = health.model;
  $("model-name").textContent = `model: ${health.model}`;
  const probe = await apiJSON("/api/attention", { text: "", layer: 0, head: 0 });
  state.nLayer = probe.n_layer;
  state.nHead = probe.n_head;
  fillSelect($("layer"), probe.n_layer);
  fillSelect($("head"), probe.n_head);
  $("surprise-legend").replaceChildren(legend());
  showSamplingValues();

  $("prompt").addEventListener("input", debounce(promptChanged, 250));
  for (const id of ["temperature", "top-k", "top-p"]) {
    $(id).addEventListener("input", showSamplingValues);
    $(id).addEventListener("change", refresh);
  }
  $("generate").addEventListener("click", generate);
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("sample").addEventListener("click", () => sampleOnce(appendAndRefresh).catch((e) => setStatus(`error: ${e.message}`, true)));
  $("new-seed").addEventListener("click", () => { $("seed").value = Math.floor(Math.random() * 1e6); });
  for (const id of ["layer", "head"]) {
    $(id).addEventListener("change", () => refreshHead().catch((e) => setStatus(`error: ${e.message}`, true)));
  }
  $("attr-token").addEventListener("change", () => refreshAttribution().catch((e) => setStatus(`error: ${e.message}`, true)));
  $("compare-run").addEventListener("click", () => runCompare().catch((e) => setStatus(`error: ${e.message}`, true)));
  $("compare-copy").addEventListener("click", () => { $("compare-a").value = $("prompt").value; });
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => showTab(tab.dataset.panel));
  await refresh();
}

init().catch((e) => setStatus(`error: ${e.message}`, true));
