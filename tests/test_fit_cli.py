"""Tests of ``noisescale fit``: runs files in, B_crit per goal out (text, JSON, PNG, HTML)."""

from __future__ import annotations

import csv
import json
import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from noisescale.cli import main
from noisescale.sweep import critical_batch_sizes, read_runs
from noisescale.sweep.plot import pareto_html, pareto_plot_data
from noisescale.sweep.synthetic import SyntheticModel

MODEL = SyntheticModel(b_noise_start=20.0, b_noise_slope=1.0, loss_start=1.0, s_scale=50.0)
BATCH_SIZES = [8, 32, 128, 512, 2048]
LEARNING_RATES = [0.03, 0.1, 0.3]
SLOWDOWN = {0.03: 2.0, 0.1: 1.0, 0.3: 1.4}


def _rows(*, b_simple: bool = True, metric: str = "loss") -> list[dict[str, object]]:
    # Goal 0.2 takes 3200 steps at batch size 8 with the best learning rate.
    runs = MODEL.runs(BATCH_SIZES, LEARNING_RATES, steps=3500, every=5, slowdown=SLOWDOWN)
    rows = []
    for run in runs:
        for i in range(run.step.size):
            row: dict[str, object] = {
                "run": run.name,
                "batch_size": int(run.batch_size),
                "learning_rate": run.learning_rate,
                "step": int(run.step[i]),
                metric: float(run.metric[i]),
            }
            if b_simple and run.b_simple is not None:
                row["b_simple"] = float(run.b_simple[i])
            rows.append(row)
    return rows


def _write_csv(path: Path, rows: list[dict[str, object]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def runs_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_csv(tmp_path_factory.mktemp("fit") / "runs.csv", _rows())


def _fit_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["fit", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_gives_the_model_b_crit(runs_csv: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = _fit_json(capsys, str(runs_csv), "--goal", "0.5,0.3", "--goal", "0.2", "--ema", "0")
    assert out["kind"] == "noisescale.fit" and out["metric"] == "loss"
    assert [g["goal"] for g in out["goals"]] == [0.5, 0.3, 0.2]
    for g in out["goals"]:
        # Points every 5 steps, interpolated: S ≥ 51 steps is off by well under 1%.
        assert g["b_crit"] == pytest.approx(MODEL.b_crit(g["goal"]), rel=5e-3)
        assert g["s_min"] == pytest.approx(MODEL.s_min(g["goal"]), rel=5e-3)
        assert g["e_min"] == pytest.approx(MODEL.e_min(g["goal"]), rel=5e-3)
        assert g["b_crit_stderr"] is not None and g["b_crit_stderr"] < 0.01 * g["b_crit"]
        assert [p["batch_size"] for p in g["points"]] == BATCH_SIZES
        assert {p["learning_rate"] for p in g["points"]} == {0.1}
        # B_simple at each record stands for the 5 steps before it (a right-endpoint sum of
        # the D.1 integral): with S_min = 50 steps and B_noise growing 20 → 70 over them, the
        # error is up to ~5/50 × (70 − 20)/2 ≈ 2.5, about 5% at goal 0.5.
        assert g["b_simple"] == pytest.approx(MODEL.b_crit(g["goal"]), rel=0.05)


def test_text_output_has_a_table_per_goal(
    runs_csv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["fit", str(runs_csv), "--goal", "0.5", "--goal", "0.2", "--ema", "0"]) == 0
    text = capsys.readouterr().out
    assert text.count("B_crit = ") == 2
    values = [float(v) for v in re.findall(r"B_crit = ([0-9.e+]+) ±", text)]
    assert values == pytest.approx([MODEL.b_crit(0.5), MODEL.b_crit(0.2)], rel=5e-3)
    assert "B_simple (D.1 average)" in text
    for b in BATCH_SIZES:
        assert f"\n  {b:>10g}  " in text


def test_default_goals_span_the_achieved_range(
    runs_csv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _fit_json(capsys, str(runs_csv), "--goals", "5")
    goals = [g["goal"] for g in out["goals"]]
    assert 1 <= len(goals) <= 5
    assert goals == sorted(goals, reverse=True)
    assert all(len(g["points"]) >= 3 for g in out["goals"])


def test_jsonl_and_csv_agree(
    tmp_path: Path, runs_csv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jsonl = _write_jsonl(tmp_path / "runs.jsonl", _rows())
    a = _fit_json(capsys, str(runs_csv), "--goal", "0.2")
    b = _fit_json(capsys, str(jsonl), "--goal", "0.2")
    assert a["goals"][0]["b_crit"] == pytest.approx(b["goals"][0]["b_crit"], rel=1e-12)


def test_error_metric_and_no_b_simple(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write_csv(tmp_path / "err.csv", _rows(b_simple=False, metric="error"))
    out = _fit_json(capsys, str(path), "--metric", "error", "--goal", "0.2", "--ema", "0")
    assert out["metric"] == "error"
    assert out["goals"][0]["b_crit"] == pytest.approx(MODEL.b_crit(0.2), rel=5e-3)
    assert out["goals"][0]["b_simple"] is None
    assert main(["fit", str(path), "--goal", "0.2"]) == 2
    assert "missing column(s) loss" in capsys.readouterr().err


def test_examples_column_is_used_for_e(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Same curves, but every run reports 4% more examples (within the unit check's 5%): E_min
    # grows 4%, S_min does not. (Twice the examples was the test until 2026-12-06: now refused
    # as a unit mismatch, below.)
    rows = _rows(b_simple=False)
    for row in rows:
        row["examples"] = 1.04 * int(row["batch_size"]) * int(row["step"])  # type: ignore[call-overload]
    path = _write_csv(tmp_path / "ex.csv", rows)
    out = _fit_json(capsys, str(path), "--goal", "0.2", "--ema", "0")
    assert out["goals"][0]["s_min"] == pytest.approx(MODEL.s_min(0.2), rel=5e-3)
    assert out["goals"][0]["e_min"] == pytest.approx(1.04 * MODEL.e_min(0.2), rel=5e-3)


@pytest.mark.parametrize("factor", [128, 2, 0.5])
def test_examples_in_another_unit_than_batch_size_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], factor: float
) -> None:
    """A tokens_seen counter (128 tokens a sequence) beside batch sizes in sequences gave B_crit
    128× too large beside the batch_size column, warned about only as "an extrapolation" (a hunt,
    2026-12-06); so do examples counted twice or half (gradient accumulation, per device)."""
    rows = _rows(b_simple=False)
    for row in rows:
        row["examples"] = factor * int(row["batch_size"]) * int(row["step"])  # type: ignore[call-overload]
    path = _write_csv(tmp_path / "tokens.csv", rows)
    _fails(
        capsys,
        [str(path), "--goal", "0.2", "--ema", "0"],
        f"batch_size 8 but its examples column grows by {factor * 8:g} per step "
        f"({factor:g}× batch_size at every point): the two are in different units",
    )
    _fails(capsys, [str(path), "--ema", "0"], "give both in one unit")


def test_html_and_png_outputs(
    tmp_path: Path, runs_csv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    html_path, png_path = tmp_path / "pareto.html", tmp_path / "pareto.png"
    args = ["fit", str(runs_csv), "--goal", "0.5,0.2", "-o", str(html_path), "-o", str(png_path)]
    assert main(args) == 0
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = html_path.read_text()
    assert "<script" not in page and "src=" not in page and "href=" not in page
    svgs = [page[page.index("<svg", i) : page.index("</svg>", i) + 6] for i in _svg_starts(page)]
    assert len(svgs) == 2
    front = ET.fromstring(svgs[0])
    ns = "{http://www.w3.org/2000/svg}"
    points = [c for c in front.iter(f"{ns}circle") if c.get("class") == "point"]
    assert len(points) == 2 * len(BATCH_SIZES)
    fits = [c for c in front.iter(f"{ns}polyline") if c.get("class") == "fit"]
    assert len(fits) == 2
    crit = ET.fromstring(svgs[1])
    assert len([c for c in crit.iter(f"{ns}circle") if c.get("class") == "b-crit"]) == 2
    assert len([c for c in crit.iter(f"{ns}rect") if c.get("class") == "b-simple"]) == 2


def _svg_starts(page: str) -> list[int]:
    starts, i = [], page.find("<svg")
    while i != -1:
        starts.append(i)
        i = page.find("<svg", i + 1)
    return starts


def test_plot_data_curves_are_the_fitted_hyperbola() -> None:
    runs = MODEL.runs(BATCH_SIZES, steps=8000)
    results = critical_batch_sizes(runs, [0.5, 0.2], decay=0.0)
    data = pareto_plot_data(results)
    for g, result in zip(data["goals"], results, strict=True):
        s = np.array(g["curve"]["steps"]) / result.fit.s_min
        e = np.array(g["curve"]["examples"]) / result.fit.e_min
        np.testing.assert_allclose((s - 1) * (e - 1), 1.0, rtol=1e-9)  # eq. 2.11
        assert g["b_crit_point"] == pytest.approx((2 * result.fit.s_min, 2 * result.fit.e_min))
        assert [p["steps"] for p in g["points"]] == [p.steps for p in result.points]
    assert "<svg" in pareto_html(results, title="t")


# --- bad input: message and exit code 2 ----------------------------------------------------------


def _fails(capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    assert main(["fit", *args]) == 2
    err = capsys.readouterr().err
    assert "noisescale fit: error:" in err and message in err, err


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(capsys, [str(tmp_path / "nope.csv")], "no such runs file")


def test_empty_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty.csv").write_text("")
    _fails(capsys, [str(tmp_path / "empty.csv")], "is empty")
    (tmp_path / "header.csv").write_text("run,batch_size,learning_rate,step,loss\n")
    _fails(capsys, [str(tmp_path / "header.csv")], "no rows")


def test_missing_columns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "cols.csv").write_text("run,batch_size,step,loss\na,8,1,0.5\n")
    _fails(capsys, [str(tmp_path / "cols.csv")], "missing column(s) learning_rate")


def test_non_numeric_value(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad.csv").write_text(
        "run,batch_size,learning_rate,step,loss\na,8,0.1,1,0.5\na,8,0.1,2,low\n"
    )
    _fails(capsys, [str(tmp_path / "bad.csv")], "line 3: loss is not a number: 'low'")
    (tmp_path / "bad.jsonl").write_text(
        '{"run": "a", "batch_size": "eight", "learning_rate": 0.1, "step": 1, "loss": 0.5}\n'
    )
    _fails(capsys, [str(tmp_path / "bad.jsonl")], "line 1: batch_size is not a number")


def test_a_learning_rate_not_positive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A learning rate of 0 or below was accepted until 2026-12-05 ("best lr 0", exit 0; a
    hunt), where a batch size of -8 exited 2."""
    for lr in ("0", "-0.1"):
        (tmp_path / "lr.csv").write_text(
            f"run,batch_size,learning_rate,step,loss\na,8,{lr},1,0.5\na,8,{lr},2,0.4\n"
        )
        _fails(capsys, [str(tmp_path / "lr.csv")], "learning_rate must be a positive number")


def test_goal_no_run_reaches(runs_csv: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(capsys, [str(runs_csv), "--goal", "1e-6"], "no run reaches the goal 1e-06")


def test_fewer_than_three_batch_sizes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [r for r in _rows() if r["batch_size"] in (8, 32)]
    path = _write_csv(tmp_path / "two.csv", rows)
    _fails(capsys, [str(path)], "needs at least 3")
    _fails(capsys, [str(path), "--goal", "0.5"], "only 2 batch size(s) reach the goal 0.5")


def test_bad_options(runs_csv: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(capsys, [str(runs_csv), "-o", "pareto.pdf"], "must end in .png, .html or .htm")
    _fails(capsys, [str(runs_csv), "--ema", "1.5"], "argument --ema: must be in [0, 1)")
    _fails(capsys, [str(runs_csv), "--goal", "x"], "--goal 'x' is not a number")


def test_inconsistent_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "mixed.csv").write_text(
        "run,batch_size,learning_rate,step,loss\na,8,0.1,1,0.5\na,16,0.1,2,0.4\n"
    )
    _fails(capsys, [str(tmp_path / "mixed.csv")], "run 'a' changes batch_size")


def test_nan_loss_is_a_divergence_not_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = _rows(b_simple=False)
    # The lr=0.3 runs blow up at step 20: they drop out of later goals, the fit is unchanged.
    for row in rows:
        if row["learning_rate"] == 0.3 and int(row["step"]) >= 20:  # type: ignore[call-overload]
            row["loss"] = math.nan
    path = _write_csv(tmp_path / "nan.csv", rows)
    out = _fit_json(capsys, str(path), "--goal", "0.2", "--ema", "0")
    assert out["goals"][0]["b_crit"] == pytest.approx(MODEL.b_crit(0.2), rel=5e-3)


def test_a_figure_written_by_another_job_meanwhile_is_not_replaced_without_force(
    tmp_path: Path,
    runs_csv: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """-o is checked before the fit; a file another job creates there before the write is
    kept (until 2026-12-05 it was replaced without --force) and the figure saved beside it."""
    from noisescale.sweep import plot

    out = tmp_path / "pareto.html"
    real = plot.pareto_html

    def another_job_writes_it(*args: object, **kwargs: object) -> str:
        out.write_text("written by another job")
        return real(*args, **kwargs)

    monkeypatch.setattr(plot, "pareto_html", another_job_writes_it)
    monkeypatch.chdir(tmp_path)  # (where the figure is saved instead)
    args = ["fit", str(runs_csv), "--goal", "0.5", "-o", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert out.read_text() == "written by another job"
    assert "is not replaced without --force" in err
    (rescued,) = tmp_path.glob("noisescale-pareto-*.html")
    assert "<svg" in rescued.read_text()
    rescued.unlink()
    assert main([*args, "--force"]) == 0
    assert "<svg" in out.read_text()


def _front_csv(path: Path, batch_sizes: list[float], steps: list[float]) -> Path:
    """One run per batch size whose loss falls linearly to 0.5 at exactly ``steps`` (a record
    there): the goal 0.5 gives that front with no interpolation error."""
    rows = []
    for b, s in zip(batch_sizes, steps, strict=True):
        for t in [*np.linspace(s / 10, s * 1.5, 16).tolist(), s]:
            rows.append(
                {"run": f"b{b:g}", "batch_size": b, "learning_rate": 0.1, "step": t,
                 "loss": 1.0 - 0.5 * t / s}
            )  # fmt: skip
    return _write_csv(path, rows)


def test_a_fit_at_the_edge_of_the_search_prints_its_interval_not_the_edge(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Truth B_crit 76 inside 64-256, scatter σ 0.2 (hunt/bound.py's seed 59): the best fit is at
    # the search's lower edge, 0.0064, which `fit` printed as "B_crit < 0.0064" blaming the
    # batch sizes. The F test's interval over those three points is unbounded both ways.
    path = _front_csv(tmp_path / "edge.csv", [64, 128, 256], [178.85, 219.58, 190.47])
    assert main(["fit", str(path), "--goal", "0.5", "--ema", "0"]) == 0
    out = capsys.readouterr().out
    assert "B_crit = not identified (95% interval (0, ∞))" in out
    assert "< 0.0064" not in out and "far above it" not in out
    assert "the fit reached the lower edge of its search" in out and "scatter" in out
    (goal,) = _fit_json(capsys, str(path), "--goal", "0.5", "--ema", "0")["goals"]
    assert goal["b_crit_at_bound"] == "lower"
    assert (goal["b_crit_low"], goal["b_crit_high"]) == (0.0, None)
    # Steps that do not fall at all over 16-1024, with little scatter: the interval's upper end
    # is below every batch size, and only then is the grid named as the cause.
    b = [16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0]
    flat = 100.0 * np.exp(0.01 * np.random.default_rng(0).standard_normal(len(b)))
    path = _front_csv(tmp_path / "flat.csv", b, flat.tolist())
    (goal,) = _fit_json(capsys, str(path), "--goal", "0.5", "--ema", "0")["goals"]
    assert goal["b_crit_at_bound"] == "lower" and goal["b_crit_low"] == 0.0
    assert goal["b_crit_high"] < 16
    assert any("below every batch size measured" in w for w in goal["warnings"])


def test_a_front_that_identifies_b_crit_poorly_has_an_unbounded_end_not_a_crash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A noisy 3-point front fitted just inside the search range, SE(ln B_crit) ≈ 200
    # (hunt/overflow.py's seed 229):
    # exp(t·SE) raised OverflowError ("noisescale fit: error: OverflowError: math range error").
    path = _front_csv(tmp_path / "noisy.csv", [64, 128, 256], [10350.063, 6169.3197, 2682.2120])
    assert main(["fit", str(path), "--goal", "0.5", "--ema", "0", "--json"]) == 0
    (goal,) = json.loads(capsys.readouterr().out)["goals"]
    assert goal["b_crit_at_bound"] is None and goal["log_b_crit_stderr"] > 10
    assert (goal["b_crit_low"], goal["b_crit_high"]) == (0.0, None)  # unbounded both ways
    assert any("extrapolation (95% interval (0, ∞))" in w for w in goal["warnings"])


def test_figures_draw_the_profile_interval_and_no_point_at_the_search_edge(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The table said "not identified (95% interval (0, ∞))" but the SVG's hover read "B_crit =
    # 0.0064", the dot and the × sat at the search's edge, and a poorly identified fit had a bar of
    # ±4.4e7 on 2.15e5 (± SE, not the interval; a review, 2026-12-07).
    edge = _front_csv(tmp_path / "edge.csv", [64, 128, 256], [178.85, 219.58, 190.47])
    noisy = _front_csv(tmp_path / "noisy.csv", [64, 128, 256], [10350.063, 6169.3197, 2682.2120])
    for path, at_bound in ((edge, "lower"), (noisy, None)):
        (result,) = critical_batch_sizes(read_runs(path), [0.5], decay=0.0)
        (g,) = pareto_plot_data([result])["goals"]
        assert g["b_crit_at_bound"] == at_bound
        assert g["b_crit_interval"] == (0.0, math.inf)
        if at_bound:
            assert g["b_crit"] is None and g["b_crit_point"] is None
        page = tmp_path / "page.html"
        argv = ["fit", str(path), "--goal", "0.5", "--ema", "0", "-o", str(page), "--force"]
        assert main(argv) == 0
        capsys.readouterr()
        svg = page.read_text()[page.read_text().rindex("<svg") :]
        crit = ET.fromstring(svg[: svg.index("</svg>") + 6])
        ns = "{http://www.w3.org/2000/svg}"
        dots = [c for c in crit.iter(f"{ns}circle") if c.get("class") == "b-crit"]
        assert len(dots) == (0 if at_bound else 1)
        ends = [c.get("class") for c in crit.iter(f"{ns}path")]
        assert ends == ["open-end", "open-end"]  # (0, ∞): open both ways, no cap
        titles = [t.text for t in crit.iter(f"{ns}title")]
        assert titles and all("(0, ∞)" in t for t in titles if "B_crit" in t)
        assert "0.0064" not in page.read_text()
    # A bounded interval: its ends, not ± SE, capped.
    wide = _front_csv(
        tmp_path / "wide.csv", [64, 128, 256, 512], [346.132, 235.786, 163.922, 113.499]
    )
    (result,) = critical_batch_sizes(read_runs(wide), [0.5], decay=0.0)
    (g,) = pareto_plot_data([result])["goals"]
    assert g["b_crit_interval"] == result.fit.b_crit_interval(0.95)
    crit = ET.fromstring(re.findall(r"<svg.*?</svg>", pareto_html([result]), re.S)[1])
    assert [c.get("class") for c in crit.iter(f"{ns}path")] == ["cap", "cap"]


def test_an_interval_beyond_the_batch_sizes_is_warned_about(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # B_crit 212 inside 64-512, its 95% interval [82, 582] past the largest: the front does not
    # pin it down there (the point alone drew no warning).
    b = [64.0, 128.0, 256.0, 512.0]
    path = _front_csv(tmp_path / "wide.csv", b, [346.132, 235.786, 163.922, 113.499])
    (goal,) = _fit_json(capsys, str(path), "--goal", "0.5", "--ema", "0")["goals"]
    assert 64 < goal["b_crit_low"] < goal["b_crit"] < 512 < goal["b_crit_high"]
    (warning,) = goal["warnings"]
    assert "reaches beyond the batch sizes measured (64–512)" in warning
