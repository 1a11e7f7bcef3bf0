"""The web page of `ht serve`, in a real headless browser: Debian's chromium driven by Selenium
through the system chromedriver (nothing is downloaded). The server is the real command,
`ht serve --port 0`, in a subprocess on 127.0.0.1. The page generates, shows each concept's
nearest training concepts and out-of-distribution warning, a before/after view and a strength
sweep, and downloads the composed intervention.

The screenshot of the page with its results is kept as a test artefact:
$HT_TEST_ARTIFACTS/serve-page.png (CI: build/test-artifacts/), else <pytest base temp>/artifacts/."""

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serving import ht_serve as served_command
from serving import hyper_checkpoint

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
START_S, GENERATE_S = 180, 120  # bounds on a loaded 2-core machine; a healthy run takes a fraction


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(downloads):
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
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def ht_serve(tmp_path_factory):
    """`ht serve` in a subprocess: its base URL once it listens."""
    hyper = hyper_checkpoint(tmp_path_factory.mktemp("hyper"), training_concepts=True)
    with served_command("--model", "tiny", "--hyper", str(hyper), start_s=START_S) as (_, url, _lines):
        yield url


def _artefacts(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("HT_TEST_ARTIFACTS") or tmp_path_factory.getbasetemp() / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _captions(browser) -> list[str]:
    from selenium.webdriver.common.by import By

    return [c.text for c in browser.find_elements(By.TAG_NAME, "figcaption")]


def _sources(browser) -> list[str]:
    return browser.execute_script("return [...document.querySelectorAll('img.result')].map(i => i.src)")


def test_page_generates_steered_images_and_shows_errors(browser, ht_serve, tmp_path, tmp_path_factory, downloads):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from htcli.models.interventions import load_intervention

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
    assert _captions(browser) == ["strength 0.8, seed 5", "strength 0.8, seed 6"]
    timings = find(By.ID, "timings").text
    assert re.search(r"map prediction [\d.]+ ms · generation \d+ ms \(batch of 2\)", timings), timings
    assert find(By.ID, "error").text == ""
    # What ht steer prints: each predicted source's nearest training concepts, and the warning
    # (the test hypernetwork's threshold puts every concept out of distribution).
    lines = [line.text for line in browser.find_elements(By.CSS_SELECTOR, "#sources .source")]
    assert len(lines) == 3 and lines[0].startswith("nearest training concepts of 'Art Deco': ")
    assert lines[2].startswith("nearest training concepts of 'reference image': ")
    assert all(re.search(r"(Bauhaus|Cubism|Baroque) -?[\d.]+, .* · out of distribution", line) for line in lines), lines
    assert len(browser.find_elements(By.CSS_SELECTOR, "#sources .ood")) == 3

    Select(find(By.ID, "view")).select_by_value("compare")  # before / after: strength 0 beside 0.8, same seeds
    find(By.ID, "generate").click()
    wait.until(lambda d: _captions(d) == ["strength 0, seed 5", "strength 0.8, seed 5", "strength 0, seed 6",
                                          "strength 0.8, seed 6"])
    before, after, *_ = _sources(browser)
    assert before != after  # steering shows
    columns = browser.execute_script("return getComputedStyle(document.getElementById('results')).gridTemplateColumns")
    assert len(columns.split()) == 2  # before beside after
    shot = _artefacts(tmp_path_factory) / "serve-page.png"
    assert browser.save_screenshot(str(shot)) and Image.open(shot).size[0] > 0

    Select(find(By.ID, "view")).select_by_value("sweep")
    find(By.ID, "num-images").clear()
    find(By.ID, "num-images").send_keys("1")
    find(By.ID, "generate").click()
    wait.until(lambda d: _captions(d) == [f"strength {s}, seed 5" for s in ("0", "0.2", "0.4", "0.6", "0.8")])
    assert len(set(_sources(browser))) == 5

    find(By.ID, "download").click()  # the composed intervention of the form's sources
    wait.until(lambda d: (downloads / "intervention.safetensors").exists())
    intervention = load_intervention(downloads / "intervention.safetensors", "tiny")
    assert [s.get("concept") for s in intervention.info["sources"]] == ["Art Deco", "ukiyo-e", None]
    assert intervention.info["sources"][1]["weight"] == 0.5 and "reference_images" in intervention.info["sources"][2]

    find(By.ID, "prompt").clear()
    find(By.ID, "generate").click()
    wait.until(lambda d: find(By.ID, "error").text)
    assert find(By.ID, "error").text.startswith("prompt: the prompt is empty")
