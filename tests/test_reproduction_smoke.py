"""Smoke tests of experiments/critical_batch/run.py on a few steps of synthetic data.

The experiment itself takes minutes; these check its pieces: the IDX reader against bytes
written here, the eq. A.3 grid centre, the measurement schedule, a tiny grid whose CSV
``noisescale fit`` reads (with the step cap and resuming), and the temperature runs following
the control exactly until their window.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from noisescale.cli import main as cli_main
from noisescale.errors import NoiseScaleInputError
from noisescale.sweep import read_runs

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "critical_batch" / "run.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("critical_batch_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being created
    spec.loader.exec_module(module)
    return module


cb = _load_script()


@pytest.fixture(autouse=True)
def _one_thread():
    """The script's default (--threads 1): tiny matrices, faster than two threads here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape
    )
    return header + array.astype(np.uint8).tobytes()


def test_read_idx_round_trip(tmp_path: Path) -> None:
    array = np.random.default_rng(0).integers(0, 256, size=(3, 4, 5), dtype=np.uint8)
    (tmp_path / "a.idx").write_bytes(_idx_bytes(array))
    (tmp_path / "a.idx.gz").write_bytes(gzip.compress(_idx_bytes(array)))
    np.testing.assert_array_equal(cb.read_idx(tmp_path / "a.idx"), array)
    np.testing.assert_array_equal(cb.read_idx(tmp_path / "a.idx.gz"), array)


def test_read_idx_refuses_bad_files(tmp_path: Path) -> None:
    array = np.zeros((2, 3), dtype=np.uint8)
    (tmp_path / "short.idx").write_bytes(_idx_bytes(array)[:-1])
    with pytest.raises(NoiseScaleInputError, match="bytes follow"):
        cb.read_idx(tmp_path / "short.idx")
    (tmp_path / "float.idx").write_bytes(bytes([0, 0, 0x0D, 1, 0, 0, 0, 0]))
    with pytest.raises(NoiseScaleInputError, match="not an unsigned-byte IDX"):
        cb.read_idx(tmp_path / "float.idx")
    with pytest.raises(NoiseScaleInputError, match="apt-get install dataset-fashion-mnist"):
        cb.find_data_dir(tmp_path)


def test_central_learning_rate_is_eq_a3() -> None:
    grid = cb.Grid(batch_sizes=(8,), lr_star=0.3, b_star=64.0, alpha=0.75)
    for b in (1, 8, 64, 4096):
        assert grid.central_lr(b) == pytest.approx(0.3 / (1 + 64 / b) ** 0.75, rel=1e-12)


def test_measurement_schedule_is_geometric() -> None:
    steps = cb.eval_schedule(5000, 1.05)
    assert steps[0] == 1 and steps[-1] == 5000
    gaps = np.diff(steps)
    assert np.all(gaps >= 1)
    # every gap is at most 5% of the step (plus rounding), so S is known to ~5% everywhere
    assert np.all(gaps <= np.maximum(1, 0.05 * np.array(steps[:-1]) + 1))


def _synthetic_data(n: int = 512, seed: int = 0) -> object:
    """Images whose label is the argmax of a fixed linear map: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=g)
    w = torch.randn(784, 10, generator=g)
    y = (x.flatten(1) @ w).argmax(1)
    return cb.Data(x=x, y=y, eval_x=x[:128], eval_y=y[:128])


def _tiny_scale() -> object:
    base = cb.SCALES["cpu"]
    grid = cb.Grid(batch_sizes=(4, 16, 64), lr_star=0.6, b_star=16.0, alpha=1.0, max_extensions=1)
    return replace(
        base,
        grids={"sgd": grid},
        goals=(2.0, 1.6, 1.3),
        ema=0.0,
        s_min_guess=10.0,
        e_min_guess=400.0,
        budget_factor=1.0,
        eval_spacing=1.2,
    )


def test_tiny_grid_is_fitted_and_resumed(tmp_path: Path) -> None:
    torch.manual_seed(0)
    scale = _tiny_scale()
    data = _synthetic_data()
    device = torch.device("cpu")
    logged: list[str] = []
    records = cb.run_grid(data, scale, "sgd", tmp_path, device=device, seed=0, log=logged.append)
    assert len(logged) == len(records) >= 9
    for b in scale.grids["sgd"].batch_sizes:
        at_b = [r for r in records if r.batch_size == b]
        assert all(r.steps <= scale.max_steps(b) for r in at_b)
        # the central learning rate runs first; no later run goes past its step to the goal
        first = next(r for r in at_b if r.multiple == 1.0)
        if first.reached_final_at is not None:
            assert all(r.steps <= first.reached_final_at for r in at_b)
    runs = read_runs(tmp_path / "runs_sgd.csv")
    assert {r.name for r in runs} == {r.name for r in records}
    assert all(r.b_simple is not None for r in runs)

    again: list[str] = []
    resumed = cb.run_grid(data, scale, "sgd", tmp_path, device=device, seed=0, log=again.append)
    assert again == []
    assert [r.name for r in resumed] == [r.name for r in records]

    # a process killed between the CSV append and the index append: that run trains again
    index = tmp_path / "runs_sgd.jsonl"
    lines = index.read_text().splitlines(keepends=True)
    index.write_text("".join(lines[:-1]))
    again = []
    cb.run_grid(data, scale, "sgd", tmp_path, device=device, seed=0, log=again.append)
    assert len(again) == 1 and again[0].startswith(logged[-1].split(":")[0])
    assert {r.name for r in read_runs(tmp_path / "runs_sgd.csv")} == {r.name for r in records}

    analysis, results = cb.analyse(records, scale.goals, scale.ema)
    assert [g["goal"] for g in analysis["goals"]] == [r.goal for r in results]
    for g in analysis["goals"]:
        assert math.isfinite(g["b_crit"]) and g["b_crit"] > 0
        assert g["b_simple"] is not None and g["b_simple_at_goal"] is not None
    goals = ",".join(f"{g['goal']:g}" for g in analysis["goals"])
    assert cli_main(["fit", str(tmp_path / "runs_sgd.csv"), "--ema", "0", "--goal", goals]) == 0


def test_temperature_variants_follow_the_control_until_the_window() -> None:
    t = cb.Temperature(
        batch_size=8,
        lr=0.05,
        change_at=20,
        restore_at=40,
        steps=60,
        record_every=5,
        eval_every=10,
        beta=0.9,
    )
    scale = replace(_tiny_scale(), temperature=t)
    data = _synthetic_data()
    rows = []
    for variant in ("control", "lr_div4_batch_x4"):
        rows += cb.temperature_run(data, scale, variant, device=torch.device("cpu"), seed=3)
    control = {r["step"]: r for r in rows if r["variant"] == "control"}
    for r in rows:
        if r["variant"] == "control":
            assert (r["batch_size"], r["learning_rate"]) == (8, 0.05)
            continue
        in_window = t.change_at <= r["step"] < t.restore_at
        assert (r["batch_size"], r["learning_rate"]) == ((32, 0.0125) if in_window else (8, 0.05))
        if r["step"] < t.change_at:  # NaN early on (|G|² not yet positive) equals NaN here
            np.testing.assert_equal(r["b_simple"], control[r["step"]]["b_simple"])
    summary = cb.temperature_summary(rows, t)
    assert summary["lr_div4_batch_x4"]["temperature_ratio"] == 16.0
    assert summary["lr_div4_batch_x4"]["b_simple_ratio_before"] == 1.0
    # the control against itself: 1, or None where this tiny run's B_simple is not yet defined
    # (|G|² not resolved from batches of 8 with a 1-example subset)
    assert summary["control"]["b_simple_ratio_window"] in (1.0, None)


def test_unknown_part_exits_with_code_2() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--parts", "sgd,momentum"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "unknown --parts ['momentum']" in proc.stderr
