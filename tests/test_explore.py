"""Tests of ``noisescale explore`` without a browser: the page's content, the command, bad input.

tests/test_browser.py drives the page in headless Chromium and checks its numbers against calc.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from noisescale.cli import main
from noisescale.errors import NoiseScaleInputError
from noisescale.report.explore import SLIDER_MAX_LOG2, explore_html
from noisescale.theory import REGIME_FACTOR

READOUT_IDS = (
    "readout-batch-size",
    "readout-noise-scale",
    "readout-b-over-b-noise",
    "readout-regime",
    "readout-regime-words",
    "readout-lr-over-max",
    "readout-loss-improvement-over-max",
    "readout-steps-over-min",
    "readout-examples-over-min",
    "readout-summary",
    "readout-double-steps",
    "readout-double-examples",
)


def test_page_has_inputs_plots_and_readouts() -> None:
    page = explore_html(2048.0, 4096)
    for element_id in (
        *READOUT_IDS,
        "input-noise-scale",
        "input-batch-size",
        "slider-batch-size",
        "plot-lr",
        "plot-pareto",
        "error",
    ):
        assert page.count(f'id="{element_id}"') == 1, element_id
    assert 'id="input-noise-scale" value="2048"' in page
    assert f'max="{SLIDER_MAX_LOG2}"' in page
    initial = json.loads(re.search(r"const INITIAL = (\{.*?\});", page).group(1))
    assert initial == {
        "bNoise": 2048.0,
        "batchSize": 4096,
        "regimeFactor": REGIME_FACTOR,
        "sliderMax": SLIDER_MAX_LOG2,
    }


def test_page_is_self_contained() -> None:
    page = explore_html(123.5)
    # The SVG namespace is an identifier, not a fetch; nothing else may point off the page.
    without_namespace = page.replace('"http://www.w3.org/2000/svg"', "")
    for needle in ("http://", "https://", "//cdn", "<link", "@import", "src="):
        assert needle not in without_namespace, needle
    assert 'value="123.5"' in page
    # The default batch size is the noise scale, rounded.
    assert '"batchSize": 124' in page


@pytest.mark.parametrize(
    ("b_noise", "batch_size"),
    [(-1.0, None), (0.0, None), (float("nan"), None), (float("inf"), None), (10.0, 0.5),
     (10.0, 2.0**31)],
)  # fmt: skip
def test_page_rejects_bad_initial_values(b_noise: float, batch_size: float | None) -> None:
    with pytest.raises(NoiseScaleInputError):
        explore_html(b_noise, batch_size)


@pytest.mark.parametrize(
    ("b_noise", "start"), [(0.3, 1), (0.5, 1), (5e9, 2**SLIDER_MAX_LOG2), (2.0**30 + 1, 2**30)]
)
def test_default_batch_is_brought_into_the_sliders_range(b_noise: float, start: int) -> None:
    """The user gave no batch size: a noise scale outside [1, 2^30] (B_simple < 1 early in
    training) starts the slider at its end instead of failing with "got None"."""
    page = explore_html(b_noise)
    assert f'"batchSize": {start}' in page and f'"bNoise": {b_noise!r}' in page


def test_cli_writes_the_page(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "page.html"
    assert main(["explore", "--noise-scale", "900", "-o", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"output": str(out), "noise_scale": 900.0}
    assert out.read_text(encoding="utf-8") == explore_html(900.0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--noise-scale", "-5"], "--noise-scale must be a finite positive number"),
        (["--noise-scale", "big"], "--noise-scale must be a number"),
        (["--noise-scale", "5", "--batch-size", "0"], "--batch-size must be a finite positive"),
        (["--noise-scale", "5", "--batch-size", "0.5"], "between 1 and"),
    ],
)
def test_cli_bad_input_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], message: str
) -> None:
    out = tmp_path / "page.html"
    assert main(["explore", *args, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("noisescale explore: error: ") and message in err
    assert not out.exists()


def test_cli_output_problems_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["explore", "-o", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert main(["explore", "-o", str(tmp_path / "missing" / "page.html")]) == 2
    assert "does not exist; create it first" in capsys.readouterr().err
    assert main(["explore", "-o", str(tmp_path / "page.png")]) == 2
    assert "must end in .html or .htm" in capsys.readouterr().err
    page = tmp_path / "page.html"
    page.write_text("mine")
    assert main(["explore", "-o", str(page)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert page.read_text() == "mine"
    assert main(["explore", "-o", str(page), "--force"]) == 0
    assert page.read_text(encoding="utf-8") == explore_html(1000.0)
