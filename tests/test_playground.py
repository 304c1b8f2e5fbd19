"""The steering playground (`GET /playground`) in a real browser: headless Chromium driven by selenium through
Debian's `chromium` + `chromium-driver` (no browser download), against the server on a tiny model, with the API
key on and off. Locally the browser test skips when Chromium is missing; with CI=true it fails instead, so CI
cannot skip it silently (.ci/run installs the packages).

UNISTEER_PLAYGROUND_SCREENSHOT=path.png also saves a screenshot of the page.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

import httpx
import pytest

from test_serving import TINY, char_tokenizer, random_vector_update
from tiny_models import tiny_model
from unisteer.engine.storage import save_update
from unisteer.serving.app import BackgroundServer, ServerConfig, build_app, load_updates_dir
from unisteer.serving.playground import sweep_curves, update_paths

KEY = "playground-secret"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def _sweep_summary(update: str) -> dict:
    """A fitted sweep's summary.json as `analysis.fits` writes it (curves only; what the playground reads)."""
    m = [-8.0, -4.0, 0.0, 4.0, 8.0]

    def curve(values):
        return {"m": m, "aggregates": [{"mean": v, "sem": 0.1, "ci_low": v - 0.2, "ci_high": v + 0.2, "n": 4,
                                        "n_clamped": 0, "level": 0.95, "n_boot": 50} for v in values]}

    pair = {"preference": curve([-3.0, -1.5, 0.0, 1.5, 3.0]), "utility": curve([-2.0, -1.0, -0.5, -1.0, -2.0])}
    return {"sweep": {"config": {"variant": "sum"}, "updates": [update], "splits": ["train", "test"]},
            "curves": {f"{update}/train/sum": pair, f"{update}/test/sum": pair}, "fits": {}}


@pytest.fixture(scope="module")
def updates_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("playground-updates")
    model = tiny_model("llama")
    save_update(random_vector_update(model, 1, 2.0, seed=1), folder / "up")
    save_update(random_vector_update(model, 1, 2.0, seed=2), folder / "down.safetensors")
    (folder / "up" / "sweep").mkdir()
    (folder / "up" / "sweep" / "summary.json").write_text(json.dumps(_sweep_summary("up")))
    return folder


@contextlib.contextmanager
def served(folder, api_key: str = ""):
    model, tokenizer = tiny_model("llama"), char_tokenizer()
    updates = load_updates_dir(folder, model)
    config = ServerConfig(served_model_name=TINY, batch_wait_ms=20, max_prompt_tokens=64, api_key=api_key)
    with BackgroundServer(build_app(model, tokenizer, updates, config,
                                    update_sources=update_paths(folder, updates))) as server:
        yield server


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


# ---------------------------------------------------------------------------------------------- no browser


def test_page_is_static_and_open_and_its_data_needs_the_key(updates_dir):
    with served(updates_dir, KEY) as server:
        page = httpx.get(server.url + "/playground")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert TINY not in page.text and "sweep_not_found" not in page.text  # no data in the page itself
        for name in ("playground.js", "playground.css"):
            assert httpx.get(f"{server.url}/playground/{name}").status_code == 200
        assert httpx.get(server.url + "/playground/app.py").status_code == 404
        assert httpx.get(server.url + "/v1/updates/up/sweep").status_code == 401
        auth = {"Authorization": f"Bearer {KEY}"}
        curves = httpx.get(server.url + "/v1/updates/up/sweep", headers=auth).json()
        assert curves["split"] == "test" and curves["preference"]["m"] == [-8.0, -4.0, 0.0, 4.0, 8.0]
        assert curves["utility"]["mean"][2] == -0.5
        missing = httpx.get(server.url + "/v1/updates/down/sweep", headers=auth)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "sweep_not_found"
        assert httpx.get(server.url + "/v1/updates/nope/sweep", headers=auth).status_code == 404


def test_page_never_writes_html_from_data():
    from unisteer.serving.playground import static_file

    script = static_file("playground.js").decode()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script
    assert "<script>" not in static_file("playground.html").decode()  # no inline script: the CSP forbids it


def test_sweep_of_a_one_update_sweep_is_found_under_another_name(tmp_path):
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "summary.json").write_text(json.dumps(_sweep_summary("split-vector")))
    assert sweep_curves("served-name", tmp_path)["swept_as"] == "split-vector"
    assert sweep_curves("x", tmp_path / "nothing") is None


# ---------------------------------------------------------------------------------------------- browser


def _driver():
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(path)]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("selenium (pip install -c constraints.txt -e .[test])")
    if missing:
        reason = f"the browser test needs {missing}: apt-get install chromium chromium-driver"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true: {reason}")
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="unisteer-chromium-")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-extensions", "--window-size=1400,1000", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    return driver, profile


def _column(driver, kind: str) -> dict:
    return driver.execute_script(
        "const el = document.querySelector(`#columns .column[data-kind='${arguments[0]}']`);"
        "return el ? {state: el.dataset.state, m: el.dataset.m, title: el.querySelector('h2').textContent,"
        " text: el.querySelector('.text').textContent} : null;", kind)


def _wait_done(driver, wait, kind: str, title: str) -> str:
    wait.until(lambda d: (c := _column(d, kind)) and c["state"] == "done" and c["title"] == title)
    return _column(driver, kind)["text"]


@pytest.mark.pinned_only
@pytest.mark.parametrize("api_key", ["", KEY], ids=["no-key", "api-key"])
def test_playground_in_headless_chromium(updates_dir, api_key):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver, profile = _driver()
    try:
        with served(updates_dir, api_key) as server:
            wait = WebDriverWait(driver, 60)
            driver.get(server.url + "/playground")
            if api_key:
                wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "needs-key")
                box = driver.find_element(By.ID, "api-key")
                box.send_keys(api_key)
                driver.find_element(By.ID, "connect").click()
            wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
            for box in driver.find_elements(By.CSS_SELECTOR, "#updates input[type=checkbox]"):
                if (box.get_attribute("value") == "up") != box.is_selected():
                    box.click()  # steer with "up" only: its folder holds a sweep
            driver.find_element(By.ID, "max-tokens").clear()
            driver.find_element(By.ID, "max-tokens").send_keys("12")
            driver.find_element(By.ID, "generate").click()
            plain = _wait_done(driver, wait, "plain", "plain model")
            assert plain and _wait_done(driver, wait, "slider", "m = 4 (slider)")

            slider = driver.find_element(By.ID, "m-slider")
            slider.send_keys(*[Keys.ARROW_RIGHT] * 8)  # 4 → 8 in steps of 0.5
            steered = _wait_done(driver, wait, "slider", "m = 8 (slider)")
            assert steered != plain, "the steered column should differ from the plain model"
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#sweeps canvas[data-update='up']")) == 2)
            marked = driver.find_elements(By.CSS_SELECTOR, "#sweeps canvas[data-update='up']")
            assert {c.get_attribute("data-marked-m") for c in marked} == {"8"}

            slider.send_keys(*[Keys.ARROW_LEFT] * 16)  # 8 → 0
            at_zero = _wait_done(driver, wait, "slider", "m = 0 (slider)")
            assert at_zero == plain, "m = 0 must be the plain model"
            # Model output is text: nothing the model wrote became an element.
            assert driver.find_elements(By.CSS_SELECTOR, "#columns .text *") == []
            screenshot = os.environ.get("UNISTEER_PLAYGROUND_SCREENSHOT")
            if screenshot and not api_key:
                slider.send_keys(*[Keys.ARROW_RIGHT] * 8)
                _wait_done(driver, wait, "slider", "m = 4 (slider)")
                driver.save_screenshot(screenshot)
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
