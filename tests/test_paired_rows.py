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
import torch.nn.functional as F
from torch import nn

import noisescale
from noisescale.errors import NoiseScaleInputError, UnsupportedModuleError
from noisescale.per_example import PerExampleNorms
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


def _members(s: Subbatches) -> list[set[int]]:
    """The rows of each sub-batch, its padding left out."""
    rows = s.index.view(s.k, s.n).clone()
    real = torch.ones(s.k * s.n, dtype=torch.bool)
    real[s.pad] = False
    real = real.view(s.k, s.n)
    return [set(rows[j][real[j]].tolist()) for j in range(s.k)]


@pytest.mark.parametrize("pairs", ["flip", "halves"])
@pytest.mark.parametrize("n,k", [(32, 8), (22, 8), (8, 8), (6, 2), (4, 8)])
def test_the_split_keeps_each_pair_in_one_sub_batch(n, k, pairs):
    def partner(i: int) -> int:
        return n - 1 - i if pairs == "flip" else (i + n // 2) % n

    for seed in range(5):
        s = Subbatches.split(n, k, torch.Generator().manual_seed(seed), torch.device("cpu"), pairs)
        seen = []
        for j, members in enumerate(_members(s)):
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
    again = noisescale.GradientNoiseTracker(_model(), paired_rows="flip", beta=1.0)
    again.load_state_dict(state)
    assert again.steps == 3
    with pytest.raises(NoiseScaleInputError, match=r"paired_rows='flip'"):
        noisescale.GradientNoiseTracker(_model(), beta=1.0).load_state_dict(state)


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


# Preference pairs (DPO, a reward model's Bradley-Terry loss): the chosen and the rejected
# responses concatenated into one batch, row i's partner row i + N/2 — the rows the halves pair —
# and a loss that combines each pair's two rows, the pairs apart.


def _preference_model():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    policy = transformers.GPT2LMHeadModel(config).double()
    reference = transformers.GPT2LMHeadModel(config).double().requires_grad_(False)
    return policy, reference


def _sequence_logps(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, :-1]
    return logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0].sum(-1)


def _dpo(policy, reference, chosen: torch.Tensor, rejected: torch.Tensor, form: str):
    """TRL's concatenated forward: one batch [chosen; rejected]; the mean over the pairs of
    −log σ(β·margin) (``dpo``), or a reward model's −log σ(r_chosen − r_rejected) on the
    summed log-probabilities as rewards (``bradley-terry``); ``across`` couples the pairs (a
    margin centred on the batch's mean) and must be refused."""
    ids = torch.cat([chosen, rejected])
    logps = _sequence_logps(policy, ids)
    n = len(chosen)
    if form == "bradley-terry":
        return -F.logsigmoid(logps[:n] - logps[n:]).mean()
    with torch.no_grad():
        ref = _sequence_logps(reference, ids)
    margin = 0.1 * ((logps[:n] - ref[:n]) - (logps[n:] - ref[n:]))
    if form == "across":
        margin = margin - margin.mean()
    return -F.logsigmoid(margin).mean()


def _unit_truth(model, loss_of_units, units: int, subbatches, unit_of) -> torch.Tensor:
    """|∇ (1/U) Σ_{u ∈ j} ℓ_u|² for each sub-batch j: the batch loss, a mean over ``units``
    pairs or blocks (``unit_of`` a row's), restricted to the units of the sub-batch's rows
    (``loss_of_units(members)``: the mean loss over those units)."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for rows in _members(subbatches):
        members = sorted({unit_of(i) for i in rows})
        grads = torch.autograd.grad(loss_of_units(members) * len(members) / units, params)
        out.append(sum(g.pow(2).sum() for g in grads))
    return torch.stack(out)


@pytest.mark.parametrize("form", ["dpo", "bradley-terry"])
def test_preference_pairs_in_halves_are_measured_exactly(form):
    """With ``paired_rows="halves"`` the loss may combine a pair's two rows: each sub-batch's
    norm equals brute force over its pairs, on audited steps and the unaudited one alike (the
    loss watch follows the rows as N/2 units; before 2026-12-04 it refused the pair's margin as
    a loss combining examples)."""
    policy, reference = _preference_model()
    g = torch.Generator().manual_seed(1)
    chosen, rejected = (torch.randint(0, 32, (8, 6), generator=g) for _ in range(2))

    def loss_of_pairs(members: list[int]) -> torch.Tensor:
        return _dpo(policy, reference, chosen[members], rejected[members], form)

    engine = PerExampleNorms(policy, subbatches=3, pairs="halves")
    engine.RECHECK_SUBBATCHES = 1
    audited = []
    for _ in range(3):
        policy.zero_grad()
        _dpo(policy, reference, chosen, rejected, form).backward()
        (p,) = engine.collect()
        assert p.raw_sqnorms is not None, p.withheld
        with engine.paused():
            want = _unit_truth(policy, loss_of_pairs, 8, p.subbatches, lambda i: i % 8)
        assert ((p.raw_sqnorms - want).abs() / want).max() < 1e-9, (p.raw_sqnorms, want)
        audited.append(p.audited)
    engine.remove()
    assert audited == [True, True, False]


@pytest.mark.parametrize("paired_rows", [None, "halves", "flip"])
def test_a_preference_loss_is_refused_where_the_rows_are_not_its_pairs(paired_rows):
    """Without pairing, with the flipped pairing (row i with N − 1 − i: not a concatenation's
    partner), or with a margin centred on the batch's mean (the pairs combined), the loss
    combines rows the sub-batches keep apart: refused, never measured."""
    policy, reference = _preference_model()
    g = torch.Generator().manual_seed(1)
    chosen, rejected = (torch.randint(0, 32, (8, 6), generator=g) for _ in range(2))
    form = "across" if paired_rows == "halves" else "dpo"
    tracker = noisescale.GradientNoiseTracker(policy, paired_rows=paired_rows)
    _dpo(policy, reference, chosen, rejected, form).backward()
    with pytest.raises(UnsupportedModuleError, match="the loss combines the examples"):
        tracker.step()
    assert tracker.history == []


def test_preference_pairs_tracked_with_halves():
    """The tracker end to end: every step measured from the first, sub-batch sizes in rows (a
    pair is two)."""
    policy, reference = _preference_model()
    g = torch.Generator().manual_seed(2)
    tracker = noisescale.GradientNoiseTracker(policy, paired_rows="halves")
    for _ in range(4):
        chosen, rejected = (torch.randint(0, 32, (8, 6), generator=g) for _ in range(2))
        _dpo(policy, reference, chosen, rejected, "dpo").backward()
        tracker.step()
        policy.zero_grad()
    history = tracker.history
    assert [r["examples"] for r in history] == [16, 32, 48, 64]  # (cumulative)
    assert all("subbatch" in r["sources"] for r in history)
    assert all(r["sources"]["subbatch"]["b_small"] % 2 == 0 for r in history)


def test_a_reward_model_on_two_forwards_is_refused_with_the_way_to_measure_it():
    """A reward model's chosen and rejected responses through two forwards (as a trainer may run
    them) combine two forwards' rows: refused, the message naming the one forward on
    ``torch.cat([chosen, rejected])`` with ``paired_rows="halves"`` that is then measured."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, 1))
    chosen, rejected = torch.randn(8, D), torch.randn(8, D)
    tracker = noisescale.GradientNoiseTracker(model, paired_rows="halves")
    (-F.logsigmoid(model(chosen) - model(rejected)).mean()).backward()
    with pytest.raises(UnsupportedModuleError, match=r"torch\.cat\(\[chosen, rejected\]\) with "):
        tracker.step()
    model.zero_grad()
    rewards = model(torch.cat([chosen, rejected]))
    (-F.logsigmoid(rewards[:8] - rewards[8:]).mean()).backward()
    tracker.step()
    assert len(tracker.history) == 1 and "subbatch" in tracker.history[0]["sources"]


# Rows in consecutive blocks of G that share data (``grouped_rows=G``): GRPO's G completions of
# one prompt, a query's G candidates. Closed form: row (b, g) is x = z_b + e_bg, loss_i = w·x_i,
# z_b ~ N(MU, diag(SZ²)) shared by the block, e_bg ~ N(0, diag(SD²)). A batch of N/G blocks has
# a mean gradient of covariance (diag(SZ²) + diag(SD²)/G)/(N/G), so its noise scale in rows is
# (G·|SZ|² + |SD|²)/|MU|²; taken for independent rows, the cross terms of a block's rows in
# different sub-batches carry |SZ|² into |G|² and the reading is far below it.
G = 3
SZ = torch.full((D,), 0.6)
GROUPED_TRUTH = float((G * (SZ**2).sum() + (SD**2).sum()) / (MU @ MU))


def _grouped(steps: int, n: int, seed: int, **kw) -> noisescale.GradientNoiseTracker:
    def blocks(g: torch.Generator) -> torch.Tensor:
        z = MU + torch.randn(n // G, D, generator=g) * SZ
        return z.repeat_interleave(G, 0) + torch.randn(n, D, generator=g) * SD

    return _track(steps, seed, blocks, **kw)


def test_grouped_rows_read_the_noise_scale_of_batches_of_groups():
    e = _grouped(300, 24, 0, grouped_rows=G).estimate()
    assert e.low <= GROUPED_TRUTH <= e.high
    hits = sum(
        (lambda e: e.low <= GROUPED_TRUTH <= e.high)(
            _grouped(60, 24, 100 + seed, grouped_rows=G).estimate()
        )
        for seed in range(30)
    )
    assert hits >= 26  # 95% nominal, 30 runs: binomial sd 1.2


def test_without_grouped_rows_groups_read_low():
    e = _grouped(300, 24, 0).estimate()
    assert e.high < 0.8 * GROUPED_TRUTH


@pytest.mark.parametrize("n,k,g", [(24, 8, 3), (20, 4, 4), (12, 8, 3), (30, 7, 5), (6, 8, 3)])
def test_the_split_keeps_each_block_in_one_sub_batch(n, k, g):
    for seed in range(5):
        s = Subbatches.split(n, k, torch.Generator().manual_seed(seed), torch.device("cpu"), g)
        seen = []
        for j, members in enumerate(_members(s)):
            assert len(members) == s.sizes[j]
            assert all(i // g * g + o in members for i in members for o in range(g))
            seen += members
        assert sorted(seen) == list(range(n))
        assert s.sizes_tensor(torch.zeros(1)).tolist() == list(s.sizes)
        assert s.k == min(k, n // g)


def _grpo_loss(policy, ids: torch.Tensor, advantages: torch.Tensor, form: str) -> torch.Tensor:
    """GRPO's loss on a batch of completions in blocks of G: each row's mean token log-prob
    weighed by its advantage (rewards normalised within the block, computed without a
    gradient), the mean over rows (``grpo``); or a listwise loss over each block's G
    candidates, a softmax of their scores against the first (``listwise``), which combines a
    block's rows; ``across`` normalises the scores over the whole batch and must be refused."""
    logits = policy(input_ids=ids).logits[:, :-1]
    logp = logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0].mean(-1)
    if form == "grpo":
        return -(advantages * logp).mean()
    if form == "listwise":
        return -logp.view(-1, G).log_softmax(1)[:, 0].mean()
    return -(logp - logp.logsumexp(0)).mean()


@pytest.mark.parametrize("form", ["grpo", "listwise"])
def test_grouped_sub_batch_norms_match_brute_force(form):
    """Each sub-batch's norm equals brute force over its blocks (a tiny GPT-2, 5 blocks of 3)."""
    policy, _ = _preference_model()
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 32, (15, 6), generator=gen)
    rewards = torch.randn(5, G, generator=gen, dtype=torch.float64)
    advantages = ((rewards - rewards.mean(1, keepdim=True)) / rewards.std(1, keepdim=True)).view(-1)

    def loss_of_blocks(members: list[int]) -> torch.Tensor:
        rows = [b * G + o for b in members for o in range(G)]
        return _grpo_loss(policy, ids[rows], advantages[rows], form)

    engine = PerExampleNorms(policy, subbatches=3, pairs=G)
    engine.RECHECK_SUBBATCHES = 1
    audited = []
    for _ in range(3):
        policy.zero_grad()
        _grpo_loss(policy, ids, advantages, form).backward()
        (p,) = engine.collect()
        assert p.raw_sqnorms is not None, p.withheld
        with engine.paused():
            want = _unit_truth(policy, loss_of_blocks, 5, p.subbatches, lambda i: i // G)
        assert ((p.raw_sqnorms - want).abs() / want).max() < 1e-9, (p.raw_sqnorms, want)
        audited.append(p.audited)
    engine.remove()
    assert audited == [True, True, False]


@pytest.mark.parametrize("grouped", [None, G])
def test_a_loss_across_blocks_is_refused(grouped):
    """A listwise loss without grouped_rows, and scores normalised over the whole batch with
    it: the loss combines rows the sub-batches keep apart — refused."""
    policy, _ = _preference_model()
    ids = torch.randint(0, 32, (12, 6), generator=torch.Generator().manual_seed(4))
    tracker = noisescale.GradientNoiseTracker(policy, grouped_rows=grouped)
    form = "listwise" if grouped is None else "across"
    _grpo_loss(policy, ids, torch.ones(12), form).backward()
    with pytest.raises(UnsupportedModuleError, match="the loss combines the examples"):
        tracker.step()


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"grouped_rows": 1}, "at least 2"),
        ({"grouped_rows": "3"}, "grouped_rows must be"),
        ({"grouped_rows": 3, "paired_rows": "flip"}, "not both"),
        ({"grouped_rows": 3, "per_example_fraction": 1.0}, "drop per_example_fraction"),
        ({"grouped_rows": 3, "per_example": False}, "whole groups"),
    ],
)
def test_bad_grouped_rows_settings_are_refused(kw, match):
    with pytest.raises(NoiseScaleInputError, match=match):
        noisescale.GradientNoiseTracker(_model(), **kw)


def test_a_batch_of_part_of_a_group_is_refused_and_a_checkpoint_keeps_the_grouping():
    model = _model()
    tracker = noisescale.GradientNoiseTracker(model, grouped_rows=3)
    with pytest.raises(NoiseScaleInputError, match="not a multiple of 3"):
        model(torch.randn(10, D))
    model.zero_grad()
    for _ in range(2):
        model(torch.randn(12, D)).mean().backward()
        tracker.step()
        model.zero_grad()
    state = tracker.state_dict()
    again = noisescale.GradientNoiseTracker(_model(), grouped_rows=3)
    again.load_state_dict(state)
    assert again.steps == 2
    with pytest.raises(NoiseScaleInputError, match=r"grouped_rows=3"):
        noisescale.GradientNoiseTracker(_model()).load_state_dict(state)


@pytest.mark.parametrize(
    "kw, sizes",
    [
        ({"grouped_rows": 4}, [1]),  # GRPO, one completion a micro-batch
        ({"grouped_rows": 2}, [4, 1]),  # an unmeasured micro-batch with part of a group
        ({"paired_rows": "halves"}, [1]),
        ({"paired_rows": "flip"}, [4, 3]),
    ],
)
def test_every_micro_batch_must_hold_whole_groups(kw, sizes):
    """A group (or pair) split across accumulation micro-batches ties them together, and the
    micro-batch norms would take them for independent draws: every forward is checked, one row
    or more, measured or not (a review found GRPO with one completion a micro-batch read
    B_simple 5.19 [4.75, 5.71] against a truth of 12.9, the same as without grouped_rows)."""
    model = _model()
    tracker = noisescale.GradientNoiseTracker(model, **kw)
    with pytest.raises(NoiseScaleInputError, match="each accumulation micro-batch too"):
        for _ in range(3):
            for n in sizes:
                model(torch.randn(n, D)).mean().backward()
            tracker.step()
            model.zero_grad()
    assert tracker.history == []


@pytest.mark.parametrize("form", ["strided", "strided-across"])
def test_interleaved_pairs_taken_by_strided_slices(form):
    """Pairs interleaved, (chosen, rejected) in rows 2i and 2i + 1, under ``grouped_rows=2``:
    ``r[0::2] − r[1::2]`` takes one row of each block, index k from block k, and is measured
    exactly (it was refused before 2026-12-04, though valid); shifted by one block, the
    difference pairs rows of different blocks and is refused."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    x = torch.randn(12, D, dtype=torch.float64)

    def loss_of(rows: torch.Tensor) -> torch.Tensor:
        r = model(rows)[:, 0]
        if form == "strided":
            return -F.logsigmoid(r[0::2] - r[1::2]).mean()
        return -F.logsigmoid(r[0::2][1:] - r[1::2][:-1]).mean()

    if form == "strided-across":
        tracker = noisescale.GradientNoiseTracker(model, grouped_rows=2)
        loss_of(x).backward()
        with pytest.raises(UnsupportedModuleError, match="the loss combines the examples"):
            tracker.step()
        return

    def loss_of_blocks(blocks: list[int]) -> torch.Tensor:
        return loss_of(x[torch.tensor([2 * b + o for b in blocks for o in range(2)])])

    engine = PerExampleNorms(model, subbatches=3, pairs=2)
    for _ in range(3):
        model.zero_grad()
        loss_of(x).backward()
        (p,) = engine.collect()
        assert p.raw_sqnorms is not None, p.withheld
        with engine.paused():
            want = _unit_truth(model, loss_of_blocks, 6, p.subbatches, lambda i: i // 2)
        assert ((p.raw_sqnorms - want).abs() / want).max() < 1e-9, (p.raw_sqnorms, want)
    engine.remove()
