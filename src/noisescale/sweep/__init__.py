"""The critical batch size from training runs (McCandlish et al. 2018, sec. 2.3, App. A.3, D.1).

Analysis (NumPy only)::

    from noisescale.sweep import read_runs, critical_batch_sizes

    runs = read_runs("runs.csv")                       # run, batch_size, learning_rate, step, loss
    for result in critical_batch_sizes(runs, goals=[0.5, 0.3], decay=0.9):
        print(result.goal, result.fit.b_crit, result.fit.b_crit_stderr)

Running a grid and storing it in an Optuna study that any number of workers share:
:func:`run_sweep` and :func:`read_study_runs` (:mod:`noisescale.sweep.study`), on top of
:class:`WorkQueue` (:mod:`noisescale.sweep.queue`), which runs "one claimed unit of work" of any
kind; storages, their passwords and ``NOISESCALE_STORAGE``: :mod:`noisescale.sweep.storage`.
Optuna is imported only when these are called. Figures: :mod:`noisescale.sweep.plot`.
"""

from __future__ import annotations

from noisescale.sweep.pareto import (
    GoalCrossing,
    GoalResult,
    ParetoFit,
    ParetoPoint,
    b_simple_average,
    critical_batch_sizes,
    default_goals,
    ema_lag,
    ema_smoothed,
    fit_pareto,
    goal_crossing,
    pareto_points,
)
from noisescale.sweep.queue import Claim, UnitOutcome, WorkQueue, WorkUnit, unit_key
from noisescale.sweep.runs import Run, duplicate_settings, read_runs, runs_from_rows
from noisescale.sweep.storage import STORAGE_ENV, mask_url, resolve_storage_url
from noisescale.sweep.study import Reporter, read_study_runs, run_sweep

__all__ = [
    "STORAGE_ENV",
    "Claim",
    "GoalCrossing",
    "GoalResult",
    "ParetoFit",
    "ParetoPoint",
    "Reporter",
    "Run",
    "UnitOutcome",
    "WorkQueue",
    "WorkUnit",
    "b_simple_average",
    "critical_batch_sizes",
    "default_goals",
    "duplicate_settings",
    "ema_lag",
    "ema_smoothed",
    "fit_pareto",
    "goal_crossing",
    "mask_url",
    "pareto_points",
    "read_runs",
    "read_study_runs",
    "resolve_storage_url",
    "run_sweep",
    "runs_from_rows",
    "unit_key",
]
