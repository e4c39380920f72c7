// Direct logit attribution: how much the embeddings, each attention layer and each MLP add
// to one next token's logit (ln_f's scale frozen at the last position), as a bar chart,
// and each head's share as a layers x heads map.
"use strict";

import { $, Latest, apiJSON, css, diverging, el, state } from "./common.js";

const SVG = "http://www.w3.org/2000/svg";
const latest = new Latest();

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

// The picker lists the next-token view's candidates; "" = the model's top token.
export function fillPicker() {
  const select = $("attr-token");
  const keep = select.value;
  select.replaceChildren(el("option", { text: "the most likely next token" }));
  select.firstChild.value = "";
  for (const t of state.next ? state.next.tokens : []) {
    const opt = el("option", { text: `${JSON.stringify(t.token)}  (${(100 * t.prob).toFixed(2)}%)` });
    opt.value = t.id;
    select.appendChild(opt);
  }
  if ([...select.options].some((o) => o.value === keep)) select.value = keep;
}

export async function refreshAttribution() {
  fillPicker();
  const ticket = latest.start();
  const body = { text: $("prompt").value };
  if ($("attr-token").value !== "") body.token_id = parseInt($("attr-token").value, 10);
  const data = await apiJSON("/api/attribution", body);
  if (latest.stale(ticket)) return;
  $("attr-summary").textContent =
    `logit of ${JSON.stringify(data.token)} (id ${data.token_id}) = ${data.logit.toFixed(3)}` +
    ` = Σ parts ${(data.logit - data.bias).toFixed(3)} + bias ${data.bias.toFixed(3)}`;
  renderBars(data);
  renderHeads(data);
}

function renderBars(data) {
  const items = [...data.parts, { name: "bias", value: data.bias }];
  const max = Math.max(...items.map((p) => Math.abs(p.value)), 1e-9);
  const rowH = 22;
  const labelW = 70;
  const width = 640;
  const room = 60; // for a value's text beside its bar
  const half = (width - labelW - 2 * room) / 2;
  const zero = labelW + room + half;
  const chart = svg("svg", { width, height: rowH * items.length + 10, class: "attr-chart", role: "img" });
  chart.appendChild(svg("line", { x1: zero, x2: zero, y1: 0, y2: rowH * items.length + 10, class: "axis" }));
  items.forEach((p, i) => {
    const y = 5 + i * rowH;
    const w = (Math.abs(p.value) / max) * half;
    const g = svg("g", { class: "attr-bar", "data-name": p.name, "data-value": p.value });
    g.appendChild(svg("text", { x: labelW - 6, y: y + 15, "text-anchor": "end", class: "label" }, p.name));
    g.appendChild(
      svg("rect", {
        x: p.value >= 0 ? zero : zero - w,
        y: y + 3,
        width: Math.max(w, 1),
        height: rowH - 6,
        class: p.name === "bias" ? "bar bias" : p.value >= 0 ? "bar pos" : "bar neg",
      }),
    );
    const tx = p.value >= 0 ? zero + w + 4 : zero - w - 4;
    g.appendChild(
      svg("text", { x: tx, y: y + 15, "text-anchor": p.value >= 0 ? "start" : "end", class: "value" }, p.value.toFixed(3)),
    );
    g.appendChild(svg("title", {}, `${p.name}: ${p.value.toFixed(4)}`));
    chart.appendChild(g);
  });
  $("attr-bars").replaceChildren(chart);
}

function renderHeads(data) {
  const max = Math.max(...data.heads.flat().map(Math.abs), 1e-9);
  const table = el("table", { className: "heads-map" });
  const hr = el("tr", {}, [el("th")]);
  data.heads[0].forEach((_, h) => hr.appendChild(el("th", { text: `${h}` })));
  const rows = data.heads.map((values, layer) => {
    const tr = el("tr", {}, [el("th", { className: "row-label", text: `attn.${layer}` })]);
    values.forEach((v, h) => {
      const td = el("td", { className: "head-cell", text: v.toFixed(2), title: `layer ${layer}, head ${h}: ${v.toFixed(4)}` });
      td.style.background = css(diverging(v, max));
      tr.appendChild(td);
    });
    return tr;
  });
  table.append(el("thead", {}, [hr]), el("tbody", {}, rows));
  $("attr-heads").replaceChildren(table);
}
