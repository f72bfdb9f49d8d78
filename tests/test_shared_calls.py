"""A layer called once on input every example shares, its output then broadcast to the batch
(timm XCiT's Fourier positional encoding: a 1×1 convolution on a grid with a leading 1, then
``repeat(B, …)``). The layer's gradient is then a sum over the examples of what reaches it
through the broadcast; the engine follows the output to the batch and measures each example as
having made the call itself. Convolutions and the channel-first norms (GroupNorm, InstanceNorm,
BatchNorm in eval mode) crashed here inside the engine; every layer is now exact against brute
force, in the exact mode and in the default sub-batch mode, and the tracker trains through it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import noisescale
from noisescale.errors import UnsupportedModuleError
from test_subbatch import assert_exact_both_modes, example_sqnorms, train_tracked

pytestmark = pytest.mark.usefixtures("float64_default")

N = 4

LAYERS = {
    "conv1d": (lambda: nn.Conv1d(3, 4, 3), (3, 7)),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, padding=1), (3, 5, 5)),
    "conv2d 1x1": (lambda: nn.Conv2d(6, 4, 1), (6, 4, 4)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2), (2, 3, 3, 3)),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(3, 4, 3), (3, 4, 4)),
    "group_norm(1)": (lambda: nn.GroupNorm(1, 4), (4, 3, 3)),
    "group_norm(2)": (lambda: nn.GroupNorm(2, 4), (4, 3, 3)),
    "instance_norm": (lambda: nn.InstanceNorm2d(4, affine=True), (4, 3, 3)),
    "batch_norm eval": (lambda: nn.BatchNorm2d(4).eval(), (4, 3, 3)),
    "layer_norm": (lambda: nn.LayerNorm(5), (3, 5)),
    "linear": (lambda: nn.Linear(5, 6), (3, 5)),
}


class SharedThenBroadcast(nn.Module):
    """``layer`` on a constant of m rows, summed over them, broadcast to the batch."""

    def __init__(self, layer: nn.Module, shape: tuple, m: int, how: str):
        super().__init__()
        self.layer, self.m, self.how = layer, m, how
        self.register_buffer(
            "grid", torch.randn(m, *shape, generator=torch.Generator().manual_seed(3))
        )
        with torch.no_grad():
            size = layer(self.grid)[0].numel()
        self.head = nn.Linear(size, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = self.layer(self.grid).sum(0, keepdim=True)  # [1, ...]: no example dimension
        b = x.shape[0]
        x = x.view(b, *pos.shape[1:])
        if self.how == "repeat":
            h = x + pos.repeat(b, *([1] * (pos.dim() - 1)))
        elif self.how == "expand":
            h = x + pos.expand(b, *pos.shape[1:])
        else:  # broadcast in a product
            h = x * pos
        return self.head(torch.tanh(h).flatten(1))


def _case(name: str, m: int, how: str, n: int = N):
    build, shape = LAYERS[name]
    torch.manual_seed(0)
    model = SharedThenBroadcast(build(), shape, m, how)
    size = model.head.in_features
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, size, generator=g), torch.randint(0, 3, (n,), generator=g)

    def losses():
        return F.cross_entropy(model(x), y, reduction="none")

    return model, losses


@pytest.mark.parametrize("how", ["repeat", "expand", "product"])
@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("name", list(LAYERS))
def test_a_layer_called_on_shared_input_is_exact(name, m, how):
    model, losses = _case(name, m, how)
    assert_exact_both_modes(model, losses, N)


def test_a_convolution_on_a_shared_unbatched_input_is_exact():
    """Conv2d also takes an unbatched [C, H, W] input: its leading dimension is channels, and
    each example is given the whole input (not its rows)."""

    class Unbatched(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 3)
            self.register_buffer(
                "grid", torch.randn(3, 5, 5, generator=torch.Generator().manual_seed(2))
            )
            self.head = nn.Linear(18, 3)

        def forward(self, x):
            return self.head(torch.tanh(x + self.conv(self.grid).flatten()))

    torch.manual_seed(0)
    model = Unbatched()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, 18, generator=g), torch.randint(0, 3, (N,), generator=g)

    def losses():
        return F.cross_entropy(model(x), y, reduction="none")

    assert_exact_both_modes(model, losses, N)


UNBATCHED = {
    "linear": (lambda: nn.Linear(N, 3), (N,)),
    "bilinear": (lambda: nn.Bilinear(N, N, 3), (N,)),
    "layer_norm": (lambda: nn.LayerNorm(N), (N,)),
    "rms_norm": (lambda: nn.RMSNorm(N), (N,)),
    "conv1d": (lambda: nn.Conv1d(N, 3, 2), (N, 3)),
    "instance_norm": (lambda: nn.InstanceNorm1d(N, affine=True), (N, 3)),
}


class OnOneItem(nn.Module):
    """``layer`` on one item without a batch dimension, of leading size N: a frozen
    Parameter, a buffer or a constant made in the forward; its output added to every
    example's features."""

    def __init__(self, name: str, source: str):
        super().__init__()
        build, self.shape = UNBATCHED[name]
        self.layer, self.name, self.source = build(), name, source
        item = torch.randn(self.shape, generator=torch.Generator().manual_seed(2))
        if source == "frozen parameter":
            self.item = nn.Parameter(item, requires_grad=False)
        else:
            self.register_buffer("item", item)
        with torch.no_grad():
            size = self._item_out().numel()
        self.stem = nn.Linear(5, size)
        self.head = nn.Linear(size, 3)

    def _item_out(self):
        item = self.item if self.source != "constant" else torch.linspace(-1, 1, N * 3)
        item = item.flatten()[: self.item.numel()].view(self.shape)
        return self.layer(item, item) if self.name == "bilinear" else self.layer(item)

    def forward(self, x):
        return self.head(torch.tanh(self.stem(x) + self._item_out().flatten()))


def _on_one_item(name: str, source: str):
    torch.manual_seed(0)
    model = OnOneItem(name, source)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, 5, generator=g), torch.randint(0, 3, (N,), generator=g)

    def losses():
        return F.cross_entropy(model(x), y, reduction="none")

    return model, losses


@pytest.mark.parametrize("source", ["frozen parameter", "buffer"])
@pytest.mark.parametrize("name", list(UNBATCHED))
def test_a_layer_on_one_unbatched_item_of_the_batchs_size_is_exact(name, source):
    """A layer run on one item with no batch dimension (a Linear's [D], a Conv1d's [C, L])
    whose leading size equals the batch's by coincidence: measured as a shared call. A frozen
    Parameter was taken for the examples, and the rule crashed with a raw torch error
    ("shape '[4, -1, 4]' is invalid", a fuzz hunt, seed 61042)."""
    model, losses = _on_one_item(name, source)
    assert_exact_both_modes(model, losses, N)


@pytest.mark.parametrize("name", ["linear", "conv1d"])
def test_a_layer_on_one_unbatched_constant_of_the_batchs_size_is_refused(name):
    """The same item made in the forward: as the examples' data mixed as features would be,
    it has no history and is no buffer — refused naming the cause and the fixes (it crashed
    before, as above)."""
    model, losses = _on_one_item(name, "constant")
    with pytest.raises(UnsupportedModuleError) as info:
        with noisescale.per_example_sqnorms(model):
            losses().mean().backward()
    text = str(info.value)
    assert f"layer 'layer' was called on an input of shape {list(UNBATCHED[name][1])}" in text
    assert "without a batch dimension" in text and f"the batch's ({N})" in text
    assert "register_buffer" in text and "requires_grad=False" in text


@pytest.mark.parametrize("name", ["conv2d 1x1", "group_norm(2)"])
def test_the_tracker_trains_through_a_shared_call(name):
    """Six steps of the default tracker (audited steps 1, 2 and 4 among them): no error, no
    warning, every step with its sub-batch norms."""
    model, losses = _case(name, 1, "repeat", n=16)
    tracker = train_tracked(model, lambda: losses().mean(), lr=0.01)
    assert len(tracker.history) == 6
    # (no weight here takes sub-batch products, so from its second step the engine measures
    # every example, the cheaper form for this model)
    counts = [{k: v["count"] for k, v in r["sources"].items()} for r in tracker.history]
    assert counts == [{"subbatch": 8}] + [{"per_example": 16}] * 5, counts
    assert not any(r["skipped"] for r in tracker.history)


class _ContinuousPositionBias(nn.Module):
    """torchvision Swin v2's cpb_mlp: an MLP with an in-place ReLU on a constant coordinate
    table, its output indexed, squashed and added to every example's attention scores."""

    def __init__(self, first: nn.Module, width: int):
        super().__init__()
        self.cpb_mlp = nn.Sequential(first, nn.ReLU(inplace=True), nn.Linear(width, 2, bias=False))
        g = torch.Generator().manual_seed(5)
        self.register_buffer("table", torch.randn(1, 3, 3, 2, generator=g))
        self.register_buffer("index", torch.randint(0, 9, (9,), generator=g))
        self.qkv = nn.Linear(4, 12)
        self.head = nn.Linear(4, 3)

    def forward(self, x):  # [N, T=3, 4], two heads of 2
        n = x.shape[0]
        table = self.table
        if isinstance(self.cpb_mlp[0], nn.Conv2d):
            table = table.permute(0, 3, 1, 2)  # [1, 2, 3, 3]: the conv's channels first
        bias = self.cpb_mlp[0](table)
        if isinstance(self.cpb_mlp[0], nn.Conv2d):
            bias = bias.permute(0, 2, 3, 1)
        bias = self.cpb_mlp[2](self.cpb_mlp[1](bias)).reshape(-1, 2)[self.index]
        bias = 16 * torch.sigmoid(bias.view(3, 3, 2).permute(2, 0, 1))
        q, k, v = self.qkv(x).view(n, 3, 3, 2, 2).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-1, -2) + bias.unsqueeze(0)).softmax(-1)
        return self.head((attn @ v).transpose(1, 2).reshape(n, 3, 4)).mean(1)


@pytest.mark.parametrize(
    "first", ["linear (a view output)", "conv (not a view)"], ids=["linear", "conv"]
)
def test_an_in_place_operation_on_a_shared_call_s_output_is_exact(first):
    """The in-place ReLU rebased the shared output's history past the call: its gradient was
    taken after the ReLU, and the audit refused the step ('a remainder of 140%'); the call's
    own gradient edge is now kept from when it returned."""
    torch.manual_seed(0)
    layer = nn.Linear(2, 8) if first.startswith("linear") else nn.Conv2d(2, 8, 1)
    model = _ContinuousPositionBias(layer, 8)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, 3, 4, generator=g), torch.randint(0, 3, (N,), generator=g)

    def losses():
        return F.cross_entropy(model(x), y, reduction="none")

    assert_exact_both_modes(model, losses, N)


class SharedKeysInAProduct(nn.Module):
    """DeBERTa v1's disentangled attention in small: a table's projection, viewed per head
    ([1, H, P, d]), meets the examples' queries [N, H, T, d] in a batched ``matmul`` that
    broadcasts it over the examples — on either side — after an optional in-place division of
    a view of the projection's output (``pos_query_layer /= scale``)."""

    def __init__(self, side: str, in_place: bool):
        super().__init__()
        self.side, self.in_place = side, in_place
        self.table = nn.Parameter(torch.randn(1, 5, 6))
        self.proj = nn.Linear(6, 6)
        self.q = nn.Linear(6, 6)

    def forward(self, x):  # x: [N, T, 6]
        p = self.proj(self.table).view(1, 5, 2, 3).permute(0, 2, 1, 3)  # [1, H, P, d]
        if self.in_place:
            p /= torch.tensor(2.0)
        else:
            p = p / torch.tensor(2.0)
        q = self.q(x).view(x.shape[0], -1, 2, 3).permute(0, 2, 1, 3)  # [N, H, T, d]
        if self.side == "right":
            scores = torch.matmul(q, p.transpose(-1, -2))  # [N, H, T, P]
        else:
            scores = torch.matmul(p, q.transpose(-1, -2))  # [N, H, P, T]
        return scores.tanh().sum((1, 2, 3))


@pytest.mark.parametrize("in_place", [False, True], ids=["divided", "divided-in-place"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_a_shared_operand_broadcast_over_the_examples_in_a_product(side, in_place):
    """The shared operand is expanded to the batch before the product (a meeting like an
    elementwise one's). An in-place operation on a view of a shared call's output rebases the
    history of the tensor the view belongs to: the call's gradient is taken there (it was taken
    at an alias's node the in-place operation bypassed, and the layer was refused as never
    meeting the batch). Both refused before; exact now, in both modes."""
    torch.manual_seed(0)
    model = SharedKeysInAProduct(side, in_place)
    x = torch.randn(N, 7, 6, generator=torch.Generator().manual_seed(3))
    assert_exact_both_modes(model, lambda: model(x) ** 2, N)


class _MaskTokens(nn.Module):
    """MAE's decoder input: kept patches, then a learned mask token for each hidden one, in the
    reference code's form ``mask_token.repeat(N, k, 1)`` or as ``expand``."""

    def __init__(self, form: str):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.dec = nn.Linear(3, 5), nn.Linear(5, 3)
        self.mask_token = nn.Parameter(torch.randn(1, 1, 5))
        self.form = form

    def forward(self, x):
        h = self.embed(x[:, :2])
        k = x.shape[1] - 2
        if self.form == "repeat":
            tokens = self.mask_token.repeat(x.shape[0], k, 1)
        else:
            tokens = self.mask_token.expand(x.shape[0], k, 5)
        return self.dec(torch.cat([h, tokens], dim=1))


@pytest.mark.parametrize("hidden", [3, N], ids=["k != N", "k = N"])
@pytest.mark.parametrize("form", ["repeat", "expand"])
def test_a_mask_token_repeated_over_examples_and_positions_is_exact(form, hidden):
    """``s.repeat(N, k, 1)`` of a [1, 1, D] token repeats only dimensions of size 1 — an
    expansion —: exact in both modes; refused until 2026-12-06 (blaming the cat, a hunt)."""
    model = _MaskTokens(form)
    x = torch.randn(N, 2 + hidden, 3, generator=torch.Generator().manual_seed(1))
    assert_exact_both_modes(model, lambda: (model(x) - x).pow(2).mean((1, 2)), N)
    train_tracked(model, lambda: (model(x) - x).pow(2).mean())


class _SampledSoftmax(nn.Module):
    """A two-tower recommender scoring each user's item against K negatives shared by the
    batch, whose ids are a buffer embedded by the item tower inside the forward."""

    def __init__(self, k: int):
        super().__init__()
        torch.manual_seed(1)
        self.u, self.i, self.ip = nn.Embedding(11, 4), nn.Embedding(13, 4), nn.Linear(4, 4)
        self.register_buffer("neg_ids", torch.randint(0, 13, (k,)))

    def forward(self, users, items):
        u, v = self.u(users), self.ip(self.i(items))
        neg = self.ip(self.i(self.neg_ids))
        return torch.cat([(u * v).sum(-1, keepdim=True), u @ neg.T], 1)


@pytest.mark.parametrize("k", [3, N], ids=["K != N", "K = N"])
def test_negative_ids_in_a_buffer_are_shared_whatever_their_count(k):
    """An integer buffer's rows hold no example: the item tower's call on it is shared, also
    when K equals the batch (refused until 2026-12-06, a hunt)."""
    model = _SampledSoftmax(k)
    g = torch.Generator().manual_seed(2)
    users, items = torch.randint(0, 11, (N,), generator=g), torch.randint(0, 13, (N,), generator=g)
    zero = torch.zeros(N, dtype=torch.long)
    assert_exact_both_modes(
        model, lambda: F.cross_entropy(model(users, items), zero, reduction="none"), N
    )


class _NullEmbedding(nn.Module):
    """Classifier-free guidance's training: the conditioning of the rows it drops replaced by
    a learned null embedding, written in one of the ways users write it."""

    def __init__(self, how: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.how = how
        self.null = nn.Parameter(torch.randn(1, 3, 4) * 0.5)
        self.attend = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x, emb, drop):
        if self.how == "where":
            emb = torch.where(drop[:, None, None], self.null, emb)
        elif self.how == "expanded":
            emb = emb.clone()
            emb[drop] = self.null.expand(int(drop.sum()), -1, -1)
        else:
            emb = emb.clone()
            emb[drop] = self.null  # (one row, broadcast)
        return self.head(torch.tanh(self.attend(emb).mean(1) + x))


@pytest.mark.parametrize("how", ["where", "expanded", "one row"])
def test_a_learned_null_embedding_written_into_the_dropped_rows_is_exact(how):
    """A hunt (2026-12-06): ``emb[drop] = null.expand(k, -1, -1)`` was refused ('__setitem__'
    has no per-example rule) where ``torch.where(drop, null, emb)`` — the same computation —
    was exact. A value whose rows are one row repeated is written as that row."""
    g = torch.Generator().manual_seed(1)
    n = 5
    x, emb = torch.randn(n, 4, generator=g), torch.randn(n, 3, 4, generator=g)
    model = _NullEmbedding(how)
    for drop in (
        torch.tensor([True, False, True, True, False]),
        torch.zeros(n, dtype=torch.bool),  # (none dropped: crashed at first, a review)
    ):
        assert_exact_both_modes(model, lambda d=drop: model(x, emb, d).pow(2).sum(1), n)


class _RelativeKeys(nn.Module):
    """Attention scores with learned relative-position keys, as Wav2Vec2-BERT computes them:
    a table looked up by the [T, T] distances, met by the queries in an einsum."""

    def __init__(self, equation: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.equation = equation
        self.q = nn.Linear(4, 2 * 3)
        self.distance = nn.Embedding(9, 3)
        self.head = nn.Linear(5 * 5 * 2, 2)

    def forward(self, x):
        n, t, _ = x.shape
        q = self.q(x).view(n, t, 2, 3).transpose(1, 2)  # [N, H, T, d]
        pos = torch.arange(t)
        table = self.distance((pos[None, :] - pos[:, None]).clamp(-4, 4) + 4)  # [T, T, d]
        if self.equation == "bhld,lrd->bhlr":
            scores = torch.einsum(self.equation, q, table)
        else:  # (the operands the other way round)
            scores = torch.einsum(self.equation, table, q)
        return self.head(torch.tanh(scores).reshape(n, -1))


@pytest.mark.parametrize("equation", ["bhld,lrd->bhlr", "lrd,bhld->bhlr"])
def test_relative_keys_met_by_the_queries_in_an_einsum_are_exact(equation):
    """A hunt (2026-12-06): Wav2Vec2-BERT's default relative_key attention was refused at
    every step — a shared table (the distance embedding's lookup) met the per-example queries
    in torch.einsum, which had no rule. Expanded over the examples first, it is met as an
    expansion is."""
    n = 4
    x = torch.randn(n, 5, 4, generator=torch.Generator().manual_seed(1))
    model = _RelativeKeys(equation)
    assert_exact_both_modes(model, lambda: model(x).pow(2).sum(1), n)


def test_wav2vec2_bert_with_relative_keys_is_exact():
    """The model the hunt found refused: Wav2Vec2BertForCTC with its default
    position_embeddings_type="relative_key", a CTC loss per example."""
    transformers = pytest.importorskip("transformers")
    n, vocab, steps = 3, 12, 13
    torch.manual_seed(0)
    model = transformers.Wav2Vec2BertForCTC(
        transformers.Wav2Vec2BertConfig(
            vocab_size=vocab, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=32, feature_projection_input_dim=16, hidden_dropout=0.0,
            activation_dropout=0.0, attention_dropout=0.0, feat_proj_dropout=0.0,
            final_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0, pad_token_id=0,
            conv_depthwise_kernel_size=3, conformer_conv_dropout=0.0,
            position_embeddings_type="relative_key",
        )
    ).train()  # fmt: skip
    g = torch.Generator().manual_seed(4)
    feats = torch.randn(n, steps, 16, generator=g)
    mask = torch.ones(n, steps, dtype=torch.long)
    mask[1, -4:] = 0
    targets = torch.randint(1, vocab, (n, 3), generator=g)

    def losses():
        logits = model(input_features=feats, attention_mask=mask).logits
        logp = F.log_softmax(logits, -1).transpose(0, 1)
        return F.ctc_loss(logp, targets, mask.sum(-1), torch.full((n,), 3), reduction="none")

    assert_exact_both_modes(model, losses, n, rtol=1e-7)


class _PatchMixer(nn.Module):
    """A parameter mixed into per-example tensors directly: ``einsum`` with the raw input's
    patches (``F.unfold``: no autograd history) or a view of it, ``tensordot`` with a
    convolution's output or with the raw input."""

    def __init__(self, form: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.form = form
        self.conv = nn.Conv2d(3, 3, 1)
        self.w = nn.Parameter(torch.randn(12, 12) * 0.3)
        self.v = nn.Parameter(torch.randn(3, 4, 2) * 0.5)

    def forward(self, x):  # x [N, 3, 4, 4]
        if self.form == "einsum unfold(x)":
            return torch.einsum("oc,ncl->nol", self.w, F.unfold(x, 2, padding=1))
        if self.form == "einsum x.flatten(2)":
            return torch.einsum("oc,ncl->nol", self.w[:, :3], x.flatten(2))
        if self.form == "tensordot(conv(x), w)":
            return torch.tensordot(self.conv(x), self.w[:3, :5], dims=([1], [0]))
        if self.form == "tensordot(x, v), two dims":
            return torch.tensordot(x, self.v, dims=([1, 3], [0, 1]))
        return torch.tensordot(self.conv(x).movedim(1, -1), self.w[:3], dims=1)  # "dims=1"


@pytest.mark.parametrize(
    "form",
    [
        "einsum unfold(x)",
        "einsum x.flatten(2)",
        "tensordot(conv(x), w)",
        "tensordot(x, v), two dims",
        "dims=1",
    ],
)
def test_a_parameter_mixed_in_by_einsum_on_the_raw_input_or_by_tensordot_is_exact(form):
    """A hunt (2026-12-06): einsum("oc,ncl->nol", w, F.unfold(x)) on the model's raw input (or
    on x.flatten(2)) was refused as an einsum without a rule — only an operand with a history,
    or the input itself, was taken as the examples' — where w @ F.unfold(x) was exact; and
    torch.tensordot with a parameter had no rule at all. Both are exact now: the einsum's
    operand is the examples' where its dim 0 has the batch's size (as the matmul path decides;
    the audit checks it), and tensordot is a matmul after reshapes."""
    x = torch.randn(N, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    model = _PatchMixer(form)
    assert_exact_both_modes(model, lambda: model(x).pow(2).flatten(1).sum(1), N)


class _ConstantPositions(nn.Module):
    """A parameter contracted in an einsum with a constant of T rows — features of the
    positions, the same for every example — then added to the examples' activations."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(3, 5)
        self.w = nn.Parameter(torch.randn(5, 3) * 0.5)

    def forward(self, x):  # x [N, T, 3]
        t = x.shape[1]
        freqs = torch.arange(t, dtype=x.dtype)[:, None, None] * torch.arange(1.0, 4.0)[:, None]
        pos = torch.sin(freqs).expand(t, 3, 2)  # [T, 3, 2], no example in it
        return self.inp(x) + torch.einsum("oc,tcl->tol", self.w, pos).sum(-1)


def test_an_einsum_with_a_constant_whose_rows_number_as_many_as_the_batch_is_refused():
    """The einsum's operand is taken for the examples by its size alone: a constant of T = N
    rows (positions) is not the examples', and the audit refuses it, naming the expansion —
    never measured as if row t were example t's."""
    from noisescale.errors import UnsupportedModuleError

    x = torch.randn(N, N, 3, generator=torch.Generator().manual_seed(2))
    model = _ConstantPositions()
    with pytest.raises(UnsupportedModuleError, match=r"rows of 'expand of w' do not belong"):
        with noisescale.per_example_sqnorms(model) as _:
            model(x).pow(2).sum((1, 2)).mean().backward()


def test_tensordot_in_a_form_without_a_rule_names_the_form_that_works():
    """tensordot with the shared operand first (its output not led by the examples) is
    refused, and the message names the form that is followed."""
    from noisescale.errors import UnsupportedModuleError

    class SharedFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.w = nn.Parameter(torch.randn(3, 5))

        def forward(self, x):
            return torch.tensordot(self.w, self.conv(x), dims=([0], [1]))

    model = SharedFirst()
    x = torch.randn(N, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    with pytest.raises(UnsupportedModuleError, match=r"tensordot is followed with the per-example"):
        with noisescale.per_example_sqnorms(model) as _:
            model(x).pow(2).sum().backward()


class _CrossLayers(nn.Module):
    """DCN's cross layers, x0 · (xl @ w) + xl, their weights used directly: read as attributes,
    or through a plain Python list that holds them (``self.wl = [self.w0, self.w1]``)."""

    def __init__(self, listed: bool):
        super().__init__()
        torch.manual_seed(0)
        self.w0, self.w1 = nn.Parameter(torch.randn(4) * 0.3), nn.Parameter(torch.randn(4) * 0.3)
        self.head = nn.Linear(4, 1)
        if listed:
            self.wl = [self.w0, self.w1]
        self.listed = listed

    def forward(self, x):
        xl = x
        for w in self.wl if self.listed else (self.w0, self.w1):
            xl = x * (xl @ w)[:, None] + xl
        return self.head(xl).squeeze(1)


@pytest.mark.parametrize("kw", [{}, {"per_example_fraction": 1.0}], ids=["default", "exact"])
def test_parameters_reached_through_a_plain_list_are_refused_naming_it(kw):
    """A hunt (2026-12-06): weights held in a plain Python list and iterated in the forward
    were refused naming a loss term, a reduced loss or a layout — the cause is that they are
    reached without attribute access. The refusal names the list and the fix; read as
    attributes the same model is exact."""
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    model = _CrossLayers(listed=False)
    want = example_sqnorms(model, lambda i: model(x[i : i + 1]).pow(2).sum(), 5)
    with noisescale.per_example_sqnorms(model, loss_reduction="sum") as pe:
        model(x).pow(2).sum().backward()
    torch.testing.assert_close(pe.sqnorms, want, rtol=1e-9, atol=0)
    model = _CrossLayers(listed=True)
    tracker = noisescale.GradientNoiseTracker(model, sync_every=1, **kw)
    try:
        with pytest.raises(UnsupportedModuleError, match=r"plain Python container \('wl' of"):
            for _ in range(2):
                model.zero_grad()
                loss = model(x).pow(2).mean()
                loss.backward()
                tracker.step(loss=loss)
    finally:
        tracker.remove()


class _PositionTable(nn.Module):
    """A parameter times a fixed table of the T positions (no autograd history), added to or
    multiplied into the batch-first activations [N, T, D]: a learned scale of a sinusoid, RoPE
    with learned frequencies, Hyena's decay window. ``lead``: the table built [1, T, D]."""

    def __init__(self, kind: str, lead: bool):
        super().__init__()
        torch.manual_seed(0)
        self.enc, self.dec = nn.Linear(3, 6), nn.Linear(6, 1)
        self.p = nn.Parameter(torch.rand(6))
        self.kind, self.lead = kind, lead

    def forward(self, x):
        h = self.enc(x)
        t = torch.arange(h.shape[1], dtype=h.dtype)[:, None]  # [T, 1]
        if self.lead:
            t = t[None]  # [1, T, 1]
        if self.kind == "scale":
            h = h + self.p * torch.sin(t / (1.0 + torch.arange(6, dtype=h.dtype)))
        elif self.kind == "rope":
            ang = t * self.p
            h = h * ang.cos() + h.roll(1, -1) * ang.sin()
        else:
            h = h * torch.exp(-(t * self.p).abs())
        return self.dec(h).mean(1)


@pytest.mark.parametrize("kind", ["scale", "rope", "decay"])
@pytest.mark.parametrize("form", ["one-shot", "default", "exact"])
def test_a_parameter_times_a_position_table_of_t_equal_to_the_batch_names_the_fix(kind, form):
    """(A hunt, 2026-12-06.) With T = N the history-less table is taken for the examples' rows
    (as the raw input would be: nothing tells them apart), refused at step 1 in every mode —
    while the message promised that GradientNoiseTracker learns it on its first step. The
    message now says it is refused at every step and names the fix, a table with a leading
    dim of 1 (exact below) or a batch size other than T."""
    from noisescale.errors import UnsupportedModuleError

    model = _PositionTable(kind, lead=False)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, N, 3, generator=g), torch.randn(N, 1, generator=g)
    match = r"fixed table of T = N positions.*every step.*pos\[None\].*other than T"
    with pytest.raises(UnsupportedModuleError, match=match) as err:
        if form == "one-shot":
            with noisescale.per_example_sqnorms(model) as _:
                (model(x) - y).pow(2).sum(-1).mean().backward()
        else:
            kw = {} if form == "default" else {"per_example_fraction": 1.0}
            train_tracked(model, lambda: (model(x) - y).pow(2).sum(-1).mean(), **kw)
    assert "learns so on its first step" not in str(err.value)


@pytest.mark.parametrize("kind", ["scale", "rope", "decay"])
@pytest.mark.parametrize(("t", "lead"), [(N, True), (5, False)])
def test_a_parameter_times_a_position_table_led_by_one_or_of_t_other_than_n_is_exact(kind, t, lead):
    """The fix the refusal names (the table [1, T, D], T = N), and T ≠ N: exact."""
    model = _PositionTable(kind, lead)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, t, 3, generator=g), torch.randn(N, 1, generator=g)
    assert_exact_both_modes(model, lambda: (model(x) - y).pow(2).sum(-1), N)


class _ExamplesAsFeatures(nn.Module):
    """``mix(fc(x).squeeze(1))``: the N examples' scalars read by a Linear(N, N) as one item's
    features — mixed, refused."""

    def __init__(self):
        super().__init__()
        self.fc, self.mix, self.out = nn.Linear(3, 1), nn.Linear(N, N), nn.Linear(1, 2)

    def forward(self, x):
        return self.out(self.mix(self.fc(x).squeeze(1)).unsqueeze(1))


def test_examples_read_as_one_item_s_features_are_refused_naming_that():
    """(A review of 2026-12-07.) The refusal said the layer's input was one of the model's
    buffers; it is an activation of the examples read without a batch dimension."""
    model = _ExamplesAsFeatures()
    x = torch.randn(N, 3, generator=torch.Generator().manual_seed(1))
    with pytest.raises(UnsupportedModuleError, match="without a batch dimension") as err:
        with noisescale.per_example_sqnorms(model) as _:
            model(x).pow(2).sum(1).mean().backward()
    assert "buffers" not in str(err.value)
