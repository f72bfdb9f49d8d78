"""Per-example squared gradient norms against a brute-force autograd loop (float64, rel ≤ 1e-6)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import noisescale
from noisescale.errors import NoiseScaleInputError, UnsupportedModuleError

N = 5


# brute-force references in float64 (the fixture lives in conftest.py)
pytestmark = pytest.mark.usefixtures("float64_default")


def brute_force(model: nn.Module, x: torch.Tensor, loss_i) -> torch.Tensor:
    """|∇θ ℓ_i|² by one backward pass per example."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(loss_i(model(x[i : i + 1]), i), params, allow_unused=True)
        out.append(sum((g.pow(2).sum() for g in grads if g is not None), torch.tensor(0.0)))
    return torch.stack(out)


def measured(model, x, loss_batch, reduction="mean"):
    with noisescale.per_example_sqnorms(model, loss_reduction=reduction) as pe:
        loss_batch(model(x), reduction).backward()
    return pe.sqnorms


def _seq_loss(out, reduction, weights):
    per = (out * weights).pow(2).flatten(1).mean(1) + out.flatten(1).sum(1).sin()
    return per.mean() if reduction == "mean" else per.sum()


def case(name, model, x):
    return pytest.param(model, x, id=name)


def _cases():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return _build_cases()
    finally:
        torch.set_default_dtype(old)


def _build_cases():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    ids = lambda *s: torch.randint(0, 7, s, generator=g)  # noqa: E731
    return [
        case("linear-2d", nn.Linear(4, 3), r(N, 4)),
        case("linear-seq", nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)), r(N, 7, 4)),
        case("linear-4d-nobias", nn.Linear(4, 3, bias=False), r(N, 2, 3, 4)),
        case("linear-long-seq-gram", nn.Linear(32, 32), r(N, 3, 32)),
        case("conv1d", nn.Conv1d(3, 4, 3, stride=2, padding=1), r(N, 3, 11)),
        case("conv2d", nn.Conv2d(2, 4, 3, padding=1), r(N, 2, 6, 5)),
        case(
            "conv2d-stride-dil-groups",
            nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(2, 1), dilation=(2, 1), groups=2),
            r(N, 4, 9, 7),
        ),
        case(
            "conv2d-same-reflect",
            nn.Conv2d(2, 3, 4, padding="same", padding_mode="reflect"),
            r(N, 2, 7, 7),
        ),
        case("conv2d-depthwise", nn.Conv2d(3, 3, 3, groups=3), r(N, 3, 6, 6)),
        case(
            "conv3d",
            nn.Conv3d(2, 3, (2, 3, 2), stride=(1, 2, 1), padding=(1, 0, 1), dilation=(1, 1, 2)),
            r(N, 2, 4, 7, 6),
        ),
        case(
            "conv1d-circular-valid",
            nn.Conv1d(2, 2, 3, padding=2, padding_mode="circular"),
            r(N, 2, 8),
        ),
        case("embedding-repeated", nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 2)), ids(N, 12)),
        case("embedding-padding-idx", nn.Embedding(7, 3, padding_idx=2), ids(N, 9)),
        case("layernorm", nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6)), r(N, 3, 4)),
        case("layernorm-2d-shape", nn.LayerNorm((3, 4)), r(N, 2, 3, 4)),
        case("rmsnorm", nn.Sequential(nn.Linear(4, 6), nn.RMSNorm(6)), r(N, 3, 4)),
        case("groupnorm", nn.Sequential(nn.Conv2d(2, 6, 3), nn.GroupNorm(3, 6)), r(N, 2, 6, 6)),
        case("batchnorm-eval", _bn_eval(), r(N, 3, 5, 5)),
        case("prelu-fallback", nn.Sequential(nn.Linear(4, 5), nn.PReLU(5)), r(N, 4)),
        case("custom-fallback", nn.Sequential(nn.Linear(4, 5), Scale(5)), r(N, 3, 4)),
        case("mha-fallback", MHA(), r(N, 4, 8)),
        case(
            "relu-inplace",
            nn.Sequential(
                nn.Conv2d(1, 3, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(3 * 16, 2)
            ),
            r(N, 1, 6, 6),
        ),
        case("tied-embedding-head", TiedLM(), ids(N, 10)),
        case("linear-called-twice", Twice(), r(N, 3, 4)),
    ]


class Scale(nn.Module):
    """A module with its own parameters and no closed form: uses the torch.func fallback."""

    def __init__(self, d):
        super().__init__()
        self.gain = nn.Parameter(torch.randn(d))
        self.shift = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return torch.tanh(x * self.gain) + self.shift


class MHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


class TiedLM(nn.Module):
    """Input embedding and output projection share one weight: the cross term matters."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(torch.tanh(self.mix(self.emb(idx))))


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(torch.tanh(self.lin(x)))


def _bn_eval():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    m[1].running_mean.uniform_(-1, 1)
    m[1].running_var.uniform_(0.5, 2)
    return m.eval()


@pytest.mark.parametrize(("model", "x"), _cases())
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_brute_force(model, x, reduction):
    torch.manual_seed(1)
    with torch.no_grad():
        out = model(x[:1])
    weights = torch.randn(out.shape[1:])

    def loss_i(out_i, i):
        return _seq_loss(out_i, "sum", weights)

    expected = brute_force(model, x, loss_i)
    got = measured(model, x, lambda out, red: _seq_loss(out, red, weights), reduction)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-12)


def test_batchnorm_training_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(UnsupportedModuleError, match=r"'1' \(BatchNorm2d\).*per-example"):
        noisescale.per_example_sqnorms(model)


def test_weight_used_outside_its_module_is_reported():
    class Sneaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 3)

        def forward(self, x):
            return F.linear(self.a(x), self.b.weight)

    model = Sneaky()
    with pytest.raises(UnsupportedModuleError, match=r"\['b.weight'\]"):
        with noisescale.per_example_sqnorms(model) as pe:
            model(torch.randn(4, 3)).sum().backward()
    del pe


def test_top_level_parameter_is_exact():
    """A parameter the top-level model adds itself (a learned offset) meets the batch in `+`."""

    class Pos(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Parameter(torch.randn(3))
            self.lin = nn.Linear(3, 1)

        def forward(self, x):
            return self.lin(x + self.pos)

    model = Pos()
    x = torch.randn(N, 3)
    got = measured(model, x, lambda out, r: getattr(out.pow(2).sum(1), r)())
    want = brute_force(model, x, lambda out, i: out.pow(2).sum())
    assert torch.allclose(got, want, rtol=1e-9)


class _Headwise(nn.Module):
    """y[n, h] = x[n, h] @ W[h]: its parameter meets the batch in einsum, which has no rule."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2, 3, 4))

    def forward(self, x):
        return torch.einsum("nhd,hde->nhe", x, self.weight)


def test_operation_without_a_rule_is_named_in_a_one_shot_measurement():
    model = nn.Sequential(_Headwise())
    with pytest.raises(
        UnsupportedModuleError, match=r"inside module '0' in the operation 'einsum'"
    ):
        with noisescale.per_example_sqnorms(model):
            model(torch.randn(4, 2, 3)).sum().backward()


def test_operation_without_a_rule_uses_the_fallback_from_the_next_step():
    """The tracker withholds the first step's per-example norms, then measures the module with
    torch.func; the second step matches brute force exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(_Headwise())
    x = torch.randn(N, 2, 3)
    engine = noisescale.per_example.PerExampleNorms(model)
    model(x).pow(2).mean().backward()
    (first,) = engine.collect()
    assert first.raw_sqnorms is None and "torch.func fallback" in first.withheld
    model.zero_grad()
    model(x).pow(2).flatten(1).sum(1).mean().backward()
    (second,) = engine.collect()
    want = brute_force(model, x, lambda out, i: out.pow(2).sum())
    assert torch.allclose(second.raw_sqnorms * N**2, want, rtol=1e-9)


def test_a_registered_rule_replaces_the_fallback():
    from noisescale.per_example.factors import DenseFactor

    @noisescale.register_layer(_Headwise)
    def headwise(module, x, grad_output):
        return {"weight": DenseFactor(torch.einsum("nhd,nhe->nhde", x, grad_output))}

    try:
        model = nn.Sequential(_Headwise())
        x = torch.randn(N, 2, 3)
        got = measured(model, x, lambda out, r: getattr(out.sin().flatten(1).sum(1), r)())
        want = brute_force(model, x, lambda out, i: out.sin().sum())
        assert torch.allclose(got, want, rtol=1e-9)
    finally:
        noisescale.unregister_layer(_Headwise)


def test_forward_outside_context_is_a_clear_error():
    model = nn.Linear(3, 1)
    loss = model(torch.randn(4, 3)).sum()
    with pytest.raises(NoiseScaleInputError, match="forward pass"):
        with noisescale.per_example_sqnorms(model):
            loss.backward()


def test_non_batch_first_layer_refused():
    class TimeMajor(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x.transpose(0, 1))

    model = TimeMajor()
    with pytest.raises(NoiseScaleInputError, match="leading dimension 6"):
        with noisescale.per_example_sqnorms(model):
            model(torch.randn(4, 6, 3)).sum().backward()


def test_bad_loss_reduction():
    with pytest.raises(NoiseScaleInputError, match="loss_reduction"):
        noisescale.per_example_sqnorms(nn.Linear(2, 2), loss_reduction="avg")


def test_weighted_embedding_norm_matches_dense():
    """The preconditioned (P²-weighted) norm of an embedding, repeated tokens included."""
    from noisescale.per_example import weighted_sqnorm
    from noisescale.per_example.factors import EmbeddingFactor

    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 5, (4, 9), generator=g)
    d = torch.randn(4, 9, 3, generator=g, dtype=torch.float64)
    w2 = torch.rand(5, 3, generator=g, dtype=torch.float64)
    factor = EmbeddingFactor(idx, d, 5)
    dense = factor.dense(torch.Size([5, 3]))
    torch.testing.assert_close(weighted_sqnorm(factor, w2), (dense.pow(2) * w2).sum((1, 2)))
    torch.testing.assert_close(factor.sqnorm(), dense.pow(2).sum((1, 2)))
