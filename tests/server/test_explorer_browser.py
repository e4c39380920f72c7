"""The Explorer in a real browser: Playwright driving Debian's headless Chromium.

Every view is driven for two models: a quick-start-like one (a BPE trained on Shakespeare,
4 layers) and one with GPT-2's vocabulary. Clicks are checked against the JSON endpoints,
and nothing may reach the browser console as an error. Needs /usr/bin/chromium (`apt-get
install -y chromium`); skips with the reason otherwise. Leaves screenshots in test-artifacts/.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from gpt2kit.model.checkpoint import load_tokenizer
from server_helpers import make_bpe_model_dir, make_model_dir, running_server

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
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
PROMPT = "ROMEO: What light through yonder window breaks"
LINE = "But soft, what light through yonder window breaks? It is the east, and Juliet is the sun. "

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium: apt-get install -y chromium"),
]


@pytest.fixture(scope="module", params=["quickstart-bpe", "gpt2-vocab"])
def served(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    if request.param == "quickstart-bpe":
        make_bpe_model_dir(path, n_positions=128)
        n_layer = 4
    else:
        make_model_dir(path, n_positions=128)
        n_layer = 2
    with running_server(path) as server:
        yield request.param, server, load_tokenizer(path), n_layer


@pytest.fixture(scope="module")
def browser_page(served):
    playwright = pytest.importorskip("playwright.sync_api")
    _, server, _, _ = served
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 1000})
            page.set_default_timeout(30_000)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
            page.goto(server.url + "/")
            page.wait_for_function("() => document.querySelectorAll('.bar-row').length === 20")
            yield page, errors
        finally:
            browser.close()


@pytest.fixture
def page(browser_page):
    """The shared page; after each test, nothing in the console errored."""
    page, errors = browser_page
    yield page
    assert errors == [], errors
    assert "error" not in page.locator("#status").inner_text()


def show(page, tab: str, text: str, tokens: int) -> None:
    """Open `tab` with `text` as the prompt, and wait until the page shows its `tokens` tokens."""
    page.locator(f"#tab-{tab}").click()
    page.locator("#prompt").fill(text)
    page.wait_for_function(
        f"() => document.querySelectorAll('#tokens .tok').length === {tokens}"
        " && document.querySelectorAll('.bar-row').length === 20"
    )


def set_range(page, selector: str, value: float) -> None:
    page.eval_on_selector(
        selector,
        f"e => {{ e.value = {value}; e.dispatchEvent(new Event('input')); e.dispatchEvent(new Event('change')); }}",
    )


def shot(served, page, view: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"explorer-{served[0]}-{view}.png"), full_page=True)


def n_tokens(served, text: str) -> int:
    return len(served[2].encode(text, allowed_special="all"))


def test_next_token_click_appends_and_filters(served, page) -> None:
    show(page, "next", PROMPT, n_tokens(served, PROMPT))
    rows = page.locator(".bar-row")
    probs = [float(p) for p in page.eval_on_selector_all(".bar-row", "rs => rs.map(r => r.dataset.prob)")]
    kept = [float(p) for p in page.eval_on_selector_all(".bar-row", "rs => rs.map(r => r.dataset.kept)")]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert kept == pytest.approx(probs, rel=1e-5)  # no filter yet

    # Top-k 3: the rest of the list is dropped and the three kept ones are renormalised.
    set_range(page, "#top-k", 3)
    page.wait_for_function("() => document.querySelectorAll('.bar-row.dropped').length === 17")
    kept = [float(p) for p in page.eval_on_selector_all(".bar-row", "rs => rs.map(r => r.dataset.kept)")]
    assert sum(kept[:3]) == pytest.approx(1, abs=1e-5) and kept[3:] == [0] * 17
    assert "top-k 3 keep 3 tokens" in page.locator("#kept-note").inner_text()
    set_range(page, "#top-k", 0)
    set_range(page, "#top-p", 0.5)
    page.wait_for_function("() => document.getElementById('kept-note').textContent.includes('top-p 0.5')")
    shot(served, page, "sampling")
    set_range(page, "#top-p", 1)
    page.wait_for_function("() => document.getElementById('kept-note').textContent.startsWith('No top-k')")

    # Clicking a candidate appends its text.
    first = rows.first
    token = first.get_attribute("data-token")
    first.click()
    page.wait_for_function(f"() => document.getElementById('prompt').value === {(PROMPT + token)!r}")

    # Sample draws with the shown seed, appends, and moves the seed on.
    before = page.locator("#prompt").input_value()
    page.locator("#seed").fill("42")
    page.locator("#sample").click()
    page.wait_for_function(
        "() => document.getElementById('sample-result').textContent.startsWith('seed 42 drew')"
    )
    page.wait_for_function(f"() => document.getElementById('prompt').value.length > {len(before)}")
    assert page.locator("#seed").input_value() == "43"


def test_surprise_colours_every_token_by_rank(served, page) -> None:
    _, server, _, _ = served
    show(page, "surprise", PROMPT, n_tokens(served, PROMPT))
    T = n_tokens(served, PROMPT)
    page.wait_for_function(f"() => document.querySelectorAll('#surprise-tokens .sp').length === {T}")
    expected = httpx.post(f"{server.url}/api/surprise", json={"text": PROMPT}).json()
    ranks = page.eval_on_selector_all("#surprise-tokens .sp", "ts => ts.map(t => parseInt(t.dataset.rank))")
    assert ranks == [t["rank"] for t in expected["tokens"]]
    classes = page.eval_on_selector_all("#surprise-tokens .sp", "ts => ts.map(t => t.className)")
    for rank, cls in zip(ranks, classes, strict=True):
        bucket = "r10" if rank <= 10 else "r100" if rank <= 100 else "r1000" if rank <= 1000 else "rmore"
        assert cls == f"sp {bucket}"
    assert "logprob" in page.locator("#surprise-tokens .sp").first.get_attribute("title")
    assert f"{expected['bits_per_byte']:.3f} bits per byte" in page.locator("#surprise-summary").inner_text()
    shot(served, page, "surprise")


def test_attention_grid_opens_a_head_and_works_through_a_query(served, page) -> None:
    _, _, _, n_layer = served
    T = n_tokens(served, PROMPT)
    show(page, "attention", PROMPT, T)
    page.wait_for_function(
        f"() => document.querySelectorAll('.grid-row[data-loaded=yes]').length === {n_layer}"
        f" && document.querySelectorAll('canvas.thumb').length === {n_layer * 4}"
    )
    assert page.locator("#grid-note").inner_text() == ""  # short prompt: no cap
    page.locator("canvas.thumb[data-layer='1'][data-head='2']").click()
    page.wait_for_function("() => document.getElementById('head-title').textContent === 'Layer 1, head 2'")
    assert (page.locator("#layer").input_value(), page.locator("#head").input_value()) == ("1", "2")
    page.wait_for_function(f"() => document.querySelectorAll('#heatmap tr.hm-row').length === {T}")
    assert page.locator("#heatmap td.cell.masked").count() == T * (T - 1) // 2  # the future is masked
    # By default the last token is worked through; clicking row 2 works through token 2.
    page.wait_for_function(f"() => document.querySelectorAll('#detail tr.step-row').length === {T}")
    page.locator("#heatmap tr.hm-row").nth(2).click()
    page.wait_for_function("() => document.querySelector('#detail h3').textContent.includes('(position 2)')")
    assert page.locator("#detail tr.step-row").count() == 3
    weights = page.eval_on_selector_all(
        "#detail tr.step-row", "rs => rs.map(r => parseFloat(r.dataset.weight))"
    )
    assert sum(weights) == pytest.approx(1, abs=1e-5)
    assert "layer 1, head 2" in page.locator("#detail h3").inner_text()
    shot(served, page, "attention")


def test_attention_long_prompt_caps_the_grid(served, page) -> None:
    # Long enough to pass the attention grid's cap of 64 tokens, short enough for the context of 128.
    long = LINE
    while n_tokens(served, long) <= 64:
        long += LINE
    T = n_tokens(served, long)
    assert 64 < T <= 128
    show(page, "attention", long, T)
    page.wait_for_function("() => document.getElementById('grid-note').textContent.includes('first 64 of')")
    assert f"first 64 of {T} tokens" in page.locator("#grid-note").inner_text()
    page.wait_for_selector("#heatmap-canvas")
    assert int(page.locator("#heatmap-canvas").get_attribute("data-size")) == T
    canvas = page.locator("#heatmap-canvas")
    canvas.click(position={"x": 2, "y": canvas.bounding_box()["height"] * 10.5 / T})  # row 10
    page.wait_for_function("() => document.querySelector('#detail h3').textContent.includes('(position 10)')")
    shot(served, page, "attention-long")


def test_logit_lens_cell_shows_its_top_k(served, page) -> None:
    _, server, _, n_layer = served
    T = n_tokens(served, PROMPT)
    show(page, "lens", PROMPT, T)
    page.wait_for_function(
        f"() => document.querySelectorAll('#lens-grid td.lens-cell').length === {(n_layer + 1) * T}"
    )
    page.wait_for_function(f"() => document.querySelectorAll('#lens tr.lens-row').length === {n_layer + 1}")
    cell = page.locator("#lens-grid td.lens-cell[data-layer='1'][data-position='2']")
    cell_id = cell.get_attribute("data-id")
    cell.click()
    page.wait_for_function("() => document.querySelectorAll('#lens-topk li.topk-item').length === 10")
    assert page.locator("#lens-topk li.topk-item").first.get_attribute("data-id") == cell_id
    assert page.locator("#lens tr.lens-row.selected").get_attribute("data-layer") == "1"
    assert "position 2" in page.locator("#lens-caption").inner_text()
    expected = httpx.post(f"{server.url}/api/lens", json={"text": PROMPT, "k": 10, "position": 2}).json()
    ids = page.eval_on_selector_all("#lens-topk li.topk-item", "ls => ls.map(l => parseInt(l.dataset.id))")
    assert ids == [t["id"] for t in expected["layers"][1]["tokens"]]
    shot(served, page, "lens")


def test_attribution_bars_and_token_picker(served, page) -> None:
    _, server, _, n_layer = served
    show(page, "attribution", PROMPT, n_tokens(served, PROMPT))
    page.wait_for_function(f"() => document.querySelectorAll('g.attr-bar').length === {2 * n_layer + 2}")
    page.wait_for_function("() => document.querySelectorAll('#attr-token option').length === 21")
    values = page.eval_on_selector_all("g.attr-bar", "gs => gs.map(g => parseFloat(g.dataset.value))")
    top = httpx.post(f"{server.url}/api/attribution", json={"text": PROMPT}).json()
    assert sum(values) == pytest.approx(top["logit"], abs=1e-3)  # the parts and the bias make the logit
    assert page.locator("#attr-heads td.head-cell").count() == n_layer * 4
    option = page.locator("#attr-token option").nth(3)
    token_id = option.get_attribute("value")
    page.select_option("#attr-token", token_id)
    page.wait_for_function(
        f"() => document.getElementById('attr-summary').textContent.includes('(id {token_id})')"
    )
    shot(served, page, "attribution")


def test_compare_two_prompts(served, page) -> None:
    show(page, "compare", PROMPT, n_tokens(served, PROMPT))
    page.locator("#compare-copy").click()
    page.locator("#compare-b").fill(PROMPT.replace("window", "door"))
    page.locator("#compare-run").click()
    page.wait_for_function(
        "() => document.querySelectorAll('#compare-a-next li').length === 10"
        " && document.querySelectorAll('#compare-b-next li').length === 10"
        " && document.querySelectorAll('#compare-b-surprise .sp').length > 0"
    )
    assert page.locator("#compare-a-surprise .sp").count() == n_tokens(served, PROMPT)
    assert "bits per byte" in page.locator("#compare-b-summary").inner_text()
    shot(served, page, "compare")


def test_generate_streams_into_the_prompt(served, page) -> None:
    show(page, "next", PROMPT, n_tokens(served, PROMPT))
    page.fill("#gen-n", "5")
    page.locator("#generate").click()
    page.wait_for_function(
        f"() => document.getElementById('prompt').value.length > {len(PROMPT)}"
        " && !document.getElementById('generate').disabled"
    )
    page.wait_for_function("() => document.querySelectorAll('.bar-row').length === 20")
    shot(served, page, "next")
