"""``noisescale branch``: the local critical batch size from branches of one run (Merrill et al.).

Examples::

    # branch the synthetic run of examples/branch_train.py (seconds; eq. 2.11 with B_noise
    # 16 → 36 → 71 at the three checkpoints)
    noisescale branch examples/branch_train.py:train --checkpoints 0,2000,8000 \\
        --batch-sizes 8,16,32,64,128 --base-batch-size 8 --lr 0.1 --lr-rule linear \\
        --budget 1024 --study demo -o branch.html

    # several machines, one PostgreSQL database (the URL stays off the command line):
    export NOISESCALE_STORAGE=postgresql+psycopg2://alice:PASSWORD@db-host/sweeps
    noisescale branch train.py:run --checkpoints ... --batch-sizes ... --budget ... --lr ...
    noisescale branch --study noisescale-branch --history runs/main/history.jsonl -o cbs.html

The function is called as ``fn(batch_size=B, learning_rate=lr, reporter=reporter,
checkpoint=C, budget=N, seed=R)`` (see :mod:`noisescale.branch.runner`). Every branch's curve
goes into an Optuna study (the sweeps' storage, ``sweep.db`` by default); running the same
command again skips finished branches, so it also re-analyses a finished study with another
``--tolerance`` at no cost. Without MODULE:FUNCTION the study is only analysed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import shlex
import sys
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

from noisescale.commands import _args
from noisescale.errors import NoiseScaleInputError
from noisescale.sweep.queue import DEFAULT_HEARTBEAT_S, DEFAULT_MAX_RETRIES
from noisescale.sweep.storage import STORAGE_ENV

#: Heartbeats further apart than this leave a dead worker's branch unclaimed for too long.
MAX_HEARTBEAT_S = 3600
#: More repeats than this is a typo, not an experiment.
MAX_REPEATS = 1000
OUTPUT_SUFFIXES = (".html", ".htm", ".png", ".json")


def register(subparsers: argparse._SubParsersAction) -> None:
    from noisescale.branch.compare import DEFAULT_TOLERANCE, REFERENCES
    from noisescale.branch.runner import DEFAULT_REPEATS, DEFAULT_STUDY, LR_RULES

    parser = subparsers.add_parser(
        "branch",
        help="local critical batch size from short branches of a run (Merrill et al. 2025), "
        "beside B_simple",
        description="From checkpoints of a training run, train short branches for the same "
        "budget of examples (tokens) at several batch sizes and data orders, compare their "
        "losses at equal examples, and report at each checkpoint the local critical batch size "
        "(the largest batch needing at most (1 + τ)× the reference's examples) and its eq. 2.11 "
        "reading B_crit, with intervals over data orders (B_crit's 95% interval covered the "
        "truth in 95-96% of synthetic experiments; the local CBS's under-covers at small τ: "
        "89-94% at τ = 0.2, 96% at τ = 1); beside the main run's B_simple "
        "(--history), with a batch-size warm-up fitted to it. Branches are stored in an Optuna "
        "study that any number of workers share; finished branches are skipped on the next "
        "invocation.",
        epilog=f"STORAGE: --storage URL, else --storage-file FILE, else ${STORAGE_ENV}, else "
        "sqlite:///sweep.db. Passwords are masked in every message.",
    )
    parser.add_argument(
        "function",
        metavar="MODULE:FUNCTION",
        nargs="?",
        help="the branch training function (module:function or path/to/file.py:function); "
        "without it the stored branches are only analysed",
    )
    grid = parser.add_argument_group("branches (with MODULE:FUNCTION)")
    grid.add_argument(
        "--checkpoints",
        type=_nonnegative_float_list,
        metavar="C,C,...",
        help="positions of the main run's checkpoints, in examples (tokens) it had consumed; "
        "passed to the function as checkpoint=",
    )
    grid.add_argument(
        "--batch-sizes",
        type=_args.positive_int_list,
        metavar="B,B,...",
        help="batch sizes of the branches (at least two); the smallest is the reference",
    )
    grid.add_argument(
        "--budget",
        type=_args.positive_float,
        metavar="N",
        help="examples (tokens) every branch trains for",
    )
    grid.add_argument(
        "--lr",
        type=_args.positive_float,
        metavar="LR",
        help="the main run's learning rate at the checkpoints (at --base-batch-size)",
    )
    grid.add_argument(
        "--base-batch-size",
        type=_args.positive_int,
        metavar="B0",
        help="the main run's batch size (default: the smallest of --batch-sizes)",
    )
    grid.add_argument(
        "--lr-rule",
        choices=LR_RULES,
        default="sqrt",
        help="how a branch's learning rate follows its batch size from (B0, LR): none, linear, "
        "sqrt (default) or paper (eq. A.3 with --b-star, --alpha)",
    )
    grid.add_argument("--b-star", type=_args.positive_float, metavar="B", help="B* of eq. A.3")
    grid.add_argument("--alpha", type=_args.fraction, default=1.0, help="α of eq. A.3 (default 1)")
    grid.add_argument(
        "--lr-grid",
        type=_args.positive_float_list,
        default=[1.0],
        metavar="M,M,...",
        help="multipliers of the rule's learning rate tried at every batch size; the best at "
        "the budget is compared (default 1: the rule alone)",
    )
    grid.add_argument(
        "--repeats",
        type=_args.positive_int,
        default=DEFAULT_REPEATS,
        metavar="R",
        help=f"data orders (seeds) per branch setting, for the interval (default "
        f"{DEFAULT_REPEATS})",
    )
    grid.add_argument(
        "--keep-going",
        action="store_true",
        help="when a branch raises, record it as failed and go on",
    )
    analysis = parser.add_argument_group("analysis")
    analysis.add_argument(
        "--tolerance",
        type=_args.positive_float,
        default=DEFAULT_TOLERANCE,
        metavar="TAU",
        help=f"τ: a batch size is within it when it needs at most (1 + τ)× the reference's "
        f"examples for the same loss (default {DEFAULT_TOLERANCE})",
    )
    analysis.add_argument(
        "--reference",
        choices=REFERENCES,
        default="smallest",
        help="compare against the smallest batch size (default) or the best branch (curves "
        "that cross, as under warmup-stable-decay schedules)",
    )
    analysis.add_argument(
        "--ema",
        type=_args.decay,
        default=0.0,
        metavar="DECAY",
        help="EMA decay smoothing each branch's curve (default 0: none)",
    )
    analysis.add_argument(
        "--confidence",
        type=_confidence,
        default=0.95,
        help="of the intervals (default 0.95); the local CBS's 95%% interval covered the truth "
        "in only 89-94%% of synthetic experiments at τ = 0.2 (B_crit's: 95-96%%)",
    )
    analysis.add_argument(
        "--unit",
        choices=("examples", "tokens"),
        help="what checkpoints, budgets and batch sizes count (default: the unit stored with "
        "the study's branches, else examples); stored with the branches it runs",
    )
    analysis.add_argument(
        "--history",
        metavar="FILE",
        help="the main run's tracker history (JSON Lines): B_simple beside the branches",
    )
    analysis.add_argument(
        "--tokens-per-example",
        type=_args.positive_float,
        metavar="T",
        help="to convert a history in the other unit that did not count tokens, and a "
        "BNoiseTracker's B_noise (per example) for branches in tokens (default: the history's "
        "tokens per example at each record's step)",
    )
    analysis.add_argument(
        "--b-noise",
        metavar="FILE",
        help="B_noise measurements along the main run (JSON Lines with examples or step: a "
        "BNoiseTracker's records, whose per-measurement ghg and trace_h_sigma give each "
        "window's B_noise and interval; or summary points b_noise, optionally b_noise_low/high)",
    )
    analysis.add_argument(
        "--stable",
        type=_span,
        metavar="START:END",
        help="the main run's constant-learning-rate phase (examples/tokens); branch points "
        "whose window leaves it are reported but left out of the warm-up",
    )
    analysis.add_argument(
        "--warmup-total",
        type=_args.positive_float,
        metavar="N",
        help="examples (tokens) over which the warm-up's steps are counted (default: the "
        "history's length, else the last branch window's end)",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--storage", metavar="URL", help="an Optuna storage URL")
    where.add_argument(
        "--storage-file",
        metavar="FILE",
        help="read the storage URL from the first line of FILE",
    )
    parser.add_argument("--study", metavar="NAME", help=f"the study name (default {DEFAULT_STUDY})")
    parser.add_argument(
        "--heartbeat",
        type=_args.positive_int,
        default=DEFAULT_HEARTBEAT_S,
        metavar="SECONDS",
        help=f"seconds between a running branch's heartbeats (default {DEFAULT_HEARTBEAT_S})",
    )
    parser.add_argument(
        "--grace",
        type=_args.positive_int,
        metavar="SECONDS",
        help="seconds without a heartbeat after which a branch's worker counts as dead "
        "(default: three heartbeats)",
    )
    parser.add_argument(
        "--max-retries",
        type=_args.nonnegative_int,
        default=DEFAULT_MAX_RETRIES,
        metavar="N",
        help=f"reruns of a branch whose worker died (default {DEFAULT_MAX_RETRIES})",
    )
    parser.add_argument(
        "--no-wait",
        action="store_true",
        help="return when nothing is left to claim instead of waiting for other workers",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(
        "-o",
        "--output",
        action="append",
        default=[],
        metavar="FILE",
        help="write the results: .html (self-contained page), .png (the side-by-side figure, "
        "and the efficiencies beside it as NAME-efficiency.png) or .json; repeatable",
    )
    _args.add_force(parser)
    parser.add_argument("--verbose", action="store_true", help="let Optuna log")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import optuna
    except ImportError:
        raise NoiseScaleInputError(
            "noisescale branch needs Optuna and tqdm: pip install 'noisescale[sweep]'"
        ) from None
    from noisescale.branch.runner import DEFAULT_STUDY, BranchPlan
    from noisescale.sweep.storage import resolve_storage_url, sqlite_file

    _check_numbers(args)
    study = args.study if args.study is not None else DEFAULT_STUDY
    if not study.strip():
        raise NoiseScaleInputError("--study must not be empty")
    storage = resolve_storage_url(args.storage, args.storage_file)
    inputs = [p for p in (args.history, args.b_noise) if p]
    if (db := sqlite_file(storage.url)) is not None:
        inputs.append(str(db))
    outputs = _outputs(args, inputs)
    args.unit = _unit(args, storage.url, study)
    history = _history(args)
    b_noise = _b_noise(args, history)
    plan = None
    if args.function is not None:
        missing = [
            flag
            for flag, value in (
                ("--checkpoints", args.checkpoints),
                ("--batch-sizes", args.batch_sizes),
                ("--budget", args.budget),
                ("--lr", args.lr),
            )
            if value is None
        ]
        if missing:
            raise NoiseScaleInputError(
                f"running branches needs {', '.join(missing)} (or drop MODULE:FUNCTION to "
                "analyse a study)"
            )
        if args.repeats > MAX_REPEATS:
            raise NoiseScaleInputError(f"--repeats must be at most {MAX_REPEATS}")
        plan = BranchPlan(
            checkpoints=tuple(args.checkpoints),
            batch_sizes=tuple(args.batch_sizes),
            base_batch_size=args.base_batch_size or min(args.batch_sizes),
            base_learning_rate=args.lr,
            budget=args.budget,
            lr_rule=args.lr_rule,
            alpha=args.alpha,
            b_star=args.b_star,
            lr_grid=tuple(args.lr_grid),
            repeats=args.repeats,
            unit=args.unit,
        )
    else:
        grid_flags = [
            flag
            for flag, value in (
                ("--checkpoints", args.checkpoints),
                ("--batch-sizes", args.batch_sizes),
                ("--lr", args.lr),
                ("--b-star", args.b_star),
                ("--keep-going", args.keep_going or None),
            )
            if value is not None
        ]
        if grid_flags:
            raise NoiseScaleInputError(
                f"{', '.join(grid_flags)} describe branches to run: give MODULE:FUNCTION too"
            )
    optuna.logging.set_verbosity(optuna.logging.INFO if args.verbose else optuna.logging.WARNING)
    if plan is not None:
        status = _run_plan(args, plan, storage, study)
        if status:
            return status
    return _analyse(args, storage, study, plan, history, b_noise, outputs)


def _run_plan(args: argparse.Namespace, plan: Any, storage: Any, study: str) -> int:
    from noisescale.branch.runner import BranchRunError, run_branches
    from noisescale.sweep.study import load_train_function

    train = load_train_function(args.function)
    try:
        summary = run_branches(
            train,
            plan,
            storage=storage.url,
            study_name=study,
            keep_going=args.keep_going,
            progress=not args.no_progress,
            heartbeat_interval=args.heartbeat,
            grace_period=args.grace,
            max_retries=args.max_retries,
            wait=not args.no_wait,
            on_wait=_waiting_note,
        )
    except BranchRunError as err:
        traceback.print_exception(err.__cause__, file=sys.stderr)
        print(
            f"noisescale branch: {err}. It is stored as failed, with what it reported; run the "
            "same command again to continue (finished branches are skipped).",
            file=sys.stderr,
        )
        return 1
    for note in summary.notes:
        print(f"noisescale branch: warning: {note}", file=sys.stderr)
    if not args.json:
        parts = [f"{summary.ran} branch(es) now", f"{summary.skipped} already done"]
        if summary.others:
            parts.append(f"{summary.others} by other workers")
        if summary.recovered:
            parts.append(f"{summary.recovered} recovered from a dead worker")
        if summary.pending:
            parts.append(f"{summary.pending} still running elsewhere")
        parts.append(f"{summary.failed} failed")
        print(f"study {summary.study_name!r} in {summary.storage}: {', '.join(parts)}")
    if summary.failed or summary.pending:
        print(
            f"noisescale branch: {summary.failed} branch(es) failed and {summary.pending} are "
            "still running elsewhere; run the command again to complete them before analysing",
            file=sys.stderr,
        )
        return 1
    return 0


def _analyse(
    args: argparse.Namespace,
    storage: Any,
    study: str,
    plan: Any,
    history: Any,
    b_noise: list[Any],
    outputs: list[Path],
) -> int:
    from noisescale.branch.compare import local_critical_batch_sizes
    from noisescale.branch.runner import (
        missing_branches,
        plan_from_dict,
        planned_reference_sizes,
        read_branches,
        split_by_plan,
        stored_plan,
    )
    from noisescale.branch.side import b_simple_trajectory, history_positions, side_by_side
    from noisescale.branch.warmup import fit_warmup
    from noisescale.sweep.study import select_studies

    names = select_studies(storage.url, study) if plan is None else [study]
    if len(names) != 1:
        raise NoiseScaleInputError(f"--study {study!r} matches {len(names)} studies; name one")
    name = names[0]
    notes: list[str] = []
    stored = stored_plan(storage.url, name) or {}
    # The plan run now, else the last one run on the study: a study can hold several plans'
    # branches (another --lr, rule or B*), which must not be pooled into a learning-rate grid.
    current = plan if plan is not None else plan_from_dict(stored)
    if current is not None and args.budget not in (None, current.budget):
        current = None  # asked for another budget: an earlier plan's branches
    budget = current.budget if current is not None else args.budget
    branches = read_branches(storage.url, name, budget=budget)
    missing: list[Any] = []
    reference_batch_size = None
    planned_refs: dict[float, float] = {}
    if current is not None:
        branches, others = split_by_plan(branches, current)
        which = "this command's" if plan is not None else "the last"
        if not branches:
            raise NoiseScaleInputError(
                f"study {name!r} has no finished branch of {which} plan; run it "
                "(MODULE:FUNCTION with its options) to complete it"
            )
        if others:
            notes.append(
                f"{len(others)} finished branch(es) of the study belong to another plan "
                f"({_settings(others)}) and are left out: only {which} plan's branches are "
                "compared. To analyse the others, run the command with their plan's options "
                "again (finished branches are skipped)"
            )
        missing = missing_branches(storage.url, name, current, branches)
        if args.reference == "smallest":
            reference_batch_size = float(min(current.batch_sizes))
            planned_refs = dict.fromkeys({b.checkpoint for b in branches}, reference_batch_size)
        if missing:
            notes.append(_missing_note(missing))
    else:
        pooled = _pooled_rates(branches)
        if pooled:
            notes.append(
                f"the study stores no plan that tells a learning-rate grid from branches of "
                f"several plans; pooled as a grid (the lowest loss at the budget is compared): "
                f"{pooled}"
            )
        if args.reference == "smallest":
            # an earlier plan's branches (another --budget): its reference at each checkpoint
            # is the smallest batch size of its branches in any state (failed ones included)
            of = budget if budget is not None else branches[0].budget
            planned_refs = planned_reference_sizes(storage.url, name, of)
    if args.reference == "smallest":
        branches = _without_unreferenced(branches, planned_refs, missing, notes)
    results = local_critical_batch_sizes(
        branches,
        tolerance=args.tolerance,
        reference=args.reference,
        decay=args.ema,
        confidence=args.confidence,
        reference_batch_size=reference_batch_size,
    )
    rows = side_by_side(
        results,
        history,
        unit=args.unit,
        tokens_per_example=args.tokens_per_example,
        b_noise=b_noise,
        confidence=args.confidence,
    )
    notes += [
        f"checkpoint {row.result.checkpoint:g}: B_noise over the window is not available (—): "
        f"{row.b_noise_reason}"
        for row in rows
        if row.b_noise_reason
    ]
    short = [row for row in rows if history is not None and row.window_covered < 0.5]
    if short:
        shown = "; ".join(
            f"checkpoint {row.result.checkpoint:g}: {100 * row.window_covered:.0f}% of the "
            f"window, {row.b_simple_steps} step(s)"
            for row in short
        )
        notes.append(
            f"the history covers less than half of {len(short)} branch window(s) ({shown}): "
            "B_simple there is measured over those steps only, at one end of the window, not "
            "over the window; give the history of the whole run"
        )
    usable = results
    if args.stable is not None:
        start, end = args.stable
        usable = [r for r in results if start <= r.checkpoint and r.checkpoint + r.budget <= end]
        left = [r.checkpoint for r in results if r not in usable]
        if left:
            notes.append(
                f"branch points {', '.join(f'{c:g}' for c in left)} leave the stable phase "
                f"[{start:g}, {end:g}]: shown, but left out of the warm-up"
            )
    base = args.base_batch_size
    if base is None:
        base = int(stored.get("base_batch_size") or min(r.reference_batch_size for r in results))
    total = args.warmup_total
    if total is None and history is not None:
        positions = history_positions(history, args.unit, args.tokens_per_example)
        total = float(positions[-1]) if math.isfinite(positions[-1]) else None
    if total is None:
        total = max(r.checkpoint + r.budget for r in results)
    warm = fit_warmup(usable, base_batch_size=base, total=total) if usable else None
    traj = b_simple_trajectory(history, args.unit, args.tokens_per_example) if history else None
    payload = {
        "kind": "noisescale.branch",
        "version": 1,
        "storage": storage.shown,
        "study": name,
        "unit": args.unit,
        "tolerance": args.tolerance,
        "reference": args.reference,
        "history": args.history,
        "points": [row.as_dict() for row in rows],
        "warmup": None if warm is None else warm.as_dict(),
        "notes": notes,
        "unfinished_branches": [
            {k: v for k, v in m.__dict__.items() if k != "final_loss"} for m in missing
        ],
    }
    text = json.dumps(payload, indent=2, allow_nan=False)
    figures: dict[str, bytes] | None = None
    for path in outputs:
        suffix = path.suffix.lower()
        if suffix == ".json":
            _args.write_or_rescue(path, text + "\n", what="the results", replace=args.force)
            continue
        if figures is None:
            from noisescale.branch.page import figures_png, plot_data

            figures = figures_png(plot_data(rows, traj, warm, unit=args.unit))
        if suffix == ".png":
            _args.write_or_rescue(
                path, figures["side_by_side"], what="the figure", replace=args.force
            )
            _args.write_or_rescue(
                _efficiency_png(path), figures["efficiency"], what="the figure", replace=args.force
            )
        else:
            from noisescale.branch.page import branch_html

            title = args.history or name
            page = branch_html(
                rows, figures, plan=warm, title=str(title), unit=args.unit, warnings=notes
            )
            _args.write_or_rescue(path, page, what="the page", replace=args.force)
    if args.json:
        print(text)
        return 0
    for note in notes:
        print(f"noisescale branch: note: {note}", file=sys.stderr)
    print(_text(rows, warm, args, storage, name))
    for path in outputs:
        print(f"wrote {path}")
        if path.suffix.lower() == ".png":
            print(f"wrote {_efficiency_png(path)}")
    return 0


def _text(rows: list[Any], warm: Any, args: argparse.Namespace, storage: Any, study: str) -> str:
    from noisescale.report.text import format_count, format_number

    def value(x: float, low: float = math.nan, high: float = math.nan, bound: Any = None) -> str:
        if not math.isfinite(x):
            return "—"
        out = {"upper": "≥", "lower": "≤"}.get(bound or "", "") + format_number(x)
        if bound == "below-grid":
            out = format_number(x) + "*"
        if math.isfinite(low) or math.isfinite(high):
            hi = format_number(high) if math.isfinite(high) else "∞"
            out += f" [{format_number(low) if math.isfinite(low) else '?'}, {hi}]"
        return out

    r0 = rows[0].result
    lines = [
        f"{len(rows)} branch point(s) in study {study!r}; budget {format_number(r0.budget)} "
        f"{args.unit}; tolerance τ = {format_number(args.tolerance)} (at most "
        f"{format_number(100 * args.tolerance)}% more {args.unit} than the {args.reference} "
        f"reference); {format_number(100 * r0.confidence)}% intervals over data orders",
        f"  {'checkpoint':>11}  {'local CBS':>22}  {'B_crit (eq. 2.11)':>22}  "
        f"{'B_simple (window)':>22}  {'B_crit/B_simple':>15}"
        + (f"  {'B_noise (window)':>22}" if args.b_noise else ""),
    ]
    for row in rows:
        r = row.result
        noise = ""
        if args.b_noise:
            noise = f"  {value(row.b_noise, row.b_noise_low, row.b_noise_high):>22}"
        lines.append(
            f"  {format_count(r.checkpoint):>11}  "
            f"{value(r.cbs, r.cbs_low, r.cbs_high, _cbs_mark(r.cbs_bound)):>22}  "
            f"{value(r.b_crit, r.b_crit_low, r.b_crit_high, r.b_crit_bound):>22}  "
            f"{value(row.b_simple, row.b_simple_low, row.b_simple_high):>22}  "
            f"{value(row.ratio_b_crit):>15}{noise}"
        )
        for w in r.warnings:
            lines.append(f"      warning: {w}")
    if any(row.result.cbs_bound == "lower" for row in rows):
        lines.append(
            "  * below the second batch size tried: interpolated from the reference; try batch "
            "sizes in between to resolve it"
        )
    if warm is not None:
        stages = ", ".join(f"{b} from {format_count(x)}" for x, b in warm.knots)
        lines.append(
            f"warm-up (batch size from {args.unit} consumed): {stages}; over "
            f"{format_count(warm.total)} {args.unit}: {format_count(warm.steps_warmup)} steps "
            f"against {format_count(warm.steps_fixed)} at {warm.base_batch_size} "
            f"({100 * warm.step_saving:.1f}% fewer)"
        )
        if math.isfinite(warm.steps_same_progress):
            lines.append(
                f"  eq. D.1 prediction, to the main run's loss: "
                f"{format_count(warm.steps_same_progress)} steps "
                f"({100 * warm.step_saving_same_progress:.1f}% fewer) and "
                f"{format_count(warm.examples_same_progress)} {args.unit}"
            )
        elif warm.same_progress_reason:
            lines.append(f"  no eq. D.1 prediction at equal progress: {warm.same_progress_reason}")
    if storage.origin == "option" and storage.has_password:
        lines.append(
            f"(the password is masked; set {STORAGE_ENV} or use --storage-file to keep it off "
            "the command line)"
        )
    lines.append(f"re-analyse: {_reanalyse(args, storage, study)}")
    return "\n".join(lines)


def _reanalyse(args: argparse.Namespace, storage: Any, study: str) -> str:
    """The command that analyses the same branches the same way again, runnable as printed
    (the storage's password stays masked; see the note above it)."""
    where = storage.command_args()
    if where and where[0] != "--storage-file":
        where = ["--storage", *where]
    words = ["noisescale", "branch", *where, "--study", study]
    if args.unit != "examples":
        words += ["--unit", args.unit]
    for flag, value, default in (
        ("--budget", args.budget, None),
        ("--base-batch-size", args.base_batch_size, None),
        ("--reference", args.reference, "smallest"),
        ("--ema", args.ema, 0.0),
        ("--confidence", args.confidence, 0.95),
        ("--history", args.history, None),
        ("--tokens-per-example", args.tokens_per_example, None),
        ("--b-noise", args.b_noise, None),
        ("--stable", None if args.stable is None else ":".join(map(_word, args.stable)), None),
        ("--warmup-total", args.warmup_total, None),
    ):
        if value is not None and value != default:
            words += [flag, _word(value)]
    words += ["--tolerance", _word(args.tolerance)]
    return " ".join(shlex.quote(w) for w in words)


def _word(value: Any) -> str:
    """A value as a command-line word that parses back to the same number."""
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


def _without_unreferenced(
    branches: list[Any], refs: dict[float, float], missing: list[Any], notes: list[str]
) -> list[Any]:
    """The branches of the checkpoints whose planned reference batch size finished; the others
    are left out with a note (their local critical batch size against the next batch size would
    move by (1 + τ)·ΔB_ref: 44.2 where the truth was 31.5, in a hunt), and the analysis is
    refused when none is left. With several workers a checkpoint's larger batches often finish
    first: the complete checkpoints are still compared."""
    left_out: dict[float, str] = {}
    for c in sorted({b.checkpoint for b in branches}):
        ref = refs.get(c)
        if ref is None:
            continue
        if not any(b.checkpoint == c and b.batch_size == ref for b in branches):
            states = sorted({m.state for m in missing if m.checkpoint == c and m.batch_size == ref})
            left_out[c] = f"checkpoint {c:g} (B_ref = {ref:g}: {', '.join(states) or 'missing'})"
    if not left_out:
        return branches
    kept = [b for b in branches if b.checkpoint not in left_out]
    text = "; ".join(left_out.values())
    if not kept:
        raise NoiseScaleInputError(
            f"no checkpoint has a finished branch at its plan's reference batch size ({text}): "
            "comparing against the next batch size would move the local critical batch size "
            "by (1 + τ)·ΔB_ref. Run the plan again (MODULE:FUNCTION with its options) to finish "
            "them, or compare against the best branch instead (--reference best)"
        )
    notes.append(
        f"left out, their reference batch size not finished: {text}; comparing against the next "
        "batch size would move the local critical batch size by (1 + τ)·ΔB_ref. Run the plan "
        "again (MODULE:FUNCTION with its options) to finish them, or --reference best"
    )
    return kept


def _missing_note(missing: list[Any]) -> str:
    """The planned branches an analysis goes without, grouped by checkpoint and batch size."""
    groups: dict[tuple[float, int], list[Any]] = {}
    for m in missing:
        groups.setdefault((m.checkpoint, m.batch_size), []).append(m)
    shown = []
    for (c, b), ms in sorted(groups.items()):
        states = Counter(m.state for m in ms)
        seeds = sorted({m.seed for m in ms})
        shown.append(
            f"checkpoint {c:g} B={b} seed(s) {', '.join(map(str, seeds))} ("
            + ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
            + ")"
        )
    more = f"; and {len(shown) - 8} more" if len(shown) > 8 else ""
    return (
        f"{len(missing)} branch(es) of the plan have not finished and are left out: "
        f"{'; '.join(shown[:8])}{more}. The branch points are compared without them (fewer "
        "batch sizes or seeds, or a checkpoint missing from the table); run the plan again "
        "(MODULE:FUNCTION with its options) to finish them before trusting the numbers"
    )


def _settings(branches: list[Any]) -> str:
    """The settings of some branches, compactly: checkpoint, batch size and learning rates."""
    rates: dict[tuple[float, float], set[float]] = {}
    for b in branches:
        rates.setdefault((b.checkpoint, b.batch_size), set()).add(b.learning_rate)
    shown = [
        f"checkpoint {c:g} B={b:g} lr {', '.join(f'{lr:g}' for lr in sorted(lrs))}"
        for (c, b), lrs in sorted(rates.items())
    ]
    more = f" and {len(shown) - 6} more" if len(shown) > 6 else ""
    return "; ".join(shown[:6]) + more


def _pooled_rates(branches: list[Any]) -> str:
    """The checkpoints and batch sizes run at several learning rates ("" when none)."""
    rates: dict[tuple[float, float], set[float]] = {}
    for b in branches:
        rates.setdefault((b.checkpoint, b.batch_size), set()).add(b.learning_rate)
    return _settings([b for b in branches if len(rates[(b.checkpoint, b.batch_size)]) > 1])


def _cbs_mark(bound: str | None) -> str | None:
    """``≥`` for a CBS beyond the largest batch size; a footnote for one below the second."""
    return "below-grid" if bound == "lower" else bound


def _check_numbers(args: argparse.Namespace) -> None:
    if args.heartbeat > MAX_HEARTBEAT_S:
        raise NoiseScaleInputError(
            f"--heartbeat must be at most {MAX_HEARTBEAT_S} s, got {args.heartbeat}"
        )
    if args.grace is not None and args.grace <= args.heartbeat:
        raise NoiseScaleInputError(
            f"--grace ({args.grace} s) must exceed --heartbeat ({args.heartbeat} s): a live "
            "worker would otherwise look dead between two heartbeats"
        )
    if args.b_star is not None and args.lr_rule != "paper":
        raise NoiseScaleInputError("--b-star goes with --lr-rule paper")
    if args.lr_rule == "paper" and args.b_star is None and args.function is not None:
        raise NoiseScaleInputError("--lr-rule paper needs --b-star (B* of eq. A.3)")


def _outputs(args: argparse.Namespace, inputs: list[str]) -> list[Path]:
    outputs: list[Path] = []
    for output in args.output:
        path = _args.check_output_file(
            output, flag="-o", force=args.force, suffixes=OUTPUT_SUFFIXES, inputs=inputs
        )
        if path.suffix.lower() in (".png", ".html", ".htm") and (
            importlib.util.find_spec("matplotlib") is None
        ):
            raise NoiseScaleInputError(
                "figures need matplotlib: pip install 'noisescale[plot]' (or write .json)"
            )
        if path.suffix.lower() == ".png":
            _args.check_output_file(
                _efficiency_png(path), flag="-o", force=args.force, inputs=inputs
            )
        if path in outputs:
            raise NoiseScaleInputError(f"-o {output} is given twice")
        outputs.append(path)
    return outputs


def _unit(args: argparse.Namespace, storage: str, study: str) -> str:
    """``--unit``, else the unit stored with the study's branches, else examples; refuses a
    ``--unit`` that contradicts the stored one."""
    from noisescale.branch.runner import stored_unit
    from noisescale.sweep.study import select_studies

    stored = None
    try:
        names = select_studies(storage, study)
        if len(names) == 1:
            stored = stored_unit(storage, names[0])
    except NoiseScaleInputError:
        pass  # no storage or study yet: a new study, or an error the analysis names
    if args.unit is not None and stored is not None and args.unit != stored:
        raise NoiseScaleInputError(
            f"--unit {args.unit}, but the branches of study {study!r} count {stored}: drop "
            f"--unit (or give --unit {stored}), or use another --study for branches in "
            f"{args.unit}"
        )
    return args.unit or stored or "examples"


def _history(args: argparse.Namespace) -> Any:
    if args.history is None:
        if args.tokens_per_example is not None and args.b_noise is None:
            raise NoiseScaleInputError(
                "--tokens-per-example converts a --history; give one (or a --b-noise)"
            )
        return None
    from noisescale.branch.side import history_positions
    from noisescale.report.data import load_history

    history = load_history(args.history)
    for warning in history.warnings:  # (e.g. read from its switch to preconditioned norms on)
        print(f"noisescale branch: warning: {args.history}: {warning}", file=sys.stderr)
    # Refuses tokens asked of a history without them (and without --tokens-per-example).
    history_positions(history, args.unit, args.tokens_per_example)
    return history


def _b_noise(args: argparse.Namespace, history: Any) -> list[Any]:
    if args.b_noise is None:
        return []
    from noisescale.branch.side import read_b_noise

    path = Path(args.b_noise)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = getattr(err, "strerror", None) or str(err)
        raise NoiseScaleInputError(f"--b-noise {args.b_noise}: cannot read it ({reason})") from None
    records, names = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise NoiseScaleInputError(
                f"--b-noise {args.b_noise}, line {number}: not valid JSON ({err.msg})"
            ) from None
        names.append(f"--b-noise {args.b_noise}, line {number}")
    if not records:
        raise NoiseScaleInputError(f"--b-noise {args.b_noise} holds no measurement")
    return read_b_noise(records, history, args.unit, args.tokens_per_example, names=names)


def _efficiency_png(path: Path) -> Path:
    return path.with_name(f"{path.stem}-efficiency{path.suffix}")


def _nonnegative_float_list(text: str) -> list[float]:
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or any(not item for item in items):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers ≥ 0 such as 0,5000,20000, got {text!r}"
        )
    values = [_args.nonnegative_float(item) for item in items]
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"a checkpoint is given twice in {text!r}")
    return values


def _confidence(text: str) -> float:
    value = _args.fraction(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be below 1, got {text!r}")
    return value


def _span(text: str) -> tuple[float, float]:
    start, sep, end = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected START:END, got {text!r}")
    a, b = _args.nonnegative_float(start), _args.positive_float(end)
    if b <= a:
        raise argparse.ArgumentTypeError(f"END must exceed START, got {text!r}")
    return a, b


def _waiting_note(pending: list[Any]) -> None:
    shown = ", ".join(
        f"checkpoint {p.checkpoint:g} B={p.batch_size} seed {p.seed} (trial {p.trial_number})"
        for p in pending[:6]
    )
    more = f" and {len(pending) - 6} more" if len(pending) > 6 else ""
    print(
        f"noisescale branch: waiting for {len(pending)} branch(es) other workers hold: "
        f"{shown}{more}; a branch whose worker died is rerun here once its heartbeat has been "
        "silent for the grace period (--no-wait to return now)",
        file=sys.stderr,
    )
