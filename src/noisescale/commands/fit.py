"""``noisescale fit``: the critical batch size from a grid of training runs (eq. 2.11, App. A.3).

Examples::

    noisescale fit runs.csv
    noisescale fit runs.jsonl --goal 0.5 --goal 0.3 --ema 0.95 --json
    noisescale fit runs.csv --metric error -o pareto.html -o pareto.png
    noisescale fit sqlite:///sweep.db --study my-sweep       # a study written by noisescale sweep

RUNS is a CSV or JSON Lines file with one row per recorded step and the columns ``run,
batch_size, learning_rate, step, loss`` (or ``error`` with ``--metric error``), optionally
``examples`` (cumulative, for runs whose batch size changes) and ``b_simple``; or a database URL
(or SQLite file) holding a ``noisescale sweep`` study.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
from pathlib import Path
from typing import Any

from noisescale.errors import NoiseScaleInputError

#: Goals picked when none are given.
DEFAULT_GOAL_COUNT = 6
#: EMA decay over recorded points unless ``--ema`` says otherwise.
DEFAULT_EMA = 0.9


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "fit",
        help="critical batch size B_crit from runs at several batch sizes and learning rates",
        description="For each goal (a loss or error level), find the step at which each run's "
        "EMA-smoothed curve first reaches it, keep the fastest learning rate per batch size "
        "(the Pareto front), fit S/S_min − 1 = (E/E_min − 1)^-1 (eq. 2.11) in log space and "
        "report B_crit = E_min/S_min (eq. 2.12) with its standard error (paper App. A.3). With "
        "a b_simple column, also B_simple averaged over training up to the goal (App. D.1).",
        epilog="RUNS columns: run, batch_size, learning_rate, step, loss|error [, examples] "
        "[, b_simple]. Without --goal, goals are spread geometrically between the worst and "
        "best final smoothed values, keeping those three or more batch sizes reach.",
    )
    parser.add_argument(
        "runs",
        metavar="RUNS",
        help="CSV or JSON Lines file of runs, or a database URL / SQLite file of a sweep study",
    )
    parser.add_argument(
        "--study",
        metavar="NAME",
        help="the study to read when RUNS is a database (default: the only one there)",
    )
    parser.add_argument(
        "--goal",
        action="append",
        metavar="G",
        help="a loss/error level to fit at; repeat or give a comma-separated list",
    )
    parser.add_argument(
        "--goals",
        type=int,
        default=DEFAULT_GOAL_COUNT,
        metavar="N",
        help=f"how many goals to pick when --goal is not given (default {DEFAULT_GOAL_COUNT})",
    )
    parser.add_argument(
        "--ema",
        type=float,
        default=DEFAULT_EMA,
        metavar="DECAY",
        help="decay of the bias-corrected EMA that smooths each curve before looking for a goal, "
        f"per recorded point, in [0, 1); 0 = no smoothing (default {DEFAULT_EMA})",
    )
    parser.add_argument(
        "--metric",
        choices=("loss", "error"),
        default="loss",
        help="the column to read goals against (lower is better; default loss)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument(
        "-o",
        "--output",
        action="append",
        default=[],
        metavar="FILE",
        help="write the Pareto-front figure: .png (matplotlib) or .html (self-contained); "
        "may be repeated",
    )
    parser.add_argument("--verbose", action="store_true", help="let Optuna log when reading")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from noisescale.sweep.pareto import critical_batch_sizes, default_goals
    from noisescale.sweep.runs import read_runs

    for output in args.output:
        suffix = Path(output).suffix.lower()
        if suffix not in (".png", ".html", ".htm"):
            raise NoiseScaleInputError(f"--output {output}: use a .png or .html file name")
        if suffix == ".png" and importlib.util.find_spec("matplotlib") is None:
            raise NoiseScaleInputError(
                "a PNG needs matplotlib: pip install 'noisescale[plot]' (or write .html)"
            )
    if not 0.0 <= args.ema < 1.0:
        raise NoiseScaleInputError(f"--ema must be in [0, 1), got {args.ema}")
    if args.goals < 1:
        raise NoiseScaleInputError("--goals must be at least 1")
    storage = _storage_url(args.runs)
    if storage is None:
        runs = read_runs(args.runs, metric=args.metric)
    else:
        from noisescale.sweep.study import read_study_runs

        _quiet_optuna(args.verbose)
        runs = read_study_runs(storage, args.study, metric=args.metric)
    if args.goal:
        goals = _parse_goals(args.goal)
    else:
        goals = default_goals(runs, decay=args.ema, count=args.goals)
    results = critical_batch_sizes(runs, goals, decay=args.ema)
    for output in args.output:
        from noisescale.sweep import plot

        if Path(output).suffix.lower() == ".png":
            plot.write_pareto_png(results, output, metric=args.metric)
        else:
            plot.write_pareto_html(
                results, output, metric=args.metric, title=f"Critical batch size: {args.runs}"
            )
    if args.json:
        payload: dict[str, Any] = {
            "kind": "noisescale.fit",
            "version": 1,
            "source": args.runs,
            "metric": args.metric,
            "ema_decay": args.ema,
            "runs": len(runs),
            "goals": [r.as_dict() for r in results],
        }
        print(json.dumps(payload, indent=2, allow_nan=False))
    else:
        print(_text(results, runs_count=len(runs), metric=args.metric, decay=args.ema))
        for output in args.output:
            print(f"wrote {output}")
    return 0


def _storage_url(runs: str) -> str | None:
    """A database URL for RUNS when it is one (or an SQLite file), else ``None``."""
    if "://" in runs:
        return runs
    path = Path(runs)
    if path.is_file():
        with path.open("rb") as f:
            if f.read(16) == b"SQLite format 3\x00":
                return f"sqlite:///{path}"
    return None


def _quiet_optuna(verbose: bool) -> None:
    try:
        import optuna
    except ImportError:
        raise NoiseScaleInputError(
            "reading a sweep study needs Optuna: pip install 'noisescale[sweep]'"
        ) from None

    optuna.logging.set_verbosity(optuna.logging.INFO if verbose else optuna.logging.WARNING)


def _parse_goals(values: list[str]) -> list[float]:
    goals = []
    for value in values:
        for item in value.split(","):
            try:
                goal = float(item)
            except ValueError:
                raise NoiseScaleInputError(f"--goal {item!r} is not a number") from None
            if not math.isfinite(goal):
                raise NoiseScaleInputError(f"--goal {item!r} is not finite")
            goals.append(goal)
    return goals


def _text(results: list[Any], *, runs_count: int, metric: str, decay: float) -> str:
    lines = [
        f"{runs_count} runs; goals on the {metric}, smoothed by an EMA with decay {decay:g}; "
        "fit of S/S_min − 1 = (E/E_min − 1)^-1 (eq. 2.11) in log space"
    ]
    for result in results:
        fit = result.fit
        if fit.at_bound == "lower":
            b_crit = f"< {fit.b_crit:.3g}"
        elif fit.at_bound == "upper":
            b_crit = f"> {fit.b_crit:.3g}"
        else:
            b_crit = f"{fit.b_crit:.4g} ± {fit.b_crit_stderr:.2g}"
        head = (
            f"\ngoal {metric} ≤ {result.goal:.6g}:  B_crit = {b_crit}   "
            f"S_min = {fit.s_min:.4g} ± {fit.s_min_stderr:.2g}   "
            f"E_min = {fit.e_min:.4g} ± {fit.e_min_stderr:.2g}"
        )
        if result.b_simple is not None:
            head += f"   B_simple (D.1 average) = {result.b_simple:.4g}"
        lines.append(head)
        has_b_simple = any(p.b_simple is not None for p in result.points)
        header = f"  {'batch_size':>10}  {'best lr':>10}  {'steps S':>10}  {'examples E':>12}"
        header += f"  {'S fit':>10}"
        if has_b_simple:
            header += f"  {'B_simple':>10}"
        lines.append(header)
        for p in result.points:
            row = (
                f"  {p.batch_size:>10g}  {p.learning_rate:>10.4g}  {p.steps:>10.5g}  "
                f"{p.examples:>12.5g}  {fit.steps(p.examples / p.steps):>10.5g}"
            )
            if has_b_simple:
                row += f"  {'' if p.b_simple is None else f'{p.b_simple:.4g}':>10}"
            lines.append(row)
        lines.append(f"  residual spread of log S: {fit.residual_std:.3g}")
        lines.extend(f"  warning: {w}" for w in result.warnings)
    return "\n".join(lines)
