"""Screenshots of every Explorer view from a running `gpt2kit serve`, for docs/img/.

    gpt2kit serve --model runs/quickstart/final --port 8765 &
    .venv/bin/python scripts/explorer_screenshots.py --url http://127.0.0.1:8765 --out docs/img

Drives Debian's Chromium (/usr/bin/chromium) with Playwright, as tests/server/test_explorer_browser.py
does, and stops with an error if the page logs one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from playwright.sync_api import sync_playwright

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the"
CORRUPTED = PROMPT.replace("Juliet", "Romeo")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--out", type=Path, default=Path("docs/img"))
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.set_default_timeout(120_000)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(args.url + "/")
        page.fill("#prompt", PROMPT)
        page.wait_for_function("() => document.getElementById('token-count').textContent !== ''")
        page.wait_for_timeout(1500)

        # Next token: the seeds' top-k 40 at temperature 0.8, then one seeded draw.
        for selector, value in (("#temperature", 0.8), ("#top-k", 40), ("#top-p", 0.9)):
            page.eval_on_selector(
                selector,
                f"e => {{ e.value = {value}; e.dispatchEvent(new Event('input')); "
                "e.dispatchEvent(new Event('change')); }",
            )
        page.wait_for_timeout(1500)
        page.fill("#seed", "7")
        page.click("#sample")
        page.wait_for_function(
            "() => document.getElementById('sample-result').textContent.startsWith('seed 7')"
        )
        page.wait_for_timeout(1500)
        page.screenshot(path=str(args.out / "explorer.png"), full_page=True)

        page.fill("#prompt", PROMPT)
        page.wait_for_timeout(1500)
        views = {
            "surprise": "#surprise-summary .bpb",
            "attention": "#detail tr.step-row",
            "lens": "#lens tr.lens-row",
            "attribution": "g.attr-bar",
        }
        for view, ready in views.items():
            page.click(f"#tab-{view}")
            page.wait_for_selector(ready)
            if view == "attention":
                page.click("canvas.thumb[data-layer='2'][data-head='1']")
                page.wait_for_function(
                    "() => document.getElementById('head-title').textContent.includes('2')"
                )
                page.locator("#heatmap tr.hm-row").last.click()
                page.eval_on_selector("#heatmap-wrap", "e => { e.scrollTop = 0; }")  # show the first rows too
            if view == "lens":
                page.locator("#lens-grid td.lens-cell[data-layer='2']").last.click()
                page.wait_for_selector("#lens-topk li.topk-item")
            page.wait_for_timeout(2000)
            page.locator(f"#panel-{view}").screenshot(path=str(args.out / f"explorer-{view}.png"))

        page.click("#tab-compare")
        page.click("#compare-copy")
        page.fill("#compare-b", CORRUPTED)
        page.click("#compare-run")
        page.wait_for_selector("#compare-b-summary .bpb")
        page.wait_for_timeout(1000)
        page.locator("#panel-compare").screenshot(path=str(args.out / "explorer-compare.png"))
        browser.close()
    if errors:
        raise SystemExit(f"the page logged errors: {errors}")


if __name__ == "__main__":
    main()
