"""nn.LSTMCell, nn.GRUCell and nn.RNNCell in the user's own loop over time, against brute force.

A cell is called once per step with the state of the step before: each call is measured like a
pair of Linear maps (the gate pre-activations recomputed from the saved input and state, their
gradients from those the call's outputs received) and the calls add up with their cross terms.
They were refused before (the torch.func fallback could not take a module called with its own
output). An LSTMCell's c' feeds its h' inside ATen's composite cell on the CPU, so the gradient
its hook receives already holds that path; the rule tells the two implementations apart by the
outputs' autograd nodes (a fused kernel's, on CUDA, is one node: untested here, and the audit
would refuse a mistake)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import noisescale
from noisescale.errors import UnsupportedModuleError
from noisescale.per_example import PerExampleNorms
from test_subbatch import assert_exact_both_modes, per_example_grads, train_tracked

pytestmark = pytest.mark.usefixtures("float64_default")

N, T = 4, 3


class Loop(nn.Module):
    def __init__(self, cell: nn.Module, initial: bool, head_on_c: bool):
        super().__init__()
        self.cell, self.initial, self.head_on_c = cell, initial, head_on_c
        self.head = nn.Linear(5, 3)
        self.h0 = nn.Parameter(torch.randn(5)) if initial else None

    def forward(self, x):
        n = x.shape[0]
        lstm = isinstance(self.cell, nn.LSTMCell)
        state = None
        if self.initial:
            h0 = self.h0.expand(n, 5)  # a learned initial state, shared by the batch
            state = (h0, torch.zeros(n, 5)) if lstm else h0
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
        h = state[0] if lstm else state
        out = self.head(h)
        if lstm and self.head_on_c:
            out = out + state[1].sum(1, keepdim=True)
        return out


CELLS = {
    "LSTMCell": lambda: nn.LSTMCell(3, 5),
    "LSTMCell without biases": lambda: nn.LSTMCell(3, 5, bias=False),
    "GRUCell": lambda: nn.GRUCell(3, 5),
    "RNNCell tanh": lambda: nn.RNNCell(3, 5),
    "RNNCell relu": lambda: nn.RNNCell(3, 5, nonlinearity="relu"),
}


CASES = [
    (cell, initial, head_on_c)
    for cell in CELLS
    for initial in (False, True)
    for head_on_c in ((False, True) if cell.startswith("LSTM") else (False,))
]


@pytest.mark.parametrize(
    ("cell", "initial", "head_on_c"),
    CASES,
    ids=[
        f"{c}-{'learned' if i else 'zero'} state-loss on h{' and c' if h else ''}"
        for c, i, h in CASES
    ],
)
def test_a_cell_in_a_loop_is_exact(cell, initial, head_on_c):
    torch.manual_seed(0)
    model = Loop(CELLS[cell](), initial, head_on_c)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, T, 3, generator=g), torch.randint(0, 3, (N,), generator=g)

    def losses():
        return F.cross_entropy(model(x), y, reduction="none")

    assert_exact_both_modes(model, losses, N)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"per_example_fraction": 0.5}, {"per_example_fraction": 1.0}],
    ids=["sub-batches", "a half subset", "every example"],
)
def test_the_tracker_trains_a_cell_loop(kwargs):
    """Six steps in each of the default (sub-batches), a 1/2 subset of the examples and every
    example; no warning, every step measured."""
    torch.manual_seed(0)
    model = Loop(nn.LSTMCell(3, 5), True, True)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, T, 3, generator=g), torch.randint(0, 3, (16,), generator=g)
    tracker = train_tracked(model, lambda: F.cross_entropy(model(x), y), lr=0.1, **kwargs)
    assert not any(r["skipped"] for r in tracker.history), kwargs


# -- nn.RNN / nn.GRU / nn.LSTM from a learned initial state ----------------------------------------
#
# A parameter h0 [L·D, 1, H] (or [L·D, H]) expanded over the examples along dim 1 and passed as
# hx: shared by the examples until the layer runs each example's recurrence from its own column,
# where it meets the batch. Refused before ("called on input that is not per-example", which was
# not the cause).


class LearnedState(nn.Module):
    def __init__(self, kind: str, form: str, batch_first: bool, layers: int, bidirectional: bool,
                 proj: bool = False, both: bool = True, flat: bool = False):  # fmt: skip
        super().__init__()
        kw = {"proj_size": 2} if proj else {}
        self.rnn = getattr(nn, kind)(
            3, 5, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first, **kw
        )
        self.form, self.batch_first, self.both, self.flat = form, batch_first, both, flat
        self.states = layers * (2 if bidirectional else 1)
        width = 2 if proj else 5
        self.h0 = nn.Parameter(torch.randn(self.states, *(() if flat else (1,)), width))
        if kind == "LSTM" and both:
            self.c0 = nn.Parameter(torch.randn(self.states, *(() if flat else (1,)), 5))
        self.head = nn.Linear(width * (2 if bidirectional else 1) + width, 3)

    def _expand(self, p: torch.Tensor, n: int) -> torch.Tensor:
        p = p.unsqueeze(1) if self.flat else p
        if self.form == "expand":
            return p.expand(-1, n, -1)
        if self.form == "expand().contiguous()":
            return p.expand(-1, n, -1).contiguous()
        if self.form == "repeat":
            return p.repeat(1, n, 1)
        return p.expand(-1, n, -1) * 2.0  # computed after the expansion

    def forward(self, x):
        n = x.shape[0]
        seq = x if self.batch_first else x.transpose(0, 1)
        h = self._expand(self.h0, n)
        if isinstance(self.rnn, nn.LSTM):
            c = self._expand(self.c0, n) if self.both else torch.zeros(self.states, n, 5)
            out, (hn, _) = self.rnn(seq, hx=(h, c))
        else:
            out, hn = self.rnn(seq, h)
        out = out if self.batch_first else out.transpose(0, 1)
        return self.head(torch.cat([out, hn[-1][:, None].expand(-1, out.shape[1], -1)], 2))


def assert_exact_accumulated(model, subbatches: int, reduction: str, micro: int, n: int = 5):
    """Three steps of ``micro`` micro-batches each (losses by ``reduction``), every pass's norms
    against brute force: per example (``subbatches`` 0) or per sub-batch."""
    engine = PerExampleNorms(model, subbatches=subbatches)
    if subbatches:
        engine.RECHECK_SUBBATCHES = 1
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(7)
    target = torch.randn(3, generator=gen)
    try:
        for _ in range(3):
            batches = [torch.randn(n, 4, 3, generator=gen) for _ in range(micro)]
            states = []
            for x in batches:
                states.append(copy.deepcopy(model.state_dict()))
                losses = (model(x) - target).pow(2).mean((1, 2))
                (losses.mean() if reduction == "mean" else losses.sum()).backward()
            passes = engine.collect()
            assert len(passes) == micro
            with engine.paused():
                measured = [p for p in passes if not p.skipped]
                # (sub-batches measure one micro-batch a step from the second step on; the exact
                # mode every one)
                assert measured and (subbatches or len(measured) == micro), passes
                for p, x, state in zip(passes, batches, states, strict=True):
                    if p.skipped:
                        continue
                    assert p.raw_sqnorms is not None, p.withheld
                    live = copy.deepcopy(model.state_dict())
                    model.load_state_dict(state)
                    c = 1 / n if reduction == "mean" else 1.0

                    def loss_of(i, x=x, c=c):
                        return c * (model(x[i : i + 1]) - target).pow(2).mean()

                    g = per_example_grads(model, loss_of, n)
                    model.load_state_dict(live)
                    if p.subbatches is None:
                        want = torch.stack([sum(t.pow(2).sum() for t in gi) for gi in g])
                    else:
                        index = p.subbatches.index.view(p.subbatches.k, p.subbatches.n).tolist()
                        want = torch.stack([
                            sum(sum(g[i][t] for i in index[j][:size]).pow(2).sum()
                                for t in range(len(g[0])))
                            for j, size in enumerate(p.subbatches.sizes)
                        ])  # fmt: skip
                    torch.testing.assert_close(p.raw_sqnorms, want, rtol=1e-9, atol=0)
            opt.step()
            opt.zero_grad()
    finally:
        engine.remove()


STATE_CASES = [
    pytest.param("GRU", "expand().contiguous()", True, 1, False, False, True, False, id="GRU"),
    pytest.param("GRU", "expand", False, 2, True, False, True, False, id="GRU-2-bi-time-major"),
    pytest.param("RNN", "repeat", True, 2, False, False, True, False, id="RNN-2-repeat"),
    pytest.param("RNN", "expand", False, 1, True, False, True, True, id="RNN-bi-2D-h0"),
    pytest.param(
        "LSTM", "expand().contiguous()", True, 1, False, False, False, False, id="LSTM-h0-only"
    ),
    pytest.param("LSTM", "repeat", False, 2, True, False, True, False, id="LSTM-2-bi-both"),
    pytest.param("LSTM", "expand", True, 2, True, True, True, True, id="LSTM-proj-2D-both"),
    pytest.param(
        "LSTM",
        "computed after",
        True,
        1,
        True,
        False,
        True,
        False,
        id="LSTM-state-computed-after-the-expansion",
    ),
]


@pytest.mark.parametrize(
    ("kind", "form", "batch_first", "layers", "bidirectional", "proj", "both", "flat"),
    STATE_CASES,
)
@pytest.mark.parametrize("subbatches", [0, 2], ids=["every example", "sub-batches"])
@pytest.mark.parametrize(("reduction", "micro"), [("mean", 1), ("sum", 2)], ids=["mean", "sum-2"])
def test_a_learned_initial_state_is_exact(
    kind, form, batch_first, layers, bidirectional, proj, both, flat, subbatches, reduction, micro
):
    torch.manual_seed(0)
    model = LearnedState(kind, form, batch_first, layers, bidirectional, proj, both, flat)
    assert_exact_accumulated(model, subbatches, reduction, micro)


def test_a_learned_initial_state_in_the_tracker_and_one_shot():
    """The tracker's default and exact modes train it without a warning or a skipped step; the
    one-shot measurement gives each example's norm."""
    torch.manual_seed(0)
    model = LearnedState("GRU", "expand().contiguous()", True, 2, False)
    x = torch.randn(6, 4, 3, generator=torch.Generator().manual_seed(3))
    for kw in ({}, {"per_example_fraction": 1.0}, {"per_example_fraction": 0.5}):
        tracker = train_tracked(model, lambda: model(x).pow(2).mean(), **kw)
        assert not any(r["skipped"] for r in tracker.history), kw
    with noisescale.per_example_sqnorms(model, loss_reduction="sum") as pe:
        model(x).pow(2).mean((1, 2)).sum().backward()
    params = list(model.parameters())
    want = torch.stack([
        sum(g.pow(2).sum() for g in torch.autograd.grad(model(x[i : i + 1]).pow(2).mean(), params))
        for i in range(6)
    ])  # fmt: skip
    torch.testing.assert_close(pe.sqnorms, want, rtol=1e-9, atol=0)


def _brute_sqnorms(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Each example's squared gradient norm of ``model(x_i).pow(2).sum()``, one backward each
    (parameters the example does not reach count zero)."""
    params = list(model.parameters())
    return torch.stack([
        sum(g.pow(2).sum()
            for g in torch.autograd.grad(
                model(x[i : i + 1]).pow(2).sum(), params, allow_unused=True
            ) if g is not None)
        for i in range(x.shape[0])
    ])  # fmt: skip


def _assert_step_exact(model: nn.Module, engine: PerExampleNorms, x: torch.Tensor) -> None:
    """One step of ``model(x).pow(2).sum()`` measured by ``engine``: its per-example norms
    equal brute force (float64: to 1e-9)."""
    model.zero_grad()
    model(x).pow(2).sum().backward()
    (p,) = engine.collect()
    with engine.paused():
        want = _brute_sqnorms(model, x)
    torch.testing.assert_close(p.raw_sqnorms, want, rtol=1e-9, atol=0)


class _SharedByLayers(nn.Module):
    """One state [1, 1, H] for both layers and every example, made [2, N, H] in one of
    several ways (a GRU of two layers)."""

    def __init__(self, form: str):
        super().__init__()
        self.rnn, self.form = nn.GRU(3, 4, num_layers=2, batch_first=True), form
        self.h0 = nn.Parameter(torch.randn(1, 1, 4))

    def forward(self, x):
        n, h0, form = x.shape[0], self.h0, self.form
        if form == "expand":
            h = h0.expand(2, n, 4).contiguous()
        elif form == "repeat then expand":
            h = h0.repeat(2, 1, 1).expand(-1, n, -1)
        elif form == "tanh":
            h = h0.expand(2, n, 4).tanh()
        elif form == "mul":
            h = h0.expand(2, n, 4) * 0.5
        elif form == "plus zeros":
            h = h0.expand(2, n, 4) + torch.zeros(2, n, 4)
        elif form == "five views":
            h = h0.expand(2, n, 4).contiguous().view(-1).view(2, -1).view(-1, 4).view(2, n, 4)
        elif form == "times ones":  # (broadcast by an elementwise operation)
            h = h0 * torch.ones(2, n, 4)
        elif form == "cat of expansions":
            h = torch.cat([h0[..., :2].expand(2, n, 2), h0[..., 2:].expand(2, n, 2)], 2)
        elif form == "stack of layer rows":
            h = torch.stack([h0[0, 0].expand(2, 4)] * n, 1)
        elif form == "long history":
            h = h0.expand(2, n, 4)
            for _ in range(400):
                h = h * 1.0
        elif form == "repeat":  # one repeat over layers and examples
            h = h0.repeat(2, n, 1)
        elif form == "examples, then layers":  # (the examples' expansion moved to dim 1)
            h = h0.view(4).expand(n, 4).view(1, n, 4).expand(2, n, 4).contiguous()
        elif form == "stack of example rows":
            h = torch.stack([h0.view(4).expand(n, 4)] * 2)
        else:  # "cat of example rows"
            h = torch.cat([h0.view(4).expand(n, 4).unsqueeze(0)] * 2).tanh()
        return self.rnn(x, h)[0][:, -1]


_EXACT_SQUARE = ["repeat", "examples, then layers", "stack of example rows", "cat of example rows"]
# refused by the search of the state's history, naming the cause (the others by the audit)
_NAMED_SQUARE = ["expand", "tanh", "mul", "plus zeros", "times ones", "cat of expansions"]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "form",
    [
        "expand", "repeat then expand", "tanh", "mul", "plus zeros", "five views", "times ones",
        "cat of expansions", "stack of layer rows", "long history", *_EXACT_SQUARE,
    ],
)  # fmt: skip
def test_a_state_shared_by_as_many_layers_as_examples_is_exact_or_refused(form, seed):
    """h0 [1, 1, H] made [2, N, H] for two layers: exact at N = 5; at N = 2 its expansion over
    the layers (dim 0) looks like one over the examples (a class token's), and the layer's
    examples are along dim 1 — refused naming the cause (wrong and passed by an audit after
    eight steps of another size, in a review), wherever in the state's history the expansion
    is (a tanh, a product, a sum, five views after it: 4e-4 to 7.4 off before 2026-12-06, an
    audit passing some), unless the expansion over the examples is the one that became the
    state's dim 1 (made by one repeat over both, or expanded over the examples first). Where
    the search loses the examples' dimension and the audit finds the expansion's rows not the
    examples' (refused at every such step until 2026-12-06), that step is withheld and the
    expansion learned as no meeting: it stays shared, meets the layer along dim 1, exact."""
    torch.manual_seed(seed)
    model = _SharedByLayers(form)
    engine = PerExampleNorms(model, subbatches=0)
    learned = False
    try:
        for n in (5,) * 8 + (2,) * 3:
            x = torch.randn(n, 4, 3)
            model.zero_grad()
            if n == 2 and form in _NAMED_SQUARE:
                with pytest.raises(UnsupportedModuleError, match=(
                    r"layer 'rnn' \(GRU\) was given a learned initial state computed from h0, "
                    r"one state shared by its 2 layers·directions and by the examples.*"
                    r"Learn one state per layer.*h0.repeat\(num_layers·directions, N, 1\)"
                )):  # fmt: skip
                    model(x).pow(2).sum().backward()
                continue
            if n == 2 and form not in _EXACT_SQUARE and not learned:
                # (where the search loses the examples' dimension — a repeat, views that merge
                # dimensions, a stack along it, a long history — the audit's finding is learned)
                model(x).pow(2).sum().backward()
                (p,) = engine.collect()
                assert p.raw_sqnorms is None and "'expand of h0'" in p.withheld, p.withheld
                learned = True
                continue
            _assert_step_exact(model, engine, x)
    finally:
        engine.remove()


class _SharedByLayersThenReentrant(_SharedByLayers):
    """:class:`_SharedByLayers` with a checkpoint(use_reentrant=True) after the layer (the
    same function without it for brute force, ``reentrant`` False)."""

    def __init__(self, form: str):
        super().__init__(form)
        self.reentrant = True

    def forward(self, x):
        o = super().forward(x)
        return checkpoint(torch.tanh, o, use_reentrant=True) if self.reentrant else o.tanh()


@pytest.mark.parametrize(
    "form", ["repeat then expand", "five views", "stack of layer rows", *_EXACT_SQUARE]
)
def test_a_square_state_beside_a_reentrant_checkpoint_is_exact_or_refused(form):
    """The forms the audit decides at N = L·D = 2 (the search loses the examples' dimension)
    with a checkpoint(use_reentrant=True) after the layer: the audit's replay failed at the
    checkpoint and left the whole pass unchecked, and they were measured 1e-4 to 7e-4 off with
    only the warning (2026-12-05). The replays run through the checkpoint now: the audit finds
    the expansion's rows not the examples' (refused until 2026-12-06; now that step is
    withheld and the expansion learned as no meeting, exact from the next), and the exact
    forms still exact."""
    torch.manual_seed(0)
    model = _SharedByLayersThenReentrant(form)
    engine = PerExampleNorms(model, subbatches=0)
    learned = False
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "noisescale: the attribution check", RuntimeWarning)
            for n in (5,) * 3 + (2,) * 3:
                x = torch.randn(n, 4, 3)
                model.zero_grad()
                model(x).pow(2).sum().backward()
                (p,) = engine.collect()
                if n == 2 and form not in _EXACT_SQUARE and not learned:
                    assert p.raw_sqnorms is None and "'expand of h0'" in p.withheld, p.withheld
                    learned = True
                    continue
                with engine.paused():
                    model.reentrant = False
                    want = _brute_sqnorms(model, x)
                    model.reentrant = True
                torch.testing.assert_close(p.raw_sqnorms, want, rtol=1e-9, atol=0)
    finally:
        engine.remove()


class _EncoderDecoder(nn.Module):
    """A class token expanded over the examples (a meeting along dim 0, like h0 [1, 1, H]
    expanded over two layers at N = 2) in a 2-layer encoder's input, whose final state
    [2, N, H] is the decoder's initial state."""

    def __init__(self):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, 3))
        self.enc = nn.GRU(3, 4, num_layers=2, batch_first=True)
        self.dec = nn.GRU(3, 4, num_layers=2, batch_first=True)

    def forward(self, x):
        _, h = self.enc(torch.cat([self.cls.expand(x.shape[0], 1, 3), x], 1))
        return self.dec(x, h)[0][:, -1]


def test_an_encoders_state_with_a_class_token_at_as_many_layers_as_examples_is_exact():
    """The search for an expansion over the layers taken for one over the examples stops at
    the encoder's output (its examples along dim 1, kept apart): not refused at N = 2."""
    torch.manual_seed(0)
    model = _EncoderDecoder()
    engine = PerExampleNorms(model, subbatches=0)
    try:
        for n in (5, 5, 2, 2):
            x = torch.randn(n, 4, 3)
            _assert_step_exact(model, engine, x)
    finally:
        engine.remove()


class _CommonStates(nn.Module):
    """Decoder states made the usual ways from per-example activations, in a pass with a class
    token or a start token (expansions over dim 0, which arm the search at N = L = 2): a
    bridge's vector repeated over the layers, a bridge's output viewed to [L, N, H], an encoder
    run before a start token on a long sequence, stacks and permutes with negative dims."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.cls = nn.Parameter(torch.randn(1, 1, 3))
        self.enc = nn.GRU(3, 4, num_layers=2, batch_first=True)
        self.bridge = nn.Linear(4, 8)
        self.dec = nn.GRU(3, 4, num_layers=2, batch_first=True)

    def forward(self, x):
        n, form = x.shape[0], self.form
        if form == "encoder first, long sequence":
            _, h = self.enc(x)
            dec_in = torch.cat([self.cls.expand(n, 1, 3), x[:, :3]], 1)
            return self.dec(dec_in, h)[0][:, -1]
        e, _ = self.enc(torch.cat([self.cls.expand(n, 1, 3), x], 1))
        v = torch.tanh(self.bridge(e[:, 0]))  # [N, 2·H]
        if form == "repeat over layers":
            h = v[:, :4].unsqueeze(0).repeat(2, 1, 1)
        elif form == "bridge viewed":
            h = v.view(n, 2, 4).transpose(0, 1).contiguous()
        elif form == "stack at -3":
            h = torch.stack([v[:, :4], v[:, 4:]], -3)
        else:  # "permute with negative dims"
            h = v.view(n, 4, 2).permute(-1, 0, 1).contiguous()
        return self.dec(x, h)[0][:, -1]


@pytest.mark.parametrize(
    "form",
    [
        "repeat over layers", "bridge viewed", "encoder first, long sequence", "stack at -3",
        "permute with negative dims",
    ],
)  # fmt: skip
def test_ordinary_decoder_states_at_as_many_layers_as_examples_are_exact(form):
    """Refused at N = L = 2 by the first version of the search, which refused wherever it lost
    the examples' dimension or ran out of budget, and read negative saved dimensions wrong (a
    review, 2026-12-05): exact now — the search refuses only along a known dimension, and the
    audit decides the rest."""
    torch.manual_seed(0)
    model = _CommonStates(form)
    engine = PerExampleNorms(model, subbatches=0)
    length = 40 if form == "encoder first, long sequence" else 4
    try:
        for n in (5, 5, 2, 2, 2):
            x = torch.randn(n, length, 3)
            _assert_step_exact(model, engine, x)
    finally:
        engine.remove()


class _PackedBiLSTM(nn.Module):
    """A speech model's shape: a front end, a bidirectional LSTM over packed sequences of
    different lengths, a per-frame head."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.lstm = nn.LSTM(8, 6, batch_first=True, bidirectional=True)
        self.head = nn.Linear(12, 7)

    def forward(self, x, lengths):
        packed = nn.utils.rnn.pack_padded_sequence(
            torch.tanh(self.inp(x)), lengths, batch_first=True, enforce_sorted=False
        )
        out, _ = self.lstm(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return self.head(out)


@pytest.mark.usefixtures("float64_default")
def test_a_packed_bilstm_under_ctc_is_exact_every_time():
    """A hunt (2026-12-06): the loss watch kept the in-place writes it followed by storage
    address, and the packed LSTM's kernel writes its buffers in place: once freed, an address
    handed to a tensor of the loss made it look written — this model under CTC was refused at
    random, in about 3 of 10 identical measurements. The storage written must still live now;
    twenty measurements, all exact."""
    torch.manual_seed(0)
    model = _PackedBiLSTM()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 12, 8, generator=g)
    lengths = torch.tensor([12, 10, 8, 12])
    target_lengths = torch.tensor([3, 2, 4, 1])
    targets = torch.randint(1, 7, (4, 4), generator=g)

    def losses():
        logp = model(x, lengths).log_softmax(-1).transpose(0, 1)
        return F.ctc_loss(logp, targets, lengths, target_lengths, reduction="none") / target_lengths

    params = list(model.parameters())
    want = torch.stack(
        [sum(g.pow(2).sum() for g in torch.autograd.grad(losses()[i], params)) for i in range(4)]
    )
    for _ in range(20):
        model.zero_grad()
        with noisescale.per_example_sqnorms(model) as pe:
            losses().mean().backward()
        torch.testing.assert_close(pe.sqnorms, want, rtol=1e-9, atol=0)


class _SortedByLength(nn.Module):
    """The idiom from before enforce_sorted=False: the batch sorted by length inside the
    forward, packed, run through a recurrent layer, unsorted (``sort=False``: packed in its
    own order with enforce_sorted=False, which torch sorts and restores itself)."""

    def __init__(self, cell: type, sort: bool, mid: bool) -> None:
        super().__init__()
        self.sort, self.mid = sort, mid
        self.conv = nn.Conv1d(5, 8, 3, padding=1)
        self.rnn = cell(8, 6, batch_first=True)
        self.between = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x, lengths):
        h = torch.tanh(self.conv(x.transpose(1, 2))).transpose(1, 2)
        order = lengths.argsort(descending=True) if self.sort else torch.arange(len(lengths))
        packed = nn.utils.rnn.pack_padded_sequence(
            h[order], lengths[order], batch_first=True, enforce_sorted=self.sort
        )
        out, _ = self.rnn(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        if self.mid:
            out = torch.tanh(self.between(out))
        return self.head(out[order.argsort()])


@pytest.mark.usefixtures("float64_default")
@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("mid", [False, True])
@pytest.mark.parametrize("sort", [True, False])
def test_a_batch_reordered_before_a_packed_recurrent_layer_is_refused(cell, mid, sort):
    """A hunt (2026-12-06): the batch sorted by length inside the forward before
    pack_padded_sequence had the recurrent layer's rows given to the wrong examples — 15–44%
    off per example, the default's |G|² up to 23% — without a word: the audit did not check a
    packed output (no example dimension), and a layer on the sorted rows was taken for one on
    a table shared by every example (the sorted batch does not change when the examples are
    permuted). Both are checked now, and the step is refused naming the fix; packed in its
    own order (enforce_sorted=False) the same model is exact."""
    torch.manual_seed(0)
    model = _SortedByLength(cell, sort, mid)
    g = torch.Generator().manual_seed(1)
    n = 8
    x = torch.randn(n, 9, 5, generator=g)
    lengths = torch.randperm(n, generator=g) + 2
    y = torch.randint(0, 3, (n,), generator=g)

    def losses():
        return F.cross_entropy(model(x, lengths)[torch.arange(n), lengths - 1], y, reduction="none")

    if sort:
        with pytest.raises(UnsupportedModuleError, match="enforce_sorted=False"):
            with noisescale.per_example_sqnorms(model):
                losses().mean().backward()
        tracker = noisescale.GradientNoiseTracker(model)
        try:
            with pytest.raises(UnsupportedModuleError, match="enforce_sorted=False"):
                for _ in range(3):
                    model.zero_grad()
                    losses().mean().backward()
                    tracker.step()
        finally:
            tracker.remove()
        return
    params = [p for name, p in model.named_parameters() if mid or "between" not in name]
    want = torch.stack(
        [sum(g.pow(2).sum() for g in torch.autograd.grad(losses()[i], params)) for i in range(n)]
    )
    model.zero_grad()
    with noisescale.per_example_sqnorms(model) as pe:
        losses().mean().backward()
    torch.testing.assert_close(pe.sqnorms, want, rtol=1e-9, atol=0)


class _TrimmedTable(nn.Module):
    """A learned call on a position table shared by every example, trimmed inside the forward
    to the batch's longest example (dynamic padding)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.table = nn.Parameter(torch.randn(6, 3), requires_grad=False)
        self.pos = nn.Linear(3, 3)
        self.inp = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x, mask):
        length = int(mask.sum(1).max())
        x, mask = x[:, :length], mask[:, :length]
        h = torch.tanh(self.inp(x) + self.pos(self.table[:length])[None])
        return self.head((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))


@pytest.mark.usefixtures("float64_default")
@pytest.mark.parametrize("longest", range(4))
def test_a_shared_table_trimmed_to_the_longest_example_stays_shared(longest):
    """(A review, 2026-12-06.) The check that a layer's input does not carry the examples now
    re-runs the model with one example in two rows, another left out — which shortens a table
    trimmed to the longest example when that one is left out (here its length 4 = N): the
    layer was refused as fed a reordered batch. A change of shape whose common part is
    unchanged is left to the permutation alone: learned as shared, measured exactly."""
    model = _TrimmedTable()
    tracker = noisescale.GradientNoiseTracker(model, per_example_fraction=1.0)
    g = torch.Generator().manual_seed(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (step 1 withheld while the table is learned)
            for _ in range(3):
                x, y = torch.randn(4, 6, 3, generator=g), torch.randint(0, 2, (4,), generator=g)
                lengths = torch.full((4,), 3)
                lengths[longest] = 4
                mask = (torch.arange(6)[None] < lengths[:, None]).double()
                model.zero_grad()
                F.cross_entropy(model(x, mask), y).backward()
                tracker.step()
    finally:
        tracker.remove()
    assert sum(not r["skipped"] for r in tracker.history) >= 2


class _TimeMajorLast(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.gru, self.head = nn.GRU(3, 4), nn.Linear(4, 2)

    def forward(self, x, lengths):  # x [T, N, D]
        out, _ = self.gru(x)
        return self.head(out[lengths - 1, torch.arange(x.shape[1])])


def test_a_time_major_rnns_last_step_at_as_many_steps_as_examples_is_exact():
    """``out[lengths - 1, arange(N)]`` on a time-major [T, N, H] output with T = N: the index
    along dim 1 is the examples in order. A review of 2026-12-06 found a mend of that day
    reading only dim 0's index there, and this model refused whenever T = N (exact before)."""
    model = _TimeMajorLast()
    x = torch.randn(4, 4, 3, generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([4, 2, 3, 1])
    params = list(model.parameters())
    want = torch.stack(
        [
            sum(
                g.pow(2).sum()
                for g in torch.autograd.grad(
                    model(x[:, i : i + 1], lengths[i : i + 1]).pow(2).sum(), params
                )
            )
            for i in range(4)
        ]
    )
    with noisescale.per_example_sqnorms(model, loss_reduction="sum") as result:
        model(x, lengths).pow(2).sum().backward()
    torch.testing.assert_close(result.sqnorms, want, rtol=1e-9, atol=0)
