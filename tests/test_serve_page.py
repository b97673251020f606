"""The page in a real browser: Playwright driving Debian's Chromium (`make test` installs it with
apt; Playwright cannot download browsers here) against a live `gpt-small serve`. Types a prompt,
presses Write, sees lines stream in, presses Stop, co-writes a line and re-rolls it; writes a
sonnet and reads its form check; keeps history across a reload; says plainly when the server is
down or the key is wrong; fits a phone's width. With GPT_SMALL_SERVE_CHECKPOINT set (a trained
run, e.g. runs/poem-cpu) the sonnet's screenshot goes to docs/serve-page.png; otherwise to the
test's temporary folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("uvicorn")

from serve_util import live_server, make_checkpoint  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                 reason=f"{CHROMIUM} is absent: install Debian's chromium (make test does)")]


def test_page_writes_streams_stops_and_cowrites(tmp_path):
    trained = os.environ.get("GPT_SMALL_SERVE_CHECKPOINT")
    run_dir = Path(trained) if trained else make_checkpoint(tmp_path / "tiny-poet")
    shot = tmp_path / "serve-page.png"
    with live_server(run_dir) as (url, _, err), sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(url + "/")
            page.wait_for_function("document.querySelector('#status').textContent.includes('ready')")
            # The stream is throttled to ~4 KB/s (~200 events a second), so on any machine the
            # poem is still coming when Stop is pressed; lifted after Stop.
            cdp = page.context.new_cdp_session(page)
            cdp.send("Network.enable")
            cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0,
                                                          "downloadThroughput": 4000, "uploadThroughput": -1})
            page.press("#prompt", "Control+a")
            page.keyboard.type("The sea at night\n")
            page.locator("#lines").fill("24")
            page.click("#write")
            # lines stream in: the poem grows past the prompt by two newlines while still writing
            page.wait_for_function("document.querySelector('#poem').textContent.split('\\n').length >= 4")
            assert page.get_attribute(".sheet", "aria-busy") == "true" and page.is_enabled("#stop")
            if trained:
                page.wait_for_function("document.querySelector('#poem').textContent.split('\\n').length >= 9")
            page.click("#stop")
            page.wait_for_function("document.querySelector('#status').textContent.includes('stopped')")
            cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0,
                                                          "downloadThroughput": -1, "uploadThroughput": -1})
            assert page.is_enabled("#write") and page.is_enabled("#copy")
            poem = page.inner_text("#poem")
            assert poem.startswith("The sea at night\n") and poem.count("\n") >= 3
            page.screenshot(path=str(shot), full_page=True)

            # keyboard alone: Ctrl+Enter in the prompt writes again, Escape stops
            page.focus("#prompt")
            page.keyboard.press("Control+Enter")
            page.wait_for_function("document.querySelector('#stop').disabled === false")
            page.keyboard.press("Escape")
            page.wait_for_function("document.querySelector('#write').disabled === false")

            # co-writing: a person's line, the model's answer, a re-roll of that answer
            page.click("#tab-cowrite")
            page.fill("#line", "The tide comes in")
            page.press("#line", "Enter")
            page.wait_for_function("document.querySelectorAll('#verses li.model').length === 1 && "
                                   "!document.querySelector('#answer').disabled")
            assert page.inner_text("#verses li.person") == "The tide comes in"
            page.click("#verses li.model button.reroll")
            page.wait_for_function("!document.querySelector('#answer').disabled")
            assert page.locator("#verses li").count() == 2
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
    assert any(line.startswith("POST /v1/poem 200") for line in err)


# --- forms, history, errors and small screens ---

def _contrast(a: str, b: str) -> float:
    """WCAG contrast ratio of two CSS rgb() colours."""
    def luminance(css: str) -> float:
        rgb = [int(x) / 255 for x in css[css.index("(") + 1:css.index(")")].split(",")[:3]]
        lin = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb]
        return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]
    hi, lo = sorted((luminance(a), luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def _open(browser, url: str, width: int = 900, height: int = 1000):
    page = browser.new_page(viewport={"width": width, "height": height})
    page.set_default_timeout(240_000)
    page.add_init_script("Math.random = () => 0.25")  # the page's seeds, fixed: the same poem each run
    page.goto(url + "/")
    page.wait_for_function("document.querySelector('#status').textContent.includes('ready')")
    return page


@pytest.fixture(scope="module")
def browser():
    """One Playwright and Chromium for the tests below (Playwright's sync API runs one at a time)."""
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    trained = os.environ.get("GPT_SMALL_SERVE_CHECKPOINT")
    run_dir = Path(trained) if trained else make_checkpoint(tmp_path_factory.mktemp("page") / "tiny-poet")
    with live_server(run_dir, "--max-batch", "16") as (url, _, err):
        yield url, err


def test_sonnet_form_history_and_seed(server, browser, tmp_path):
    url, _ = server
    page = _open(browser, url)
    page.fill("#prompt", "The Tide\n" if os.environ.get("GPT_SMALL_SERVE_CHECKPOINT") else "")
    page.select_option("#form", "sonnet")
    assert page.input_value("#syllables") == "10" and page.is_disabled("#lines")  # a sonnet has its length
    page.click("#write")
    page.wait_for_function("!document.querySelector('#check').hidden")
    verse = [line for line in page.text_content("#poem").split("\n") if line.strip()]
    assert len(verse) == 14 + (page.input_value("#prompt") != "")
    check = page.inner_text("#check")
    assert "All 14 lines meet the form (sonnet, rhyme ABAB CDCD EFEF GG, 10±1 syllables)" in check, check
    seed = page.inner_text("#seed")
    assert seed.startswith("seed ") and page.is_visible("#again")
    poem = page.inner_text("#poem")
    shot = Path("docs/serve-page.png") if os.environ.get("GPT_SMALL_SERVE_CHECKPOINT") else tmp_path / "page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000

    # the same seed writes the same sonnet
    page.click("#again")
    page.wait_for_function("!document.querySelector('#write').disabled && !document.querySelector('#check').hidden")
    assert page.inner_text("#poem") == poem and page.inner_text("#seed") == seed

    # history: both poems survive a reload; reopen shows the poem, its check and seed; delete stays deleted
    page.reload()
    page.wait_for_function("document.querySelectorAll('#history li').length === 2")
    item = page.locator("#history li").first
    assert "sonnet" in item.inner_text() and seed in item.inner_text()
    page.fill("#prompt", "something else")
    page.select_option("#form", "free")
    item.get_by_role("button", name="Reopen").click()
    assert page.inner_text("#poem") == poem and page.input_value("#form") == "sonnet"
    assert "All 14 lines meet the form" in page.inner_text("#check") and page.inner_text("#seed") == seed
    item.get_by_role("button", name="Delete").click()
    assert page.locator("#history li").count() == 1
    page.reload()
    page.wait_for_function("document.querySelectorAll('#history li').length === 1")

    # a phone: no horizontal scroll, with a poem, its check and the history on the page
    page.set_viewport_size({"width": 375, "height": 800})
    page.locator("#history li").first.get_by_role("button", name="Reopen").click()
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    page.screenshot(path=str(tmp_path / "phone.png"), full_page=True)
    page.close()


def test_cut_notice_and_stanza_breaks_when_writing_together(browser, tmp_path):
    run_dir = make_checkpoint(tmp_path / "tiny-poet")
    with live_server(run_dir, "--max-new-tokens", "40") as (url, _, err):
        page = _open(browser, url)
        try:
            page.fill("#prompt", "The sea\n")
            page.locator("#lines").fill("24")
            page.click("#write")
            page.wait_for_function("!document.querySelector('#cut').hidden")
            body = page.text_content("#poem")[len("The sea\n"):]
            assert page.inner_text("#cut").startswith(f"Cut at {len(body)} characters")
            # writing together: a blank line between stanzas of four
            page.click("#tab-cowrite")
            for line in ("One", "Two", "Three", "Four", "Five"):
                page.fill("#line", line)
                page.press("#line", "Enter")
                page.wait_for_function("!document.querySelector('#answer').disabled")
            assert page.locator("#verses li.blank").count() >= 1
            kinds = page.eval_on_selector_all("#verses li", "els => els.map(e => e.className)")
            assert kinds[4] == "blank" and kinds.count("blank") == (len(kinds) - kinds.count("blank") - 1) // 4
        finally:
            page.close()


def test_server_down_and_wrong_key_are_said_plainly(browser, tmp_path):
    run_dir = make_checkpoint(tmp_path / "tiny-poet")
    page = browser.new_page(viewport={"width": 900, "height": 1000})
    try:
        with live_server(run_dir, "--api-key", "right") as (url, proc, err):
            page.close()
            page = _open(browser, url)
            # dark mode: the Write button under the pointer keeps its text readable (WCAG AA)
            page.emulate_media(color_scheme="dark")
            page.hover("#write")
            fg, bg = page.eval_on_selector("#write", "b => [getComputedStyle(b).color, getComputedStyle(b).backgroundColor]")
            assert _contrast(fg, bg) >= 4.5, (fg, bg)
            page.emulate_media(color_scheme="light")
            asked = []
            page.on("dialog", lambda d: (asked.append(d.message), d.accept("wrong")))
            page.click("#write")
            page.wait_for_function("document.querySelector('#status').textContent.includes('API key was wrong')")
            assert len(asked) == 1  # asked once, told it was wrong, not asked again
        # the server has stopped; the page is still open
        assert proc.poll() is not None
        page.click("#write")
        page.wait_for_function("document.querySelector('#status').textContent.includes('not running')")
        status = page.inner_text("#status")
        assert "Failed to fetch" not in status and status.startswith("The server is not running")
        assert len(asked) == 1
    finally:
        page.close()
