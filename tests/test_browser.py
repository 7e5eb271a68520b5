"""The demos in a real headless browser: ``hubkit demo`` as a user starts it, Chromium as a user clicks.

Debian's ``chromium`` is driven through its ``chromium-driver`` with Selenium (``scripts/setup.sh``
installs both); no browser is downloaded. Screenshots are saved under the test's tmp dir.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
START_TIMEOUT_S = 300
WAIT_S = 120
PROMPT = "오늘 본 영화는 정말"
REVIEW = "배우들 연기가 정말 좋았고 음악도 훌륭했다"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo_url(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``hubkit demo MODEL`` (all demos in tabs) in a subprocess with its own local Ray and engine."""
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("needs Debian's chromium and chromium-driver: run scripts/setup.sh (as root)")
    folder = tmp_path_factory.mktemp("hubkit-demo")
    port = _free_port()
    log = folder / "demo.log"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "HUBKIT_ENDPOINT")}
    env["GRADIO_ANALYTICS_ENABLED"] = "False"
    hubkit_cmd = Path(sys.executable).parent / "hubkit"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(hubkit_cmd), "demo", str(tiny_model_dir), "--dtype", "float32", "--port", str(port),
             "--runs", str(folder / "runs")],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while "demo at http" not in log.read_text(errors="replace"):
            if proc.poll() is not None:
                pytest.fail(f"`hubkit demo` exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"`hubkit demo` was not up in {START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        assert httpx.get(url + "/config", timeout=30).status_code == 200
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the command shuts its engine down
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("chromium-profile")
    for arg in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", f"--user-data-dir={profile}",
        "--disable-dev-shm-usage", "--window-size=1280,1600", "--lang=ko-KR",
    ):  # fmt: skip
        options.add_argument(arg)
    # An explicit driver path: Selenium Manager (which would download one) is never consulted.
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()


def _wait(driver: Any, condition: Callable[[Any], Any], what: str) -> Any:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, WAIT_S, poll_frequency=0.25).until(condition)
    except TimeoutException:
        pytest.fail(
            f"timed out waiting for {what}; page text:\n{driver.find_element('tag name', 'body').text[:3000]}"
        )


def _css(driver: Any, selector: str) -> Any:
    return driver.find_element("css selector", selector)


def _text_with(selector: str, needle: str) -> Callable[[Any], str | None]:
    """A wait condition: the element's text once it contains ``needle``."""

    def condition(driver: Any) -> str | None:
        text = _css(driver, selector).text
        return text if needle in text else None

    return condition


def _set_text(driver: Any, selector: str, text: str) -> None:
    """Types into a Gradio textbox (send_keys for short text; the input event for long pastes)."""
    box = _css(driver, selector)
    box.clear()
    if len(text) <= 100:
        box.send_keys(text)
    else:
        driver.execute_script(
            "arguments[0].value = arguments[1];"
            "arguments[0].dispatchEvent(new Event('input', {bubbles: true}));",
            box,
            text,
        )


def _open_tab(driver: Any, name: str) -> None:
    tab = _wait(
        driver,
        lambda d: next(
            (b for b in d.find_elements("css selector", "button[role='tab']") if name in b.text), None
        ),
        f"the {name} tab",
    )
    tab.click()


def test_generate_in_the_browser(demo_url: str, browser: Any, tmp_path: Path) -> None:
    browser.get(demo_url)
    prompt_box = "#generate-prompt textarea"
    _wait(browser, lambda d: d.find_elements("css selector", prompt_box), "the prompt box")
    _set_text(browser, prompt_box, PROMPT)
    _css(browser, "#generate-run").click()

    def finished(d: Any) -> bool:
        stats = _css(d, "#generate-stats").text
        return "tokens/s" in stats and any(
            w in stats for w in ("max_length reached", "ended: end of text", "done")
        )

    _wait(browser, finished, "the generation to finish")
    output = _css(browser, "#generate-output textarea").get_attribute("value")
    assert output.startswith(PROMPT) and len(output) > len(PROMPT), output
    shot = tmp_path / "generate.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    print(f"\n[browser] screenshot: {shot}")

    # Over the prompt limit: the page answers with the limit (a message, not a stack trace).
    _set_text(browser, prompt_box, "가" * 2001)
    _css(browser, "#generate-run").click()
    body = _wait(browser, _text_with("body", "accepts at most 2000"), "the over-limit message")
    assert "Traceback" not in body
    browser.save_screenshot(str(tmp_path / "over_limit.png"))


def test_sentiment_in_the_browser(demo_url: str, browser: Any, tmp_path: Path) -> None:
    browser.get(demo_url)
    _open_tab(browser, "Sentiment")
    text_box = "#sentiment-text textarea"
    _wait(browser, lambda d: d.find_elements("css selector", text_box), "the review box")
    _set_text(browser, text_box, REVIEW)
    _css(browser, "#sentiment-run").click()
    headline = _wait(browser, _text_with("#sentiment-headline", "%"), "the sentiment result")
    assert ("긍정" in headline or "부정" in headline) and "·" in headline, headline
    # The bar chart is drawn (Vega renders it a moment after the numbers arrive).
    _wait(
        browser,
        lambda d: d.find_elements("css selector", "#sentiment-plot canvas, #sentiment-plot svg"),
        "the chart",
    )
    time.sleep(1)
    shot = tmp_path / "sentiment.png"
    browser.save_screenshot(str(shot))
    print(f"\n[browser] screenshot: {shot}")
