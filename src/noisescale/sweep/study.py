"""Run a batch-size × learning-rate grid of a training function and keep it in an Optuna study.

Each grid point is one unit of a :class:`~noisescale.sweep.queue.WorkQueue`: one Optuna trial
whose parameters are ``batch_size`` and ``learning_rate``, whose value is the final loss, and
whose curve lives in user attributes ``curve_00000``, ``curve_00001``, … — column-oriented JSON
chunks (``{"step": [...], "loss": [...], ...}``) written every ``flush_every`` reports, so a
killed run keeps all but its last chunk. Any database URL Optuna accepts works: SQLite (the
default) on one machine, PostgreSQL for workers on several machines.

Any number of workers may run the same sweep on one study at once (:func:`run_sweep` in each):
every grid point is claimed by exactly one of them; a worker killed mid-run stops its heartbeat
and its point is rerun by another worker after the grace period; a run whose training finished
before its worker died is kept, not rerun. Run the command again after a crash or Ctrl-C and it
continues: finished points are skipped, failed and interrupted ones rerun.

Optuna is imported inside the functions, so ``import noisescale.sweep`` does not need it.
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.util
import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from noisescale.errors import NoiseScaleInputError
from noisescale.sweep.queue import (
    DEFAULT_HEARTBEAT_S,
    DEFAULT_MAX_RETRIES,
    UNIT_ATTR,
    Claim,
    QueueSummary,
    UnitOutcome,
    UnitStatus,
    WorkQueue,
    WorkUnit,
    completed,
    run_units,
    unit_key,
)
from noisescale.sweep.runs import Run, runs_from_rows
from noisescale.sweep.storage import DEFAULT_STORAGE, mask_url, open_storage

if TYPE_CHECKING:
    import optuna

#: The study name unless told otherwise.
DEFAULT_STUDY = "noisescale-sweep"
#: Reports per stored chunk: small enough for a MySQL TEXT column (64 KiB), large enough that a
#: long run is a few hundred database writes.
FLUSH_EVERY = 200
#: A chunk is also written when this many seconds have passed since the last one.
FLUSH_SECONDS = 10.0
#: Prefix of the user attributes that hold a trial's curve.
CURVE_PREFIX = "curve_"


class SweepRunError(RuntimeError):
    """The training function raised; the run is recorded as failed and reruns next time."""


class NothingReportedError(NoiseScaleInputError):
    """The training function returned without a report: bad input, unless ``keep_going``
    (then the run is one failed grid point, as a run that raised)."""


class Reporter:
    """What the training function calls at each step: ``reporter.report(step, loss, ...)``.

    Reports are buffered and written to the trial as a JSON chunk every ``flush_every``
    reports or ``flush_seconds`` seconds, and at the end of the run (also when it raises).
    """

    def __init__(
        self,
        trial: optuna.trial.Trial,
        *,
        flush_every: int = FLUSH_EVERY,
        flush_seconds: float = FLUSH_SECONDS,
        on_report: Callable[[int, float | None], None] | None = None,
    ) -> None:
        self._trial = trial
        self._flush_every = flush_every
        self._flush_seconds = flush_seconds
        self._on_report = on_report
        self._buffer: list[dict[str, Any]] = []
        self._chunks = 0
        self._last_flush = time.monotonic()
        self.records = 0
        self.last_loss: float | None = None

    def report(
        self,
        step: int,
        loss: float | None,
        *,
        examples: float | None = None,
        b_simple: float | None = None,
        **extra: float | None,
    ) -> None:
        """Record the loss (and optionally more) after optimizer step ``step``.

        Args:
            step: optimizer steps taken so far.
            loss: the loss to fit against (``None`` if not measured at this step; NaN or inf
                if the run diverged).
            examples: cumulative training examples processed, for runs whose batch size
                changes; otherwise ``batch_size × step`` is assumed.
            b_simple: the simple noise scale B_simple measured at this step (paper eq. 2.9).
            **extra: further numbers to keep, e.g. ``error=0.12`` (``noisescale fit --metric
                error`` reads it) or ``lr=...``.

        Raises:
            NoiseScaleInputError: a step that is not an integer or a value that is not a number.
        """
        try:
            integral = not isinstance(step, bool) and float(step).is_integer()
        except (TypeError, ValueError):
            integral = False
        if not integral:
            raise NoiseScaleInputError(f"reporter.report: step must be an integer, got {step!r}")
        record: dict[str, Any] = {"step": int(step), "loss": _json_number("loss", loss)}
        if examples is not None:
            record["examples"] = _json_number("examples", examples)
        if b_simple is not None:
            record["b_simple"] = _json_number("b_simple", b_simple)
        for key, value in extra.items():
            record[key] = _json_number(key, value)
        self._buffer.append(record)
        self.records += 1
        if loss is not None:
            self.last_loss = float(loss)
        if self._on_report is not None:
            self._on_report(int(step), self.last_loss)
        if (
            len(self._buffer) >= self._flush_every
            or time.monotonic() - self._last_flush >= self._flush_seconds
        ):
            self.flush()

    def flush(self) -> None:
        """Write the buffered reports to the trial as one chunk."""
        if not self._buffer:
            return
        keys: list[str] = []
        for record in self._buffer:
            keys.extend(k for k in record if k not in keys)
        chunk = {k: [record.get(k) for record in self._buffer] for k in keys}
        self._trial.set_user_attr(f"{CURVE_PREFIX}{self._chunks:05d}", chunk)
        self._chunks += 1
        self._buffer = []
        self._last_flush = time.monotonic()


def _json_number(name: str, value: Any) -> float | str | None:
    """A value as a JSON-safe float.

    JSON has no NaN. A non-finite loss or error is stored as the string ``"nan"`` so that a
    divergence is not mistaken for an unmeasured step (``None``); other non-finite values mean
    "not measured" and become ``None``.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise NoiseScaleInputError(f"reporter.report: {name} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise NoiseScaleInputError(
            f"reporter.report: {name} must be a number, got {value!r}"
        ) from None
    if math.isfinite(number):
        return number
    return "nan" if name in ("loss", "error") else None


class _Postfix:
    """Shows the current run's settings, step and loss after the progress bar, twice a second."""

    def __init__(self, bar: Any, batch_size: int, learning_rate: float) -> None:
        self._bar = bar
        self._label = f"B={batch_size} lr={learning_rate:g}"
        self._last = 0.0
        bar.set_postfix_str(self._label, refresh=True)

    def __call__(self, step: int, loss: float | None) -> None:
        now = time.monotonic()
        if now - self._last > 0.5:
            self._last = now
            tail = "" if loss is None else f" loss={loss:.4g}"
            self._bar.set_postfix_str(f"{self._label} step={step}{tail}", refresh=True)


@dataclass(frozen=True)
class GridPoint:
    """One (batch size, learning rate) of the grid and what happened to it.

    ``state`` is ``"complete"`` (run by this worker now), ``"skipped"`` (complete before this
    worker started), ``"by another worker"``, ``"recovered"`` (a dead worker's finished run,
    adopted), ``"failed"`` or ``"running elsewhere"`` (another worker still runs it).
    """

    batch_size: int
    learning_rate: float
    state: str
    trial_number: int | None = None
    final_loss: float | None = None
    records: int = 0
    error: str | None = None


@dataclass
class SweepSummary(QueueSummary):
    """The grid after a sweep: every point, and who ran it or whether it failed.

    ``storage`` is the URL with its password masked.
    """

    points: list[GridPoint] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (infinite values as ``null``)."""
        return {
            **self.counts_dict(),
            "runs": [
                {
                    **p.__dict__,
                    "final_loss": p.final_loss
                    if p.final_loss is None or math.isfinite(p.final_loss)
                    else None,
                }
                for p in self.points
            ],
        }


def load_train_function(spec: str) -> Callable[..., Any]:
    """The training function named by ``module:function`` or ``path/to/file.py:function``.

    A dotted module is imported with the current directory on ``sys.path``; a path ending in
    ``.py`` is loaded from that file, with the file's folder on ``sys.path``.

    Raises:
        NoiseScaleInputError: a malformed spec, a module that cannot be imported or a missing or
            non-callable function.
    """
    module_name, sep, function_name = spec.rpartition(":")
    if not sep or not module_name or not function_name:
        raise NoiseScaleInputError(
            f"expected MODULE:FUNCTION (e.g. train:run or examples/sweep_train.py:train), "
            f"got {spec!r}"
        )
    if module_name.endswith(".py") or "/" in module_name or "\\" in module_name:
        path = Path(module_name)
        if not path.is_file():
            raise NoiseScaleInputError(f"no such file: {path}")
        # Like `python path/to/train.py`: the file's folder is importable (its helpers).
        if str(path.resolve().parent) not in sys.path:
            sys.path.insert(0, str(path.resolve().parent))
        unique = f"_noisescale_sweep_{path.stem}_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(unique, path)
        if module_spec is None or module_spec.loader is None:
            raise NoiseScaleInputError(f"cannot load {path} as a Python module")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[unique] = module
        module_spec.loader.exec_module(module)
    else:
        if "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            raise NoiseScaleInputError(f"cannot import {module_name!r}: {err}") from err
    function = getattr(module, function_name, None)
    if not callable(function):
        raise NoiseScaleInputError(f"{module_name} has no function {function_name!r}")
    return function


def open_study(storage: str, study_name: str, *, create: bool) -> optuna.Study:
    """The Optuna study ``study_name`` in ``storage`` (created when ``create`` is true).

    Raises:
        NoiseScaleInputError: a storage URL that cannot be opened (its password masked in the
            message), a missing SQLite file or a missing study (without ``create``).
    """
    import optuna

    backend = open_storage(storage, must_exist=not create)
    sampler = optuna.samplers.RandomSampler(seed=0)  # parameters are fixed per trial
    try:
        if create:
            return optuna.create_study(
                storage=backend,
                study_name=study_name,
                direction="minimize",
                load_if_exists=True,
                sampler=sampler,
            )
        return optuna.load_study(storage=backend, study_name=study_name, sampler=sampler)
    except KeyError:
        names = study_names(storage)
        raise NoiseScaleInputError(
            f"no study {study_name!r} in {mask_url(storage)}; studies there: "
            f"{', '.join(names) or 'none'}"
        ) from None


def study_names(storage: str) -> list[str]:
    """The names of the studies in ``storage``.

    Raises:
        NoiseScaleInputError: the storage cannot be opened (password masked), or it is an
            SQLite URL whose file does not exist.
    """
    import optuna

    backend = open_storage(storage, must_exist=True)
    return [s.study_name for s in optuna.get_all_study_summaries(storage=backend)]


def select_studies(storage: str, patterns: Sequence[str] | str | None) -> list[str]:
    """The studies named by ``patterns`` (names or shell patterns such as ``sweep-*``).

    Without patterns the storage must hold exactly one study.

    Raises:
        NoiseScaleInputError: a name or pattern that matches no study, or several studies
            and no pattern.
    """
    names = study_names(storage)
    shown = mask_url(storage)
    if patterns is None or (not isinstance(patterns, str) and not patterns):
        if len(names) != 1:
            raise NoiseScaleInputError(
                f"{shown} holds {len(names)} studies ({', '.join(names) or 'none'}); "
                "name one or more with --study (patterns such as 'sweep-*' work)"
            )
        return names
    chosen: list[str] = []
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            raise NoiseScaleInputError(
                f"no study {pattern!r} in {shown}; studies there: {', '.join(names) or 'none'}"
            )
        chosen.extend(n for n in matched if n not in chosen)
    return chosen


def grid_units(
    batch_sizes: Sequence[int], learning_rates: Sequence[float], steps: int | None
) -> list[WorkUnit]:
    """The sweep's units of work: every batch size × learning rate, in that order."""
    units = []
    for b in batch_sizes:
        for lr in learning_rates:
            params = {"batch_size": int(b), "learning_rate": float(lr)}
            attrs = {"steps": steps}
            units.append(WorkUnit(unit_key(params, attrs), params, attrs))
    return units


def sweep_key(trial: optuna.trial.FrozenTrial) -> str | None:
    """The grid point of a trial: its unit key, or for trials written before units existed,
    the key of its batch size, learning rate and ``steps``."""
    key = trial.user_attrs.get(UNIT_ATTR)
    if isinstance(key, str):
        return key
    if "batch_size" in trial.params and "learning_rate" in trial.params:
        params = {
            "batch_size": int(trial.params["batch_size"]),
            "learning_rate": float(trial.params["learning_rate"]),
        }
        return unit_key(params, {"steps": trial.user_attrs.get("steps")})
    return None


def run_sweep(
    train: Callable[..., Any],
    batch_sizes: Sequence[int],
    learning_rates: Sequence[float],
    *,
    storage: str = DEFAULT_STORAGE,
    study_name: str = DEFAULT_STUDY,
    steps: int | None = None,
    keep_going: bool = False,
    progress: bool = True,
    flush_every: int = FLUSH_EVERY,
    flush_seconds: float = FLUSH_SECONDS,
    heartbeat_interval: int = DEFAULT_HEARTBEAT_S,
    grace_period: int | None = None,
    max_retries: int = DEFAULT_MAX_RETRIES,
    wait: bool = True,
    on_wait: Callable[[list[GridPoint]], None] | None = None,
) -> SweepSummary:
    """Run ``train`` at every (batch size, learning rate) not yet done and store the curves.

    ``train`` is called as ``train(batch_size=B, learning_rate=lr, reporter=reporter)`` (plus
    ``steps=N`` when ``steps`` is given) and calls ``reporter.report(step, loss, ...)`` as it
    trains (see :class:`Reporter`). Any number of processes may call this on one study at
    once: each grid point is run by one of them (module docstring). The grid is claimed in
    order, batch size by batch size.

    Args:
        train: The training function.
        batch_sizes: Batch sizes of the grid (positive integers).
        learning_rates: Learning rates of the grid (positive numbers).
        storage: Database URL (password included; messages mask it).
        study_name: The study; created if missing.
        steps: Passed to ``train`` as ``steps=``; a different value is a different grid.
        keep_going: Record a run that raises as failed and go on (else raise
            :class:`SweepRunError` after recording it).
        progress: Show a progress bar.
        flush_every: Reports per stored chunk of a curve.
        flush_seconds: A chunk is also stored when this many seconds have passed.
        heartbeat_interval: Seconds between a running point's heartbeats.
        grace_period: Seconds of silence after which a running point's worker counts as dead
            and the point is rerun (default three heartbeat intervals).
        max_retries: Reruns of a point whose worker died.
        wait: When nothing is left to claim, wait for points other workers are running (they
            may die and leave them to this worker) instead of returning.
        on_wait: Called with the points being waited for, each time that set changes.

    Raises:
        SweepRunError: ``train`` raised (unless ``keep_going``); the run is stored as failed.
        KeyboardInterrupt: after storing the interrupted run as failed.
        NoiseScaleInputError: an empty or bad grid, a run that reported nothing (unless
            ``keep_going``: then it is stored as failed), a storage that cannot be opened, or
            a study that holds branches (``noisescale branch``).
    """
    if not batch_sizes or not learning_rates:
        raise NoiseScaleInputError("the grid needs at least one batch size and one learning rate")
    if any(int(b) != b or b <= 0 for b in batch_sizes):
        raise NoiseScaleInputError("batch sizes must be positive integers")
    if any(not (math.isfinite(lr) and lr > 0) for lr in learning_rates):
        raise NoiseScaleInputError("learning rates must be positive numbers")
    units = grid_units(batch_sizes, learning_rates, steps)
    if len({u.key for u in units}) != len(units):
        raise NoiseScaleInputError("the grid names a batch size or learning rate twice")
    queue = WorkQueue(
        storage,
        study_name,
        heartbeat_interval=heartbeat_interval,
        grace_period=grace_period,
        max_retries=max_retries,
        key_of=sweep_key,
    )
    from noisescale.branch.runner import PLAN_ATTR

    if PLAN_ATTR in queue.study.user_attrs:
        raise NoiseScaleInputError(
            f"study {queue.study_name!r} in {queue.storage_shown} holds the branches of "
            "`noisescale branch`, not a sweep grid: give the sweep a study of its own (--study)"
        )
    _fail_legacy_running(queue)

    def work(claim: Claim, bar: Any) -> float:
        try:
            return _train_one(claim, train, steps, bar, flush_every, flush_seconds)
        except NothingReportedError as err:
            if not keep_going:
                raise
            # one grid point that returned early: a failed run, and the grid goes on
            raise RuntimeError(str(err)) from None

    def failure(outcome: UnitOutcome) -> Exception:
        b, lr = outcome.unit.params["batch_size"], outcome.unit.params["learning_rate"]
        return SweepRunError(
            f"the run at batch_size={b}, learning_rate={lr:g} raised "
            f"{type(outcome.error).__name__}: {outcome.error}"
        )

    statuses, lost = run_units(
        queue,
        units,
        work,
        failure=failure,
        keep_going=keep_going,
        progress=progress,
        bar_unit="run",
        bar_desc="sweep",
        wait=wait,
        on_wait=None if on_wait is None else lambda pending: on_wait([_point(s) for s in pending]),
    )
    summary = SweepSummary(storage=queue.storage_shown, study_name=queue.study_name)
    for status in statuses:
        summary.count(status)
        summary.points.append(_point(status))
    summary.notes.extend(
        f"{o.error} (its results stay on that trial; the point was handed to another worker)"
        for o in lost
    )
    return summary


def _train_one(
    claim: Claim,
    train: Callable[..., Any],
    steps: int | None,
    bar: Any,
    flush_every: int,
    flush_seconds: float,
) -> float:
    """Run the training function on one claimed grid point; returns its final loss."""
    b = int(claim.unit.params["batch_size"])
    lr = float(claim.unit.params["learning_rate"])
    trial = claim.trial
    reporter = Reporter(
        trial,
        flush_every=flush_every,
        flush_seconds=flush_seconds,
        on_report=_Postfix(bar, b, lr),
    )
    kwargs: dict[str, Any] = {"batch_size": b, "learning_rate": lr, "reporter": reporter}
    if steps is not None:
        kwargs["steps"] = steps
    try:
        train(**kwargs)
    except BaseException:
        # Keep what was reported; an error while storing it must not hide the run's own error.
        try:
            reporter.flush()
            trial.set_user_attr("records", reporter.records)
        except Exception:
            pass
        raise
    reporter.flush()
    trial.set_user_attr("records", reporter.records)
    if reporter.records == 0:
        raise NothingReportedError(
            "the training function returned without calling reporter.report(step, loss)"
        )
    final = reporter.last_loss
    # Optuna rejects NaN values; a diverged run is complete, with value +inf.
    return final if final is not None and math.isfinite(final) else math.inf


def _fail_legacy_running(queue: WorkQueue) -> None:
    """Fail RUNNING trials written by noisescale 0.1.0, which had no heartbeats: a killed
    worker of that version left its trial RUNNING for ever (and that version could not share a
    study with another worker anyway). Their units then run again."""
    from optuna.trial import TrialState

    for t in queue.trials((TrialState.RUNNING,)):
        if UNIT_ATTR not in t.user_attrs:
            queue.study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)


def _point(status: UnitStatus) -> GridPoint:
    """A unit's status as a grid point of the summary."""
    b = int(status.unit.params["batch_size"])
    lr = float(status.unit.params["learning_rate"])
    t = status.trial
    if status.state == "running elsewhere":
        return GridPoint(b, lr, status.state, t.number)
    if status.state == "failed":
        return GridPoint(
            b,
            lr,
            "failed",
            None if t is None else t.number,
            None,
            0 if t is None else _records(t),
            None if t is None else t.user_attrs.get("error"),
        )
    return GridPoint(b, lr, status.state, t.number, t.value, _records(t))


def read_study_runs(
    storage: str,
    study_name: str | Sequence[str] | None = None,
    *,
    metric: str = "loss",
) -> list[Run]:
    """The COMPLETE trials of one or more sweep studies as runs (their stored curves).

    Failed and running trials are left out: their curves end early, which would look like a
    slow run. ``study_name`` is a name, a shell pattern (``sweep-*``) or a list of them; without
    it the storage must hold exactly one study. Runs are named ``trial N``, or ``STUDY/trial N``
    when several studies are read.

    Raises:
        NoiseScaleInputError: no such study, several studies and no name, no finished run, or
            a study of branches (``noisescale branch``).
    """
    return read_study_runs_and_unfinished(storage, study_name, metric=metric)[0]


def read_study_runs_and_unfinished(
    storage: str,
    study_name: str | Sequence[str] | None = None,
    *,
    metric: str = "loss",
) -> tuple[list[Run], list[str]]:
    """:func:`read_study_runs` and :func:`unfinished_points` from one read of the trials.

    Workers may write while this reads: a point that completes between two separate reads would
    be in neither (not yet COMPLETE for the runs, no longer unfinished for the warning), left out
    of a fit without a word. From one read of each study's trials, every point is either a run
    or listed as unfinished.
    """
    names = select_studies(storage, study_name)
    trials = _study_trials(storage, names)
    return _runs_of(storage, trials, metric), _unfinished_of(trials)


def _study_trials(storage: str, names: Sequence[str]) -> dict[str, list[optuna.trial.FrozenTrial]]:
    """Every trial of each study, one read per study."""
    return {
        name: open_study(storage, name, create=False).get_trials(deepcopy=False) for name in names
    }


def _runs_of(
    storage: str, trials: Mapping[str, list[optuna.trial.FrozenTrial]], metric: str
) -> list[Run]:
    """The COMPLETE trials of each study (name → its trials) as runs."""
    from optuna.trial import TrialState

    from noisescale.branch.runner import KIND

    names = list(trials)
    rows: list[tuple[int, dict[str, Any]]] = []
    for name in names:
        prefix = f"{name}/" if len(names) > 1 else ""
        for trial in trials[name]:
            if trial.state != TrialState.COMPLETE:
                continue
            if "batch_size" not in trial.params or "learning_rate" not in trial.params:
                continue
            if trial.user_attrs.get("kind") == KIND:
                # Branches start from checkpoints of one run and count from each: as a grid of
                # runs from scratch their curves would give a confident, wrong B_crit.
                raise NoiseScaleInputError(
                    f"study {name!r} in {mask_url(storage)} holds branches of `noisescale "
                    f"branch` (trial {trial.number}: checkpoint {trial.params.get('checkpoint')}, "
                    f"seed {trial.params.get('seed')}), not the runs of a sweep: analyse it with "
                    f"noisescale branch --study {name}, and fit a sweep's study"
                )
            run_name = f"{prefix}trial {trial.number}"
            for chunk in _curve_chunks(trial.user_attrs):
                length = len(chunk.get("step", []))
                for i in range(length):
                    row = {k: v[i] for k, v in chunk.items()}
                    row.update(
                        run=run_name,
                        batch_size=trial.params["batch_size"],
                        learning_rate=trial.params["learning_rate"],
                    )
                    rows.append((trial.number, row))
    source = f"stud{'ies' if len(names) > 1 else 'y'} {', '.join(repr(n) for n in names)}"
    if not rows:
        raise NoiseScaleInputError(
            f"{source} in {mask_url(storage)} has no finished run with a curve"
        )
    return runs_from_rows(rows, metric=metric, source=source)


def unfinished_points(storage: str, study_names: Sequence[str]) -> list[str]:
    """The grid points of sweep studies without a COMPLETE trial, described for a warning:
    :func:`read_study_runs` leaves them out, so their batch sizes' fastest run may come from
    another learning rate. A point rerun to completion is not listed. (With the runs, read them
    by :func:`read_study_runs_and_unfinished`: one read, no point missing from both.)"""
    return _unfinished_of(_study_trials(storage, study_names))


def _unfinished_of(trials: Mapping[str, list[optuna.trial.FrozenTrial]]) -> list[str]:
    """:func:`unfinished_points` of each study's trials (name → its trials)."""
    from optuna.trial import TrialState

    words = {TrialState.FAIL: "failed", TrialState.RUNNING: "running"}
    out: list[str] = []
    for name, study_trials in trials.items():
        points: dict[tuple[Any, Any], list[optuna.trial.FrozenTrial]] = {}
        for t in study_trials:
            if "batch_size" in t.params and "learning_rate" in t.params:
                key = (t.params["batch_size"], t.params["learning_rate"])
                points.setdefault(key, []).append(t)
        prefix = f"{name}: " if len(trials) > 1 else ""
        for (b, lr), point_trials in sorted(points.items()):
            if not completed(point_trials):
                state = words.get(point_trials[-1].state, "not run yet")
                out.append(f"{prefix}batch_size={b:g}, learning_rate={lr:g} ({state})")
    return out


def trial_curve(trial: optuna.trial.FrozenTrial) -> dict[str, list[Any]]:
    """The curve a :class:`Reporter` stored on a trial: each column (``step``, ``loss``, and
    whatever else was reported) over all its chunks, in report order; ``None`` where a chunk
    lacks a column that others have."""
    chunks = _curve_chunks(trial.user_attrs)
    keys: list[str] = []
    for chunk in chunks:
        keys.extend(k for k in chunk if k not in keys)
    columns: dict[str, list[Any]] = {k: [] for k in keys}
    for chunk in chunks:
        length = len(chunk.get("step", []))
        for k in keys:
            columns[k].extend(chunk.get(k) or [None] * length)
    return columns


def _curve_chunks(user_attrs: dict[str, Any]) -> list[dict[str, list[Any]]]:
    keys = sorted(k for k in user_attrs if k.startswith(CURVE_PREFIX))
    chunks = []
    for key in keys:
        chunk = user_attrs[key]
        if isinstance(chunk, str):
            chunk = json.loads(chunk)
        chunks.append(chunk)
    return chunks


def _records(trial: optuna.trial.FrozenTrial) -> int:
    return int(trial.user_attrs.get("records", 0))
