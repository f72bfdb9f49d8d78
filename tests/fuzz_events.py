"""The events fuzzer: noisescale's numbers at each step of a run that changes between steps.

The runner's ``sgd_exact``/``sgd_sub`` modes (tests/fuzz_runner.py) take a few SGD steps on a
fixed model, loss and batch size. Real runs change things between steps, and the engine audits
its hooks' coverage only at some steps (the first, 2, 4, 8, ... and when a pass's structure
changes) and trusts what it learned in between. This mode draws a small model (a stem, two to
four blocks, a token head) and a run of 6-10 steps from a seed; before each step it applies 0-2
random *events* (:data:`EVENTS`, 37 kinds), and draws a fresh batch. The events are what users
do mid-run: freeze or unfreeze a parameter; switch an L2 penalty on or off or change its
coefficient (to and from 0); ``model.train()``/``eval()`` (dropout, BatchNorm) and a Dropout's p;
change the batch size (to 1, to T, to D), the number of accumulation micro-batches and how
their losses are divided (each micro-batch's mean over their count, or the step's sum over N),
the sequence length; switch gradient checkpointing of a block on or off (reentrant or not);
replace a parameter object; add a head, or a bare Parameter used directly (a logit scale);
resize the embedding table; swap the loss's reduction (sum and mean), label smoothing, ignored
tokens, a token mean over the step's tokens; ``zero_grad(set_to_none=False)``, or no
``zero_grad`` on a step; an optimizer step with weight decay; ``torch.no_grad()`` edits of a
parameter (``mul_``, ``copy_``, ``zero_``); a forward hook or pre-hook that rescales an
activation, on a block or on a leaf layer (``prepend`` or not); a second forward on the same
step (the batch in two chunks, or two views); an embedding's ``padding_idx`` or
``scale_grad_by_freq`` set, a convolution's padding mode or dilation changed, ``p.data``
assigned a copy, two layer scales or two Linear weights tied, a bias set to None; and, as the
README documents it as measured until the next audit, a forward that starts coupling the
examples (Manifold Mixup): a number there is ``doc-coupled``, not a finding. A loss term that
starts coupling them (``mix_loss``) is withheld at once since 2026-12-07: a number there is
``WRONG``.

Each step is compared with brute force recomputed at that step on the model as it now is: the
step's forward is run again with the same dropout seeds (the engine paused), and each example's
term of the backpropagated loss (its loss over N for a mean, its tokens over the step's tokens
for a token mean) is differentiated alone. Three variants replay the same run from the seed:

* ``ev_exact``: ``PerExampleNorms`` in exact mode, each pass's ``raw_sqnorms`` against each
  term's squared gradient norm, and its ``grad_sqnorm`` against the step's gradient;
* ``ev_sub``: sub-batch mode (``subbatches=2``), each sub-batch's sum against the truth;
* ``ev_tracker``: ``GradientNoiseTracker(per_example_fraction=1.0)``, each step's history record
  (``sqnorm_big`` and the per-example source's ``sqnorm_small``) against the truth, where the
  step's loss is the example mean or sum the tracker was told (else only crashes count).

A step is ``exact``, ``withheld`` (with the engine's reason), ``skipped`` or ``unchecked`` (a
tracker step), ``none`` (sub-batch mode with nothing to split), ``refused`` (the first rule at
work: the run goes on with a new engine, as the messages advise), or ``WRONG``; a raw error from
inside noisescale ends the run (``crash``; one from torch's own checks in the world's forward,
a BatchNorm in training on one value a channel, is ``invalid``). A number returned by the pass
whose backward holds an active penalty on a trainable parameter, or while BatchNorm in train
mode mixes the examples, is ``WRONG`` too (both are documented as refused: there is no
per-example truth to match). A variant's class is ``WRONG-SILENT`` (a wrong step, no warning of
the run before it with the runner's words), ``wrong-warned``, ``crash``, ``SHAPE``, else its
steps' classes joined (``exact+refused``).

Run it from the repository root::

    python tests/fuzz_events.py --seeds 0:200 -v

The same table and list of findings as the runner; ``--seeds 17 -v`` replays one seed and prints
its events and each step's result. tests/test_fuzz_models.py runs a list of seeds through
:func:`check_events_seed`.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import random
import sys
import time
import traceback
import warnings

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

import noisescale
from fuzz_runner import (
    REFUSALS,
    WITHHOLD_WORDS,
    _groups,
    _seeds,
    count_classes,
    float64_default,
    print_class_table,
    relerr,
)
from noisescale.per_example import PerExampleNorms

RTOL = 1e-7
VARIANTS = ("ev_exact", "ev_sub", "ev_tracker")
FINDINGS = ("WRONG-SILENT", "wrong-warned", "crash", "SHAPE")
BLOCK_KINDS = ("linear", "layernorm", "dropout", "batchnorm", "conv", "scale", "gru")


# --- the model --------------------------------------------------------------------------------


class Block(nn.Module):
    """One op on h: [N, T, D] -> [N, T, D]."""

    def __init__(self, kind, d):
        super().__init__()
        self.kind = kind
        if kind == "linear":
            self.m = nn.Linear(d, d)
        elif kind == "layernorm":
            self.m = nn.LayerNorm(d)
        elif kind == "dropout":
            self.m = nn.Linear(d, d, bias=False)
            self.drop = nn.Dropout(0.3)
        elif kind == "batchnorm":
            self.m = nn.BatchNorm1d(d)
        elif kind == "conv":
            self.m = nn.Conv1d(d, d, 3, padding=1)
        elif kind == "scale":
            self.g = nn.Parameter(1 + 0.2 * torch.randn(d))
        elif kind == "gru":
            self.m = nn.GRU(d, d, batch_first=True)

    def forward(self, h):
        k = self.kind
        if k == "linear":
            return torch.tanh(self.m(h))
        if k == "layernorm":
            return self.m(h)
        if k == "dropout":
            return self.drop(self.m(h))
        if k in ("batchnorm", "conv"):
            return self.m(h.transpose(1, 2)).transpose(1, 2)
        if k == "scale":
            return h * self.g
        return self.m(h)[0]


class EventModel(nn.Module):
    """A stem (Embedding on tokens or Linear on features), blocks, a token head; blocks may be
    checkpointed and heads added (``extra``) by events."""

    def __init__(self, tokens, vocab, din, d, kinds, classes):
        super().__init__()
        self.stem = nn.Embedding(vocab, d) if tokens else nn.Linear(din, d)
        self.blocks = nn.ModuleList(Block(k, d) for k in kinds)
        self.head = nn.Linear(d, classes)
        self.extra = nn.ModuleList()
        self.ckpt = {}  # block index -> use_reentrant

    def forward(self, x):
        h = self.stem(x)
        for i, b in enumerate(self.blocks):
            if i in self.ckpt and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(b, h, use_reentrant=self.ckpt[i])
            else:
                h = b(h)
            if i == 0 and getattr(self, "mixup", 0.0):  # Manifold Mixup with the next example
                h = (1 - self.mixup) * h + self.mixup * h.roll(1, 0)
        out = self.head(h)
        for e in self.extra:
            out = out + e(h)
        if hasattr(self, "scale"):  # a learnable logit scale added mid-run, used directly
            out = out * self.scale
        return out


# --- the world: a model, its loss and its knobs ----------------------------------------------


class World:
    """The model, its training loss's settings and the step's batch, as the events leave them."""

    def __init__(self, seed):
        r = random.Random(seed)
        self.r = r
        torch.manual_seed(seed)
        self.tokens = r.random() < 0.5
        self.vocab = r.choice([5, 7])
        self.din = 3
        self.d = r.choice([3, 4, 6])
        self.t = r.choice([2, 3, 4])
        self.classes = r.choice([2, 3])
        kinds = [r.choice(BLOCK_KINDS) for _ in range(r.choice([2, 3, 4]))]
        self.model = EventModel(self.tokens, self.vocab, self.din, self.d, kinds, self.classes)
        self.model.train(r.random() < 0.5)
        self.n = r.choice([3, 4, 5, 6])
        self.micro = 1
        self.accum = "mean_k"
        self.reduction = r.choice(["mean", "mean", "sum"])
        self.token_mean = False
        self.smoothing = 0.0
        self.ignore = 0.0
        self.penalty = None  # (parameter index, coefficient)
        self.mix_loss = 0.0  # a term that couples the examples: λ·|the batch's mean output|²
        self.skip_zero = False  # (one step: its backward accumulates on the last step's .grad)
        self.set_to_none = True
        self.chunked = False
        self.views = False
        self.hooks = []
        self.optimizer = None
        self.data = torch.Generator().manual_seed(seed + 1)
        self.last_out = None

    def params(self):
        return list(self.model.parameters())

    def batch(self):
        """A fresh batch: inputs, labels (-100 for ignored tokens)."""
        g, n, t = self.data, self.n, self.t
        if self.tokens:
            x = torch.randint(0, self.vocab, (n, t), generator=g)
        else:
            x = torch.randn(n, t, self.din, generator=g)
        y = torch.randint(0, self.classes, (n, t), generator=g)
        if self.ignore:
            drop = torch.rand(n, t, generator=g) < self.ignore
            drop[:, 0] = False  # each example keeps a token
            y[drop] = -100
        return x, y

    def weight(self, idx):
        """The weight of each example's loss of the micro-batch `idx` in the step's loss: 1 for
        a sum; for a mean, 1/(its micro-batch's size × their count) as a user divides each
        micro-batch's mean by the accumulation (``mean_k``), or 1/N (``sum_n``)."""
        if self.reduction == "sum":
            return 1.0
        if self.accum == "mean_k":
            return 1.0 / ((idx.stop - idx.start) * len(self.micro_slices()))
        return 1.0 / self.n

    def micro_slices(self):
        k = min(self.micro, self.n)
        bounds = [round(j * self.n / k) for j in range(k + 1)]
        return [slice(a, b) for a, b in itertools.pairwise(bounds) if b > a]

    def _token_losses(self, x, y):
        """[n, T] token losses, a second forward where the events asked for one."""
        if self.chunked and len(x) > 1:
            h = len(x) // 2
            o = torch.cat([self.model(x[:h]), self.model(x[h:])])
        else:
            o = self.model(x)
        self.last_out = o
        return F.cross_entropy(
            o.transpose(1, 2), y, reduction="none", label_smoothing=self.smoothing
        )

    def terms(self, x, y, idx, seed, rows=False):
        """Each example's term of the backpropagated loss for the micro-batch `idx` (their sum is
        what ``backward`` is called on, the penalty aside); ``rows``: each view's term apart."""
        torch.manual_seed(seed)  # the same dropout masks for the truth and the engine
        xs, ys = x[idx], y[idx]
        valid = (ys != -100).to(torch.float64)
        parts = [self._token_losses(xs, ys) * valid]
        if self.views:
            view = xs.flip(1) if self.tokens else xs * 0.5
            parts.append(0.5 * self._token_losses(view, ys) * valid)
        if self.token_mean:
            total = float((y != -100).sum())
            parts = [p.sum(1) / total for p in parts]
        else:
            parts = [p.sum(1) / valid.sum(1) * self.weight(idx) for p in parts]
        return torch.cat(parts) if rows else sum(parts)

    def step_loss(self, x, y, idx, seed):
        """The micro-batch `idx`'s loss as a user writes it (a mean over the batch, a token mean
        through ``F.cross_entropy``'s own mean); the same number as :meth:`terms`' sum."""
        if not self.token_mean or self.views:
            terms = self.terms(x, y, idx, seed, rows=False)
            if self.token_mean or self.reduction == "sum":
                return terms.sum()
            losses = terms / self.weight(idx)
            if self.accum == "mean_k":
                return losses.mean() / len(self.micro_slices())
            return losses.sum() / self.n
        torch.manual_seed(seed)
        xs, ys = x[idx], y[idx]
        if self.chunked and len(xs) > 1:
            h = len(xs) // 2
            o = torch.cat([self.model(xs[:h]), self.model(xs[h:])])
        else:
            o = self.model(xs)
        self.last_out = o
        whole = len(xs) == self.n
        loss = F.cross_entropy(
            o.flatten(0, 1),
            ys.flatten(),
            label_smoothing=self.smoothing,
            reduction="mean" if whole else "sum",
        )
        return loss if whole else loss / float((y != -100).sum())

    def penalty_term(self):
        if self.penalty is None:
            return None
        i, lam = self.penalty
        params = self.params()
        if i >= len(params):
            return None
        return lam * params[i].pow(2).sum()

    def penalised(self):
        """Whether an active penalty reads a trainable parameter (refused as documented)."""
        if self.penalty is None:
            return False
        i, lam = self.penalty
        params = self.params()
        return lam != 0 and i < len(params) and params[i].requires_grad

    def mixing(self):
        """A BatchNorm in training, an embedding's gradient scaled by the batch's frequencies:
        documented as refused (no per-example gradient)."""
        if self.tokens and self.model.stem.scale_grad_by_freq:
            return True
        return self.model.training and any(b.kind == "batchnorm" for b in self.model.blocks)

    def coupled(self):
        """Whether the forward couples the examples in a way the README documents as measured
        until the next audit (Manifold Mixup through a warm-up): a number there is
        ``doc-coupled``, not a finding. (A loss that changes form between audits, ``mix_loss``,
        was documented so too until 2026-12-07; it is withheld at once since: a number under it
        is ``WRONG``.)"""
        return bool(getattr(self.model, "mixup", 0.0))


# --- the events -------------------------------------------------------------------------------


def _trainable(w):
    return [p for p in w.params() if p.requires_grad]


def ev_freeze(w, r):
    ps = _trainable(w)
    if len(ps) > 1:
        i = r.randrange(len(ps))
        ps[i].requires_grad_(False)
        return f"freeze #{i} of trainable"
    return None


def ev_unfreeze(w, r):
    ps = [p for p in w.params() if not p.requires_grad]
    if ps:
        r.choice(ps).requires_grad_(True)
        return "unfreeze one"
    return None


def ev_penalty(w, r):
    lam = r.choice([0.01, 1e-4, 0.0, 0.3])
    if w.penalty is None or r.random() < 0.4:
        w.penalty = (r.randrange(len(w.params())), lam)
        return f"penalty on #{w.penalty[0]} lam={lam}"
    w.penalty = (w.penalty[0], lam)
    return f"penalty coefficient {lam}"


def ev_penalty_off(w, r):
    if w.penalty is None:
        return None
    w.penalty = None
    return "penalty off"


def ev_train(w, r):
    w.model.train()
    return "train()"


def ev_eval(w, r):
    w.model.eval()
    return "eval()"


def ev_batch(w, r):
    w.n = r.choice([1, w.t, w.d, 2, 3, 5, 7])
    return f"N={w.n}"


def ev_micro(w, r):
    w.micro = r.choice([1, 2, 3])
    return f"micro={w.micro}"


def ev_accum(w, r):
    w.accum = "sum_n" if w.accum == "mean_k" else "mean_k"
    return f"accumulation as {w.accum}"


def ev_leaf_hook(w, r):
    leaves = [
        m
        for m in w.model.modules()
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Embedding, nn.LayerNorm))
        and m is not w.model.stem
    ]
    m = r.choice(leaves)
    prepend = r.random() < 0.5
    if r.random() < 0.5:
        w.hooks.append(m.register_forward_hook(lambda m, a, out: out * 1.5, prepend=prepend))
        return f"forward hook on {type(m).__name__} prepend={prepend}"
    w.hooks.append(m.register_forward_pre_hook(lambda m, a: (a[0] * 0.7,), prepend=prepend))
    return f"pre-hook on {type(m).__name__} prepend={prepend}"


def ev_bare_param(w, r):
    if hasattr(w.model, "scale"):
        del w.model.scale
        return "logit scale removed"
    w.model.scale = nn.Parameter(torch.tensor(r.choice([2.0, 0.5])))
    return "logit scale added (a bare Parameter)"


def ev_mixup(w, r):
    w.model.mixup = r.choice([0.0, 0.2]) if getattr(w.model, "mixup", 0.0) == 0 else 0.0
    return f"mixup={w.model.mixup}"


def ev_mix_loss(w, r):
    w.mix_loss = r.choice([0.0, 0.5]) if w.mix_loss == 0 else 0.0
    return f"mix_loss={w.mix_loss}"


def ev_skip_zero(w, r):
    w.skip_zero = True
    return "no zero_grad this step"


def ev_dropout_p(w, r):
    drops = [m for m in w.model.modules() if isinstance(m, nn.Dropout)]
    if not drops:
        return None
    p = r.choice([0.0, 0.3, 0.6])
    for m in drops:
        m.p = p
    return f"dropout p={p}"


def ev_padding_idx(w, r):
    if not w.tokens:
        return None
    w.model.stem.padding_idx = None if w.model.stem.padding_idx is not None else r.choice([0, 1])
    return f"embedding padding_idx={w.model.stem.padding_idx}"


def ev_grad_by_freq(w, r):
    if not w.tokens:
        return None
    w.model.stem.scale_grad_by_freq = not w.model.stem.scale_grad_by_freq
    return f"scale_grad_by_freq={w.model.stem.scale_grad_by_freq}"


def _convs(w):
    return [m for m in w.model.modules() if isinstance(m, nn.Conv1d)]


def ev_conv_pad(w, r):
    convs = _convs(w)
    if not convs:
        return None
    m = r.choice(convs)
    m.padding_mode = r.choice(["zeros", "circular", "replicate", "reflect"])
    if m.padding_mode == "reflect" and w.t < 2:
        m.padding_mode = "zeros"
    return f"conv padding_mode={m.padding_mode}"


def ev_conv_dil(w, r):
    convs = _convs(w)
    if not convs:
        return None
    m = r.choice(convs)
    d = 1 if m.dilation[0] == 2 else 2
    m.dilation, m.padding = (d,), (d,)
    return f"conv dilation={d}"


def ev_data_assign(w, r):
    ps = w.params()
    i = r.randrange(len(ps))
    ps[i].data = ps[i].data.clone() * 0.9  # (new storage, the same Parameter object)
    return f"p.data = a copy, #{i}"


def ev_tie(w, r):
    scales = [b for b in w.model.blocks if b.kind == "scale"]
    linears = [b.m for b in w.model.blocks if b.kind in ("linear", "dropout")]
    if len(scales) > 1:
        scales[1].g = scales[0].g
        return "scale blocks tied (one Parameter)"
    if len(linears) > 1:
        linears[1].weight = linears[0].weight
        return "Linear weights tied (one Parameter)"
    return None


def ev_drop_bias(w, r):
    mods = [m for m in w.model.modules() if isinstance(m, (nn.Linear, nn.Conv1d))]
    mods = [m for m in mods if m.bias is not None]
    if not mods:
        return None
    r.choice(mods).bias = None
    return "a bias set to None"


def ev_seq(w, r):
    w.t = r.choice([1, 2, 3, 5])
    return f"T={w.t}"


def ev_ckpt(w, r):
    i = r.randrange(len(w.model.blocks))
    if i in w.model.ckpt:
        del w.model.ckpt[i]
        return f"checkpoint off block {i}"
    w.model.ckpt[i] = r.random() < 0.3
    return f"checkpoint on block {i} reentrant={w.model.ckpt[i]}"


def ev_replace(w, r):
    mods = [m for m in w.model.modules() if isinstance(m, (nn.Linear, nn.Embedding, nn.Conv1d))]
    m = r.choice(mods)
    old = m.weight
    m.weight = nn.Parameter(old.detach().clone() * 0.9, requires_grad=old.requires_grad)
    return f"replace {type(m).__name__}.weight"


def ev_add_head(w, r):
    w.model.extra.append(nn.Linear(w.d, w.classes, bias=r.random() < 0.5))
    return "add head"


def ev_resize_emb(w, r):
    if not w.tokens:
        return None
    old = w.model.stem
    new = nn.Embedding(w.vocab + 2, w.d)
    with torch.no_grad():
        new.weight[: w.vocab] = old.weight
    w.model.stem = new
    w.vocab += 2
    return f"embedding resized to {w.vocab}"


def ev_reduction(w, r):
    w.reduction = "sum" if w.reduction == "mean" else "mean"
    return f"reduction={w.reduction}"


def ev_smoothing(w, r):
    w.smoothing = 0.1 if w.smoothing == 0 else 0.0
    return f"label_smoothing={w.smoothing}"


def ev_ignore(w, r):
    w.ignore = r.choice([0.0, 0.3, 0.6])
    return f"ignore={w.ignore}"


def ev_token_mean(w, r):
    w.token_mean = not w.token_mean
    return f"token_mean={w.token_mean}"


def ev_zero_grad(w, r):
    w.set_to_none = not w.set_to_none
    return f"set_to_none={w.set_to_none}"


def ev_opt_step(w, r):
    if w.optimizer is None:
        w.optimizer = torch.optim.SGD(w.params(), lr=0.05, momentum=0.9, weight_decay=0.1)
    if any(p.grad is not None for p in w.params()):
        w.optimizer.step()
        return "optimizer step (weight decay)"
    return None


def ev_edit(w, r):
    ps = w.params()
    i = r.randrange(len(ps))
    how = r.choice(["mul", "copy", "zero"])
    with torch.no_grad():
        if how == "mul":
            ps[i].mul_(0.5)
        elif how == "copy":
            ps[i].copy_(torch.randn_like(ps[i]))
        else:
            ps[i].zero_()
    return f"no_grad {how}_ #{i}"


def ev_hook(w, r):
    if w.hooks and r.random() < 0.5:
        w.hooks.pop(r.randrange(len(w.hooks))).remove()
        return "hook removed"
    i = r.randrange(len(w.model.blocks))
    b = w.model.blocks[i]
    if r.random() < 0.5:
        w.hooks.append(b.register_forward_hook(lambda m, a, out: out * 1.5))
        return f"forward hook on block {i}"
    w.hooks.append(b.register_forward_pre_hook(lambda m, a: (a[0] * 0.7,)))
    return f"pre-hook on block {i}"


def ev_chunked(w, r):
    w.chunked = not w.chunked
    return f"chunked={w.chunked}"


def ev_views(w, r):
    w.views = not w.views
    return f"views={w.views}"


EVENTS = {
    "freeze": ev_freeze,
    "unfreeze": ev_unfreeze,
    "penalty": ev_penalty,
    "penalty_off": ev_penalty_off,
    "train": ev_train,
    "eval": ev_eval,
    "batch": ev_batch,
    "micro": ev_micro,
    "seq": ev_seq,
    "accum": ev_accum,
    "leaf_hook": ev_leaf_hook,
    "bare_param": ev_bare_param,
    "mixup": ev_mixup,
    "mix_loss": ev_mix_loss,
    "skip_zero": ev_skip_zero,
    "dropout_p": ev_dropout_p,
    "padding_idx": ev_padding_idx,
    "grad_by_freq": ev_grad_by_freq,
    "conv_pad": ev_conv_pad,
    "conv_dil": ev_conv_dil,
    "data_assign": ev_data_assign,
    "tie": ev_tie,
    "drop_bias": ev_drop_bias,
    "ckpt": ev_ckpt,
    "replace": ev_replace,
    "add_head": ev_add_head,
    "resize_emb": ev_resize_emb,
    "reduction": ev_reduction,
    "smoothing": ev_smoothing,
    "ignore": ev_ignore,
    "token_mean": ev_token_mean,
    "zero_grad": ev_zero_grad,
    "opt_step": ev_opt_step,
    "edit": ev_edit,
    "hook": ev_hook,
    "chunked": ev_chunked,
    "views": ev_views,
}


# --- the truth --------------------------------------------------------------------------------


def truth(w, x, y, seeds, rows=False):
    """Each example's (each row's) term's gradient over the trainable parameters, and the
    whole step's gradient (the penalty's included), the micro-batches in order."""
    params = _trainable(w)
    out = []
    ckpt, w.model.ckpt = w.model.ckpt, {}  # (the same values; reentrant ones refuse .grad())
    try:
        for idx, seed in zip(w.micro_slices(), seeds, strict=True):
            out += _example_grads(w.terms(x, y, idx, seed, rows=rows), params)
    finally:
        w.model.ckpt = ckpt
    whole = [sum(g[t] for g in out) for t in range(len(params))] if out else []
    pen = w.penalty_term()
    if pen is not None and pen.requires_grad and params:
        grads = torch.autograd.grad(pen, params, allow_unused=True)
        whole = [a if g is None else a + g for a, g in zip(whole, grads, strict=True)]
    return out, whole


def _example_grads(terms, params):
    out = []
    for i in range(len(terms)):
        grads = torch.autograd.grad(terms[i], params, retain_graph=True, allow_unused=True)
        out.append(
            [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]
        )
    return out


def _sq(gs):
    return sum(g.pow(2).sum() for g in gs) if gs else torch.tensor(0.0)


# --- one run ----------------------------------------------------------------------------------


def plan(seed, steps):
    """The events before each step, drawn apart from the world's draws."""
    r = random.Random(seed * 7919 + 3)
    names = list(EVENTS)  # (in the table's order: a new event goes last, and moves old seeds)
    return [
        [r.choice(names) for _ in range(r.choice([0, 1, 1, 2]) if s else 0)] for s in range(steps)
    ]


def _warned(caught):
    return any(w in str(c.message).lower() for c in caught for w in WITHHOLD_WORDS)


def _compare_pass(pass_, grads, sub, step_w, first=True):
    if pass_.raw_sqnorms is None:
        return {
            "cls": "withheld" if pass_.withheld else "none",
            "why": (pass_.withheld or "")[:160],
        }
    penalised = first and step_w.penalised()  # (the penalty is in the first micro-batch's loss)
    if step_w.coupled():
        return {"cls": "doc-coupled"}
    if step_w.mix_loss and pass_.batch_size == 1:
        # (a one-example micro-batch's mean output is its own: its term is that example's, and
        # the oracle's terms leave it out)
        return {"cls": "unchecked"}
    if penalised or step_w.mixing() or step_w.mix_loss:
        why = (
            "penalty"
            if penalised
            else "a loss term coupling the examples"
            if step_w.mix_loss
            else "BatchNorm in training or scale_grad_by_freq"
        )
        return {"cls": "WRONG", "re": float("inf"), "why": f"a number under {why}"}
    if sub and pass_.subbatches is not None:
        members = _groups(pass_.subbatches)
        if max(max(m) for m in members) >= len(grads):
            return {"cls": "SHAPE", "len": pass_.raw_sqnorms.numel()}
        want = torch.stack([_sq([sum(grads[i][t] for i in m) for t in range(len(grads[0]))])
                            for m in members])  # fmt: skip
    else:
        want = torch.stack([_sq(g) for g in grads])
    if pass_.rows is not None:
        if pass_.row_weights is None:
            return {"cls": "rows"}
        want = want[pass_.rows] * pass_.row_weights
    if pass_.raw_sqnorms.numel() != want.numel():
        return {"cls": "SHAPE", "len": pass_.raw_sqnorms.numel(), "want": want.numel()}
    re = relerr(pass_.raw_sqnorms, want)
    out = {"cls": "exact" if re < RTOL else "WRONG", "re": re}
    if re >= RTOL:
        out["got"], out["want"] = pass_.raw_sqnorms.tolist()[:8], want.tolist()[:8]
    return out


def _compare_history(history, truths, told):
    """The tracker's records against each step's truth: ``sqnorm_big`` is the step's mean
    gradient's squared norm, the per-example source's ``sqnorm_small`` the mean of the
    examples' squared norms (each example's gradient: its term over its weight in the loss)."""
    by_step = {rec["step"]: rec for rec in history}
    out = []
    for s, t in enumerate(truths, start=1):
        rec = by_step.get(s)
        if rec is None or rec["skipped"]:
            out.append({"cls": "skipped"})
            continue
        if t is None:
            out.append({"cls": "unchecked"})
            continue
        n, big, each = t
        want_big = big / (1.0 if told == "mean" else n * n)
        want_small = sum(each) / n
        src = rec["sources"].get("per_example")
        got, want = [rec["sqnorm_big"]], [want_big]
        if src is not None:  # (none: the step's per-example norms withheld, |G|² still read)
            got.append(src["sqnorm_small"])
            want.append(want_small)
        re = relerr(torch.tensor(got), torch.tensor(want))
        step = {"cls": "exact" if re < RTOL else "WRONG", "re": re}
        if re >= RTOL:
            step["got"], step["want"] = got, want
        out.append(step)
    return out


def _open(w, variant):
    if variant == "ev_tracker":
        return noisescale.GradientNoiseTracker(
            w.model, loss_reduction=w.reduction, per_example_fraction=1.0
        )
    return PerExampleNorms(w.model, subbatches=2 if variant == "ev_sub" else 0)


def _engine_step(w, engine, grads, rows, whole, sub):
    """The step's passes against the truth: the worst pass's result."""
    collected = engine.collect()
    off, results = 0, []
    for p in collected:
        if w.views:  # two forwards of the micro-batch under one backward: its rows, in order
            g = rows[off : off + p.batch_size]
            by_rows = sub and p.subbatches is not None  # (sub-batches of rows)
            if (
                p.raw_sqnorms is not None
                and p.raw_sqnorms.numel() * 2 == p.batch_size
                and not by_rows
            ):
                g = grads[off // 2 : (off + p.batch_size) // 2]
        else:
            g = grads[off : off + p.batch_size]
        results.append(_compare_pass(p, g, sub, w, first=off == 0))
        off += p.batch_size
    if off != len(grads) * (2 if w.views else 1):
        results.append({"cls": "SHAPE", "examples": off, "want": len(grads)})
    kinds = [q["cls"] for q in results]
    for k in ("WRONG", "SHAPE", "rows", "none", "withheld"):
        if k in kinds:
            return dict(results[kinds.index(k)])
    gsq = collected[0].grad_sqnorm if len(collected) == 1 else None
    if gsq is not None and whole is not None:  # (None: .grad not zeroed before the step)
        gre = relerr(gsq.reshape(1), _sq(whole).reshape(1))
        if gre > RTOL:
            return {"cls": "WRONG", "re": gre, "why": "grad_sqnorm"}
    return {"cls": "exact"}


def _close(engine, variant, truths, start):
    """Remove `engine`; a tracker's steps since `start` compared with their truths."""
    out = []
    if variant == "ev_tracker":
        out = _compare_history(engine.history, truths[start:], engine_told(engine))
    with contextlib.suppress(Exception):
        engine.remove()
    return out


def engine_told(tracker):
    return tracker._events_told


def run_variant(seed, variant, steps=None, events=None):
    """One variant's run of `seed`: ``{"cls", "steps": [...], "events": [...]}``. A refusal is
    that step's result, and the run goes on with a new engine (as the messages advise)."""
    w = World(seed)
    steps = steps or random.Random(seed).choice([6, 8, 10])
    events = events or plan(seed, steps)  # (a replay may name its own: [[event, ...], ...])
    steps = len(events)
    sub = variant == "ev_sub"
    res = {"steps": [], "events": []}
    truths, tracked, start, warned_at, engine = [], [], 0, None, None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            for s in range(steps):
                er = random.Random(seed * 31 + s)
                done = [d for d in (EVENTS[e](w, er) for e in events[s]) if d]
                res["events"].append(done)
                if engine is None:
                    try:
                        engine = _open(w, variant)
                    except REFUSALS as err:  # (refused at construction: try again next step)
                        exc = f"{type(err).__name__}: {str(err)[:300]}"
                        res["steps"].append({"cls": "refused", "exc": exc})
                        truths.append(None)
                        continue
                    engine._events_told = w.reduction
                    start = s
                x, y = w.batch()
                seeds = [1000 * s + j for j in range(len(w.micro_slices()))]
                with engine.paused():
                    grads, whole = truth(w, x, y, seeds)
                    rows = truth(w, x, y, seeds, rows=True)[0] if w.views else None
                clean = not (w.token_mean or w.views or w.penalised() or w.mixing())
                clean = clean and not (w.coupled() or w.skip_zero)
                sizes = {i.stop - i.start for i in w.micro_slices()}
                if w.accum == "sum_n" and len(sizes) > 1 and w.reduction == "mean":
                    clean = False  # (documented: warned of, taken as each micro-batch's mean)
                weights = [w.weight(i) for i in w.micro_slices() for _ in range(i.stop - i.start)]
                truths.append(
                    (
                        w.n,
                        float(_sq(whole)),
                        [float(_sq(g)) / v**2 for g, v in zip(grads, weights, strict=True)],
                    )
                    if clean and w.reduction == engine._events_told
                    else None
                )
                try:
                    stale = w.skip_zero
                    if not stale:
                        w.model.zero_grad(set_to_none=w.set_to_none)
                    w.skip_zero = False
                    for idx, sd in zip(w.micro_slices(), seeds, strict=True):
                        loss = w.step_loss(x, y, idx, sd)
                        pen = w.penalty_term()
                        if pen is not None and idx.start == 0:
                            loss = loss + pen
                        if w.mix_loss:  # the batch's mean output: couples the examples
                            loss = loss + w.mix_loss * w.last_out.mean((0, 1)).pow(2).sum()
                        loss.backward()
                    if variant == "ev_tracker":
                        engine.step()
                        step = {"cls": "stepped"}
                    else:
                        step = _engine_step(w, engine, grads, rows, None if stale else whole, sub)
                except REFUSALS as err:
                    step = {"cls": "refused", "exc": f"{type(err).__name__}: {str(err)[:300]}"}
                    tracked += _close(engine, variant, truths, start)
                    engine = None
                if warned_at is None and _warned(caught):
                    warned_at = s
                res["steps"].append(step)
            if engine is not None:
                tracked += _close(engine, variant, truths, start)
        except Exception as err:
            res["exc"] = f"{type(err).__name__}: {str(err)[:300]}"
            res["at"] = len(res["steps"])
            res["tb"] = traceback.format_exc()[-1500:]
            # a raw error from inside noisescale, or the world's own (torch's BatchNorm on one
            # value a channel in training): the run is invalid from there on
            res["inside"] = "noisescale" in "".join(
                f.filename for f in traceback.extract_tb(err.__traceback__)[1:]
            )
            with contextlib.suppress(Exception):
                engine.remove()
    if variant == "ev_tracker":
        refused = [s for s in res["steps"] if s["cls"] == "refused"]
        res["steps"] = tracked + refused
    res["warn"] = [str(c.message)[:200] for c in caught][:4]
    res["warned_at"] = warned_at
    kinds = [s["cls"] for s in res["steps"]]
    if "WRONG" in kinds:
        first = kinds.index("WRONG")
        res["re"] = max(s.get("re", 0) for s in res["steps"] if s["cls"] == "WRONG")
        silent = warned_at is None or warned_at > first
        res["cls"] = "WRONG-SILENT" if silent else "wrong-warned"
    elif "exc" in res:
        res["cls"] = "crash" if res["inside"] else "invalid"
    elif "SHAPE" in kinds:
        res["cls"] = "SHAPE"
    else:
        res["cls"] = "+".join(sorted(set(kinds)))
    return res


# --- one seed, the long run -------------------------------------------------------------------


def check_events_seed(seed, variants=VARIANTS, events=None):
    """Each variant's run of `seed`: ``{"seed", "variants": {variant: result}}``; `events`
    (``[[name, ...] per step]``) replaces the seed's drawn plan (the world, its data and each
    event's own draws stay the seed's)."""
    record = {"seed": seed, "variants": {}}
    start = time.time()
    with float64_default():
        for v in variants:
            record["variants"][v] = run_variant(seed, v, events=events)
    record["t"] = round(time.time() - start, 2)
    return record


def findings(record):
    """``[(variant, class, relative error)]`` for each variant with a finding."""
    return [
        (v, res["cls"], res.get("re"))
        for v, res in record["variants"].items()
        if res["cls"] in FINDINGS
    ]


def describe(record, variant=None):
    """The seed's events, step by step (those of `variant`'s run, or the first's)."""
    res = record["variants"][variant or next(iter(record["variants"]))]
    events = "; ".join(f"{s}:{','.join(e)}" for s, e in enumerate(res["events"]) if e)
    return f"seed {record['seed']}: events {events or 'none'}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0:100", help="A:B (a range), or seeds A,B,C")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--jsonl", help="append each seed's full record to this file")
    parser.add_argument("-v", "--verbose", action="store_true", help="each step's result")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    variants = tuple(args.variants.split(","))
    out = open(args.jsonl, "a") if args.jsonl else None  # noqa: SIM115
    table: dict[str, dict[str, int]] = {}
    found, start = [], time.time()
    try:
        for seed in _seeds(args.seeds):
            record = check_events_seed(seed, variants)
            if out:
                out.write(json.dumps(record, default=str) + "\n")
                out.flush()
            count_classes(table, record["variants"])
            found += [(record, v, cls, re) for v, cls, re in findings(record)]
            if args.verbose:
                print(describe(record), f"({record['t']} s)")
                for v, res in record["variants"].items():
                    steps = " ".join(s["cls"] for s in res["steps"])
                    print(f"  {v:10s} {res['cls']:20s} {steps} {res.get('exc', '')[:200]}")
    finally:
        if out:
            out.close()
    print_class_table(table, list(table), column_width=12)
    print(f"\n{len(_seeds(args.seeds))} seeds in {time.time() - start:.0f} s")
    if not found:
        print("no finding")
        return 0
    print(f"\n{len(found)} findings:")
    for record, v, cls, re in found:
        res = record["variants"][v]
        error = f"relative error {re:.3g}" if re is not None else res.get("exc", "")
        print(f"  {cls} in {v}: {error}\n    {describe(record, v)}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
