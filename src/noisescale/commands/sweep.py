"""``noisescale sweep``: run a batch-size × learning-rate grid of your training function.

Examples::

    noisescale sweep train:run --batch-sizes 16,32,64,128 --learning-rates 0.01,0.03,0.1
    noisescale sweep examples/sweep_train.py:train --batch-sizes 8,32,128,512 \\
        --learning-rates 0.1,0.2,0.4 --steps 2000 --study linreg
    noisescale fit sqlite:///sweep.db --study linreg -o pareto.html

The function is called as ``fn(batch_size=B, learning_rate=lr, reporter=reporter)`` (plus
``steps=N`` with ``--steps``) and calls ``reporter.report(step, loss, examples=None,
b_simple=None, **extra)`` as it trains. Every run's curve goes into an Optuna study (SQLite file
``sweep.db`` by default); running the command again skips the finished runs and reruns the
failed or interrupted ones.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import traceback

from noisescale.errors import NoiseScaleInputError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sweep",
        help="run a grid of batch sizes × learning rates and store the curves (Optuna)",
        description="Run MODULE:FUNCTION at every batch size × learning rate, storing each "
        "run's loss curve (and B_simple, if reported) as one trial of an Optuna study. "
        "Finished runs are skipped on the next invocation; failed or interrupted ones rerun. "
        "Then `noisescale fit STORAGE --study NAME` gives the critical batch size.",
    )
    parser.add_argument(
        "function",
        metavar="MODULE:FUNCTION",
        help="the training function, as an importable module (train:run) or a file "
        "(path/to/train.py:run)",
    )
    parser.add_argument(
        "--batch-sizes", required=True, metavar="B,B,...", help="comma-separated batch sizes"
    )
    parser.add_argument(
        "--learning-rates",
        required=True,
        metavar="LR,LR,...",
        help="comma-separated learning rates (every batch size runs all of them)",
    )
    # The defaults live in noisescale.sweep.study, which imports NumPy: filled in by run().
    parser.add_argument(
        "--storage",
        metavar="URL",
        help="an Optuna storage URL (default sqlite:///sweep.db, in the current directory)",
    )
    parser.add_argument("--study", metavar="NAME", help="the study name (default noisescale-sweep)")
    parser.add_argument("--steps", type=int, metavar="N", help="passed to the function as steps=N")
    parser.add_argument(
        "--keep-going",
        action="store_true",
        help="when a run raises, record it as failed and go on with the rest of the grid",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print a JSON summary of the grid")
    parser.add_argument("--verbose", action="store_true", help="let Optuna log")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import optuna
    except ImportError:
        raise NoiseScaleInputError(
            "noisescale sweep needs Optuna and tqdm: pip install 'noisescale[sweep]'"
        ) from None

    from noisescale.sweep.study import (
        DEFAULT_STORAGE,
        DEFAULT_STUDY,
        SweepRunError,
        load_train_function,
        run_sweep,
    )

    optuna.logging.set_verbosity(optuna.logging.INFO if args.verbose else optuna.logging.WARNING)
    batch_sizes = [_positive_int(v) for v in _items(args.batch_sizes, "--batch-sizes")]
    learning_rates = [_positive_float(v) for v in _items(args.learning_rates, "--learning-rates")]
    if args.steps is not None and args.steps < 1:
        raise NoiseScaleInputError("--steps must be at least 1")
    train = load_train_function(args.function)
    try:
        summary = run_sweep(
            train,
            batch_sizes,
            learning_rates,
            storage=args.storage or DEFAULT_STORAGE,
            study_name=args.study or DEFAULT_STUDY,
            steps=args.steps,
            keep_going=args.keep_going,
            progress=not args.no_progress,
        )
    except SweepRunError as err:
        traceback.print_exception(err.__cause__, file=sys.stderr)
        print(
            f"noisescale sweep: {err}. It is stored as failed, with what it reported; run the "
            "same command again to continue (finished runs are skipped).",
            file=sys.stderr,
        )
        return 1
    if args.json:
        print(json.dumps(summary.as_dict(), indent=2))
    else:
        print(
            f"study {summary.study_name!r} in {summary.storage}: {summary.ran} run(s) now, "
            f"{summary.skipped} already done, {summary.failed} failed"
        )
        print(f"  {'batch_size':>10}  {'lr':>10}  {'state':>8}  {'final loss':>12}  records")
        for p in summary.points:
            loss = "" if p.final_loss is None else f"{p.final_loss:.5g}"
            print(
                f"  {p.batch_size:>10}  {p.learning_rate:>10.4g}  {p.state:>8}  {loss:>12}  "
                f"{p.records}"
            )
        print(f"next: noisescale fit {summary.storage} --study {summary.study_name}")
    return 1 if summary.failed else 0


def _items(text: str, flag: str) -> list[str]:
    items = [v.strip() for v in text.split(",") if v.strip()]
    if not items:
        raise NoiseScaleInputError(f"{flag}: give a comma-separated list")
    return items


def _positive_int(text: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise NoiseScaleInputError(f"--batch-sizes: {text!r} is not a number") from None
    if not (math.isfinite(value) and value >= 1 and value.is_integer()):
        raise NoiseScaleInputError(f"--batch-sizes: {text!r} is not a positive integer")
    return int(value)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise NoiseScaleInputError(f"--learning-rates: {text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise NoiseScaleInputError(f"--learning-rates: {text!r} is not a positive number")
    return value
