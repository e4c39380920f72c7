"""The Explorer in a real browser: Playwright driving Debian's headless Chromium.

Needs /usr/bin/chromium (`apt-get install -y chromium`); skips with the reason otherwise.
Leaves a screenshot in test-artifacts/explorer.png.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from server_helpers import make_model_dir, running_server

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium: apt-get install -y chromium"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(make_model_dir(tmp_path_factory.mktemp("browser"), n_positions=128)) as s:
        yield s


@pytest.fixture(scope="module")
def page(server):
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 1000})
            page.set_default_timeout(30_000)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/")
            yield page
            assert errors == []
        finally:
            browser.close()


def probabilities(page) -> list[float]:
    return [float(p) for p in page.eval_on_selector_all(".bar-row", "rows => rows.map(r => r.dataset.prob)")]


def test_explorer_end_to_end(page) -> None:
    prompt = page.locator("#prompt")
    prompt.fill("The robot picked up the ball because")
    page.wait_for_function(
        "() => document.querySelectorAll('#tokens .tok').length === 7"
        " && document.querySelectorAll('.bar-row').length === 10"
    )
    probs = probabilities(page)
    assert len(probs) == 10
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    # Tokens keep their leading space, shown as a visible mark.
    assert page.locator("#tokens .tok").nth(1).inner_text() == "␣robot"

    # Clicking a candidate appends it and refreshes the distribution.
    before = prompt.input_value()
    first = page.locator(".bar-row").first
    token_id = first.get_attribute("data-id")
    first.click()
    page.wait_for_function("() => document.querySelectorAll('#tokens .tok').length === 8")
    after = prompt.input_value()
    assert len(after) > len(before) and after.startswith(before)
    assert page.locator("#tokens .tok").last.get_attribute("data-id") == token_id

    # The attention view: a T x T heatmap for the T tokens shown.
    page.locator("#tab-attention").click()
    page.wait_for_function("() => document.querySelectorAll('#heatmap tr.hm-row').length === 8")
    rows = page.locator("#heatmap tr.hm-row")
    assert rows.count() == 8
    assert all(rows.nth(i).locator("td.cell").count() == 8 for i in range(8))
    assert page.locator("#heatmap td.cell.masked").count() == 8 * 7 // 2  # the future is masked
    page.select_option("#layer", "1")
    page.select_option("#head", "2")
    page.wait_for_timeout(300)
    assert page.locator("#heatmap tr.hm-row").count() == 8
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "explorer-attention.png"), full_page=True)

    # The logit lens: one row per layer (embeddings + 2 blocks).
    page.locator("#tab-lens").click()
    page.wait_for_function("() => document.querySelectorAll('#lens tr.lens-row').length === 3")

    # Generating streams text into the prompt.
    page.locator("#tab-next").click()
    page.fill("#gen-n", "5")
    page.locator("#generate").click()
    page.wait_for_function(
        f"() => document.getElementById('prompt').value.length > {len(after)}"
        " && !document.getElementById('generate').disabled"
    )
    assert "error" not in page.locator("#status").inner_text()
    page.wait_for_function("() => document.querySelectorAll('.bar-row').length === 10")
    page.screenshot(path=str(ARTIFACTS / "explorer.png"), full_page=True)
