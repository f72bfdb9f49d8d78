"""``F.embedding_bag`` called on a model's own table, one bag per example.

Its input is rarely per-example along dim 0: the bags' indices are flattened, cut by offsets —
with ``include_last_offset=True`` one more offset than bags, the last closing the last bag. Until
2026-12 such a call with ``include_last_offset=True`` (nothing of the batch's size among its
arguments) was taken for a computation shared by every example, and the step was refused blaming
the layer after it ("layer 'head' was treated as shared … never met the batch"); with plain
offsets or a 2-D input it went to the torch.func fallback, one step withheld. The call now meets
the batch itself, as nn.EmbeddingBag's rule does: bag i is example i's, in every mode ('sum',
'mean'), with per-sample weights, a padding index, bags of unequal lengths, the table computed
from parameters — exact against brute force in the exact mode and the default sub-batch mode.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import noisescale
from noisescale.errors import UnsupportedModuleError
from test_subbatch import assert_exact_both_modes, train_tracked

pytestmark = pytest.mark.usefixtures("float64_default")

N, L, ROWS = 5, 4, 7


class Bags(nn.Module):
    """A dense input x [N, 3] plus one bag of token rows per example, through a head."""

    def __init__(self, how: str, mode: str, padding_idx=None, psw=False, scaled=False):
        super().__init__()
        self.how, self.mode, self.padding_idx, self.psw = how, mode, padding_idx, psw
        self.w = nn.Parameter(torch.randn(ROWS, 3))
        self.scale = nn.Parameter(torch.rand(3) + 0.5) if scaled else None
        self.head = nn.Linear(3, 2)

    def forward(self, x, ids, lengths, sample_weights):
        table = self.w * self.scale if self.scale is not None else self.w
        kw = dict(mode=self.mode, padding_idx=self.padding_idx)
        if self.psw:
            kw["per_sample_weights"] = sample_weights
        if self.how == "2d":
            bags = F.embedding_bag(ids, table, **kw)
        else:
            if self.psw:
                kw["per_sample_weights"] = sample_weights.flatten()[: int(lengths.sum())]
            flat = torch.cat([ids[i, : int(lengths[i])] for i in range(ids.shape[0])])
            starts = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
            last = self.how == "last"
            offsets = starts if last else starts[:-1]
            bags = F.embedding_bag(flat, table, offsets, include_last_offset=last, **kw)
        return self.head(torch.tanh(x + bags))


def _case(how: str, mode: str, uneven: bool = False, **kw):
    torch.manual_seed(0)
    model = Bags(how, mode, **kw)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 3, generator=g)
    ids = torch.randint(0, ROWS, (N, L), generator=g)
    ids[1, 0] = 2  # (the padding index of some cases, in a bag that has other rows too)
    lengths = torch.tensor([4, 1, 3, 2, 4]) if uneven else torch.full((N,), L)
    sample_weights = torch.rand(N, L, generator=g) + 0.5
    y = torch.randint(0, 2, (N,), generator=g)

    def losses():
        return F.cross_entropy(model(x, ids, lengths, sample_weights), y, reduction="none")

    return model, losses


CASES = {
    "last sum": dict(how="last", mode="sum"),
    "last mean": dict(how="last", mode="mean"),
    "last sum uneven": dict(how="last", mode="sum", uneven=True),
    "last mean uneven": dict(how="last", mode="mean", uneven=True),
    "last mean padding": dict(how="last", mode="mean", padding_idx=2),
    "last sum padding -5": dict(how="last", mode="sum", padding_idx=-5),
    "last per-sample weights": dict(how="last", mode="sum", psw=True, uneven=True),
    "last scaled table": dict(how="last", mode="mean", scaled=True),
    "offsets sum": dict(how="offsets", mode="sum"),
    "offsets mean uneven padding": dict(how="offsets", mode="mean", uneven=True, padding_idx=2),
    "2d mean": dict(how="2d", mode="mean"),
    "2d per-sample weights": dict(how="2d", mode="sum", psw=True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_functional_embedding_bag_is_exact(name):
    model, losses = _case(**CASES[name])
    assert_exact_both_modes(model, losses, N)


class _TableBags(nn.Module):
    """A model's own table read by ``F.embedding_bag(..., include_last_offset=True)`` into a
    head; ``layout(i)`` gives the flat indices, the offsets and the mode."""

    def __init__(self, layout):
        super().__init__()
        self.layout = layout
        self.w = nn.Parameter(torch.randn(ROWS, 3))
        self.head = nn.Linear(3, 2)

    def forward(self, i):
        flat, offsets, mode = self.layout(i)
        bags = F.embedding_bag(flat, self.w, offsets, mode=mode, include_last_offset=True)
        return self.head(bags)


def test_indices_after_the_last_offset_belong_to_the_last_bag():
    """With ``include_last_offset=True`` torch reads the last offset only for the count of
    bags: the last bag runs to the input's end."""

    def trailing(i):
        flat = torch.cat([i.flatten(), i[:, 0]])  # N more indices, in the last bag
        return flat, torch.arange(0, i.numel() + 1, L), "sum"

    torch.manual_seed(0)
    model = _TableBags(trailing)
    i = torch.randint(0, ROWS, (N, L), generator=torch.Generator().manual_seed(1))
    assert_exact_both_modes(model, lambda: model(i).pow(2).sum(1), N)


def test_nn_embedding_bag_s_last_bag_runs_to_the_input_s_end():
    """torch reads the last offset of ``include_last_offset=True`` only for the count of bags:
    indices after it belong to the last bag (nn.EmbeddingBag's rule left them out, the audit
    refusing 33%; on a step not audited the norm would have been wrong)."""

    class Module(nn.Module):
        def __init__(self):
            super().__init__()
            self.bag = nn.EmbeddingBag(ROWS, 3, mode="mean", include_last_offset=True)
            self.head = nn.Linear(3, 2)

        def forward(self, x, ids, offsets):
            return self.head(torch.tanh(x + self.bag(ids, offsets)))

    torch.manual_seed(0)
    model = Module()
    g = torch.Generator().manual_seed(1)
    x, i = torch.randn(N, 3, generator=g), torch.randint(0, ROWS, (N, L), generator=g)
    flat, offsets = torch.cat([i.flatten(), i[:, 0]]), torch.arange(0, N * L + 1, L)
    assert_exact_both_modes(model, lambda: model(x, flat, offsets).pow(2).sum(1), N)


def test_bags_that_straddle_the_input_rows_are_each_loss_term_s():
    """Offsets need not cut the input at its rows: bag i is what example i's loss depends on,
    and its gradient is measured (as nn.EmbeddingBag's rule measures it)."""

    def straddling(i):
        return i.flatten(), torch.tensor([0, 1, 5, 9, 12, 20]), "mean"

    torch.manual_seed(0)
    model = _TableBags(straddling)
    i = torch.randint(0, ROWS, (N, L), generator=torch.Generator().manual_seed(1))
    assert_exact_both_modes(model, lambda: model(i).pow(2).sum(1), N)


def test_the_tracker_trains_through_a_functional_embedding_bag():
    model, losses = _case("last", "mean", uneven=True, padding_idx=2)
    tracker = train_tracked(model, lambda: losses().mean(), per_example_fraction=1.0)
    assert tracker.history, "no step measured"


def test_max_mode_is_still_refused_with_its_cause():
    """mode='max' sends each dimension's gradient to the row that won it: not followed."""
    import noisescale
    from noisescale.errors import UnsupportedModuleError

    model, losses = _case("last", "max")
    with pytest.raises(UnsupportedModuleError) as err:
        with noisescale.per_example_sqnorms(model, loss_reduction="mean"):
            losses().mean().backward()
    assert "embedding_bag" in str(err.value), str(err.value)


class _LearnedWeights(nn.Module):
    """Bags whose per_sample_weights are learned: a weight per item (PyTorch's EmbeddingBag
    tutorial order, text first), or a gate on per-occurrence features (DLRM's order)."""

    def __init__(self, form: str):
        super().__init__()
        torch.manual_seed(0)
        self.form = form
        self.bag = nn.EmbeddingBag(10, 4, mode="sum")
        self.table = nn.Parameter(torch.randn(10, 4))
        self.item_w = nn.Parameter(torch.randn(10))
        self.gate = nn.Linear(3, 1)
        self.dense = nn.Linear(2, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, dense, text, offsets, feats):
        if self.form == "gate":
            w = torch.sigmoid(self.gate(feats)).squeeze(-1)
        else:
            w = self.item_w[text].sigmoid()
        if self.form == "functional":
            e = F.embedding_bag(text, self.table, offsets, mode="sum", per_sample_weights=w)
        else:
            e = self.bag(text, offsets, per_sample_weights=w)
        return self.head(e + self.dense(dense)).squeeze(-1)


@pytest.mark.parametrize("form", ["item weights", "gate", "functional"])
@pytest.mark.parametrize("mode", ["default", "exact", "one-shot"])
def test_learned_per_sample_weights_are_refused_by_name(form, mode):
    """Their gradient comes one per looked-up index: until 2026-12-06 the default's sub-batch
    norms took it for rows of examples (up to 14% off without a word) and the other modes
    crashed (a hunt). Refused naming the fix; per_example=False measures the model."""
    import noisescale
    from noisescale.errors import UnsupportedModuleError

    g = torch.Generator().manual_seed(1)
    lens = torch.tensor([3, 1, 2, 3, 1, 2, 2, 3])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)[:-1]])
    model = _LearnedWeights(form)

    def loss():  # (a new batch at each call)
        text = torch.randint(0, 10, (int(lens.sum()),), generator=g)
        dense, feats = torch.randn(8, 2, generator=g), torch.randn(len(text), 3, generator=g)
        return F.mse_loss(model(dense, text, offsets, feats), torch.randn(8, generator=g))

    with pytest.raises((UnsupportedModuleError, noisescale.NoiseScaleInputError)) as err:
        if mode == "one-shot":
            with noisescale.per_example_sqnorms(model):
                loss().backward()
        else:
            kw = {"per_example_fraction": 1.0} if mode == "exact" else {}
            with noisescale.GradientNoiseTracker(model, **kw) as tracker:
                for _ in range(2):
                    loss().backward()
                    tracker.step()
                    model.zero_grad()
    # (F.embedding_bag with learned weights is refused as an operation with no rule)
    assert ("embedding_bag" if form == "functional" else "per_sample_weights") in str(err.value)
    assert "per_example=False" in str(err.value)
    model.zero_grad()
    with noisescale.GradientNoiseTracker(model, per_example=False) as tracker:
        for _ in range(2):
            for _ in range(2):
                loss().backward()
            tracker.step()
            model.zero_grad()
        assert len(tracker.history) == 2


class _BagNegatives(nn.Module):
    """An item table of bags: the examples' positives (N bags) and K = 3 negatives' bags
    shared by every example, scored u @ vnᵀ (2-D bags, or flat indices with offsets)."""

    def __init__(self, mode: str, offsets: bool):
        super().__init__()
        self.user, self.items = nn.Linear(3, 4), nn.EmbeddingBag(ROWS, 4, mode=mode)
        self.offsets = offsets

    def forward(self, x, pos, neg):
        def bags(ids):
            if not self.offsets:
                return self.items(ids)
            return self.items(ids.flatten(), torch.arange(0, ids.numel(), ids.shape[1]))

        u, vp, vn = self.user(x), bags(pos), bags(neg)
        return -F.logsigmoid((u * vp).sum(1)) - F.logsigmoid(-(u @ vn.T)).sum(1)


@pytest.mark.parametrize("offsets", [False, True], ids=["2-D bags", "offsets"])
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_an_embedding_bag_called_on_negatives_shared_by_every_example_is_exact(mode, offsets):
    """A hunt (2026-12-06): nn.EmbeddingBag called on K ≠ N bags shared by every example (the
    negatives' feature bags) crashed in its rule's backward (a size mismatch: the shared call's
    saved bags are [N, K, L], each example's K bags) where nn.Embedding in the same role is
    exact. Exact now, one-shot, in the sub-batch norms and under the tracker."""
    torch.manual_seed(0)
    model = _BagNegatives(mode, offsets)
    g = torch.Generator().manual_seed(1)
    x, pos = torch.randn(N, 3, generator=g), torch.randint(0, ROWS, (N, 2), generator=g)
    neg = torch.randint(0, ROWS, (3, 2), generator=g)
    assert_exact_both_modes(model, lambda: model(x, pos, neg), N)
    tracker = train_tracked(model, lambda: model(x, pos, neg).mean(), per_example_fraction=1.0)
    assert len(tracker.history) == 6


class _FieldMajorBags(nn.Module):
    """One EmbeddingBag over N·F bags flattened field-major (TorchRec's layout), no dense
    input: its count of bags, N·F, is what noisescale takes for the examples."""

    def __init__(self):
        super().__init__()
        self.eb, self.top = nn.EmbeddingBag(ROWS, 3), nn.Linear(2 * 3, 1)

    def forward(self, ids, offsets, n):
        return self.top(self.eb(ids, offsets).view(2, n, 3).transpose(0, 1).reshape(n, 6))


def test_the_count_taken_from_an_embedding_bag_s_offsets_is_named_where_it_came_from():
    """A hunt (2026-12-06): the refusal said noisescale took the count of examples "from the
    first" input while that input (the flat ids) had another size: the count came from the
    offsets, argument 1. The message names the argument it came from."""
    torch.manual_seed(0)
    model = _FieldMajorBags()
    ids = torch.randint(0, ROWS, (18,), generator=torch.Generator().manual_seed(1))
    offsets = torch.tensor([0, 2, 3, 5, 7, 9, 11, 12, 14, 16])
    with pytest.raises(UnsupportedModuleError, match=r"took 10, from argument 1, for the number"):
        with noisescale.per_example_sqnorms(model):
            model(ids, offsets, 5).pow(2).mean().backward()
