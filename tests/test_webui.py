"""The chat page `qwen serve` serves at `/`, driven in a real headless Chromium (Debian's package, through Playwright)
against the real `qwen serve` command with the default model on 127.0.0.1: streamed replies, stop (the server's
running count back to 0), conversations kept across a reload, branches from edits and regenerations, export and
import, settings that change the request, model output that renders as text and runs nothing, the API-key prompt.
The page's files, headers and size are checked without a browser."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest
from serve_command import ServeCommand

from qwen_engine.server.webui import CONTENT_SECURITY_POLICY, ROOT, load_assets

pytestmark = pytest.mark.slow  # a browser and a server with the default model
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
NAME = "qwen-test"
SOURCES = Path(__file__).resolve().parents[1] / "webui"
SHORT = {"max_tokens": "24", "temperature": "0"}  # replies short enough for 2 cores


@pytest.fixture(scope="module")
def served(default_gguf) -> ServeCommand:
    serve = ServeCommand(default_gguf, "--served-model-name", NAME, "--max-num-seqs", "4", "--kv-cache-gb", "0.25")
    yield serve
    serve.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail("the browser tests need Debian's chromium: apt-get install chromium (.ci/run does)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


def url(serve: ServeCommand) -> str:
    return f"http://127.0.0.1:{serve.port}/"


@pytest.fixture
def page(browser, served):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda err: errors.append(str(err)))
    opened.goto(url(served))
    opened.get_by_test_id("model-name").filter(has_text=NAME).wait_for()
    yield opened
    context.close()
    assert not errors, errors  # no script error on the page, ever


def metric(serve: ServeCommand, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{serve.port}/metrics").text
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def set_fields(page, fields: dict[str, str]) -> None:
    page.get_by_test_id("settings").click()
    panel = page.get_by_test_id("settings-panel")
    for name, value in fields.items():
        panel.get_by_test_id(name).fill(value)
    page.get_by_test_id("settings-close").click()


def busy(page) -> bool:
    return page.evaluate("document.body.dataset.busy") == "1"


def send(page, text: str) -> None:
    page.get_by_test_id("composer").fill(text)
    page.get_by_test_id("composer").press("Enter")


def finished(page, timeout: float = 120) -> None:
    """The reply that was just asked for is done (it may have been done before its start was seen)."""
    until(lambda: busy(page), 2)
    assert until(lambda: not busy(page), timeout)


def until(check, timeout: float = 60) -> bool:
    """Poll `check` (page.wait_for_function's predicates would be evaluated in the page, which its policy forbids)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def replies(page) -> list[str]:
    return page.locator("[data-testid=message][data-role=assistant] [data-testid=message-content]").all_inner_texts()


# ---- the page, without a browser ---------------------------------------------------------------------------------
def test_the_built_page_is_the_one_its_sources_make() -> None:
    """The committed bundle matches webui/'s sources (rebuild with `cd webui && npm ci && node build.mjs`): the hash
    build.mjs records over them, recomputed here."""
    digest = hashlib.sha256()
    files = [SOURCES / name for name in ("package.json", "package-lock.json", "build.mjs")]
    files += [path for path in (SOURCES / "src").rglob("*") if path.is_file()]
    for path in sorted(files, key=lambda p: p.relative_to(SOURCES).as_posix()):
        digest.update(path.relative_to(SOURCES).as_posix().encode() + b"\n" + path.read_bytes() + b"\n")
    assert json.loads((ROOT / "build-info.json").read_text())["sources_sha256"] == digest.hexdigest()


def test_the_first_load_is_small_and_needs_nothing_from_elsewhere() -> None:
    """index.html, its script and its style, gzip-compressed as served: under 500 KB; nothing they reference lies
    outside this server (fonts load only when math is shown)."""
    assets = load_assets()
    index = assets["/"].body.decode()
    first = ["/", *re.findall(r'(?:src|href)="(/assets/[^"]+)"', index)]
    assert {"/assets/app.js", "/assets/app.css"} <= set(first)
    assert sum(len(assets[path].gzipped or assets[path].body) for path in first) < 500_000
    for path, asset in assets.items():
        if asset.media_type.startswith(("text/", "image/svg")):
            text = asset.body.decode()
            assert not re.search(r"""(?:src|href)=["']?(?:https?:)?//""", text), path
            assert "@import url(http" not in text and "url(http" not in text, path
    assert "<script>" not in index and "onload=" not in index  # nothing inline: the policy allows none


def test_the_page_and_its_assets_carry_the_policy(served) -> None:
    base = url(served)
    page = httpx.get(base, headers={"accept-encoding": "gzip"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-encoding"] == "gzip"
    assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert "script-src 'self'" in CONTENT_SECURITY_POLICY and "connect-src 'self'" in CONTENT_SECURITY_POLICY
    assert page.headers["x-content-type-options"] == "nosniff"
    script = httpx.get(base + "assets/app.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert httpx.get(base + "assets/app.js", headers={"if-none-match": script.headers["etag"]}).status_code == 304
    assert httpx.get(base + "assets/../pyproject.toml").status_code == 404
    assert httpx.get(base + "assets/nothing.js").status_code == 404


def test_no_webui_leaves_the_page_out(tiny_gguf) -> None:
    serve = ServeCommand(tiny_gguf, "--no-webui", "--kv-cache-gb", "0.01")
    try:
        assert httpx.get(url(serve)).status_code == 404
        assert httpx.get(url(serve) + "v1/models").status_code == 200
    finally:
        serve.close()


# ---- in the browser ----------------------------------------------------------------------------------------------
def test_a_message_gets_a_streamed_reply_with_its_speed(page) -> None:
    assert "32768" in page.get_by_test_id("model-context").inner_text()
    set_fields(page, {"max_tokens": "48", "temperature": "0"})
    send(page, "Write a Python function that adds two numbers.")
    # Text appears while the reply is still streaming.
    assert until(lambda: busy(page) and any(text.strip() for text in replies(page)))
    finished(page)
    assert replies(page)[-1].strip()
    speed = page.get_by_test_id("speed").last.inner_text()
    assert re.search(r"\d+ prompt · \d+ tokens · [\d.]+ tok/s · first token [\d.]+ s", speed), speed
    assert page.get_by_test_id("message").first.get_attribute("data-role") == "user"


def test_stop_cancels_the_request_on_the_server(page, served) -> None:
    set_fields(page, {"max_tokens": "2000", "temperature": "0"})
    send(page, "Count from 1 to 1000, one number per line.")
    assert until(lambda: any(len(text) > 20 for text in replies(page)))
    assert metric(served, "qwen_requests_running") == 1
    page.get_by_test_id("stop").click()
    finished(page, 10)
    kept = replies(page)[-1]
    assert kept.strip()  # the partial reply stays
    deadline = time.monotonic() + 10
    while metric(served, "qwen_requests_running") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(served, "qwen_requests_running") == 0
    assert metric(served, "qwen_requests_in_flight") == 0
    assert metric(served, "qwen_kv_blocks_used") == 0  # the stopped request's blocks are back


def test_a_reload_finds_the_conversation(page) -> None:
    set_fields(page, SHORT)
    send(page, "Name one prime number.")
    finished(page)
    reply = replies(page)[-1]
    page.reload()
    page.get_by_test_id("model-name").filter(has_text=NAME).wait_for()
    item = page.get_by_test_id("conversation").filter(has_text="Name one prime number")
    item.wait_for()
    item.click()
    page.get_by_test_id("message").nth(1).wait_for()
    assert replies(page) == [reply]


def test_edits_and_regenerations_keep_every_branch_reachable(page) -> None:
    set_fields(page, {"max_tokens": "16", "temperature": "1.0", "seed": ""})
    send(page, "Say a color.")
    finished(page)
    first = replies(page)[-1]
    assistant = page.locator("[data-testid=message][data-role=assistant]").last
    assistant.get_by_test_id("regenerate").click()
    finished(page)
    assistant = page.locator("[data-testid=message][data-role=assistant]").last
    assert assistant.get_by_test_id("branch-label").inner_text() == "2/2"
    second = replies(page)[-1]
    assistant.get_by_test_id("branch-prev").click()
    assert page.locator("[data-testid=message][data-role=assistant]").last.get_by_test_id("branch-label").inner_text() == "1/2"
    assert replies(page)[-1] == first
    # An edited question is a new branch of the thread; the old one, with both its replies, stays reachable.
    user = page.locator("[data-testid=message][data-role=user]").last
    user.get_by_test_id("edit").click()
    page.get_by_test_id("edit-box").fill("Say an animal.")
    page.get_by_test_id("edit-save").click()
    finished(page)
    user = page.locator("[data-testid=message][data-role=user]").last
    assert user.get_by_test_id("branch-label").inner_text() == "2/2"
    assert "Say an animal." in user.get_by_test_id("message-content").inner_text()
    user.get_by_test_id("branch-prev").click()
    user = page.locator("[data-testid=message][data-role=user]").last
    assert "Say a color." in user.get_by_test_id("message-content").inner_text()
    assistant = page.locator("[data-testid=message][data-role=assistant]").last
    assert assistant.get_by_test_id("branch-label").inner_text() in ("1/2", "2/2")
    shown = replies(page)[-1]
    assistant.get_by_test_id("branch-next" if assistant.get_by_test_id("branch-label").inner_text() == "1/2"
                              else "branch-prev").click()
    assert {shown, replies(page)[-1]} == {first, second} or first == second


def test_conversations_are_searched_renamed_and_deleted(page) -> None:
    set_fields(page, SHORT)
    send(page, "Tell me about owls.")
    finished(page)
    page.get_by_test_id("new-chat").click()
    send(page, "Tell me about cats.")
    finished(page)
    items = page.get_by_test_id("conversation")
    assert until(lambda: items.count() == 2)
    page.get_by_test_id("search").fill("owls")
    assert until(lambda: items.count() == 1) and "owls" in items.first.inner_text()
    page.get_by_test_id("search").fill("")
    assert until(lambda: items.count() == 2)
    items.filter(has_text="owls").get_by_test_id("rename").click()
    page.get_by_test_id("rename-input").fill("Birds")
    page.get_by_test_id("rename-input").press("Enter")
    items.filter(has_text="Birds").wait_for()
    items.filter(has_text="Birds").get_by_test_id("delete").click()
    assert until(lambda: items.count() == 1)
    page.reload()
    page.get_by_test_id("model-name").filter(has_text=NAME).wait_for()
    assert until(lambda: items.count() == 1) and "cats" in items.first.inner_text()


def test_export_then_import_into_an_empty_browser(page, browser, served, tmp_path) -> None:
    set_fields(page, SHORT)
    send(page, "What is 2 + 2?")
    finished(page)
    reply = replies(page)[-1]
    with page.expect_download() as download:
        page.get_by_test_id("export").click()
    saved = tmp_path / "conversations.json"
    download.value.save_as(saved)
    assert download.value.suggested_filename.endswith(".json")
    exported = json.loads(saved.read_text())
    assert "What is 2 + 2?" in json.dumps(exported)
    fresh = browser.new_context()
    other = fresh.new_page()
    try:
        other.goto(url(served))
        other.get_by_test_id("model-name").filter(has_text=NAME).wait_for()
        assert other.get_by_test_id("conversation").count() == 0
        other.get_by_test_id("import").set_input_files(str(saved))
        item = other.get_by_test_id("conversation").filter(has_text="What is 2 + 2?")
        item.wait_for()
        item.click()
        other.get_by_test_id("message").nth(1).wait_for()
        assert replies(other) == [reply]
    finally:
        fresh.close()


def test_settings_change_the_request_the_page_sends(page) -> None:
    set_fields(page, {"system": "You answer in one word.", "temperature": "0.3", "top_p": "0.8", "top_k": "5",
                      "min_p": "0.05", "repetition_penalty": "1.1", "presence_penalty": "0.2",
                      "frequency_penalty": "0.1", "max_tokens": "7", "seed": "11"})
    with page.expect_request("**/v1/chat/completions") as sent:
        send(page, "Hello")
    body = sent.value.post_data_json
    assert body["messages"][0] == {"role": "system", "content": "You answer in one word."}
    assert body["messages"][-1]["role"] == "user" and "Hello" in json.dumps(body["messages"][-1])
    assert body["stream"] is True and body["model"] == NAME
    assert {key: body[key] for key in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                                       "presence_penalty", "frequency_penalty", "max_tokens", "seed")} == {
        "temperature": 0.3, "top_p": 0.8, "top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1,
        "presence_penalty": 0.2, "frequency_penalty": 0.1, "max_tokens": 7, "seed": 11}
    finished(page)
    page.get_by_test_id("settings").click()
    page.get_by_test_id("preset").select_option(label="Deterministic")
    assert page.get_by_test_id("temperature").input_value() == "0"
    page.get_by_test_id("settings-close").click()
    with page.expect_request("**/v1/chat/completions") as sent:
        send(page, "Again")
    assert sent.value.post_data_json["temperature"] == 0
    finished(page)


INJECTION = ('Here: <script>window.__pwned = 1</script> <img src=x onerror="window.__pwned = 2"> '
             '<a href="javascript:window.__pwned = 3">link</a>\n\n```html\n<b>code</b>\n```\n\n| a | b |\n|---|---|\n| 1 | 2 |'
             '\n\nmath $x^2$')


def test_a_reply_carrying_html_and_script_renders_as_text_and_runs_nothing(page) -> None:
    """The reply comes from the page's own streaming path (the completions route answered with these chunks): its
    HTML shows as text, the link's javascript: never runs, and markdown still renders (code, table, math)."""
    events = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
    events += [{"choices": [{"index": 0, "delta": {"content": INJECTION[i : i + 9]}}]} for i in range(0, len(INJECTION), 9)]
    events += [{"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
               {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 20, "total_tokens": 25}}]
    stream = "".join(f"data: {json.dumps(event)}\n\n" for event in events) + "data: [DONE]\n\n"
    page.route("**/v1/chat/completions", lambda route: route.fulfill(status=200, body=stream,
                                                                      headers={"content-type": "text/event-stream"}))
    send(page, "Show me some HTML.")
    finished(page)
    content = page.locator("[data-testid=message][data-role=assistant] [data-testid=message-content]").last
    text = content.inner_text()
    assert "<script>window.__pwned = 1</script>" in text and 'onerror="window.__pwned = 2"' in text
    assert content.locator("script, img[onerror], [onerror]").count() == 0
    assert content.locator("table").count() == 1 and content.locator("pre code").count() == 1
    assert content.locator(".katex").count() == 1
    for link in content.locator("a").all():
        link.click()
    assert page.evaluate("window.__pwned") is None


def test_a_server_with_an_api_key_asks_for_it(browser, default_model) -> None:
    from test_server import KEY, Running

    running = Running(default_model, api_key=KEY)
    context = browser.new_context()
    try:
        page = context.new_page()
        assert httpx.get(running.url + "/").status_code == 200  # the page itself needs no key
        page.goto(running.url + "/")
        dialog = page.get_by_test_id("api-key-dialog")
        dialog.wait_for()
        page.get_by_test_id("api-key-input").fill("wrong")
        page.get_by_test_id("api-key-save").click()
        dialog.wait_for()  # asked again
        page.get_by_test_id("api-key-input").fill(KEY)
        page.get_by_test_id("api-key-save").click()
        page.get_by_test_id("model-name").filter(has_text="qwen").wait_for()
        assert KEY not in page.url
        with page.expect_request("**/v1/chat/completions") as sent:
            send(page, "Hi")
        assert sent.value.headers["authorization"] == f"Bearer {KEY}"
        finished(page)
        assert replies(page)[-1].strip()
    finally:
        context.close()
        running.close()


def test_errors_are_said_plainly(page, served) -> None:
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=429, content_type="application/json",
        body=json.dumps({"error": {"message": "too many requests", "type": "rate_limit_error"}})))
    send_text = "Anyone there?"
    page.get_by_test_id("composer").fill(send_text)
    page.get_by_test_id("send").click()
    error = page.get_by_test_id("error")
    error.filter(has_text="429").wait_for()
    page.unroute("**/v1/chat/completions")
    page.route("**/v1/chat/completions", lambda route: route.abort("connectionrefused"))
    page.get_by_test_id("composer").fill(send_text)
    page.get_by_test_id("send").click()
    error.filter(has_text=re.compile("reach", re.I)).wait_for()


def test_a_phone_sized_screen_keeps_everything_reachable(browser, served) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    try:
        page = context.new_page()
        page.goto(url(served))
        page.get_by_test_id("model-name").filter(has_text=NAME).wait_for()
        for element in ("composer", "send", "menu", "settings"):
            box = page.get_by_test_id(element).bounding_box()
            assert box and box["x"] >= 0 and box["x"] + box["width"] <= 390, element
        page.get_by_test_id("menu").click()
        page.get_by_test_id("new-chat").wait_for(state="visible")
        page.get_by_test_id("theme-toggle").click()
        theme = page.evaluate("document.documentElement.dataset.theme")
        page.reload()
        page.get_by_test_id("model-name").filter(has_text=NAME).wait_for()
        assert page.evaluate("document.documentElement.dataset.theme") == theme
    finally:
        context.close()


def test_shift_enter_breaks_the_line_and_enter_sends(page) -> None:
    composer = page.get_by_test_id("composer")
    composer.fill("first line")
    composer.press("Shift+Enter")
    composer.type("second line")
    assert composer.input_value() == "first line\nsecond line"
    assert page.get_by_test_id("message").count() == 0
    set_fields(page, SHORT)
    composer.press("Enter")
    finished(page)
    assert "second line" in page.locator("[data-testid=message][data-role=user]").last.inner_text()


def test_a_text_file_attached_becomes_part_of_the_message(page, tmp_path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("The secret word is pelican.\n")
    set_fields(page, SHORT)
    page.get_by_test_id("attach").set_input_files(str(notes))
    page.get_by_test_id("attachment").filter(has_text="notes.txt").wait_for()
    with page.expect_request("**/v1/chat/completions") as sent:
        send(page, "What is the secret word?")
    assert "pelican" in json.dumps(sent.value.post_data_json["messages"][-1])
    finished(page)
    photo = tmp_path / "photo.png"
    photo.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    page.get_by_test_id("attach").set_input_files(str(photo))
    page.get_by_test_id("error").filter(has_text=re.compile("image", re.I)).wait_for()  # this model takes none


def test_an_image_goes_to_a_model_that_takes_images(browser, gguf_arrays, tmp_path) -> None:
    """On a Qwen-VL checkpoint (`input_modalities` has "image") an attached picture goes out as an image_url part
    with a data: URL, and the reply comes back; the text-only model refuses it (above)."""
    from PIL import Image
    from test_server import Running
    from tiny import write_qwen_vl

    import qwen_engine

    write_qwen_vl(tmp_path / "vl", gguf_arrays[0])
    running = Running(qwen_engine.load(tmp_path / "vl", dtype="float32"))
    picture = tmp_path / "red.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(picture)
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(running.url + "/")
        page.get_by_test_id("model-name").filter(has_text="qwen").wait_for()
        set_fields(page, {"max_tokens": "4", "temperature": "0"})
        page.get_by_test_id("attach").set_input_files(str(picture))
        page.get_by_test_id("attachment").filter(has_text="red.png").wait_for()
        with page.expect_request("**/v1/chat/completions") as sent:
            send(page, "What colour is this?")
        parts = sent.value.post_data_json["messages"][-1]["content"]
        images = [part for part in parts if part["type"] == "image_url"]
        assert len(images) == 1 and images[0]["image_url"]["url"].startswith("data:image/png;base64,")
        assert any(part["type"] == "text" and "What colour" in part["text"] for part in parts)
        finished(page)
        assert page.locator("[data-testid=message][data-role=assistant]").count() == 1
        assert not page.get_by_test_id("error").is_visible()
    finally:
        context.close()
        running.close()
