"""The chat page in a real browser: Playwright driving Debian's chromium (installed by .ci/run).

Also a script: `python tests/serve/test_page.py --model demo --out docs/chat-page.png` serves a model, chats through
the page and saves the screenshot committed in docs/.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("MTPX_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def drive_page(url: str, messages: list[str], screenshot: Path | None = None, timeout_ms: int = 60_000,
               max_tokens: int | None = None, settings: dict[str, str] | None = None,
               sent: list[dict] | None = None) -> list[str]:
    """Open the chat page, fill the `settings` fields (id -> value), send each message, wait for each streamed
    reply; returns the replies' texts. `sent` collects the JSON bodies the page posted."""
    from playwright.sync_api import expect, sync_playwright
    replies = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 720})
            external = []
            page.on("request", lambda req: external.append(req.url) if not req.url.startswith(url) else None)
            if sent is not None:
                page.on("request", lambda req: sent.append(req.post_data_json)
                        if req.url.endswith("/v1/chat/completions") else None)
            page.goto(url + "/")
            expect(page.locator("#model")).not_to_have_text("…", timeout=timeout_ms)
            if max_tokens:
                page.fill("#max_tokens", str(max_tokens))
            for field, value in (settings or {}).items():
                page.fill("#" + field, value)
            for i, text in enumerate(messages):
                page.fill("#input", text)
                page.press("#input", "Enter")
                reply = page.locator(".msg.assistant").nth(i)
                # streaming: the reply is marked while tokens arrive, then gets its stats line
                expect(reply).to_have_class("msg assistant", timeout=timeout_ms)
                expect(reply.locator(".meta")).to_contain_text("tok/s", timeout=timeout_ms)
                replies.append(reply.locator(".bubble").inner_text())
            page.wait_for_timeout(300)
            assert not external, f"the page fetched external resources: {external}"
            if screenshot is not None:
                screenshot.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(screenshot))
        finally:
            browser.close()
    return replies


def _skip_reason() -> str | None:
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -e '.[test]')"
    if not Path(CHROMIUM).exists():
        return f"chromium not found at {CHROMIUM} (Debian: apt-get install -y chromium; .ci/run installs it)"
    return None


def browser_required() -> bool:
    """MTPX_REQUIRE_BROWSER=1 (0: never), or, where that is unset, the CI variable that CI services set."""
    value = os.environ.get("MTPX_REQUIRE_BROWSER", os.environ.get("CI", ""))
    return value.strip().lower() not in ("", "0", "false", "no", "off")


def need_browser() -> None:
    """Skip where playwright or chromium is missing; fail instead where the browser is required (CI)."""
    reason = _skip_reason()
    if reason and browser_required():
        pytest.fail(f"{reason}; the browser is required here (MTPX_REQUIRE_BROWSER=1, or CI set)", pytrace=False)
    if reason:
        pytest.skip(reason)


def test_page_streams_a_reply(live, tmp_path):
    need_browser()
    import httpx
    before = httpx.get(live.url + "/health").json()["requests_finished"]
    shot = tmp_path / "chat-page.png"
    replies = drive_page(live.url, ["Hello, how are you today?", "And a second turn?"], shot, max_tokens=24)
    assert len(replies) == 2 and all(r.strip() for r in replies)
    assert shot.stat().st_size > 10_000
    # both turns went through the streaming chat endpoint, the second one with the history
    assert httpx.get(live.url + "/health").json()["requests_finished"] >= before + 2


def test_page_sends_the_sampling_settings_it_shows(live):
    """Top-p, repetition penalty and DRY reach the API as its fields; fields left empty are left out."""
    need_browser()
    sent: list[dict] = []
    replies = drive_page(live.url, ["Hello there"], max_tokens=12, sent=sent,
                         settings={"repetition_penalty": "1.1", "dry_multiplier": "0.8"})
    assert replies[0].strip() and len(sent) == 1
    assert sent[0]["repetition_penalty"] == 1.1 and sent[0]["dry_multiplier"] == 0.8 and "top_p" not in sent[0]


def test_page_streams_tokens_incrementally(live):
    """The reply text grows while the request is running (it is not delivered in one piece at the end)."""
    need_browser()
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(live.url + "/")
            page.fill("#max_tokens", "200")
            page.fill("#input", "Tell me a long story about a fox.")
            # record the reply's length at every DOM change, from before the request starts: polling missed the
            # middle of replies that the tiny model finished within two polls (seen once in CI: lengths [44, 76])
            page.evaluate("""() => {
                window.lengthsSeen = [];
                new MutationObserver(() => {
                    const m = document.querySelector('.msg.assistant .bubble');
                    if (m) window.lengthsSeen.push(m.textContent.length);
                }).observe(document.body, {subtree: true, childList: true, characterData: true});
            }""")
            page.click("#send")
            page.wait_for_function("""() => {
                const m = document.querySelector('.msg.assistant');
                return m && !m.classList.contains('streaming');
            }""", timeout=60000)
            lengths = page.evaluate("window.lengthsSeen")
        finally:
            browser.close()
    distinct = sorted(set(lengths))
    assert len(distinct) >= 3, f"reply did not stream incrementally: lengths seen {distinct}"


def test_a_missing_browser_fails_where_it_is_required_and_skips_elsewhere(monkeypatch):
    monkeypatch.setitem(globals(), "CHROMIUM", "/nonexistent/chromium")
    monkeypatch.delenv("MTPX_REQUIRE_BROWSER", raising=False)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="chromium not found"):
        need_browser()
    monkeypatch.setenv("MTPX_REQUIRE_BROWSER", "0")
    with pytest.raises(pytest.skip.Exception):
        need_browser()
    monkeypatch.delenv("CI")
    monkeypatch.setenv("MTPX_REQUIRE_BROWSER", "1")
    with pytest.raises(pytest.fail.Exception):
        need_browser()


if __name__ == "__main__":
    import argparse

    sys.path.insert(0, str(Path(__file__).parents[1]))
    sys.path.insert(0, str(Path(__file__).parent))  # tests/serve/conftest.py, not tests/conftest.py
    import mtpx
    from conftest import LiveServer
    from mtpx.serve.app import Server
    from mtpx.engine.params import SpecConfig

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", default="docs/chat-page.png")
    ap.add_argument("--spec-type", default="mtp")
    ap.add_argument("--message", action="append", default=None)
    ap.add_argument("--max-tokens", type=int, default=None)
    a = ap.parse_args()
    srv = Server(mtpx.LLM(a.model), model_name="demo" if a.model == "demo" else None,
                 spec=SpecConfig(spec_type=a.spec_type))
    live_server = LiveServer(srv)
    msgs = a.message or ["Write a Python function that adds two numbers.", "Now make it add three."]
    print(drive_page(live_server.url, msgs, Path(a.out), timeout_ms=300_000, max_tokens=a.max_tokens))
    live_server.stop()


def test_page_stop_button_cancels_the_sequence(live, monkeypatch):
    need_browser()
    import time

    import httpx
    from playwright.sync_api import expect, sync_playwright

    from mtpx.engine import engine
    # the tiny model can finish all 400 tokens before the click lands (then Stop is disabled): slow every decode
    # round by 5 ms (the random tiny model rejects most drafts: ~1 token a round, so ~2 s for 400 tokens)
    decode_round = engine.decode_round

    def slow_round(*args, **kwargs):
        time.sleep(0.005)
        return decode_round(*args, **kwargs)
    monkeypatch.setattr(engine, "decode_round", slow_round)
    before = httpx.get(live.url + "/health").json()["requests_cancelled"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(live.url + "/")
            page.fill("#max_tokens", "400")
            page.fill("#input", "Count to a thousand.")
            page.click("#send")
            expect(page.locator(".msg.assistant.streaming")).to_have_count(1, timeout=30_000)
            page.wait_for_function("document.querySelector('.msg.assistant .bubble').textContent.length > 3",
                                   timeout=30_000)
            page.click("#stop")
            expect(page.locator(".msg.assistant .meta")).to_have_text("stopped", timeout=10_000)
        finally:
            browser.close()
    deadline = time.time() + 20
    while httpx.get(live.url + "/health").json()["requests_cancelled"] <= before:
        assert time.time() < deadline, "Stop in the page did not cancel the sequence"
        time.sleep(0.05)
