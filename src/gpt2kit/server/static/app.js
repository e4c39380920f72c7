// The GPT-2 Explorer: plain JS over the server's JSON endpoints (/api/next, /api/attention,
// /api/lens) and the streaming /v1/completions. No build step.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { modelName: null, nLayer: 0, nHead: 0, tab: "panel-next", controller: null, seq: 0 };

// --- requests ------------------------------------------------------------------------

async function api(path, body, { signal } = {}) {
  const headers = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem("gpt2kit-api-key");
  if (key) headers.Authorization = `Bearer ${key}`;
  const res = await fetch(path, { method: "POST", headers, body: JSON.stringify(body), signal });
  if (res.status === 401) {
    const entered = window.prompt("This server needs an API key:");
    if (entered) {
      sessionStorage.setItem("gpt2kit-api-key", entered);
      return api(path, body, { signal });
    }
  }
  if (!res.ok) {
    let message = `${res.status}`;
    try { message = (await res.json()).error.message; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  return res;
}

// Two decimals for everyday values; three significant digits for the tiny ones.
function percent(p) {
  const v = 100 * p;
  return `${v >= 0.1 ? v.toFixed(2) : v.toPrecision(3)}%`;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

// --- tokens, shown as the model sees them ---------------------------------------------

// Whitespace made visible: a leading space is the most common part of a GPT-2 token.
function tokenNode(text, tag = "span") {
  const node = document.createElement(tag);
  for (const ch of text) {
    if (ch === " " || ch === "\n" || ch === "\t") {
      const ws = document.createElement("span");
      ws.className = "ws";
      ws.textContent = ch === " " ? "␣" : ch === "\n" ? "↵" : "→";
      node.appendChild(ws);
    } else {
      node.appendChild(document.createTextNode(ch));
    }
  }
  return node;
}

function renderTokens(tokens) {
  const box = $("tokens");
  box.replaceChildren();
  for (const t of tokens) {
    const el = tokenNode(t.token);
    el.className = "tok";
    el.title = `id ${t.id}`;
    el.dataset.id = t.id;
    box.appendChild(el);
  }
  $("token-count").textContent = `${tokens.length} token${tokens.length === 1 ? "" : "s"}`;
}

// --- next-token bar chart -------------------------------------------------------------

async function refreshNext() {
  const seq = ++state.seq;
  const temperature = parseFloat($("temperature").value);
  const res = await api("/api/next", { text: $("prompt").value, k: 10, temperature });
  const data = await res.json();
  if (seq !== state.seq) return; // a newer refresh is under way
  renderTokens(data.prompt_tokens);
  const bars = $("bars");
  bars.replaceChildren();
  const top = data.tokens.length ? data.tokens[0].prob : 1;
  for (const c of data.tokens) {
    const row = document.createElement("button");
    row.type = "button";
    row.className = "bar-row";
    row.dataset.id = c.id;
    row.dataset.prob = c.prob;
    row.title = `id ${c.id}: click to append`;
    const label = tokenNode(c.token);
    label.className = "bar-label";
    const track = document.createElement("span");
    track.className = "bar-track";
    const fill = document.createElement("span");
    fill.className = "bar-fill";
    fill.style.display = "block";
    fill.style.width = `${(100 * c.prob) / top}%`;
    track.appendChild(fill);
    const prob = document.createElement("span");
    prob.className = "bar-prob";
    prob.textContent = percent(c.prob);
    row.append(label, track, prob);
    row.addEventListener("click", () => {
      $("prompt").value += c.token;
      refresh();
    });
    bars.appendChild(row);
  }
}

// --- attention heatmap ----------------------------------------------------------------

async function refreshAttention() {
  const body = {
    text: $("prompt").value,
    layer: parseInt($("layer").value || "0", 10),
    head: parseInt($("head").value || "0", 10),
  };
  const data = await (await api("/api/attention", body)).json();
  const table = $("heatmap");
  table.replaceChildren();
  table.dataset.size = data.tokens.length;
  const head = document.createElement("thead");
  const hr = document.createElement("tr");
  hr.appendChild(document.createElement("th"));
  for (const t of data.tokens) hr.appendChild(tokenNode(t.token, "th"));
  head.appendChild(hr);
  const bodyEl = document.createElement("tbody");
  data.weights.forEach((row, i) => {
    const tr = document.createElement("tr");
    tr.className = "hm-row";
    const label = tokenNode(data.tokens[i].token, "th");
    label.className = "row-label";
    tr.appendChild(label);
    row.forEach((w, j) => {
      const td = document.createElement("td");
      td.className = j > i ? "cell masked" : "cell";
      if (j <= i) td.style.background = `rgba(47, 111, 222, ${Math.max(w, 0.02).toFixed(3)})`;
      td.title = `${JSON.stringify(data.tokens[i].token)} → ${JSON.stringify(data.tokens[j].token)}: ${w.toFixed(3)}`;
      tr.appendChild(td);
    });
    bodyEl.appendChild(tr);
  });
  table.append(head, bodyEl);
}

// --- logit lens -----------------------------------------------------------------------

async function refreshLens() {
  const data = await (await api("/api/lens", { text: $("prompt").value, k: 3 })).json();
  const table = $("lens");
  table.replaceChildren();
  const hr = document.createElement("tr");
  for (const h of ["Layer", "Top token", "Probability", "Next best"]) {
    const th = document.createElement("th");
    th.textContent = h;
    hr.appendChild(th);
  }
  table.appendChild(hr);
  for (const layer of data.layers) {
    const tr = document.createElement("tr");
    tr.className = "lens-row";
    const name = document.createElement("td");
    name.textContent = layer.layer === 0 ? "0 (embeddings)" : `${layer.layer}`;
    const top = tokenNode(layer.tokens[0].token, "td");
    top.className = "tok-cell";
    const prob = document.createElement("td");
    prob.textContent = percent(layer.tokens[0].prob);
    const alts = document.createElement("td");
    alts.className = "alts";
    alts.textContent = layer.tokens.slice(1).map((t) => JSON.stringify(t.token)).join("  ");
    tr.append(name, top, prob, alts);
    table.appendChild(tr);
  }
}

// --- generation (streams from /v1/completions) ----------------------------------------

async function generate() {
  const n = Math.max(1, Math.min(256, parseInt($("gen-n").value || "20", 10)));
  state.controller = new AbortController();
  $("generate").disabled = true;
  $("stop").disabled = false;
  setStatus("generating…");
  let count = 0;
  try {
    const res = await api(
      "/v1/completions",
      {
        model: state.modelName,
        prompt: $("prompt").value,
        max_tokens: n,
        temperature: parseFloat($("temperature").value),
        stream: true,
      },
      { signal: state.controller.signal },
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
    state.controller = null;
    refresh();
  }
}

// --- wiring ---------------------------------------------------------------------------

async function refresh() {
  try {
    await refreshNext();
    if (state.tab === "panel-attention") await refreshAttention();
    if (state.tab === "panel-lens") await refreshLens();
    if (!$("status").classList.contains("error") && !state.controller) setStatus("");
  } catch (e) {
    setStatus(`error: ${e.message}`, true);
  }
}

function debounce(fn, ms) {
  let timer = null;
  return () => {
    clearTimeout(timer);
    timer = setTimeout(fn, ms);
  };
}

function fillSelect(select, n) {
  select.replaceChildren();
  for (let i = 0; i < n; i++) {
    const opt = document.createElement("option");
    opt.value = i;
    opt.textContent = i;
    select.appendChild(opt);
  }
}

async function init() {
  const health = await (await fetch("/health")).json();
  state.modelName = health.model;
  $("model-name").textContent = `model: ${health.model}`;
  const probe = await (await api("/api/attention", { text: "", layer: 0, head: 0 })).json();
  fillSelect($("layer"), probe.n_layer);
  fillSelect($("head"), probe.n_head);

  $("prompt").addEventListener("input", debounce(() => { setStatus(""); refresh(); }, 250));
  $("temperature").addEventListener("input", () => {
    $("temperature-value").textContent = parseFloat($("temperature").value).toFixed(2);
  });
  $("temperature").addEventListener("change", refresh);
  $("generate").addEventListener("click", generate);
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("layer").addEventListener("change", () => refreshAttention().catch((e) => setStatus(e.message, true)));
  $("head").addEventListener("change", () => refreshAttention().catch((e) => setStatus(e.message, true)));
  for (const tab of document.querySelectorAll(".tab")) {
    tab.addEventListener("click", () => {
      state.tab = tab.dataset.panel;
      for (const t of document.querySelectorAll(".tab")) t.classList.toggle("active", t === tab);
      for (const p of document.querySelectorAll(".panel")) p.classList.toggle("hidden", p.id !== state.tab);
      refresh();
    });
  }
  await refresh();
}

init().catch((e) => setStatus(`error: ${e.message}`, true));
