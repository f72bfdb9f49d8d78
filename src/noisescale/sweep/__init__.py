"""The critical batch size from training runs (McCandlish et al. 2018, sec. 2.3, App. A.3, D.1).

Analysis (NumPy only)::

    from noisescale.sweep import read_runs, critical_batch_sizes

    runs = read_runs("runs.csv")                       # run, batch_size, learning_rate, step, loss
    for result in critical_batch_sizes(runs, goals=[0.5, 0.3], decay=0.9):
        print(result.goal, result.fit.b_crit, result.fit.b_crit_stderr)

Running a grid and storing it in an Optuna study: :func:`run_sweep` and
:func:`read_study_runs` in :mod:`noisescale.sweep.study` (Optuna is imported only there, when
called). Figures: :mod:`noisescale.sweep.plot`.
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
from noisescale.sweep.runs import Run, read_runs, runs_from_rows
from noisescale.sweep.study import Reporter, read_study_runs, run_sweep

__all__ = [
    "GoalCrossing",
    "GoalResult",
    "ParetoFit",
    "ParetoPoint",
    "Reporter",
    "Run",
    "b_simple_average",
    "critical_batch_sizes",
    "default_goals",
    "ema_lag",
    "ema_smoothed",
    "fit_pareto",
    "goal_crossing",
    "pareto_points",
    "read_runs",
    "read_study_runs",
    "run_sweep",
    "runs_from_rows",
]
