"""The loss fuzzer: random losses and random declarations against brute force.

The runner's grammar (tests/fuzz_grammar.py) varies the model and draws its loss from a small
set, always written as ``per_example_loss(...).mean()`` or ``.sum()``. Here the model comes from
that grammar (a plain seed: no penalty, no auxiliary head, no block that mixes the examples) and
the LOSS is drawn from a grammar of its own (:func:`draw_loss`), written over the model's outputs
the way users write it: one to three terms, each a base loss (cross-entropy with label
smoothing or class weights, MSE, L1, Huber, BCE, KL to a teacher, a z-loss) reduced in one of
many ways (``.mean()``, ``.sum()``, ``.mean(0).sum()``, ``.sum(0).mean()``, nested means,
``F.*`` and ``nn.*Loss`` with a ``reduction=``, a Python loop over the examples, a token mean
over a mask, ``ignore_index``, weights per example constant or normalised over the batch),
times a factor written in one of many ways (a Python float, ``torch.tensor(a)``, ``.item()``, a
detached statistic, ``loss / loss.detach()``, ``* N``, ``/ N``, ``* (1 / N)``, a schedule that
changes between steps), the terms added with ``+``, ``torch.stack(...).sum()`` or Python's
``sum``; and, on some seeds, a term that couples the examples (InfoNCE over the outputs, batch
centring or standardisation) or reads a parameter (an L2 penalty), or a term switched on or off
between steps. The tracker's ``loss_reduction=`` is drawn, right or wrong.

Each term knows its **kind** — ``mean`` (a mean over the examples: each example's loss is N
times its share c_i of the written loss), ``sum`` (its share), ``given`` (a loss scaled by the
user's own constant, ``* N`` or ``/ 20`` on a sum, mean and sum mixed: each example's loss is what
the declaration says, N·c_i under ``"mean"``, c_i under ``"sum"``), ``counted`` (a mean over what
a mask or weights count: refused under ``"mean"``, its share under ``"sum"``), ``coupled`` and
``penalty`` (no per-example gradient: the only right answer is a refusal) — and its share c_i of
each example (a vector whose sum is the written loss: checked on every step, so that the
oracle's algebra cannot drift from the code). The truth of example i is one backward of
k·c_i in the batch's forward (the models are per-example: no block mixes the examples), k = N for
a mean (or ``"mean"`` declared over a ``given`` loss), 1 otherwise. A wrong declaration of a mean
or a sum must be refused (docs/per_example.md, "The loss"); where it is measured, the number is
compared with the truth of the loss's kind, not the declaration's.

Modes (4 steps each, the loss re-drawn by its schedule per step; steps 1, 2 and 4 are audited):

* ``one_shot``: ``noisescale.per_example_sqnorms(model, loss_reduction=...)`` around each step's
  loss, against each example's |∇ℓ_i|²;
* ``engine``: ``PerExampleNorms`` (no declaration): its raw norms against |∇c_i|²;
* ``tracker_exact``: ``GradientNoiseTracker(per_example_fraction=1.0)``: every record's
  ``sqnorm_big`` and per-example ``sqnorm_small`` against the truth;
* ``tracker_default``: the tracker's defaults (sub-batches): ``sqnorm_big``;
* ``accum``: the tracker over two micro-batches of the loss (divided by 2 under ``"mean"``),
  per example, ``sqnorm_big`` and ``sqnorm_small`` under the declaration's convention.

Classes as the runner's (``exact``, ``refused``, ``WRONG-SILENT``, ``wrong-warned``, ``crash``),
plus ``withheld-all``/``partly-withheld`` where steps had no record and ``MEASURED-COUPLED`` /
``MEASURED-PENALTY`` where a coupled loss or a penalty got a number on a step where the audit
could see it (findings too); a number wrong only on the unaudited step 3 after the loss's form
changed there is ``known-unaudited`` (documented: a form that changes between audits is checked
at the next audit), and a wrong number whose only cause is a 0-d tensor constant factor under a
wrong declaration is ``known-tensor-factor`` (documented as not read). Two classes name what this
fuzzer found (2026-12-07), so that a long run shows anything else apart: ``WRONG-detached-factor``
(a mean times a 0-d tensor computed from a detached statistic, ``ℓ.mean() / ℓ.mean().detach()``,
under ``"sum"``: N² too small) and ``WRONG-inv-n-factor`` (``ℓ.mean() * (1 / N)`` over a vector
of the examples' terms under ``"sum"``: N² too small, where ``ℓ.mean() / N`` is refused).

``refused-separable`` (one-shot only; not counted as a finding) is a refusal of the loss's kind —
a plain mean or sum against the declaration, a mean over what it counts — on a step whose loss is
of the declared kind: a false refusal or a message naming the wrong cause to look at (seen: a
mean of weighted terms — per-example weights, label smoothing's, KL's target — divided by its
own detached value, refused as a counted mean, where ``* (1 / L.item())`` is measured).

Seeds from 10000 on draw grammar v2 (cross-entropy with ``ignore_index``, NLL, ``Σ / numel``,
``(V / N).sum()``, ``torch.mean``, ``mean(dim=(0, 1))``, ``nansum``; factors as ``-a``,
``.mul(a)``, ``.div(a)``, ``torch.mul``, an int, a NumPy float32), from 20000 on v3 (per-example
means over a mask's counts, ``torch.where``-masked means, a backward from the vector of the
examples' terms with a gradient of ones, of 1/N or of per-example weights); the seeds below keep
their meaning.

    python tests/fuzz_losses.py --seeds 0:200 [-v] [--jsonl out.jsonl]
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import sys
import time
import traceback
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import fuzz_grammar
import fuzz_runner
import noisescale
from noisescale.per_example import PerExampleNorms

RTOL = 1e-7
STEPS = 4
AUDITED = (1, 2, 4)
MODES = ("one_shot", "engine", "tracker_exact", "tracker_default", "accum")
FINDINGS = (
    "WRONG-SILENT", "wrong-warned", "crash", "MEASURED-COUPLED", "MEASURED-PENALTY",
    "WRONG-detached-factor", "WRONG-inv-n-factor",
)  # fmt: skip
BASES = ("ce", "ce_ls", "ce_cw", "mse", "l1", "huber", "bce", "kl", "zloss")
REDUCTIONS = (
    "mean", "sum", "mean0sum", "sum0mean", "rowmean_mean", "rowsum_mean", "rowmean_sum",
    "F_mean", "F_sum", "module_mean", "module_sum", "loop_mean", "loop_sum", "tokmean",
    "wratio", "wnorm", "wconst", "batchmean",
)  # fmt: skip
FACTORS = (
    "none", "none", "float", "div_float", "tensor", "item", "detached", "selfnorm", "timesN",
    "divN", "mulinvN", "sched",
)  # fmt: skip
# documented as not read by the loss-kind check (docs/per_example.md, "The loss"): a factor held
# in a 0-d tensor constant, and the built-in label-smoothed mean under "sum"
KNOWN_FORMS = ("tensor", "ls_mean")
# a 0-d tensor factor computed from a detached statistic (`ce.mean() / ce.mean().detach()`,
# `/ (ce.detach().mean() + 1)`): read no more than a constant held in a tensor — a mean under
# "sum" is measured N² too small without a word (this fuzzer, 2026-12-07)
DETACHED_FORMS = ("detached", "selfnorm")
AUX = ("infonce", "center", "center_detached", "bnorm", "param_pen", "act_pen", "zloss_aux")
COMBINE = ("plus", "stack_sum", "py_sum")
# grammar v2 (seeds from 10000 on): cross-entropy with ignore_index (some labels -100), NLL;
# reductions written as `Σ / numel`, `(V / N).sum()`, `torch.mean`, `mean(dim=(0, 1))`,
# `nansum`; factors as a negation, `.mul(a)`, `.div(a)`, `torch.mul`, an int, a NumPy float32
BASES_V2 = ("ce_ign", "nll")
REDUCTIONS_V2 = ("sum_div_numel", "rows_div_n_sum", "torch_mean", "dims_mean", "nansum")
FACTORS_V2 = ("neg", "mul_method", "div_method", "torch_mul", "int", "np32")
# grammar v3 (seeds from 20000 on): per-example means over a mask's counts then averaged,
# torch.where-masked means, and a backward from the vector of the examples' terms
# (`per.backward(torch.ones_like(per))`, `/ N`, or per-example weights), a single term only
REDUCTIONS_V3 = ("tok_rowmean", "where_mean", "vec_ones", "vec_inv_n", "vec_w")
VEC_REDUCTIONS = ("vec_ones", "vec_inv_n", "vec_w")


class VecLoss:
    """A backward from a vector: ``vec.backward(grad)``; ``/ k`` scales the gradient."""

    def __init__(self, vec, grad):
        self.vec, self.grad = vec, grad

    def __truediv__(self, k):
        return VecLoss(self.vec, self.grad / k)

    def value(self):
        return (self.vec * self.grad).sum()

    def backward(self):
        self.vec.backward(self.grad)


# --- the loss grammar -------------------------------------------------------------------------


def draw_loss(r, n_terms=None, v2=False):
    """The loss's description: terms, each {base, red, factor, a, on}, and how they combine;
    `v2` (seeds from 10000 on) draws from the longer lists (:data:`BASES_V2`, ...), so that the
    seeds below keep their meaning."""
    bases = BASES + BASES_V2 if v2 else BASES
    reductions = REDUCTIONS + REDUCTIONS_V2 if v2 else REDUCTIONS
    if v2 == 3:
        reductions = reductions + REDUCTIONS_V3
    factors = FACTORS + FACTORS_V2 if v2 else FACTORS
    terms = []
    for _ in range(n_terms or r.choice([1, 1, 2, 2, 3])):
        terms.append(
            {
                "base": r.choice(bases),
                "red": r.choice(reductions),
                "factor": r.choice(factors),
                "a": round(r.uniform(0.2, 2.0), 3),
                # the steps (1-4) the term is in the loss
                "on": sorted(r.sample(range(1, STEPS + 1), r.choice([4, 4, 4, 3, 2]))),
            }
        )
    if r.random() < 0.3:
        terms.append(
            {
                "base": "aux",
                "red": r.choice(AUX),
                "factor": r.choice(["none", "float", "tensor"]),
                "a": round(r.uniform(0.05, 0.5), 3),
                "on": sorted(r.sample(range(1, STEPS + 1), r.choice([4, 4, 3, 2, 1]))),
            }
        )
    if not any(1 in t["on"] for t in terms):
        terms[0]["on"] = sorted({1, *terms[0]["on"]})
    for step in range(1, STEPS + 1):  # every step has a term
        if not any(step in t["on"] for t in terms):
            terms[0]["on"] = sorted({step, *terms[0]["on"]})
    return {"terms": terms, "combine": r.choice(COMBINE), "declared": r.choice(["mean", "sum"])}


def _rows(v, n):
    """Each example's values as [N, K]."""
    return v.reshape(n, -1)


def _base(term, o, data, n):
    """The base loss elementwise, [N, K] (K positions or elements per example), and the
    F/nn.Module call that gives the same with a reduction, when there is one."""
    base = term["base"]
    y, t, cw, teacher = data["y"], data["t"], data["class_w"], data["teacher"]
    C = o.shape[-1]
    logits = o.reshape(-1, C)
    labels = y.reshape(-1)
    if base in ("ce_ign", "nll"):
        labels = data["y_ign"].reshape(-1) if base == "ce_ign" else labels
        if base == "nll":
            lp = F.log_softmax(logits, -1)
            return (
                _rows(F.nll_loss(lp, labels, reduction="none"), n),
                (lambda red: F.nll_loss(lp, labels, reduction=red)),
                (lambda red: nn.NLLLoss(reduction=red)(lp, labels)),
            )
        return (
            _rows(F.cross_entropy(logits, labels, reduction="none"), n),
            (lambda red: F.cross_entropy(logits, labels, reduction=red)),
            (lambda red: nn.CrossEntropyLoss(reduction=red)(logits, labels)),
        )
    if base in ("ce", "ce_ls", "ce_cw"):
        kw = {}
        if base == "ce_ls":
            kw["label_smoothing"] = 0.1
        if base == "ce_cw":
            kw["weight"] = cw
        V = _rows(F.cross_entropy(logits, labels, reduction="none", **kw), n)
        return (
            V,
            (lambda red: F.cross_entropy(logits, labels, reduction=red, **kw)),
            (lambda red: nn.CrossEntropyLoss(reduction=red, **kw)(logits, labels)),
        )
    if base == "mse":
        return (
            _rows((o - t).pow(2), n),
            (lambda red: F.mse_loss(o, t, reduction=red)),
            (lambda red: nn.MSELoss(reduction=red)(o, t)),
        )
    if base == "l1":
        return (
            _rows((o - t).abs(), n),
            (lambda red: F.l1_loss(o, t, reduction=red)),
            (lambda red: nn.L1Loss(reduction=red)(o, t)),
        )
    if base == "huber":
        return (
            _rows(F.huber_loss(o, t, reduction="none", delta=0.5), n),
            (lambda red: F.huber_loss(o, t, reduction=red, delta=0.5)),
            (lambda red: nn.HuberLoss(reduction=red, delta=0.5)(o, t)),
        )
    if base == "bce":
        p = torch.sigmoid(t)
        return (
            _rows(F.binary_cross_entropy_with_logits(o, p, reduction="none"), n),
            (lambda red: F.binary_cross_entropy_with_logits(o, p, reduction=red)),
            (lambda red: nn.BCEWithLogitsLoss(reduction=red)(o, p)),
        )
    if base == "kl":
        lp = F.log_softmax(o, -1)
        q = F.softmax(teacher, -1)
        return (
            _rows(F.kl_div(lp, q, reduction="none"), n),
            (lambda red: F.kl_div(lp, q, reduction=red)),
            (lambda red: nn.KLDivLoss(reduction=red)(lp, q)),
        )
    # z-loss
    z = torch.logsumexp(o, -1).pow(2)
    return _rows(z, n), None, None


def _reduce(term, o, data, n):
    """(written value, share c [N], kind) of one term before its factor."""
    red = term["red"]
    V, f_call, m_call = _base(term, o, data, n)
    K = V.shape[1]
    if red == "batchmean" and term["base"] != "kl":
        red = "F_mean"  # (kl_div's alone; the others' reduction="mean" in its place)
    if term["base"] == "ce_cw" and red in ("F_mean", "module_mean"):
        # class weights averaged over the batch's summed weights: a counted mean
        w = data["class_w"][data["y"].reshape(-1)].reshape(n, -1)
        W = w.sum()
        value = f_call("mean") if red == "F_mean" else m_call("mean")
        return value, V.sum(1) / W, "counted"
    if term["base"] == "ce_ign" and red in ("F_mean", "module_mean"):
        # a mean over the targets not ignored: a counted mean
        count = (data["y_ign"] != -100).sum()
        value = f_call("mean") if red == "F_mean" else m_call("mean")
        return value, V.sum(1) / count, "counted"
    if red in ("tok_rowmean", "where_mean"):
        m = data["mask"][:, :K].clone()
        m[:, -1] = 1.0
        if red == "where_mean":  # the masked terms zero, a mean over every element
            return torch.where(m > 0, V, 0.0).mean(), (V * m).sum(1) / V.numel(), "mean"
        per = (V * m).sum(1) / m.sum(1)  # each example's mean over its own count
        return per.mean(), per / n, "mean"
    if red == "vec_ones":
        per = V.sum(1)
        return VecLoss(per, torch.ones_like(per)), per, "sum"
    if red == "vec_inv_n":
        per = V.mean(1)
        return VecLoss(per, torch.ones_like(per) / n), per / n, "mean"
    if red == "vec_w":
        per = V.mean(1)
        return VecLoss(per, data["ex_w"]), per * data["ex_w"], "given"
    if red == "sum_div_numel":  # Σ / N is a mean; a sum divided by another number is as given
        return V.sum() / V.numel(), V.sum(1) / V.numel(), "mean" if K == 1 else "given"
    if red == "rows_div_n_sum":  # documented as the user's own scaling: taken as given
        return (V / n).sum(), V.sum(1) / n, "given"
    if red == "torch_mean":
        return torch.mean(V), V.sum(1) / V.numel(), "mean"
    if red == "dims_mean":
        return V.mean(dim=(0, 1)), V.sum(1) / V.numel(), "mean"
    if red == "nansum":
        return V.nansum(), V.sum(1), "sum"
    if red in ("F_mean", "module_mean", "F_sum", "module_sum", "batchmean") and f_call is None:
        red = "mean" if red.endswith("mean") else "sum"
    if red == "mean":
        return V.mean(), V.sum(1) / (n * K), "mean"
    if red == "sum":
        return V.sum(), V.sum(1), "sum"
    if red == "mean0sum":
        return V.mean(0).sum(), V.sum(1) / n, "mean"
    if red == "sum0mean":
        return V.sum(0).mean(), V.sum(1) / K, "sum"
    if red == "rowmean_mean":
        return V.mean(1).mean(), V.mean(1) / n, "mean"
    if red == "rowsum_mean":
        return V.sum(1).mean(), V.sum(1) / n, "mean"
    if red == "rowmean_sum":
        return V.mean(1).sum(), V.mean(1), "sum"
    if red in ("F_mean", "module_mean"):
        value = f_call("mean") if red == "F_mean" else m_call("mean")
        return value, V.sum(1) / (n * K), "mean"
    if red in ("F_sum", "module_sum"):
        value = f_call("sum") if red == "F_sum" else m_call("sum")
        return value, V.sum(1), "sum"
    if red == "batchmean":  # kl_div's: the sum over the first dimension's size
        return f_call("batchmean"), V.sum(1) / n, "mean"
    if red == "loop_mean":
        return sum(V[i].sum() for i in range(n)) / n, V.sum(1) / n, "mean"
    if red == "loop_sum":
        return sum(V[i].mean() for i in range(n)), V.mean(1), "sum"
    if red == "tokmean":  # a mean over what a mask counts (some positions left out)
        m = data["mask"][:, :K].clone()
        m[:, -1] = 1.0  # (every example counts one at least: no empty micro-batch)
        M = m.sum()
        return (V * m).sum() / M, (V * m).sum(1) / M, "counted"
    w = data["ex_w"]
    if red == "wratio":  # a weighted mean over the batch's weights: refused under "mean"
        per = V.mean(1)
        return (w * per).sum() / w.sum(), w * per / w.sum(), "counted"
    if red == "wnorm":  # the weights normalised first: a constant to the loss (taken as given)
        per = V.mean(1)
        wn = w / w.sum()
        return (wn * per).sum(), wn * per, "given"
    # wconst: constant per-example weights, then a mean over the examples
    per = V.mean(1)
    return (w * per).mean(), w * per / n, "mean"


def _aux(term, o, model, n):
    """(written value, share c [N], kind) of an auxiliary term."""
    red = term["red"]
    z = o.reshape(n, -1)
    if red == "infonce":
        zn = F.normalize(z, dim=1)
        logits = zn @ zn.T / 0.5
        return F.cross_entropy(logits, torch.arange(n)), None, "coupled"
    if red == "center":
        return (z - z.mean(0)).pow(2).mean(), None, "coupled"
    if red == "bnorm":
        return ((z - z.mean(0)) / (z.std(0) + 1e-3)).pow(2).mean(), None, "coupled"
    if red == "center_detached":  # a detached batch statistic: a constant
        d = (z - z.detach().mean(0)).pow(2)
        return d.mean(), d.sum(1) / d.numel(), "mean"
    if red == "param_pen":
        p = next(q for q in model.parameters() if q.requires_grad)
        return p.pow(2).sum(), None, "penalty"
    if red == "act_pen":
        return z.pow(2).mean(), z.pow(2).sum(1) / z.numel(), "mean"
    zz = torch.logsumexp(o, -1).reshape(n, -1).pow(2)
    return zz.mean(), zz.sum(1) / zz.numel(), "mean"


_KEEP = ("none", "float", "div_float", "tensor", "item", "detached", "selfnorm", "sched")


def _factor(term, value, c, kind, n, step):
    """The term times its factor, written as the seed says: (value, c, kind)."""
    f, a = term["factor"], term["a"]
    if f == "none":
        return value, c, kind
    if f == "float":
        return a * value, None if c is None else a * c, kind
    if f == "div_float":  # a sum divided by a number is the user's own (`ℓ.sum() / 20`)
        return value / a, None if c is None else c / a, "given" if kind == "sum" else kind
    if f == "tensor":
        s = torch.tensor(a)
        return s * value, None if c is None else c * a, kind
    if f == "item":
        s = value.detach().item() * 0 + a
        return value * s, None if c is None else c * s, kind
    if f == "detached":
        s = value.detach() + 1.0
        return value / s, None if c is None else c / s, kind
    if f == "selfnorm":
        s = value.detach()
        return value / s, None if c is None else c / s, kind
    if f == "sched":
        s = a * (1 + 0.5 * step)
        return s * value, None if c is None else c * s, kind
    if f in ("neg", "mul_method", "div_method", "torch_mul", "int", "np32"):
        s = {"neg": -a, "div_method": 1 / a, "int": 3}.get(f, a)
        if f == "neg":
            value = -a * value
        elif f == "mul_method":
            value = value.mul(a)
        elif f == "div_method":
            value = value.div(a)
        elif f == "torch_mul":
            value = torch.mul(value, a)
        elif f == "int":
            value = value * 3
        else:
            s = float(np.float32(a))
            value = value * np.float32(a)
        if f == "div_method" and kind == "sum":
            kind = "given"  # (`ℓ.sum().div(a)` is `ℓ.sum() / a`: the user's own, as given)
        return value, None if c is None else c * s, kind
    if f == "timesN":
        return value * n, None if c is None else c * n, "given" if kind in ("mean", "sum") else kind
    # divN and mulinvN: a sum becomes a mean; a mean divided again stays one (documented)
    # `sum / N` is a mean, a mean divided again stays one; a factor of 1/N on a sum leaves the
    # kind unknown: the user's (docs/per_example.md)
    new = "mean" if kind in ("mean", "sum") else kind
    if f == "divN":
        return value / n, None if c is None else c / n, new
    new = "given" if kind == "sum" else kind
    return value * (1.0 / n), None if c is None else c * (1.0 / n), new


def loss_at(desc, model, o, data, n, step):
    """The written loss of `step` over outputs `o`, each example's share c [N] (None where the
    loss couples the examples or reads a parameter), the loss's kind and its factor forms."""
    values, shares, kinds, forms = [], [], [], []
    for term in desc["terms"]:
        if step not in term["on"]:
            continue
        if term["base"] == "aux":
            value, c, kind = _aux(term, o, model, n)
        else:
            value, c, kind = _reduce(term, o, data, n)
        value, c, kind = _factor(term, value, c, kind, n, step)
        values.append(value)
        shares.append(c)
        kinds.append(kind)
        forms.append(term["factor"])
        if term["base"] == "ce_ls" and term["red"] in ("F_mean", "module_mean", "batchmean"):
            forms.append("ls_mean")
    comb = desc["combine"]
    if isinstance(values[0], VecLoss):
        loss = values[0]
    elif comb == "stack_sum" and len(values) > 1:
        loss = torch.stack(values).sum()
    elif comb == "py_sum":
        loss = sum(values)
    else:
        loss = values[0]
        for v in values[1:]:
            loss = loss + v
    for bad in ("coupled", "penalty"):
        if bad in kinds:
            return loss, None, bad, forms
    share = sum(shares)
    if "counted" in kinds:
        kind = "counted"
    elif len(set(kinds)) == 1:
        kind = kinds[0]
    else:
        kind = "given"
    return loss, share, kind, forms


def make_data(seed, o, n):
    g = torch.Generator().manual_seed(seed + 17)
    C = o.shape[-1]
    K = o[0].numel() // C
    mask = (torch.rand(n, max(K, o[0].numel()), generator=g) < 0.7).double()
    mask[0, 0] = 0.0
    mask[:, -1] = 1.0
    data = {
        "y": torch.randint(0, C, o.shape[:-1], generator=g),
        "t": torch.randn(o.shape, generator=g),
        "teacher": torch.randn(o.shape, generator=g),
        "class_w": torch.rand(C, generator=g) * 3 + 0.2,
        "ex_w": torch.rand(n, generator=g) + 0.5,
        "mask": mask,
    }
    # grammar v2's labels with -100 (drawn after the others: the old seeds keep their data)
    y_ign = torch.randint(0, C, o.shape[:-1], generator=g)
    y_ign.view(n, -1)[0, 0] = -100  # (the first example's first target ignored)
    if y_ign[0].numel() > 1:
        y_ign.view(n, -1)[1:, -1][torch.rand(n - 1, generator=g) < 0.5] = -100
    data["y_ign"] = y_ign
    return data


def make_case(seed):
    """(desc, model, x, data): a plain seed's model of the runner's grammar, this seed's loss."""
    override = {"lossform": "plain", "penalty": False, "aux": False, "frozen": False}
    r = random.Random(seed * 11 + 1)
    if r.random() < 0.5:  # a simple body on half the seeds: the loss is what is under test
        override["blocks"] = r.choice([["linear"], ["layernorm", "linear"], [], ["linear_flat"]])
    spec, model, x, _ = fuzz_grammar.make_case(seed, mixing_prob=0.0, override=override)
    n = spec["n"]
    with torch.no_grad():
        o = model(x)
    data = make_data(seed, o, n)
    desc = draw_loss(random.Random(seed * 7 + 3), v2=3 if seed >= 20000 else seed >= 10000)
    if len(desc["terms"]) > 1:  # (a vector's backward is the whole loss: one term only)
        for term in desc["terms"]:
            if term["red"] in VEC_REDUCTIONS:
                term["red"] = "mean"
    elif desc["terms"][0]["red"] in VEC_REDUCTIONS:
        desc["terms"][0]["factor"] = "none"
    desc["n"] = n
    desc["model"] = {k: spec[k] for k in ("stem", "blocks", "pool", "head")}
    return desc, model, x, data


# --- the truth --------------------------------------------------------------------------------


def _slice_data(data, idx):
    return {k: (v if k == "class_w" else v[idx]) for k, v in data.items()}


def truth(desc, model, x, data, step, lo=0, hi=None):
    """Each example's gradient of its share c_i (in the batch's forward of x[lo:hi]), the kind,
    the factor forms and the loss value; grads None for a coupled or penalised loss."""
    hi = desc["n"] if hi is None else hi
    n = hi - lo
    params = [p for p in model.parameters() if p.requires_grad]
    o = model(x[lo:hi])
    loss, c, kind, forms = loss_at(desc, model, o, _slice_data(data, slice(lo, hi)), n, step)
    if c is None:
        return None, kind, forms
    if isinstance(loss, VecLoss):
        loss = loss.value()
    if not torch.allclose(c.sum(), loss, rtol=1e-9, atol=1e-12):
        raise AssertionError(f"oracle: shares sum {float(c.sum())} != loss {float(loss)}")
    grads = []
    for i in range(n):
        gs = torch.autograd.grad(c[i], params, retain_graph=True, allow_unused=True)
        grads.append(
            [torch.zeros_like(p) if g is None else g for g, p in zip(gs, params, strict=True)]
        )
    return grads, kind, forms


def _k(kind, declared, n):
    """Each example's loss is k · c_i: by the loss's kind, or by the declaration."""
    if kind == "mean":
        return float(n)
    if kind == "sum":
        return 1.0
    return float(n) if declared == "mean" else 1.0


def _sq(grads, k):
    return torch.stack([sum((k * g).pow(2).sum() for g in gs) for gs in grads])


def _big(grads, k):
    n = len(grads)
    return sum((sum(gs[t] for gs in grads) * k / n).pow(2).sum() for t in range(len(grads[0])))


# --- the modes --------------------------------------------------------------------------------


def _step_class(got, want, kind, desc, step, forms, declared):
    """One step's number against its truth."""
    re = fuzz_runner.relerr(got, want)
    if re < RTOL:
        return {"cls": "exact", "re": re}
    return {
        "cls": "WRONG",
        "re": re,
        "got": got.flatten().tolist()[:6],
        "want": want.flatten().tolist()[:6],
    }


def _changed_before(desc, step):
    """Whether the loss's terms at `step` differ from those at the audited step before it."""
    prev = max(s for s in AUDITED if s < step) if step > 1 else step
    return [t["on"].count(step) for t in desc["terms"]] != [
        t["on"].count(prev) for t in desc["terms"]
    ]


# the loss-kind refusals: a plain mean or sum against the declaration, a counted mean
KIND_REFUSALS = ("the loss is a plain mean", "the loss is a plain sum", "averaged over what it")


def _separable_refused(res, desc):
    """A one-shot refusal of the loss's kind (:data:`KIND_REFUSALS`) on a step whose loss is of
    the declared kind (or as given) and separable: a false refusal, or a message naming the
    wrong cause (``kl.mean() / kl.mean().detach()`` under "mean", refused as a counted mean)."""
    kind = res.get("kind")
    if kind not in ("mean", "sum", "given") or kind not in (desc["declared"], "given"):
        return False
    return any(words in res.get("exc", "") for words in KIND_REFUSALS)


def _classify(res, desc, warned):
    steps = res["steps"]
    kinds = [s["cls"] for s in steps]
    if res.get("exc_cls") == "crash":
        return "crash"
    wrong = [s for s in steps if s["cls"] in ("WRONG", "MEASURED-COUPLED", "MEASURED-PENALTY")]
    if wrong:
        res["re"] = max(s.get("re", 0) for s in wrong)
        for s in wrong:
            if s["step"] not in AUDITED and _changed_before(desc, s["step"]):
                if s["cls"] != "MEASURED-PENALTY":
                    s["why"] = "unaudited"  # (documented: checked at the next audit)
            elif s.get("tensor_factor"):
                s["why"] = "tensor"
            elif s.get("detached_factor"):
                s["why"] = "detached"
            elif s.get("inv_n_factor"):
                s["why"] = "inv_n"
        whys = {s.get("why") for s in wrong}
        if whys <= {"unaudited"}:
            return "known-unaudited"
        if whys <= {"unaudited", "tensor"}:
            return "known-tensor-factor"
        if whys <= {"unaudited", "tensor", "detached"}:
            # found by this fuzzer (2026-12-07): a factor computed from a detached statistic
            return "WRONG-detached-factor"
        if whys <= {"unaudited", "tensor", "detached", "inv_n"}:
            # found by this fuzzer (2026-12-07): a mean over a vector of the examples' terms
            # times 1/N (`ℓ.mean() * (1 / N)`) read as of no kind
            return "WRONG-inv-n-factor"
        res["re"] = max(s.get("re", 0) for s in wrong)
        bad = [s["cls"] for s in wrong if s["cls"] != "WRONG"]
        if bad:
            return bad[0]
        return "wrong-warned" if warned else "WRONG-SILENT"
    if res.get("exc_cls") == "refused" and _separable_refused(res, desc):
        return "refused-separable"
    if res.get("exc_cls") == "refused":
        return "refused" if not any(k == "exact" for k in kinds) else "exact-then-refused"
    if kinds and all(k == "exact" for k in kinds):
        return "exact"
    if kinds and all(k == "withheld" for k in kinds):
        return "withheld-all"
    return "partly-withheld"


def _judge(got, want_fn, kind, declared, forms, step, grads):
    """A number on a step: coupled and penalised losses must not have one."""
    if grads is None:
        return {"cls": "MEASURED-" + kind.upper(), "step": step}
    want = want_fn()
    out = _step_class(got, want, kind, None, step, forms, declared)
    out["step"] = step
    if out["cls"] == "WRONG":
        wrong_decl = (kind == "mean" and declared == "sum") or (
            kind == "sum" and declared == "mean"
        )
        out["tensor_factor"] = wrong_decl and any(f in KNOWN_FORMS for f in forms)
        out["detached_factor"] = wrong_decl and any(f in DETACHED_FORMS for f in forms)
        out["inv_n_factor"] = wrong_decl and kind == "mean" and "mulinvN" in forms
        out["kind"] = kind
    return out


def _catch(fn, desc):
    res = {"steps": []}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fn(res)
        except Exception as err:
            fuzz_runner._note_exception(res, err)
    warned, messages = fuzz_runner._warned(caught)
    res["warn"] = messages[:3]
    res["cls"] = _classify(res, desc, warned)
    return res


def run_one_shot(desc, model, x, data):
    n, declared = desc["n"], desc["declared"]

    def body(res):
        for step in range(1, STEPS + 1):
            grads, kind, forms = truth(desc, model, x, data, step)
            res["kind"] = kind  # (the step's: read where it is refused)
            model.zero_grad()
            with noisescale.per_example_sqnorms(model, loss_reduction=declared) as pe:
                loss_at(desc, model, model(x), data, n, step)[0].backward()
            if pe.sqnorms is None:
                res["steps"].append({"cls": "withheld", "step": step})
                continue
            k = _k(kind, declared, n)
            res["steps"].append(
                _judge(
                    pe.sqnorms, functools.partial(_sq, grads, k), kind, declared, forms, step, grads
                )
            )

    return _catch(body, desc)


def run_engine(desc, model, x, data):
    n = desc["n"]

    def body(res):
        engine = PerExampleNorms(model)
        try:
            for step in range(1, STEPS + 1):
                with engine.paused():
                    grads, _, forms = truth(desc, model, x, data, step)
                model.zero_grad()
                loss_at(desc, model, model(x), data, n, step)[0].backward()
                passes = engine.collect()
                if len(passes) != 1 or passes[0].raw_sqnorms is None:
                    res["steps"].append({"cls": "withheld", "step": step})
                    continue
                got = passes[0].raw_sqnorms
                res["steps"].append(
                    _judge(
                        got, functools.partial(_sq, grads, 1.0), "sum", "sum", forms, step, grads
                    )
                )
        finally:
            engine.remove()

    return _catch(body, desc)


def run_tracker(desc, model, x, data, fraction, accum=False):
    n, declared = desc["n"], desc["declared"]
    parts = [(0, n // 2), (n // 2, n)] if accum else [(0, n)]

    def body(res):
        kwargs = {"loss_reduction": declared}
        if fraction is not None:
            kwargs["per_example_fraction"] = fraction
        tracker = noisescale.GradientNoiseTracker(model, **kwargs)
        try:
            for step in range(1, STEPS + 1):
                with tracker.paused():
                    truths = [truth(desc, model, x, data, step, lo, hi) for lo, hi in parts]
                model.zero_grad()
                for lo, hi in parts:
                    sl = slice(lo, hi)
                    loss = loss_at(desc, model, model(x[sl]), _slice_data(data, sl), hi - lo, step)[
                        0
                    ]
                    if accum and declared == "mean":
                        loss = loss / len(parts)
                    loss.backward()
                tracker.step()
                record = tracker.history[-1] if tracker.history else None
                if record is None or record.get("step") != step or record.get("skipped"):
                    res["steps"].append({"cls": "withheld", "step": step})
                    continue
                kind = truths[0][1]
                forms = [f for t in truths for f in t[2]]
                if any(t[0] is None for t in truths):
                    kind = next(t[1] for t in truths if t[0] is None)
                    res["steps"].append(_judge(None, None, kind, declared, forms, step, None))
                    continue
                # each example's loss, k_j · c_i, and its weight w_i in the big batch's mean
                gs, ws = [], []
                for (lo, hi), (grads, kind_j, _) in zip(parts, truths, strict=True):
                    if accum:  # by the declaration: a micro-batch's mean is 1/k of a mean
                        k = float(hi - lo) if declared == "mean" else 1.0
                        w = 1.0 / (len(parts) * (hi - lo)) if declared == "mean" else 1.0
                        kind = "given"
                    else:
                        k, w = _k(kind_j, declared, n), 1.0
                    gs += [[k * g for g in gg] for gg in grads]
                    ws += [w] * len(grads)
                total = sum(ws)
                want_big = sum(
                    sum(gg[t] * w for gg, w in zip(gs, ws, strict=True)).div(total).pow(2).sum()
                    for t in range(len(gs[0]))
                )
                want = [want_big]
                got = [record["sqnorm_big"]]
                src = record.get("sources", {}).get("per_example")
                # (a pass whose per-example norms were left out, with its micro-batch norms
                # still counted, leaves the source fewer examples: compared by |G|² alone)
                if fraction == 1.0 and src is not None and src["count"] == len(gs):
                    want.append(_sq(gs, 1.0).mean())
                    got.append(src["sqnorm_small"])
                got_t = torch.tensor([float(v) for v in got])
                want_t = torch.stack([torch.as_tensor(w) for w in want]).double()
                res["steps"].append(
                    _judge(
                        got_t,
                        functools.partial(lambda w: w, want_t),
                        kind,
                        declared,
                        forms,
                        step,
                        gs,
                    )
                )
        finally:
            tracker.remove()

    return _catch(body, desc)


def check_seed(seed, modes=MODES, override=None):
    record = {"seed": seed}
    start = time.time()
    with fuzz_runner.float64_default():
        try:
            desc, model, x, data = make_case(seed)
            if override:
                desc.update(override)
            for step in range(1, STEPS + 1):  # the oracle's own check, and a valid case
                truth(desc, model, x, data, step)
        except Exception as err:
            record["gen_error"] = f"{type(err).__name__}: {err}"[:300]
            record["tb"] = traceback.format_exc()[-800:]
            return record
        record["desc"] = desc
        runs = {
            "one_shot": lambda: run_one_shot(desc, model, x, data),
            "engine": lambda: run_engine(desc, model, x, data),
            "tracker_exact": lambda: run_tracker(desc, model, x, data, 1.0),
            "tracker_default": lambda: run_tracker(desc, model, x, data, None),
            "accum": lambda: run_tracker(desc, model, x, data, 1.0, accum=True),
        }
        record["modes"] = {}
        for mode in MODES:
            if mode in modes:
                model.zero_grad()
                record["modes"][mode] = runs[mode]()
    record["t"] = round(time.time() - start, 2)
    return record


def findings(record):
    return [
        (mode, res["cls"], res.get("re"))
        for mode, res in record.get("modes", {}).items()
        if res["cls"] in FINDINGS
    ]


def describe(record):
    desc = record.get("desc", {})
    terms = "; ".join(
        f"{t['base']}/{t['red']}*{t['factor']}({t['a']})@{t['on']}" for t in desc.get("terms", [])
    )
    return (
        f"seed {record['seed']}: declared={desc.get('declared')} n={desc.get('n')} "
        f"combine={desc.get('combine')} terms=[{terms}] model={desc.get('model')}"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0:100")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--jsonl")
    parser.add_argument("--override", help="JSON dict replacing entries of the loss's description")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    modes = tuple(args.modes.split(","))
    override = json.loads(args.override) if args.override else None
    start = time.time()
    seeds = fuzz_runner._seeds(args.seeds)
    table, found, invalid = fuzz_runner.run_seeds(
        seeds,
        lambda seed: check_seed(seed, modes, override),
        args.jsonl,
        args.verbose,
        line=describe,
        find=findings,
    )
    fuzz_runner.print_class_table(table, [m for m in MODES if m in table])
    print(f"\n{len(seeds)} seeds in {time.time() - start:.0f} s; {len(invalid)} invalid cases")
    if not found:
        print("no finding")
        return 0
    print(f"\n{len(found)} findings:")
    for record, mode, cls, re in found:
        error = f"relative error {re:.3g}" if re is not None else record["modes"][mode].get("exc")
        print(f"  {cls} in {mode}: {error}\n    {describe(record)}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
