"""Seed 4097 of tests/fuzz_precision.py (tracker mode, precondition=True) made self-contained.

stem Linear(3,6) -> InstanceNorm1d(6, affine) over time -> einsum with a bare (6,6) matrix ->
mean over time -> Linear head; CE mean; N = 4; Adam; GradScaler(init 16, growth_interval 1);
tracker subbatches=2, precondition=opt, precondition_from=1.

Each record's preconditioned norms against brute force in float64 that applies the documented
P = 1/(sqrt(v_hat)+eps) read from Adam's state before the step, on
 (a) float64 per-example gradients of a float64 copy of the model (the exact gradient), and
 (b) float32 per-example gradients (one backward per example), as the fuzzer's oracle does.
Variants: scaler / none / growth large, clip, float64 model, and a non-degenerate model
(instance norm's bias initialised non-zero).

Result (2026-12-07, torch CPU): the scaler, its growth, clipping change not a digit; the float64
model is exact to 1.8e-16. In float32 every gradient but the norm's and head's biases is zero in
exact arithmetic (the stem's bias and weight before the instance norm; the einsum and head weight
behind its zero bias): rounding, ~1e-8, which P = 1/(sqrt(v_hat)+eps) ~ 1e8 makes O(1). The
tracker's norms are 4e-4..2e-2 off the per-example float32 truth and 1e-2..3e-1 off the float64
one, but the two float32 truths differ from each other as much (up to 7%), and the tracker stays
within 0.25 of the bound sum P^2((|h|+d)^2 - h^2) that their difference d puts on rounding: the
quantity is ill-conditioned, not mis-computed. Verdict: the fuzzer's oracle (tolerance 1e-4 on
an ill-conditioned quantity), fixed by tests/fuzz_precision.py's _Rounding.
"""

import copy
import sys
import warnings

import torch
from torch import nn

import noisescale

torch.set_num_threads(1)
warnings.simplefilter("ignore")


class M(nn.Module):
    def __init__(self, degenerate=True):
        super().__init__()
        self.stem = nn.Linear(3, 6)
        self.norm = nn.InstanceNorm1d(6, affine=True)
        self.w = nn.Parameter(0.3 * torch.randn(6, 6))
        self.head = nn.Linear(6, 3)
        if not degenerate:
            with torch.no_grad():
                self.norm.bias.normal_()

    def forward(self, x):
        h = self.stem(x)
        h = self.norm(h.transpose(1, 2)).transpose(1, 2)
        h = torch.einsum("ntd,ed->nte", h, self.w)
        return self.head(h.mean(1))


def per_ex(model, x, y, dtype):
    m = copy.deepcopy(model).to(dtype)
    ps = list(m.parameters())
    out = []
    for i in range(len(x)):
        loss = nn.functional.cross_entropy(m(x[i : i + 1].to(dtype)), y[i : i + 1])
        out.append([g.double() for g in torch.autograd.grad(loss, ps)])
    return out


def in_batch(model, x, y):
    ps = list(model.parameters())
    losses = nn.functional.cross_entropy(model(x), y, reduction="none")
    return [
        [g.double() for g in torch.autograd.grad(losses[i], ps, retain_graph=True)]
        for i in range(len(x))
    ]


def slack(grads, other, pre, parts):
    """sum_t P^2((|h|+d)^2 - h^2) for each quantity, d = max_i |g_i - g'_i| P: the most two
    float32 computations' rounding (as far as they differ) can move it."""
    d = [
        torch.stack([(a[t] - b[t]).abs() for a, b in zip(grads, other, strict=False)]).amax(0)
        * pre[t]
        for t in range(len(pre))
    ]

    def sq(members):
        tot = 0.0
        for t in range(len(pre)):
            h = (sum(grads[i][t] for i in members) / len(members) * pre[t]).abs()
            tot += float(((h + d[t]) ** 2 - h**2).sum())
        return tot

    big = sq(range(len(grads)))
    if parts is None:
        return big, sum(sq([i]) for i in range(len(grads))) / len(grads)
    return big, sum(sq(range(a, b)) for a, b in parts) / len(parts)


def norms(grads, pre, parts):
    def sq(members):
        return sum(
            float(((sum(grads[i][t] for i in members) / len(members)) * pre[t]).pow(2).sum())
            for t in range(len(pre))
        )

    big = sq(range(len(grads)))
    if parts is None:  # the per-example source: mean of |P g_i|^2
        return big, sum(sq([i]) for i in range(len(grads))) / len(grads)
    small = sum(sq(range(a, b)) for a, b in parts) / len(parts)
    return big, small


def run(scaler_kind="told", growth=1, clip=True, dtype=torch.float32, degenerate=True, steps=5):
    torch.manual_seed(0)
    model = M(degenerate).to(dtype)
    x, y = torch.randn(4, 3, 3), torch.tensor([0, 1, 2, 1])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    scaler = (
        torch.amp.GradScaler("cpu", init_scale=16.0, growth_interval=growth)
        if scaler_kind
        else None
    )
    kw = dict(loss_reduction="mean", beta=1.0, subbatches=2, precondition=opt, precondition_from=1)
    if scaler:
        kw["scaler"] = scaler
    tr = noisescale.GradientNoiseTracker(model, **kw)
    ps = list(model.parameters())
    worst = {"f64": 0.0, "f32": 0.0, "f32in": 0.0, "slack": 0.0}
    for step in range(1, steps + 1):
        pre = None
        if opt.state:
            pre = []
            for p in ps:
                st, g = opt.state[p], opt.param_groups[0]
                v = st["exp_avg_sq"].double() / (1 - g["betas"][1] ** float(st["step"]))
                pre.append(1.0 / (v.sqrt() + g["eps"]))
        truth = {k: per_ex(model, x, y, d) for k, d in (("f64", torch.float64), ("f32", dtype))}
        with tr.paused():
            truth["f32in"] = in_batch(model, x.to(dtype), y)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x.to(dtype)), y)
        (scaler.scale(loss) if scaler else loss).backward()
        tr.step()
        if clip:
            torch.nn.utils.clip_grad_norm_(ps, 1e30)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        rec = tr.history[-1]
        if pre is None or not rec.get("preconditioned"):
            continue
        ((src, rs),) = rec["sources"].items()
        got = (rec["sqnorm_big"], rs["sqnorm_small"])
        parts = None if src == "per_example" else [(0, 2), (2, 4)]
        line = [f"step {step}: got big {got[0]:.6g} small {got[1]:.6g}"]
        for k, g in truth.items():
            want = norms(g, pre, parts)
            re = max(abs(a - b) / abs(b) for a, b in zip(got, want, strict=False))
            worst[k] = max(worst[k], re)
            line.append(f"{k} truth {want[0]:.6g} {want[1]:.6g} (re {re:.1e})")
        sl = slack(truth["f32"], truth["f32in"], pre, parts)
        want = norms(truth["f32"], pre, parts)
        ratio = max(abs(a - b) / c for a, b, c in zip(got, want, sl, strict=False))
        worst["slack"] = max(worst["slack"], ratio)
        line.append(f"|got-f32|/slack {ratio:.2f}")
        if "-v" in sys.argv:
            print("   ", "; ".join(line))
    tr.remove()
    return worst


if __name__ == "__main__":
    for name, kw in [
        ("fuzzer's set-up (f32, scaler gi=1, clip)", {}),
        ("no scaler", {"scaler_kind": None}),
        ("scaler growth_interval 10**6", {"growth": 10**6}),
        ("no clip", {"clip": False}),
        ("float64 model", {"dtype": torch.float64}),
        ("non-degenerate f32 model (norm bias != 0)", {"degenerate": False}),
    ]:
        w = run(**kw)
        print(
            f"{name:45s} re vs f64 {w['f64']:.1e}, f32 per-ex {w['f32']:.1e}, f32 in-batch {w['f32in']:.1e}; |got-f32|/slack {w['slack']:.2f}"
        )
