"""The critical batch size from branches of one real run (``noisescale.branch``) against its truth.

Each seed draws (:func:`draw_config`) a tiny float64 model on fixed synthetic data — a linear
regression (MSE), a logistic regression (BCE) or an MLP with one tanh layer — and a main run
(SGD, SGD with momentum or Adam at batch B₀ and rate ε₀) measured by a
``GradientNoiseTracker`` writing a history, counted in examples or in tokens (a constant
``tokens_per_example`` T); checkpoints at random steps of the run (model and optimizer state);
a ``BranchPlan`` with random batch sizes, base batch size and rate, ``lr_rule`` (``none``,
``linear``, ``sqrt``, ``paper`` with B* and α), a budget that need not be a multiple of the
batch sizes, a learning-rate grid at times and 1–3 seeds; the branches run by ``run_branches``
on a temporary SQLite storage once, twice (the second call skips every finished branch), after
a branch raised mid-way (the call run again), with a worker process killed mid-branch (the
call run again after the grace period) or with two worker processes at once. The branch
training function reports the loss on the whole fixed data set every few steps, the same
spacing in steps for every branch of a seed.

Checked against computations written here from docs/branch.md and the paper, never from the
functions checked:

* ``curve``: every stored branch's steps, examples and losses against an independent rerun of
  the training function at the rate the docs' rule gives, computed here (ε₀·B/B₀, ε₀·√(B/B₀),
  ε₀, ε₀·[(1 + B*/B₀)/(1 + B*/B)]^α; stored to 12 significant digits, so the rates agree to
  5e-13 and the rerun at the stored rate is bit for bit), and the budget honoured (the last
  record at or past it, the first before it);
* ``stored``: ``read_branches`` holds exactly the planned branches, each once, after the
  retries, kills, repeats and second workers;
* ``cbs``: ``local_critical_batch_sizes`` — the rate chosen on the grid, the loss at the
  budget, η per seed (the reference's first crossing of the loss, interpolated, capped at 1),
  the threshold at τ (interpolated in 1/η), B_crit of eq. 2.11 by least squares in log 1/η
  (a dense scan of the six decades and a bounded refinement, compared by their sums of
  squares where the valley is flat), the log-t intervals over seeds (scipy's t quantile), the
  bounds and open ends, the crossing flag — or a refusal where the reference diverged;
* ``side``: ``side_by_side``, ``window_b_simple``, ``b_simple_trajectory`` and ``read_b_noise``
  against the history's JSON read here: the ratio of the means of |G|² and tr Σ over the
  window's records (times T in tokens), the window's steps and mean loss, the running
  B_simple (times T), and B_noise points' ratio of means of tr(HΣ) (times T) and GᵀHG;
* ``warmup``: ``fit_warmup``'s knots, ``stage_batch_size``, ``warmup_steps`` and the predicted
  examples and steps at equal progress, by a fine integration of eq. D.1 here;
* ``cli``: ``noisescale branch --json`` on the same storage and history against the library.

Classes per check: ``ok``; ``refused-ok`` (a refusal the inputs call for, naming the cause);
``WRONG`` (a number off, no error); ``CRASH`` (any other exception); ``FALSE-REFUSAL``;
``skip``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import multiprocessing
import os
import random
import tempfile
import time
import warnings

import numpy as np
import torch
from scipy import optimize as sopt
from scipy import stats as sps

from noisescale.errors import NoiseScaleInputError

# Float64 round-off: every number checked is a few arithmetic operations on the stored floats.
RTOL = 1e-9
# B_crit: the library's golden section stops at 1e-10 in log B_crit; a flat valley of the sum
# of squares can move the minimiser further, so there the sums of squares are compared.
CRIT_RTOL = 1e-6
CHECKS = ("curve", "stored", "cbs", "side", "warmup", "cli")
FINDINGS = ("WRONG", "CRASH", "FALSE-REFUSAL")
N_DATA = 48
MODES = ("once", "repeat", "raise", "kill", "two")

# The seed's configuration while its branches run (the training function is module-level so
# that forked worker processes reach it).
CURRENT: dict = {}


def _logu(rng, lo, hi):
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def draw_config(seed):
    rng = random.Random(seed)
    kind = rng.choice(["linear", "logistic", "mlp"])
    opt = rng.choice(["sgd", "momentum", "adam"])
    unit = rng.choice(["examples", "examples", "tokens"])
    tpe = rng.choice([2, 3, 4]) if unit == "tokens" else 1
    b0 = rng.choice([2, 4, 8])
    if opt == "adam":
        lr0 = _logu(rng, 0.003, 0.05)
    else:
        lr0 = _logu(rng, 0.01, 0.15 if kind != "logistic" else 1.0)
    if rng.random() < 0.2:
        lr0 *= 6.0  # hot: some branches (at times the reference) diverge
    main_steps = rng.randint(12, 40)
    n_ck = rng.choice([1, 1, 2, 3])
    ck_steps = sorted(rng.sample(range(0, main_steps + 1), n_ck))
    sizes = sorted(rng.sample([1, 2, 3, 4, 6, 8, 12, 16], rng.choice([2, 3, 3, 4])))
    repeats = rng.choice([1, 2, 3, 3])
    rule = rng.choice(["none", "linear", "sqrt", "paper"])
    b_star = _logu(rng, 1.0, 64.0) if rule == "paper" else None
    alpha = rng.choice([1.0, 1.0, 0.5, round(rng.uniform(0.2, 1.0), 3)])
    grid = (1.0,)
    if n_ck * repeats <= 3 and rng.random() < 0.3:
        grid = rng.choice([(0.5, 1.0, 2.0), (0.5, 1.0), (1.0, 3.0)])
    budget = rng.randint(max(sizes) * 2, max(sizes) * 6)
    if rng.random() < 0.3:
        budget = max(sizes) * rng.randint(2, 5)  # a multiple of every size at times
    points = rng.choice([4, 8, 32, 1000])  # ~records per branch (1000: every step)
    return {
        "kind": kind,
        "opt": opt,
        "unit": unit,
        "tpe": tpe,
        "d": rng.randint(2, 5),
        "hidden": rng.randint(2, 6),
        "b0": b0,
        "lr0": lr0,
        "main_steps": main_steps,
        "ck_steps": ck_steps,
        "sizes": sizes,
        "repeats": repeats,
        "lr_rule": rule,
        "b_star": b_star,
        "alpha": alpha if rule == "paper" else 1.0,
        "grid": list(grid),
        "budget": budget,
        "points": points,
        "tolerance": rng.choice([0.2, 0.2, 0.5, 1.0, round(_logu(rng, 0.02, 3.0), 4)]),
        "reference": rng.choice(["smallest", "smallest", "best"]),
        "mode": rng.choice(MODES),
        "data_seed": rng.randint(0, 10**6),
        "b_noise_records": rng.random() < 0.5,
        # summary B_noise points (one per window) at each checkpoint and at each window's end —
        # the weights after its last step, not the window's (drawn apart, the other draws as
        # before: added 2026-12-07)
        "b_noise_summary": random.Random(seed * 7919 + 3).random() < 0.5,
        # the loss reported: the whole data set's, a fixed subset's (plateaus, ties) or the
        # training batch's before the step (noisy, non-monotone curves that cross)
        "eval": rng.choice(["full", "subset", "batch"]),
    }


# --- the model, the data and the training function ----------------------------------------


def _data(cfg):
    g = torch.Generator().manual_seed(cfg["data_seed"])
    x = torch.randn(N_DATA, cfg["d"], generator=g, dtype=torch.float64)
    w = torch.randn(cfg["d"], generator=g, dtype=torch.float64)
    noise = torch.randn(N_DATA, generator=g, dtype=torch.float64)
    logistic = cfg["kind"] == "logistic"
    return x, ((x @ w + noise > 0).to(torch.float64) if logistic else x @ w + 0.5 * noise)


def _model(cfg):
    torch.manual_seed(cfg["data_seed"] + 1)
    if cfg["kind"] == "mlp":
        m = torch.nn.Sequential(
            torch.nn.Linear(cfg["d"], cfg["hidden"]),
            torch.nn.Tanh(),
            torch.nn.Linear(cfg["hidden"], 1),
        )
    else:
        m = torch.nn.Linear(cfg["d"], 1)
    return m.to(torch.float64)


def _optimizer(cfg, model, lr):
    if cfg["opt"] == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    return torch.optim.SGD(
        model.parameters(), lr=lr, momentum=0.9 if cfg["opt"] == "momentum" else 0
    )


def _loss(cfg, model, x, y):
    out = model(x).squeeze(-1)
    if cfg["kind"] == "logistic":
        return torch.nn.functional.binary_cross_entropy_with_logits(out, y)
    return torch.nn.functional.mse_loss(out, y)


def _examples_per_batch(cfg, batch_size):
    """A batch of ``batch_size`` in the plan's unit, in examples (tokens: T per example)."""
    return int(batch_size) // cfg["tpe"]


def run_main(cfg, history_path):
    """The main run: B₀ examples a step, the tracker writing the history; the checkpoints."""
    import noisescale

    x, y = _data(cfg)
    model = _model(cfg)
    opt = _optimizer(cfg, model, cfg["lr0"])
    tpe = cfg["tpe"] if cfg["unit"] == "tokens" else None
    tracker = noisescale.GradientNoiseTracker(
        model, history_path=history_path, optimizer=opt, tokens_per_example=tpe
    )
    order = np.random.default_rng(cfg["data_seed"] + 2)
    checkpoints = {}
    for step in range(cfg["main_steps"] + 1):
        if step in cfg["ck_steps"]:
            checkpoints[step] = {
                "model": {k: v.clone() for k, v in model.state_dict().items()},
                "opt_raw": _clone_opt_state(opt),
            }
        if step == cfg["main_steps"]:
            break
        idx = torch.as_tensor(order.integers(0, N_DATA, cfg["b0"]))
        loss = _loss(cfg, model, x[idx], y[idx])
        loss.backward()
        tracker.step(loss=loss)
        opt.step()
        opt.zero_grad()
    tracker.remove()
    return checkpoints


def _clone_opt_state(opt):
    sd = opt.state_dict()
    state = {
        k: {kk: (vv.clone() if torch.is_tensor(vv) else vv) for kk, vv in v.items()}
        for k, v in sd["state"].items()
    }
    return {"state": state, "param_groups": [dict(g) for g in sd["param_groups"]]}


def position(cfg, step):
    """A main-run step's position in the plan's unit."""
    return step * cfg["b0"] * (cfg["tpe"] if cfg["unit"] == "tokens" else 1)


def branch_curve(cfg, checkpoints, batch_size, learning_rate, checkpoint, budget, seed, report):
    """The branch as the docs' training function: the checkpoint's weights and optimizer
    state, a constant rate, ⌈budget/B⌉ steps of B (in the unit), the loss on the whole data
    set at 0, every few steps and at the end."""
    x, y = _data(cfg)
    step_of = {position(cfg, s): s for s in cfg["ck_steps"]}
    ck = checkpoints[step_of[checkpoint]]
    model = _model(cfg)
    model.load_state_dict(ck["model"])
    opt = _optimizer(cfg, model, learning_rate)
    opt.load_state_dict(copy.deepcopy(ck["opt_raw"]))  # (loading shares the tensors)
    for group in opt.param_groups:
        group["lr"] = learning_rate
    per = _examples_per_batch(cfg, batch_size)
    order = np.random.default_rng(
        [cfg["data_seed"], int(seed), int(batch_size), step_of[checkpoint]]
    )
    steps = math.ceil(budget / batch_size)
    every = max(1, steps // cfg["points"])
    ev = cfg.get("eval", "full")
    xe, ye = (x[:6], y[:6]) if ev != "full" else (x, y)
    with torch.no_grad():
        report(0, float(_loss(cfg, model, xe, ye)), 0)
    for step in range(1, steps + 1):
        idx = torch.as_tensor(order.integers(0, N_DATA, per))
        loss = _loss(cfg, model, x[idx], y[idx])
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % every == 0 or step == steps:
            if ev == "batch":
                full = float(loss.detach())
            else:
                with torch.no_grad():
                    full = float(_loss(cfg, model, xe, ye))
            report(step, full, step * batch_size)
            if not math.isfinite(full):
                return  # diverged: the docs' NaN loss, and the branch stops
            hook = CURRENT.get("hook")
            if hook is not None:
                hook(batch_size, seed, checkpoint, step, steps)


def train(batch_size, learning_rate, reporter, *, checkpoint, budget, seed):
    """The training function handed to ``run_branches`` (module-level: workers fork)."""
    cfg, checkpoints = CURRENT["cfg"], CURRENT["checkpoints"]

    def report(step, loss, examples):
        reporter.report(step, loss, examples=examples)

    branch_curve(cfg, checkpoints, batch_size, learning_rate, checkpoint, budget, seed, report)


# --- the learning rates by hand --------------------------------------------------------------


def rate_by_hand(cfg, b):
    b0, lr0 = cfg["b0"] * _unit_factor(cfg), cfg["lr0"]
    rule = cfg["lr_rule"]
    if rule == "none":
        return lr0
    if rule == "linear":
        return lr0 * b / b0
    if rule == "sqrt":
        return lr0 * math.sqrt(b / b0)
    bs, a = cfg["b_star"], cfg["alpha"]
    return lr0 * ((1 + bs / b0) / (1 + bs / b)) ** a  # eq. A.3's ratio, ε(B₀) = ε₀


def _unit_factor(cfg):
    return cfg["tpe"] if cfg["unit"] == "tokens" else 1


def plan_of(cfg):
    from noisescale.branch import BranchPlan

    f = _unit_factor(cfg)
    return BranchPlan(
        checkpoints=tuple(position(cfg, s) for s in cfg["ck_steps"]),
        batch_sizes=tuple(b * f for b in cfg["sizes"]),
        base_batch_size=cfg["b0"] * f,
        base_learning_rate=cfg["lr0"],
        budget=cfg["budget"] * f,
        lr_rule=cfg["lr_rule"],
        alpha=cfg["alpha"],
        b_star=None if cfg["b_star"] is None else cfg["b_star"] * f,
        lr_grid=tuple(cfg["grid"]),
        repeats=cfg["repeats"],
        unit=cfg["unit"],
    )


def planned_by_hand(cfg):
    """(checkpoint, B, rate, seed) of every planned branch, rates by the docs' rule."""
    f = _unit_factor(cfg)
    out = []
    for s in cfg["ck_steps"]:
        for b in cfg["sizes"]:
            bb = b * f
            cfg_u = dict(cfg, b_star=None if cfg["b_star"] is None else cfg["b_star"] * f)
            for m in cfg["grid"]:
                out += [
                    (position(cfg, s), bb, rate_by_hand(cfg_u, bb) * m, r)
                    for r in range(cfg["repeats"])
                ]
    return out


# --- running the branches ----------------------------------------------------------------------


def _run(plan, url, **kw):
    from noisescale.branch import run_branches

    return run_branches(train, plan, storage=url, study_name="fz", progress=False, **kw)


def _child(plan, url, kill_at):
    import logging

    import optuna

    optuna.logging.set_verbosity(logging.ERROR)
    if kill_at is not None:

        def hook(b, seed, ck, step, steps, _at=kill_at):
            if (b, seed, ck) == _at and step >= steps // 2:
                os._exit(3)

        CURRENT["hook"] = hook
    try:
        _run(plan, url, heartbeat_interval=1, grace_period=2)
    except BaseException:
        os._exit(4)
    os._exit(0)


def run_all(cfg, plan, url):
    """Run the plan in the drawn mode; returns what happened (for the record)."""
    mode = cfg["mode"]
    units = plan.units()
    pick = units[len(units) // 2].params
    at = (pick["batch_size"], pick["seed"], pick["checkpoint"])
    events = []
    if mode == "raise":

        def hook(b, seed, ck, step, steps):
            if (b, seed, ck) == at and step >= steps // 2 and not CURRENT.get("raised"):
                CURRENT["raised"] = True
                raise RuntimeError("a crash mid-branch")

        CURRENT["hook"] = hook
        try:
            _run(plan, url)
            events.append("no raise")
        except Exception as err:
            events.append(f"raised {type(err).__name__}")
        CURRENT["hook"] = None
        _run(plan, url)
    elif mode in ("kill", "two"):
        ctx = multiprocessing.get_context("fork")
        kill_at = at if mode == "kill" else None
        procs = [ctx.Process(target=_child, args=(plan, url, kill_at))]
        if mode == "two":
            procs.append(ctx.Process(target=_child, args=(plan, url, None)))
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        events.append(f"exit codes {[p.exitcode for p in procs]}")
        if mode == "kill":
            time.sleep(3.5)  # past the 2 s grace period: the killed branch is handed on
        _run(plan, url, heartbeat_interval=1, grace_period=2)
    else:
        _run(plan, url)
        if mode == "repeat":
            summary = _run(plan, url)
            events.append(f"second call: {summary.counts_dict()}")
    return events


# --- checks --------------------------------------------------------------------------------------


def _close(a, b, tol=RTOL):
    if a is None or b is None:
        return a is None and b is None
    a, b = float(a), float(b)
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= tol * max(abs(a), abs(b), 1e-300)


def _crash(err):
    return {"cls": "CRASH", "exc": f"{type(err).__name__}: {str(err)[:300]}"}


def check_curves(cfg, branches):
    """Every stored curve against a rerun of the training function at the stored rate (bit for
    bit) and the stored rate against the docs' rule (5e-13: 12 significant digits)."""
    bad = []
    f = _unit_factor(cfg)
    cfg_u = dict(cfg, b_star=None if cfg["b_star"] is None else cfg["b_star"] * f)
    for br in branches:
        run = br.run
        b = int(run.batch_size)
        hand = [rate_by_hand(cfg_u, b) * m for m in cfg["grid"]]
        if not any(abs(run.learning_rate - h) <= 5e-12 * h for h in hand):
            bad.append(f"B={b} rate {run.learning_rate!r} not the rule's {hand}")
            continue
        rows: list = []
        branch_curve(
            cfg, CURRENT["checkpoints"], b, run.learning_rate, br.checkpoint, br.budget,
            br.seed, lambda s, loss, e, rows=rows: rows.append((s, loss, e)),
        )  # fmt: skip
        finite = [r for r in rows if math.isfinite(r[1])]
        want_s = [float(r[0]) for r in finite]
        want_e = [float(r[2]) for r in finite]
        want_l = [r[1] for r in finite]
        got_s, got_e, got_l = (
            list(map(float, run.step)),
            list(map(float, run.examples)),
            list(map(float, run.metric)),
        )
        if (got_s, got_e, got_l) != (want_s, want_e, want_l):
            bad.append(
                f"ck={br.checkpoint:g} B={b} seed={br.seed}: stored {len(got_l)} records "
                f"{got_l[-3:]} at {got_e[-3:]} for {len(want_l)} {want_l[-3:]} at {want_e[-3:]}"
            )
            continue
        diverged = len(finite) < len(rows)
        if not diverged and not (
            got_e[-1] >= br.budget and (len(got_e) < 2 or got_e[-2] < br.budget)
        ):
            bad.append(f"B={b}: records end at {got_e[-2:]}, budget {br.budget:g}")
    return {"cls": "WRONG", "bad": bad[:4]} if bad else {"cls": "ok", "n": len(branches)}


def check_stored(cfg, branches):
    """Each planned branch stored exactly once: matched on checkpoint, batch size and seed, and
    on the rate to 5e-12 (stored to 12 significant digits; rounding both sides to a fixed
    number of decimals straddled a rounding edge at a rate of 11.14)."""
    want = [(float(c), float(b), lr, s) for c, b, lr, s in planned_by_hand(cfg)]
    left = list(branches)
    missing = []
    for c, b, lr, s in want:
        hits = [
            x for x in left
            if (x.checkpoint, float(x.batch_size), x.seed) == (c, b, s)
            and abs(x.learning_rate - lr) <= 5e-12 * lr
        ]  # fmt: skip
        if hits:
            left.remove(hits[0])
        else:
            missing.append((c, b, lr, s))
    if missing or left:
        extra = [(x.checkpoint, x.batch_size, x.learning_rate, x.seed) for x in left]
        return {"cls": "WRONG", "extra": extra[:5], "missing": missing[:5], "n": len(branches)}
    return {"cls": "ok", "n": len(branches)}


def _loss_at_budget(examples, losses, budget):
    if not np.all(np.isfinite(losses)) or examples[-1] < budget:
        return math.inf  # diverged before the budget (its curve stops at the NaN)
    return float(np.interp(budget, examples, losses))


def _eta(ref_e, ref_l, loss, budget):
    """E_ref(loss)/Δ: the reference's first record at or below the loss, interpolated from the
    one before; 1 when it never gets there, 0 for a diverged branch."""
    if not math.isfinite(loss):
        return 0.0
    for i, v in enumerate(ref_l):
        if v <= loss:
            if i == 0:
                return 0.0
            frac = (ref_l[i - 1] - loss) / (ref_l[i - 1] - v)
            return min(1.0, (ref_e[i - 1] + frac * (ref_e[i] - ref_e[i - 1])) / budget)
    return 1.0


def _threshold(sizes, etas, tau):
    inv = [1 / e if e > 0 else math.inf for e in etas]
    within = [i for i, v in enumerate(inv) if v <= (1 + tau) * (1 + 1e-12)]
    j = within[-1]
    if j == len(sizes) - 1:
        return float(sizes[j]), "upper"
    if not math.isfinite(inv[j + 1]):
        return float(sizes[j]), None
    return sizes[j] + (1 + tau - inv[j]) / (inv[j + 1] - inv[j]) * (sizes[j + 1] - sizes[j]), None


def _sse(bu, x, bref, c):
    return float(np.sum((x - np.log((bu + c) / (bref + c))) ** 2))


def _b_crit(sizes, etas, bref):
    """Eq. 2.11's B_crit by least squares in log 1/η: a dense scan of [B_min/1e3, B_max·1e3]
    and a bounded refinement; a bound where the minimum is at an end (docs/branch.md)."""
    b, eta = np.asarray(sizes, float), np.asarray(etas, float)
    above = b > bref
    if not above.any():
        return (math.nan, None), None  # nothing above the reference (reference='best')
    usable = above & (eta > 0) & (eta < 1)
    if not usable.any():
        return (
            (float(b.max()), "upper") if np.any(eta[above] >= 1) else (float(b.min()), "lower")
        ), None
    bu, x = b[usable], np.log(1 / eta[usable])
    lo, hi = math.log(b.min() / 1e3), math.log(b.max() * 1e3)
    grid = np.linspace(lo, hi, 6001)
    vals = np.array([_sse(bu, x, bref, math.exp(g)) for g in grid])
    i = int(np.argmin(vals))
    best_val = vals[i]
    if i == 0:
        return (float(b.min()), "lower"), (bu, x, best_val)
    if i == grid.size - 1:
        return (float(b.max()), "upper"), (bu, x, best_val)
    r = sopt.minimize_scalar(
        lambda g: _sse(bu, x, bref, math.exp(g)), bounds=(grid[i - 1], grid[i + 1]),
        method="bounded", options={"xatol": 1e-12},
    )  # fmt: skip
    return (math.exp(r.x), None), (bu, x, min(best_val, r.fun))


def _log_t(values, conf):
    v = np.array([x for x in values if math.isfinite(x) and x > 0])
    if v.size == 0:
        return math.nan, math.nan, math.nan
    if v.size == 1:
        return float(v[0]), math.nan, math.nan
    lg = np.log(v)
    half = sps.t.ppf(0.5 + conf / 2, v.size - 1) * lg.std(ddof=1) / math.sqrt(v.size)
    return math.exp(lg.mean()), math.exp(lg.mean() - half), math.exp(lg.mean() + half)


def cbs_by_hand(cfg, branches, tau, reference):
    """Per checkpoint: the docs' numbers from the stored curves, or ("refuse", why)."""
    out = {}
    for c in sorted({b.checkpoint for b in branches}):
        mine = [b for b in branches if b.checkpoint == c]
        by = {}
        for b in mine:
            by.setdefault((b.batch_size, b.learning_rate), {})[b.seed] = b
        sizes = sorted({k[0] for k in by})
        budget = mine[0].budget
        loss = {
            k: {
                s: _loss_at_budget(np.asarray(r.run.examples), np.asarray(r.run.metric), budget)
                for s, r in v.items()
            }
            for k, v in by.items()
        }

        def mean(vals):
            vals = list(vals)
            return math.inf if any(not math.isfinite(v) for v in vals) else float(np.mean(vals))

        chosen = {}
        for b in sizes:
            lrs = sorted(lr for bb, lr in by if bb == b)
            chosen[b] = min(lrs, key=lambda lr, b=b: mean(loss[(b, lr)].values()))
        seeds = sorted(set.intersection(*[set(by[(b, chosen[b])]) for b in sizes]))
        mloss = {b: mean(loss[(b, chosen[b])][s] for s in seeds) for b in sizes}
        ref = sizes[0] if reference == "smallest" else min(sizes, key=lambda b: mloss[b])
        if any(not math.isfinite(loss[(ref, chosen[ref])][s]) for s in seeds):
            out[c] = ("refuse", "diverged")
            continue
        eta = np.ones((len(sizes), len(seeds)))
        for i, b in enumerate(sizes):
            if b == ref:
                continue
            for k, s in enumerate(seeds):
                r = by[(ref, chosen[ref])][s].run
                eta[i, k] = _eta(
                    list(map(float, r.examples)),
                    list(map(float, r.metric)),
                    loss[(b, chosen[b])][s],
                    budget,
                )
        crossing = any(sizes[i] > ref and mloss[sizes[i]] <= mloss[ref] for i in range(len(sizes)))
        out[c] = want_from_eta(sizes, seeds, ref, chosen, mloss, eta, tau, 0.95, crossing)
    return out


def want_from_eta(sizes, seeds, ref, chosen, mloss, eta, tau, confidence, crossing):
    """The docs' numbers at one branch point from its efficiencies η[batch size, seed]: the
    threshold at τ, eq. 2.11's B_crit per seed, their log-t intervals at ``confidence``, the
    bounds and open ends (also used by tests/fuzz_branch_options.py)."""
    per_cbs = [_threshold(sizes, eta[:, k], tau) for k in range(len(seeds))]
    per_crit = [_b_crit(sizes, eta[:, k], ref) for k in range(len(seeds))]
    cbs = _log_t([v for v, _ in per_cbs], confidence)
    crit = _log_t([v for (v, _), _ in per_crit], confidence)
    cbs_bound = "upper" if any(bd == "upper" for _, bd in per_cbs) else None
    above = [b for b in sizes if b > ref]
    if cbs_bound is None and above and all(v < above[0] for v, _ in per_cbs):
        cbs_bound = "lower"
    bds = {bd for (_, bd), _ in per_crit if bd}
    crit_bound = "upper" if "upper" in bds else ("lower" if "lower" in bds else None)
    cbs = list(cbs)
    crit = list(crit)
    if cbs_bound == "upper":
        cbs[2] = math.inf
    if crit_bound == "upper":
        crit[2] = math.inf
    elif crit_bound == "lower":
        crit[1] = 0.0
    if len(seeds) > 1 and crit[2] > sizes[-1]:
        crit[2] = math.inf
    if len(seeds) > 1 and crit[1] < ref:
        crit[1] = 0.0
    if bds == {"upper", "lower"}:
        # one seed past each end: no B_crit and no bound (docs/branch.md; a review found
        # the geometric mean given as "≥" it)
        crit, crit_bound = [math.nan, math.nan, math.nan], None
    mean_eta = eta.mean(axis=1)
    return {
        "ref": ref,
        "seeds": seeds,
        "sizes": sizes,
        "chosen": chosen,
        "loss": mloss,
        "eta": eta,
        "mean_eta": mean_eta,
        "within": [bool(e > 0 and 1 / e <= 1 + tau) for e in mean_eta],
        "cbs": cbs,
        "cbs_bound": cbs_bound,
        "crit": crit,
        "crit_bound": crit_bound,
        "per_crit": per_crit,
        "crossing": crossing,
    }


def compare_cbs(want, results):
    bad = []
    got = {r.checkpoint: r for r in results}
    for c, w in want.items():
        r = got.get(c)
        if r is None:
            bad.append(f"ck {c:g}: no result")
            continue
        if r.reference_batch_size != w["ref"] or list(r.seeds) != w["seeds"]:
            bad.append(
                f"ck {c:g}: reference {r.reference_batch_size} seeds {r.seeds} for "
                f"{w['ref']} {w['seeds']}"
            )
            continue
        for i, be in enumerate(r.batches):
            b = w["sizes"][i]
            if be.batch_size != b or be.learning_rate != w["chosen"][b]:
                bad.append(f"ck {c:g} B={b}: rate {be.learning_rate} for {w['chosen'][b]}")
            if not _close(be.loss, w["loss"][b]):
                bad.append(f"ck {c:g} B={b}: loss {be.loss} for {w['loss'][b]}")
            for k, e in enumerate(be.efficiencies):
                if not _close(e, w["eta"][i, k]):
                    bad.append(
                        f"ck {c:g} B={b} seed {w['seeds'][k]}: η {e:.10g} for {w['eta'][i, k]:.10g}"
                    )
            if be.within_tolerance != w["within"][i]:
                bad.append(f"ck {c:g} B={b}: within {be.within_tolerance} for {w['within'][i]}")
        for name, val, hand in (
            ("cbs", r.cbs, w["cbs"][0]), ("cbs_low", r.cbs_low, w["cbs"][1]),
            ("cbs_high", r.cbs_high, w["cbs"][2]),
        ):  # fmt: skip
            if not _close(val, hand):
                bad.append(f"ck {c:g}: {name} {val} for {hand}")
        if r.cbs_bound != w["cbs_bound"]:
            bad.append(f"ck {c:g}: cbs_bound {r.cbs_bound} for {w['cbs_bound']}")
        if r.crossing != w["crossing"]:
            bad.append(f"ck {c:g}: crossing {r.crossing} for {w['crossing']}")
        crit_ok = all(
            _close(v, h, CRIT_RTOL)
            for v, h in zip((r.b_crit, r.b_crit_low, r.b_crit_high), w["crit"], strict=True)
        )
        if not crit_ok and r.b_crit_bound == w["crit_bound"]:
            # a flat valley: the minimiser moves more than the values; the library's per-seed
            # B_crit (for the diagnosis only) must reach the minimum sum of squares found here
            crit_ok = _same_minimum(w, r)
        if not crit_ok or r.b_crit_bound != w["crit_bound"]:
            bad.append(
                f"ck {c:g}: B_crit {r.b_crit} [{r.b_crit_low}, {r.b_crit_high}] {r.b_crit_bound} "
                f"for {w['crit']} {w['crit_bound']} (per seed {[v for v, _ in w['per_crit']]})"
            )
    return bad


def _same_minimum(w, r):
    from noisescale.branch.compare import b_crit_from_efficiencies

    for k in range(len(w["seeds"])):
        (_, bound), fit = w["per_crit"][k]
        if fit is None or bound is not None:
            continue
        bu, x, best = fit
        c, _ = b_crit_from_efficiencies(w["sizes"], w["eta"][:, k], w["ref"])
        # float64 round-off in a sum of a few squares
        if _sse(bu, x, w["ref"], c) > best * (1 + 1e-9) + 1e-15:
            return False
    return True


def check_cbs(cfg, branches, plan):
    from noisescale.branch import local_critical_batch_sizes

    tau, ref = cfg["tolerance"], cfg["reference"]
    want = cbs_by_hand(cfg, branches, tau, ref)
    refuse = [c for c, w in want.items() if isinstance(w, tuple)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results = local_critical_batch_sizes(
                branches, tolerance=tau, reference=ref,
                reference_batch_size=float(min(plan.batch_sizes)) if ref == "smallest" else None,
            )  # fmt: skip
    except NoiseScaleInputError as err:
        if refuse and "diverged" in str(err):
            return {"cls": "refused-ok", "why": str(err)[:160]}, None, want
        return {"cls": "FALSE-REFUSAL", "exc": str(err)[:300]}, None, want
    except Exception as err:
        return _crash(err), None, want
    if refuse:
        return (
            {"cls": "WRONG", "bad": [f"ck {refuse}: the reference diverged, yet numbers"]},
            results,
            want,
        )
    bad = compare_cbs(want, results)
    return ({"cls": "WRONG", "bad": bad[:6]} if bad else {"cls": "ok"}), results, want


def read_history(path):
    with open(path) as fh:
        lines = [json.loads(line) for line in fh if line.strip()]
    return lines[0], lines[1:]


def side_by_hand(cfg, records, start, end):
    """The window's B_simple: mean tr Σ / mean |G|² over its steps (× T in tokens). A record's
    position counts the examples after its step, whose gradient was taken before it: the
    window's steps, from the checkpoint's weights on, are those at positions in (start, end]
    — the step that ended at the checkpoint trained before it."""
    key = "tokens_seen" if cfg["unit"] == "tokens" else "examples"
    f = cfg["tpe"] if cfg["unit"] == "tokens" else 1
    inside = [
        r for r in records
        if start < r[key] <= end and not r["skipped"]
        and r.get("g2") is not None and r.get("trace_sigma") is not None
    ]  # fmt: skip
    loss_in = [r["loss"] for r in records if start < r[key] <= end and r.get("loss") is not None]
    if not inside:
        return math.nan, 0, (float(np.mean(loss_in)) if loss_in else math.nan)
    g2 = np.mean([r["g2"] for r in inside])
    tr = np.mean([r["trace_sigma"] for r in inside])
    # an average |G|² (or tr Σ) ≤ 0: no B_simple (estimators' "not available", shown as —)
    return (
        (f * tr / g2 if g2 > 0 and tr > 0 else math.nan),
        len(inside),
        (float(np.mean(loss_in)) if loss_in else math.nan),
    )


def check_side(cfg, results, history_path, rng):
    from noisescale import load_history
    from noisescale.branch import side_by_side
    from noisescale.branch.side import b_simple_trajectory, read_b_noise, window_b_simple

    _, records = read_history(history_path)
    unit = cfg["unit"]
    f = cfg["tpe"] if unit == "tokens" else 1
    key = "tokens_seen" if unit == "tokens" else "examples"
    bad = []
    noise_recs = []
    if cfg["b_noise_records"]:
        for r in records:
            if rng.random() < 0.4:
                noise_recs.append(
                    {
                        "step": r["step"],
                        "ghg": rng.uniform(0.1, 2.0),
                        "trace_h_sigma": rng.uniform(0.5, 50.0),
                    }
                )
    try:
        history = load_history(history_path)
        points = read_b_noise(noise_recs, history, unit)
        rows = side_by_side(results, history, unit=unit, b_noise=points)
        traj = b_simple_trajectory(history, unit)
    except Exception as err:
        return _crash(err)
    summary, summary_rows = [], None
    if cfg.get("b_noise_summary"):
        srng = random.Random(cfg["data_seed"] + 11)
        for r in results:
            for at in (r.checkpoint, r.checkpoint + r.budget):
                summary.append((float(at), round(srng.uniform(1.0, 100.0), 6)))
        try:
            spoints = read_b_noise([{unit: at, "b_noise": v} for at, v in summary], None, unit)
            summary_rows = side_by_side(results, history, unit=unit, b_noise=spoints)
        except Exception as err:
            return _crash(err)
    pos_of = {r["step"]: r[key] for r in records}
    for p, rec in zip(points, noise_recs, strict=True):
        if not (
            _close(p.examples, pos_of[rec["step"]])
            and _close(p.b_noise, f * rec["trace_h_sigma"] / rec["ghg"])
        ):
            bad.append(f"B_noise point at step {rec['step']}: {p.examples}, {p.b_noise}")
    for row in rows:
        r = row.result
        start, end = r.checkpoint, r.checkpoint + r.budget
        bs, steps, loss = side_by_hand(cfg, records, start, end)
        e = window_b_simple(history, start, end, unit=unit)
        if (
            not (_close(row.b_simple, bs) and _close(e.b_simple, bs))
            or row.b_simple_steps != steps
            or e.steps != steps
        ):
            bad.append(
                f"ck {start:g}: B_simple {row.b_simple} ({row.b_simple_steps} steps), window "
                f"{e.b_simple} for {bs} ({steps})"
            )
        if not _close(row.loss, loss):
            bad.append(f"ck {start:g}: loss {row.loss} for {loss}")
        inside = [
            q
            for q, rec in zip(points, noise_recs, strict=True)
            if start <= pos_of[rec["step"]] < end
        ]
        if inside:
            want = (
                f
                * np.mean(
                    [
                        rec["trace_h_sigma"]
                        for rec in noise_recs
                        if start <= pos_of[rec["step"]] < end
                    ]
                )
                / np.mean([rec["ghg"] for rec in noise_recs if start <= pos_of[rec["step"]] < end])
            )
            if not _close(row.b_noise, want):
                bad.append(f"ck {start:g}: B_noise {row.b_noise} for {want}")
        elif not math.isnan(row.b_noise):
            bad.append(f"ck {start:g}: B_noise {row.b_noise} with no point in the window")
        if summary_rows is not None:
            # the weights from the checkpoint's on: positions in [start, end) (docs/branch.md)
            want_s = [v for at, v in summary if start <= at < end]
            got = {q.result.checkpoint: q.b_noise for q in summary_rows}[start]
            if not _close(got, float(np.mean(want_s)) if want_s else math.nan):
                bad.append(f"ck {start:g}: summary B_noise {got} for the mean of {want_s}")
        if not _close(
            row.ratio_b_crit, r.b_crit / bs if bs > 0 and math.isfinite(bs) else math.nan
        ):
            bad.append(f"ck {start:g}: ratio {row.ratio_b_crit} for {r.b_crit}/{bs}")
    keep = [
        r
        for r in records
        if not r["skipped"] and r.get("b_simple") is not None and r["b_simple"] > 0
    ]
    want_x = [float(r[key]) for r in keep]
    want_y = [f * r["b_simple"] for r in keep]
    if (
        list(traj.examples) != want_x
        or not all(_close(a, b) for a, b in zip(traj.b_simple, want_y, strict=False))
        or len(traj.b_simple) != len(want_y)
    ):
        bad.append(
            f"trajectory {list(traj.b_simple)[:3]} at {list(traj.examples)[:3]} for "
            f"{want_y[:3]} at {want_x[:3]}"
        )
    return {"cls": "WRONG", "bad": bad[:6]} if bad else {"cls": "ok", "rows": len(rows)}


def warmup_by_hand(results, base, total):
    allowed = sorted({int(b.batch_size) for r in results for b in r.batches})
    knots = [(0.0, allowed[0])]
    for r in sorted(results, key=lambda r: r.checkpoint):
        t = r.cbs
        if not (math.isfinite(t) and t > 0):
            continue
        fit = [b for b in allowed if b <= t * (1 + 1e-9)]
        b = max(fit[-1] if fit else allowed[0], knots[-1][1])
        if b == knots[-1][1]:
            continue
        if r.checkpoint <= knots[-1][0]:
            knots[-1] = (knots[-1][0], b)
        else:
            knots.append((float(r.checkpoint), b))

    def stage(e):
        b = knots[0][1]
        for s, bb in knots:
            if e >= s:
                b = bb
        return b

    steps = sum(
        max(0.0, min(knots[i + 1][0] if i + 1 < len(knots) else math.inf, total) - s) / b
        for i, (s, b) in enumerate(knots)
    )
    pts = sorted(
        (r.checkpoint + r.budget / 2, r.b_crit)
        for r in results
        if math.isfinite(r.b_crit) and r.b_crit > 0
    )
    # docs: eq. D.1 "with the measured B_crit" — a B_crit that is only a bound (≥ the largest
    # batch size, ≤ the smallest) is no measurement: no prediction, with the reason
    bounded = any(r.b_crit_bound is not None and math.isfinite(r.b_crit) for r in results)
    # and one with no B_crit (seeds past both ends, none above the reference) leaves none either
    unmeasured = any(not math.isfinite(r.b_crit) for r in results)
    if not pts or bounded or unmeasured:
        return knots, stage, steps, math.nan, math.nan
    px, py = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])

    def crit_at(e):
        return float(np.interp(e, px, py))

    # The fixed run's progress s(e) = ∫ de/(B₀ + B_crit(e)), fine trapezoids; then the warm-up
    # (dE/ds = B(E) + B_crit(s), dS/ds = 1 + B_crit(s)/B(E)) by RK2 on 100,000 steps of s.
    n = 100_000
    e_main = np.linspace(0, total, n + 1)
    crit_main = np.interp(e_main, px, py)
    rate = 1 / (base + crit_main)
    s_main = np.concatenate([[0.0], np.cumsum(np.diff(e_main) * (rate[1:] + rate[:-1]) / 2)])
    ds = s_main[-1] / n
    s_grid = (np.arange(n) + 0.5) * ds
    crit_s = np.interp(s_grid, s_main, crit_main)
    e, st = 0.0, 0.0
    for i in range(n):
        c = crit_s[i]
        b = stage(e + 0.5 * ds * (stage(e) + c))
        e += ds * (b + c)
        st += ds * (1 + c / b)
    return knots, stage, steps, e, st


def check_warmup(cfg, results, total):
    from noisescale.branch import fit_warmup
    from noisescale.branch.warmup import stage_batch_size, warmup_steps

    base = cfg["b0"] * _unit_factor(cfg)
    try:
        plan = fit_warmup(results, base_batch_size=base, total=total)
    except Exception as err:
        return _crash(err)
    knots, stage, steps, e_same, s_same = warmup_by_hand(results, base, total)
    bad = []
    if [tuple(k) for k in plan.knots] != [(float(a), int(b)) for a, b in knots]:
        bad.append(f"knots {plan.knots} for {knots}")
    for e in np.linspace(0, total, 23):
        if stage_batch_size(plan.knots, e) != stage(e):
            bad.append(f"stage at {e}: {stage_batch_size(plan.knots, e)} for {stage(e)}")
            break
    if not _close(plan.steps_warmup, steps) or not _close(warmup_steps(plan.knots, total), steps):
        bad.append(f"steps {plan.steps_warmup} for {steps}")
    if not _close(plan.steps_fixed, total / base):
        bad.append(f"steps_fixed {plan.steps_fixed}")
    # The library's 4,000 midpoint steps in s: a stage change within a step misplaces at most
    # that step's examples, ds·ΔB each — relative ≤ (changes)·ΔB_max/(B_min·4000); 2× that.
    n_changes = len(plan.knots)
    tol = (
        2 * n_changes * max(k[1] for k in plan.knots) / (min(k[1] for k in plan.knots) * 4000)
        + 1e-5
    )
    if not (
        _close(plan.examples_same_progress, e_same, tol)
        and _close(plan.steps_same_progress, s_same, tol)
    ):
        bad.append(
            f"same progress: {plan.examples_same_progress} examples, "
            f"{plan.steps_same_progress} steps "
            f"for {e_same}, {s_same} (tol {tol:.2g})"
        )
    return (
        {"cls": "WRONG", "bad": bad[:5]}
        if bad
        else {"cls": "ok", "knots": [list(k) for k in plan.knots]}
    )


def check_cli(cfg, url, history_path, results, total):
    from noisescale.cli import main as cli_main

    argv = ["branch", "--storage", url, "--study", "fz", "--json", "--no-progress",
            "--tolerance", repr(cfg["tolerance"]), "--reference", cfg["reference"],
            "--history", history_path]  # fmt: skip
    out, err = io.StringIO(), io.StringIO()
    try:
        with (
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")
            rc = cli_main(argv)
    except SystemExit as exc:
        rc = exc.code
    except Exception as exc:
        return _crash(exc)
    if results is None:
        if rc == 2 and "diverged" in err.getvalue():
            return {"cls": "refused-ok"}
        return {"cls": "WRONG" if rc == 0 else "CRASH", "rc": rc, "err": err.getvalue()[-300:]}
    if rc != 0:
        return {"cls": "FALSE-REFUSAL", "rc": rc, "err": err.getvalue()[-300:]}
    data = json.loads(out.getvalue())
    bad = []
    got = {p["branch"]["checkpoint"]: p["branch"] for p in data["points"]}
    for r in results:
        p = got.get(r.checkpoint)
        if p is None:
            bad.append(f"ck {r.checkpoint:g} missing")
            continue
        for k in ("cbs", "cbs_low", "cbs_high", "b_crit", "b_crit_low", "b_crit_high"):
            v = getattr(r, k)
            if not _close(p[k], v if math.isfinite(v) else None):
                bad.append(f"ck {r.checkpoint:g}: {k} {p[k]} for {v}")
    w = data["warmup"]
    if w is not None and not _close(w["total"], total):
        bad.append(f"warm-up total {w['total']} for {total}")
    if w is not None:
        # the warm-up the command fitted: the library's on the same results (the plan's B₀)
        from noisescale.branch import fit_warmup

        plan = fit_warmup(results, base_batch_size=cfg["b0"] * _unit_factor(cfg), total=total)
        if [tuple(k) for k in w["knots"]] != [tuple(k) for k in plan.knots]:
            bad.append(f"warm-up knots {w['knots']} for {plan.knots}")
        for key in ("steps_warmup", "steps_same_progress", "examples_same_progress"):
            v = getattr(plan, key)
            if not _close(w[key], v if math.isfinite(v) else None):
                bad.append(f"warm-up {key} {w[key]} for {v}")
        if w["steps_same_progress"] is None and not w["same_progress_reason"]:
            bad.append("no prediction at equal progress, and no reason given")
    return {"cls": "WRONG", "bad": bad[:5]} if bad else {"cls": "ok"}


def check_seed(seed, override=None, checks=CHECKS):
    import logging

    import optuna

    optuna.logging.set_verbosity(logging.ERROR)
    cfg = draw_config(seed)
    if override:
        cfg.update(override)
    t0 = time.time()
    rng = random.Random(seed + 7)
    torch.set_num_threads(1)
    out = {c: {"cls": "skip"} for c in CHECKS}
    with tempfile.TemporaryDirectory() as tmp:
        history_path = os.path.join(tmp, "history.jsonl")
        url = f"sqlite:///{tmp}/b.db"
        try:
            plan = plan_of(cfg)
        except NoiseScaleInputError as err:
            return {"seed": seed, "cfg": cfg, "gen_error": str(err)[:200]}
        CURRENT.clear()
        CURRENT["cfg"] = cfg
        CURRENT["checkpoints"] = run_main(cfg, history_path)
        try:
            events = run_all(cfg, plan, url)
        except Exception as err:
            out["stored"] = _crash(err)
            return {"seed": seed, "cfg": cfg, "checks": out, "time": round(time.time() - t0, 2)}
        from noisescale.branch import read_branches

        try:
            branches = read_branches(url, "fz")
        except Exception as err:
            out["stored"] = _crash(err)
            return {"seed": seed, "cfg": cfg, "checks": out, "time": round(time.time() - t0, 2)}
        if "curve" in checks:
            out["curve"] = check_curves(cfg, branches)
        if "stored" in checks:
            out["stored"] = check_stored(cfg, branches)
        out["cbs"], results, _ = check_cbs(cfg, branches, plan)
        total = float(position(cfg, cfg["main_steps"]))
        if results is not None:
            if "side" in checks:
                out["side"] = check_side(cfg, results, history_path, rng)
            if "warmup" in checks:
                out["warmup"] = check_warmup(cfg, results, total)
        if "cli" in checks:
            out["cli"] = check_cli(cfg, url, history_path, results, total)
    return {"seed": seed, "cfg": cfg, "checks": {k: v for k, v in out.items()}, "events": events,
            "time": round(time.time() - t0, 2)}  # fmt: skip


def findings(record):
    return [(name, res) for name, res in record["checks"].items() if res["cls"] in FINDINGS]


def describe(record):
    cfg = record["cfg"]
    keys = ("kind", "opt", "unit", "tpe", "b0", "lr0", "ck_steps", "sizes", "repeats", "lr_rule")
    keys += ("grid", "budget", "points", "tolerance", "reference", "mode")
    return f"seed {record['seed']}: " + " ".join(
        f"{k}={cfg[k]:.4g}" if isinstance(cfg[k], float) else f"{k}={cfg[k]}" for k in keys
    )


def main(argv=None):
    from fuzz_runner import check_parser, run_checks

    args = check_parser(__doc__, "0:100").parse_args(argv)
    return run_checks(args, check_seed, findings, describe, CHECKS, column_width=14)


if __name__ == "__main__":
    raise SystemExit(main())
