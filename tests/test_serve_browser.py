"""The playground in a real browser: headless Chromium (Debian's) driven by Playwright.

Opens the page, types a prompt, asks for a greedy completion and watches the text arrive in
several pieces; the finished text must equal the reference greedy continuation, and the page
must never contact another origin. A screenshot is kept in the test's tmp dir and copied to
`artifacts/playground.png` (git-ignored).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the server needs fastapi: pip install 'bardlm[serve]'")
pytest.importorskip("uvicorn", reason="the server needs uvicorn: pip install 'bardlm[serve]'")
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the browser test needs playwright: pip install playwright")

from serve_helpers import ThreadServer, make_checkpoint, reference_greedy  # noqa: E402

from bardlm.io.checkpoint import load_checkpoint  # noqa: E402
from bardlm.serve import build_app  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser")
                 if Path(p).exists()), shutil.which("chromium"))
# No downloads, no sync, no first-run dialogs: the browser talks only to our server.
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None,
                    reason="Chromium not found (apt-get install -y chromium; .ci/run does this)")
def test_playground_streams_text(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "tiny-web")
    model, tok, _ = load_checkpoint(ckpt)
    prompt, n = "ROMEO: ", 60
    expected = reference_greedy(model, tok, prompt, n)
    with ThreadServer(build_app(model, tok, model_name="tiny-web")) as srv, \
            sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            urls: list[str] = []
            page.on("request", lambda r: urls.append(r.url))
            page.goto(srv.base_url + "/")
            sync_api.expect(page.locator("#model")).to_contain_text("tiny-web")
            # Count how many times the output grows: streamed text grows many times.
            page.evaluate("""() => {
                window.__updates = 0;
                new MutationObserver(() => { window.__updates += 1; })
                    .observe(document.getElementById('completion'),
                             {childList: true, characterData: true, subtree: true});
            }""")
            page.fill("#prompt", prompt)
            page.fill("#max_tokens", str(n))
            page.fill("#temperature", "0")
            page.click("#go")
            sync_api.expect(page.locator("#stats")).to_contain_text("tokens/s", timeout=60_000)
            assert page.inner_text("#completion") == expected
            assert page.evaluate("window.__updates") > 5
            assert page.locator("#stats").inner_text().startswith(f"{n} tokens in")
            shot = tmp_path / "playground.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 1000
    (REPO / "artifacts").mkdir(exist_ok=True)
    shutil.copy(shot, REPO / "artifacts" / "playground.png")
    assert urls and all(u.startswith(srv.base_url) or u.startswith("data:") for u in urls), urls


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None,
                    reason="Chromium not found (apt-get install -y chromium; .ci/run does this)")
def test_playground_chat_tab(tmp_path: Path) -> None:
    """The chat tab sends the conversation to /v1/chat/completions and shows the streamed
    reply: the same text as a greedy ChatSession reply, for two turns (history kept)."""
    from bardlm.infer.chat import ChatSession
    from bardlm.io.metadata import template_for

    ckpt = make_checkpoint(tmp_path / "tiny-chat")
    model, tok, _ = load_checkpoint(ckpt)
    template = template_for(ckpt, tok)
    session = ChatSession(model, tok, template, max_new_tokens=20, temperature=0.0)
    expected = [session.reply("Hello"), session.reply("Again")]
    with ThreadServer(build_app(model, tok, model_name="tiny-chat", chat_template=template)) as srv, \
            sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page()
            page.goto(srv.base_url + "/")
            sync_api.expect(page.locator("#model")).to_contain_text("tiny-chat")
            page.fill("#max_tokens", "20")
            page.fill("#temperature", "0")
            for i, text in enumerate(["Hello", "Again"]):
                page.fill("#chat-input", text)
                page.click("#chat-send")
                reply = page.locator("#chat-log .assistant").nth(i)
                sync_api.expect(page.locator("#chat-send")).to_be_enabled(timeout=60_000)
                assert reply.inner_text() == expected[i]
        finally:
            browser.close()
