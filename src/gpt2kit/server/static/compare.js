// Compare two prompts side by side (e.g. a clean and a corrupted one): their next tokens
// and their surprise, with the probability each side gives the other side's top tokens
// (looked up among its top LOOKUP).
"use strict";

import { $, apiJSON, el, percent, tokenNode } from "./common.js";
import { renderSurprise } from "./surprise.js";
import { samplingOptions } from "./next.js";

const SHOWN = 10;
const LOOKUP = 100;

export async function runCompare() {
  const sides = ["a", "b"];
  const texts = sides.map((s) => $(`compare-${s}`).value);
  const { temperature } = samplingOptions();
  const nexts = await Promise.all(texts.map((text) => apiJSON("/api/next", { text, k: LOOKUP, temperature })));
  await Promise.all(
    sides.map((s, i) => renderSurprise(texts[i], $(`compare-${s}-surprise`), $(`compare-${s}-summary`))),
  );
  sides.forEach((s, i) => {
    const other = new Map(nexts[1 - i].tokens.map((t) => [t.id, t.prob]));
    const list = el(
      "ol",
      { className: "topk" },
      nexts[i].tokens.slice(0, SHOWN).map((t) => {
        const elsewhere = other.has(t.id) ? percent(other.get(t.id)) : `not in its top ${LOOKUP}`;
        return el("li", { className: "topk-item", data: { id: t.id }, title: `the other prompt: ${elsewhere}` }, [
          Object.assign(tokenNode(t.token), { className: "tok" }),
          el("span", { className: "num", text: ` ${percent(t.prob)}` }),
          el("span", { className: other.has(t.id) ? "muted" : "muted only", text: `  (other: ${elsewhere})` }),
        ]);
      }),
    );
    $(`compare-${s}-next`).replaceChildren(el("h3", { text: "Next tokens" }), list);
  });
}
