"""Rows mixed in pairs (timm's Mixup and CutMix): ``paired_rows="flip"``.

timm mixes row i of a batch with row N − 1 − i (``x.flip(0)``). The two rows share both images,
so their gradients are not independent draws, and eq. A.2 — which takes every pair of rows in
different sub-batches (or every pair of examples) for independent — reads |G|² too high and
B_simple too low, with a tight interval. On a frozen MLP on UCI digits (timm's elementwise
mixing, Beta(0.8, 0.8), batch 64, 1,500 steps) the default read B_simple 139–144 where the
loop's noise scale is ≈ 420 (2026-12-04). With ``paired_rows="flip"`` each pair stays in one
sub-batch: 450–502, intervals holding it.

The closed form here: loss_i = w·r_i, so row i's gradient is r_i = λ·x_i + (1 − λ)·x_{N−1−i}
with one λ per batch (timm's default mode). A pair's gradients add up to x_i + x_{N−1−i}, so the
loop's gradient over N rows has the covariance of N unmixed examples: its noise scale is the
unmixed one, tr Σ / |μ|², whatever λ.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import noisescale
from noisescale.errors import NoiseScaleInputError
from noisescale.per_example.factors import Subbatches

D = 10
MU = torch.full((D,), 0.5)
SD = torch.linspace(0.5, 2.0, D)
TRUE_B_SIMPLE = float((SD**2).sum() / (MU @ MU))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(D, 1, bias=False)


def _run(steps: int, n: int, seed: int, **kw) -> noisescale.GradientNoiseTracker:
    model = _model()
    tracker = noisescale.GradientNoiseTracker(model, beta=1.0, **kw)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = MU + torch.randn(n, D, generator=g) * SD
        lam = float(torch.distributions.Beta(0.8, 0.8).sample())
        mixed = lam * x + (1 - lam) * x.flip(0)  # timm's Mixup, mode "batch"
        model(mixed).mean().backward()
        tracker.step()
        model.zero_grad()
    return tracker


def test_flip_pairs_read_the_loop_s_noise_scale():
    e = _run(300, 32, 0, paired_rows="flip").estimate()
    assert e.low <= TRUE_B_SIMPLE <= e.high
    # 300 steps: the averaged |G|² and tr Σ within a few of their standard errors
    assert e.g2 == pytest.approx(float(MU @ MU), rel=0.15)
    assert e.trace_sigma == pytest.approx(float((SD**2).sum()), rel=0.08)


def test_flip_pairs_interval_coverage():
    hits, reps = 0, 40
    for seed in range(reps):
        e = _run(60, 16, 100 + seed, paired_rows="flip").estimate()
        hits += e.low <= TRUE_B_SIMPLE <= e.high
    # 95% nominal; binomial sd with 40 runs is 0.034: allow ~3 sd below
    assert hits / reps >= 0.85


@pytest.mark.parametrize("kw", [{}, {"per_example_fraction": 1.0}], ids=["default", "exact"])
def test_without_paired_rows_mixed_pairs_read_low(kw):
    """What ``paired_rows`` is for: the same loop measured as if its rows were independent
    reads B_simple well below the truth, its interval excluding it."""
    e = _run(300, 32, 0, **kw).estimate()
    assert e.high < TRUE_B_SIMPLE and e.b_simple < 0.75 * TRUE_B_SIMPLE


@pytest.mark.parametrize("n,k", [(32, 8), (22, 8), (8, 8), (6, 2), (4, 8)])
def test_the_split_keeps_each_pair_in_one_sub_batch(n, k):
    for seed in range(5):
        s = Subbatches.split(n, k, torch.Generator().manual_seed(seed), torch.device("cpu"), "flip")
        rows = s.index.view(s.k, s.n).clone()
        real = torch.ones(s.k * s.n, dtype=torch.bool)
        real[s.pad] = False
        real = real.view(s.k, s.n)
        seen = []
        for j in range(s.k):
            members = set(rows[j][real[j]].tolist())
            assert len(members) == s.sizes[j]
            assert all(n - 1 - i in members for i in members)
            seen += members
        assert sorted(seen) == list(range(n))
        assert max(s.sizes) - min(s.sizes) <= 2 and s.k == min(k, n // 2)


def test_an_odd_batch_is_refused_and_the_next_even_one_measured():
    model = _model()
    tracker = noisescale.GradientNoiseTracker(model, paired_rows="flip")
    x = MU + torch.randn(9, D) * SD
    with pytest.raises(NoiseScaleInputError, match=r"N = 9 rows, an odd number"):
        model(x)
    model.zero_grad()
    model(x[:8]).mean().backward()
    tracker.step()
    assert tracker.steps == 1 and len(tracker.history) == 1


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"paired_rows": "roll"}, r"paired_rows must be None or 'flip'"),
        ({"paired_rows": "flip", "per_example_fraction": 1.0}, r"drop per_example_fraction"),
        ({"paired_rows": "flip", "per_example": False}, r"drop paired_rows"),
    ],
)
def test_bad_settings_are_refused(kw, match):
    with pytest.raises(NoiseScaleInputError, match=match):
        noisescale.GradientNoiseTracker(_model(), **kw)


def test_a_checkpoint_resumes_only_with_the_same_pairing():
    state = _run(3, 8, 0, paired_rows="flip").state_dict()
    again = noisescale.GradientNoiseTracker(_model(), paired_rows="flip")
    again.load_state_dict(state)
    assert again.steps == 3
    with pytest.raises(NoiseScaleInputError, match=r"paired_rows='flip'"):
        noisescale.GradientNoiseTracker(_model()).load_state_dict(state)


@pytest.mark.parametrize("name", ["mlp-factors", "sequence-products", "conv-products",
                                  "conv-grouped-products", "conv-patchify", "one-input-products",
                                  "norm-affines"])  # fmt: skip
def test_paired_sub_batch_norms_match_brute_force(name):
    """The sub-batch norms of pairs, by products and by merged factors alike, equal brute force
    for the sub-batches drawn (tests/test_subbatch.py's cases, an even batch)."""
    from test_subbatch import _cases, assert_subbatches_exact

    make, x = _cases()[name]
    x = x[: x.shape[0] // 2 * 2]
    torch.manual_seed(0)
    model = make().double()
    n = x.shape[0]

    def per(out):
        return out.sin().flatten(1).sum(1)

    assert_subbatches_exact(
        model,
        lambda: per(model(x)).mean(),
        lambda i: per(model(x[i : i + 1])).sum(),
        n,
        k=3,
        pairs="flip",
    )
