"""Tests of ``noisescale recommend``: numbers against eq. 2.11 by hand, the HTML page, errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from noisescale.cli import main
from noisescale.hardware import ThroughputPoint, ThroughputProfile

ALPHA, BETA = 0.01, 0.001  # s per step, s per example
PARAM_BYTES = 4e8


@pytest.fixture
def profile_path(tmp_path: Path) -> Path:
    """A profile whose points lie exactly on t(b) = 10 ms + 1 ms·b; 32 examples fit."""
    points = [ThroughputPoint(b, (ALPHA + BETA * b,) * 3) for b in (1, 2, 4, 8, 16, 32)]
    profile = ThroughputProfile.from_points(
        points,
        device={"type": "cuda", "name": "Test GPU"},
        model={"name": "line", "parameters": 1e8, "param_bytes": PARAM_BYTES},
        max_batch_size=32,
    )
    path = tmp_path / "profile.json"
    profile.save(path)
    return path


def _run_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["recommend", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_numbers_match_eq_2_11_by_hand(
    profile_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _run_json(
        capsys,
        "--noise-scale", "100",
        "--profile", str(profile_path),
        "--gpus", "1,4",
        "--price", "3",
        "--target-examples", "1e5",
        "--batch-sizes", "64,256",
    )  # fmt: skip
    assert data["kind"] == "noisescale.recommendation" and data["version"] == 1
    assert data["s_min"] == pytest.approx(1000.0)  # S_min = E_min / B_noise
    rows = {(c["batch_size"], c["devices"]): c for c in data["candidates"]}
    # B = 256 on 4 devices: 64 each, 2 micro-batches of 32; ring all-reduce over PCIe 4
    # (20 GB/s): 2·(3/4)·4e8/2e10 = 0.03 s.
    c = rows[(256, 4)]
    step = 2 * ALPHA + BETA * 64 + 0.03
    steps = 1000 * (1 + 100 / 256)
    assert (c["micro_batch_size"], c["num_micro_batches"]) == (32, 2)
    assert c["step_time_s"] == pytest.approx(step)
    assert c["steps"] == pytest.approx(steps)
    assert c["examples"] == pytest.approx(1e5 * (1 + 256 / 100))
    assert c["time_s"] == pytest.approx(steps * step)
    assert c["gpu_hours"] == pytest.approx(4 * steps * step / 3600)
    assert c["cost"] == pytest.approx(3 * 4 * steps * step / 3600)
    # B = 64 on one device: 2 micro-batches of 32, no all-reduce.
    c = rows[(64, 1)]
    assert c["step_time_s"] == pytest.approx(2 * ALPHA + BETA * 64)
    assert c["time_s"] == pytest.approx(1000 * (1 + 100 / 64) * (2 * ALPHA + BETA * 64))
    # Recommended points are the brute-force extremes over all candidates.
    rec = data["recommended"]
    assert rec["fastest"]["time_s"] == min(c["time_s"] for c in rows.values())
    assert rec["cheapest"]["cost"] == min(c["cost"] for c in rows.values())
    products = [c["time_rel"] * c["cost_rel"] for c in rows.values()]
    assert rec["balanced"]["time_rel"] * rec["balanced"]["cost_rel"] == pytest.approx(min(products))
    assert data["assumptions"] and data["profile"]["fit"]["alpha_s"] == pytest.approx(ALPHA)


def test_device_counts_that_are_not_powers_of_two_get_candidates(
    profile_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Default batch sizes: N·2ⁱ for each N, up to the first ≥ 32·B_noise = 3200.
    data = _run_json(
        capsys, "--noise-scale", "100", "--profile", str(profile_path), "--gpus", "1,3,6"
    )
    sizes = {
        n: sorted(c["batch_size"] for c in data["candidates"] if c["devices"] == n)
        for n in (1, 3, 6)
    }
    assert sizes[1] == [2**i for i in range(13)]
    assert sizes[3] == [3 * 2**i for i in range(12)]  # 3 … 6144
    assert sizes[6] == [6 * 2**i for i in range(11)]  # 6 … 6144
    assert data["devices_without_candidates"] == []
    # B = 96 on 3 devices: 32 each in one pass, plus a ring all-reduce 2·(2/3)·4e8/2e10 s.
    c = next(c for c in data["candidates"] if (c["batch_size"], c["devices"]) == (96, 3))
    assert c["step_time_s"] == pytest.approx(ALPHA + BETA * 32 + 2 * (2 / 3) * PARAM_BYTES / 2e10)


def test_device_counts_without_a_divisible_batch_size_are_named(
    profile_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--noise-scale", "100", "--profile", str(profile_path), "--gpus", "1,3,6"]
    assert main(["recommend", *args, "--batch-sizes", "64,128", "--json"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert {c["devices"] for c in data["candidates"]} == {1}
    assert data["devices_without_candidates"] == [3, 6]
    assert "warning: no candidate on 3, 6 device(s)" in captured.err
    assert any(a.startswith("No candidate on 3, 6 device(s)") for a in data["assumptions"])


def test_target_steps_and_custom_bandwidth(
    profile_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _run_json(
        capsys,
        "--noise-scale", "50",
        "--profile", str(profile_path),
        "--gpus", "2",
        "--target-steps", "200",
        "--batch-sizes", "32",
        "--bandwidth", "100",
    )  # fmt: skip
    assert data["e_min"] == pytest.approx(200 * 50)
    (c,) = data["candidates"]
    allreduce = 2 * 0.5 * PARAM_BYTES / 100e9
    assert c["allreduce_s"] == pytest.approx(allreduce)
    assert c["step_time_s"] == pytest.approx(ALPHA + BETA * 16 + allreduce)
    assert c["gpu_hours"] == pytest.approx(2 * 200 * (1 + 50 / 32) * c["step_time_s"] / 3600)
    assert c["cost"] is None  # no price


def test_relative_mode(profile_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _run_json(capsys, "--noise-scale", "100", "--profile", str(profile_path))
    assert data["relative"] is True and data["s_min"] is None
    assert all(c["time_s"] is None for c in data["candidates"])
    # Default candidates: powers of two up to 32·B_noise = 3200 → 4096.
    assert [c["batch_size"] for c in data["candidates"]] == [2**i for i in range(13)]
    assert min(c["time_rel"] for c in data["candidates"]) == pytest.approx(1.0)


def test_text_output_and_html_page(
    profile_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    page = tmp_path / "recommend.html"
    args = ["--noise-scale", "300", "--profile", str(profile_path), "--gpus", "1,2,4,8"]
    code = main(["recommend", *args, "--price", "2.5", "--target-steps", "5e4", "-o", str(page)])
    assert code == 0
    out = capsys.readouterr().out
    for word in ("fastest:", "balanced:", "cheapest:", "assumptions:", "Pareto front"):
        assert word in out
    html = page.read_text()
    assert html.startswith("<!DOCTYPE html>") and "<svg" in html and "</svg>" in html
    # Self-contained: no scripts, stylesheets or images fetched from anywhere.
    assert "<script" not in html and "<link" not in html and "<img" not in html
    assert not re.search(r"(src|href)\s*=", html)
    for label in ("fastest", "balanced", "cheapest"):
        assert re.search(rf"<text[^>]*>[^<]*{label}", html)
    assert "<polyline" in html and "Assumptions" in html


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--noise-scale", "0"], "argument --noise-scale: must be a finite positive number"),
        (["--noise-scale", "-3"], "argument --noise-scale: must be a finite positive number"),
        (["--noise-scale", "nan"], "must be a finite positive number, got 'nan'"),
        (["--noise-scale", "10", "--price", "-1"], "argument --price: must be a finite positive"),
        (["--noise-scale", "10", "--grad-bytes", "-1"], "argument --grad-bytes: must be a finite"),
        (["--noise-scale", "10", "--currency", "EUR"], "--currency names the currency of --price"),
        (["--noise-scale", "10", "--interconnect", "carrier-pigeon"], "unknown --interconnect"),
        (["--noise-scale", "10", "--gpus", "3", "--batch-sizes", "4,8"], "no candidate"),
    ],
)
def test_bad_input_exit_2(
    profile_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(["recommend", "--profile", str(profile_path), *args]) == 2
    err = capsys.readouterr().err
    assert "noisescale recommend: error:" in err and message in err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read profile"),
        ("{truncated", "not valid JSON"),
        ('{"kind": "noisescale.history", "version": 1}', "not a noisescale profile"),
        ('{"kind": "noisescale.profile", "version": 1, "points": [{"batch_size": 1}]}', "corrupt"),
    ],
)
def test_missing_or_corrupt_profile_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, message: str
) -> None:
    path = tmp_path / "p.json"
    if content is not None:
        path.write_text(content)
    assert main(["recommend", "--noise-scale", "10", "--profile", str(path)]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--target-steps", "10", "--target-examples", "100"], "not allowed with argument"),
        (["--gpus", "1,two"], "argument --gpus: expected a number, got 'two'"),
        (["--gpus", "0"], "argument --gpus: must be at least 1, got '0'"),
        (["--gpus", "2,2"], "2 is given twice"),
    ],
)
def test_usage_errors_exit_2(
    profile_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(["recommend", "--noise-scale", "10", "--profile", str(profile_path), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: noisescale recommend") and message in err


def test_python_m_entry_point(profile_path: Path) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "noisescale", "recommend", "--noise-scale", "64",
         "--profile", str(profile_path), "--json"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["b_noise"] == 64
    bad = subprocess.run(
        [sys.executable, "-m", "noisescale", "recommend", "--noise-scale", "64",
         "--profile", str(profile_path.with_name("absent.json"))],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert bad.returncode == 2 and "cannot read profile" in bad.stderr


def test_profile_then_recommend_end_to_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    threads = torch.get_num_threads()
    out = tmp_path / "cnn.json"
    # batch sizes far enough apart, and the median of three repeats, that the step time rises
    # with the batch size even under the full suite's load (with 1 and 16 and two repeats, a
    # loaded run once measured it falling, which recommend rightly refuses to price)
    try:
        code = main(
            ["profile", "mnist-cnn", "--device", "cpu", "--batch-sizes", "1,64", "--threads", "1",
             "--no-memory-search", "--warmup", "1", "--repeats", "3", "-o", str(out)]
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    capsys.readouterr()
    data = _run_json(capsys, "--noise-scale", "900", "--profile", str(out), "--gpus", "1,2")
    assert data["profile"]["model"]["name"] == "mnist-cnn"
    assert data["recommended"]["fastest"]["pareto"] is True


def _cpu_profile(tmp_path: Path, *, capped: bool) -> Path:
    points = [ThroughputPoint(b, (ALPHA + BETA * b,) * 3) for b in (1, 2, 4, 8, 16, 32)]
    profile = ThroughputProfile.from_points(
        points,
        device={"type": "cpu", "name": "Test CPU", "torch_threads": 2},
        model={"name": "line", "parameters": 1e8, "param_bytes": PARAM_BYTES},
        max_batch_size=32,
        max_batch_search={"limit": 32, "capped": capped, "trials": []},
    )
    path = tmp_path / "cpu.json"
    profile.save(path)
    return path


def test_units_come_from_the_device_and_money_from_the_currency(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cpu = _cpu_profile(tmp_path, capped=False)
    args = ["--noise-scale", "64", "--target-examples", "1e6", "--price", "2.5"]
    data = _run_json(capsys, "--profile", str(cpu), *args, "--currency", "EUR")
    assert data["hours_unit"] == "CPU-h" and data["currency"] == "EUR"
    assert main(["recommend", "--profile", str(cpu), *args, "--currency", "EUR"]) == 0
    text = capsys.readouterr().out
    fastest = data["recommended"]["fastest"]
    assert f"{fastest['cost']:.4g} EUR ({fastest['gpu_hours']:.3g} CPU-h)" in text
    assert "GPU-h" not in text and "× 2.5 EUR per device-hour" in text
    assert main(["recommend", "--profile", str(cpu), *args]) == 0
    text = capsys.readouterr().out
    assert f"{fastest['cost']:.4g} (price units)" in text and "name it with --currency" in text
    page = tmp_path / "r.html"
    assert (
        main(["recommend", "--profile", str(cpu), *args, "--currency", "EUR", "-o", str(page)]) == 0
    )
    html = page.read_text()
    assert "cost (EUR)" in html and "CPU-h" in html and "GPU-h" not in html


def test_a_capped_memory_search_says_at_least(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capped = _run_json(
        capsys, "--profile", str(_cpu_profile(tmp_path, capped=True)), "--noise-scale", "64"
    )
    (line,) = [a for a in capped["assumptions"] if "Micro-batches" in a]
    assert line.startswith("Micro-batches of at least 32 examples fit in memory")
    uncapped = _run_json(
        capsys, "--profile", str(_cpu_profile(tmp_path, capped=False)), "--noise-scale", "64"
    )
    (line,) = [a for a in uncapped["assumptions"] if "Micro-batches" in a]
    assert line.startswith("Micro-batches of at most 32 examples fit in memory")


def test_the_page_never_replaces_the_profile(
    profile_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = profile_path.read_bytes()
    args = ["recommend", "--noise-scale", "10", "--profile", str(profile_path), "-o"]
    assert main([*args, str(profile_path)]) == 2
    assert "is also an input of this command" in capsys.readouterr().err
    assert main([*args, str(profile_path), "--force"]) == 2  # not even with --force
    assert profile_path.read_bytes() == before
    assert main([*args, str(profile_path.with_suffix(".png"))]) == 2
    assert "must end in .html or .htm" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("beta_s", -0.001, "the profile's step time falls with the batch size"),
        ("param_bytes", -1, "model.param_bytes must be a number ≥ 0"),
        ("param_bytes", "many", "model.param_bytes must be a number ≥ 0"),
        ("times_s", [0.01, -0.02], "a step time is not a positive number"),
    ],
)
def test_profiles_with_impossible_values_are_refused(
    profile_path: Path, capsys: pytest.CaptureFixture[str], field: str, value: object, message: str
) -> None:
    data = json.loads(profile_path.read_text())
    if field == "beta_s":
        data["fit"]["beta_s"] = value
    elif field == "param_bytes":
        data["model"]["param_bytes"] = value
    else:
        data["points"][0]["times_s"] = value
    profile_path.write_text(json.dumps(data))
    assert main(["recommend", "--noise-scale", "10", "--profile", str(profile_path)]) == 2
    assert message in capsys.readouterr().err


def test_a_flat_profile_within_its_noise_is_priced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """(A review, 2026-12-07.) A launch-bound profile (10 ms flat, 1% noise) whose β < 0 within
    its standard error was refused "falls with the batch size ... more --repeats"; it is priced
    with β = 0 at the mean of the medians (each step, one device, no all-reduce; the sloped
    fit's α was kept until a second review), the assumptions say so, and --json shows the fit
    it priced with (``priced_fit``) beside the measured one."""
    times = {1: 0.01002, 2: 0.00999, 4: 0.01001, 8: 0.00998, 16: 0.01002, 32: 0.00999}
    points = [ThroughputPoint(b, (t * 0.99, t, t * 1.01)) for b, t in times.items()]
    profile = ThroughputProfile.from_points(points, device={"type": "cuda"}, model={})
    assert profile.fit.beta_s < 0 < profile.fit.beta_s + profile.fit.beta_se_s
    path = tmp_path / "flat.json"
    profile.save(path)
    data = _run_json(capsys, "--noise-scale", "100", "--profile", str(path), "--gpus", "1")
    steps = [c["step_time_s"] for c in data["candidates"]]
    mean = sum(times.values()) / len(times)
    assert steps == pytest.approx([mean] * len(steps), rel=1e-12)
    assert any("priced with β = 0" in line for line in data["assumptions"])
    assert data["profile"]["fit"]["beta_s"] == profile.fit.beta_s
    priced = data["profile"]["priced_fit"]
    assert priced["beta_s"] == 0.0 and priced["alpha_s"] == pytest.approx(mean, rel=1e-12)
    assert priced["max_rel_residual"] == pytest.approx(
        max(abs(t - mean) / t for t in times.values())
    )
