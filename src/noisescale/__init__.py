"""noisescale: the gradient noise scale of a real training run, and the decisions built on it.

Implements McCandlish et al. 2018, "An Empirical Model of Large-Batch Training".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from noisescale.errors import NoiseScaleInputError, UnsupportedModuleError
from noisescale.estimators import NoiseEstimate, estimate_from_norms

if TYPE_CHECKING:
    from noisescale.per_example import (
        LayerRule,
        per_example_sqnorms,
        register_layer,
        unregister_layer,
    )
    from noisescale.tracker import GradientNoiseTracker

__version__ = "0.1.0"

__all__ = [
    "GradientNoiseTracker",
    "LayerRule",
    "NoiseEstimate",
    "NoiseScaleInputError",
    "UnsupportedModuleError",
    "__version__",
    "estimate_from_norms",
    "per_example_sqnorms",
    "register_layer",
    "unregister_layer",
]

# The torch-backed parts load on first use, so that `noisescale calc --help` and the pure math
# do not pay for importing torch.
_LAZY = {
    "GradientNoiseTracker": "noisescale.tracker",
    "per_example_sqnorms": "noisescale.per_example",
    "register_layer": "noisescale.per_example",
    "unregister_layer": "noisescale.per_example",
    "LayerRule": "noisescale.per_example",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'noisescale' has no attribute {name!r}")
