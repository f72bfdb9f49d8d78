"""The tracker's numbers against brute force: the fuzzer's ``tracker_numbers`` mode.

``GradientNoiseTracker`` runs on a copy of a seed's model (tests/fuzz_grammar.py) for a few steps
of a real optimizer (SGD or Adam), with options drawn from the seed (:func:`draw_options`): the
source (the default sub-batches with ``subbatches=`` 2 or 3, every example with
``per_example_fraction=1.0``, or a fraction), gradient accumulation over 1-3 micro-batches (its
step API: several backwards, one ``step()``), ``microbatch=``, ``groups="children"``,
``precondition=`` the Adam optimizer (``precondition_from=1``), ``tokens_per_example=``,
``beta`` and the loss reduction of the seed.

The truth of each step is brute force: each example's gradient by its own backward (the tracker
paused), in float64, times the preconditioner P = 1/(√v̂ + ε) read from the optimizer's state
where the step is preconditioned. The structure of the step — which passes were measured, which
rows a subset drew and their importance weights, which examples each sub-batch held — is read
from the passes the tracker's engine handed it (its ``collect()``, wrapped), so that the truth is
exact, not statistical; the numbers come from brute force only:

* the big batch: b_big = (Σc)²/Σc² and |G_big|² = |Σ c_i g_i / Σ c_i|², c_i the weight of
  example i in the loss (1/(k·n_j) for a mean over k micro-batches of n_j examples, 1 for a sum);
* each source's small batches: every (drawn) example's |g_i|² (times its importance weight),
  each sub-batch's |mean g|², each micro-batch's |mean g|² — their count, Σ 1/size and sum;
* per parameter group, the same split by group (groups computed here from the model's children).

The step's truth goes through :func:`noisescale.state.update` (the estimator: eq. A.2, the
sources' combination, the EMA, the interval) in the tracker's order, and every number of the
tracker's history record is compared with the record the brute-force history gives, at 1e-7 of
its scale (1e-5 for B_simple and its interval, ratios of averages). Eq. A.2 and the EMA are also
recomputed here by hand where the step has one source, so that a wrong ``state.update`` does not
hide. The final ``estimate()`` and ``estimate_groups()`` are compared with the estimator applied
to the brute-force history, and, on step 1 with every example and one pass, the one-shot
``noisescale.per_example_sqnorms`` on the same parameters and batch with the tracker's norms.

Classes as the runner's: ``exact``, ``refused``, ``crash``, ``WRONG-SILENT`` (a number off, no
warning), ``wrong-warned``; ``withheld-all`` where no step had a record; ``STRUCTURE`` where the
passes the tracker used do not describe the step (pass sizes that do not add up, sub-batches
that do not partition their pass).
"""

from __future__ import annotations

import copy
import json
import math
import random
import warnings

import numpy as np
import torch

import noisescale
from noisescale import estimators as est
from noisescale import state as state_mod

RTOL = 1e-7
RATIO_RTOL = 1e-5  # B_simple and its interval: ratios of averages


# --- the options ------------------------------------------------------------------------------


def draw_options(seed, spec):
    """The tracker's options for `seed`, from a generator of their own (the grammar's draws are
    untouched)."""
    r = random.Random(f"tracker-{seed}")
    opts = {
        "source": r.choice(["subbatch", "subbatch", "exact", "fraction"]),
        "subbatches": r.choice([2, 3]),
        "fraction": r.choice([0.5, 0.75]),
        "accum": r.choice([1, 1, 2, 3]),
        "microbatch": r.random() < 0.8,
        "optimizer": r.choice(["sgd", "adam"]),
        "precondition": r.random() < 0.6,
        "groups": r.random() < 0.4,
        "tokens": r.random() < 0.3,
        "beta": r.choice([1.0, 0.9]),
        "steps": 4,
        # drawn after the first version's options, which keep their seeds' values
        "measure_every": r.choice([1, 1, 1, 2]),
        "sync_every": r.choice([1, 1, 3]),
        "dataset_size": r.choice([None, None, 40]),
        "amsgrad": r.random() < 0.3,
        "rmsprop": r.random() < 0.25,
        "param_groups": r.random() < 0.3,
        # a loss over tokens (count_tokens): each example's loss taken as the sum over its T
        # tokens of equal losses, divided by the micro-batch's tokens (token_mean, then by the
        # micro-batches) or by the step's (num_items_in_batch)
        "token_loss": r.choice([None, None, "token_mean", "num_items_in_batch"]),
        # per_example=False: the accumulation micro-batches alone (where there are several)
        "no_hooks": r.random() < 0.15,
        # state_dict() before step 3, through JSON, into a new tracker (load_state_dict)
        "resume": r.random() < 0.3,
        # a step abandoned after its backward (tracker.discard()) before step 2
        "discard": r.random() < 0.25,
        # rows tied together (the default source keeps each pair or block in one sub-batch)
        "pairs": r.choice([None, None, None, "flip", "halves", 2, 3]),
    }
    if opts["no_hooks"] and opts["accum"] > 1 and spec.get("stem") != "emb_freq":
        # (an Embedding with scale_grad_by_freq: a micro-batch's gradient is not the sum of its
        # examples' — the brute force's —, its frequencies counted over the micro-batch; seed
        # 4150 read 0.4% "off")
        opts["source"] = "microbatch"
    size = opts["pairs"] if isinstance(opts["pairs"], int) else 2
    sizes = [b - a for a, b in _parts(spec["n"], opts["accum"])]
    if opts["source"] != "subbatch" or any(m % size for m in sizes):
        opts["pairs"] = None
    if spec.get("lossform") == "split_forward":
        # (count_tokens counts the last forward's examples: a micro-batch of two forwards is
        # refused so, rightly — its labels are for both)
        opts["token_loss"] = None
    if opts["optimizer"] == "adam" and opts["rmsprop"]:
        opts["optimizer"] = "rmsprop"
    if opts["optimizer"] == "sgd":
        opts["precondition"] = False
    if opts["measure_every"] > 1:
        opts["steps"] = 5  # (steps 1, 3, 5 measured)
    opts["accum"] = min(opts["accum"], spec["n"])
    return opts


# --- brute force --------------------------------------------------------------------------------


def _parts(n, k):
    """The micro-batches: k contiguous slices of 0..n-1, sizes as equal as can be."""
    bounds = [round(j * n / k) for j in range(k + 1)]
    return [(bounds[j], bounds[j + 1]) for j in range(k)]


def _children_groups(model, params):
    """``groups="children"`` computed here: each top-level child, a tied parameter in its first
    user's, the root's own parameters in ``"(top)"``; (names, group index per parameter)."""
    tracked = {id(p) for p in params}
    owner, names = {}, []
    for name, child in model.named_children():
        for p in child.parameters():
            if id(p) in tracked and id(p) not in owner:
                owner[id(p)] = name
                if name not in names:
                    names.append(name)
    for p in model.parameters(recurse=False):
        if id(p) in tracked and id(p) not in owner:
            owner[id(p)] = "(top)"
            if "(top)" not in names:
                names.append("(top)")
    return names, [names.index(owner[id(p)]) for p in params]


def _preconditioner(optimizer, params):
    """P per parameter from Adam's state (v̂ = v/(1 − β₂ᵗ), P = 1/(√v̂ + ε)); zero where the
    optimizer has no state; ``None`` before its first step."""
    if not any(optimizer.state.get(p) for p in params):
        return None
    out = []
    for p in params:
        st = optimizer.state.get(p)
        if not st or float(st["step"]) == 0:
            out.append(torch.zeros_like(p))
            continue
        group = next(g for g in optimizer.param_groups if any(q is p for q in g["params"]))
        if isinstance(optimizer, torch.optim.RMSprop):
            v = st["square_avg"]
        else:
            v = st["max_exp_avg_sq"] if group["amsgrad"] else st["exp_avg_sq"]
            v = v / (1.0 - group["betas"][1] ** float(st["step"]))
        out.append(1.0 / (v.sqrt() + group["eps"]))
    return out


class _Norms:
    """|Σ a_i h_i|² over the parameters, whole and by group, h_i = P ⊙ g_i."""

    def __init__(self, grads, pre, group_index, ngroups):
        self.h = [[g * pre[t] if pre is not None else g for t, g in enumerate(gs)] for gs in grads]
        self.group_index = group_index
        self.ngroups = ngroups

    def sq(self, coefs):
        """(total, per group [G] or None) for the combination Σ coefs[i]·h_i."""
        per = torch.zeros(max(self.ngroups, 1), dtype=torch.float64)
        total = torch.zeros((), dtype=torch.float64)
        for t in range(len(self.h[0])):
            v = sum(c * self.h[i][t] for i, c in coefs.items())
            s = v.pow(2).sum().double()
            total = total + s
            if self.ngroups:
                per[self.group_index[t]] += s
        return float(total), (per.numpy() if self.ngroups else None)

    def mean(self, members, weight=1.0):
        return self.sq({i: weight / len(members) for i in members})


def _add(acc, name, count, inv, total, group):
    c, i, t, g = acc.get(name, (0.0, 0.0, 0.0, None))
    if group is not None:
        g = group.copy() if g is None else g + group
    acc[name] = (c + count, i + inv, t + total, g)


def step_truth(norms, passes, parts, opts, coefs, within=False):
    """The step's :class:`~noisescale.state.StepStats` parts from brute force, on the structure
    of `passes` (the tracker's); (b_big, |G_big|², groups' big, sources) or a STRUCTURE string.

    `within`: the passes' weights vary with the data (a token mean over micro-batches of unequal
    counts), and the big batch is taken within each pass (``StepNorms.within_passes``): |G_big|²
    = Σ_m (n_m/B)·|X̄_m|², X̄_m pass m's mean gradient, of b_big = B/k examples, and the
    micro-batch source left out."""
    if [p.batch_size for p in passes] != [b - a for a, b in parts]:
        return f"pass sizes {[p.batch_size for p in passes]}, micro-batches {parts}"
    total_c = sum(coefs)
    big, group_big = norms.sq({i: c / total_c for i, c in enumerate(coefs)})
    b_big = total_c**2 / sum(c * c for c in coefs)
    if within:
        n = parts[-1][1]
        big, group_big = 0.0, None
        for a, b in parts:
            t, g = norms.mean(list(range(a, b)))
            big += t * (b - a) / n
            if g is not None:
                group_big = g * (b - a) / n + (0.0 if group_big is None else group_big)
        b_big = n / len(parts)
    acc = {}
    for p, (a, b) in zip(passes, parts, strict=True):
        if p.raw_sqnorms is None:
            continue
        if p.subbatches is not None:
            groups = fuzz_groups(p.subbatches)
            flat = sorted(i for g in groups for i in g)
            if flat != list(range(b - a)):
                return f"sub-batches {groups} do not partition a pass of {b - a}"
            if _tied_apart(groups, opts.get("pairs"), b - a):
                return f"sub-batches {groups} split rows tied by {opts['pairs']!r}"
            for members in groups:
                t, g = norms.mean([a + i for i in members])
                _add(acc, "subbatch", 1, 1.0 / len(members), t, g)
            continue
        if opts["source"] == "subbatch" and not p.unsplit:
            continue  # PerExampleSource(unsplit_only=True)
        rows = range(b - a) if p.rows is None else p.rows.tolist()
        weights = [1.0] * len(rows) if p.row_weights is None else p.row_weights.tolist()
        for i, w in zip(rows, weights, strict=True):
            t, g = norms.mean([a + i])
            _add(acc, "per_example", 1, 1.0, t * w, None if g is None else g * w)
    if opts["microbatch"] and len(passes) >= 2 and not within:
        for a, b in parts:
            t, g = norms.mean(list(range(a, b)))
            _add(acc, "microbatch", 1, 1.0 / (b - a), t, g)
    sources = {
        name: state_mod.SmallBatches(c, i, t, g) for name, (c, i, t, g) in acc.items() if c > 0
    }
    return b_big, big, group_big, sources


def _tied_apart(groups, pairs, n):
    """Whether sub-batches `groups` of a pass of `n` rows split rows that `pairs` ties together
    (paired_rows 'flip': i and n-1-i; 'halves': i and i+n/2; grouped_rows G: blocks of G)."""
    if pairs is None:
        return False
    where = {i: j for j, g in enumerate(groups) for i in g}
    if pairs == "flip":
        tied = [(i, n - 1 - i) for i in range(n // 2)]
    elif pairs == "halves":
        tied = [(i, i + n // 2) for i in range(n // 2)]
    else:
        tied = [(i, i + 1) for i in range(n) if (i + 1) % pairs]
    return any(where[a] != where[b] for a, b in tied)


def fuzz_groups(subbatches):
    """The examples of each sub-batch (the runner's reading of the engine's split)."""
    import fuzz_runner

    return fuzz_runner._groups(subbatches)


# --- comparison --------------------------------------------------------------------------------


def _close(got, want, scale, rtol=RTOL):
    if got is None or want is None:
        return got is None and want is None
    got, want = float(got), float(want)
    if math.isnan(want) or math.isnan(got):
        return math.isnan(want) and math.isnan(got)
    if math.isinf(want) or math.isinf(got):
        return got == want
    return abs(got - want) <= rtol * max(abs(want), scale, 1e-300)


def record_scale(want):
    """The size of a step's g2 and tr Σ's terms: what their float64 rounding is relative to
    (g2 is a difference of such terms, and may be far smaller)."""
    scale = max(abs(want["sqnorm_big"]), 1e-300)
    for s in want["sources"].values():
        scale = max(scale, abs(s["sqnorm_small"]))
    return scale * max(want["b_big"], 1.0)


def _edge(x):
    """An interval's end that says "unbounded" (0, ∞, nan, None)."""
    return x is None or not math.isfinite(x) or x == 0.0


def compare_records(got, want, run_scale=0.0):
    """[(key, got, want)] for each number of the tracker's record off from the brute force's;
    `run_scale`: the largest :func:`record_scale` of the steps averaged so far (the EMAs carry
    each step's rounding)."""
    bad = []
    scale = record_scale(want)
    run_scale = max(run_scale, scale)

    def check(key, g, w, sc, rtol=RTOL):
        if not _close(g, w, sc, rtol):
            bad.append((key, g, w))

    for key in ("b_big", "loss", "lr"):
        check(key, got.get(key), want[key], 0.0)
    # (|G_big|² cancels the examples' gradients: its rounding is the small batches' scale's, seed
    # 3314 read 1.7e-29 for 4.5e-29 where the examples' norms were ~1)
    check("sqnorm_big", got.get("sqnorm_big"), want["sqnorm_big"], scale)
    for key in ("g2", "trace_sigma"):
        check(key, got.get(key), want[key], scale)
    for key in ("g2_ema", "trace_sigma_ema"):
        check(key, got.get(key), want[key], run_scale)
    # a ratio is compared where its averages are resolved (both above their scale's rounding)
    resolved = all(abs(want[k]) > 1e-6 * run_scale for k in ("g2_ema", "trace_sigma_ema"))
    if resolved:
        for key in ("b_simple", "b_simple_low", "b_simple_high"):
            g, w = got.get(key), want[key]
            if key != "b_simple" and _edge(g) != _edge(w):
                # an interval on the edge between bounded and not (steps whose ratios agree to
                # the last digits, a zero variance): the rounding decides (seed 1797)
                continue
            check(key, g, w, 0.0, RATIO_RTOL)
    if got.get("skipped") != want["skipped"]:
        bad.append(("skipped", got.get("skipped"), want["skipped"]))
    keys = ("examples", "tokens", "tokens_seen", "tokens_per_example", "preconditioned")
    for key in (*keys, "unmeasured_steps"):
        if key in want or key in got:
            g, w = got.get(key), want.get(key)
            if isinstance(w, bool) or isinstance(g, bool) or w is None or g is None:
                if g != w:
                    bad.append((key, g, w))
            else:
                check(key, g, w, 0.0)
    gs, ws = got.get("sources", {}), want["sources"]
    if sorted(gs) != sorted(ws):
        bad.append(("sources", sorted(gs), sorted(ws)))
    for name in set(gs) & set(ws):
        for key in ("count", "b_small"):
            check(f"sources.{name}.{key}", gs[name].get(key), ws[name][key], 0.0)
        key = "sqnorm_small"
        check(f"sources.{name}.{key}", gs[name].get(key), ws[name][key], scale)
    gg, wg = got.get("groups") or {}, want.get("groups") or {}
    if sorted(gg) != sorted(wg):
        bad.append(("groups", sorted(gg), sorted(wg)))
    for name in set(gg) & set(wg):
        for key in ("sqnorm_big",):
            check(f"groups.{name}.{key}", gg[name].get(key), wg[name][key], scale)
        for key in ("g2", "trace_sigma"):
            check(f"groups.{name}.{key}", gg[name].get(key), wg[name][key], scale)
        for key in ("g2_ema", "trace_sigma_ema"):
            check(f"groups.{name}.{key}", gg[name].get(key), wg[name][key], run_scale)
    return bad


def hand_checks(records, beta):
    """Eq. A.2 and the EMA by hand on the brute-force records (one source): [(key, got, want)].

    Independent of ``state.update``: g2 = (B·H·S_B − ΣS)/(B·H − W), tr = B·W·(ΣS/W − S_B)/(B·H − W)
    (paper eq. A.2 over small batches of sizes b_r, H = Σ 1/b_r), and the EMAs as β-weighted
    means of the steps' g2 and tr since the first preconditioned step."""
    bad, g2s, trs = [], [], []
    for rec in records:
        if rec.get("preconditioned") and not any(r.get("preconditioned") for r in g2s):
            g2s, trs = [], []
        if len(rec["sources"]) == 1 and not rec["skipped"]:
            (s,) = rec["sources"].values()
            w, h = s["count"], s["count"] / s["b_small"]
            bh = rec["b_big"] * h
            total = s["sqnorm_small"] * w
            g2 = (bh * rec["sqnorm_big"] - total) / (bh - w)
            tr = rec["b_big"] * w * (total / w - rec["sqnorm_big"]) / (bh - w)
            scale = max(rec["sqnorm_big"], s["sqnorm_small"]) * max(rec["b_big"], 1)
            if not _close(rec["g2"], g2, scale) or not _close(rec["trace_sigma"], tr, scale):
                bad.append((f"hand eq. A.2 at step {rec['step']}", rec["g2"], g2))
        if not rec["skipped"]:
            g2s.append(rec)
            trs.append(rec)
            if all(len(r["sources"]) == 1 for r in g2s):
                ages = np.arange(len(g2s) - 1, -1, -1)
                wts = beta**ages
                g2e = float((wts * [r["g2"] for r in g2s]).sum() / wts.sum())
                scale = max(abs(r["g2"]) + abs(r["trace_sigma"]) for r in g2s)
                if not _close(rec["g2_ema"], g2e, scale):
                    bad.append((f"hand EMA at step {rec['step']}", rec["g2_ema"], g2e))
    return bad


# --- the mode ----------------------------------------------------------------------------------


def run_tracker_numbers(spec, model, per_example_loss, n, seed, in_batch=False, opts=None):
    """The mode: see the module's docstring. `model` is left as it was (a copy trains)."""
    import fuzz_runner

    opts = opts or draw_options(seed, spec)
    # a block that mixes the examples: the truth is each example's loss differentiated within the
    # batch (what a measured model must match: statistics of the batch that no gradient goes
    # through are constants, docs/per_example.md), where a forward alone runs another model
    # (seed 1089: lengths of a packed GRU taken from features after a batch mean)
    in_batch = in_batch or bool(spec.get("mixing"))
    if in_batch:
        if opts["source"] == "microbatch":
            opts["source"] = "exact"  # (one micro-batch: nothing to compare)
        opts["accum"] = 1  # (micro-batches of another size run another model)
    res = {"opts": dict(opts), "cls": "exact"}
    model.__dict__.pop("_aux", None)  # the auxiliary head's last output: not deep-copyable
    original = model
    model = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [params]
    if opts.get("param_groups") and len(params) > 1:
        groups = [params[: len(params) // 2], params[len(params) // 2 :]]
    groups = [{"params": g, "name": f"half{i}"} for i, g in enumerate(groups)]
    if opts["optimizer"] == "adam":
        optimizer = torch.optim.Adam(groups, lr=0.01, amsgrad=opts.get("amsgrad", False))
    elif opts["optimizer"] == "rmsprop":
        optimizer = torch.optim.RMSprop(groups, lr=0.01)
    else:
        optimizer = torch.optim.SGD(groups, lr=0.02)
    token_loss = opts.get("token_loss")
    kwargs = {
        "loss_reduction": token_loss or spec["reduction"],
        "microbatch": opts["microbatch"],
        "beta": opts["beta"],
        "optimizer": optimizer,
        "measure_every": opts.get("measure_every", 1),
        "sync_every": opts.get("sync_every", 1),
        "dataset_size": opts.get("dataset_size"),
    }
    if opts["source"] == "subbatch":
        kwargs["subbatches"] = opts["subbatches"]
        if isinstance(opts.get("pairs"), int):
            kwargs["grouped_rows"] = opts["pairs"]
        elif opts.get("pairs"):
            kwargs["paired_rows"] = opts["pairs"]
    elif opts["source"] == "microbatch":
        kwargs["per_example"] = False
        kwargs["microbatch"] = opts["microbatch"] = True
    else:
        kwargs["per_example_fraction"] = 1.0 if opts["source"] == "exact" else opts["fraction"]
    if opts["precondition"]:
        kwargs["precondition"] = optimizer
        kwargs["precondition_from"] = 1
    if opts["groups"]:
        kwargs["groups"] = "param_groups" if opts.get("param_groups") else "children"
    tokens_per = spec.get("t_after_stem") or 3
    if opts["tokens"] and not token_loss:
        kwargs["tokens_per_example"] = tokens_per
    if opts["source"] != "subbatch" and opts["accum"] > 1 and not opts["microbatch"]:
        opts["microbatch"] = kwargs["microbatch"] = True  # (else nothing may compare)
    group_names, group_index = [], [0] * len(params)
    if opts["groups"] and kwargs["groups"] == "children":
        group_names, group_index = _children_groups(model, params)
    elif opts["groups"]:
        group_names = [g["name"] for g in optimizer.param_groups]
        group_index = [i for i, g in enumerate(optimizer.param_groups) for _ in g["params"]]
    parts = _parts(n, opts["accum"])
    k = len(parts)
    if token_loss == "token_mean":
        coefs = [1.0 / (k * (b - a) * tokens_per) for a, b in parts for _ in range(a, b)]
    elif token_loss:
        coefs = [1.0 / (n * tokens_per)] * n
    elif spec["reduction"] == "mean":
        coefs = [1.0 / (k * (b - a)) for a, b in parts for _ in range(a, b)]
    else:
        coefs = [1.0] * n
    truths, seen, losses_of = {}, [], {}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tracker = _spied(noisescale.GradientNoiseTracker(model, **kwargs), seen)
            before_resume = []
            try:
                if tracker._group_names != group_names:
                    res["cls"] = "STRUCTURE"
                    res["why"] = f"groups {tracker._group_names}, computed {group_names}"
                    return res
                for step in range(1, opts["steps"] + 1):
                    if opts.get("resume") and step == 3:
                        # a checkpoint (through JSON) and a new tracker that resumes from it
                        before_resume = list(tracker.history)
                        saved = json.loads(json.dumps(tracker.state_dict()))
                        tracker.remove()
                        tracker = _spied(noisescale.GradientNoiseTracker(model, **kwargs), seen)
                        tracker.load_state_dict(saved)
                    pre = _preconditioner(optimizer, params) if opts["precondition"] else None
                    with tracker.paused():
                        grads = fuzz_runner.per_example_grads(model, per_example_loss, n, in_batch)
                    if token_loss:  # (the gradient of each example's summed token losses)
                        grads = [[g * tokens_per for g in gs] for gs in grads]
                    norms = _Norms(grads, pre, group_index, len(group_names))
                    if opts.get("discard") and step == 2:
                        optimizer.zero_grad()
                        fuzz_runner.loss_of(spec, per_example_loss, model, n).backward()
                        tracker.discard()
                    optimizer.zero_grad()
                    step_loss = 0.0
                    for a, b in parts:
                        losses = per_example_loss(model, slice(a, b))
                        if token_loss:
                            labels = torch.zeros(b - a, tokens_per, dtype=torch.long)
                            tracker.count_tokens(labels)
                            losses = losses * tokens_per  # (each example's T tokens summed)
                        if token_loss == "token_mean":
                            loss = losses.sum() / ((b - a) * tokens_per) / k
                        elif token_loss:
                            loss = losses.sum() / (n * tokens_per)
                        elif spec["reduction"] == "mean":
                            loss = losses.mean() / k
                        else:
                            loss = losses.sum()
                        loss.backward()
                        step_loss = step_loss + loss.detach()
                    losses_of[step] = float(step_loss)
                    before = len(seen)
                    tracker.step(loss=step_loss)
                    passes = seen[-1] if len(seen) > before else None
                    optimizer.step()
                    if passes is None:
                        continue
                    if (step - 1) % opts.get("measure_every", 1):
                        continue  # (an unmeasured step: its examples are checked at the next)
                    within = token_loss == "token_mean" and len({b - a for a, b in parts}) > 1
                    truth = step_truth(norms, passes, parts, opts, coefs, within)
                    if isinstance(truth, str):
                        res["cls"], res["why"] = "STRUCTURE", f"step {step}: {truth}"
                        return res
                    truths[step] = (truth, pre is not None)
                    if step == 1 and opts["source"] == "exact" and k == 1:
                        weight = coefs[0] * (tokens_per if token_loss else 1)
                        res["one_shot"] = _one_shot(
                            spec, original, per_example_loss, n, passes, weight
                        )
                history = before_resume + [
                    r
                    for r in tracker.history
                    if r["step"] not in {b["step"] for b in before_resume}
                ]
                estimate = tracker.estimate()
                estimate_groups = tracker.estimate_groups() if group_names else {}
            finally:
                tracker.remove()
        warned, messages = fuzz_runner._warned(caught)
        res["warn"] = messages[:4]
    except Exception as err:
        out = fuzz_runner._exception(err)
        res.update(out)
        res["opts"] = opts
        return res
    # the brute-force history through the estimator, in the tracker's order
    st = state_mod.init(opts["beta"], tuple(group_names))
    wanted, bad, run_scale = [], [], 0.0
    m = opts.get("measure_every", 1)
    for rec in history:
        step = rec["step"]
        if step not in truths:
            bad.append((f"record of step {step}", "recorded", "no passes"))
            continue
        (b_big, big, group_big, sources), preconditioned = truths[step]
        stats = state_mod.StepStats(
            step,
            b_big,
            big,
            sources,
            n,
            None,
            optimizer.param_groups[0]["lr"],
            1.0,
            group_big,
            preconditioned if opts["precondition"] else None,
            tokens=float(n * tokens_per) if opts["tokens"] or token_loss else None,
            definition="token" if token_loss else "example",
            unmeasured=(
                (
                    m - 1,
                    (m - 1) * n,
                    float((m - 1) * n * tokens_per) if opts["tokens"] or token_loss else None,
                )
                if step > 1 and m > 1
                else state_mod.NOTHING_UNMEASURED
            ),
        )
        stats = stats._replace(loss=losses_of[step])
        if preconditioned and not any(w.get("preconditioned") for w in wanted):
            run_scale = 0.0  # (the averages start again at the first preconditioned step)
        st, want = state_mod.update(st, stats, tracker.confidence, opts.get("dataset_size"))
        wanted.append(want)
        for key, g, w in compare_records(rec, want, run_scale):
            bad.append((f"step {step} {key}", g, w))
        if not want["skipped"]:
            run_scale = max(run_scale, record_scale(want))
    if opts.get("dataset_size") is None:  # (the hand's eq. A.2 has no finite population)
        bad += hand_checks(wanted, opts["beta"])
    if not history:
        res["cls"] = "withheld-all"
    want_est = est.b_simple_interval(st.noise, tracker.confidence)
    if token_loss:
        want_est = state_mod.per_token(want_est, st.tokens_per_example)
    if history and (opts["precondition"] or any(r["sources"] for r in history)):
        for key in ("g2", "trace_sigma", "b_simple", "low", "high"):
            g, w = getattr(estimate, key), getattr(want_est, key)
            rtol = RTOL if key in ("g2", "trace_sigma") else RATIO_RTOL
            scale = run_scale if rtol == RTOL else 0.0
            resolved = min(abs(want_est.g2), abs(want_est.trace_sigma)) > 1e-6 * run_scale
            if rtol != RTOL and not resolved:
                continue  # (a ratio of averages within their rounding)
            if not _close(g, w, scale, rtol):
                bad.append((f"estimate().{key}", g, w))
        for name, e in estimate_groups.items():
            w = est.b_simple_interval(st.groups[name], tracker.confidence)
            if token_loss:
                w = state_mod.per_token(w, st.tokens_per_example)
            for key in ("g2", "trace_sigma"):
                if not _close(getattr(e, key), getattr(w, key), run_scale):
                    bad.append(
                        (f"estimate_groups()[{name}].{key}", getattr(e, key), getattr(w, key))
                    )
    if res.get("one_shot"):
        bad += res["one_shot"]
    res["steps"] = len(history)
    if bad:
        res["bad"] = [(k, _num(g), _num(w)) for k, g, w in bad[:8]]
        res["re"] = max((_rel(g, w) for _, g, w in bad), default=math.inf)
        res["cls"] = "wrong-warned" if warned else "WRONG-SILENT"
    elif res["cls"] == "exact" and all(r.get("skipped") for r in history):
        res["cls"] = "skipped-all"
    return res


def _spied(tracker, seen):
    """`tracker`, its engine's ``collect()`` wrapped to append each step's passes to `seen`."""
    collect = tracker.engine.collect

    def spy(*args, **kw):
        out = collect(*args, **kw)
        seen.append(list(out))
        return out

    tracker.engine.collect = spy
    return tracker


def _num(x):
    return x if isinstance(x, str | bool | type(None) | list) else float(x)


def _rel(g, w):
    try:
        g, w = float(g), float(w)
    except (TypeError, ValueError):
        return math.inf
    if math.isnan(g) or math.isnan(w) or math.isinf(g) or math.isinf(w):
        return math.inf
    return abs(g - w) / max(abs(w), 1e-300)


def _one_shot(spec, model, per_example_loss, n, passes, weight):
    """``noisescale.per_example_sqnorms`` on the same parameters and batch as the tracker's step
    1 (the original model: the tracker's copy before its first update), against the tracker's
    per-example norms of that step (raw: each example's gradient times `weight`, its weight in
    the tracker's loss); [(key, got, want)] where they differ."""
    import fuzz_runner

    model.zero_grad()
    try:
        with noisescale.per_example_sqnorms(model, loss_reduction=spec["reduction"]) as pe:
            fuzz_runner.loss_of(spec, per_example_loss, model, n).backward()
    except fuzz_runner.REFUSALS:
        return []
    finally:
        model.zero_grad()
    (p,) = passes
    if pe.sqnorms is None or p.raw_sqnorms is None or p.weights is not None:
        return []
    raw = p.raw_sqnorms.detach().double()
    mine = raw / weight**2
    got = pe.sqnorms.detach().double()
    if got.shape != mine.shape:
        return [("one-shot vs tracker: shapes", list(got.shape), list(mine.shape))]
    re = fuzz_runner.relerr(got, mine)
    return [] if re < RTOL else [("one-shot vs tracker: sqnorms", got.tolist(), mine.tolist())]
