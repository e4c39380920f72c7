// The logit lens: every layer's residual stream read through ln_f and the output embedding,
// at every position (a layers x positions map of the top token's probability) and, for the
// selected cell's position, every layer's top tokens.
"use strict";

import { $, Latest, apiJSON, blue, css, el, percent, tokenNode } from "./common.js";

const latestGrid = new Latest();
const latestTable = new Latest();
let selected = null; // {layer, position} of the clicked cell; null = the last position

export function resetLens() {
  selected = null;
}

export async function refreshLens() {
  const ticket = latestGrid.start();
  const data = await apiJSON("/api/lens/grid", { text: $("prompt").value });
  if (latestGrid.stale(ticket)) return;
  renderGrid(data);
  await refreshTable();
}

function layerName(layer) {
  return layer === 0 ? "embeddings" : `after block ${layer}`;
}

// Rows top to bottom: the last layer first, so the stream flows up as in the seeds' picture.
function renderGrid(data) {
  const table = el("table", { className: "lens-grid" });
  table.id = "lens-grid";
  const hr = el("tr", {}, [el("th")]);
  for (const t of data.tokens) hr.appendChild(Object.assign(tokenNode(t.token, "th"), { className: "col-token" }));
  const rows = [];
  for (let layer = data.cells.length - 1; layer >= 0; layer--) {
    const tr = el("tr", { className: "lens-grid-row" }, [el("th", { className: "row-label", text: layerName(layer) })]);
    data.cells[layer].forEach((c, position) => {
      const td = tokenNode(c.token, "td");
      td.className = "lens-cell";
      td.dataset.id = c.id;
      td.dataset.layer = layer;
      td.dataset.position = position;
      td.dataset.prob = c.prob;
      td.title =
        `${layerName(layer)}, position ${position} (${JSON.stringify(data.tokens[position].token)}): ` +
        `top ${JSON.stringify(c.token)} ${percent(c.prob)}; click for the top 10`;
      const rgb = blue(c.prob);
      td.style.background = css(rgb);
      if (c.prob > 0.55) td.style.color = "#fff";
      if (selected && selected.layer === layer && selected.position === position) td.classList.add("selected");
      td.addEventListener("click", () => selectCell(layer, position));
      tr.appendChild(td);
    });
    rows.push(tr);
  }
  table.append(el("thead", {}, [hr]), el("tbody", {}, rows));
  $("lens-grid-wrap").replaceChildren(table);
}

function selectCell(layer, position) {
  selected = { layer, position };
  for (const td of document.querySelectorAll("#lens-grid td.lens-cell")) {
    td.classList.toggle(
      "selected",
      parseInt(td.dataset.layer, 10) === layer && parseInt(td.dataset.position, 10) === position,
    );
  }
  refreshTable().catch((e) => $("lens-topk").replaceChildren(el("p", { className: "error", text: e.message })));
}

// Every layer's top 3 at the selected position (the last by default), and the selected
// cell's top 10.
async function refreshTable() {
  const ticket = latestTable.start();
  const body = { text: $("prompt").value, k: 10 };
  if (selected) body.position = selected.position;
  const data = await apiJSON("/api/lens", body);
  if (latestTable.stale(ticket)) return;
  const at = data.tokens[data.position].token;
  $("lens-caption").replaceChildren(
    el("span", { text: `At position ${data.position} ` }),
    Object.assign(tokenNode(at), { className: "tok" }),
    el("span", { text: selected ? "" : " (the last token: the model's next-token prediction)" }),
  );
  const table = $("lens");
  table.replaceChildren(
    el("tr", {}, ["Layer", "Top token", "Probability", "Next best"].map((h) => el("th", { text: h }))),
  );
  for (const layer of data.layers) {
    const top = tokenNode(layer.tokens[0].token, "td");
    top.className = "tok-cell";
    const tr = el("tr", { className: "lens-row", data: { layer: layer.layer } }, [
      el("td", { text: layer.layer === 0 ? "0 (embeddings)" : `${layer.layer}` }),
      top,
      el("td", { text: percent(layer.tokens[0].prob) }),
      el("td", { className: "alts", text: layer.tokens.slice(1, 3).map((t) => JSON.stringify(t.token)).join("  ") }),
    ]);
    if (selected && selected.layer === layer.layer) tr.classList.add("selected");
    table.appendChild(tr);
  }
  const box = $("lens-topk");
  if (!selected) {
    box.replaceChildren(el("p", { className: "help", text: "Click a cell of the map for its top 10." }));
    return;
  }
  const cell = data.layers[selected.layer];
  const list = el(
    "ol",
    { className: "topk" },
    cell.tokens.map((t) =>
      el("li", { className: "topk-item", data: { id: t.id } }, [
        Object.assign(tokenNode(t.token), { className: "tok" }),
        el("span", { className: "num", text: ` ${percent(t.prob)}` }),
      ]),
    ),
  );
  box.replaceChildren(
    el("h3", { text: `Top 10: ${layerName(selected.layer)}, position ${selected.position}` }),
    list,
  );
}
