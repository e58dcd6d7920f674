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


@pytest.mark.integration
def test_a_person_drives_sandboxes_from_the_page(sandbox_data: Path, runtime_root: Path, page: Any) -> None:
    """Key, create, exec `echo hi`, pause, resume, snapshot, create from it, errors shown, clean up."""
    from playwright.sync_api import expect

    key = make_key(sandbox_data, "browser")
    with serving(sandbox_data, runtime_root) as served:
        page.set_default_timeout(180_000)  # a create may build the base template first
        page.goto(f"{served.url}/test")
        page.fill("#api-key", key)
        page.click("#key-save")
        expect(page.locator("#app")).to_be_visible()

        page.fill("#create-timeout", "600")
        page.click("#create")
        expect(page.locator("#create-status")).to_contain_text("created sb-")
        sid = page.locator("#create-status").inner_text().split()[-1]
        row = page.locator(f'#sandboxes tr[data-id="{sid}"]')
        expect(row.locator(".state")).to_have_text("running")
        expect(page.locator("#selected-id")).to_have_text(sid)

        page.fill("#exec-cmd", "echo hi")
        page.click("#exec")
        expect(page.locator("#exec-status")).to_have_text("exit 0")
        expect(page.locator("#exec-output")).to_contain_text("hi")

        row.locator("[data-testid=pause]").click()
        expect(row.locator(".state")).to_have_text("paused")
        row.locator("[data-testid=pause]").click()  # a second pause is refused, and the page says so
        expect(page.locator("#error-text")).to_contain_text("SANDBOX_ALREADY_PAUSED")
        page.click("#error-close")
        row.locator("[data-testid=resume]").click()
        expect(row.locator(".state")).to_have_text("running")

        page.fill("#snapshot-name", "page-snap")
        page.click("#snapshot")
        snap = page.locator('#snapshots tr[data-name="page-snap"]')
        expect(snap).to_be_visible()
        snap.locator("[data-testid=create-from]").click()
        expect(page.locator("#sandboxes tbody tr")).to_have_count(2)
        clone = page.locator(f'#sandboxes tbody tr:not([data-id="{sid}"])')
        expect(clone.locator(".state")).to_have_text("running")
        page.screenshot(path=str(screenshot_path("test-page-two-sandboxes")), full_page=True)

        snap.locator("[data-testid=delete-snapshot]").click()  # still the template of the clone
        expect(page.locator("#error-text")).to_contain_text("SNAPSHOT_IN_USE")
        page.click("#error-close")
        clone.locator("[data-testid=destroy]").click()
        expect(page.locator("#sandboxes tbody tr")).to_have_count(1)
        snap.locator("[data-testid=delete-snapshot]").click()
        expect(page.locator("#snapshots-empty")).to_be_visible()
        row.locator("[data-testid=destroy]").click()
        expect(page.locator("#sandboxes-empty")).to_be_visible()
        expect(page.locator("#error")).to_be_hidden()
        page.screenshot(path=str(screenshot_path("test-page-done")), full_page=True)
