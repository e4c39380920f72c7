// Attention, whole and in detail: a grid of every layer x head (loaded a layer at a time as
// it scrolls into view), one head large, and one query worked through step by step.
"use strict";

import {
  $,
  Latest,
  apiJSON,
  blue,
  css,
  el,
  paintMatrix,
  percent,
  state,
  tokenNode,
  vectorStrip,
} from "./common.js";

const TABLE_MAX = 64; // longer prompts are painted on a canvas instead of a table
const DETAIL_MAX_KEYS = 32; // the drill-down lists the keys with the largest weights first beyond this
const latestHead = new Latest();
const latestDetail = new Latest();
const grid = { text: null, observer: null };
let position = null; // the query worked through; null = the last token

// --- the grid ---------------------------------------------------------------------------

export function resetAttention() {
  position = null;
  grid.text = null;
}

function buildGrid(text, openHead) {
  if (grid.observer) grid.observer.disconnect();
  grid.text = text;
  const box = $("attn-grid");
  box.replaceChildren();
  $("grid-note").textContent = "";
  const header = el("div", { className: "grid-row grid-head" }, [el("span", { className: "grid-label" })]);
  for (let h = 0; h < state.nHead; h++) header.appendChild(el("span", { className: "grid-cell-head", text: `head ${h}` }));
  box.appendChild(header);
  grid.observer = new IntersectionObserver((entries) => {
    for (const entry of entries) {
      if (!entry.isIntersecting) continue;
      grid.observer.unobserve(entry.target);
      loadLayer(entry.target, text, openHead);
    }
  });
  for (let layer = 0; layer < state.nLayer; layer++) {
    const row = el("div", { className: "grid-row", data: { layer, loaded: "no" } }, [
      el("span", { className: "grid-label", text: `layer ${layer}` }),
    ]);
    for (let h = 0; h < state.nHead; h++) row.appendChild(el("span", { className: "thumb placeholder" }));
    box.appendChild(row);
    grid.observer.observe(row);
  }
}

async function loadLayer(row, text, openHead) {
  const layer = parseInt(row.dataset.layer, 10);
  const data = await apiJSON("/api/attention/grid", { text, layer });
  if (grid.text !== text) return; // the prompt changed meanwhile
  if (data.note) $("grid-note").textContent = `Note: ${data.note}.`;
  const label = row.firstChild;
  row.replaceChildren(label);
  data.heads.forEach((weights, head) => {
    const canvas = el("canvas", {
      className: "thumb",
      title: `layer ${layer}, head ${head}: click to open`,
      data: { layer, head },
    });
    paintMatrix(canvas, weights);
    canvas.addEventListener("click", () => openHead(layer, head));
    row.appendChild(canvas);
  });
  row.dataset.loaded = "yes";
}

// --- one head, large --------------------------------------------------------------------

export async function refreshAttention(openHead) {
  const text = $("prompt").value;
  if (grid.text !== text) buildGrid(text, openHead);
  await refreshHead();
}

export async function refreshHead() {
  const ticket = latestHead.start();
  const body = {
    text: $("prompt").value,
    layer: parseInt($("layer").value || "0", 10),
    head: parseInt($("head").value || "0", 10),
  };
  if (position !== null) body.position = position; // the same query, in another head
  const data = await apiJSON("/api/attention", body);
  if (latestHead.stale(ticket)) return;
  $("head-title").textContent = `Layer ${data.layer}, head ${data.head}`;
  const T = data.tokens.length;
  const worked = data.detail !== null;
  if (!worked) position = T - 1;
  const wrap = $("heatmap-wrap");
  if (T <= TABLE_MAX) {
    wrap.replaceChildren(headTable(data));
    $("head-note").textContent = "";
  } else {
    wrap.replaceChildren(headCanvas(data));
    $("head-note").textContent =
      `${T} tokens: drawn one pixel per pair; hover to read a weight, click a row to work through that query.`;
  }
  if (worked) {
    latestDetail.start(); // an older drill-down still on its way is now stale
    renderDetail(data);
  } else {
    await refreshDetail();
  }
}

function headTable(data) {
  const table = el("table", { className: "heatmap", data: { size: data.tokens.length } });
  table.id = "heatmap";
  const hr = el("tr", {}, [el("th")]);
  for (const t of data.tokens) hr.appendChild(tokenNode(t.token, "th"));
  const body = el("tbody");
  data.weights.forEach((row, i) => {
    const label = tokenNode(data.tokens[i].token, "th");
    label.className = "row-label";
    label.title = "click to work through this query";
    const tr = el("tr", { className: i === position ? "hm-row selected" : "hm-row", data: { position: i } }, [label]);
    row.forEach((w, j) => {
      const td = el("td", {
        className: j > i ? "cell masked" : "cell",
        title: `${JSON.stringify(data.tokens[i].token)} → ${JSON.stringify(data.tokens[j].token)}: ${percent(w)}`,
      });
      if (j <= i) td.style.background = css(blue(Math.sqrt(w)));
      tr.appendChild(td);
    });
    tr.addEventListener("click", () => selectQuery(i));
    body.appendChild(tr);
  });
  table.append(el("thead", {}, [hr]), body);
  return table;
}

function headCanvas(data) {
  const T = data.tokens.length;
  const canvas = el("canvas", { className: "big-map", data: { size: T } });
  canvas.id = "heatmap-canvas";
  paintMatrix(canvas, data.weights);
  const side = Math.min(640, Math.max(4 * T, 320));
  canvas.style.width = canvas.style.height = `${side}px`;
  const cellAt = (ev) => {
    const r = canvas.getBoundingClientRect();
    const i = Math.min(T - 1, Math.floor(((ev.clientY - r.top) / r.height) * T));
    const j = Math.min(T - 1, Math.floor(((ev.clientX - r.left) / r.width) * T));
    return [Math.max(0, i), Math.max(0, j)];
  };
  canvas.addEventListener("mousemove", (ev) => {
    const [i, j] = cellAt(ev);
    const w = j <= i ? percent(data.weights[i][j]) : "masked (the future)";
    $("head-note").textContent =
      `${JSON.stringify(data.tokens[i].token)} (${i}) → ${JSON.stringify(data.tokens[j].token)} (${j}): ${w}`;
  });
  canvas.addEventListener("click", (ev) => selectQuery(cellAt(ev)[0]));
  return canvas;
}

function selectQuery(i) {
  position = i;
  for (const tr of document.querySelectorAll("#heatmap tr.hm-row")) {
    tr.classList.toggle("selected", parseInt(tr.dataset.position, 10) === i);
  }
  refreshDetail().catch((e) => $("detail").replaceChildren(el("p", { className: "error", text: e.message })));
}

// --- one query, step by step ------------------------------------------------------------

async function refreshDetail() {
  const ticket = latestDetail.start();
  const body = {
    text: $("prompt").value,
    layer: parseInt($("layer").value || "0", 10),
    head: parseInt($("head").value || "0", 10),
    position,
  };
  const data = await apiJSON("/api/attention", body);
  if (latestDetail.stale(ticket)) return;
  renderDetail(data);
}

function renderDetail(data) {
  const d = data.detail;
  const query = data.tokens[d.position].token;
  const box = $("detail");
  const scale = Math.max(...d.keys.flat().map(Math.abs), ...d.query.map(Math.abs), 1e-9);
  const vscale = Math.max(...d.values.flat().map(Math.abs), ...d.output.map(Math.abs), 1e-9);
  const title = el("h3", {}, [
    el("span", { text: "Query " }),
    Object.assign(tokenNode(query), { className: "tok" }),
    el("span", { text: ` (position ${d.position}), layer ${data.layer}, head ${data.head}` }),
  ]);
  const steps = el("p", {
    className: "help",
    text:
      `score = q · k × ${d.scale.toFixed(4)} (1/√${d.query.length}); weight = softmax(scores) over the ` +
      `${d.weights.length} tokens it may see; output = Σ weight × v.`,
  });
  const q = el("div", { className: "vec-row" }, [el("span", { className: "vec-name", text: "q" }), vectorStrip(d.query, scale)]);

  let order = d.weights.map((_, j) => j);
  let note = null;
  if (order.length > DETAIL_MAX_KEYS) {
    order = order.sort((a, b) => d.weights[b] - d.weights[a]).slice(0, DETAIL_MAX_KEYS).sort((a, b) => a - b);
    note = el("p", {
      className: "help",
      text: `Showing the ${DETAIL_MAX_KEYS} keys with the largest weights of ${d.weights.length}, in order.`,
    });
  }
  const head = el("tr", {}, ["key token", "k", "q · k", "score", "softmax weight", "v"].map((h) => el("th", { text: h })));
  const most = Math.max(...d.weights);
  const rows = order.map((j) => {
    const bar = el("span", { className: "w-fill" });
    bar.style.width = `${(100 * d.weights[j]) / most}%`; // the largest weight fills its track
    return el("tr", { className: "step-row", data: { key: j, weight: d.weights[j] } }, [
      Object.assign(tokenNode(data.tokens[j].token, "td"), { className: "tok-cell", title: `position ${j}` }),
      el("td", {}, [vectorStrip(d.keys[j], scale)]),
      el("td", { className: "num", text: d.dots[j].toFixed(3) }),
      el("td", { className: "num", text: d.scores[j].toFixed(3) }),
      el("td", { className: "wcell" }, [
        el("span", { className: "w-track" }, [bar]),
        el("span", { className: "num", text: percent(d.weights[j]) }),
      ]),
      el("td", {}, [vectorStrip(d.values[j], vscale)]),
    ]);
  });
  const table = el("table", { className: "steps" }, [el("thead", {}, [head]), el("tbody", {}, rows)]);
  const out = el("div", { className: "vec-row" }, [
    el("span", { className: "vec-name", text: "output = Σ weight × v" }),
    vectorStrip(d.output, vscale),
  ]);
  box.replaceChildren(...[title, steps, q, note, table, out].filter(Boolean));
}
