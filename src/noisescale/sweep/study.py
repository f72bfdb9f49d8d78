"""Run a batch-size × learning-rate grid of a training function and keep it in an Optuna study.

Each grid point is one Optuna trial: its parameters are ``batch_size`` and ``learning_rate``,
its value the final loss, and its curve lives in user attributes ``curve_00000``,
``curve_00001``, … — column-oriented JSON chunks (``{"step": [...], "loss": [...], ...}``)
written every ``flush_every`` reports, so a killed run keeps all but its last chunk. Any
database URL Optuna accepts works (SQLite by default).

Resuming: a grid point counts as done when a COMPLETE trial with the same batch size, learning
rate and ``steps`` exists. A run that raised (including Ctrl-C) is marked FAIL with its partial
curve kept, and is run again next time; a trial a killed process left RUNNING is marked FAIL at
the start of the next sweep. Two sweeps on one study at once are therefore not supported.

Optuna is imported inside the functions, so ``import noisescale.sweep`` does not need it.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from noisescale.errors import NoiseScaleInputError
from noisescale.sweep.runs import Run, runs_from_rows

if TYPE_CHECKING:
    import optuna

#: Where ``noisescale sweep`` keeps its study unless told otherwise.
DEFAULT_STORAGE = "sqlite:///sweep.db"
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
    """One (batch size, learning rate) of the grid and what happened to it."""

    batch_size: int
    learning_rate: float
    state: str
    trial_number: int | None = None
    final_loss: float | None = None
    records: int = 0
    error: str | None = None


@dataclass
class SweepSummary:
    """The grid after a sweep: every point, and which ran now, were skipped or failed."""

    storage: str
    study_name: str
    points: list[GridPoint] = field(default_factory=list)
    ran: int = 0
    skipped: int = 0
    failed: int = 0

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {
            "storage": self.storage,
            "study": self.study_name,
            "ran": self.ran,
            "skipped": self.skipped,
            "failed": self.failed,
            "runs": [p.__dict__ for p in self.points],
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
        NoiseScaleInputError: a storage URL Optuna cannot open, or a missing study.
    """
    import optuna

    try:
        if create:
            return optuna.create_study(
                storage=storage,
                study_name=study_name,
                direction="minimize",
                load_if_exists=True,
                # Parameters are fixed per trial; the sampler is never consulted for them.
                sampler=optuna.samplers.RandomSampler(seed=0),
            )
        return optuna.load_study(
            storage=storage, study_name=study_name, sampler=optuna.samplers.RandomSampler(seed=0)
        )
    except KeyError as err:
        names = study_names(storage)
        raise NoiseScaleInputError(
            f"no study {study_name!r} in {storage}; studies there: {', '.join(names) or 'none'}"
        ) from err
    except (ValueError, ImportError) as err:
        raise NoiseScaleInputError(f"cannot open storage {storage!r}: {err}") from err
    except Exception as err:
        # SQLAlchemy raises its own error types for unreachable or malformed databases.
        if type(err).__module__.startswith("sqlalchemy"):
            raise NoiseScaleInputError(f"cannot open storage {storage!r}: {err}") from err
        raise


def study_names(storage: str) -> list[str]:
    """The names of the studies in ``storage``."""
    import optuna

    try:
        return [s.study_name for s in optuna.get_all_study_summaries(storage=storage)]
    except Exception as err:
        raise NoiseScaleInputError(f"cannot open storage {storage!r}: {err}") from err


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
) -> SweepSummary:
    """Run ``train`` at every (batch size, learning rate) not yet done and store the curves.

    ``train`` is called as ``train(batch_size=B, learning_rate=lr, reporter=reporter)`` (plus
    ``steps=N`` when ``steps`` is given) and calls ``reporter.report(step, loss, ...)`` as it
    trains (see :class:`Reporter`). The grid runs batch size by batch size, in the order given.

    Raises:
        SweepRunError: ``train`` raised (unless ``keep_going``); the run is stored as failed.
        KeyboardInterrupt: after storing the interrupted run as failed.
        NoiseScaleInputError: an empty grid, a non-positive batch size, a run that reported
            nothing, or a storage that cannot be opened.
    """
    from optuna.trial import TrialState
    from tqdm.auto import tqdm

    if not batch_sizes or not learning_rates:
        raise NoiseScaleInputError("the grid needs at least one batch size and one learning rate")
    if any(int(b) != b or b <= 0 for b in batch_sizes):
        raise NoiseScaleInputError("batch sizes must be positive integers")
    if any(not (math.isfinite(lr) and lr > 0) for lr in learning_rates):
        raise NoiseScaleInputError("learning rates must be positive numbers")
    study = open_study(storage, study_name, create=True)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        # Left RUNNING by a killed process: its chunks stay, the grid point runs again.
        study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
    done = {
        _grid_key(t.params["batch_size"], t.params["learning_rate"], t.user_attrs.get("steps")): t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if "batch_size" in t.params and "learning_rate" in t.params
    }
    grid = [(int(b), float(lr)) for b in batch_sizes for lr in learning_rates]
    summary = SweepSummary(storage=storage, study_name=study_name)
    todo = []
    for b, lr in grid:
        previous = done.get(_grid_key(b, lr, steps))
        if previous is None:
            todo.append((b, lr))
        else:
            summary.skipped += 1
            summary.points.append(
                GridPoint(b, lr, "skipped", previous.number, previous.value, _records(previous))
            )
    bar = tqdm(
        total=len(grid), initial=summary.skipped, unit="run", desc="sweep", disable=not progress
    )
    try:
        for b, lr in todo:
            trial = study.ask()
            trial.suggest_int("batch_size", b, b)
            trial.suggest_float("learning_rate", lr, lr)
            trial.set_user_attr("steps", steps)
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
            except BaseException as err:
                # Ctrl-C and crashes alike: keep what was reported, mark the run failed so the
                # next invocation reruns it, then let the error through.
                reporter.flush()
                trial.set_user_attr("records", reporter.records)
                trial.set_user_attr("error", f"{type(err).__name__}: {err}"[:2000])
                study.tell(trial, state=TrialState.FAIL)
                summary.failed += 1
                summary.points.append(
                    GridPoint(b, lr, "failed", trial.number, None, reporter.records, repr(err))
                )
                bar.update(1)
                if isinstance(err, KeyboardInterrupt | SystemExit):
                    raise
                if not keep_going:
                    raise SweepRunError(
                        f"the run at batch_size={b}, learning_rate={lr:g} raised "
                        f"{type(err).__name__}: {err}"
                    ) from err
                continue
            reporter.flush()
            trial.set_user_attr("records", reporter.records)
            if reporter.records == 0:
                trial.set_user_attr("error", "the training function reported nothing")
                study.tell(trial, state=TrialState.FAIL)
                raise NoiseScaleInputError(
                    "the training function returned without calling reporter.report(step, loss)"
                )
            final = reporter.last_loss
            # Optuna rejects NaN values; a diverged run is complete, with value +inf.
            value = final if final is not None and math.isfinite(final) else math.inf
            study.tell(trial, value)
            summary.ran += 1
            summary.points.append(
                GridPoint(b, lr, "complete", trial.number, value, reporter.records)
            )
            bar.update(1)
    finally:
        bar.close()
    order = {key: i for i, key in enumerate(grid)}
    summary.points.sort(key=lambda p: order[(p.batch_size, p.learning_rate)])
    return summary


def read_study_runs(
    storage: str, study_name: str | None = None, *, metric: str = "loss"
) -> list[Run]:
    """The COMPLETE trials of a sweep study as runs (their stored curves).

    Failed and running trials are left out: their curves end early, which would look like a
    slow run. Without ``study_name`` the storage must hold exactly one study.

    Raises:
        NoiseScaleInputError: no such study, several studies and no name, or no finished run.
    """
    from optuna.trial import TrialState

    if study_name is None:
        names = study_names(storage)
        if len(names) != 1:
            raise NoiseScaleInputError(
                f"{storage} holds {len(names)} studies ({', '.join(names) or 'none'}); "
                "name one with --study"
            )
        study_name = names[0]
    study = open_study(storage, study_name, create=False)
    rows: list[tuple[int, dict[str, Any]]] = []
    source = f"study {study_name!r}"
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if "batch_size" not in trial.params or "learning_rate" not in trial.params:
            continue
        name = f"trial {trial.number}"
        for chunk in _curve_chunks(trial.user_attrs):
            length = len(chunk.get("step", []))
            for i in range(length):
                row = {k: v[i] for k, v in chunk.items()}
                row.update(
                    run=name,
                    batch_size=trial.params["batch_size"],
                    learning_rate=trial.params["learning_rate"],
                )
                rows.append((trial.number, row))
    if not rows:
        raise NoiseScaleInputError(f"{source} in {storage} has no finished run with a curve")
    return runs_from_rows(rows, metric=metric, source=source)


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


def _grid_key(batch_size: float, learning_rate: float, steps: int | None) -> tuple[int, str, Any]:
    # Learning rates are compared at 12 significant digits so that 0.1 typed twice matches.
    return int(batch_size), f"{float(learning_rate):.12g}", steps
