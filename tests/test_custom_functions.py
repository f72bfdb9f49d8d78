"""A parameter passed through a user's ``torch.autograd.Function``.

A straight-through estimator (``STE.apply(self.w)``, binarised or quantised weights) or a
product written with its own backward hands autograd the user's backward for the parameter:
noisescale cannot follow a parameter through it, and refuses. Until 2026-12 the refusal led with
"read outside the model's forward (in the loss: model.temperature …)" and named custom Functions
last of several guesses; the Function is now seen where the parameter is read inside its
forward (gradients off, under ``Function.apply``), and the refusal names the parameter, the
Function's class, why, and the fixes — among them ``w + (q(w) - w).detach()``, which is measured
exactly (below, against brute force). A read under ``torch.no_grad()`` is no such use.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import noisescale
from noisescale.errors import NoiseScaleInputError, UnsupportedModuleError
from test_subbatch import assert_exact_both_modes

pytestmark = pytest.mark.usefixtures("float64_default")

N = 5


class SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w):
        return w.sign()

    @staticmethod
    def backward(ctx, g):
        return g


class MatMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x @ w

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g @ w.T, x.transpose(-1, -2) @ g


class RoundSTE(torch.autograd.Function):  # the setup_context form: forward without ctx
    @staticmethod
    def forward(w):
        return torch.round(w * 4) / 4

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return g


class Quantised(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.w = nn.Parameter(torch.randn(3, 4) if how != "matmul" else torch.randn(4, 3))

    def forward(self, x):
        w = self.w
        if self.how == "sign":
            return F.linear(x, SignSTE.apply(w))
        if self.how == "matmul":
            return MatMul.apply(x, w)
        if self.how == "round":
            return F.linear(x, RoundSTE.apply(w))
        if self.how == "detach":  # the straight-through estimate without a Function
            return F.linear(x, w + (torch.round(w * 4) / 4 - w).detach())
        with torch.no_grad():  # "no_grad": a read that is not a use, then the weight itself
            scale = w.abs().mean()
        return F.linear(x, w) / scale


class Net(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.q = Quantised(how)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.q(x)))


def _case(how: str):
    torch.manual_seed(0)
    model = Net(how)
    x = torch.randn(N, 4, generator=torch.Generator().manual_seed(1))
    return model, lambda: model(x).pow(2).sum(1)


FUNCTIONS = {"sign": "SignSTE", "matmul": "MatMul", "round": "RoundSTE"}


def _assert_names_the_function(text: str, cls: str) -> None:
    assert text.startswith("parameter 'q.w' is passed through the custom "), text
    assert f"torch.autograd.Function {cls} ({cls}.apply in the forward)" in text, text
    assert "summed over the batch" in text, text  # why
    assert "w + (q(w) - w).detach()" in text and "measured exactly" in text, text
    assert "noisescale.register_layer" in text and "per_example=False" in text, text
    assert "temperature" not in text and "read outside" not in text, text


@pytest.mark.parametrize("how", list(FUNCTIONS))
def test_a_parameter_through_a_custom_function_is_refused_naming_it(how):
    model, losses = _case(how)
    with pytest.raises(UnsupportedModuleError) as err:
        with noisescale.per_example_sqnorms(model, loss_reduction="mean"):
            losses().mean().backward()
    _assert_names_the_function(str(err.value), FUNCTIONS[how])


@pytest.mark.parametrize("mode", [{}, {"per_example_fraction": 1.0}])
def test_the_tracker_names_the_custom_function_too(mode):
    model, losses = _case("sign")
    tracker = noisescale.GradientNoiseTracker(model, **mode)
    try:
        with pytest.raises(UnsupportedModuleError) as err:
            for _ in range(3):
                model.zero_grad()
                losses().mean().backward()
                tracker.step()
        _assert_names_the_function(str(err.value), "SignSTE")
    finally:
        tracker.remove()


@pytest.mark.parametrize("how", ["detach", "no_grad"])
def test_the_detach_form_and_a_no_grad_read_are_exact(how):
    model, losses = _case(how)
    assert_exact_both_modes(model, losses, N)


def test_a_parameter_read_in_the_loss_keeps_the_generic_message():
    """No custom Function there (one applied to another parameter in the same forward): the
    refusal names the loss's read of the parameter, as it did before (since 2026-12-07 found
    by the walk of the loss's graph, in its words)."""

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = Quantised("detach")
            self.temperature = nn.Parameter(torch.tensor(2.0))

        def forward(self, x):
            return self.q(x) + SignSTE.apply(x[:, :3])  # (a Function on no parameter)

    torch.manual_seed(0)
    model = Scaled()
    x = torch.randn(N, 4)
    with pytest.raises(UnsupportedModuleError) as err:
        with noisescale.per_example_sqnorms(model, loss_reduction="sum"):
            (model(x).pow(2).sum() * model.temperature).backward()
    text = str(err.value)
    assert text.startswith("the backward reached parameters ['temperature'] read outside"), text
    assert "the model's forward, in a term of the loss" in text, text


class _Adjoint(torch.autograd.Function):
    """A neural ODE's adjoint method as torchdiffeq's ``odeint_adjoint`` writes it: Euler steps
    under ``no_grad`` in the forward; in the backward, the adjoint integrated backwards with
    ``torch.autograd.grad`` through the ODE function's layer."""

    @staticmethod
    def forward(ctx, h0, func, *params):
        with torch.no_grad():
            h = h0
            for _ in range(3):
                h = h + func(h) / 3
        ctx.func = func
        ctx.save_for_backward(h, *params)
        return h

    @staticmethod
    def backward(ctx, a):
        h, *params = ctx.saved_tensors
        gp = [torch.zeros_like(p) for p in params]
        for _ in range(3):
            with torch.enable_grad():
                hh = h.detach().requires_grad_()
                f = ctx.func(hh)
                vjp = torch.autograd.grad(f, [hh, *params], a)
            h = (h - f / 3).detach()
            a = a + vjp[0] / 3
            gp = [g + v / 3 for g, v in zip(gp, vjp[1:], strict=True)]
        return (a, None, *gp)


class _ODENet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.head = nn.Linear(2, 3), nn.Linear(3, 1)
        self.func = nn.Sequential(nn.Linear(3, 3), nn.Tanh())

    def forward(self, x):
        h = _Adjoint.apply(self.inp(x), self.func, *self.func.parameters())
        return self.head(h)


def test_a_neural_ode_s_adjoint_backward_is_named_in_the_refusal():
    """(A hunt, 2026-12-06.) The adjoint's ``torch.autograd.grad`` inside the backward was
    refused as a gradient only read or logged, with ``paused()`` as the fix — which then failed
    twice with other causes. The refusal names the adjoint method and the fix that works."""
    torch.manual_seed(0)
    model = _ODENet()
    tracker = noisescale.GradientNoiseTracker(model)
    try:
        x = torch.randn(N, 2, generator=torch.Generator().manual_seed(1))
        model(x).pow(2).mean().backward()
        with pytest.raises(NoiseScaleInputError, match=r"adjoint method.*odeint\)"):
            tracker.step()
    finally:
        tracker.remove()


class _Hyper(nn.Module):
    """A hypernetwork loading each example's generated weights into a target network with
    ``torch.func.functional_call``, the target built of ``nn.Linear`` layers whose own weights
    are never used."""

    def __init__(self):
        super().__init__()
        self.target = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        self.shapes = {k: v.shape for k, v in self.target.named_parameters()}
        size = sum(v.numel() for v in self.target.parameters())
        self.hyper = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, size))

    def forward(self, x, c):
        flat, outs = self.hyper(c) * 0.3, []
        for i in range(x.shape[0]):
            w, o = {}, 0
            for k, shape in self.shapes.items():
                w[k] = flat[i, o : o + shape.numel()].view(shape)
                o += shape.numel()
            outs.append(torch.func.functional_call(self.target, w, (x[i : i + 1],)))
        return torch.cat(outs)


def test_a_hypernetwork_s_functional_call_target_is_named_with_the_fix():
    """(A hunt, 2026-12-06.) The target's own trainable weights, replaced for every call, are
    refused naming ``functional_call`` and the fix, which measures the model exactly."""
    g = torch.Generator().manual_seed(0)
    x, c, y = torch.randn(N, 3, generator=g), torch.randn(N, 2, generator=g), torch.randn(N, 2)
    torch.manual_seed(1)
    model = _Hyper()
    with pytest.raises(UnsupportedModuleError, match=r"functional_call.*requires_grad_\(False\)"):
        with noisescale.per_example_sqnorms(model):
            (model(x, c) - y).pow(2).sum(1).mean().backward()
    model.target.requires_grad_(False)
    model.zero_grad()
    with noisescale.per_example_sqnorms(model) as pe:
        (model(x, c) - y).pow(2).sum(1).mean().backward()
    params = [p for p in model.parameters() if p.requires_grad]
    want = []
    for i in range(N):
        loss = (model(x[i : i + 1], c[i : i + 1]) - y[i : i + 1]).pow(2).sum()
        want.append(sum(g.pow(2).sum() for g in torch.autograd.grad(loss, params)))
    torch.testing.assert_close(pe.sqnorms, torch.stack(want), rtol=1e-9, atol=0)
