"""The web page of `argen serve`, driven in a real headless chromium (Debian's `chromium` and
`chromium-driver` through selenium): choose a class, set the sampling fields, press Generate, see the
images appear; an API error shows on the page. Marked `browser`; skipped when chromium, chromedriver or
selenium is missing (`.ci/run` installs them). Set ARGEN_WEB_SCREENSHOT=FILE to keep a screenshot."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from test_openai import CLASS_NAMES, checkpoints, live_server, make_app  # noqa: F401  (checkpoints: a fixture)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs chromium and chromedriver")]


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="argen-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--no-first-run",
                 "--disable-sync", "--disable-extensions", "--window-size=1200,860", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _set(driver, element_id: str, value) -> None:
    field = driver.find_element("id", element_id)
    field.clear()
    field.send_keys(str(value))


def test_page_generates_images_and_shows_api_errors(checkpoints, browser, tmp_path):  # noqa: F811
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    with live_server(make_app(checkpoints, max_images_per_request=8)) as url:
        browser.get(url + "/")
        wait.until(lambda d: d.find_element("id", "generate").is_enabled())
        assert "gpt-c2i" in browser.find_element("id", "model").text
        options = browser.execute_script(
            "return [...document.querySelectorAll('#class-names option')].map(o => o.value)")
        assert options == CLASS_NAMES
        assert browser.find_element("id", "cfg_scale").get_attribute("value") == "4"  # the server's defaults
        _set(browser, "condition", "Flags")
        _set(browser, "n", 3)
        _set(browser, "top_k", 20)
        _set(browser, "cfg_scale", 2)
        _set(browser, "seed", 7)
        browser.find_element("id", "generate").click()
        wait.until(lambda d: len(d.find_elements("css selector", "figure.done img.result")) == 3)
        sizes = browser.execute_script("return [...document.querySelectorAll('img.result')]"
                                       ".map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
        assert sizes == [[True, 64, 64]] * 3  # decodable PNGs of the model's size
        captions = [f.text for f in browser.find_elements("css selector", "figure.done figcaption")]
        assert all("Flags (class 3)" in c for c in captions) and "seed 7" in captions[0] and "seed 9" in captions[2]
        sources = browser.execute_script("return [...document.querySelectorAll('img.result')].map(i => i.src)")
        assert len(set(sources)) == 3  # seeds 7, 8, 9 give three different images
        assert not browser.find_element("id", "error").is_displayed()
        assert "3 of 3 images" in browser.find_element("id", "status").text
        shot = Path(os.environ.get("ARGEN_WEB_SCREENSHOT") or tmp_path / "page.png")
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 0

        _set(browser, "temperature", 0)  # refused by the API; the page shows why
        browser.find_element("id", "generate").click()
        wait.until(lambda d: d.find_element("id", "error").is_displayed())
        assert "temperature" in browser.find_element("id", "error").text
        assert len(browser.find_elements("css selector", "figure.failed")) == 3
        if os.environ.get("ARGEN_WEB_SCREENSHOT"):
            browser.save_screenshot(str(shot.with_name(shot.stem + "-error.png")))

        _set(browser, "temperature", 1)
        _set(browser, "condition", "Flag")  # not a class name: the close match is offered
        _set(browser, "n", 1)
        browser.find_element("id", "generate").click()
        wait.until(lambda d: "close matches" in d.find_element("id", "error").text)
        assert "'Flags' (3)" in browser.find_element("id", "error").text


def test_text_to_image_page_takes_a_prompt(checkpoints, browser):  # noqa: F811
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    with live_server(make_app(checkpoints, "t2i")) as url:
        browser.get(url + "/")
        wait.until(lambda d: d.find_element("id", "generate").is_enabled())
        assert browser.find_element("id", "condition").tag_name == "textarea"
        assert "text-conditional" in browser.find_element("id", "model").text
        assert browser.find_element("id", "cfg_scale").get_attribute("value") == "7.5"
        _set(browser, "condition", "a green heart")
        _set(browser, "n", 2)
        browser.find_element("id", "generate").click()
        wait.until(lambda d: len(d.find_elements("css selector", "figure.done img.result")) == 2)
        captions = [f.text for f in browser.find_elements("css selector", "figure.done figcaption")]
        assert all(c.startswith("a green heart") for c in captions)


def test_edit_mode_paints_a_mask_with_pointer_events_and_edits(checkpoints, browser, tmp_path):  # noqa: F811
    from PIL import Image
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import WebDriverWait

    from forced_standin import engine_has_forced_tokens

    picture = tmp_path / "in.png"
    Image.new("RGB", (64, 64), (200, 40, 40)).save(picture)
    wait = WebDriverWait(browser, 60)
    with live_server(make_app(checkpoints, max_images_per_request=8)) as url:
        browser.get(url + "/")
        wait.until(lambda d: d.find_element("id", "generate").is_enabled())
        browser.find_element("id", "mode-edit").click()
        assert browser.find_element("id", "generate").text == "Edit"
        browser.find_element("id", "generate").click()
        wait.until(lambda d: "choose an image" in d.find_element("id", "error").text)
        browser.find_element("id", "edit-image").send_keys(str(picture))
        wait.until(lambda d: d.execute_script("return edit.image !== null"))
        canvas = browser.find_element("id", "edit-canvas")
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", canvas)
        width = canvas.size["width"]
        assert browser.execute_script("return maskedFraction()") == 0
        actions = ActionChains(browser)  # a stroke across the bottom quarter, as a mouse or a finger would paint
        actions.move_to_element_with_offset(canvas, -width // 2 + 4, width // 4 + 20).click_and_hold()
        for _ in range(11):
            actions.move_by_offset(width // 12, 0)
        actions.release().perform()
        painted = browser.execute_script("return maskedFraction()")
        assert 0.02 < painted < 0.5
        rows = browser.execute_script("""
            const d = edit.mask.getContext('2d').getImageData(0, 0, 64, 64).data, rows = [];
            for (let y = 0; y < 64; y++) { let any = 0; for (let x = 0; x < 64; x++) any |= d[(y * 64 + x) * 4 + 3] > 0;
                                           rows.push(any); }
            return rows;""")
        assert not any(rows[:32]) and any(rows[40:60])  # painted where the pointer went, at the image's scale
        _set(browser, "condition", "Flags")
        _set(browser, "n", 2)
        browser.find_element("id", "generate").click()
        if not engine_has_forced_tokens():
            return
        wait.until(lambda d: len(d.find_elements("css selector", "figure.done img.result")) == 2)
        sizes = browser.execute_script("return [...document.querySelectorAll('img.result')]"
                                       ".map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
        assert sizes == [[True, 64, 64]] * 2
        assert not browser.find_element("id", "error").is_displayed()
        browser.save_screenshot(str(tmp_path / "edit.png"))
