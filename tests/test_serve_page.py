"""The page in a real browser: Playwright driving Debian's Chromium (`make test` installs it with
apt; Playwright cannot download browsers here) against a live `gpt-small serve`. Types a prompt,
presses Write, sees lines stream in, presses Stop, co-writes a line and re-rolls it; saves a
screenshot. With GPT_SMALL_SERVE_CHECKPOINT set (a trained run, e.g. runs/poem-cpu) the screenshot
goes to docs/serve-page.png; otherwise to the test's temporary folder."""

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
    shot = Path("docs/serve-page.png") if trained else tmp_path / "serve-page.png"
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
