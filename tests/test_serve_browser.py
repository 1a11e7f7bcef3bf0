"""The web page of `ht serve`, in a real headless browser: Debian's chromium driven by Selenium
through the system chromedriver (nothing is downloaded). The server is the real command,
`ht serve --port 0`, in a subprocess on 127.0.0.1.

The screenshot of the page with its results is kept as a test artefact:
$HT_TEST_ARTIFACTS/serve-page.png (CI: build/test-artifacts/), else <pytest base temp>/artifacts/."""

import os
import queue
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serving import hyper_checkpoint

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
START_S, GENERATE_S = 180, 120  # bounds on a loaded 2-core machine; a healthy run takes a fraction


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and DRIVER):
        if os.environ.get("CI"):
            pytest.fail("the browser test needs chromium and chromedriver; .ci/run installs them")
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def ht_serve(tmp_path_factory):
    """`ht serve` in a subprocess: its base URL once it listens."""
    hyper = hyper_checkpoint(tmp_path_factory.mktemp("hyper"))
    command = [sys.executable, "-m", "htcli", "serve", "--model", "tiny", "--hyper", str(hyper), "--port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=os.environ | {"OMP_NUM_THREADS": "1"})
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    seen = []
    try:
        while True:
            try:
                line = lines.get(timeout=START_S)
            except queue.Empty:
                pytest.fail(f"ht serve did not start within {START_S} s:\n{''.join(seen)}")
            seen.append(line)
            found = re.search(r"at (http://127\.0\.0\.1:\d+)/", line)
            if found:
                break
            if process.poll() is not None:
                pytest.fail(f"ht serve exited with {process.returncode}:\n{''.join(seen)}")
        yield found.group(1)
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(15)


def _artefacts(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("HT_TEST_ARTIFACTS") or tmp_path_factory.getbasetemp() / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_page_generates_steered_images_and_shows_errors(browser, ht_serve, tmp_path, tmp_path_factory):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(ht_serve + "/")
    find = browser.find_element
    wait = WebDriverWait(browser, GENERATE_S)
    wait.until(lambda d: "tiny" in find(By.ID, "health").text)
    wait.until(lambda d: d.execute_script("return document.querySelectorAll('#concept-names option').length") > 700)

    find(By.ID, "prompt").send_keys("a lighthouse on a cliff")
    find(By.ID, "add-concept").click()
    rows = browser.find_elements(By.CSS_SELECTOR, "#concepts .row")
    assert [r.find_element(By.CLASS_NAME, "concept-name").get_attribute("value") for r in rows] == ["art deco", ""]
    rows[1].find_element(By.CLASS_NAME, "concept-name").send_keys("ukiyo-e")
    weight = rows[1].find_element(By.CLASS_NAME, "concept-weight")
    weight.clear()
    weight.send_keys("0.5")
    find(By.ID, "strength").send_keys(*[Keys.ARROW_RIGHT] * 4)  # 0.6 -> 0.8 in steps of 0.05
    assert find(By.ID, "strength-value").text == "0.8"
    reference = tmp_path / "reference.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(reference)
    find(By.ID, "reference").send_keys(str(reference))  # a real multipart upload from the browser
    for field, value in (("seed", "5"), ("num-images", "2")):
        find(By.ID, field).clear()
        find(By.ID, field).send_keys(value)
    find(By.ID, "generate").click()

    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "img.result")) == 2)
    widths = browser.execute_script("return [...document.querySelectorAll('img.result')].map(i => i.naturalWidth)")
    assert widths == [128, 128]  # decoded PNGs at tiny's resolution
    captions = [c.text for c in browser.find_elements(By.TAG_NAME, "figcaption")]
    assert captions == ["strength 0.8, seed 5", "strength 0.8, seed 6"]
    timings = find(By.ID, "timings").text
    assert re.search(r"map prediction [\d.]+ ms · generation \d+ ms \(batch of 2\)", timings), timings
    assert find(By.ID, "error").text == ""
    shot = _artefacts(tmp_path_factory) / "serve-page.png"
    assert browser.save_screenshot(str(shot)) and Image.open(shot).size[0] > 0

    find(By.ID, "prompt").clear()
    find(By.ID, "generate").click()
    wait.until(lambda d: find(By.ID, "error").text)
    assert find(By.ID, "error").text.startswith("prompt: the prompt is empty")
