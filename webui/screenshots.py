"""Screenshots of the chat page for the README (docs/webui-*.png): desktop and phone width, light and dark, each a
fresh browser talking to the real `qwen serve` with the default model. Needs Debian's chromium and playwright (the
test extra).

    python webui/screenshots.py
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

DOCS = Path(__file__).resolve().parents[1] / "docs"
QUESTION = "Write a Python function that checks whether a string is a palindrome, and show how to call it."
SIZES = {"desktop": {"width": 1280, "height": 800}, "phone": {"width": 390, "height": 844}}


def main() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "qwen_engine.cli", "serve", "--port", str(port)])
    base = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(base + "health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise SystemExit("qwen serve did not come up") from None
                time.sleep(0.3)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
            for size, viewport in SIZES.items():
                for scheme in ("light", "dark"):
                    context = browser.new_context(viewport=viewport, color_scheme=scheme, device_scale_factor=1,
                                                  is_mobile=size == "phone")
                    page = context.new_page()
                    page.goto(base)
                    page.get_by_test_id("model-name").wait_for()
                    page.get_by_test_id("settings").click()
                    page.get_by_test_id("max_tokens").fill("200")
                    page.get_by_test_id("temperature").fill("0")
                    page.get_by_test_id("settings-close").click()
                    page.get_by_test_id("composer").fill(QUESTION)
                    page.get_by_test_id("composer").press("Enter")
                    # (polled from here: the page's policy forbids the predicates wait_for_function evaluates)
                    while page.evaluate("document.body.dataset.busy") != "1":
                        time.sleep(0.05)
                    while page.evaluate("document.body.dataset.busy") == "1":
                        time.sleep(0.1)
                    path = DOCS / f"webui-{size}-{scheme}.png"
                    page.screenshot(path=str(path))
                    print(path)
                    context.close()
            browser.close()
    finally:
        server.kill()
        server.wait()


if __name__ == "__main__":
    main()
