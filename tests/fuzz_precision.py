"""Precision, loss scaling and compilation, at random: the fuzzer's numeric set-ups.

Each seed draws a model, data and loss from tests/fuzz_grammar.py — built in float32, torch's
default, not the other fuzzers' float64 — and a numeric set-up of its own (:func:`draw_setup`,
from a generator of its own): float32; bf16 or float16 autocast; the model cast wholly to bf16
or float16 (its float inputs cast by a wrapper, :class:`Cast`); bf16 parameters under bf16
autocast; one block cast to bf16, or a float32 head on a bf16 model, under autocast; the loss
computed from ``logits.float()`` or in the output's own dtype; ``torch.compile`` with the
``eager`` or ``aot_eager`` backend (on about one seed in five); and for the tracker a
``torch.amp.GradScaler`` told to it (``scaler=``) or not, its scale growing every step or
seldom, a step whose scale is set to infinity on purpose (the scaler finds inf/NaN gradients
and skips it), ``scaler.unscale_`` before ``tracker.step()`` and a clip after it, two
micro-batches under the scaler, or a loss scaled by hand (``loss * 1024``, told to no one).

The truth is brute force of the SAME numeric set-up: one backward per example, under the same
autocast and casts, the loss multiplied by the step's loss scale and the gradient divided by it
again in float64 (powers of two: exact where nothing overflows), the norms summed in float64.
It is compared at a tolerance that the dtype sets (:data:`TOLERANCE`: float32 1e-4; under
16-bit autocast 3e-2; parameters stored in 16 bits 6e-2 — an order of magnitude above the
rounding the docs state, 0.05% and 0.2-0.7%), so that what is found is far beyond rounding: a
factor of the scale, a skipped step measured, a step measured on a gradient the scaler threw
away, a stale step after a recompile, a unit read in the wrong dtype.

The modes:

* ``one_shot``: ``noisescale.per_example_sqnorms`` around one backward (eager);
* ``engine``, ``sub``: ``PerExampleNorms`` exact and with ``subbatches=2``, 3 SGD steps on a copy
  of the model (compiled where the seed compiles), the truth recomputed every step;
* ``tracker``: ``GradientNoiseTracker`` (every example or 2 sub-batches; ``beta=1``, one
  source) for 5 steps of SGD or Adam through the scaler (where drawn): each history record's
  |G_big|² and small-batch norms against brute force on the passes the tracker used
  (tests/fuzz_tracker.py's ``step_truth``), ``skipped`` against whether the scaler found a
  non-finite gradient (the optimizer did not step), and ``estimate().steps`` against the
  records not skipped. A scaler not told to the tracker, or a loss scaled by hand, must be
  refused or read the scale's factor with a warning.

Classes as the runner's (``exact`` here means within the dtype's tolerance), plus ``SKIP`` (a
step the scaler skipped recorded as measured, or a measured one recorded as skipped) among the
findings. Run from the repository root::

    python tests/fuzz_precision.py --seeds 0:100
    python tests/fuzz_precision.py --seeds 17 -v --override '{"numeric": "fp32"}'
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import random
import sys
import time
import warnings

import torch
from torch import nn

import fuzz_grammar
import fuzz_runner
import fuzz_tracker
import noisescale
from noisescale.per_example import PerExampleNorms

# relative tolerance of each numeric set-up (see the module's docstring)
TOLERANCE = {
    "fp32": 1e-4,
    "autocast_bf16": 3e-2,
    "autocast_fp16": 3e-2,
    "block_bf16": 3e-2,
    "model_bf16": 6e-2,
    "model_fp16": 6e-2,
    "model_bf16_autocast": 6e-2,
    "head_fp32": 6e-2,
}
NUMERIC = tuple(TOLERANCE)
MODES = ("one_shot", "engine", "sub", "tracker")
FINDINGS = (*fuzz_runner.FINDINGS, "SKIP")


# --- the set-up -------------------------------------------------------------------------------


def draw_setup(seed):
    """The numeric set-up of `seed`, from a generator of its own."""
    r = random.Random(f"precision-{seed}")
    setup = {
        "numeric": r.choice(
            [
                "fp32",
                "fp32",
                "autocast_bf16",
                "autocast_bf16",
                "autocast_fp16",
                "model_bf16",
                "model_fp16",
                "model_bf16_autocast",
                "block_bf16",
                "head_fp32",
            ]
        ),
        "logits_float": r.random() < 0.4,
        "compile": r.choice([None] * 8 + ["eager", "aot_eager"]),
        "scaler": r.choice([None, "told", "told", "told", "untold", "hand"]),
        "init_scale": 2.0 ** r.choice([0, 4, 10, 16]),
        "growth_interval": r.choice([1, 2, 1000]),
        "inf_step": r.choice([None, 2, 3, 4]),
        "unscale": r.random() < 0.5,
        "clip": r.random() < 0.3,
        "accum": r.choice([1, 1, 2]),
        "source": r.choice(["exact", "subbatch"]),
        "optimizer": r.choice(["sgd", "adam"]),
        # drawn after the first version's draws, which keep their seeds' values
        # tracker.step() before scaler.step (the docs' order) or after scaler.update()
        "order": r.choice(["before", "before", "after_update"]),
        "measure_every": r.choice([1, 1, 2]),
        # a step on one example fewer (a compiled model recompiles, or runs dynamic shapes)
        "shrink_step": r.choice([None, None, 3, 4]),
        "scaler_disabled": r.random() < 0.1,  # GradScaler(enabled=False) told to the tracker
        "channels_last": r.random() < 0.5,  # (a Conv2d stem's weights and input)
        # precondition= the Adam optimizer (from its first step): P read from its state, which
        # a step the scaler skips leaves as it was
        "precondition": r.random() < 0.5,
        # a scale a long run reached (it doubles for ever where nothing overflows: bf16, float32),
        # below the tracker's 2^64 guard
        "huge_scale": r.random() < 0.15,
    }
    if setup["huge_scale"]:
        setup["init_scale"] = 2.0 ** r.choice([56, 58, 60, 62])
        setup["growth_interval"] = 1000
    return setup


def _autocast_dtype(numeric):
    if numeric == "autocast_fp16":
        return torch.float16
    if numeric in ("autocast_bf16", "block_bf16", "model_bf16_autocast", "head_fp32"):
        return torch.bfloat16
    return None


def numeric_context(setup):
    """The autocast of the set-up (a fresh context manager), or none."""
    dtype = _autocast_dtype(setup["numeric"])
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=dtype)


class Cast(nn.Module):
    """The grammar's model, its float inputs cast to its parameters' dtype and its output to
    float32 where asked (``logits.float()``); the grammar's loss reads ``_aux`` and
    ``log_var`` from the model it is given."""

    def __init__(self, inner, dtype, out_float, channels_last=False):
        super().__init__()
        self.inner = inner
        self.in_dtype = dtype
        self.out_float = out_float
        self.channels_last = channels_last

    @property
    def _aux(self):
        aux = self.inner._aux
        return aux.float() if self.out_float else aux

    @property
    def log_var(self):
        return self.inner.log_var

    def forward(self, x):
        if self.in_dtype is not None and x.is_floating_point():
            x = x.to(self.in_dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = self.inner(x)
        return out.float() if self.out_float else out


def make_case(seed, override=None):
    """(spec, setup, model, per_example_loss): the grammar's case in float32, wrapped and cast
    as the set-up says. Raises ``ValueError`` for a case this fuzzer leaves out."""
    setup = draw_setup(seed)
    if override:
        setup.update({k: v for k, v in override.items() if k in setup})
        override = {k: v for k, v in override.items() if k not in setup} or None
    # two views count 2N rows; blocks that mix the examples have a truth within the batch
    override = {"lossform": "plain", **(override or {})}
    spec, inner, x, per_example_loss0 = fuzz_grammar.make_case(seed, override=override)
    if spec.get("mixing") or "regroup" in spec["blocks"]:
        raise ValueError("a block that mixes the examples or depends on the batch's size")
    numeric = setup["numeric"]
    in_dtype = None
    if numeric in ("model_bf16", "model_bf16_autocast", "head_fp32"):
        inner.to(torch.bfloat16)
        in_dtype = torch.bfloat16
    elif numeric == "model_fp16":
        inner.to(torch.float16)
        in_dtype = torch.float16
    elif numeric == "block_bf16":
        r = random.Random(f"precision-block-{seed}")
        inner.blocks[r.randrange(len(inner.blocks))].to(torch.bfloat16)
    if numeric == "head_fp32":
        if not hasattr(inner, "head"):
            raise ValueError("no head of its own (tied)")
        inner.head.float()
    channels_last = setup["channels_last"] and spec["stem"] == "conv2d"
    if channels_last:
        inner.stem.to(memory_format=torch.channels_last)
    model = Cast(inner, in_dtype, setup["logits_float"], channels_last)

    def per_example_loss(model, idx):
        with numeric_context(setup):
            losses = per_example_loss0(model, idx)
        return losses.float()

    if numeric == "model_fp16" and setup["scaler"] in ("told", "untold"):
        setup["scaler"] = None  # (GradScaler refuses to unscale float16 gradients: torch's rule)
    per_example_loss.x = x  # (the data, for a step with a non-finite input)
    return spec, setup, model, per_example_loss


def truth_grads(model, per_example_loss, n, scale=1.0, in_batch=False):
    """Each example's gradient in float64: one backward per example of its loss times `scale`
    (the loss scale of the step), divided by `scale` again. `in_batch`: each example's loss row
    of the batch's forward, differentiated alone — the same forward's rounding, where a
    one-example forward rounds otherwise and a discontinuous function of the features (a packed
    sequence's lengths read from them) may flip (seed 40: one example 3.5% "off" under float16
    autocast against the one-example forward, 1e-4 against this)."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    batch = per_example_loss(model, slice(0, n)) if in_batch else None
    for i in range(n):
        loss = batch[i] if in_batch else per_example_loss(model, slice(i, i + 1)).sum()
        grads = torch.autograd.grad(loss * scale, params, allow_unused=True, retain_graph=in_batch)
        out.append(
            [
                torch.zeros_like(p, dtype=torch.float64) if g is None else g.double() / scale
                for g, p in zip(grads, params, strict=True)
            ]
        )
    return out


def _finite(grads):
    return all(bool(torch.isfinite(g).all()) for gs in grads for g in gs)


def _loss(spec, per_example_loss, model, n):
    losses = per_example_loss(model, slice(0, n))
    return losses.mean() if spec["reduction"] == "mean" else losses.sum()


def _compiled(setup, model):
    if setup["compile"] is None:
        return model
    return torch.compile(model, backend=setup["compile"])


# --- the modes --------------------------------------------------------------------------------


def run_one_shot(spec, setup, model, per_example_loss, n):
    grads = truth_grads(model, per_example_loss, n)
    want = fuzz_runner.truth_sq(grads)
    model.zero_grad()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with noisescale.per_example_sqnorms(model, loss_reduction=spec["reduction"]) as pe:
                _loss(spec, per_example_loss, model, n).backward()
            got = pe.sqnorms
        except Exception as err:
            return fuzz_runner._exception(err)
    warned, messages = fuzz_runner._warned(caught)
    if got is None:
        return {"cls": "none", "warn": messages[:3]}
    if got.numel() != want.numel():
        return {"cls": "SHAPE", "len": got.numel(), "n": want.numel()}
    re = fuzz_runner.relerr(got, want)
    if re >= TOLERANCE[setup["numeric"]]:  # (the batch's own forward: see truth_grads)
        want = fuzz_runner.truth_sq(truth_grads(model, per_example_loss, n, in_batch=True))
        re = min(re, fuzz_runner.relerr(got, want))
    if re < TOLERANCE[setup["numeric"]]:
        return {"cls": "exact", "re": re}
    cls = "wrong-warned" if warned else "WRONG-SILENT"
    return {"cls": cls, "re": re, "got": got.tolist(), "want": want.tolist(), "warn": messages[:3]}


def _sgd_step(model):
    with torch.no_grad():
        grads = [q.grad for q in model.parameters() if q.grad is not None]
        norm = sum(float(g.double().pow(2).sum()) for g in grads)
        for q in model.parameters():
            if q.grad is not None:
                q -= (0.2 * q.grad.double() / (1.0 + norm**0.5)).to(q.dtype)


def run_engine(spec, setup, model, per_example_loss, n, subbatches, steps=3):
    """``PerExampleNorms`` for `steps` SGD steps on a copy of the model (compiled where the
    set-up compiles), the truth recomputed with the engine paused."""
    tol = TOLERANCE[setup["numeric"]]
    scale = (1.0 / n) if spec["reduction"] == "mean" else 1.0
    model.inner.__dict__.pop("_aux", None)
    model = copy.deepcopy(model)
    measured = _compiled(setup, model)
    res = {"steps": []}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine = PerExampleNorms(measured, subbatches=subbatches)
            if subbatches:
                engine.RECHECK_SUBBATCHES = 1
            try:
                for step in range(steps):
                    if step:
                        _sgd_step(model)
                    with engine.paused():
                        grads = truth_grads(model, per_example_loss, n)
                        grads_in = truth_grads(model, per_example_loss, n, in_batch=True)
                    model.zero_grad()
                    _loss(spec, per_example_loss, measured, n).backward()
                    passes = engine.collect()
                    if len(passes) != 1:
                        res["steps"].append({"cls": "npasses", "n": len(passes)})
                        continue
                    one = fuzz_runner._engine_step(passes[0], grads, scale, subbatches)
                    if one.get("re", 0.0) > tol:
                        other = fuzz_runner._engine_step(passes[0], grads_in, scale, subbatches)
                        if other.get("re", 0.0) < one["re"]:
                            one = other
                    if one.get("re", 0.0) > tol and "got" in one:
                        # a sum of examples' gradients that cancel: rounding is relative to the
                        # examples' own norms (seed 557, bf16 sub-batch norms 1e-4 of them)
                        ref = float(fuzz_runner.truth_sq(grads).max()) * scale**2
                        ref = max(ref, max(abs(w) for w in one["want"]))
                        diff = max(abs(g - w) for g, w in zip(one["got"], one["want"], strict=True))
                        one["re"] = diff / ref
                    if one["cls"] == "WRONG" and one["re"] < tol:
                        one["cls"] = "exact"
                    elif one["cls"] == "exact" and one.get("re", 0.0) > tol:
                        one["cls"] = "WRONG"
                    res["steps"].append(one)
            finally:
                engine.remove()
        warned, messages = fuzz_runner._warned(caught)
        res["warn"] = messages[:4]
    except Exception as err:
        fuzz_runner._note_exception(res, err)
        warned = False
    res["cls"] = fuzz_runner._classify_steps(res, warned)
    res.setdefault("re", max([s.get("re", 0.0) for s in res["steps"]], default=None))
    return res


def run_tracker(spec, setup, model, per_example_loss, n):
    """The tracker through the scaler, 5 steps: see the module's docstring."""
    tol = TOLERANCE[setup["numeric"]]
    model.inner.__dict__.pop("_aux", None)
    model = copy.deepcopy(model)
    measured = _compiled(setup, model)
    params = [p for p in model.parameters() if p.requires_grad]
    if setup["optimizer"] == "adam":
        optimizer = torch.optim.Adam(params, lr=0.01)
    else:
        optimizer = torch.optim.SGD(params, lr=0.02)
    scaler = None
    if setup["scaler"] in ("told", "untold"):
        scaler = torch.amp.GradScaler(
            "cpu",
            init_scale=setup["init_scale"],
            growth_interval=setup["growth_interval"],
            enabled=not setup.get("scaler_disabled"),
        )
    hand = 1024.0 if setup["scaler"] == "hand" else 1.0
    every = setup.get("measure_every", 1)
    kwargs = {"loss_reduction": spec["reduction"], "beta": 1.0, "sync_every": 1}
    kwargs["measure_every"] = every
    kwargs["microbatch"] = False
    if setup["source"] == "subbatch":
        kwargs["subbatches"] = 2
    else:
        kwargs["per_example_fraction"] = 1.0
    if setup["scaler"] == "told":
        kwargs["scaler"] = scaler
    precondition = setup.get("precondition") and setup["optimizer"] == "adam"
    if precondition:
        kwargs["precondition"] = optimizer
        kwargs["precondition_from"] = 1
    opts = {"source": setup["source"], "pairs": None, "microbatch": False}
    res = {"cls": "exact", "setup": dict(setup)}
    seen, truths, skipped, bad, slack = [], {}, {}, [], {}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tracker = fuzz_tracker._spied(noisescale.GradientNoiseTracker(measured, **kwargs), seen)
            try:
                for step in range(1, 6):
                    size = n - 1 if step == setup.get("shrink_step") else n
                    accum = setup["accum"] if size % 2 == 0 else 1
                    parts = fuzz_tracker._parts(size, accum)
                    if spec["reduction"] == "mean":
                        coefs = [1.0 / (accum * (b - a)) for a, b in parts for _ in range(a, b)]
                    else:
                        coefs = [1.0] * size
                    saved_scale, x, saved_x = None, per_example_loss.x, None
                    if scaler is not None and step == setup["inf_step"]:
                        if x.is_floating_point():  # a batch with a NaN: the graph unchanged
                            saved_x = x.clone()
                            x.view(-1)[0] = float("nan")
                        else:  # a scale past float32's range: the scaled loss is inf
                            saved_scale = scaler.get_scale()
                            scaler.update(new_scale=2.0**127)
                    loss_scale = (scaler.get_scale() if scaler is not None else 1.0) * hand
                    pre = fuzz_tracker._preconditioner(optimizer, params) if precondition else None
                    with tracker.paused():
                        grads = truth_grads(model, per_example_loss, size, loss_scale)
                        grads_in = truth_grads(model, per_example_loss, size, loss_scale, True)
                    optimizer.zero_grad()
                    for a, b in parts:
                        losses = per_example_loss(measured, slice(a, b))
                        loss = (
                            losses.mean() / accum if spec["reduction"] == "mean" else losses.sum()
                        )
                        loss = loss * hand
                        (scaler.scale(loss) if scaler is not None else loss).backward()
                    if hand != 1.0:  # (the hand-scaled loss's gradient scaled back by hand)
                        with torch.no_grad():
                            for p in params:
                                if p.grad is not None:
                                    p.grad /= hand
                    finite = all(
                        bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None
                    )
                    skipped[step] = not finite
                    if scaler is not None and setup["unscale"]:
                        scaler.unscale_(optimizer)
                    before = len(seen)
                    if setup.get("order") != "after_update":
                        tracker.step()
                    if setup["clip"]:
                        torch.nn.utils.clip_grad_norm_(params, 1e30)
                    if scaler is not None:
                        scaler.step(optimizer)
                        scaler.update()
                    elif finite:
                        optimizer.step()
                    if setup.get("order") == "after_update":
                        tracker.step()
                    if saved_scale is not None:
                        scaler.update(new_scale=saved_scale)
                    if saved_x is not None:
                        x.copy_(saved_x)
                    if (step - 1) % every:
                        continue  # (an unmeasured step)
                    if len(seen) > before and finite and _finite(grads) and _finite(grads_in):
                        truths[step] = [
                            fuzz_tracker.step_truth(
                                fuzz_tracker._Norms(g, pre, [0] * len(params), 0),
                                seen[-1],
                                parts,
                                opts,
                                coefs,
                            )
                            for g in (grads, grads_in)
                        ]
                        if pre is not None:  # (what rounding amplified by P can move)
                            slack[step] = fuzz_tracker.step_truth(
                                _Rounding(grads, grads_in, pre), seen[-1], parts, opts, coefs
                            )
                estimate = tracker.estimate()
                history = list(tracker.history)
            finally:
                tracker.remove()
        warned, messages = fuzz_runner._warned(caught)
        res["warn"] = messages[:4]
    except Exception as err:
        res.update(fuzz_runner._exception(err))
        return res
    measured_steps = 0
    for record in history:
        step = record["step"]
        if skipped.get(step) and not record.get("skipped"):
            # a step whose gradient the scaler threw away (the optimizer did not step)
            bad.append((step, "skipped", record.get("skipped"), skipped.get(step)))
            continue
        if record.get("skipped"):
            continue  # (withheld, or skipped: with a warning)
        # (a preconditioned estimate averages the preconditioned steps alone)
        measured_steps += 1 if record.get("preconditioned", True) else 0
        both = truths.get(step)
        if both is None:
            continue
        if isinstance(both[0], str):
            res["cls"], res["why"] = "STRUCTURE", f"step {step}: {both[0]}"
            return res
        offs = [_record_off(step, record, truth, tol, slack.get(step)) for truth in both]
        bad += min(offs, key=len)
    if estimate.steps != measured_steps and not bad:
        bad.append(("estimate", "steps", estimate.steps, measured_steps))
    res["steps"] = measured_steps
    res["scaler_skipped"] = [step for step, skip in skipped.items() if skip]
    if bad:
        res["bad"] = [tuple(map(fuzz_runner_json, b)) for b in bad][:6]
        kinds = {b[1] for b in bad}
        if kinds == {"skipped"} or kinds == {"steps"}:
            res["cls"] = "SKIP"
        else:
            res["cls"] = "wrong-warned" if warned else "WRONG-SILENT"
            res["re"] = (
                max(
                    abs(float(b[2]) - float(b[3])) / max(abs(float(b[3])), 1e-30)
                    for b in bad
                    if isinstance(b[2], float) and isinstance(b[3], float)
                )
                if any(isinstance(b[2], float) for b in bad)
                else None
            )
    return res


def _record_off(step, record, truth, tol, slack=None):
    """[(step, key, got, want)] for the record's numbers off the truth's beyond `tol`, and
    beyond twice `slack`'s bound where the step is preconditioned (:class:`_Rounding`)."""
    _, big, _, sources = truth
    _, big_slack, _, slacks = slack if slack is not None else (None, 0.0, None, {})
    out = []
    worst = max(abs(record["sqnorm_big"]), 1e-30)
    for sb in sources.values():
        worst = max(worst, sb.sqnorm_sum / sb.count)
    if abs(record["sqnorm_big"] - big) > tol * max(worst, abs(big)) + 2 * big_slack:
        out.append((step, "sqnorm_big", record["sqnorm_big"], big))
    for name, sb in sources.items():
        got = record["sources"].get(name, {}).get("sqnorm_small")
        want = sb.sqnorm_sum / sb.count
        allowed = 2 * slacks[name].sqnorm_sum / slacks[name].count if name in slacks else 0.0
        if got is None or abs(got - want) > tol * max(abs(want), 1e-30) + allowed:
            out.append((step, f"{name}.sqnorm_small", got, want))
    return out


class _Rounding(fuzz_tracker._Norms):
    """The most the gradients' rounding can move each preconditioned norm: Σ P²((|h| + d)² − h²)
    for a combination h = Σ c_i g_i (the c_i positive, summing to 1), d = P · max_i |g_i − g'_i|
    the rounding of each coordinate as far as two float32 computations of the same gradient
    (one-example forwards, g; rows of the batch's forward, g') show it.

    A coordinate whose gradient is zero in exact arithmetic (a bias before an instance norm, a
    weight behind a zero-initialised one: seed 4097) is rounding alone, ~1e-8 in float32; Adam's
    v̂ is then its square and P = 1/(√v̂ + ε) ~ 1e8, so P ⊙ g is O(1) there and its sign and size
    are the rounding's: any two float32 computations of |P ⊙ g|² (the tracker's, this oracle's
    two) differ by far more than the dtype's 1e-4 (1e-3 to 1e-1 on seed 4097, the tracker within
    0.25 of this bound; exact to 1e-16 on the float64 model, hunt/pre_scaler_repro.py). Until
    2026-12-07 the oracle compared at 1e-4 alone and called that WRONG-SILENT."""

    def __init__(self, grads, other, pre):
        super().__init__(grads, pre, [0] * len(pre), 0)
        self.d = [
            torch.stack([(a[t] - b[t]).abs() for a, b in zip(grads, other, strict=True)]).amax(0)
            * pre[t]
            for t in range(len(pre))
        ]

    def sq(self, coefs):
        total = 0.0
        for t, d in enumerate(self.d):
            v = sum(c * self.h[i][t] for i, c in coefs.items()).abs()
            total += float(((v + d).pow(2) - v.pow(2)).sum())
        return total, None


def fuzz_runner_json(x):
    return x if isinstance(x, str | bool | int | float | type(None)) else str(x)


# --- one seed ---------------------------------------------------------------------------------


def check_seed(seed, modes=MODES, override=None):
    """Run `seed`'s case in `modes`; ``{"seed", "spec", "setup", "modes"}`` or ``gen_error``."""
    record = {"seed": seed}
    start = time.time()
    torch._dynamo.reset() if "torch._dynamo" in sys.modules else None
    try:
        spec, setup, model, per_example_loss = make_case(seed, override)
        n = spec["n"]
        grads = truth_grads(model, per_example_loss, n)
        if not _finite(grads):
            raise ValueError("a non-finite gradient in the brute force")
        # torch's own gradient must repeat: a bfloat16 Conv1d on a transposed length-1 input
        # gave a weight gradient of 1e42 one call in three (seed 710, torch 2.13 on this CPU;
        # hunt/torch_bf16_conv_garbage.py)
        again = fuzz_runner.truth_sq(truth_grads(model, per_example_loss, n))
        if fuzz_runner.relerr(again, fuzz_runner.truth_sq(grads)) > 1e-6:
            raise ValueError("torch's gradient differs from one call to the next")
        # a gradient that is rounding alone (a sum over an instance norm's output: every
        # example's gradient ~1e-7 in float16, seed 3456) has no relative precision to compare
        if float(again.max()) < 1e-10:
            raise ValueError("every example's gradient is rounding (|g|² < 1e-10)")
    except Exception as err:
        record["gen_error"] = f"{type(err).__name__}: {err}"[:300]
        return record
    record["spec"], record["setup"] = dict(spec), dict(setup)
    model.zero_grad()
    runs = {
        "one_shot": lambda: run_one_shot(spec, setup, model, per_example_loss, n),
        "engine": lambda: run_engine(spec, setup, model, per_example_loss, n, 0),
        "sub": lambda: run_engine(spec, setup, model, per_example_loss, n, 2),
        "tracker": lambda: run_tracker(spec, setup, model, per_example_loss, n),
    }
    record["modes"] = {}
    for mode in MODES:
        if mode in modes:
            record["modes"][mode] = runs[mode]()
    record["t"] = round(time.time() - start, 2)
    return record


def findings(record):
    return [
        (mode, res["cls"], res.get("re"))
        for mode, res in record.get("modes", {}).items()
        if res["cls"] in (*FINDINGS, "STRUCTURE")
    ]


def describe(record):
    setup = record.get("setup", {})
    keys = ("numeric", "logits_float", "compile", "scaler", "inf_step", "unscale", "accum")
    return (
        fuzz_runner.describe(record)
        + "; "
        + ", ".join(f"{k}={setup.get(k)}" for k in keys if k in setup)
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0:100", help="A:B (a range), or seeds A,B,C")
    parser.add_argument("--jsonl", help="append each seed's full record to this file")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated modes")
    parser.add_argument("--override", help="JSON dict replacing entries of the spec or set-up")
    parser.add_argument("-v", "--verbose", action="store_true", help="each mode's result")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    modes = tuple(args.modes.split(","))
    override = json.loads(args.override) if args.override else None
    start = time.time()
    table, found, invalid = fuzz_runner.run_seeds(
        fuzz_runner._seeds(args.seeds),
        lambda seed: check_seed(seed, modes, override),
        args.jsonl,
        args.verbose,
        line=describe,
        find=findings,
    )
    fuzz_runner.print_class_table(table, [mode for mode in MODES if mode in table])
    count = len(fuzz_runner._seeds(args.seeds))
    print(f"\n{count} seeds in {time.time() - start:.0f} s; {len(invalid)} cases left out")
    if not found:
        print("no finding")
        return 0
    print(f"\n{len(found)} findings:")
    for record, mode, cls, re in found:
        res = record["modes"][mode]
        error = f"relative error {re:.3g}" if re is not None else res.get("exc", res.get("bad"))
        print(f"  {cls} in {mode}: {error}\n    {describe(record)}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
