"""A loss that combines the examples has no per-example gradients: refused, never measured.

The engine measures |∂L/∂θ restricted to example i|², which is example i's gradient only when
L = Σ_i ℓ_i(output_i). In-batch negatives, a term between two forwards' outputs, or a
normalization by the batch's statistics make the gradient reaching example i's output depend on
the others', and the engine would report each example's share of the gradient without a word
(the gap documented until 2026-12-03). ``per_example/loss_watch.py`` follows the loss's
operations from the model's outputs to the backward on audited steps: every coupled form below
is refused with the operation that coupled the examples; every separable one (the losses users
write: cross-entropy with label smoothing and ignored positions, shifted language-model losses,
masks, z-loss, detached weights) is measured and equals brute force.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import noisescale
from noisescale.errors import UnsupportedModuleError
from noisescale.per_example import PerExampleNorms

pytestmark = pytest.mark.usefixtures("float64_default")

N, D, C = 5, 6, 4


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, C))


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, D, generator=g), torch.randint(0, C, (N,), generator=g)


def share_truth(model: nn.Module, x: torch.Tensor, loss_of) -> torch.Tensor:
    """|∂L/∂θ|² with only example i's output carrying a gradient, for each i (brute force: the
    model run on example i alone, the other outputs constants)."""
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        full = model(x)
    out = []
    for i in range(x.shape[0]):
        rows = torch.cat([full[:i], model(x[i : i + 1]), full[i + 1 :]])
        grads = torch.autograd.grad(loss_of(rows), params)
        out.append(sum(g.pow(2).sum() for g in grads))
    return torch.stack(out)


def measured(model: nn.Module, x: torch.Tensor, loss_of, steps: int = 2) -> list:
    engine = PerExampleNorms(model)
    try:
        got = []
        for _ in range(steps):
            model.zero_grad()
            loss_of(model(x)).backward()
            (p,) = engine.collect()
            got.append(p)
        return got
    finally:
        engine.remove()


_, Y = data()
MASK = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])

SEPARABLE = {
    "cross_entropy": lambda o: F.cross_entropy(o, Y),
    "label_smoothing": lambda o: F.cross_entropy(o, Y, label_smoothing=0.1),
    "ignore_index_sum": lambda o: (
        F.cross_entropy(o, torch.where(MASK > 0, Y, -100), reduction="sum") / 7.0
    ),
    "masked_mean": lambda o: (F.cross_entropy(o, Y, reduction="none") * MASK).sum() / MASK.sum(),
    "gathered_log_probs": lambda o: -torch.gather(o.log_softmax(-1), 1, Y[:, None]).mean(),
    "z_loss": lambda o: F.cross_entropy(o, Y) + 1e-2 * o.logsumexp(-1).pow(2).mean(),
    "mse": lambda o: F.mse_loss(o, torch.ones_like(o)),
    "bce_logits": lambda o: F.binary_cross_entropy_with_logits(o, torch.ones_like(o) * 0.3),
    "kl_to_a_constant": lambda o: F.kl_div(
        o.log_softmax(-1), torch.full_like(o, 1.0 / C), reduction="batchmean"
    ),
    "focal": lambda o: (
        (1 - o.softmax(-1).gather(1, Y[:, None])).pow(2) * -o.log_softmax(-1).gather(1, Y[:, None])
    ).mean(),
    "detached_batch_weights": lambda o: (
        F.cross_entropy(o, Y, reduction="none")
        * (o.detach().norm(dim=1) / o.detach().norm(dim=1).sum())
    ).sum(),
    "stacked_terms": lambda o: torch.stack([F.cross_entropy(o, Y), o.pow(2).mean()]).sum(),
    "rows_picked_by_a_mask": lambda o: F.cross_entropy(o[MASK > 0], Y[MASK > 0]),
    "centred_by_a_constant": lambda o: (o - o.detach().mean(0)).pow(2).mean(),
    "a_linear_batch_term": lambda o: F.cross_entropy(o, Y) + 0.1 * (o - o.mean(0)).sum(),
    "two_heads_elementwise": lambda o: (o[:, :2] * o[:, 2:]).sum(1).mean(),
    "a_scaled_loss": lambda o: F.cross_entropy(o, Y) * torch.tensor(1024.0),
}


@pytest.mark.parametrize("name", sorted(SEPARABLE))
def test_a_loss_of_per_example_terms_is_measured_exactly(name):
    model, (x, _) = mlp(), data()
    loss_of = SEPARABLE[name]
    want = share_truth(model, x, loss_of)
    for p in measured(model, x, loss_of):
        assert p.raw_sqnorms is not None, p.withheld
        assert torch.allclose(p.raw_sqnorms, want, rtol=1e-9), (name, p.raw_sqnorms, want)


def _similarity(o: torch.Tensor) -> torch.Tensor:
    z = F.normalize(o, dim=-1)
    return F.cross_entropy(z @ z.T / 0.1, torch.arange(o.shape[0]))


COUPLED = {
    "in_batch_negatives_mm": (_similarity, "aten.mm"),
    "in_batch_negatives_einsum": (
        lambda o: F.cross_entropy(torch.einsum("nd,md->nm", o, o), torch.arange(o.shape[0])),
        "aten.bmm",
    ),
    "cosine_similarity_broadcast": (
        lambda o: F.cosine_similarity(o[:, None, :], o[None, :, :], dim=-1).logsumexp(1).mean(),
        "combined the values of different examples",
    ),
    "hard_negative_by_index": (
        lambda o: F.relu(1 + (o * o).sum(1) - (o * o[torch.tensor([1, 2, 3, 4, 0])]).sum(1)).mean(),
        "combined the values of different examples",
    ),
    "centred_by_the_batch_mean": (
        lambda o: (o - o.mean(0)).pow(2).mean(),
        "combined a sum over the examples non-linearly",
    ),
    "normalized_by_the_batch_std": (
        lambda o: (o / o.std(0)).pow(2).mean(),
        "reduced over the examples non-linearly",
    ),
    "softmax_over_the_batch": (
        lambda o: -(o.log_softmax(0) * 0.2).sum(),
        "normalized over the examples",
    ),
    "square_of_the_mean": (lambda o: o.mean().pow(2), "non-linearly"),
    "reversed_batch": (lambda o: (o * o.flip(0)).mean(), "combined the values of different"),
    "max_over_the_batch": (lambda o: o.max(0).values.sum(), "reduced over the examples"),
}


@pytest.mark.parametrize("name", sorted(COUPLED))
def test_a_loss_that_combines_examples_is_refused_with_the_operation(name):
    model, (x, _) = mlp(), data()
    loss_of, op = COUPLED[name]
    engine = PerExampleNorms(model)
    try:
        loss_of(model(x)).backward()
        with pytest.raises(UnsupportedModuleError, match="the loss combines the examples") as err:
            engine.collect()
        assert op in str(err.value)
        assert "per_example=False" in str(err.value)
    finally:
        engine.remove()


def test_the_tracker_refuses_a_contrastive_loss_at_its_first_step():
    model, (x, _) = mlp(), data()
    tracker = noisescale.GradientNoiseTracker(model)
    loss = _similarity(model(x))
    loss.backward()
    with pytest.raises(UnsupportedModuleError, match="in-batch negatives"):
        tracker.step(loss=loss)


def test_the_one_shot_measurement_refuses_a_contrastive_loss():
    model, (x, _) = mlp(), data()
    with pytest.raises(UnsupportedModuleError, match="the loss combines the examples"):
        with noisescale.per_example_sqnorms(model):
            _similarity(model(x)).backward()


def test_two_views_compared_across_two_forwards_are_refused():
    """SimCLR/BYOL: two forwards of one model (merged into one pass of 2N examples), and a term
    per pair (i of the first, i of the second): no per-example gradient of the 2N rows."""
    model, (x, _) = mlp(), data()
    engine = PerExampleNorms(model)
    try:
        z1, z2 = model(x), model(x + 0.1)
        (1 - F.cosine_similarity(z1, z2, dim=-1)).mean().backward()
        with pytest.raises(UnsupportedModuleError, match="two forwards' examples"):
            engine.collect()
    finally:
        engine.remove()


def test_a_reference_batch_whose_term_is_in_every_examples_loss_is_refused():
    """A second forward on a fixed anchor batch inside the loss, its total added to each
    example's term: the anchors' rows would be counted as the step's examples."""
    model, (x, _) = mlp(), data()
    anchor = torch.randn(3, D, generator=torch.Generator().manual_seed(3))
    engine = PerExampleNorms(model)
    try:
        loss = (model(x) - 1).pow(2).sum(1) + 0.1 * model(anchor).pow(2).sum()
        loss.mean().backward()
        with pytest.raises(UnsupportedModuleError, match="anchor or reference batch"):
            engine.collect()
    finally:
        engine.remove()


def test_two_forwards_with_losses_of_their_own_are_exact():
    """Two micro-batches through one backward (losses added): separable, merged, exact."""
    model, (x, _) = mlp(), data()
    x2 = x.flip(0) * 0.5
    params = list(model.parameters())
    engine = PerExampleNorms(model)
    try:
        loss = F.cross_entropy(model(x), Y) + F.mse_loss(model(x2), torch.zeros(N, C))
        loss.backward()
        (p,) = engine.collect()
    finally:
        engine.remove()
    want = []
    for i in range(N):
        loss_i = F.cross_entropy(model(x[i : i + 1]), Y[i : i + 1]) / N
        want.append(sum(g.pow(2).sum() for g in torch.autograd.grad(loss_i, params)))
    for i in range(N):
        loss_i = F.mse_loss(model(x2[i : i + 1]), torch.zeros(1, C)) / N
        want.append(sum(g.pow(2).sum() for g in torch.autograd.grad(loss_i, params)))
    assert torch.allclose(p.raw_sqnorms, torch.stack(want), rtol=1e-9)


def test_a_backward_through_torch_autograd_backward_is_watched_too():
    model, (x, _) = mlp(), data()
    engine = PerExampleNorms(model)
    try:
        torch.autograd.backward(_similarity(model(x)))
        with pytest.raises(UnsupportedModuleError, match="in-batch negatives"):
            engine.collect()
    finally:
        engine.remove()


def test_the_watch_leaves_no_mode_behind():
    """After a step, refused or not, no dispatch or function mode of the watch is left."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    model, (x, _) = mlp(), data()
    for loss_of in (SEPARABLE["cross_entropy"], _similarity):
        engine = PerExampleNorms(model)
        try:
            loss_of(model(x)).backward()
            with contextlib.suppress(UnsupportedModuleError):
                engine.collect()
        finally:
            engine.remove()
        assert _get_current_dispatch_mode() is None
        assert torch._C._len_torch_function_stack() == 0
    # a forward that no backward follows: the model's forwards run without the watch (a
    # validation forward in between), and the step's collect takes it off
    engine = PerExampleNorms(model)
    inside = []
    handle = model[0].register_forward_hook(
        lambda *_: inside.append(_get_current_dispatch_mode() is not None)
    )
    try:
        model(x).sum()
        assert _get_current_dispatch_mode() is not None
        with torch.no_grad():
            model(x)
        engine.collect()
        assert _get_current_dispatch_mode() is None
        assert torch._C._len_torch_function_stack() == 0
    finally:
        handle.remove()
        engine.remove()
    assert inside == [False, False]
    assert _get_current_dispatch_mode() is None


def test_unaudited_steps_run_without_the_watch():
    """Steps 3, 5, 6, 7 are not audited: no mode is pushed after their forwards."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    model, (x, _) = mlp(), data()
    engine = PerExampleNorms(model)
    try:
        seen = []
        for _ in range(6):
            model.zero_grad()
            out = model(x)
            seen.append(_get_current_dispatch_mode() is not None)
            F.cross_entropy(out, Y).backward()
            engine.collect()
    finally:
        engine.remove()
    assert seen == [True, True, False, True, False, False]


# -- models users train ------------------------------------------------------------------------


def test_a_language_model_loss_shifted_and_flattened_outside_the_model_is_exact():
    """GPT-2 from transformers, the causal LM loss computed by hand outside the model (shift,
    flatten, ignore padding): separable, exact against brute force."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        vocab_size=17,
        n_positions=8,
        n_embd=8,
        n_layer=1,
        n_head=2,
        attn_pdrop=0,
        embd_pdrop=0,
        resid_pdrop=0,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).double()
    ids = torch.randint(0, 17, (3, 6), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[0, 4:] = -100

    def loss_of(logits: torch.Tensor) -> torch.Tensor:
        shift = logits[:, :-1, :].reshape(-1, 17)
        return F.cross_entropy(shift, labels[:, 1:].reshape(-1), ignore_index=-100)

    class Logits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lm(input_ids=x).logits

    wrapped = Logits()
    want = share_truth(wrapped, ids, loss_of)
    for p in measured(wrapped, ids, loss_of):
        assert p.raw_sqnorms is not None, p.withheld
        assert torch.allclose(p.raw_sqnorms, want, rtol=1e-9)


def test_a_clip_style_two_tower_loss_is_refused():
    """Image and text towers in one model, logits = image @ text.T: in-batch negatives."""

    class TwoTower(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.image, self.text = nn.Linear(D, 8), nn.Linear(D, 8)
            self.scale = nn.Parameter(torch.tensor(2.0))

        def forward(self, x: torch.Tensor, t: torch.Tensor):
            return F.normalize(self.image(x), dim=-1), F.normalize(self.text(t), dim=-1)

    torch.manual_seed(0)
    model, (x, _) = TwoTower(), data()
    tracker = noisescale.GradientNoiseTracker(model)
    image, text = model(x, x.roll(1, 1))
    logits = image @ text.T * model.scale.exp()
    labels = torch.arange(N)
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    loss.backward()
    with pytest.raises(UnsupportedModuleError, match="the loss combines the examples"):
        tracker.step(loss=loss)
