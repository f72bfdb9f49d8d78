"""Training runs of a batch-size × learning-rate grid, and reading them from CSV or JSON Lines.

A run is one training curve at one (batch size, learning rate): the metric (loss or error) at each
recorded step, the examples processed so far, and optionally the simple noise scale B_simple
(paper eq. 2.9) measured along the way. Pure Python and NumPy: no torch, no plotting.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from noisescale.errors import NoiseScaleInputError

#: Columns every runs file must have, besides the metric column (``loss`` or ``error``).
REQUIRED_COLUMNS = ("run", "batch_size", "learning_rate", "step")
#: Columns a runs file may have.
OPTIONAL_COLUMNS = ("examples", "b_simple")
#: The metrics ``noisescale fit`` knows; both are "lower is better".
METRICS = ("loss", "error")


@dataclass(frozen=True, eq=False)
class Run:
    """One training run: the metric curve at a fixed (batch size, learning rate).

    Build it with :meth:`from_arrays`, which sorts, validates and truncates the curve.

    Attributes:
        name: the run's identifier.
        batch_size: the run's batch size in examples (or tokens); for a run whose batch size
            changes, its nominal one (the per-step batch sizes come from ``examples``).
        learning_rate: the run's learning rate.
        step: optimizer steps of the recorded points, strictly increasing.
        metric: loss or error at those steps (finite; lower is better).
        examples: cumulative training examples processed at those steps.
        b_simple: the simple noise scale B_simple at those steps (NaN where not measured), or
            ``None`` when the run has none.
        diverged_at_step: the first step whose metric was non-finite (the curve stops before
            it), or ``None``.
    """

    name: str
    batch_size: float
    learning_rate: float
    step: np.ndarray
    metric: np.ndarray
    examples: np.ndarray
    b_simple: np.ndarray | None
    diverged_at_step: float | None = None

    @classmethod
    def from_arrays(
        cls,
        name: str,
        batch_size: float,
        learning_rate: float,
        step: Sequence[float] | np.ndarray,
        metric: Sequence[float] | np.ndarray,
        *,
        examples: Sequence[float] | np.ndarray | None = None,
        b_simple: Sequence[float | None] | np.ndarray | None = None,
    ) -> Run:
        """A run from its columns; points are sorted by step.

        Without ``examples`` the run is at a fixed batch size: examples = batch_size × step.
        The curve ends before the first non-finite metric value (a diverged run reaches no goal
        after that). Entries of ``b_simple`` that are ``None``, NaN or ≤ 0 mean "not measured".

        Raises:
            NoiseScaleInputError: mismatched lengths, a repeated step, a batch size that is not
                positive, a non-finite learning rate or step, or examples that decrease.
        """
        step_arr = np.asarray(step, dtype=float)
        metric_arr = np.asarray(metric, dtype=float)
        n = step_arr.size
        if metric_arr.size != n:
            raise NoiseScaleInputError(f"run {name!r}: step and metric have different lengths")
        if n == 0:
            raise NoiseScaleInputError(f"run {name!r} has no points")
        if not (math.isfinite(batch_size) and batch_size > 0):
            raise NoiseScaleInputError(
                f"run {name!r}: batch_size must be a positive number, got {batch_size}"
            )
        if not (math.isfinite(learning_rate) and learning_rate > 0):
            # (0 or below was accepted until 2026-12-05: `fit` printed "best lr 0", a hunt)
            raise NoiseScaleInputError(
                f"run {name!r}: learning_rate must be a positive number, got {learning_rate}"
            )
        if not np.all(np.isfinite(step_arr)):
            raise NoiseScaleInputError(f"run {name!r}: every step must be a finite number")
        order = np.argsort(step_arr, kind="stable")
        step_arr = step_arr[order]
        metric_arr = metric_arr[order]
        repeated = step_arr[1:][np.diff(step_arr) == 0]
        if repeated.size:
            raise NoiseScaleInputError(f"run {name!r}: step {repeated[0]:g} appears twice")
        if examples is None:
            examples_arr = float(batch_size) * step_arr
        else:
            examples_arr = np.asarray(examples, dtype=float)[order]
            if examples_arr.size != n or not np.all(np.isfinite(examples_arr)):
                raise NoiseScaleInputError(
                    f"run {name!r}: examples must be a finite number at every step"
                )
            if np.any(np.diff(examples_arr) < 0):
                raise NoiseScaleInputError(f"run {name!r}: examples decrease between steps")
        if b_simple is None:
            b_simple_arr = None
        else:
            b_simple_arr = np.array(
                [np.nan if v is None else float(v) for v in b_simple], dtype=float
            )[order]
            if b_simple_arr.size != n:
                raise NoiseScaleInputError(f"run {name!r}: b_simple has the wrong length")
            b_simple_arr[~(b_simple_arr > 0)] = np.nan
        bad = np.flatnonzero(~np.isfinite(metric_arr))
        diverged_at = None
        if bad.size:
            diverged_at = float(step_arr[bad[0]])
            keep = slice(0, int(bad[0]))
            step_arr, metric_arr, examples_arr = (
                step_arr[keep],
                metric_arr[keep],
                examples_arr[keep],
            )
            if b_simple_arr is not None:
                b_simple_arr = b_simple_arr[keep]
        return cls(
            name=name,
            batch_size=float(batch_size),
            learning_rate=float(learning_rate),
            step=step_arr,
            metric=metric_arr,
            examples=examples_arr,
            b_simple=b_simple_arr,
            diverged_at_step=diverged_at,
        )

    def step_batch_sizes(self) -> np.ndarray:
        """The batch size of the steps each recorded point stands for (examples per step).

        Each point stands for the steps since the previous point; the first point for the steps
        since step 0 (or, when it is at step 0, the same as the second point).
        """
        if self.step.size == 0:
            return np.empty(0)
        d_step = np.diff(self.step, prepend=0.0)
        d_examples = np.diff(self.examples, prepend=0.0)
        sizes = np.full(self.step.size, self.batch_size)
        ok = d_step > 0
        sizes[ok] = d_examples[ok] / d_step[ok]
        if not ok[0] and self.step.size > 1:
            sizes[0] = sizes[1]
        return sizes


def read_runs(path: str | Path, *, metric: str = "loss") -> list[Run]:
    """Runs from a CSV or JSON Lines file with one row per recorded step.

    Columns: ``run, batch_size, learning_rate, step`` and the metric column (``loss`` or
    ``error``), optionally ``examples`` (cumulative examples, for runs whose batch size changes)
    and ``b_simple``. A row whose metric is empty or null is a step where the metric was not
    measured and is skipped; ``nan``/``inf`` marks a diverged run. The format is JSON Lines when
    the first non-blank character is ``{``, CSV otherwise.

    Raises:
        NoiseScaleInputError: a missing or empty file, missing columns, a non-numeric value, or
            inconsistent runs (see :meth:`Run.from_arrays`).
    """
    if metric not in METRICS:
        raise NoiseScaleInputError(f"unknown metric {metric!r}; choose one of {METRICS}")
    file = Path(path)
    if not file.is_file():
        raise NoiseScaleInputError(f"no such runs file: {file}")
    try:
        text = file.read_text(encoding="utf-8-sig")  # Excel writes CSV with a BOM
    except (OSError, UnicodeDecodeError) as err:
        raise NoiseScaleInputError(f"cannot read runs file {file}: {err}") from err
    if not text.strip():
        raise NoiseScaleInputError(f"runs file {file} is empty")
    if text.lstrip().startswith("{"):
        rows = list(_json_lines_rows(text, file))
    else:
        rows = list(_csv_rows(text, file))
    if not rows:
        raise NoiseScaleInputError(f"runs file {file} has a header but no rows")
    return runs_from_rows(rows, metric=metric, source=str(file))


def runs_from_rows(
    rows: Iterable[tuple[int, Mapping[str, Any]]], *, metric: str = "loss", source: str = "runs"
) -> list[Run]:
    """Runs from rows ``(line number, {column: value})``; values may be numbers or strings.

    Raises:
        NoiseScaleInputError: as :func:`read_runs`.
    """
    rows = list(rows)
    columns: set[str] = set()
    for _, row in rows:
        columns.update(k for k, v in row.items() if v is not None)
    missing = [c for c in (*REQUIRED_COLUMNS, metric) if c not in columns]
    if missing:
        raise NoiseScaleInputError(
            f"{source}: missing column(s) {', '.join(missing)}; a runs file needs "
            f"{', '.join((*REQUIRED_COLUMNS, metric))} and may have {', '.join(OPTIONAL_COLUMNS)}"
        )
    has_examples = "examples" in columns
    has_b_simple = "b_simple" in columns
    grouped: dict[str, dict[str, list[Any]]] = {}
    settings: dict[str, tuple[float, float, int]] = {}
    for line, row in rows:
        value = _number(row.get(metric), metric, line, source)
        if value is None:
            continue
        name = row.get("run")
        if name is None or str(name).strip() == "":
            raise NoiseScaleInputError(f"{source}, line {line}: the run column is empty")
        name = str(name)
        batch_size = _required_number(row, "batch_size", line, source)
        learning_rate = _required_number(row, "learning_rate", line, source)
        if name not in settings:
            settings[name] = (batch_size, learning_rate, line)
            grouped[name] = {"step": [], "metric": [], "examples": [], "b_simple": []}
        elif settings[name][:2] != (batch_size, learning_rate):
            raise NoiseScaleInputError(
                f"{source}, line {line}: run {name!r} changes batch_size or learning_rate "
                f"(first seen on line {settings[name][2]}); give each setting its own run name"
            )
        cols = grouped[name]
        cols["step"].append(_required_number(row, "step", line, source))
        cols["metric"].append(value)
        if has_examples:
            cols["examples"].append(_number(row.get("examples"), "examples", line, source))
        if has_b_simple:
            cols["b_simple"].append(_number(row.get("b_simple"), "b_simple", line, source))
    if not grouped:
        raise NoiseScaleInputError(f"{source}: no row has a {metric} value")
    runs = []
    for name, cols in grouped.items():
        batch_size, learning_rate, _ = settings[name]
        examples = cols["examples"] if has_examples else None
        if examples is not None and any(v is None for v in examples):
            if not all(v is None for v in examples):
                raise NoiseScaleInputError(
                    f"{source}: run {name!r} has examples on some rows and not on others"
                )
            examples = None
        runs.append(
            Run.from_arrays(
                name,
                batch_size,
                learning_rate,
                cols["step"],
                cols["metric"],
                examples=examples,
                b_simple=cols["b_simple"] if has_b_simple else None,
            )
        )
    return runs


def duplicate_settings(runs: Sequence[Run]) -> list[tuple[float, float, list[str]]]:
    """Settings (batch size, learning rate) that more than one run has, with those runs' names.

    Several runs per setting are fine when they are seeds (the fastest is kept at each goal,
    which biases S slightly low); they are a mistake when a sweep ran a grid point twice or
    two studies overlap, which is why ``noisescale fit`` reports them.
    """
    by_setting: dict[tuple[float, float], list[str]] = {}
    for run in runs:
        by_setting.setdefault((run.batch_size, run.learning_rate), []).append(run.name)
    return [(b, lr, names) for (b, lr), names in by_setting.items() if len(names) > 1]


def _csv_rows(text: str, file: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(text.splitlines())
    if reader.fieldnames is None:
        raise NoiseScaleInputError(f"runs file {file} has no header line")
    for row in reader:
        clean = {k.strip(): (v.strip() if isinstance(v, str) else v) for k, v in row.items() if k}
        yield reader.line_num, {k: (None if v in ("", None) else v) for k, v in clean.items()}


def _json_lines_rows(text: str, file: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise NoiseScaleInputError(f"{file}, line {line_number}: not JSON ({err})") from err
        if not isinstance(row, dict):
            raise NoiseScaleInputError(f"{file}, line {line_number}: expected a JSON object")
        yield line_number, row


def _number(value: Any, column: str, line: int, source: str) -> float | None:
    """A cell as a float; ``None`` for an empty cell or JSON null."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise NoiseScaleInputError(f"{source}, line {line}: {column} is not a number: {value!r}")
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise NoiseScaleInputError(
            f"{source}, line {line}: {column} is not a number: {value!r}"
        ) from None


def _required_number(row: Mapping[str, Any], column: str, line: int, source: str) -> float:
    value = _number(row.get(column), column, line, source)
    if value is None:
        raise NoiseScaleInputError(f"{source}, line {line}: {column} is empty")
    return value
