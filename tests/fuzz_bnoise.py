"""B_noise (the Hessian-weighted noise scale, eq. 2.8) and the line-search method against an exact
Hessian.

Each seed draws (:func:`draw_config`) a tiny float64 model (at most ~60 trainable parameters, so
``torch.autograd.functional.hessian`` gives the exact H): an MLP with tanh/GELU/softplus, a
Conv1d, an embedding, an embedding tied to the output layer, a frozen parameter; a softmax
cross-entropy or a squared error; a batch (a tuple or a dict) of n examples split into k = 2-5
parts (unequal where k does not divide n), and a Hessian batch of its own or the batch's last
part (``hessian_batch=None``). Checked against brute force on the flattened parameters:

* ``single``: one ``measure_b_noise``: its GᵀHG, tr(HΣ), |G|², tr Σ against q_ij = G_iᵀ H_h G_j
  and G_iᵀG_j of the parts' exact gradients and the Hessian batch's exact Hessian (unbiased_pairs'
  formulas written again), B_noise = tr(HΣ)/GᵀHG; the model's state (train/eval flags, buffers,
  .grad, the random-number generators) left as it was;
* ``tracker``: a ``BNoiseTracker`` (``every``, ``beta``, ``splits``) over a few SGD steps, resumed
  from its ``state_dict`` midway into a fresh tracker: each record's numbers the brute force of
  its step, the final estimate the EMA (by hand) of the measured steps, and the resumed run the
  uninterrupted one's;
* ``pool``: on a fixed finite pool of N examples (G the pool's mean gradient, Σ its N-normalised
  per-example covariance, H its Hessian — a model where H is not ∝ I): over ~200 draws (parts and
  Hessian batch drawn i.i.d. from the pool, or without replacement with ``dataset_size=N``), the
  means of GᵀHG and tr(HΣ) against the truth (|z| > Z_BIAS a finding) and trackers' intervals'
  coverage of the true B_noise (a binomial tail below P_COVER a finding);
* ``line``: ``line_search`` against a brute-force maximisation of the mean improvement over a
  fine grid (its ΔL_opt at least the grid's best, to round-off, where the best is inside the
  range; the returned ΔL_opt the improvement at the returned ε);
* ``delta_l``: ``measure_delta_l_opt`` (``repeats``, ``min_examples``) on a squared error of a
  linear model (the loss quadratic in θ, so each batch size's ΔL_opt and ε_opt are closed-form
  on the directions it drew, recorded through ``sample_batch``), its fit the fit of its own
  points;
* ``fit``: ``fit_delta_l_opt`` on points that follow eq. 2.7 exactly (B_noise and ΔL_max
  recovered) and on noisy ones (its least-squares error no larger than a dense scan's best);
  points all at one batch size (``fit_one``: nothing in them fixes B_noise) refused;
* ``refuse``: what must be refused — BatchNorm in train mode, a sum over examples (by
  ``measure_b_noise`` and by ``measure_delta_l_opt``, whose ε_opt scale with it; BatchNorm in
  train mode by both), a loss that couples the examples, a once-differentiable op — with a
  message naming the cause, and an Opacus GradSampleModule (hooks off, the plain numbers); the
  model's state left as it was.
  A coupled loss the check cannot tell apart (within its documented 2% tolerance) is
  ``not-refused-doc``, not a finding;
* ``coexist``: a training run with a ``GradientNoiseTracker`` and a ``BNoiseTracker`` measuring
  (after ``optimizer.step()`` or between ``backward()`` and ``tracker.step()``) is the same run as
  without: its parameters, the tracker's estimate and records, the generators (an embedding with
  ``max_norm``, whose forward renormalises rows in place, included).

Classes per check: ``ok``; ``refused`` (a NoiseScaleError where a number was due);
``refused-vague`` (a due refusal whose message does not name the cause); ``crash`` (any other
exception); ``WRONG-SILENT`` (a number off the brute force, a bias, too low a coverage, a
refusal that did not come, the model's state changed); ``skip``.
"""

from __future__ import annotations

import collections
import json
import math
import random
import time
import warnings

import numpy as np
import torch
from scipy import stats as sps
from torch import nn

from noisescale.errors import NoiseScaleInputError as NoiseScaleError
from noisescale.hessian import (
    BNoiseTracker,
    fit_delta_l_opt,
    line_search,
    measure_b_noise,
    measure_delta_l_opt,
)

RTOL = 1e-8  # brute force vs measured, float64 (relative to the scale of the terms)
Z_BIAS = 4.5
P_COVER = 1e-3
CHECKS = ("single", "tracker", "coexist", "pool", "line", "delta_l", "fit", "refuse")
FINDINGS = ("WRONG-SILENT", "crash", "refused", "refused-vague")


# --- configurations ----------------------------------------------------------------------------


def draw_config(seed):
    rng = random.Random(seed)
    arch = rng.choice(["mlp", "mlp", "conv", "embed", "tied", "shared", "bn_eval"])
    loss = "ce" if arch == "tied" else rng.choice(["ce", "mse"])
    k = rng.randint(2, 5)
    return {
        "arch": arch,
        "act": rng.choice(["tanh", "gelu", "softplus"]),
        "loss": loss,
        "d": rng.randint(2, 4),
        "hidden": rng.randint(2, 5),
        "classes": rng.randint(2, 3),
        "frozen": rng.random() < 0.3,
        "extra": rng.choice(["", "", "unused", "linear"]),
        "emb": rng.choice(["", "", "padding_idx", "sparse", "max_norm"]),
        "batch_kind": rng.choice(["tuple", "tuple", "list", "dict", "namedtuple"]),
        "placement": rng.choice(["after_step", "after_backward"]),
        "k": k,
        "n": rng.randint(k, 4 * k + 3),
        "n_h": rng.randint(1, 6),
        "own_hessian": rng.random() < 0.7,
        "every": rng.randint(1, 3),
        "beta": rng.choice([1.0, 0.9, 0.5]),
        "steps": rng.randint(3, 7),
        "lr": rng.choice([0.0, 0.05, 0.3]),
        "scale": rng.choice([0.5, 1.0, 3.0]),
        "pool_n": rng.randint(12, 40),
        "replace": rng.random() < 0.6,
        "eps_hi": rng.choice([1e2, 1e3, 1e4]),
        "grid": rng.choice([9, 17, 29]),
        "directions": rng.randint(1, 4),
        "fit_sizes": rng.randint(2, 7),
        "fit_bn": 10 ** rng.uniform(-1, 5),
        "fit_noise": rng.choice([0.0, 0.0, 0.05, 0.3]),
        "refuse": rng.choice(
            ["batchnorm", "sum", "couple", "once", "opacus", "dropout", "delta_sum", "delta_bn"]
        ),
        "fit_one": rng.random() < 0.15,  # every point at one batch size: no B_noise in it
    }


_ACTS = {"tanh": nn.Tanh, "gelu": nn.GELU, "softplus": nn.Softplus}
VOCAB, SEQ = 5, 2


def embedding(cfg, e):
    opts = {
        "padding_idx": {"padding_idx": 0},
        "sparse": {"sparse": True},
        "max_norm": {"max_norm": 1.0},
    }.get(cfg["emb"], {})
    return nn.Embedding(VOCAB, e, **opts)


class Tied(nn.Module):
    def __init__(self, cfg, e, act):
        super().__init__()
        self.emb = embedding(cfg, e)
        self.mid = nn.Linear(e, e)
        self.act = act
        self.out = nn.Linear(e, VOCAB, bias=False)
        self.out.weight = self.emb.weight  # tied

    def forward(self, x):
        return self.out(self.act(self.mid(self.emb(x).mean(1))))


class Embed(nn.Module):
    def __init__(self, cfg, e, c, act):
        super().__init__()
        self.emb = embedding(cfg, e)
        self.act = act
        self.out = nn.Linear(e, c)

    def forward(self, x):
        return self.out(self.act(self.emb(x).mean(1)))


class Shared(nn.Module):
    """One layer applied twice (its parameters used twice in a forward)."""

    def __init__(self, d, c, act):
        super().__init__()
        self.inp, self.mid, self.act, self.out = (
            nn.Linear(d, 3),
            nn.Linear(3, 3),
            act,
            nn.Linear(3, c),
        )

    def forward(self, x):
        return self.out(self.act(self.mid(self.act(self.mid(self.inp(x))))))


class Extra(nn.Module):
    """A model with a parameter it never uses, or one the loss adds linearly (its gradient the
    same in every part, its Hessian row zero): see :func:`criterion`."""

    def __init__(self, inner, kind):
        super().__init__()
        self.inner, self.kind = inner, kind
        self.extra = nn.Parameter(torch.randn(2, dtype=torch.float64))

    def forward(self, x):
        return self.inner(x)


LINEAR = (0.3, -0.7)  # the loss's term extra · LINEAR (cfg["extra"] == "linear")


def linear_term(cfg, extra):
    if cfg["extra"] != "linear":
        return 0.0
    return (extra * torch.tensor(LINEAR, dtype=extra.dtype)).sum()


_NT = collections.namedtuple("Batch", ["x", "y"])


def outputs(cfg):
    return VOCAB if cfg["arch"] == "tied" else (cfg["classes"] if cfg["loss"] == "ce" else 2)


def build_model(cfg, seed):
    torch.manual_seed(seed)
    act = _ACTS[cfg["act"]]()
    d, h, c = cfg["d"], cfg["hidden"], outputs(cfg)
    if cfg["arch"] == "mlp":
        model = nn.Sequential(nn.Linear(d, h), act, nn.Linear(h, c))
    elif cfg["arch"] == "conv":
        model = nn.Sequential(
            nn.Unflatten(1, (1, d + 2)), nn.Conv1d(1, 2, 3), act, nn.Flatten(), nn.Linear(2 * d, c)
        )
    elif cfg["arch"] == "embed":
        model = Embed(cfg, 3, c, act)
    elif cfg["arch"] == "tied":
        model = Tied(cfg, 3, act)
    elif cfg["arch"] == "shared":
        model = Shared(d, c, act)
    else:  # BatchNorm in eval mode: running statistics (buffers) in the function
        bn = nn.BatchNorm1d(h)
        model = nn.Sequential(nn.Linear(d, h), bn, act, nn.Linear(h, c))
        with torch.no_grad():
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
        model.eval()
    if cfg["extra"]:
        model = Extra(model, cfg["extra"])
    model = model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(cfg["scale"])
    if cfg["frozen"]:
        first = next(iter(model.parameters()))
        first.requires_grad_(False)
    return model


def draw_inputs(cfg, n, gen):
    if cfg["arch"] in ("embed", "tied"):
        x = torch.randint(0, VOCAB, (n, SEQ), generator=gen)
    elif cfg["arch"] == "conv":
        x = torch.randn(n, cfg["d"] + 2, generator=gen, dtype=torch.float64)
    else:
        x = torch.randn(n, cfg["d"], generator=gen, dtype=torch.float64)
    if cfg["loss"] == "ce":
        y = torch.randint(0, outputs(cfg), (n,), generator=gen)
    else:
        y = torch.randn(n, outputs(cfg), generator=gen, dtype=torch.float64)
    return x, y


def pack(cfg, x, y):
    kind = cfg["batch_kind"]
    if kind == "dict":
        return {"x": x, "y": y}
    return {"list": list, "namedtuple": lambda v: _NT(*v)}.get(kind, tuple)((x, y))


def unpack(batch):
    return (batch["x"], batch["y"]) if isinstance(batch, dict) else tuple(batch)


def criterion(cfg):
    if cfg["loss"] == "ce":
        return lambda out, y: nn.functional.cross_entropy(out, y)
    return lambda out, y: ((out - y) ** 2).sum(1).mean() / 2


def loss_fn_of(cfg):
    crit = criterion(cfg)

    def loss_fn(model, batch):
        x, y = unpack(batch)
        return crit(model(x), y) + (linear_term(cfg, model.extra) if cfg["extra"] else 0.0)

    return loss_fn


# --- brute force -------------------------------------------------------------------------------


class Flat:
    """The model's trainable parameters as one vector: exact gradients and Hessians of the mean
    loss of any batch (``torch.func.functional_call``, tied weights tied)."""

    def __init__(self, cfg, model):
        self.model, self.crit, self.cfg = model, criterion(cfg), cfg
        self.named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
        self.shapes = [p.shape for _, p in self.named]

    def theta(self):
        return torch.cat([p.detach().reshape(-1) for _, p in self.named])

    def parts(self, theta):
        parts, off = {}, 0
        for (name, _), shape in zip(self.named, self.shapes, strict=True):
            size = math.prod(shape)
            parts[name] = theta[off : off + size].reshape(shape)
            off += size
        return parts

    def outputs(self, theta, x):
        sparse = [m for m in self.model.modules() if getattr(m, "sparse", False) is True]
        for m in sparse:  # (dense gradients for the flat vector: the same function)
            m.sparse = False
        try:
            return torch.func.functional_call(self.model, self.parts(theta), (x,))
        finally:
            for m in sparse:
                m.sparse = True

    def loss(self, theta, x, y):
        loss = self.crit(self.outputs(theta, x), y)
        if "extra" in dict(self.named):
            loss = loss + linear_term(self.cfg, self.parts(theta)["extra"])
        return loss

    def jacobian_norm2(self, x):
        """‖J‖₂² of the model's outputs on ``x`` with respect to θ (the Gauss–Newton scale)."""
        theta = self.theta()
        j = torch.autograd.functional.jacobian(lambda t: self.outputs(t, x).reshape(-1), theta)
        return float(torch.linalg.matrix_norm(j.reshape(-1, theta.numel()), 2)) ** 2

    def grad(self, x, y, theta=None):
        t = (self.theta() if theta is None else theta).clone().requires_grad_(True)
        return torch.autograd.grad(self.loss(t, x, y), t)[0].detach()

    def hessian(self, x, y):
        return torch.autograd.functional.hessian(lambda t: self.loss(t, x, y), self.theta())


def pairs(q, sizes):
    """(signal, noise) of eq. A.2 for unequal parts, written from the definitions."""
    k = len(sizes)
    off = [q[i][j] for i in range(k) for j in range(k) if i != j]
    signal = sum(off) / len(off)
    noise = sum(sizes[i] * (q[i][i] - signal) for i in range(k)) / k
    return signal, noise


def brute_measurement(flat, x, y, xh, yh, k, own_hessian):
    n = x.shape[0]
    if not own_hessian:
        xs, ys = torch.tensor_split(x, k + 1), torch.tensor_split(y, k + 1)
        xh, yh = xs[-1], ys[-1]
        xs, ys = xs[:-1], ys[:-1]
    else:
        xs, ys = torch.tensor_split(x, k), torch.tensor_split(y, k)
    del n
    grads = [flat.grad(a, b) for a, b in zip(xs, ys, strict=True)]
    h = flat.hessian(xh, yh)
    sizes = [a.shape[0] for a in xs]
    q = [[float(gi @ h @ gj) for gj in grads] for gi in grads]
    dots = [[float(gi @ gj) for gj in grads] for gi in grads]
    ghg, ths = pairs(q, sizes)
    g2, ts = pairs(dots, sizes)
    # the Hessian batch's own scale, ‖J_h‖²·max|G_i|² (Gauss–Newton), too: a saturated Hessian
    # batch (probabilities 1 − 1e-19) leaves H_h pure round-off, |q| ~1e-13 (seed 161)
    gauss_newton = flat.jacobian_norm2(xh) * max(float(g @ g) for g in grads)
    scale_h = max(max(abs(v) for row in q for v in row), gauss_newton) * max(sizes)
    scale_s = max(abs(v) for row in dots for v in row) * max(sizes)
    return {"ghg": ghg, "trace_h_sigma": ths, "g2": g2, "trace_sigma": ts}, scale_h, scale_s


def compare(got, want, scale_h, scale_s):
    worst = 0.0
    for key, w in want.items():
        scale = scale_s if key in ("g2", "trace_sigma") else scale_h
        worst = max(worst, abs(getattr(got, key) - w) / max(scale, 1e-300))
    return worst


def model_state(model):
    return {
        "flags": [m.training for m in model.modules()],
        "buffers": [b.detach().clone() for b in model.buffers()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "params": [p.detach().clone() for p in model.parameters()],
        "rng": torch.get_rng_state().clone(),
        "np": np.random.get_state()[1].copy(),
        "py": random.getstate(),
    }


def state_changed(before, after):
    """What differs between two model_state snapshots ('' when nothing)."""
    if before["flags"] != after["flags"]:
        return "train/eval flags"
    for a, b in zip(before["buffers"], after["buffers"], strict=True):
        if not torch.equal(a, b):
            return "buffers"
    for a, b in zip(before["grads"], after["grads"], strict=True):
        if (a is None) != (b is None) or (a is not None and not torch.equal(a, b)):
            return ".grad"
    for a, b in zip(before["params"], after["params"], strict=True):
        if not torch.equal(a, b):
            return "parameters"
    if not torch.equal(before["rng"], after["rng"]):
        return "torch RNG"
    if not np.array_equal(before["np"], after["np"]) or before["py"] != after["py"]:
        return "numpy/python RNG"
    return ""


def _exception(err):
    return f"{type(err).__name__}: {err}"[:300]


def _guard(fn):
    """Run a check, an exception its class (NoiseScaleError a false refusal, else a crash)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn()
    except NoiseScaleError as err:
        return {"cls": "refused", "exc": _exception(err)}
    except Exception as err:
        return {"cls": "crash", "exc": _exception(err)}


# --- the checks --------------------------------------------------------------------------------


def check_single(cfg, seed):
    model = build_model(cfg, seed)
    flat, loss_fn = Flat(cfg, model), loss_fn_of(cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    x, y = draw_inputs(cfg, cfg["n"] + (0 if cfg["own_hessian"] else 1), gen)
    xh, yh = draw_inputs(cfg, cfg["n_h"], gen)
    batch = pack(cfg, x, y)
    hb = pack(cfg, xh, yh) if cfg["own_hessian"] else None
    before = model_state(model)
    got = measure_b_noise(model, loss_fn, batch, hessian_batch=hb, splits=cfg["k"])
    changed = state_changed(before, model_state(model))
    if cfg["emb"] == "max_norm":  # (its forward renormalises rows in place: no fixed function)
        return (
            {"cls": "WRONG-SILENT", "why": f"state changed: {changed}"}
            if changed
            else {"cls": "ok"}
        )
    want, sh, ss = brute_measurement(flat, x, y, xh, yh, cfg["k"], cfg["own_hessian"])
    re = compare(got, want, sh, ss)
    bn = (
        want["trace_h_sigma"] / want["ghg"]
        if want["ghg"] > 0 and want["trace_h_sigma"] > 0
        else None
    )
    if bn is not None and got.available:
        re = max(re, abs(got.b_noise - bn) / bn * 1e-3)  # (the ratio of near-cancelling terms)
    if bn is None and got.available and abs(want["ghg"]) > 1e-6 * sh:
        return {"cls": "WRONG-SILENT", "why": f"B_noise {got.b_noise} of want {want}"}
    if changed:
        return {"cls": "WRONG-SILENT", "why": f"model state changed: {changed}"}
    if re > RTOL:
        return {"cls": "WRONG-SILENT", "re": re, "got": got.as_dict(), "want": want}
    return {"cls": "ok", "re": re}


def ema(values, beta):
    w = np.array([beta ** (len(values) - 1 - t) for t in range(len(values))])
    return float(np.sum(w * np.array(values)) / w.sum())


def _tracker_run(cfg, seed, resume_at):
    model = build_model(cfg, seed)
    flat, loss_fn = Flat(cfg, model), loss_fn_of(cfg)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg["lr"])
    gen = torch.Generator().manual_seed(seed + 2)
    opts = {"every": cfg["every"], "splits": cfg["k"], "beta": cfg["beta"]}
    bn = BNoiseTracker(model, loss_fn, **opts)
    truth, worst = [], 0.0
    for step in range(cfg["steps"]):
        if step == resume_at:
            state = bn.state_dict()
            bn = BNoiseTracker(model, loss_fn, **opts)
            bn.load_state_dict(state)
        x, y = draw_inputs(cfg, cfg["n"] + (0 if cfg["own_hessian"] else 1), gen)
        xh, yh = draw_inputs(cfg, cfg["n_h"], gen)
        hb = pack(cfg, xh, yh) if cfg["own_hessian"] else None
        m = bn.step(pack(cfg, x, y), hessian_batch=hb)
        if step % cfg["every"] == 0:
            want, sh, ss = brute_measurement(flat, x, y, xh, yh, cfg["k"], cfg["own_hessian"])
            if m is None:
                return None, [], f"no measurement at call {step + 1}"
            worst = max(worst, compare(m, want, sh, ss))
            truth.append((want, sh, ss))
        elif m is not None:
            return None, [], f"a measurement at call {step + 1} (every={cfg['every']})"
        opt.zero_grad()
        loss_fn(model, pack(cfg, x, y)).backward()
        opt.step()
    return bn, truth, worst


def check_tracker(cfg, seed):
    if cfg["emb"] == "max_norm":
        return {"cls": "skip"}
    resume_at = 1 + seed % max(cfg["steps"] - 1, 1)
    bn, truth, worst = _tracker_run(cfg, seed, resume_at)
    if bn is None:
        return {"cls": "WRONG-SILENT", "why": worst}
    plain, _, _ = _tracker_run(cfg, seed, None)
    e, p = bn.estimate(), plain.estimate()
    for key in ("ghg", "trace_h_sigma", "g2", "trace_sigma"):
        want = ema([t[0][key] for t in truth], cfg["beta"])
        scale = max(t[2 if key in ("g2", "trace_sigma") else 1] for t in truth)
        worst = max(worst, abs(getattr(e, key) - want) / max(scale, 1e-300))
    if len(bn.history) != len(truth):
        return {"cls": "WRONG-SILENT", "why": f"{len(bn.history)} records for {len(truth)}"}
    for a, b in (
        (e.b_noise, p.b_noise),
        (e.low, p.low),
        (e.high, p.high),
        (e.b_simple, p.b_simple),
        (bn.calls, plain.calls),
    ):
        if not (a == b or (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-9 * abs(b)):
            return {"cls": "WRONG-SILENT", "why": f"resumed {a} vs uninterrupted {b}"}
    if worst > RTOL:
        return {"cls": "WRONG-SILENT", "re": worst}
    return {"cls": "ok", "re": worst}


def _train(cfg, seed, measure):
    """A few SGD steps with a GradientNoiseTracker, and a BNoiseTracker (``tracker=``) measuring
    at ``cfg["placement"]`` when ``measure``: the parameters, the tracker's history and the
    generators at the end."""
    from noisescale import GradientNoiseTracker

    cfg = {**cfg, "extra": "" if cfg["extra"] == "linear" else cfg["extra"]}
    model = build_model(cfg, seed)
    loss_fn = loss_fn_of(cfg)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg["lr"] or 0.1)
    tracker = GradientNoiseTracker(model)
    bn = BNoiseTracker(model, loss_fn, every=cfg["every"], splits=cfg["k"], tracker=tracker)
    gen = torch.Generator().manual_seed(seed + 7)
    torch.manual_seed(seed + 8)
    for _ in range(cfg["steps"]):
        x, y = draw_inputs(cfg, cfg["n"] + 1, gen)
        xm, ym = draw_inputs(cfg, cfg["n"] + 1, gen)
        xh, yh = draw_inputs(cfg, cfg["n_h"], gen)
        hb = pack(cfg, xh, yh) if cfg["own_hessian"] else None
        loss = loss_fn(model, pack(cfg, x, y))
        loss.backward()
        if measure and cfg["placement"] == "after_backward":
            bn.step(pack(cfg, xm, ym), hessian_batch=hb)
        tracker.step(loss=loss)
        opt.step()
        opt.zero_grad()
        if measure and cfg["placement"] == "after_step":
            bn.step(pack(cfg, xm, ym), hessian_batch=hb)
    params = [p.detach().clone() for p in model.parameters()]
    records = [
        {k: v for k, v in r.items() if k not in ("seconds", "time", "wall")}
        for r in getattr(tracker, "history", [])
    ]
    return params, records, tracker.estimate(), torch.get_rng_state()


def check_coexist(cfg, seed):
    """Training with B_noise measured is the same run as without: parameters, the B_simple
    tracker's estimate and records, the generators."""
    try:
        plain = _train(cfg, seed, False)
    except NoiseScaleError as err:  # the B_simple tracker's own refusal: not this check's
        return {"cls": "skip", "exc": _exception(err)}
    got = _train(cfg, seed, True)
    for a, b in zip(plain[0], got[0], strict=True):
        if not torch.equal(a.nan_to_num(), b.nan_to_num()) or not torch.equal(a.isnan(), b.isnan()):
            return {
                "cls": "WRONG-SILENT",
                "why": f"parameters {float((a - b).abs().max()):.3g} apart",
            }
    if not torch.equal(plain[3], got[3]):
        return {"cls": "WRONG-SILENT", "why": "generators moved"}
    ea, eb = plain[2], got[2]
    for key in ("b_simple", "g2", "trace_sigma"):
        a, b = getattr(ea, key), getattr(eb, key)
        if not (a == b or (math.isnan(a) and math.isnan(b))):
            return {"cls": "WRONG-SILENT", "why": f"tracker's {key} {b} with B_noise, {a} without"}
    if json.dumps(plain[1], default=str) != json.dumps(got[1], default=str):
        return {"cls": "WRONG-SILENT", "why": "the tracker's records differ"}
    return {"cls": "ok"}


def pool_truth(flat, x, y):
    """G, Σ (N-normalised), H of the pool, and (GᵀHG, tr HΣ, |G|², tr Σ)."""
    per = torch.stack([flat.grad(x[i : i + 1], y[i : i + 1]) for i in range(x.shape[0])])
    g = per.mean(0)
    sigma = (per - g).T @ (per - g) / x.shape[0]
    h = flat.hessian(x, y)
    return {
        "ghg": float(g @ h @ g),
        "trace_h_sigma": float(torch.trace(h @ sigma)),
        "g2": float(g @ g),
        "trace_sigma": float(torch.trace(sigma)),
        "h_iso": float(
            torch.linalg.matrix_norm(h - torch.trace(h) / h.shape[0] * torch.eye(h.shape[0]))
        ),
    }


def check_pool(cfg, seed, draws=200, reps=40):
    """Unbiasedness over ``draws`` single measurements and the coverage of ``reps`` trackers."""
    cfg = {**cfg, "own_hessian": True}
    model = build_model(cfg, seed)
    flat, loss_fn = Flat(cfg, model), loss_fn_of(cfg)
    gen = torch.Generator().manual_seed(seed + 3)
    big_n = cfg["pool_n"]
    x, y = draw_inputs(cfg, big_n, gen)
    truth = pool_truth(flat, x, y)
    if truth["ghg"] <= 0 or truth["trace_h_sigma"] <= 0:
        return {"cls": "skip", "why": "GᵀHG or tr(HΣ) not positive"}
    n = min(cfg["n"], big_n - cfg["n_h"]) if not cfg["replace"] else cfg["n"]
    k = min(cfg["k"], n)

    def draw():
        if cfg["replace"]:
            idx = torch.randint(0, big_n, (n,), generator=gen)
        else:
            idx = torch.randperm(big_n, generator=gen)[:n]
        hidx = torch.randint(0, big_n, (cfg["n_h"],), generator=gen)
        # (fresh tensors: the Hessian batch may hold an example of the batch, an independent draw)
        return pack(cfg, x[idx].clone(), y[idx].clone()), pack(
            cfg, x[hidx].clone(), y[hidx].clone()
        )

    size = None if cfg["replace"] else big_n
    rows = {key: [] for key in ("ghg", "trace_h_sigma")}
    for _ in range(draws):
        batch, hb = draw()
        bn = BNoiseTracker(model, loss_fn, splits=k, beta=1.0, dataset_size=size)
        bn.step(batch, hessian_batch=hb)
        rec = bn.history[-1]
        for key in rows:
            rows[key].append(rec[key] - truth[key])
    out = {
        "cls": "ok",
        "truth_bn": truth["trace_h_sigma"] / truth["ghg"],
        "truth_bs": truth["trace_sigma"] / truth["g2"],
    }
    for key, diffs in rows.items():
        d = np.array(diffs)
        z = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
        out[f"z_{key}"] = float(z)
        if abs(z) > Z_BIAS:
            out["cls"] = "WRONG-SILENT"
    hits, steps = 0, max(draws // reps, 3)
    target = truth["trace_h_sigma"] / truth["ghg"]
    for _ in range(reps):
        bn = BNoiseTracker(model, loss_fn, splits=k, beta=1.0, dataset_size=size)
        for _ in range(steps):
            batch, hb = draw()
            bn.step(batch, hessian_batch=hb)
        e = bn.estimate()
        lo = e.low if math.isfinite(e.low) else 0.0
        hits += lo <= target <= e.high
    p = sps.binom.cdf(hits, reps, 0.95)
    out.update(hits=hits, reps=reps, p_cover=float(p))
    if p < P_COVER:
        out["cls"] = "WRONG-SILENT"
    return out


def improvement_curve(flat, theta, dirs, xe, ye, eps):
    base = float(flat.loss(theta, xe, ye))
    return np.array(
        [base - np.mean([float(flat.loss(theta - e * v, xe, ye)) for v in dirs]) for e in eps]
    )


def check_line(cfg, seed):
    if cfg["emb"] == "max_norm":
        return {"cls": "skip"}
    model = build_model(cfg, seed)
    flat, loss_fn = Flat(cfg, model), loss_fn_of(cfg)
    gen = torch.Generator().manual_seed(seed + 4)
    xe, ye = draw_inputs(cfg, 16, gen)
    theta = flat.theta()
    dirs = []
    for _ in range(cfg["directions"]):
        xb, yb = draw_inputs(cfg, cfg["n"], gen)
        dirs.append(flat.grad(xb, yb))
    shaped = []
    for v in dirs:
        parts, off = [], 0
        for shape in flat.shapes:
            size = math.prod(shape)
            parts.append(v[off : off + size].reshape(shape).clone())
            off += size
        shaped.append(parts)
    lo, hi = 1e-4, cfg["eps_hi"]
    before = model_state(model)
    try:
        ls = line_search(
            model, loss_fn, shaped, pack(cfg, xe, ye), eps_range=(lo, hi), grid=cfg["grid"]
        )
    except NoiseScaleError as err:
        fine = np.geomspace(lo, hi, 400)
        curve = improvement_curve(flat, theta, dirs, xe, ye, fine)
        edge = int(np.argmax(curve)) in (0, len(fine) - 1) or "end of eps_range" in str(err)
        return {"cls": "ok" if edge else "refused", "exc": _exception(err)}
    changed = state_changed(before, model_state(model))
    if changed:
        return {"cls": "WRONG-SILENT", "why": f"model state changed: {changed}"}
    fine = np.geomspace(lo, hi, 400)
    curve = improvement_curve(flat, theta, dirs, xe, ye, fine)
    i = int(np.argmax(curve))  # refined between the fine grid's neighbours of its best
    near = np.linspace(fine[max(i - 1, 0)], fine[min(i + 1, len(fine) - 1)], 41)
    at = improvement_curve(flat, theta, dirs, xe, ye, [ls.eps_opt])[0] if ls.eps_opt > 0 else 0.0
    best = max(float(curve.max()), float(improvement_curve(flat, theta, dirs, xe, ye, near).max()))
    scale = max(abs(best), 1e-12)
    out = {"cls": "ok", "got": ls.delta_l_opt, "best": best, "eps": ls.eps_opt}
    if abs(at - ls.delta_l_opt) > 1e-9 * scale:
        out.update(cls="WRONG-SILENT", why=f"ΔL at ε_opt is {at}, returned {ls.delta_l_opt}")
    elif ls.delta_l_opt < best - 1e-4 * scale and best > 0:
        out.update(cls="WRONG-SILENT", why=f"ΔL_opt {ls.delta_l_opt} below the fine grid's {best}")
    return out


def check_delta_l(cfg, seed):
    torch.manual_seed(seed)
    d = cfg["d"] + 1
    model = nn.Linear(d, 1).double()
    gen = torch.Generator().manual_seed(seed + 5)
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    w = torch.randn(d, 1, generator=gen, dtype=torch.float64)

    def data(m):
        x = torch.randn(m, d, generator=gen, dtype=torch.float64) @ a
        return x, x @ w + cfg["scale"] * torch.randn(m, 1, generator=gen, dtype=torch.float64)

    def loss_fn(model, batch):
        return ((model(batch[0]) - batch[1]) ** 2).mean() / 2

    drawn = []

    def sample(b):
        batch = data(b)
        drawn.append(batch)
        return batch

    xe, ye = data(200)
    sizes = sorted({1, 2, 8, 32, cfg["n"]})
    min_examples = 0 if seed % 3 else 24  # ⌈min_examples/B⌉ directions at least
    try:
        curve = measure_delta_l_opt(
            model,
            loss_fn,
            sample,
            (xe, ye),
            sizes,
            repeats=cfg["directions"] + 1,
            min_examples=min_examples,
            eps_range=(1e-4, 1e3),
        )
    except NoiseScaleError as err:
        return {"cls": "ok", "note": "refused (few improving)", "exc": _exception(err)}
    # closed form: L(θ − εV) = L − ε gᵀV + ½ ε² VᵀHV, H = XᵀX/m of the eval batch
    xe1 = torch.cat([xe, torch.ones(len(xe), 1, dtype=torch.float64)], 1)
    h = xe1.T @ xe1 / len(xe)
    theta = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    ge = h @ theta - xe1.T @ ye[:, 0] / len(xe)
    worst, it = 0.0, iter(drawn)
    for b, dl, ep in zip(curve.batch_sizes, curve.delta_l_opt, curve.eps_opt, strict=True):
        count = max(cfg["directions"] + 1, -(-min_examples // int(b)))
        vs = []
        for _ in range(count):
            xb, yb = next(it)
            xb1 = torch.cat([xb, torch.ones(len(xb), 1, dtype=torch.float64)], 1)
            vs.append(xb1.T @ (xb1 @ theta - yb[:, 0]) / len(xb))
        lin = float(np.mean([float(ge @ v) for v in vs]))
        quad = float(np.mean([float(v @ h @ v) for v in vs]))
        eps_star, dl_star = lin / quad, 0.5 * lin**2 / quad
        if dl_star <= 0 or lin <= 0:
            continue
        if dl == 0:
            return {"cls": "WRONG-SILENT", "why": f"B={b}: ΔL_opt 0, truth {dl_star}"}
        worst = max(worst, abs(dl - dl_star) / dl_star, abs(ep - eps_star) / eps_star * 1e-3)
    used = [j for j, v in enumerate(curve.delta_l_opt) if v > 0]
    bn, dmax = fit_delta_l_opt(curve.batch_sizes[used], curve.delta_l_opt[used])
    same = (bn == curve.b_noise or abs(bn - curve.b_noise) <= 1e-9 * bn) and (
        dmax == curve.delta_l_max or abs(dmax - curve.delta_l_max) <= 1e-9 * dmax
    )
    if not same:
        return {
            "cls": "WRONG-SILENT",
            "why": f"fit {bn},{dmax} vs {curve.b_noise},{curve.delta_l_max}",
        }
    if worst > 1e-5:
        return {"cls": "WRONG-SILENT", "re": worst}
    return {"cls": "ok", "re": worst}


def _sse(b, y, bn):
    model = np.log(b) - np.logaddexp(np.log(b), math.log(bn))
    r = np.log(y) - model
    return float(np.sum((r - r.mean()) ** 2))


def check_fit(cfg, seed):
    rng = np.random.default_rng(seed)
    m = cfg["fit_sizes"]
    if cfg.get("fit_one"):
        b = np.full(max(m, 2), float(rng.integers(1, 1000)))
        y = 10 ** rng.uniform(-3, 0) * np.exp(0.1 * rng.standard_normal(b.size))
        try:
            got = fit_delta_l_opt(b, y)
        except NoiseScaleError as err:
            return {"cls": "ok", "exc": _exception(err)}
        return {"cls": "WRONG-SILENT", "why": f"one batch size {b[0]:g}: fit {got}"}
    b = np.unique(np.round(np.geomspace(1, 10 ** rng.uniform(2, 6), m)))
    if b.size < 2:
        return {"cls": "skip"}
    dmax = 10 ** rng.uniform(-6, 2)
    y = dmax / (1 + cfg["fit_bn"] / b)
    if cfg["fit_noise"]:
        y = y * np.exp(cfg["fit_noise"] * rng.standard_normal(b.size))
    got_bn, got_max = fit_delta_l_opt(b, y)
    lo, hi = b.min() / 1e4, b.max() * 1e4
    scan = np.geomspace(lo, hi, 20001)
    errs = np.array([_sse(b, y, s) for s in scan])
    best = float(errs.min())
    out = {"cls": "ok", "got": [got_bn, got_max], "true": [cfg["fit_bn"], dmax]}
    if not cfg["fit_noise"]:
        inside = lo * 10 < cfg["fit_bn"] < hi / 10
        # the data pin B_noise only where it bends the curve within the batch sizes
        pinned = b.min() / 50 < cfg["fit_bn"] < b.max() * 50 and inside
        if pinned and (
            abs(got_bn - cfg["fit_bn"]) > 1e-4 * cfg["fit_bn"] or abs(got_max - dmax) > 1e-4 * dmax
        ):
            out["cls"] = "WRONG-SILENT"
        return out
    if math.isfinite(got_bn) and got_bn > 0:
        mine = _sse(b, y, got_bn)
        if mine > best + 1e-6 * max(best, 1e-12) and mine - best > 1e-9:
            out.update(cls="WRONG-SILENT", why=f"SSE {mine} above the scan's {best}")
        log_max = float(
            np.mean(np.log(y) - (np.log(b) - np.logaddexp(np.log(b), math.log(got_bn))))
        )
        if abs(got_max - math.exp(log_max)) > 1e-9 * got_max:
            out.update(cls="WRONG-SILENT", why=f"ΔL_max {got_max} vs {math.exp(log_max)}")
    else:
        edge = errs[0] if got_bn == 0 else errs[-1]
        if edge > best + 1e-6 * max(best, 1e-12) and edge - best > 1e-9:
            out.update(cls="WRONG-SILENT", why=f"edge {got_bn} SSE {edge} above the scan's {best}")
    return out


# --- refusals ------------------------------------------------------------------------------------


class _OnceSoftplus(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return nn.functional.softplus(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.sigmoid(x)


REFUSE_WORDS = {
    "batchnorm": ("BatchNorm", "train mode"),
    "sum": ("sum",),
    "delta_sum": ("sum",),
    "delta_bn": ("BatchNorm", "train mode"),
    "couple": ("mean over",),
    "once": ("once_differentiable",),
}


def check_refuse(cfg, seed):
    kind = cfg["refuse"]
    torch.manual_seed(seed)
    d, c = cfg["d"], 2
    gen = torch.Generator().manual_seed(seed + 6)
    x = torch.randn(cfg["n"] + 8, d, generator=gen, dtype=torch.float64)
    y = torch.randn(cfg["n"] + 8, c, generator=gen, dtype=torch.float64)
    xh = torch.randn(cfg["n_h"], d, generator=gen, dtype=torch.float64)
    yh = torch.randn(cfg["n_h"], c, generator=gen, dtype=torch.float64)

    def mse(out, t):
        return ((out - t) ** 2).sum(1).mean()

    layers = [nn.Linear(d, 3)]
    if kind in ("batchnorm", "delta_bn"):
        layers.append(nn.BatchNorm1d(3))
    if kind == "dropout":
        layers.append(nn.Dropout(0.3))
    layers += [nn.Tanh(), nn.Linear(3, c)]
    model = nn.Sequential(*layers).double()
    loss_fn = {
        "sum": lambda m, b: ((m(b[0]) - b[1]) ** 2).sum(),
        "delta_sum": lambda m, b: ((m(b[0]) - b[1]) ** 2).sum(),
        "couple": lambda m, b: mse(m(b[0]) - m(b[0]).mean(0), b[1]),
        "once": lambda m, b: mse(_OnceSoftplus.apply(m(b[0])), b[1]),
    }.get(kind, lambda m, b: mse(m(b[0]), b[1]))
    target = model
    if kind == "opacus":
        try:
            from opacus import GradSampleModule
        except ImportError:
            return {"cls": "skip"}
        target = GradSampleModule(model)
    model.train()
    before = model_state(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if kind.startswith("delta"):  # the line-search method under the same contract
                pool = torch.Generator().manual_seed(seed + 9)
                got = measure_delta_l_opt(
                    target,
                    loss_fn,
                    lambda b: (
                        torch.randn(b, d, generator=pool),
                        torch.randn(b, c, generator=pool),
                    ),
                    (x, y),
                    [2, 4, 16],
                    repeats=4,
                    eps_range=(1e-6, 1e3),
                )
            else:
                got = measure_b_noise(
                    target, loss_fn, (x, y), hessian_batch=(xh, yh), splits=cfg["k"]
                )
    except NoiseScaleError as err:
        changed = state_changed(before, model_state(model))
        if changed:
            return {"cls": "WRONG-SILENT", "why": f"refused, state changed: {changed}"}
        if kind not in REFUSE_WORDS:
            return {"cls": "refused", "exc": _exception(err)}
        named = all(w.lower() in str(err).lower() for w in REFUSE_WORDS[kind])
        return {"cls": "ok" if named else "refused-vague", "exc": _exception(err)}
    changed = state_changed(before, model_state(model))
    if changed:
        return {"cls": "WRONG-SILENT", "why": f"model state changed: {changed}"}
    if kind == "couple":  # the check's documented tolerance (2% of the gradient's norm)
        return {"cls": "not-refused-doc", "why": f"{got.as_dict()}"[:200]}
    if kind in REFUSE_WORDS:
        shown = got.as_dict() if hasattr(got, "as_dict") else (got.b_noise, got.b_noise_eps)
        return {"cls": "WRONG-SILENT", "why": f"{kind} not refused: {shown}"[:300]}
    if kind == "opacus":
        if any(getattr(p, "grad_sample", None) is not None for p in model.parameters()):
            return {"cls": "WRONG-SILENT", "why": "the measurement left a grad_sample"}
        plain = Flat({"loss": "mse"}, model)
        plain.crit = lambda out, t: mse(out, t)
        target.disable_hooks()  # (the brute force's own passes)
        want, sh, ss = brute_measurement(plain, x, y, xh, yh, cfg["k"], True)
        target.enable_hooks()
        re = compare(got, want, sh, ss)
        if re > RTOL:
            return {"cls": "WRONG-SILENT", "re": re}
        return {"cls": "ok", "re": re}
    return {"cls": "ok"}


# --- one seed ------------------------------------------------------------------------------------


def check_seed(seed, override=None, checks=CHECKS, draws=200):
    torch.set_default_dtype(torch.float64)
    try:
        cfg = draw_config(seed)
        if override:
            cfg.update(override)
        record = {"seed": seed, "cfg": cfg, "checks": {}}
        run = {
            "single": lambda: check_single(cfg, seed),
            "tracker": lambda: check_tracker(cfg, seed),
            "coexist": lambda: check_coexist(cfg, seed),
            "pool": lambda: check_pool(cfg, seed, draws=draws, reps=max(draws // 5, 20)),
            "line": lambda: check_line(cfg, seed),
            "delta_l": lambda: check_delta_l(cfg, seed),
            "fit": lambda: check_fit(cfg, seed),
            "refuse": lambda: check_refuse(cfg, seed),
        }
        for name in checks:
            record["checks"][name] = _guard(run[name])
        return record
    finally:
        torch.set_default_dtype(torch.float32)


def findings(record):
    return [(n, r) for n, r in record["checks"].items() if r["cls"] in FINDINGS]


def describe(record):
    cfg = record["cfg"]
    keys = ("arch", "act", "loss", "k", "n", "n_h", "own_hessian", "every", "beta", "refuse")
    return f"seed {record['seed']}: " + " ".join(f"{k}={cfg[k]}" for k in keys)


def main(argv=None):
    from fuzz_runner import (
        _seeds,
        check_parser,
        print_class_table,
        print_findings,
        run_check_seeds,
    )

    parser = check_parser(__doc__, "0:40")
    parser.add_argument("--checks", default=",".join(CHECKS), help="comma-separated checks")
    parser.add_argument("--draws", type=int, default=200, help="pool draws per seed")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    checks = tuple(args.checks.split(","))
    override = json.loads(args.override) if args.override else None
    start = time.time()
    table, found, _ = run_check_seeds(
        _seeds(args.seeds),
        lambda seed: check_seed(seed, override, checks, args.draws),
        findings, args.jsonl, args.verbose, describe, width=8,
    )  # fmt: skip
    print_class_table(table, [c for c in CHECKS if c in table])
    print(f"\n{len(_seeds(args.seeds))} seeds in {time.time() - start:.0f} s")
    return print_findings(found, describe)


if __name__ == "__main__":
    raise SystemExit(main())
