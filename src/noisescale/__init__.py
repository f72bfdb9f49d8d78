"""noisescale: the gradient noise scale of a real training run, and the decisions built on it.

Implements McCandlish et al. 2018, "An Empirical Model of Large-Batch Training".
"""

from __future__ import annotations

__version__ = "0.1.0"

from noisescale.errors import NoiseScaleInputError, UnsupportedModuleError
from noisescale.estimators import NoiseEstimate, estimate_from_norms
from noisescale.per_example import per_example_sqnorms
from noisescale.tracker import GradientNoiseTracker

__all__ = [
    "GradientNoiseTracker",
    "NoiseEstimate",
    "NoiseScaleInputError",
    "UnsupportedModuleError",
    "__version__",
    "estimate_from_norms",
    "per_example_sqnorms",
]
