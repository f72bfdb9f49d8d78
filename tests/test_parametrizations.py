"""Parametrized weights (torch.nn.utils.parametrize: weight_norm, spectral_norm, orthogonal, a
parametrization of one's own) and scalar parameters, against brute force.

A parametrized weight is computed from its originals each time it is read; the engine follows
the originals through the parametrization's forward to where the weight meets the batch, so
each example's gradient of the originals is exact. These were refused before ("parametrized
weights") — the whole wav2vec2 family with them (wav2vec2, HuBERT, SEW, UniSpeech: a
weight-normed positional convolution) — and a 0-d parameter (a learnable temperature, or
weight_norm's g with dim=None) crashed inside the engine."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, parametrize, prune

import noisescale
from noisescale.errors import NoiseScaleInputError, UnsupportedModuleError
from noisescale.per_example.shared import SharedTensor
from test_subbatch import assert_exact_both_modes, assert_preconditioned_exact, train_tracked

pytestmark = pytest.mark.usefixtures("float64_default")

N = 4


class _Symmetric(nn.Module):
    def forward(self, x):
        return x.triu() + x.triu(1).transpose(-1, -2)


def _head(layer: nn.Module, width: int) -> nn.Module:
    return nn.Sequential(layer, nn.Tanh(), nn.Flatten(), nn.Linear(width, 3))


def _weight_norm_linear(dim):
    return _head(parametrizations.weight_norm(nn.Linear(5, 5), dim=dim), 5), (N, 5)


CASES = {
    "weight_norm Linear": lambda: _weight_norm_linear(0),
    "weight_norm Linear dim=None (a 0-d g)": lambda: _weight_norm_linear(None),
    "weight_norm grouped Conv1d dim=2 (wav2vec2)": lambda: (
        _head(parametrizations.weight_norm(nn.Conv1d(4, 4, 3, padding=1, groups=2), dim=2), 24),
        (N, 4, 6),
    ),
    # (parametrized transposed convolutions meet the batch in F.conv_transposeNd: refused
    # before, Encodec's weight-normed decoder with them, a hunt of 2026-12-05)
    "weight_norm ConvTranspose1d, stride 2, output_padding (Encodec)": lambda: _transposed(
        nn.ConvTranspose1d(4, 4, 3, stride=2, padding=1, output_padding=1), (N, 4, 6)
    ),
    "weight_norm ConvTranspose2d, groups, dilation, dim=1": lambda: _transposed(
        nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2, dilation=2),
        (N, 4, 4, 4),
        dim=1,
    ),
    "spectral_norm Linear, eval": lambda: (
        _head(parametrizations.spectral_norm(nn.Linear(5, 5)), 5).eval(),
        (N, 5),
    ),
    "orthogonal Linear": lambda: (_head(parametrizations.orthogonal(nn.Linear(5, 5)), 5), (N, 5)),
    "a parametrization of one's own": lambda: (
        _head(_registered(nn.Linear(5, 5), "weight", _Symmetric()), 5),
        (N, 5),
    ),
    "a parametrized bias": lambda: (
        _head(_registered(nn.Linear(5, 5), "bias", nn.Tanh()), 5),
        (N, 5),
    ),
}


def _pruned(layer: nn.Module, *prunes) -> nn.Module:
    for prune_, name, kw in prunes:
        prune_(layer, name, **kw)
    return layer


# The old reparametrizations compute the weight in a forward pre-hook from parameters of their
# own (weight_orig; weight_g and weight_v): refused until 2026-12-06 as parameters the layer's
# rule does not cover, a pruned model's with a message about weight_norm
OLD = {
    "prune.l1_unstructured Linear": lambda: (
        _head(_pruned(nn.Linear(5, 5), (prune.l1_unstructured, "weight", {"amount": 0.4})), 5),
        (N, 5),
    ),
    "prune.ln_structured Conv1d, then its bias (a PruningContainer)": lambda: (
        _head(
            _pruned(
                nn.Conv1d(4, 4, 3, padding=1),
                (prune.ln_structured, "weight", {"amount": 0.5, "n": 2, "dim": 0}),
                (prune.random_unstructured, "weight", {"amount": 0.3}),
                (prune.l1_unstructured, "bias", {"amount": 0.5}),
            ),
            24,
        ),
        (N, 4, 6),
    ),
    "old weight_norm Linear": lambda: (_head(nn.utils.weight_norm(nn.Linear(5, 5)), 5), (N, 5)),
    "old weight_norm Conv1d dim=2": lambda: (
        _head(nn.utils.weight_norm(nn.Conv1d(4, 4, 3, padding=1), dim=2), 24),
        (N, 4, 6),
    ),
    "old spectral_norm Linear, eval": lambda: (
        _head(nn.utils.spectral_norm(nn.Linear(5, 5)), 5).eval(),
        (N, 5),
    ),
    "old spectral_norm Conv2d, training (power iteration in the pre-hook)": lambda: (
        _head(nn.utils.spectral_norm(nn.Conv2d(3, 4, 3, padding=1)), 4 * 9),
        (N, 3, 3, 3),
    ),
}


def _transposed(layer: nn.Module, shape: tuple, dim: int = 0):
    width = layer(torch.zeros(shape)).numel() // shape[0]
    return _head(parametrizations.weight_norm(layer, dim=dim), width), shape


def _registered(module, name, parametrization):
    parametrize.register_parametrization(module, name, parametrization)
    return module


def _losses(model, shape):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(*shape, generator=g), torch.randint(0, 3, (shape[0],), generator=g)
    state = {k: v.clone() for k, v in model.named_buffers()}

    def losses():
        # every forward from the same buffers (spectral_norm's power iteration updates its
        # vectors in place in training mode)
        with torch.no_grad():
            for k, v in model.named_buffers():
                if not torch.equal(v, state[k]):  # (a buffer written in place is no constant)
                    v.copy_(state[k])
        return F.cross_entropy(model(x), y, reduction="none")

    return losses


def _assert_exact(model, losses, preconditioned=True):
    assert_exact_both_modes(model, losses, N)
    if preconditioned:
        assert_preconditioned_exact(model, lambda: losses().mean(), lambda i: losses()[i], N, k=2)


@pytest.mark.parametrize("case", list(CASES))
def test_a_parametrized_weight_is_exact(case):
    torch.manual_seed(0)
    model, shape = CASES[case]()
    _assert_exact(model, _losses(model, shape))


@pytest.mark.parametrize("rows", [5, N])
def test_spectral_norm_in_training_mode_is_exact(rows):
    """Its power iteration runs in the forward (buffers updated in place, without a gradient);
    the gradient of the originals goes through σ's dependence on the weight. With as many
    output rows as examples (a discriminator of 64 channels on batches of 64) its vectors u and
    v — computed without gradient, so without history — were taken for the batch's rows and
    the layer refused ('vdot' without a rule) until 2026-12-06: nothing in a parametrization's
    forward is an example's."""
    torch.manual_seed(0)
    model = _head(parametrizations.spectral_norm(nn.Conv2d(3, rows, 3, padding=1)), rows * 9)
    _assert_exact(model, _losses(model, (N, 3, 3, 3)), preconditioned=False)


def test_a_weight_masked_by_a_buffer_of_the_batch_s_size_is_exact():
    """A sparse layer written by hand, ``F.linear(x, self.weight * self.mask)``, with as many
    output rows as examples: the mask is one of the model's buffers, no example's rows (refused
    as rows that might be the examples' until 2026-12-06)."""

    class Masked(nn.Linear):
        def __init__(self) -> None:
            super().__init__(5, N)
            self.register_buffer("mask", (torch.rand(N, 5) > 0.4).double())

        def forward(self, x):
            return F.linear(x, self.weight * self.mask, self.bias)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.masked, self.head = Masked(), nn.Linear(N, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.masked(x)))

    torch.manual_seed(0)
    model = Net()
    _assert_exact(model, _losses(model, (N, 5)))


def test_a_scalar_parameter_used_directly_is_exact():
    """A learnable temperature (CLIP's logit_scale, a ReZero gate): 0-d, per-example values [N]."""

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 3)
            self.temperature = nn.Parameter(torch.tensor(1.5))

        def forward(self, x):
            return self.lin(x) * self.temperature.exp()

    torch.manual_seed(0)
    model = Scaled()
    _assert_exact(model, _losses(model, (N, 5)))


def test_the_tracker_trains_a_weight_normed_model():
    """Six steps of the default tracker (audited steps 1, 2 and 4 among them) on a weight-normed
    convolution: no warning, every step measured, the originals updated by the optimizer."""
    torch.manual_seed(0)
    conv = parametrizations.weight_norm(nn.Conv1d(4, 8, 3, padding=1), dim=2)
    model = _head(conv, 48)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, 4, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
    before = conv.parametrizations.weight.original1.detach().clone()
    tracker = train_tracked(model, lambda: F.cross_entropy(model(x), y), lr=0.1)
    assert not torch.equal(before, conv.parametrizations.weight.original1)
    assert len(tracker.history) == 6 and not any(r["skipped"] for r in tracker.history)


@pytest.mark.parametrize("case", list(OLD))
def test_an_old_reparametrization_is_exact(case):
    """torch.nn.utils.prune, the deprecated nn.utils.weight_norm and nn.utils.spectral_norm: the
    weight computed in their pre-hook from the aliases of their parameters, followed to where it
    meets the batch — each example's gradient of weight_orig is the mask times the weight's."""
    torch.manual_seed(0)
    model, shape = OLD[case]()
    _assert_exact(model, _losses(model, shape), preconditioned="training" not in case)
    # what the pre-hook left on the module after the forward is a plain tensor, not one of the
    # engine's aliases (which would keep its pass)
    for module in model.modules():
        for value in vars(module).values():
            assert not isinstance(value, SharedTensor)


def test_the_tracker_trains_a_pruned_model_and_its_mask_holds():
    """Six steps of the default tracker on a pruned and an old weight-normed layer: no warning,
    every step measured, the pruned weights still zero, the originals updated."""
    torch.manual_seed(0)
    pruned = prune.l1_unstructured(nn.Linear(6, 6), "weight", amount=0.5)
    model = nn.Sequential(
        nn.utils.weight_norm(nn.Linear(5, 6)), nn.Tanh(), pruned, nn.Tanh(), nn.Linear(6, 3)
    )
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)
    before = pruned.weight_orig.detach().clone()
    tracker = train_tracked(model, lambda: F.cross_entropy(model(x), y), lr=0.1)
    assert not torch.equal(before, pruned.weight_orig)
    model(x)
    assert bool((pruned.weight[pruned.weight_mask == 0] == 0).all())
    assert len(tracker.history) == 6 and not any(r["skipped"] for r in tracker.history)


def test_a_pruned_weight_used_outside_its_layer_is_refused():
    """A penalty on the pruned weight in the loss (the weight the pre-hook left on the module):
    a use of weight_orig no per-example rule sees — refused by the audit, as any such use."""
    torch.manual_seed(0)
    layer = prune.l1_unstructured(nn.Linear(5, 5), "weight", amount=0.4)
    model = _head(layer, 5)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, 5, generator=g), torch.randint(0, 3, (N,), generator=g)
    with pytest.raises(UnsupportedModuleError, match="weight_orig"):
        with noisescale.per_example_sqnorms(model):
            out = model(x)
            (F.cross_entropy(out, y) + 0.1 * layer.weight.pow(2).sum()).backward()


transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("family", ["wav2vec2", "hubert"])
def test_the_wav2vec2_family_with_its_weight_normed_position_convolution(family):
    cls = {
        "wav2vec2": (transformers.Wav2Vec2Config, transformers.Wav2Vec2ForSequenceClassification),
        "hubert": (transformers.HubertConfig, transformers.HubertForSequenceClassification),
    }[family]
    cfg = cls[0](
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=2, num_labels=3, hidden_dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.0,
        mask_time_prob=0.0, final_dropout=0.0, classifier_proj_size=8,
    )  # fmt: skip
    torch.manual_seed(0)
    model = cls[1](cfg)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, 400, generator=g), torch.randint(0, 3, (N,), generator=g)

    def losses():
        return F.cross_entropy(model(input_values=x).logits, y, reduction="none")

    _assert_exact(model, losses, preconditioned=False)


@pytest.mark.parametrize("parametrized", [True, False])
def test_a_transposed_convolution_with_output_padding_not_below_its_stride_is_refused(
    parametrized,
):
    """torch allows a transposed convolution's output_padding up to its dilation; at or above
    its stride the adjoint convolution has more positions than the input, and the rule's
    factors crashed on the size mismatch (a review, 2026-12-05): refused naming it, for the
    module (at the tracker's creation) and for a parametrized weight (at the forward)."""
    from noisescale.per_example import PerExampleNorms

    torch.manual_seed(0)
    layer = nn.ConvTranspose1d(3, 4, 3, stride=1, padding=1, output_padding=1, dilation=2)
    model = _head(parametrizations.weight_norm(layer) if parametrized else layer, 4 * 7)
    with pytest.raises(UnsupportedModuleError, match=r"output_padding \[1\] not below its stride"):
        engine = PerExampleNorms(model)
        try:
            model(torch.randn(N, 3, 6)).pow(2).sum().backward()
            engine.collect()
        finally:
            engine.remove()


@pytest.mark.parametrize("keep", ["assigned", "copied", "copied halved", "inference buffer"])
def test_the_batch_written_into_a_buffer_is_still_the_batch(keep):
    """(Two reviews, 2026-12-06.) The forward keeps its input in a registered buffer —
    assigned to the buffer's name, or copied (or a transform of it) into a preallocated one and
    read back — then meets a
    parameter used directly, ``x @ self.W``. The first version of the buffer rule took any
    buffer for no example's: the first form was refused, the second made the user's own
    backward fail (the audit's re-run of the forward wrote the buffer again). A buffer that
    was written since the engine was made (or sits on an input's memory) is the batch: exact,
    in both modes, on audited and unaudited steps. A table made under inference_mode (which has
    no version counter) crashed the first version of this rule."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.W = nn.Parameter(torch.randn(4, 6) * 0.5)
            self.head = nn.Linear(6, 3)
            self.register_buffer("last_x", torch.zeros(N, 4), persistent=False)

        def forward(self, x):
            if keep == "assigned":
                self.last_x = x
            elif keep == "inference buffer":  # (a table refreshed under inference_mode)
                return self.head(torch.tanh(x @ (self.W + self.table)))
            else:
                self.last_x.copy_(x / 2 if keep == "copied halved" else x)
                x = self.last_x
            return self.head(torch.tanh(x @ self.W))

    torch.manual_seed(0)
    model = Net()
    with torch.inference_mode():
        model.register_buffer("table", torch.randn(4, 6))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, 4, generator=g), torch.randint(0, 3, (N,), generator=g)
    _assert_exact(model, lambda: F.cross_entropy(model(x), y, reduction="none"))


def _prune_weight(lin):
    prune.l1_unstructured(lin, "weight", amount=0.4)


def _prune_bias(lin):
    prune.l1_unstructured(lin, "bias", amount=0.4)


def _old_weight_norm(lin):
    with pytest.warns(FutureWarning):
        nn.utils.weight_norm(lin)


_AROUND_HOOK = {
    "after a pruned weight": ([_prune_weight], []),
    "before a pruned weight and bias": ([], [_prune_weight, _prune_bias]),
    "between a pruned weight and a pruned bias": ([_prune_weight], [_prune_bias]),
    "between the old weight_norm and a pruned bias": ([_old_weight_norm], [_prune_bias]),
}


@pytest.mark.parametrize("order", list(_AROUND_HOOK))
def test_a_user_pre_hook_beside_a_pruned_layer_meets_the_batch(order):
    """A forward pre-hook on a pruned layer, registered before the tracker, that scales the
    input by a parameter of the model (a learned input gain): it runs outside the windows where
    the pruned weight (or bias) is computed from parameters alone — exact (inside one, the
    first version lost the batch's rows there and refused the layer after it, a review of
    2026-12-06; registered between two reparametrizations' hooks, it fell inside the one
    window that spanned them both until a hunt the same day, refused with a false cause)."""
    before, after = _AROUND_HOOK[order]

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gain = nn.Parameter(torch.tensor(1.3))
            self.lin = nn.Linear(5, 5)
            self.head = nn.Linear(5, 3)
            for reparametrize in before:
                reparametrize(self.lin)
            self.lin.register_forward_pre_hook(lambda m, a: (a[0] * self.gain,))
            for reparametrize in after:
                reparametrize(self.lin)

        def forward(self, x):
            return self.head(torch.tanh(self.lin(x)))

    torch.manual_seed(0)
    model = Net()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, 5, generator=g), torch.randint(0, 3, (N,), generator=g)
    _assert_exact(model, lambda: F.cross_entropy(model(x), y, reduction="none"))


class _Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Bilinear(5, 5, 3)

    def forward(self, x):
        return self.layer(x[:, 0], x[:, 1])


class _Cell(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer, self.head = nn.GRUCell(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.zeros(x.shape[0], 5)
        for t in range(x.shape[1]):
            h = self.layer(x[:, t], h)
        return self.head(h)


class _Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer, self.head = nn.LSTM(5, 5, batch_first=True), nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.layer(x)[0][:, -1])


_NO_OP_RULE = {
    "Bilinear": (_Pair, lambda m: parametrizations.weight_norm(m.layer)),
    "GRUCell": (_Cell, lambda m: parametrizations.weight_norm(m.layer, "weight_hh")),
    "LSTM": (_Recurrent, lambda m: parametrizations.weight_norm(m.layer, "weight_hh_l0")),
    "LSTM, two": (
        _Recurrent,
        lambda m: (
            parametrizations.weight_norm(m.layer, "weight_hh_l0"),
            parametrizations.orthogonal(m.layer, "weight_ih_l0"),
        ),
    ),
}


@pytest.mark.parametrize("case", list(_NO_OP_RULE))
def test_a_parametrized_layer_whose_operation_has_no_rule_is_refused_naming_it(case):
    """A Bilinear, GRUCell or LSTM meets the batch in an operation of its own (bilinear,
    gru_cell, lstm): its rule measures it, exactly, and does not apply once a weight is
    parametrized (its originals are followed to that operation, which has no rule). Until
    2026-12-06 the refusal named the ParametrizationList ('layer.parametrizations.weight') as
    the module, and in the tracker said it was called with no input holding the batch's
    examples; never the parametrization. It names the layer, the parametrized weight and the
    fix now, in every mode; the plain layer is exact."""
    build, parametrize_ = _NO_OP_RULE[case]
    torch.manual_seed(0)
    model = build()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, 4, 5, generator=g), torch.randint(0, 3, (N,), generator=g)
    _assert_exact(model, lambda: F.cross_entropy(model(x), y, reduction="none"), False)
    parametrize_(model)
    refused = (
        r"layer 'layer' \(Parametrized\w+\) has its weight\w*.* computed by a parametrization"
        r".*'(bilinear|gru_cell|lstm)'.*does not apply to a parametrized one.*Remove the "
        r"parametrization .*per_example=False"
    )
    with pytest.raises(UnsupportedModuleError, match=refused):
        with noisescale.per_example_sqnorms(model, loss_reduction="mean"):
            F.cross_entropy(model(x), y).backward()
    for kw in ({}, {"per_example_fraction": 1.0}):
        model.zero_grad()
        with pytest.raises(UnsupportedModuleError, match=refused):
            train_tracked(model, lambda: F.cross_entropy(model(x), y), steps=3, **kw)


@pytest.mark.parametrize("remove", ["remove_parametrizations", "remove_weight_norm"])
def test_a_parametrization_removed_mid_run_is_named_among_the_causes(remove):
    """Removing a parametrization (or the old weight_norm hook) after the tracker was made
    leaves a new parameter in the originals' place: refused as parameters added or replaced,
    the message now naming the removal among the causes (it did not, 2026-12-06)."""
    torch.manual_seed(0)
    layer = nn.Linear(5, 5)
    if remove == "remove_parametrizations":
        parametrizations.weight_norm(layer)
    else:
        with pytest.warns(FutureWarning):
            nn.utils.weight_norm(layer)
    model = _head(layer, 5)
    x = torch.randn(N, 5)
    tracker = noisescale.GradientNoiseTracker(model, per_example_fraction=1.0)
    try:
        model(x).pow(2).sum(1).mean().backward()
        tracker.step()
        if remove == "remove_parametrizations":
            parametrize.remove_parametrizations(layer, "weight")
        else:
            nn.utils.remove_weight_norm(layer)
        model.zero_grad()
        model(x).pow(2).sum(1).mean().backward()
        causes = r"added to the model or replaced.*reparametrization removed.*remove_weight_norm"
        with pytest.raises(NoiseScaleInputError, match=causes):
            tracker.step()
    finally:
        tracker.remove()


def test_a_pruned_layer_whose_operation_has_no_rule_names_the_pruning():
    """A pruned LSTM's weight is computed in prune's pre-hook: LSTM's rule does not apply, and
    the torch.func fallback fails on the layer. The refusals (one-shot, and the tracker's at
    the fallback) name the pruning and its fix — they named only the operation, or torch's
    shape error, until 2026-12-06."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, 4, 5, generator=g), torch.randint(0, 3, (N,), generator=g)
    named = r"computed in a forward pre-hook \(torch.nn.utils.prune.*prune.remove"
    torch.manual_seed(0)
    model = _Recurrent()
    prune.l1_unstructured(model.layer, "weight_hh_l0", amount=0.3)
    with pytest.raises(UnsupportedModuleError, match=named):
        with noisescale.per_example_sqnorms(model, loss_reduction="mean"):
            F.cross_entropy(model(x), y).backward()
    for kw in ({}, {"per_example_fraction": 1.0}):
        tracker = noisescale.GradientNoiseTracker(model, **kw)
        try:
            with pytest.raises(UnsupportedModuleError, match=r"fallback failed on it.*" + named):
                with pytest.warns(RuntimeWarning, match="torch.func fallback"):
                    for _ in range(3):  # (step 1 sends the layer to the fallback)
                        model.zero_grad()
                        F.cross_entropy(model(x), y).backward()
                        tracker.step()
        finally:
            tracker.remove()
