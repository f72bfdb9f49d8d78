"""The explorer and report pages in a real browser (headless Chromium driven by selenium).

Opens the pages from disk (file://, offline), types into them, moves the slider, and checks that
the readouts equal ``noisescale calc --json`` and the report's data layer, and that the browser
logs no JavaScript error. Screenshots are kept under ``test-artifacts/`` (git-ignored).

Needs the Debian packages ``chromium`` and ``chromium-driver``; skipped, with that reason, without
them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from noisescale.cli import main
from noisescale.report.data import load_history, report_data
from noisescale.report.explore import explore_html
from noisescale.report.text import (
    REGIME_WORDS,
    format_batch_size,
    format_count,
    format_number,
    summary_sentence,
)
from test_report import synthetic_records, write_synthetic_history


def _find(name: str, usual: str) -> str | None:
    return usual if os.access(usual, os.X_OK) else shutil.which(name)


CHROMIUM = _find("chromium", "/usr/bin/chromium")
CHROMEDRIVER = _find("chromedriver", "/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        CHROMIUM is None or CHROMEDRIVER is None,
        reason="headless Chromium and chromedriver are not installed "
        "(Debian: apt-get install chromium chromium-driver)",
    ),
]

NUMERIC_READOUTS = {
    "readout-noise-scale": "noise_scale",
    "readout-b-over-b-noise": "b_over_b_noise",
    "readout-lr-over-max": "lr_over_max",
    "readout-loss-improvement-over-max": "loss_improvement_over_max",
    "readout-steps-over-min": "steps_over_min",
    "readout-examples-over-min": "examples_over_min",
}


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1200,1300",
    ):
        options.add_argument(flag)
    with tempfile.TemporaryDirectory(prefix="noisescale-chromium-") as profile:
        options.add_argument(f"--user-data-dir={profile}")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        try:
            yield driver
        finally:
            driver.quit()


def _open(browser: Any, path: Path) -> None:
    browser.get(path.resolve().as_uri())
    browser.get_log("browser")  # start each page with an empty log; errors are read after use


def _js_errors(browser: Any) -> list[dict]:
    return [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


def _set(browser: Any, element_id: str, value: str) -> None:
    """Set an input's value and fire the ``input`` event, as typing or dragging would."""
    browser.execute_script(
        "const el = document.getElementById(arguments[0]); el.value = arguments[1];"
        "el.dispatchEvent(new Event('input', {bubbles: true}));",
        element_id,
        value,
    )


def _readouts(browser: Any) -> dict[str, tuple[str, str | None]]:
    """Every readout's text and data-value, read in one round trip."""
    return browser.execute_script(
        "const out = {};"
        "for (const el of document.querySelectorAll('[id*=readout-]'))"
        "  out[el.id] = [el.textContent, el.getAttribute('data-value')];"
        "return out;"
    )


def _calc(capsys: pytest.CaptureFixture, b_noise: str, batch_size: str) -> dict:
    assert main(["calc", "--noise-scale", b_noise, "--batch-size", batch_size, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _calc_text(capsys: pytest.CaptureFixture, b_noise: str, batch_size: str) -> str:
    assert main(["calc", "--noise-scale", b_noise, "--batch-size", batch_size]) == 0
    return capsys.readouterr().out


def _assert_readouts_equal_calc(readouts: dict, row: dict, calc_text: str) -> None:
    text, value = readouts["readout-batch-size"]
    assert float(value) == row["batch_size"] and text == format_batch_size(row["batch_size"])
    for element_id, key in NUMERIC_READOUTS.items():
        text, value = readouts[element_id]
        # Same IEEE operations in JavaScript and Python: the numbers agree to the last bit.
        assert float(value) == row[key], element_id
        assert text == format_number(row[key]), element_id
        assert f"= {text} " in calc_text or key in ("noise_scale", "b_over_b_noise")
    assert readouts["readout-regime"][0] == row["regime"]
    words = REGIME_WORDS[row["regime"]]
    assert readouts["readout-regime-words"][0] == words[0].upper() + words[1:] + "."
    assert words in calc_text
    summary = summary_sentence(row["batch_size"], row["steps_over_min"], row["examples_over_min"])
    assert readouts["readout-summary"][0] == summary
    assert summary in calc_text


def test_explorer_readouts_equal_calc(
    browser: Any, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    page = tmp_path / "explore.html"
    page.write_text(explore_html(1000.0), encoding="utf-8")
    _open(browser, page)
    # (noise scale typed, slider position = log2 B): the three regimes, an off-power slider
    # position (2^11.5 = 2896.3 → B = 2896) and a non-integer noise scale.
    for b_noise, slider in (("2048", "12"), ("2048", "11.5"), ("37.5", "3"), ("10", "10")):
        _set(browser, "input-noise-scale", b_noise)
        _set(browser, "slider-batch-size", slider)
        readouts = _readouts(browser)
        batch = readouts["readout-batch-size"][0]
        assert int(batch) == max(1, round(2 ** float(slider)))
        assert browser.find_element("id", "input-batch-size").get_attribute("value") == batch
        _assert_readouts_equal_calc(
            readouts, _calc(capsys, b_noise, batch), _calc_text(capsys, b_noise, batch)
        )
        # Doubling B: the ratio of eq. 2.11 at 2B and at B.
        row2 = _calc(capsys, b_noise, str(2 * int(batch)))
        row = _calc(capsys, b_noise, batch)
        double = float(readouts["readout-double-steps"][1])
        assert double == pytest.approx(row2["steps_over_min"] / row["steps_over_min"], rel=1e-15)
    assert _js_errors(browser) == []


def test_explorer_keyboard_and_typed_batch_size(
    browser: Any, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from selenium.webdriver.common.keys import Keys

    page = tmp_path / "explore.html"
    page.write_text(explore_html(2048.0, 4096), encoding="utf-8")
    _open(browser, page)
    slider = browser.find_element("id", "slider-batch-size")
    slider.send_keys(Keys.ARROW_RIGHT)
    # One keyboard step of the slider is 0.001 in log2 B: round(2^12.001) = 4099.
    readouts = _readouts(browser)
    assert readouts["readout-batch-size"][0] == "4099"
    _assert_readouts_equal_calc(
        readouts, _calc(capsys, "2048", "4099"), _calc_text(capsys, "2048", "4099")
    )
    box = browser.find_element("id", "input-batch-size")
    box.clear()
    box.send_keys("3000")
    readouts = _readouts(browser)
    _assert_readouts_equal_calc(
        readouts, _calc(capsys, "2048", "3000"), _calc_text(capsys, "2048", "3000")
    )
    # The slider follows the typed value, snapped to its 0.001 step; the readouts keep 3000.
    assert float(slider.get_attribute("value")) == pytest.approx(math.log2(3000), abs=5e-4)
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "explore.png"))
    assert _js_errors(browser) == []


@pytest.mark.parametrize("bad", ["-5", "abc", "0", "", "1e999"])
def test_explorer_bad_noise_scale_shows_an_error(browser: Any, tmp_path: Path, bad: str) -> None:
    page = tmp_path / "explore.html"
    page.write_text(explore_html(2048.0), encoding="utf-8")
    _open(browser, page)
    _set(browser, "input-noise-scale", bad)
    assert "noise scale must be a positive number" in browser.find_element("id", "error").text
    readouts = _readouts(browser)
    assert readouts["readout-steps-over-min"] == ["\u2014", None]
    assert readouts["readout-summary"] == ["", None]
    _set(browser, "input-noise-scale", "2048")
    assert browser.find_element("id", "error").text == ""
    assert readouts != _readouts(browser)
    assert _js_errors(browser) == []


def test_number_formatting_is_the_same_in_javascript(browser: Any, tmp_path: Path) -> None:
    page = tmp_path / "explore.html"
    page.write_text(explore_html(2048.0), encoding="utf-8")
    _open(browser, page)
    # No value here lies exactly halfway between two roundings (see report/text.py).
    values = [0.5, 2.0, 1 / 3, 2 / 3, 1.0 + 1 / 99, 12.3456, 9999.4, 12345.678, 1e-5, 0.00012345,
              123456789.0, 2.0e8 * 3**-4.76, 1e21, 7.0, 100.0, 0.1 + 0.2]  # fmt: skip
    js = browser.execute_script(
        "return arguments[0].map(v => [formatNumber(v), formatCount(v), formatBatchSize(v)]);",
        values,
    )
    for v, (number, count, batch) in zip(values, js, strict=True):
        assert number == format_number(v), v
        assert count == format_count(v), v
        assert batch == format_batch_size(v), v


def test_report_page_opens_without_errors(
    browser: Any, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    history = write_synthetic_history(
        tmp_path / "history.jsonl", synthetic_records(n_steps=600, skipped=(100,))
    )
    page = tmp_path / "report.html"
    assert main(["report", str(history), "-o", str(page)]) == 0
    capsys.readouterr()
    _open(browser, page)
    loaded = browser.execute_script(
        "return Array.from(document.images).map(img => img.complete && img.naturalWidth > 0);"
    )
    assert loaded == [True] * 5
    data = report_data(load_history(history))
    run = data.run
    # The calculator starts at the run's batch size and reproduces the cost table's row.
    row = next(r for r in data.costs if r.batch_size == 64)
    readouts = _readouts(browser)
    assert float(readouts["report-readout-steps"][1]) == pytest.approx(row.steps, rel=1e-12)
    assert readouts["report-readout-steps"][0] == format_count(row.steps)
    assert float(readouts["report-readout-examples"][1]) == pytest.approx(row.examples, rel=1e-12)
    assert float(readouts["report-readout-adaptive-steps"][1]) == pytest.approx(
        row.adaptive_steps_same_examples, rel=1e-12
    )
    assert readouts["report-readout-steps"][0] == format_count(run.predicted_steps)
    # Any other batch size: eq. D.1 along the trajectory.
    _set(browser, "report-input-batch-size", "300")
    other = report_data(load_history(history), [300]).costs[0]
    readouts = _readouts(browser)
    assert float(readouts["report-readout-steps"][1]) == pytest.approx(other.steps, rel=1e-12)
    assert float(readouts["report-readout-saved"][1]) == pytest.approx(
        100 * (1 - other.adaptive_steps_same_examples / other.steps), rel=1e-12
    )
    _set(browser, "report-input-batch-size", "-3")
    assert "must be a positive number" in browser.find_element("id", "report-error").text
    _set(browser, "report-input-batch-size", "64")
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "report.png"))
    assert _js_errors(browser) == []
