"""The flat public API: every user-facing name from ``noisescale``, torch loaded only on use,
and every docstring example in the package run as a doctest."""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import noisescale

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", noisescale.__all__)
def test_every_public_name_resolves(name: str) -> None:
    assert getattr(noisescale, name) is not None
    assert name in dir(noisescale)


def test_all_lists_the_eager_and_the_lazy_names() -> None:
    eager = {"NoiseEstimate", "NoiseScaleInputError", "UnsupportedModuleError", "__version__"}
    assert sorted(noisescale.__all__) == noisescale.__all__
    assert set(noisescale.__all__) == eager | {"estimate_from_norms"} | set(noisescale._LAZY)


def test_the_names_the_readme_uses_are_public() -> None:
    for name in (
        "GradientNoiseTracker",
        "AdaptiveBatchSize",
        "BatchSizeRamp",
        "BNoiseTracker",
        "find_max_batch_size",
        "recommend_batch_size",
        "critical_batch_sizes",
        "per_example_sqnorms",
        "estimate_from_norms",
    ):
        assert name in noisescale.__all__
    from noisescale.schedule import AdaptiveBatchSize

    assert noisescale.AdaptiveBatchSize is AdaptiveBatchSize
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        _ = noisescale.nope  # type: ignore[attr-defined]


def test_import_and_the_math_do_not_load_torch() -> None:
    code = (
        "import sys, noisescale\n"
        "noisescale.steps_over_min(64, 32); noisescale.critical_batch_sizes\n"
        "heavy = [m for m in ('torch', 'optuna', 'matplotlib') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "noisescale.GradientNoiseTracker\n"
        "assert 'torch' in sys.modules\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO / "src")},
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def _modules_with_examples() -> list[str]:
    names = ["noisescale"]
    for info in pkgutil.walk_packages(noisescale.__path__, prefix="noisescale."):
        spec = importlib.util.find_spec(info.name)
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            continue
        if ">>>" in Path(spec.origin).read_text(encoding="utf-8"):
            names.append(info.name)
    return names


@pytest.mark.parametrize("module_name", _modules_with_examples())
def test_docstring_examples_run(module_name: str) -> None:
    module = importlib.import_module(module_name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
