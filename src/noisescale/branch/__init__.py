"""The critical batch size measured directly, by branching one run (Merrill et al. 2025).

From checkpoints of a training run, short branches train for the same number of examples (or
tokens) at several batch sizes; comparing their losses at equal examples gives the local critical
batch size along the run, with an interval over data orders, beside the run's noise scale::

    from noisescale.branch import BranchPlan, run_branches, read_branches
    from noisescale.branch import local_critical_batch_sizes, fit_warmup

    plan = BranchPlan(checkpoints=(0, 20_000, 80_000), batch_sizes=(16, 32, 64, 128, 256),
                      base_batch_size=16, base_learning_rate=0.05, budget=8192, lr_rule="linear")
    run_branches(train, plan, storage="sqlite:///sweep.db")   # any number of workers at once
    results = local_critical_batch_sizes(read_branches("sqlite:///sweep.db"), tolerance=0.2)
    plan = fit_warmup(results, base_batch_size=16, total=200_000)   # a batch-size warm-up

- :mod:`~noisescale.branch.compare`: efficiencies, the local critical batch size at a tolerance,
  its eq. 2.11 reading B_crit, intervals (pure NumPy).
- :mod:`~noisescale.branch.runner`: the branches as units of a shared Optuna study (the
  training-function convention is documented there).
- :mod:`~noisescale.branch.side`: beside B_simple (and B_noise) of the main run.
- :mod:`~noisescale.branch.warmup`: a batch-size warm-up fitted to it, with predicted savings.
- :mod:`~noisescale.branch.page`: figures and a self-contained HTML page.
- :mod:`~noisescale.branch.synthetic`: branches with a known answer (tests, examples).

Optuna, torch and matplotlib are imported only by the functions that need them.
"""

from __future__ import annotations

from noisescale.branch.compare import (
    DEFAULT_TOLERANCE,
    REFERENCES,
    BatchEfficiency,
    BranchRun,
    LocalCriticalBatch,
    b_crit_from_efficiencies,
    efficiency,
    lag_at_budget,
    local_critical_batch_size,
    local_critical_batch_sizes,
    loss_at_budget,
    threshold_batch_size,
)
from noisescale.branch.runner import (
    DEFAULT_STUDY,
    LR_RULES,
    BranchPlan,
    BranchRunError,
    BranchState,
    BranchSummary,
    read_branches,
    run_branches,
)
from noisescale.branch.side import (
    NoisePoint,
    SideBySideRow,
    b_simple_trajectory,
    read_b_noise,
    side_by_side,
    window_b_simple,
)
from noisescale.branch.synthetic import SyntheticBranchModel
from noisescale.branch.warmup import WarmupPlan, fit_warmup, warmup_steps

__all__ = [
    "DEFAULT_STUDY",
    "DEFAULT_TOLERANCE",
    "LR_RULES",
    "REFERENCES",
    "BatchEfficiency",
    "BranchPlan",
    "BranchRun",
    "BranchRunError",
    "BranchState",
    "BranchSummary",
    "LocalCriticalBatch",
    "NoisePoint",
    "SideBySideRow",
    "SyntheticBranchModel",
    "WarmupPlan",
    "b_crit_from_efficiencies",
    "b_simple_trajectory",
    "efficiency",
    "fit_warmup",
    "lag_at_budget",
    "local_critical_batch_size",
    "local_critical_batch_sizes",
    "loss_at_budget",
    "read_b_noise",
    "read_branches",
    "run_branches",
    "side_by_side",
    "threshold_batch_size",
    "warmup_steps",
    "window_b_simple",
]
