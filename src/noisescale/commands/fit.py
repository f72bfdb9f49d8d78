"""``noisescale fit``: the critical batch size from a grid of training runs (eq. 2.11, App. A.3).

Examples::

    noisescale fit runs.csv
    noisescale fit runs.jsonl --goal 0.5 --goal 0.3 --ema 0.95 --json
    noisescale fit runs.csv --metric error -o pareto.html -o pareto.png
    noisescale fit sqlite:///sweep.db --study my-sweep       # a study written by noisescale sweep
    noisescale fit sweep.db --study 'lr-*' --study baseline  # several studies, or a pattern
    NOISESCALE_STORAGE=postgresql+psycopg2://... noisescale fit --study my-sweep

RUNS is a CSV or JSON Lines file with one row per recorded step and the columns ``run,
batch_size, learning_rate, step, loss`` (or ``error`` with ``--metric error``), optionally
``examples`` (cumulative, for runs whose batch size changes) and ``b_simple``; or a database URL
(or SQLite file) holding ``noisescale sweep`` studies. Without RUNS the database comes from
``--storage-file`` or the environment variable ``NOISESCALE_STORAGE``; passwords are masked in
every message, in ``--json`` and on the page.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from noisescale.commands import _args
from noisescale.errors import NoiseScaleInputError
from noisescale.report.text import display_path
from noisescale.sweep.storage import StorageURL, sqlite_file

#: Goals picked when none are given.
DEFAULT_GOAL_COUNT = 6
#: EMA decay over recorded points unless ``--ema`` says otherwise.
DEFAULT_EMA = 0.9
#: More goals than this is a typo, not a plot.
MAX_GOALS = 1000


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
        nargs="?",
        help="CSV or JSON Lines file of runs, or a database URL / SQLite file of sweep studies "
        "(default: --storage-file, else $NOISESCALE_STORAGE)",
    )
    parser.add_argument(
        "--storage-file",
        metavar="FILE",
        help="read the database URL from the first line of FILE (keeps a password off the "
        "command line)",
    )
    parser.add_argument(
        "--study",
        action="append",
        metavar="NAME",
        help="a study to read from the database, or a pattern such as 'sweep-*'; repeatable "
        "(default: the only one there)",
    )
    parser.add_argument(
        "--goal",
        action="append",
        metavar="G",
        help="a loss/error level to fit at; repeat or give a comma-separated list",
    )
    parser.add_argument(
        "--goals",
        type=_args.positive_int,
        default=DEFAULT_GOAL_COUNT,
        metavar="N",
        help=f"how many goals to pick when --goal is not given (default {DEFAULT_GOAL_COUNT})",
    )
    parser.add_argument(
        "--ema",
        type=_args.decay,
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
    _args.add_force(parser)
    parser.add_argument("--verbose", action="store_true", help="let Optuna log when reading")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from noisescale.sweep.pareto import critical_batch_sizes, default_goals
    from noisescale.sweep.runs import duplicate_settings, read_runs

    if args.goals > MAX_GOALS:
        raise NoiseScaleInputError(f"--goals must be at most {MAX_GOALS}, got {args.goals}")
    goals = _parse_goals(args.goal) if args.goal else None
    source = _source(args)
    inputs = [] if source.storage is not None else [source.path]
    if source.storage is not None and (sqlite := sqlite_file(source.storage.url)) is not None:
        inputs.append(str(sqlite))
    outputs = []
    for output in args.output:
        path = _args.check_output_file(
            output,
            flag="-o",
            force=args.force,
            suffixes=(".png", ".html", ".htm"),
            inputs=inputs,
        )
        if path.suffix.lower() == ".png" and importlib.util.find_spec("matplotlib") is None:
            raise NoiseScaleInputError(
                "a PNG needs matplotlib: pip install 'noisescale[plot]' (or write .html)"
            )
        if path in outputs:
            raise NoiseScaleInputError(f"-o {output} is given twice")
        outputs.append(path)
    if args.study and source.storage is None:
        raise NoiseScaleInputError(
            f"--study reads a database, but {source.shown} is a runs file; drop --study"
        )
    studies: list[str] | None = None
    if source.storage is None:
        runs = read_runs(source.path, metric=args.metric)
    else:
        from noisescale.sweep.study import read_study_runs_and_unfinished, select_studies

        _quiet_optuna(args.verbose)
        studies = select_studies(source.storage.url, args.study)
        # One read: a point that completes while workers write is a run or named unfinished.
        runs, unfinished = read_study_runs_and_unfinished(
            source.storage.url, studies, metric=args.metric
        )
    if goals is None:
        goals = default_goals(runs, decay=args.ema, count=args.goals)
    results = critical_batch_sizes(runs, goals, decay=args.ema)
    notes = [_duplicates_note(duplicate_settings(runs))] if duplicate_settings(runs) else []
    if source.storage is not None and unfinished:
        notes.append(_unfinished_note(unfinished))
    for note in notes:
        print(f"noisescale fit: warning: {note}", file=sys.stderr)
    from noisescale.sweep import plot

    for path in outputs:
        if path.suffix.lower() == ".png":
            data: bytes | str = plot.pareto_png(results, metric=args.metric)
        else:
            title = f"Critical batch size: {source.title}"
            data = plot.pareto_html(results, metric=args.metric, title=title)
        _args.write_or_rescue(path, data, what="the Pareto figure", replace=args.force)
    if args.json:
        payload: dict[str, Any] = {
            "kind": "noisescale.fit",
            "version": 1,
            "source": source.shown,
            "studies": studies,
            "metric": args.metric,
            "ema_decay": args.ema,
            "runs": len(runs),
            "duplicates": [
                {"batch_size": b, "learning_rate": lr, "runs": names}
                for b, lr, names in duplicate_settings(runs)
            ],
            "goals": [r.as_dict() for r in results],
        }
        if source.storage is not None:
            payload["unfinished_points"] = unfinished
        print(json.dumps(payload, indent=2, allow_nan=False))
    else:
        print(_text(results, runs_count=len(runs), metric=args.metric, decay=args.ema))
        for path in outputs:
            print(f"wrote {path}")
    return 0


def _unfinished_note(points: list[str]) -> str:
    shown = "; ".join(points[:8]) + (f"; and {len(points) - 8} more" if len(points) > 8 else "")
    return (
        f"{len(points)} grid point(s) have no finished run and are left out: {shown}. The "
        "fastest run at those batch sizes may then come from a slower learning rate: run the "
        "sweep again to finish them (failed points rerun) before trusting B_crit"
    )


@dataclass(frozen=True)
class _Source:
    """Where the runs come from: a file (``path``) or a database (``storage``)."""

    path: str
    storage: StorageURL | None

    @property
    def shown(self) -> str:
        return self.storage.shown if self.storage is not None else self.path

    @property
    def title(self) -> str:
        if self.storage is None:
            return display_path(self.path)
        file = sqlite_file(self.storage.url)
        return display_path(file) if file is not None else self.storage.shown


def _source(args: argparse.Namespace) -> _Source:
    from noisescale.sweep.storage import resolve_storage_url

    if args.runs is not None and args.storage_file is not None:
        raise NoiseScaleInputError("give RUNS or --storage-file, not both")
    if args.runs is None:
        return _Source("", resolve_storage_url(None, args.storage_file, default=None))
    if "://" in args.runs:
        return _Source(args.runs, resolve_storage_url(args.runs))
    path = Path(args.runs)
    if path.is_file():
        with path.open("rb") as f:
            if f.read(16) == b"SQLite format 3\x00":
                return _Source(args.runs, resolve_storage_url(f"sqlite:///{path}"))
    return _Source(args.runs, None)


def _duplicates_note(duplicates: list[tuple[float, float, list[str]]]) -> str:
    shown = "; ".join(
        f"batch_size={b:g}, learning_rate={lr:g}: {', '.join(names)}"
        for b, lr, names in duplicates[:5]
    )
    more = f"; and {len(duplicates) - 5} more" if len(duplicates) > 5 else ""
    return (
        f"{len(duplicates)} setting(s) have more than one run ({shown}{more}). The fastest run "
        "of each counts at every goal, which biases S low: expected with seeds, a mistake if a "
        "sweep ran a point twice or the studies overlap"
    )


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
        head = (
            f"\ngoal {metric} ≤ {result.goal:.6g}:  B_crit = {fit.b_crit_text(0.95)}   "
            f"S_min = {fit.min_text('s_min')}   E_min = {fit.min_text('e_min')}"
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
