"""The web page in a real browser: Playwright drives Debian's Chromium against the service on loopback.

Chromium comes from the system (``scripts/install_browser.sh``), never from ``playwright install``;
the test skips, saying why, only where that browser is missing or cannot start. Every request the
page makes to anything but the service is blocked and recorded: the page and /docs must work offline.
The service's Content-Security-Policy stays on (no ``bypass_csp``), and whatever it blocks is
recorded too: the page and /docs must work under it. Waits use locators, not ``wait_for_function``
strings, which Playwright evaluates with ``eval`` (refused by that policy, as it should be).
"""

from __future__ import annotations

import base64
import os
from urllib.parse import urlparse

import numpy as np
import pytest

from leukodetect.detection import load_detector
from leukodetect.sample import sample_dir
from leukodetect.serving import create_app
from leukodetect.serving.server import running

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is missing: run scripts/install_browser.sh as root (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")
    with sync_api.sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        except sync_api.Error as exc:
            pytest.skip(f"{CHROMIUM} could not be launched: {str(exc).splitlines()[0]}")
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def service(classifier):
    with running(create_app(classifier)) as url:
        yield url


@pytest.fixture(scope="module")
def smear_service(classifier, crop_checkpoint):
    """The service with a whole-smear detector (a tiny crop classifier: the page needs a network, not a good one)."""
    with running(create_app(classifier, detector=load_detector(crop_checkpoint))) as url:
        yield url


@pytest.fixture
def page(browser, service):
    yield from _page(browser, service)


@pytest.fixture
def smear_page(browser, smear_service):
    yield from _page(browser, smear_service)


def _page(browser, service):
    """A page that may talk to the service only; anything else is aborted and listed in page.outside."""
    context = browser.new_context()
    page = context.new_page()
    page.outside = []
    page.blocked = []  # what the Content-Security-Policy refused, from the console
    page.on("console", lambda m: page.blocked.append(m.text) if "Content Security Policy" in m.text else None)
    host = urlparse(service).netloc

    def only_loopback(route):
        url = route.request.url
        if urlparse(url).netloc == host or url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            page.outside.append(url)
            route.abort()

    page.route("**/*", only_loopback)
    page.set_default_timeout(20_000)
    yield page
    context.close()


def test_upload_a_cell_and_see_the_verdict(page, service, tiny_tree, tmp_path):
    cell = tiny_tree / "blast" / "blast_01.png"
    page.goto(service + "/")
    page.locator("#model-info", has_text="tiny").wait_for()
    assert "Research use only, not for diagnosis" in page.text_content("#intended-use")
    assert page.is_disabled("#mode-smear")  # no detector loaded

    page.set_input_files("#file-input", str(cell))
    card = page.locator(".result[data-status=done]").first
    card.wait_for()
    assert card.locator("h2").text_content() == "blast_01.png"
    verdict = card.locator(".verdict").text_content()
    assert verdict.split()[0] in ("blast", "normal") and "%" in verdict
    assert card.locator("img.overlay").get_attribute("src").startswith("data:image/png;base64,")

    # Drag and drop a second image onto the drop zone, as a user would.
    data = base64.b64encode((tiny_tree / "normal" / "normal_02.png").read_bytes()).decode()
    transfer = page.evaluate_handle(
        """(b64) => { const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
                      const dt = new DataTransfer();
                      dt.items.add(new File([bytes], 'normal_02.png', { type: 'image/png' }));
                      return dt; }""", data)
    page.dispatch_event("#drop-zone", "drop", {"dataTransfer": transfer})
    page.locator(".result[data-status=done]").nth(1).wait_for()
    assert page.is_visible("#download-json")

    shot = tmp_path / "page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert page.outside == [] and page.blocked == []


def test_bad_file_shows_its_error(page, service, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    page.goto(service + "/")
    page.set_input_files("#file-input", str(bad))
    page.locator(".result[data-status=error]").wait_for()
    assert "'notes.png'" in page.text_content(".result .error")


def test_api_docs_render_offline(page, service):
    page.goto(service + "/docs")
    page.locator(".swagger-ui .opblock").first.wait_for()
    assert page.locator(".swagger-ui .opblock").count() >= 4
    # "Try it out" works under the policy: the request goes to the service and its answer is shown.
    model = page.locator(".opblock-get", has_text="/v1/model")
    model.locator(".opblock-summary").click()
    model.locator("button.try-out__btn").click()
    model.locator("button.execute").click()
    model.locator(".responses-wrapper .live-responses-table .response-col_status", has_text="200").wait_for()
    assert page.outside == [] and page.blocked == []


def test_real_cell_and_smear_in_smear_mode(smear_page, smear_service, smear_png, shared_datasets, tmp_path):
    """A real cell (the bundled C-NMC sample) as a cell, then a smear (an ALL-IDB1 photograph where
    ../shared has it, else the synthetic smear) in smear mode: overlay, counts and gallery appear."""
    page = smear_page
    cell = sorted(sample_dir().rglob("*.png"))[0]
    photo = shared_datasets / "ALL-IDB1" / "ALL_IDB1" / "im" / "Im001_1.jpg"
    smear = photo if photo.is_file() else smear_png
    page.goto(smear_service + "/")
    page.locator("#model-info", has_text="tiny").wait_for()
    assert page.is_enabled("#mode-smear")

    page.set_input_files("#file-input", str(cell))
    page.locator(".result[data-status=done]").first.wait_for()
    assert page.locator(".result h2").first.text_content() == cell.name

    page.check("#mode-smear")
    page.set_input_files("#file-input", str(smear))
    card = page.locator(".result.smear[data-status=done]")
    card.wait_for(timeout=60_000)
    assert card.locator("h2").text_content() == smear.name
    assert card.locator(".verdict").text_content().split()[0] in ("ALL", "healthy", "review")
    counts = {row.locator("th").text_content(): int(row.locator("td").text_content()) for row in card.locator("table.counts tr").all()}
    assert counts and sum(counts.values()) >= 1
    assert card.locator("img.overlay").first.get_attribute("src").startswith("data:image/png;base64,")
    assert card.locator("img.gallery-sheet").count() == 1
    shot = tmp_path / "smear.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    assert page.outside == [] and page.blocked == []


@pytest.fixture(scope="module")
def flagging_service(classifier, crop_checkpoint):
    """A smear service whose cell model's guard calls every cell unlike its training images."""
    detector = load_detector(crop_checkpoint)
    cells = detector.classifier
    plain = cells.image_outputs

    def every_cell_beyond_the_guard(images, *, batch_size):
        probs, _ = plain(images, batch_size=batch_size)
        return probs, np.full(len(probs), 10.0)

    cells.guard_threshold = 1.0
    cells.image_outputs = every_cell_beyond_the_guard
    with running(create_app(classifier, detector=detector)) as url:
        yield url


def test_a_smear_whose_cells_are_unlike_the_training_images_says_review_and_why(browser, flagging_service, smear_png):
    for page in _page(browser, flagging_service):
        page.goto(flagging_service + "/")
        page.locator("#model-info", has_text="tiny").wait_for()
        page.check("#mode-smear")
        page.set_input_files("#file-input", str(smear_png))
        card = page.locator(".result.smear[data-status=done]")
        card.wait_for(timeout=60_000)
        assert card.locator(".verdict").text_content().split()[0] == "review"
        reason = card.locator("p.reason").text_content()
        assert reason.startswith("review: ") and "unlike the images this model was trained on" in reason
        assert page.outside == [] and page.blocked == []
