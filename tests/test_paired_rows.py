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


def _track(steps: int, seed: int, batch, **kw) -> noisescale.GradientNoiseTracker:
    """A tracker on the linear model over ``steps`` steps of ``batch(g)``'s rows, each step's
    loss their mean."""
    model = _model()
    tracker = noisescale.GradientNoiseTracker(model, beta=1.0, **kw)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        model(batch(g)).mean().backward()
        tracker.step()
        model.zero_grad()
    return tracker


def _run(steps: int, n: int, seed: int, **kw) -> noisescale.GradientNoiseTracker:
    """timm's Mixup, mode "batch": one λ per batch, row i mixed with row N − 1 − i."""

    def mixed(g: torch.Generator) -> torch.Tensor:
        x = MU + torch.randn(n, D, generator=g) * SD
        lam = float(torch.distributions.Beta(0.8, 0.8).sample())
        return lam * x + (1 - lam) * x.flip(0)

    return _track(steps, seed, mixed, **kw)


def test_flip_pairs_read_the_loop_s_noise_scale():
    e = _run(300, 32, 0, paired_rows="flip").estimate()
    assert e.low <= TRUE_B_SIMPLE <= e.high
    # 300 steps: the averaged |G|² and tr Σ within a few of their standard errors
    assert e.g2 == pytest.approx(float(MU @ MU), rel=0.15)
    assert e.trace_sigma == pytest.approx(float((SD**2).sum()), rel=0.08)


def test_flip_pairs_interval_coverage():
    hits, reps = 0, 40
    for seed in range(reps):
        e = _run(60, 20, 100 + seed, paired_rows="flip").estimate()  # (sizes 4 and 2)
        hits += e.low <= TRUE_B_SIMPLE <= e.high
    # 95% nominal; binomial sd with 40 runs is 0.034: allow ~3 sd below
    assert hits / reps >= 0.85


@pytest.mark.parametrize("kw", [{}, {"per_example_fraction": 1.0}], ids=["default", "exact"])
def test_without_paired_rows_mixed_pairs_read_low(kw):
    """What ``paired_rows`` is for: the same loop measured as if its rows were independent
    reads B_simple well below the truth, its interval excluding it."""
    e = _run(300, 32, 0, **kw).estimate()
    assert e.high < TRUE_B_SIMPLE and e.b_simple < 0.75 * TRUE_B_SIMPLE


@pytest.mark.parametrize("pairs", ["flip", "halves"])
@pytest.mark.parametrize("n,k", [(32, 8), (22, 8), (8, 8), (6, 2), (4, 8)])
def test_the_split_keeps_each_pair_in_one_sub_batch(n, k, pairs):
    def partner(i: int) -> int:
        return n - 1 - i if pairs == "flip" else (i + n // 2) % n

    for seed in range(5):
        s = Subbatches.split(n, k, torch.Generator().manual_seed(seed), torch.device("cpu"), pairs)
        rows = s.index.view(s.k, s.n).clone()
        real = torch.ones(s.k * s.n, dtype=torch.bool)
        real[s.pad] = False
        real = real.view(s.k, s.n)
        seen = []
        for j in range(s.k):
            members = set(rows[j][real[j]].tolist())
            assert len(members) == s.sizes[j]
            assert all(partner(i) in members for i in members)
            seen += members
        assert sorted(seen) == list(range(n))
        # the sizes the sources weigh the norms by (2026-12-04: taken one apart, for pairs 2
        # apart — a batch of 24 in 8 sub-batches read tr Σ 3.6× too high)
        assert s.sizes_tensor(torch.zeros(1)).tolist() == list(s.sizes)
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
        ({"paired_rows": "roll"}, r"paired_rows must be None, 'flip' .* or 'halves'"),
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
    from test_subbatch import assert_case_exact

    assert_case_exact(name, even=True, k=3, pairs="flip")


# two strata (a GAN discriminator's real and fake halves): loss_i = w·x_i, the first half drawn
# around MU_A, the second around MU_B, both with covariance diag(SD²). A batch always holds N/2 of
# each: its mean gradient has mean (MU_A + MU_B)/2 and covariance diag(SD²)/N, so its noise scale
# per row is tr Σ / |(MU_A + MU_B)/2|²; pooled as one population the rows would have tr Σ plus
# |MU_A − MU_B|²/4 — and eq. A.2, taking them for independent draws, subtracts that larger noise
# from the big batch's |G|² too: the reading is neither (≈ 33 here, against 19.9).
MU_A = torch.full((D,), 1.0)
MU_B = torch.full((D,), -0.4)
STRATA_TRUTH = float((SD**2).sum() / ((MU_A + MU_B) / 2).pow(2).sum())


def _strata(steps: int, n: int, seed: int, **kw) -> noisescale.GradientNoiseTracker:
    def halves(g: torch.Generator) -> torch.Tensor:
        real = MU_A + torch.randn(n // 2, D, generator=g) * SD
        fake = MU_B + torch.randn(n // 2, D, generator=g) * SD
        return torch.cat([real, fake])

    return _track(steps, seed, halves, **kw)


def test_halves_read_the_noise_scale_of_batches_made_of_two_strata():
    e = _strata(300, 32, 0, paired_rows="halves").estimate()
    assert e.low <= STRATA_TRUTH <= e.high
    assert e.trace_sigma == pytest.approx(float((SD**2).sum()), rel=0.08)
    hits = sum(
        (lambda e: e.low <= STRATA_TRUTH <= e.high)(
            _strata(60, 20, 100 + seed, paired_rows="halves").estimate()
        )
        for seed in range(30)
    )
    assert hits >= 26  # 95% nominal, 30 runs: binomial sd 1.2


@pytest.mark.parametrize("kw", [{}, {"per_example_fraction": 1.0}], ids=["default", "exact"])
def test_without_halves_two_strata_read_as_one_population(kw):
    e = _strata(300, 32, 0, **kw).estimate()
    assert e.low > 1.3 * STRATA_TRUTH
