"""Tests of ``noisescale calc``: batch-size syntax, numbers (eq. 2.6, 2.11), text, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from noisescale import theory
from noisescale.cli import main
from noisescale.commands.calc import MAX_BATCH_SIZES, parse_batch_sizes
from noisescale.errors import NoiseScaleInputError
from noisescale.report.text import REGIME_WORDS, format_number


def calc_json(capsys: pytest.CaptureFixture, *args: str) -> object:
    assert main(["calc", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# --- batch-size syntax --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("256", [256]),
        ("64,128,256", [64, 128, 256]),
        (" 64 , 128 ", [64, 128]),
        ("16:4096:x2", [16, 32, 64, 128, 256, 512, 1024, 2048, 4096]),
        ("16:100", [16, 32, 64]),
        ("100:1000:+100", [100, 200, 300, 400, 500, 600, 700, 800, 900, 1000]),
        ("100:1050:+250", [100, 350, 600, 850]),
        ("10:30:x1.5", [10, 15, 22.5]),
        ("1e5:1e7:x10", [1e5, 1e6, 1e7]),
        ("1:3:+0.5", [1, 1.5, 2, 2.5, 3]),
        ("8,16:64:x4", [8, 16, 64]),
        ("2.5", [2.5]),
    ],
)
def test_parse_batch_sizes(text: str, expected: list[float]) -> None:
    assert parse_batch_sizes(text) == pytest.approx(expected)


def test_geometric_ranges_stay_on_the_integers() -> None:
    # 3·1.1^k drifts off the integers in floating point only where it is not an integer anyway;
    # powers of 2 and 10 must come back exact.
    assert parse_batch_sizes("1e3:1e6:x10") == [1000, 10000, 100000, 1000000]
    assert all(isinstance(b, int) for b in parse_batch_sizes("16:65536:x2"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty item"),
        ("64,,128", "empty item"),
        ("abc", "must be a number"),
        ("0", "finite positive"),
        ("-5", "finite positive"),
        ("nan", "finite positive"),
        ("inf", "finite positive"),
        ("64:16", "STOP is below START"),
        ("16:64:x1", "factor must exceed 1"),
        ("16:64:y2", "xK"),
        ("16:64:+0", "finite positive"),
        ("1:2:3:4", "START:STOP"),
        ("1:1e9:+1", f"more than {MAX_BATCH_SIZES}"),
    ],
)
def test_parse_batch_sizes_rejects_bad_syntax(text: str, message: str) -> None:
    with pytest.raises(NoiseScaleInputError, match=message):
        parse_batch_sizes(text)


# --- numbers ------------------------------------------------------------------------------------


def test_json_single_batch_size(capsys: pytest.CaptureFixture) -> None:
    row = calc_json(capsys, "--noise-scale", "2048", "--batch-size", "4096")
    assert isinstance(row, dict)
    assert row["noise_scale"] == 2048.0
    assert row["batch_size"] == 4096
    assert row["regime"] == "balanced"
    assert row["lr_over_max"] == pytest.approx(2 / 3, rel=1e-15)
    assert row["loss_improvement_over_max"] == pytest.approx(2 / 3, rel=1e-15)
    assert row["steps_over_min"] == 1.5
    assert row["examples_over_min"] == 3.0
    assert row["b_over_b_noise"] == 2.0
    assert row["unit"] == "examples"


def test_json_list_matches_theory(capsys: pytest.CaptureFixture) -> None:
    rows = calc_json(capsys, "--noise-scale", "300", "--batch-size", "25:1600:x2")
    assert [r["batch_size"] for r in rows] == [25, 50, 100, 200, 400, 800, 1600]
    # 100 = 300/3 is on the boundary, which counts as balanced.
    assert [r["regime"] for r in rows] == ["small"] * 2 + ["balanced"] * 4 + ["large"]
    for r in rows:
        b = r["batch_size"]
        assert r["lr_over_max"] == theory.lr_over_max(b, 300)
        assert r["steps_over_min"] == theory.steps_over_min(b, 300)
        assert r["examples_over_min"] == theory.examples_over_min(b, 300)


def test_a_one_item_range_still_prints_a_list(capsys: pytest.CaptureFixture) -> None:
    rows = calc_json(capsys, "--noise-scale", "300", "--batch-size", "64:100")
    assert isinstance(rows, list) and len(rows) == 1


@pytest.mark.parametrize(
    ("rule", "expected"),
    [("linear", [0.1, 0.2, 0.4]), ("sqrt", [0.1, 0.1 * 2**0.5, 0.2]), ("none", [0.1] * 3)],
)
def test_lr_rules_scale_from_the_first_batch_size(
    capsys: pytest.CaptureFixture, rule: str, expected: list[float]
) -> None:
    rows = calc_json(
        capsys, "--noise-scale", "256", "--batch-size", "256:1024", "--lr", "0.1", "--lr-rule", rule
    )
    assert [r["lr"] for r in rows] == pytest.approx(expected)
    assert all(r["lr_batch_size"] == 256 and r["lr_rule"] == rule for r in rows)


def test_noise_lr_rule_is_the_ratio_of_eq_2_6(capsys: pytest.CaptureFixture) -> None:
    row = calc_json(
        capsys, "--noise-scale", "2048", "--batch-size", "4096", "--lr", "0.1",
        "--lr-batch-size", "2048",
    )  # fmt: skip
    assert row["lr"] == pytest.approx(0.1 * (2 / 3) / (1 / 2))
    assert row["lr_rule"] == "noise" and row["alpha"] == 1.0
    row = calc_json(
        capsys, "--noise-scale", "2048", "--batch-size", "4096", "--lr", "0.1",
        "--lr-batch-size", "2048", "--alpha", "0.5",
    )  # fmt: skip
    assert row["lr"] == pytest.approx(0.1 * (4 / 3) ** 0.5)


def test_temperature_rescales_the_noise_scale(capsys: pytest.CaptureFixture) -> None:
    # Measured at T0 = 0.1/128, used at T1 = 0.01/128: B_noise grows tenfold (eq. C.2).
    row = calc_json(
        capsys, "--noise-scale", "500", "--batch-size", "5000",
        "--temperature-from", str(0.1 / 128), "--temperature-to", str(0.01 / 128),
    )  # fmt: skip
    assert row["noise_scale"] == pytest.approx(5000)
    assert row["noise_scale_measured"] == 500
    assert row["steps_over_min"] == pytest.approx(2.0)


def test_equal_tiny_temperatures_keep_the_noise_scale(capsys: pytest.CaptureFixture) -> None:
    """(A review, 2026-12-07.) T0 = T1 = 1e-320: B_noise·T0 underflowed before dividing by T1,
    and 1e-10 was refused as an underflow; eq. C.2 at equal temperatures is B_noise itself."""
    for noise in ("1e-10", "100"):
        row = calc_json(
            capsys, "--noise-scale", noise, "--batch-size", "64",
            "--temperature-from", "1e-320", "--temperature-to", "1e-320",
        )  # fmt: skip
        assert row["noise_scale"] == float(noise)


def test_kaplan_loss_gives_a_noise_scale_in_tokens(capsys: pytest.CaptureFixture) -> None:
    row = calc_json(capsys, "--kaplan-loss", "3", "--batch-size", "1e6")
    assert row["noise_scale"] == pytest.approx(2.0e8 * 3**-4.76)
    assert row["unit"] == "tokens"
    assert row["steps_over_min"] == pytest.approx(1 + 2.0e8 * 3**-4.76 / 1e6)


# --- text ---------------------------------------------------------------------------------------


def test_text_single_batch_size(capsys: pytest.CaptureFixture) -> None:
    assert main(["calc", "--noise-scale", "2048", "--batch-size", "4096"]) == 0
    out = capsys.readouterr().out
    assert "Noise scale B_noise = 2048." in out
    assert "is 2× the noise scale" in out
    assert REGIME_WORDS["balanced"] in out
    assert "ε_opt/ε_max   = 0.6667" in out
    assert "S/S_min       = 1.5 " in out
    assert "E/E_min       = 3 " in out
    assert (
        "Training to a given loss at B = 4096 takes 1.5× the fewest possible steps and 3× the "
        "fewest possible examples." in out
    )


def test_text_table(capsys: pytest.CaptureFixture) -> None:
    assert (
        main(["calc", "--noise-scale", "1000", "--batch-size", "100,1000,10000", "--lr", "1"]) == 0
    )
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("batch size"))
    table = [line.split() for line in lines[header + 1 :]]
    assert [row[0] for row in table] == ["100", "1000", "10000"]
    assert [row[2] for row in table] == ["small", "balanced", "large"]
    # Columns: B, B/B_noise, regime, ε/ε_max, S/S_min, E/E_min, lr (noise rule from B = 100).
    assert table[1][3:6] == ["0.5", "2", "2"]
    assert table[2][3:6] == [format_number(1 / 1.1), "1.1", "11"]
    assert table[1][6] == format_number(0.5 / (1 / 11))


# --- bad input ----------------------------------------------------------------------------------

# B_noise·T0/T1 = 100·1e-300/1e300 is below the smallest double
UNDERFLOW = ["--temperature-from", "1e-300", "--temperature-to", "1e300"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--noise-scale", "abc", "--batch-size", "64"], "--noise-scale must be a number"),
        (
            ["--noise-scale", "-2048", "--batch-size", "64"],
            "--noise-scale must be a finite positive",
        ),
        (["--noise-scale", "0", "--batch-size", "64"], "finite positive"),
        (["--noise-scale", "nan", "--batch-size", "64"], "finite positive"),
        (["--noise-scale", "inf", "--batch-size", "64"], "finite positive"),
        (["--noise-scale", "100", "--batch-size", "0"], "finite positive"),
        (["--noise-scale", "100", "--batch-size", "64:x2"], "STOP"),
        (["--kaplan-loss", "-1", "--batch-size", "64"], "--kaplan-loss"),
        (["--noise-scale", "100", "--batch-size", "64", "--lr", "0.1"], "--lr-batch-size"),
        (
            ["--noise-scale", "100", "--batch-size", "64", "--lr", "fast", "--lr-batch-size", "8"],
            "--lr must be a number",
        ),
        (["--noise-scale", "100", "--batch-size", "64", "--lr-batch-size", "8"], "needs --lr"),
        (["--noise-scale", "100", "--batch-size", "64", "--temperature-from", "1"], "go together"),
        # (a fuzzer, seed 39: 100·1e-300/1e300 underflowed to 0, a ZeroDivisionError)
        (
            ["--noise-scale", "100", "--batch-size", "64", *UNDERFLOW],
            "the numbers underflow or overflow: the noise scale at the new temperature",
        ),
        (
            ["--noise-scale", "100", "--batch-size", "64,128", "--lr", "1", "--alpha", "-1"],
            "--alpha",
        ),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(
    capsys: pytest.CaptureFixture, args: list[str], message: str
) -> None:
    assert main(["calc", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("noisescale calc: error: ")
    assert message in captured.err


def test_cli_through_python_m_exits_2() -> None:
    bad = subprocess.run(
        [sys.executable, "-m", "noisescale", "calc", "--noise-scale", "minus one", "--batch-size",
         "8"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert "noisescale calc: error: --noise-scale must be a number, got 'minus one'" in bad.stderr


# --- from a history -----------------------------------------------------------------------------


def _history(tmp_path, last: dict, preconditioned: bool | None = None) -> str:
    """A two-record tracker history whose last B_simple is ``last`` (b_simple, low, high)."""
    header = {"kind": "noisescale.history", "version": 1, "beta": 0.5, "confidence": 0.9}
    records = [{"step": s, "b_big": 32, "examples": 32 * s, **last} for s in range(1, 20)]
    if preconditioned is not None:
        for r in records:
            r["preconditioned"] = preconditioned
    path = tmp_path / "h.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in [header, *records]) + "\n")
    return str(path)


def test_history_noise_scale_keeps_its_interval_and_open_end_is_warned(
    tmp_path, capsys: pytest.CaptureFixture
) -> None:
    """|G|² not yet told from zero: B_simple's interval is [0, ∞), so no regime is settled."""
    path = _history(tmp_path, {"b_simple": 35.0, "b_simple_low": 0.0, "b_simple_high": None})
    rows = calc_json(capsys, "--history", path, "--batch-size", "32,1000")
    for row in rows:
        assert row["noise_scale_interval"] == [0.0, None] and row["confidence"] == 0.9
        assert row["regimes_over_interval"] == ["small", "balanced", "large"]
        assert any("open above" in w for w in row["warnings"])
    assert main(["calc", "--history", path, "--batch-size", "32,1000"]) == 0
    out, err = capsys.readouterr()
    assert "90% interval [0, ∞)" in out and "small–large" in out
    assert "noisescale calc: warning: the last B_simple's interval is open above" in err
    assert main(["calc", "--history", path, "--batch-size", "32"]) == 0
    assert "not settled" in capsys.readouterr().out


def test_history_regime_is_settled_only_over_the_whole_interval(
    tmp_path, capsys: pytest.CaptureFixture
) -> None:
    # B_simple 100 [80, 125]: B = 100 is balanced throughout (125/3 ≤ 100 ≤ 3·80); B = 40 is
    # balanced at the estimate (120 ≥ 100) but small for B_noise 125 (120 < 125)
    path = _history(tmp_path, {"b_simple": 100.0, "b_simple_low": 80.0, "b_simple_high": 125.0})
    rows = calc_json(capsys, "--history", path, "--batch-size", "100,40")
    assert rows[0]["noise_scale_interval"] == [80.0, 125.0]
    assert rows[0]["regimes_over_interval"] == ["balanced"]
    assert rows[1]["regime"] == "balanced"
    assert rows[1]["regimes_over_interval"] == ["small", "balanced"]
    assert not any("open above" in w for w in rows[0]["warnings"])
    # re-expressed at another temperature, the interval moves with the noise scale (eq. C.2)
    rows = calc_json(capsys, "--history", path, "--batch-size", "100", "--temperature-from",
                     "1", "--temperature-to", "2")  # fmt: skip
    assert rows["noise_scale"] == 50.0 and rows["noise_scale_interval"] == [40.0, 62.5]
    # a noise scale below the smallest number there is refused (a fuzzer, seed 39)
    assert main(["calc", "--history", path, "--batch-size", "100", *UNDERFLOW]) == 2
    assert "the numbers underflow" in capsys.readouterr().err


def test_history_that_lost_its_estimate_says_the_decision_is_stale(
    tmp_path, capsys: pytest.CaptureFixture
) -> None:
    """(A hunt, 2026-12-06.) The last 20 of 60 steps carry no B_simple because the averaged |G|²
    fell to ≤ 0: calc acted on step 40's estimate without a word that the run went on and lost
    it. It still answers from step 40 (exit 0), and warns that the noise scale has outgrown the
    measurement, which makes a batch size chosen from step 40 likely too small."""
    header = {"kind": "noisescale.history", "version": 1, "beta": 0.5, "confidence": 0.9}
    measured = {"b_simple": 24.0, "b_simple_low": 20.0, "b_simple_high": 29.0}
    records = [
        {"step": s, "b_big": 32, "examples": 32 * s, "g2_ema": 1.0, "trace_sigma_ema": 24.0,
         **measured}
        if s <= 40
        else {"step": s, "b_big": 32, "examples": 32 * s, "g2_ema": -0.13, "trace_sigma_ema": 24.0}
        for s in range(1, 61)
    ]  # fmt: skip
    path = tmp_path / "h.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in [header, *records]) + "\n")
    assert main(["calc", "--history", str(path), "--batch-size", "64"]) == 0
    out, err = capsys.readouterr()
    assert "(step 40)" in out
    assert (
        "B_simple's last estimate is from step 40, but the run went on to step 60 and its 20 "
        "later record(s) carry none — at step 60 the averaged |G|² is -0.13, not positive"
    ) in err
    assert "likely too small, and its regime and ratios point the wrong way" in err
    # the steps up to the estimate alone: nothing stale to say
    path.write_text("\n".join(json.dumps(x) for x in [header, *records[:40]]) + "\n")
    assert main(["calc", "--history", str(path), "--batch-size", "64"]) == 0
    assert "last estimate is from" not in capsys.readouterr().err


def test_history_says_when_its_noise_scale_is_preconditioned(
    tmp_path, capsys: pytest.CaptureFixture
) -> None:
    path = _history(
        tmp_path,
        {"b_simple": 100.0, "b_simple_low": 80.0, "b_simple_high": 125.0},
        preconditioned=True,
    )
    assert main(["calc", "--history", path, "--batch-size", "100"]) == 0
    assert "B_simple of the preconditioned gradient P ⊙ g = 100" in capsys.readouterr().out
    assert calc_json(capsys, "--history", path, "--batch-size", "100")["preconditioned"]
