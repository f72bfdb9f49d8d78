"""``noisescale sweep``: run a batch-size × learning-rate grid of your training function.

Examples::

    noisescale sweep examples/sweep_train.py:train --batch-sizes 8,32,128,512 \\
        --learning-rates 0.1,0.2,0.4 --steps 2000 --study linreg
    noisescale fit sqlite:///sweep.db --study linreg -o pareto.html

    # several machines, one PostgreSQL database; the URL stays off the command line:
    export NOISESCALE_STORAGE=postgresql+psycopg2://alice:PASSWORD@db-host/sweeps
    noisescale sweep train.py:run --batch-sizes 16,32,64,128 --learning-rates 0.01,0.03,0.1

The function is called as ``fn(batch_size=B, learning_rate=lr, reporter=reporter)`` (plus
``steps=N`` with ``--steps``) and calls ``reporter.report(step, loss, examples=None,
b_simple=None, **extra)`` as it trains. Every run's curve goes into an Optuna study (SQLite file
``sweep.db`` by default). Start the same command on as many machines as you like: each grid
point is run once; a killed worker's point is rerun by another after its heartbeat has been
silent for the grace period. Running the command again skips the finished runs and reruns the
failed or interrupted ones.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import traceback
from typing import Any

from noisescale.commands import _args
from noisescale.errors import NoiseScaleInputError
from noisescale.sweep.queue import DEFAULT_HEARTBEAT_S, DEFAULT_MAX_RETRIES
from noisescale.sweep.storage import STORAGE_ENV

#: Heartbeats further apart than this leave a dead worker's point unclaimed for too long.
MAX_HEARTBEAT_S = 3600


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sweep",
        help="run a grid of batch sizes × learning rates and store the curves (Optuna)",
        description="Run MODULE:FUNCTION at every batch size × learning rate, storing each "
        "run's loss curve (and B_simple, if reported) as one trial of an Optuna study. Any "
        "number of workers (on one or several machines) may run the same command on one "
        "database: each grid point runs once. Finished runs are skipped on the next invocation; "
        "failed or interrupted ones rerun. Then `noisescale fit STORAGE --study NAME` gives the "
        "critical batch size.",
        epilog=f"STORAGE: --storage URL, else --storage-file FILE (URL on its first line), else "
        f"the environment variable {STORAGE_ENV}, else sqlite:///sweep.db. Passwords are "
        "masked in every message.",
    )
    parser.add_argument(
        "function",
        metavar="MODULE:FUNCTION",
        help="the training function, as an importable module (train:run) or a file "
        "(path/to/train.py:run)",
    )
    parser.add_argument(
        "--batch-sizes",
        required=True,
        type=_args.positive_int_list,
        metavar="B,B,...",
        help="comma-separated batch sizes, each once",
    )
    parser.add_argument(
        "--learning-rates",
        required=True,
        type=_args.positive_float_list,
        metavar="LR,LR,...",
        help="comma-separated learning rates, each once (every batch size runs all of them)",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--storage",
        metavar="URL",
        help=f"an Optuna storage URL (default: ${STORAGE_ENV}, else sqlite:///sweep.db in the "
        "current directory)",
    )
    where.add_argument(
        "--storage-file",
        metavar="FILE",
        help="read the storage URL from the first line of FILE (keeps a password off the "
        "command line)",
    )
    parser.add_argument("--study", metavar="NAME", help="the study name (default noisescale-sweep)")
    parser.add_argument(
        "--steps", type=_args.positive_int, metavar="N", help="passed to the function as steps=N"
    )
    parser.add_argument(
        "--keep-going",
        action="store_true",
        help="when a run raises, record it as failed and go on with the rest of the grid",
    )
    parser.add_argument(
        "--heartbeat",
        type=_args.positive_int,
        default=DEFAULT_HEARTBEAT_S,
        metavar="SECONDS",
        help=f"seconds between a running point's heartbeats (default {DEFAULT_HEARTBEAT_S})",
    )
    parser.add_argument(
        "--grace",
        type=_args.positive_int,
        metavar="SECONDS",
        help="seconds without a heartbeat after which a running point's worker counts as dead "
        "and the point is rerun (default: three heartbeats)",
    )
    parser.add_argument(
        "--max-retries",
        type=_args.nonnegative_int,
        default=DEFAULT_MAX_RETRIES,
        metavar="N",
        help=f"reruns of a point whose worker died (default {DEFAULT_MAX_RETRIES})",
    )
    parser.add_argument(
        "--no-wait",
        action="store_true",
        help="return when nothing is left to claim, instead of waiting for the points other "
        "workers are running",
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

    from noisescale.sweep.storage import resolve_storage_url
    from noisescale.sweep.study import (
        DEFAULT_STUDY,
        SweepRunError,
        load_train_function,
        run_sweep,
    )

    if args.heartbeat > MAX_HEARTBEAT_S:
        raise NoiseScaleInputError(
            f"--heartbeat must be at most {MAX_HEARTBEAT_S} s, got {args.heartbeat}"
        )
    if args.grace is not None and args.grace <= args.heartbeat:
        raise NoiseScaleInputError(
            f"--grace ({args.grace} s) must exceed --heartbeat ({args.heartbeat} s): a live "
            "worker would otherwise look dead between two heartbeats"
        )
    study = args.study if args.study is not None else DEFAULT_STUDY
    if not study.strip():
        raise NoiseScaleInputError("--study must not be empty")
    storage = resolve_storage_url(args.storage, args.storage_file)
    optuna.logging.set_verbosity(optuna.logging.INFO if args.verbose else optuna.logging.WARNING)
    train = load_train_function(args.function)
    try:
        summary = run_sweep(
            train,
            args.batch_sizes,
            args.learning_rates,
            storage=storage.url,
            study_name=study,
            steps=args.steps,
            keep_going=args.keep_going,
            progress=not args.no_progress,
            heartbeat_interval=args.heartbeat,
            grace_period=args.grace,
            max_retries=args.max_retries,
            wait=not args.no_wait,
            on_wait=_waiting_note,
        )
    except SweepRunError as err:
        traceback.print_exception(err.__cause__, file=sys.stderr)
        print(
            f"noisescale sweep: {err}. It is stored as failed, with what it reported; run the "
            "same command again to continue (finished runs are skipped).",
            file=sys.stderr,
        )
        return 1
    for note in summary.notes:
        print(f"noisescale sweep: warning: {note}", file=sys.stderr)
    if args.json:
        print(json.dumps(summary.as_dict(), indent=2, allow_nan=False))
    else:
        print(_text(summary, storage, study))
    return 1 if summary.failed else 0


def _text(summary: Any, storage: Any, study: str) -> str:
    parts = [f"{summary.ran} run(s) now", f"{summary.skipped} already done"]
    if summary.others:
        parts.append(f"{summary.others} by other workers")
    if summary.recovered:
        parts.append(f"{summary.recovered} recovered from a dead worker")
    if summary.pending:
        parts.append(f"{summary.pending} still running elsewhere")
    parts.append(f"{summary.failed} failed")
    lines = [
        f"study {summary.study_name!r} in {summary.storage}: {', '.join(parts)}",
        f"  {'batch_size':>10}  {'lr':>10}  {'state':>17}  {'final loss':>12}  records",
    ]
    for p in summary.points:
        loss = "" if p.final_loss is None else f"{p.final_loss:.5g}"
        lines.append(
            f"  {p.batch_size:>10}  {p.learning_rate:>10.4g}  {p.state:>17}  {loss:>12}  "
            f"{p.records}"
        )
    where = " ".join(shlex.quote(a) for a in storage.command_args())
    lines.append(f"next: noisescale fit {where + ' ' if where else ''}--study {shlex.quote(study)}")
    if storage.origin == "option" and storage.has_password:
        lines.append(
            f"(the password is masked; set {STORAGE_ENV} or use --storage-file to keep it off "
            "the command line)"
        )
    return "\n".join(lines)


def _waiting_note(pending: list[Any]) -> None:
    points = ", ".join(
        f"B={p.batch_size} lr={p.learning_rate:g} (trial {p.trial_number})" for p in pending[:6]
    )
    more = f" and {len(pending) - 6} more" if len(pending) > 6 else ""
    print(
        f"noisescale sweep: waiting for {len(pending)} run(s) other workers hold: {points}{more}; "
        "a run whose worker died is rerun here once its heartbeat has been silent for the "
        "grace period (--no-wait to return now)",
        file=sys.stderr,
    )
