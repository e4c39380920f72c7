// What every view shares: requests, token boxes, colour scales and the matrix painter.
"use strict";

export const $ = (id) => document.getElementById(id);

// The page's shared state; each view keeps its own details to itself.
export const state = {
  modelName: null,
  nLayer: 0,
  nHead: 0,
  tab: "panel-next",
  next: null, // the last /api/next answer: the attribution view picks its token from it
};

export async function api(path, body, { signal } = {}) {
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

export async function apiJSON(path, body) {
  return (await api(path, body)).json();
}

// A counter per view: an answer that arrives after a newer request was sent is dropped.
export class Latest {
  constructor() { this.n = 0; }
  start() { return ++this.n; }
  stale(ticket) { return ticket !== this.n; }
}

// Two decimals for everyday values; three significant digits for the tiny ones.
export function percent(p) {
  const v = 100 * p;
  if (v === 0) return "0%";
  return `${v >= 0.1 ? v.toFixed(2) : v.toPrecision(3)}%`;
}

export function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

export function el(tag, { className, text, title, data } = {}, children = []) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  if (title) node.title = title;
  if (data) for (const [k, v] of Object.entries(data)) node.dataset[k] = v;
  for (const child of children) node.append(child);
  return node;
}

// A token as the model sees it, whitespace made visible: a leading space is the most
// common part of a GPT-2 token.
export function tokenNode(text, tag = "span") {
  const node = document.createElement(tag);
  for (const ch of text) {
    if (ch === " " || ch === "\n" || ch === "\t") {
      node.appendChild(el("span", { className: "ws", text: ch === " " ? "␣" : ch === "\n" ? "↵" : "→" }));
    } else {
      node.appendChild(document.createTextNode(ch));
    }
  }
  return node;
}

export function renderTokens(tokens) {
  const box = $("tokens");
  box.replaceChildren();
  for (const t of tokens) {
    const node = tokenNode(t.token);
    node.className = "tok";
    node.title = `id ${t.id}`;
    node.dataset.id = t.id;
    box.appendChild(node);
  }
  $("token-count").textContent = `${tokens.length} token${tokens.length === 1 ? "" : "s"}`;
}

// --- colour -----------------------------------------------------------------------------

// Weight in [0, 1] -> white to the accent blue, as [r, g, b].
export function blue(w) {
  const t = Math.max(0, Math.min(1, w));
  return [Math.round(255 - 208 * t), Math.round(255 - 144 * t), Math.round(255 - 33 * t)];
}

// Signed value -> red (negative) / white / blue (positive), scaled by `max`.
export function diverging(v, max) {
  const t = max > 0 ? Math.max(-1, Math.min(1, v / max)) : 0;
  if (t >= 0) return blue(t);
  const s = -t;
  return [Math.round(255 - 35 * s), Math.round(255 - 185 * s), Math.round(255 - 185 * s)];
}

export const css = ([r, g, b]) => `rgb(${r}, ${g}, ${b})`;

// A T x T lower-triangular matrix painted one pixel per cell; CSS scales it up crisply.
// The masked (future) half is grey.
export function paintMatrix(canvas, rows) {
  const n = rows.length;
  canvas.width = Math.max(n, 1);
  canvas.height = Math.max(n, 1);
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(canvas.width, canvas.height);
  for (let i = 0; i < n; i++) {
    for (let j = 0; j < n; j++) {
      const [r, g, b] = j <= i ? blue(Math.sqrt(rows[i][j])) : [241, 242, 244];
      const o = 4 * (i * n + j);
      image.data[o] = r;
      image.data[o + 1] = g;
      image.data[o + 2] = b;
      image.data[o + 3] = 255;
    }
  }
  ctx.putImageData(image, 0, 0);
}

// A vector as a strip of coloured cells (blue positive, red negative), like the seeds' boxes.
export function vectorStrip(values, max) {
  const strip = el("span", { className: "vec" });
  const scale = max || Math.max(...values.map(Math.abs), 1e-9);
  for (const v of values) {
    const cell = el("span", { className: "vec-cell", title: v.toFixed(4) });
    cell.style.background = css(diverging(v, scale));
    strip.appendChild(cell);
  }
  return strip;
}

export function debounce(fn, ms) {
  let timer = null;
  return () => {
    clearTimeout(timer);
    timer = setTimeout(fn, ms);
  };
}
