"""noisescale: the gradient noise scale of a real training run, and the decisions built on it.

Implements McCandlish et al. 2018, "An Empirical Model of Large-Batch Training". Every
user-facing name is importable from here (optax style); the torch-backed ones load on first
use, so ``import noisescale`` and the pure math stay light:

>>> import noisescale
>>> noisescale.steps_over_min(4096, 2048)  # S/S_min = 1 + B_noise/B (eq. 2.11)
1.5
>>> noisescale.examples_over_min(4096, 2048)  # E/E_min = 1 + B/B_noise
3.0
>>> noisescale.regime(4096, 2048)
'balanced'
>>> e = noisescale.estimate_from_norms(b_small=1, sqnorm_small=10.0, b_big=100, sqnorm_big=1.09)
>>> round(e.b_simple, 6)  # tr Σ/|G|² from two batch sizes (eq. A.2, 2.9)
9.0

In a training loop: ``tracker = noisescale.GradientNoiseTracker(model)``, then
``tracker.step(loss=loss)`` after each backward pass.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from noisescale.errors import NoiseScaleInputError, UnsupportedModuleError
from noisescale.estimators import NoiseEstimate, estimate_from_norms

if TYPE_CHECKING:
    from noisescale.branch import (
        BranchPlan,
        LocalCriticalBatch,
        WarmupPlan,
        fit_warmup,
        local_critical_batch_sizes,
        read_branches,
        run_branches,
    )
    from noisescale.hardware import (
        Recommendation,
        ThroughputProfile,
        accumulation_split,
        find_max_batch_size,
        profile_throughput,
        recommend_batch_size,
    )
    from noisescale.hessian import (
        BNoiseEstimate,
        BNoiseTracker,
        fit_delta_l_opt,
        measure_b_noise,
        measure_delta_l_opt,
    )
    from noisescale.per_example import (
        LayerRule,
        per_example_sqnorms,
        register_layer,
        supported_layers,
        unregister_layer,
    )
    from noisescale.report.data import load_history, report_data
    from noisescale.report.explore import explore_html
    from noisescale.schedule import (
        AdaptiveBatchSize,
        BatchSizeRamp,
        ResizableBatchSampler,
        ramp_batch_size,
        scale_lr,
        target_batch_size,
    )
    from noisescale.sweep import (
        Reporter,
        Run,
        WorkQueue,
        WorkUnit,
        critical_batch_sizes,
        fit_pareto,
        read_runs,
        read_study_runs,
        run_sweep,
    )
    from noisescale.theory import (
        adaptive_batch_size,
        b_crit_kaplan,
        b_noise_at_temperature,
        examples_over_min,
        lr_over_max,
        regime,
        scaled_lr,
        steps_over_min,
        temperature,
    )
    from noisescale.tracker import GradientNoiseTracker

__version__ = "0.1.0"

# Where each lazily loaded name lives. One line per name: a new public name (a layer-rule
# registry, say) is one more entry here and in __all__.
_LAZY = {
    # measuring
    "GradientNoiseTracker": "noisescale.tracker",
    "per_example_sqnorms": "noisescale.per_example",
    "supported_layers": "noisescale.per_example",
    "register_layer": "noisescale.per_example",
    "unregister_layer": "noisescale.per_example",
    "LayerRule": "noisescale.per_example",
    "BNoiseTracker": "noisescale.hessian",
    "BNoiseEstimate": "noisescale.hessian",
    "measure_b_noise": "noisescale.hessian",
    "measure_delta_l_opt": "noisescale.hessian",
    "fit_delta_l_opt": "noisescale.hessian",
    # the paper's closed forms
    "lr_over_max": "noisescale.theory",
    "steps_over_min": "noisescale.theory",
    "examples_over_min": "noisescale.theory",
    "regime": "noisescale.theory",
    "scaled_lr": "noisescale.theory",
    "temperature": "noisescale.theory",
    "b_noise_at_temperature": "noisescale.theory",
    "adaptive_batch_size": "noisescale.theory",
    "b_crit_kaplan": "noisescale.theory",
    # using it while training
    "AdaptiveBatchSize": "noisescale.schedule",
    "BatchSizeRamp": "noisescale.schedule",
    "ResizableBatchSampler": "noisescale.schedule",
    "target_batch_size": "noisescale.schedule",
    "scale_lr": "noisescale.schedule",
    "ramp_batch_size": "noisescale.schedule",
    # hardware
    "find_max_batch_size": "noisescale.hardware",
    "profile_throughput": "noisescale.hardware",
    "recommend_batch_size": "noisescale.hardware",
    "accumulation_split": "noisescale.hardware",
    "ThroughputProfile": "noisescale.hardware",
    "Recommendation": "noisescale.hardware",
    # critical batch size from runs
    "critical_batch_sizes": "noisescale.sweep",
    "fit_pareto": "noisescale.sweep",
    "read_runs": "noisescale.sweep",
    "Run": "noisescale.sweep",
    "run_sweep": "noisescale.sweep",
    "read_study_runs": "noisescale.sweep",
    "Reporter": "noisescale.sweep",
    "WorkQueue": "noisescale.sweep",
    "WorkUnit": "noisescale.sweep",
    # critical batch size from branches of one run
    "BranchPlan": "noisescale.branch",
    "run_branches": "noisescale.branch",
    "read_branches": "noisescale.branch",
    "local_critical_batch_sizes": "noisescale.branch",
    "LocalCriticalBatch": "noisescale.branch",
    "fit_warmup": "noisescale.branch",
    "WarmupPlan": "noisescale.branch",
    # reports and pages
    "load_history": "noisescale.report.data",
    "report_data": "noisescale.report.data",
    "explore_html": "noisescale.report.explore",
}

__all__ = [
    "AdaptiveBatchSize",
    "BNoiseEstimate",
    "BNoiseTracker",
    "BatchSizeRamp",
    "BranchPlan",
    "GradientNoiseTracker",
    "LayerRule",
    "LocalCriticalBatch",
    "NoiseEstimate",
    "NoiseScaleInputError",
    "Recommendation",
    "Reporter",
    "ResizableBatchSampler",
    "Run",
    "ThroughputProfile",
    "UnsupportedModuleError",
    "WarmupPlan",
    "WorkQueue",
    "WorkUnit",
    "__version__",
    "accumulation_split",
    "adaptive_batch_size",
    "b_crit_kaplan",
    "b_noise_at_temperature",
    "critical_batch_sizes",
    "estimate_from_norms",
    "examples_over_min",
    "explore_html",
    "find_max_batch_size",
    "fit_delta_l_opt",
    "fit_pareto",
    "fit_warmup",
    "load_history",
    "local_critical_batch_sizes",
    "lr_over_max",
    "measure_b_noise",
    "measure_delta_l_opt",
    "per_example_sqnorms",
    "profile_throughput",
    "ramp_batch_size",
    "read_branches",
    "read_runs",
    "read_study_runs",
    "recommend_batch_size",
    "regime",
    "register_layer",
    "report_data",
    "run_branches",
    "run_sweep",
    "scale_lr",
    "scaled_lr",
    "steps_over_min",
    "supported_layers",
    "target_batch_size",
    "temperature",
    "unregister_layer",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'noisescale' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
