"""The page at GET /test in a real browser: Playwright driving Debian's chromium against `smartvm serve`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service_support import Served, chromium_or_skip, make_key, screenshot_path, serving


@pytest.fixture
def service(tmp_path: Path, runtime_root: Path) -> Iterator[tuple[Served, str]]:
    key = make_key(tmp_path)
    with serving(tmp_path, runtime_root) as served:
        yield served, key


@pytest.fixture
def page() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    chromium = chromium_or_skip()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), args=["--no-sandbox"])
        try:
            context = browser.new_context(viewport={"width": 1200, "height": 900})
            yield context.new_page()
        finally:
            browser.close()


def test_the_page_takes_a_key_and_shows_the_empty_list(service: tuple[Served, str], page: Any) -> None:
    from playwright.sync_api import expect

    served, key = service
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("request", lambda r: None if r.url.startswith(served.url) else problems.append(r.url))
    page.goto(f"{served.url}/test")
    expect(page.locator("#app")).to_be_hidden()

    page.fill("#api-key", "svm_wrong")
    page.click("#key-save")
    expect(page.locator("#error-text")).to_contain_text("UNAUTHORIZED")
    expect(page.locator("#app")).to_be_hidden()
    problems.clear()  # the browser logs the 401 itself

    page.fill("#api-key", key)
    page.click("#key-save")
    expect(page.locator("#app")).to_be_visible()
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator("#sandboxes-empty")).to_be_visible()
    expect(page.locator("#sandboxes tbody tr")).to_have_count(0)
    expect(page.locator("#snapshots-empty")).to_be_visible()
    expect(page.locator("#key-status")).to_contain_text(key[:12])
    assert page.evaluate("sessionStorage.getItem('smartvm.apiKey')") == key

    page.reload()  # the key stays for the browser session
    expect(page.locator("#app")).to_be_visible()
    expect(page.locator("#list-updated")).to_contain_text("updated")
    page.screenshot(path=str(screenshot_path("test-page-empty")), full_page=True)
    assert problems == []

    page.click("#key-forget")
    expect(page.locator("#app")).to_be_hidden()
    assert page.evaluate("sessionStorage.getItem('smartvm.apiKey')") is None
