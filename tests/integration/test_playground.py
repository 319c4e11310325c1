"""The playground page in a real headless browser (Debian's chromium, driven through its chromedriver by selenium),
served by an in-process front before the session's tritonserver: the page loads and lists the models; an image
chosen through the file input, or dropped, is captioned or asked about; the answer appears piece by piece and equals
the API's; errors show the server's message; Stop cancels the generation in the engine; API keys are asked for.

Without chromium, chromedriver or selenium the tests skip, except where `CI` or `BLIP2_REQUIRE_BROWSER` is set
(`.ci/run` sets the latter): there they fail, so CI cannot pass without running them. `.ci/run` installs the browser;
`make browser` does it elsewhere."""

from __future__ import annotations

import base64
import itertools
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from triton_helpers import cancelled_requests, front_settings

from blip2_triton.front import Front

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait
except ImportError:  # reported by the `browser` fixture
    webdriver = None

pytestmark = pytest.mark.integration

# Headless, as root in a container, and quiet: nothing but the page under test may touch the network.
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-default-apps", "--disable-extensions", "--no-proxy-server", "--window-size=1280,1000")
WAIT_S = 60.0
QUESTION = "what is in the picture?"
KEY = "playground-key"

# Installed in the page before a run: every text the answer element shows, in order, as the browser rendered it.
OBSERVE = """
window.seenTexts = [];
if (!window.observing) {
  window.observing = new MutationObserver((records) => {
    for (const record of records) for (const node of record.addedNodes) window.seenTexts.push(node.textContent);
  });
  window.observing.observe(document.getElementById("answer"), {childList: true});
}
"""
RESULT = """
const answer = document.getElementById("answer"), error = document.getElementById("error");
return {state: answer.dataset.state, text: answer.textContent, chunks: Number(answer.dataset.chunks),
        finish: answer.dataset.finishReason || null, tokens: answer.dataset.completionTokens || null,
        error: error.hidden ? null : error.textContent, seen: window.seenTexts,
        status: document.getElementById("status").textContent};
"""
DROP = """
const [encoded, name, type] = arguments;
const bytes = Uint8Array.from(atob(encoded), (c) => c.charCodeAt(0));
const transfer = new DataTransfer();
transfer.items.add(new File([bytes], name, {type}));
const zone = document.getElementById("drop");
for (const kind of ["dragenter", "dragover", "drop"]) {
  zone.dispatchEvent(new DragEvent(kind, {dataTransfer: transfer, bubbles: true, cancelable: true}));
}
"""


def _need(condition: bool, message: str) -> None:
    if condition:
        return
    message += "; install with `make browser` (apt-get install chromium chromium-driver, as root) and `make setup`"
    if os.environ.get("CI") or os.environ.get("BLIP2_REQUIRE_BROWSER"):
        pytest.fail(f"CI must run the playground browser test, but {message}", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    # BLIP2_CHROMIUM / BLIP2_CHROMEDRIVER name other binaries (a Chrome and its driver, say).
    chromium = shutil.which(os.environ.get("BLIP2_CHROMIUM", "chromium")) or (
        None if "BLIP2_CHROMIUM" in os.environ else shutil.which("chromium-browser"))
    driver_path = shutil.which(os.environ.get("BLIP2_CHROMEDRIVER", "chromedriver"))
    _need(webdriver is not None, "selenium is not installed (dev extras)")
    _need(chromium is not None, "chromium is not installed")
    _need(driver_path is not None, "chromedriver is not installed (Debian package chromium-driver)")
    work = tmp_path_factory.mktemp("chromium")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={work / 'profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    with warnings.catch_warnings():
        # Deprecated, but the only proxy setting the local Chrome driver reads: its calls to chromedriver on
        # localhost must not go through an http_proxy the environment may set for package downloads.
        warnings.simplefilter("ignore", DeprecationWarning)
        options.ignore_local_proxy_environment_variables()
    # An explicit driver path: selenium's own driver download (Selenium Manager) never runs.
    service = Service(executable_path=driver_path, log_output=str(work / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def front(triton_server: Any, tiny_model_dir: Path) -> Iterator[Front]:
    settings = front_settings(triton_server, metrics_port=-1, tokenizers={"blip2": str(tiny_model_dir)})
    with Front(settings) as running:
        yield running


@pytest.fixture(scope="module")
def files(sample_images: dict[str, bytes], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("playground-files")
    contents = {"photo.jpg": sample_images["rgb_jpeg"], "portrait.png": sample_images["rgb_png_portrait"],
                "broken.png": b"these bytes are not an image"}
    for name, data in contents.items():
        (folder / name).write_bytes(data)
    return {name: folder / name for name in contents}


def wait_for(browser: Any, condition: Callable[[Any], Any], what: str) -> Any:
    return WebDriverWait(browser, WAIT_S, poll_frequency=0.05).until(condition, f"timed out waiting for {what}")


def open_page(browser: Any, url: str, *, models: str = "loaded") -> None:
    browser.get(url)
    wait_for(browser, lambda d: d.find_element(By.ID, "model").get_attribute("data-state") == models,
             f"the model list ({models})")


def choose(browser: Any, path: Path) -> None:
    browser.find_element(By.ID, "image").send_keys(str(path))
    wait_for(browser, lambda d: path.name in d.find_element(By.ID, "image-info").text, f"{path.name} to be read")


def preview_shown(browser: Any) -> bool:
    return browser.execute_script("const p = document.getElementById('preview'); "
                                  "return !p.hidden && p.complete && p.naturalWidth > 0;")


def run(browser: Any, button: str, *, question: str = "", max_tokens: int | str = "", model: str = "blip2",
        before_click: str = "") -> dict[str, Any]:
    """Fills the form, clicks `button` (caption or ask) and returns what the page shows once the run ends."""
    for field, value in (("question", question), ("max-tokens", str(max_tokens))):
        element = browser.find_element(By.ID, field)
        element.clear()
        if value:
            element.send_keys(value)
    Select(browser.find_element(By.ID, "model")).select_by_value(model)
    browser.execute_script(OBSERVE + before_click)
    wait_for(browser, lambda d: d.find_element(By.ID, button).is_enabled(), f"the {button} button")
    browser.find_element(By.ID, button).click()
    wait_for(browser, lambda d: d.find_element(By.ID, "answer").get_attribute("data-state")
             in ("done", "error", "stopped"), "the run to end")
    return browser.execute_script(RESULT)


def data_url(data: bytes, media: str) -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def api(front: Front, image: str, question: str | None, *, api_key: str = "unused", **options: Any) -> Any:
    """The same request through the OpenAI SDK, not streamed."""
    content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": image}}]
    if question:
        content.insert(0, {"type": "text", "text": question})
    client = openai.OpenAI(base_url=f"{front.http_url}/v1", api_key=api_key)
    return client.chat.completions.create(messages=[{"role": "user", "content": content}], **options)


def api_error(front: Front, image: str, **options: Any) -> str:
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}}]}],
            "stream": True, **options}
    response = httpx.post(f"{front.http_url}/v1/chat/completions", json=body, timeout=WAIT_S)
    assert response.status_code == 400, response.text
    return response.json()["error"]["message"]


def assert_streamed(shown: dict[str, Any], expected: Any) -> None:
    choice = expected.choices[0]
    assert shown["state"] == "done" and shown["error"] is None, shown
    assert shown["text"] == choice.message.content, shown
    # It appeared piece by piece: each rendered text extends the one before, one per streamed piece.
    seen = shown["seen"]
    assert seen[-1] == shown["text"] and len(seen) == shown["chunks"], shown
    assert all(later.startswith(earlier) and len(later) > len(earlier) for earlier, later in itertools.pairwise(seen))
    assert shown["finish"] == choice.finish_reason
    assert expected.usage is not None and shown["tokens"] == str(expected.usage.completion_tokens)
    assert f"finish_reason: {choice.finish_reason}" in shown["status"]


def test_page_streams_captions_and_answers_equal_to_the_api(browser: Any, front: Front, files: dict[str, Path],
                                                            sample_images: dict[str, bytes]) -> None:
    open_page(browser, f"{front.http_url}/")  # `/` leads to the page
    assert browser.current_url == front.playground_url and browser.title == "BLIP-2 playground"
    model = Select(browser.find_element(By.ID, "model"))
    assert [o.get_attribute("value") for o in model.options] == ["blip2", "blip2_t5"]
    assert not browser.find_element(By.ID, "key-field").is_displayed()  # no keys configured, no key asked
    assert not browser.find_element(By.ID, "caption").is_enabled()  # nothing to send yet

    choose(browser, files["photo.jpg"])
    assert preview_shown(browser)
    image = data_url(sample_images["rgb_jpeg"], "image/jpeg")

    # This image's greedy caption runs to 256 tokens: a stream the engine is still generating when the first piece
    # goes out, so several pieces arrive even on a loaded host (24 tokens once came as one).
    shown = run(browser, "caption", max_tokens=256)
    assert_streamed(shown, api(front, image, None, model="blip2", max_tokens=256))
    assert shown["chunks"] > 1, "a decoder-only model streams several pieces"

    shown = run(browser, "ask", question=QUESTION, max_tokens=16)
    assert_streamed(shown, api(front, image, QUESTION, model="blip2", max_tokens=16))

    # FlanT5 answers in one piece; the page shows it the same way.
    shown = run(browser, "ask", question=QUESTION, max_tokens=6, model="blip2_t5")
    expected = api(front, image, QUESTION, model="blip2_t5", max_tokens=6)
    assert shown["state"] == "done" and shown["text"] == expected.choices[0].message.content
    assert shown["finish"] == expected.choices[0].finish_reason

    # Its Content-Security-Policy admitted everything the page did (a violation is logged to the console).
    console = [entry["message"] for entry in browser.get_log("browser")]
    assert not [line for line in console if "Content Security Policy" in line], console


def test_errors_show_the_servers_message(browser: Any, front: Front, files: dict[str, Path],
                                         sample_images: dict[str, bytes]) -> None:
    open_page(browser, front.playground_url)
    choose(browser, files["photo.jpg"])
    shown = run(browser, "caption", max_tokens=0)
    message = api_error(front, data_url(sample_images["rgb_jpeg"], "image/jpeg"), model="blip2", max_tokens=0)
    assert message == "max_tokens: expected 1..256, got 0"
    assert shown["state"] == "error" and shown["error"] == f"HTTP 400: {message}" and shown["text"] == ""

    # Not an image: the browser cannot preview it, the vision stage refuses it, and the page says so.
    choose(browser, files["broken.png"])
    assert not preview_shown(browser)
    shown = run(browser, "caption", max_tokens=5)
    message = api_error(front, data_url(files["broken.png"].read_bytes(), "image/png"), model="blip2")
    assert "image" in message and shown["state"] == "error" and shown["error"] == f"HTTP 400: {message}"

    # Ask needs a question; the page says so itself, sending nothing.
    choose(browser, files["photo.jpg"])
    browser.find_element(By.ID, "question").clear()
    browser.find_element(By.ID, "ask").click()
    assert browser.find_element(By.ID, "error").text == "Type a question first (or use Caption)."
    assert browser.find_element(By.ID, "answer").get_attribute("data-state") == "error"  # the last run's, unchanged


def test_a_dropped_image_is_the_one_sent(browser: Any, front: Front, sample_images: dict[str, bytes]) -> None:
    open_page(browser, front.playground_url)
    data = sample_images["rgb_png_portrait"]
    browser.execute_script(DROP, base64.b64encode(data).decode(), "dropped.png", "image/png")
    wait_for(browser, lambda d: "dropped.png" in d.find_element(By.ID, "image-info").text, "the dropped file")
    assert preview_shown(browser)
    shown = run(browser, "caption", max_tokens=12)
    assert_streamed(shown, api(front, data_url(data, "image/png"), None, model="blip2", max_tokens=12))


def test_stop_cancels_the_generation(browser: Any, front: Front, triton_server: Any, files: dict[str, Path]) -> None:
    open_page(browser, front.playground_url)
    choose(browser, files["photo.jpg"])
    before = cancelled_requests(triton_server)
    # Stop is pressed as the first piece shows; this image's greedy caption runs to 256 tokens, so generation is
    # still going, and the engine hears of it when the browser drops the stream.
    click_stop = ("document.getElementById('answer').addEventListener('piece', "
                  "() => document.getElementById('stop').click(), {once: true});")
    shown = run(browser, "caption", max_tokens=256, before_click=click_stop)
    assert shown["state"] == "stopped" and shown["chunks"] == 1 and shown["text"], shown
    assert shown["status"].startswith("Stopped") and shown["error"] is None
    assert browser.find_element(By.ID, "caption").is_enabled() and not browser.find_element(By.ID, "stop").is_enabled()
    deadline = time.monotonic() + WAIT_S
    while cancelled_requests(triton_server) <= before:
        assert time.monotonic() < deadline, "the engine never saw the cancellation"
        time.sleep(0.2)


def test_api_keys_are_asked_for_and_sent(browser: Any, triton_server: Any, files: dict[str, Path],
                                         sample_images: dict[str, bytes]) -> None:
    with Front(front_settings(triton_server, metrics_port=-1, api_keys=(KEY,))) as guarded:
        # The page itself needs no key (a browser opening a URL sends none); the API it calls does.
        open_page(browser, guarded.playground_url, models="error")
        assert browser.find_element(By.ID, "key-field").is_displayed()
        assert browser.find_element(By.ID, "error").text == \
            "HTTP 401: missing or wrong API key (Authorization: Bearer ...)"
        browser.find_element(By.ID, "api-key").send_keys(KEY, Keys.TAB)  # `change` reloads the models
        wait_for(browser, lambda d: d.find_element(By.ID, "model").get_attribute("data-state") == "loaded",
                 "the models after the key")
        assert not browser.find_element(By.ID, "error").is_displayed()
        choose(browser, files["photo.jpg"])
        shown = run(browser, "caption", max_tokens=8)
        expected = api(guarded, data_url(sample_images["rgb_jpeg"], "image/jpeg"), None, api_key=KEY,
                       model="blip2", max_tokens=8)
        assert shown["state"] == "done" and shown["text"] == expected.choices[0].message.content


def test_the_playground_can_be_turned_off(triton_server: Any) -> None:
    with Front(front_settings(triton_server, metrics_port=-1, playground=False)) as plain:
        assert plain.playground_url is None
        for path in ("/playground", "/"):
            assert httpx.get(plain.http_url + path).status_code == 404
