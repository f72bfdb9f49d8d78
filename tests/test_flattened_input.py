"""Tokens flattened from the model's raw input, ``l(x.reshape(B*T, D))``, then viewed back.

A layer that treats positions alike (Linear, LayerNorm, …) on the examples flattened together
with positions is measured when its rows are provably each example's in turn. For an
activation the proof is its history (a view of [N, T, D]); raw input data has none, and until
2026-12 such a call was taken for one shared by every example and refused ("its output never
met the batch"). A view of the model's own input [N, T, D] flattened in its memory's order
holds the proof in its memory: it is measured — exact against brute force in the exact and the
default sub-batch modes, with and without the input added back. A copy (a transposed input
reshaped) proves nothing and is still refused.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import noisescale
from noisescale.errors import UnsupportedModuleError
from test_subbatch import assert_exact_both_modes, assert_subbatches_exact, train_tracked

pytestmark = pytest.mark.usefixtures("float64_default")

N, T, D = 5, 3, 4


class FlatTokens(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.l, self.ln = nn.Linear(D, D), nn.LayerNorm(D)
        self.head = nn.Linear(D, 2)

    def forward(self, x):
        b, t, d = x.shape
        if self.how == "flatten":
            h = self.ln(self.l(x.flatten(0, 1))).unflatten(0, (b, t))
        elif self.how == "4d":  # [N, 1, T, D] flattened over its three leading dimensions
            h = self.ln(self.l(x.unsqueeze(1).reshape(b * t, d))).view(b, t, d)
        else:
            h = self.ln(self.l(x.reshape(b * t, d))).view(b, t, d)
        if self.how == "residual":
            h = h + x
        return self.head(torch.tanh(h))


def _case(how: str):
    torch.manual_seed(0)
    model = FlatTokens(how)
    x = torch.randn(N, T, D, generator=torch.Generator().manual_seed(1))
    return model, x, lambda: model(x).pow(2).sum((1, 2))


@pytest.mark.parametrize("how", ["plain", "residual", "flatten", "4d"])
def test_tokens_flattened_from_the_raw_input_are_exact(how):
    model, _, losses = _case(how)
    assert_exact_both_modes(model, losses, N)


def test_the_tracker_trains_on_tokens_flattened_from_the_raw_input():
    model, _, losses = _case("residual")
    tracker = train_tracked(model, lambda: losses().mean())
    assert tracker.history, "no step measured"


def test_a_copy_of_the_input_flattened_is_still_refused():
    """``x.transpose(0, 1).reshape(T*N, D)`` copies a time-major input: rows not proven."""

    class TimeMajor(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(D, D)

        def forward(self, x):
            b, t, d = x.shape
            return self.l(x.transpose(0, 1).reshape(t * b, d)).view(t, b, d).transpose(0, 1)

    torch.manual_seed(0)
    model = TimeMajor()
    x = torch.randn(N, T, D)
    with pytest.raises(UnsupportedModuleError, match="never met the batch"):
        with noisescale.per_example_sqnorms(model, loss_reduction="sum"):
            model(x).pow(2).sum().backward()


class FoldedBlock(nn.Module):
    """An MLP block on an activation with frames folded into the batch, ``[B·F, P, D]`` (the
    ``(b t) n d`` layout of video transformers written by hand, PatchTST's channels):
    pre-LayerNorm, fc1 → GELU → fc2, folded from [B, F, P, D] or from [B, F·P, D]."""

    def __init__(self, frames: int):
        super().__init__()
        self.frames = frames
        self.emb = nn.Linear(D, D)
        self.ln, self.fc1, self.fc2 = nn.LayerNorm(D), nn.Linear(D, 2 * D), nn.Linear(2 * D, D)
        self.head = nn.Linear(D, 2)

    def forward(self, x):  # x: [B, F, P, D] or [B, F·P, D]
        b = x.shape[0]
        h = self.emb(x).reshape(b * self.frames, -1, D)
        h = h + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln(h))))
        return self.head(h.reshape(b, -1, D).mean(1))


@pytest.mark.parametrize("shape", [(N, 2, 3, D), (N, 6, D)])
def test_an_mlp_block_on_frames_folded_into_the_batch_is_exact(shape):
    """nn.Linear on a 3-D input returns ``addmm(...).view(B·F, P, O)`` of [B·F·P, O]: the
    history between fc1 and fc2 has a view whose input's leading size is another multiple of
    the batch's, which keeps each row's elements together. Until 2026-12-06 fc2 was taken for
    a shared call and every mode refused the model, naming 'head' (a hunt); the same block on
    2-D rows [B·F·P, D] was exact. A view of [N, F·P, D] into [N·F, P, D] splits each
    example's rows, in turn, as one of [N, F, P, D] merges them."""
    torch.manual_seed(0)
    model = FoldedBlock(frames=2)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    assert_exact_both_modes(model, lambda: model(x).pow(2).flatten(1).sum(1), N)


def test_an_mlp_block_on_time_major_frames_folded_is_still_refused():
    """The same block on frames folded time-major, ``[F·B, P, D]`` from a transpose: its rows
    are not each example's in turn, and the model is refused."""

    class TimeMajorFold(FoldedBlock):
        def forward(self, x):
            b = x.shape[0]
            h = self.emb(x).view(b, self.frames, -1, D).transpose(0, 1)
            h = h.reshape(self.frames * b, -1, D)
            h = h + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln(h))))
            return self.head(h.reshape(self.frames, b, -1, D).transpose(0, 1).mean((1, 2)))

    torch.manual_seed(0)
    model = TimeMajorFold(frames=2)
    x = torch.randn(N, 6, D)
    with pytest.raises(UnsupportedModuleError, match="never met the batch"):
        with noisescale.per_example_sqnorms(model, loss_reduction="sum"):
            model(x).pow(2).sum().backward()


class FrameTable(nn.Module):
    """A learned per-position table added to tokens flattened with the batch, [B·T, D]."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.frame = nn.Parameter(torch.randn(T, D) * 0.1)
        self.l, self.head = nn.Linear(D, D), nn.Linear(D, 2)

    def forward(self, x):
        b = x.shape[0]
        if self.how == "repeat":
            table = self.frame.repeat(b, 1)
        elif self.how == "expand":
            table = self.frame.unsqueeze(0).expand(b, T, D).reshape(b * T, D)
        else:  # (wrong: each position's row b times in a row, not the table b times)
            table = self.frame.repeat_interleave(b, 0)
        h = torch.tanh(self.l(x.reshape(b * T, D) * 1.5 + table))
        return self.head(h.view(b, T, D).mean(1))


@pytest.mark.parametrize("how", ["repeat", "expand"])
def test_a_table_repeated_over_the_examples_on_flattened_tokens_is_exact(how):
    """``h.reshape(B*T, D) + frame.repeat(B, 1)``: a table made from parameters alone holds no
    example's rows, as a bias; until 2026-12-06 the repeat was refused while the same table
    expanded and reshaped was measured (a hunt)."""
    torch.manual_seed(0)
    model = FrameTable(how)
    x = torch.randn(N, T, D, generator=torch.Generator().manual_seed(1))
    assert_exact_both_modes(model, lambda: model(x).pow(2).sum(1), N)


class SortedFlat(nn.Module):
    """A batch sorted inside the forward (by length, as code written for packing does), its
    tokens folded into rows for an MLP, ``fc2(gelu(fc1(h[order].reshape(B*T, D))))``, and
    sorted back: each example's output depends on that example alone."""

    def __init__(self):
        super().__init__()
        self.inp, self.fc1, self.fc2 = nn.Linear(D, D), nn.Linear(D, 2 * D), nn.Linear(2 * D, D)
        self.head = nn.Linear(D, 2)
        self.order = torch.arange(N)

    def forward(self, x):
        b, t, d = x.shape
        h = torch.tanh(self.inp(x))
        order = self.order
        h = h[order]
        f = self.fc2(torch.nn.functional.gelu(self.fc1(h.reshape(b * t, d)))).view(b, t, d)
        return self.head(f[order.argsort()].mean(1))


def test_a_batch_sorted_inside_the_forward_then_flattened_is_exact_on_every_step():
    """In order on the audited steps 1 and 2, sorted on steps 3 to 5 (5 not audited): the
    flattening's tensor is checked for rows the data picked on every step, as a layer's input
    of the batch's size is — until 2026-12-06 the MLP's rows went to the wrong examples on unaudited
    steps in the default mode (sub-batch norms 100% off, tr Σ up to 53%, a hunt). A sorted
    step makes the MLP's calls shared, and the sub-batch norms stay exact."""
    torch.manual_seed(0)
    model = SortedFlat()
    x = torch.randn(N, T, D, generator=torch.Generator().manual_seed(1))
    steps = iter([torch.arange(N)] * 2 + [torch.tensor([2, 0, 4, 1, 3])] * 3)

    def batch_loss():
        model.order = next(steps)
        return model(x).pow(2).sum(1).mean()

    assert_subbatches_exact(model, batch_loss, lambda i: model(x).pow(2).sum(1)[i], N, k=2, steps=5)


def test_a_sorted_batch_flattened_on_an_accelerator_is_flagged_on_the_device(monkeypatch):
    """On an accelerator the index is not read when the layer runs: it is compared with
    arange(N) there, the flag read with the step's statistics — false in order, true sorted
    (step 3, not audited: left for the tracker to read); an audited step reads it at once and
    refuses, naming the pick."""
    import noisescale.per_example.graph as graph_mod
    from noisescale.per_example import PerExampleNorms

    monkeypatch.setattr(graph_mod, "_host_reads_indices", lambda index: False)
    torch.manual_seed(0)
    model = SortedFlat()
    x = torch.randn(N, T, D)
    engine = PerExampleNorms(model)
    sorted_ = torch.tensor([2, 0, 4, 1, 3])
    try:
        for order, flagged in ((torch.arange(N), False),) * 2 + ((sorted_, True),):
            model.order = order
            model.zero_grad()
            model(x).pow(2).sum().backward()
            engine.collect()
            picks = {label: bool(flag) for label, _, flag in engine.unread_picks}
            assert picks.get("fc1") is flagged, engine.unread_picks
        model.zero_grad()
        model(x).pow(2).sum().backward()
        with pytest.raises(UnsupportedModuleError, match="layer 'fc1' were picked by an index"):
            engine.collect()  # (step 4, audited)
    finally:
        engine.remove()
