"""The critical batch size of ``noisescale fit`` against fronts whose truth is known in closed form.

The other fuzzers check per-example norms and the tracker's statistics; this one checks the
Pareto fit of eq. 2.11–2.12 (``noisescale.sweep.critical_batch_sizes``, ``noisescale fit``). Its
generator is its own (not ``noisescale.sweep.synthetic``): a run at batch size B whose clock runs
f ≥ 1 times slow (f = 1 for the best learning rate, ``lr_slow`` for the others, times exp(σ·z)
with ``noise`` σ) has made progress s after t = f·(s + E(s)/B) steps, with
E(s) = c·s + k·s²/2 — so the steps to progress s are exactly S_min + E_min/B with S_min = s and
E_min = E(s) (eq. 2.11), and B_crit = E(s)/s = c + k·s/2 at every goal. Its loss is
L0/(1 + s/s_scale) (or L0·exp(−s/s_scale)); each goal g is the loss at a drawn progress s_g, and
every run records a point exactly at the step where it reaches each goal (its loss there is g
itself), so linear interpolation between records is exact: with no EMA and no noise the fit has
nothing to approximate.

Each seed draws a configuration (:func:`draw_config`) — 2-8 batch sizes spaced by 2 or 4, B_crit
within them or all of them far above or below it (identifiability), E(s) constant or growing,
1-4 learning rates (the best one on the front), 1-4 goals, records evenly or geometrically
spaced, shuffled rows, ``examples`` reported or not, upward bumps (a non-monotone curve that
stays above its goals until it reaches them), slower runs that diverge (NaN) or stop early, a
batch size whose runs end before the last goal, a duplicated row — and runs these checks:

* ``exact``: no EMA, no noise: S_min, E_min, B_crit and every point's S and E exact (1e-6), the
  best learning rate chosen; a goal that fewer than three batch sizes reach refused, naming that;
* ``cli``: ``noisescale fit FILE --goal ... --ema 0 --json`` on the same runs written as CSV or
  JSON Lines: every number the API's (and so the truth's);
* ``sweep``: (whole steps, every third seed) the runs reported by an in-process training
  function through ``run_sweep`` into a SQLite study, read back (``read_study_runs``) and by
  ``noisescale fit sqlite:///... --study``: the numbers of the runs given directly;
* ``start``: (runs with a record at step 0) a goal above the initial loss, met at step 0 by every
  run: refused, and not as a goal "no run reaches" with the advice to choose a higher one
  (``WRONG-CAUSE``);
* ``ema``: the same runs with ``--ema`` 0.5-0.95: B_crit off by more than ``EMA_TOL`` from the
  truth must carry a warning (the lag warning, or another);
* ``coverage``: with run-to-run noise σ (each run's clock exp(σ·z) slow, the fit's own model),
  R replicates: the 95% interval of B_crit (``b_crit_low``/``b_crit_high``) holds the truth at
  the nominal rate (binomial tail p < P_COVER a finding), fits at a bound or refused aside;
* ``smin_cover``, ``emin_cover``: the same for S_min and E_min with t·stderr in log space (their
  stderrs are what ``fit`` prints; informational unless far off);
* ``bias``: the mean of ln(B̂_crit/B_crit) over the replicates against its standard error
  (informational: the fit is not claimed unbiased; ``biased``, or ``biased-cond`` where some
  replicates' fits were at a bound and the rest are a selection);
* ``bound``: a fit at the edge of the search prints B_crit "< B" or "> B" (its 95% interval,
  unbounded on the edge's side) or "not identified"; that claim false for the truth in more than
  5% of the replicates (binomial p < P_COVER) is ``WRONG-BOUND``.

``noisescale branch`` (its own draw per seed, :func:`draw_branch_config`): branches from 1-3
checkpoints at 2-6 batch sizes whose loss is linear in the progress u = e/((B + B_n)·f), so that
every efficiency is η_B = (B_ref + B_n)/(B + B_n) and B_crit = B_n exactly (linear interpolation
between records exact too), the local CBS τ·B_n + (1 + τ)·B_ref (or a bound at the largest size);
1-3 learning rates (the others slower), 1-5 seeds, --ema 0/0.5/0.9 (its lag correction claimed
exact on linear curves), every step recorded or ~32 points:

* ``branch_exact``: η, B_crit and the local CBS at every checkpoint, no noise (1e-6), or a bound
  whose interval holds the truth;
* ``branch_cover``: with each data order's clock exp(σ·z) slow, B_crit's 95% interval over ~30
  experiments at the first checkpoint holds B_n at the nominal rate;
* ``warmup``: ``fit_warmup``'s knots from the measured CBS, its steps at equal examples by hand,
  and (B_n the same at every checkpoint) its examples and steps at equal progress in closed form;
* ``branch_cli``: (every third seed) ``noisescale branch FILE:train --json`` into a SQLite study:
  every number the API's on the same curves.

Classes per check: ``ok``; ``refused`` (a NoiseScaleError, expected); ``FALSE-REFUSAL`` (refused
where three batch sizes reach every goal); ``crash`` (any other exception); ``WRONG-SILENT`` (a
number off, or an interval that covers too little, no warning); ``wrong-warned`` (the same with a
warning); ``WRONG-CAUSE`` (a refusal whose message names the wrong cause); ``skip`` (the check
does not apply).

Run: ``PYTHONPATH=src python tests/fuzz_fit.py --seeds 0:200 [-v] [--jsonl out.jsonl]``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import random
import tempfile
import time

import numpy as np
from scipy import stats as sps

from noisescale.errors import NoiseScaleInputError as NoiseScaleError
from noisescale.sweep import Run, critical_batch_sizes

EXACT_TOL = 1e-6  # relative error of an exact fit's numbers
CLI_TOL = 1e-9  # the CLI's numbers against the API's
EMA_TOL = 0.10  # B_crit off by more than this under an EMA must be warned about
P_COVER = 1e-3  # a binomial tail this improbable for the misses is a finding
Z_BIAS = 4.5
CHECKS = (
    "exact",
    "cli",
    "sweep",
    "start",
    "ema",
    "coverage",
    "smin_cover",
    "emin_cover",
    "bias",
    "bound",
)
CHECKS += ("branch_exact", "branch_cover", "warmup", "branch_cli")


# --- the configuration ---------------------------------------------------------------------------


def draw_config(seed):
    """The grid and its truth's parameters for ``seed``."""
    r = random.Random(f"fit-{seed}")
    cfg = {
        "n_batch": r.choice([2, 3, 3, 4, 5, 6, 8]),
        "ratio": r.choice([2, 2, 4]),
        "b_lo": r.choice([1, 4, 16, 64]),
        "place": r.choice(["span", "span", "span", "above", "below"]),
        "growth": r.random() < 0.5,  # E(s) = c·s + k·s²/2, B_crit growing with the goal
        "loss": r.choice(["hyper", "exp"]),
        "s_scale": r.choice([20.0, 100.0, 1000.0]),
        "goals": r.choice([1, 2, 3, 4]),
        "lrs": r.choice([1, 2, 3, 4]),
        "records": r.choice(["even", "geom"]),
        "points": r.choice([30, 100, 300]),
        "format": r.choice(["csv", "jsonl"]),
        "examples": r.random() < 0.5,
        "shuffle": r.random() < 0.3,
        "bumps": r.random() < 0.25,
        "diverge": r.random() < 0.2,  # a slower learning rate's run diverges (NaN)
        "stop": r.random() < 0.2,  # a slower learning rate's run stops early
        "unreached": r.random() < 0.15,  # one batch size's runs end before the last goal
        "duplicate": r.random() < 0.05,  # a repeated row (refused)
        "noise": r.choice([0.02, 0.05, 0.1, 0.2, 0.3]),
        "ema": r.choice([0.5, 0.8, 0.9, 0.95]),
        "int_steps": r.random() < 0.3,  # records at whole steps only (crossings interpolated)
        "step0": r.random() < 0.3,  # a record at step 0 (the initial loss), as branches report
    }
    if cfg["int_steps"]:
        cfg["bumps"] = False  # (the crossing's bracket would not hold the truth)
    cfg["batch_sizes"] = [cfg["b_lo"] * cfg["ratio"] ** i for i in range(cfg["n_batch"])]
    lo, hi = cfg["batch_sizes"][0], cfg["batch_sizes"][-1]
    if cfg["place"] == "span":
        cfg["b_crit"] = math.exp(r.uniform(math.log(lo), math.log(hi)))
    elif cfg["place"] == "above":
        cfg["b_crit"] = hi * r.choice([10.0, 30.0, 100.0])
    else:
        cfg["b_crit"] = lo / r.choice([10.0, 30.0, 100.0])
    # progress at the goals (S_min at each), increasing
    s_goals = sorted(r.uniform(5.0, 400.0) for _ in range(cfg["goals"]))
    cfg["s_goals"] = [round(s, 6) for s in s_goals]
    # B_crit(s) = c + k·s/2: c the drawn B_crit at the first goal when there is growth
    cfg["c"] = cfg["b_crit"] / (2.0 if cfg["growth"] else 1.0)
    cfg["k"] = (cfg["b_crit"] / s_goals[0]) if cfg["growth"] else 0.0
    cfg["lr_slow"] = sorted(1.0 + r.uniform(0.2, 2.0) for _ in range(cfg["lrs"] - 1))
    return cfg


# --- the truth ------------------------------------------------------------------------------------


class Truth:
    """E(s), the loss and the goals of ``cfg``."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.c, self.k = cfg["c"], cfg["k"]
        self.s_goals = np.array(cfg["s_goals"])
        self.goals = [float(self.loss(s)) for s in self.s_goals]

    def e_of(self, s):
        return self.c * s + 0.5 * self.k * s * s

    def loss(self, s):
        s = np.asarray(s, dtype=float)
        if self.cfg["loss"] == "hyper":
            return 2.0 / (1.0 + s / self.cfg["s_scale"])
        return 0.1 + 2.0 * np.exp(-s / self.cfg["s_scale"])

    def progress(self, t, batch, slow):
        """s after t steps at ``batch`` with a clock ``slow`` times slow: the root of
        (k/2B)·s² + (1 + c/B)·s − t/slow = 0."""
        tau = np.asarray(t, dtype=float) / slow
        a = self.k / (2.0 * batch)
        b = 1.0 + self.c / batch
        return 2.0 * tau / (b + np.sqrt(b * b + 4.0 * a * tau))

    def steps_to(self, s, batch, slow=1.0):
        return slow * (s + self.e_of(s) / batch)

    def s_min(self, i):
        return float(self.s_goals[i])

    def e_min(self, i):
        return float(self.e_of(self.s_goals[i]))

    def b_crit(self, i):
        return self.e_min(i) / self.s_min(i)


def make_runs(cfg, truth, rng, noise=0.0, decay_free=True):
    """The grid's runs as rows ``{run, batch_size, learning_rate, step, loss[, examples]}`` and
    what is expected: ``reach[goal index]`` = the batch sizes whose best run reaches it."""
    rows, reach, grids = [], {i: set() for i in range(len(truth.goals))}, {}
    last_goal_s = truth.s_goals[-1]
    unreached_b = cfg["batch_sizes"][-1] if cfg["unreached"] else None
    lrs = [0.1 * (i + 1) for i in range(cfg["lrs"])]
    best_lr = random.Random(cfg["n_batch"]).choice(lrs)
    others = iter(cfg["lr_slow"])
    slows = {lr: (1.0 if lr == best_lr else next(others)) for lr in lrs}
    if noise:
        # the slower learning rates far behind: the best one wins in every replicate
        slows = {lr: (1.0 if v == 1.0 else v * math.exp(6 * noise)) for lr, v in slows.items()}
    for b in cfg["batch_sizes"]:
        for j, lr in enumerate(lrs):
            slow = slows[lr] * (math.exp(noise * rng.standard_normal()) if noise else 1.0)
            crossings = truth.steps_to(truth.s_goals, b, slow)
            end = float(truth.steps_to(last_goal_s * 1.3, b, slow))
            if b == unreached_b:
                end = float(0.5 * (crossings[-1] + (crossings[-2] if len(crossings) > 1 else 0)))
            diverge_at = None
            if slows[lr] > 1.0 and cfg["diverge"] and j % 2 == 0:
                diverge_at = float(crossings[0] * 0.8 + 0.2 * end)
            if slows[lr] > 1.0 and cfg["stop"] and j % 2 == 1:
                end = float(crossings[0] * 0.9)
            n = cfg["points"]
            if cfg["records"] == "even":
                grid = np.linspace(end / n, end, n)
            else:
                grid = np.geomspace(max(end / 3000.0, 1e-3), end, n)
            if cfg["int_steps"]:
                grid = np.unique(np.maximum(np.round(grid), 1.0))
            loss = truth.loss(truth.progress(grid, b, slow))
            if cfg["bumps"]:
                loss = loss * (1.0 + 0.3 * np.sin(7.0 * np.log1p(grid)) ** 2)
            if not cfg["int_steps"]:
                # a record exactly at each goal's crossing (loss = the goal itself)
                keep = np.ones(grid.size, bool)
                for t in crossings:
                    keep &= np.abs(grid - t) > 1e-6 * t
                inside = crossings[crossings <= end]
                goals_in = np.array(truth.goals[: inside.size])
                grid = np.concatenate([grid[keep], inside])
                loss = np.concatenate([loss[keep], goals_in])
                order = np.argsort(grid)
                grid, loss = grid[order], loss[order]
            if diverge_at is not None:
                loss = np.where(grid >= diverge_at, np.nan, loss)
            if cfg.get("step0"):
                grid = np.concatenate([[0.0], grid])
                loss = np.concatenate([[float(truth.loss(0.0))], loss])
            name = f"b{b:g}_lr{lr:g}"
            for t, value in zip(grid.tolist(), loss.tolist(), strict=True):
                row = {
                    "run": name,
                    "batch_size": b,
                    "learning_rate": lr,
                    "step": t,
                    "loss": value,
                }
                if cfg["examples"]:
                    row["examples"] = b * t
                rows.append(row)
            if lr == best_lr:
                grids[b] = grid
                for i, t in enumerate(crossings):
                    if t <= end:
                        reach[i].add(b)
    if cfg["shuffle"]:
        random.Random(len(rows)).shuffle(rows)
    if cfg["duplicate"]:
        rows.append(dict(rows[len(rows) // 2]))
    return rows, reach, (best_lr, grids)


def runs_of(rows):
    by = {}
    for row in rows:
        by.setdefault(row["run"], []).append(row)
    out = []
    for name, rs in by.items():
        examples = [r["examples"] for r in rs] if "examples" in rs[0] else None
        out.append(
            Run.from_arrays(
                name,
                rs[0]["batch_size"],
                rs[0]["learning_rate"],
                [r["step"] for r in rs],
                [r["loss"] for r in rs],
                examples=examples,
            )
        )
    return out


# --- the checks -----------------------------------------------------------------------------------


def _cli_json(argv, refused_raised=False):
    """noisescale's CLI on ``argv`` (its output read as JSON): ``(output, None)``, or ``(None,
    result)`` — a crash, or a FALSE-REFUSAL (an exit code other than 0; with
    ``refused_raised``, a NoiseScaleError raised out of it too, else counted a crash)."""
    from noisescale.cli import main as cli_main

    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
            rc = cli_main(argv)
    except SystemExit as err:
        rc = err.code
    except NoiseScaleError as err:
        if refused_raised:
            return None, {"cls": "FALSE-REFUSAL", "exc": str(err)[:300]}
        return None, {"cls": "crash", "exc": f"{type(err).__name__}: {err}"[:300]}
    except Exception as err:
        return None, {"cls": "crash", "exc": f"{type(err).__name__}: {err}"[:300]}
    if rc not in (0, None):
        return None, {"cls": "FALSE-REFUSAL", "exc": f"rc {rc}"}
    return json.loads(buf.getvalue()), None


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-300)


def _fits(runs, goals, decay):
    """(results, None) or (None, a refusal/crash result)."""
    try:
        return critical_batch_sizes(runs, goals, decay=decay), None
    except NoiseScaleError as err:
        return None, {"cls": "refused", "exc": str(err)[:300]}
    except Exception as err:
        return None, {"cls": "crash", "exc": f"{type(err).__name__}: {err}"[:300]}


def _bracket(grid, t):
    """The records' interval around step ``t``: how far an interpolated crossing may be off."""
    i = int(np.searchsorted(grid, t))
    lo = grid[i - 1] if i > 0 else 0.0
    hi = grid[i] if i < grid.size else grid[-1]
    return hi - lo


def check_exact(cfg, truth, rows, reach, meta):
    """No EMA, no noise: the truth to EXACT_TOL (or a refusal where it is due); with records at
    whole steps only, each point's S within its records' bracket (the fit not compared)."""
    best_lr, grids = meta
    enough = all(len(v) >= 3 for v in reach.values())
    try:
        runs = runs_of(rows)
    except NoiseScaleError as err:
        if cfg["duplicate"] and "twice" in str(err):
            return {"cls": "refused", "exc": str(err)[:200]}, None
        return {"cls": "FALSE-REFUSAL", "exc": str(err)[:300]}, None
    except Exception as err:
        return {"cls": "crash", "exc": f"{type(err).__name__}: {err}"[:300]}, None
    if cfg["duplicate"]:
        return {"cls": "WRONG-SILENT", "why": "a repeated step accepted"}, None
    results, bad = _fits(runs, truth.goals, 0.0)
    if bad is not None:
        if bad["cls"] == "refused" and not enough:
            return bad, None
        if bad["cls"] == "refused" and "left out" in bad["exc"]:
            return bad, None  # (a stopped run not behind the fastest: documented)
        first = [b for b, g in grids.items() if g[0] >= truth.steps_to(truth.s_goals[0], b)]
        if bad["cls"] == "refused" and "at their first record" in bad["exc"] and first:
            # (the record at the first goal's crossing is the run's first: its steps to the goal
            # are only bounded by it, refused since 2026-12-07)
            return bad, None
        if bad["cls"] == "refused":
            bad = {**bad, "cls": "FALSE-REFUSAL"}
        return bad, None
    if not enough:
        return {"cls": "WRONG-SILENT", "why": f"fit where a goal has <3 batch sizes: {reach}"}, None
    worst, why = 0.0, ""
    for i, res in enumerate(results):
        fit = res.fit
        if cfg["int_steps"]:
            for p in res.points:
                want = truth.steps_to(truth.s_goals[i], p.batch_size)
                gap = _bracket(grids[p.batch_size], want)
                if abs(p.steps - want) > gap * (1 + 1e-9) or p.learning_rate != best_lr:
                    return {
                        "cls": "WRONG-SILENT",
                        "why": f"goal {i} B={p.batch_size:g}: S {p.steps:.6g} truth {want:.6g} "
                        f"(records {gap:.3g} apart), lr {p.learning_rate}",
                    }, results
            continue
        for name, got, want in (
            ("s_min", fit.s_min, truth.s_min(i)),
            ("e_min", fit.e_min, truth.e_min(i)),
            ("b_crit", fit.b_crit, truth.b_crit(i)),
        ):
            e = _rel(got, want)
            if e > worst:
                worst, why = e, f"goal {i} {name} {got:.9g} truth {want:.9g}"
        for p in res.points:
            if p.learning_rate != best_lr:
                return {
                    "cls": "WRONG-SILENT",
                    "why": f"goal {i} B={p.batch_size:g}: lr {p.learning_rate} not {best_lr}",
                }, results
            want = truth.steps_to(truth.s_goals[i], p.batch_size)
            for name, got, w in (("S", p.steps, want), ("E", p.examples, want * p.batch_size)):
                e = _rel(got, w)
                if e > worst:
                    worst, why = e, f"goal {i} B={p.batch_size:g} {name} {got:.9g} truth {w:.9g}"
    warned = any(res.warnings for res in results)
    if worst > EXACT_TOL:
        cls = "wrong-warned" if warned else "WRONG-SILENT"
        return {"cls": cls, "re": worst, "why": why}, results
    return {"cls": "ok", "re": worst}, results


def check_start(cfg, truth, rows):
    """A goal above the initial loss (met at step 0 by every run): refused, but not as one no run
    reaches with the advice to choose a higher goal."""
    if not cfg.get("step0") or cfg["duplicate"]:
        return {"cls": "skip"}
    goal = float(truth.loss(0.0)) * 1.1
    _, bad = _fits(runs_of(rows), [goal], 0.0)
    if bad is None:
        return {"cls": "WRONG-SILENT", "why": f"a fit at a goal {goal:g} above the initial loss"}
    if bad["cls"] == "refused" and "higher goal" in bad["exc"]:
        return {"cls": "WRONG-CAUSE", "exc": bad["exc"]}
    return bad


def _holds(interval: tuple[float, float], truth: float) -> bool:
    return interval[0] <= truth <= interval[1]


def check_cli(cfg, truth, rows, results):
    """``noisescale fit FILE --json`` equal to the API's results."""
    if results is None:
        return {"cls": "skip"}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "runs." + ("csv" if cfg["format"] == "csv" else "jsonl"))
        with open(path, "w", newline="") as f:
            if cfg["format"] == "csv":
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                for row in rows:
                    w.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
            else:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
        argv = ["fit", path, "--goal", ",".join(repr(g) for g in truth.goals), "--ema", "0"]
        out, result = _cli_json([*argv, "--json"], refused_raised=True)
    if result is not None:
        return result
    worst, why = 0.0, ""
    for res, got in zip(results, out["goals"], strict=True):
        want = res.as_dict()
        for key in ("goal", "s_min", "e_min", "b_crit", "b_crit_low", "b_crit_high"):
            a, b = got[key], want[key]
            if (a is None) != (b is None) or (a is not None and _rel(a, b) > worst):
                worst = math.inf if (a is None) != (b is None) else _rel(a, b)
                why = f"{key}: cli {a} api {b}"
        if len(got["points"]) != len(want["points"]):
            return {"cls": "WRONG-SILENT", "why": "points differ"}
        for p, q in zip(got["points"], want["points"], strict=True):
            for key in ("steps", "examples", "batch_size", "learning_rate"):
                e = _rel(p[key], q[key])
                if e > worst:
                    worst, why = e, f"point {key}: cli {p[key]} api {q[key]}"
    if worst > CLI_TOL:
        return {"cls": "WRONG-SILENT", "re": worst, "why": why}
    return {"cls": "ok", "re": worst}


def check_ema(cfg, truth, rows, reach):
    """With an EMA: B_crit off by more than EMA_TOL carries a warning."""
    if not all(len(v) >= 3 for v in reach.values()) or cfg["duplicate"] or cfg["bumps"]:
        return {"cls": "skip"}  # (the EMA of a bumped curve has no closed-form crossing)
    results, bad = _fits(runs_of(rows), truth.goals, cfg["ema"])
    if bad is not None:
        return bad
    worst, why, warned = 0.0, "", True
    for i, res in enumerate(results):
        e = _rel(res.fit.b_crit, truth.b_crit(i))
        if e > worst:
            worst, why = e, f"goal {i}: b_crit {res.fit.b_crit:.6g} truth {truth.b_crit(i):.6g}"
            warned = bool(res.warnings)
    if worst > EMA_TOL:
        return {"cls": "wrong-warned" if warned else "WRONG-SILENT", "re": worst, "why": why}
    return {"cls": "ok", "re": worst}


def check_noise(cfg, truth, reps, seed):
    """Coverage of B_crit's 95% interval (and S_min's, E_min's) over ``reps`` noisy grids."""
    skip = {"cls": "skip"}
    if cfg["unreached"] or cfg["duplicate"] or cfg["n_batch"] < 3 or cfg["int_steps"]:
        return dict.fromkeys(("coverage", "smin_cover", "emin_cover", "bias", "bound"), skip)
    sigma = cfg["noise"]
    rng = np.random.default_rng(1000 + seed)
    hits = {"coverage": [0, 0, 0], "smin_cover": [0, 0, 0], "emin_cover": [0, 0, 0]}
    logs, bounded, refused, crashed = [], 0, 0, None
    # (counted per replicate: its goals share the runs' clocks, so their fits at an edge are
    # one draw, not several — seed 64: one replicate's four goals, each "< 0.689" for 4.6)
    bound_reps, false_bounds, example = 0, 0, None
    for _ in range(reps):
        rows, _, _ = make_runs(cfg, truth, rng, noise=sigma)
        results, bad = _fits(runs_of(rows), truth.goals, 0.0)
        if bad is not None:
            if bad["cls"] == "crash":
                crashed = bad
            refused += 1
            continue
        edge = false = False
        for i, res in enumerate(results):
            fit = res.fit
            if fit.at_bound is not None:
                bounded += 1
                edge = True
                # What `fit` prints at the search's edge (ParetoFit.b_crit_text): the interval,
                # unbounded on that side ("< high" or "> low", or not identified) — the edge itself
                # is no bound (until 2026-12-07 "< b_min/10⁴" was printed, false for a truth 10-100×
                # from the batch sizes). Does the truth obey it?
                truth_b = truth.b_crit(i)
                low, high = fit.b_crit_interval(0.95)
                if not low <= truth_b <= high:
                    false = True
                    example = f"{fit.at_bound}: B_crit {fit.b_crit_text()}, truth {truth_b:.4g}"
                continue
            warned = bool(res.warnings)
            try:
                res.as_dict()  # (what `fit --json` prints: the interval, the fitted steps)
                low, high = fit.b_crit_interval(0.95)
            except Exception as err:
                crashed = {"cls": "crash", "exc": f"{type(err).__name__}: {err}"[:300]}
                crashed["at"] = f"se(ln B_crit) {fit.log_b_crit_stderr:.4g}, n {fit.n_points}"
                continue
            logs.append(math.log(fit.b_crit / truth.b_crit(i)))
            for name, ok in (
                ("coverage", low <= truth.b_crit(i) <= high),
                # (their profile intervals since 2026-12-07: t·SE held S_min in 0.74 of fronts
                # with B_crit far above the batch sizes, wrong-warned at seeds 45, 115-117, ...)
                ("smin_cover", _holds(fit.s_min_interval(0.95), truth.s_min(i))),
                ("emin_cover", _holds(fit.e_min_interval(0.95), truth.e_min(i))),
            ):
                h = hits[name]
                h[1] += 1
                if ok:
                    h[0] += 1
                elif warned:
                    h[2] += 1
        bound_reps += edge
        false_bounds += false
    out = {}
    n_goals = len(truth.goals)
    for name, (hit, n, warned_misses) in hits.items():
        if crashed:
            out[name] = crashed
            continue
        if n < 20:
            out[name] = {"cls": "skip", "n": n, "bounded": bounded, "refused": refused}
            continue
        misses = n - hit
        p = float(sps.binom.sf(misses - 1, n, 0.05)) if misses else 1.0
        res = {"hits": hit, "n": n, "rate": round(hit / n, 4), "p": p, "bounded": bounded}
        if p < P_COVER / n_goals and name != "coverage" and hit / n > 0.85:
            # (S_min's and E_min's intervals: informational unless far off)
            res["cls"] = "undercover"
        elif p < P_COVER / n_goals:
            res["cls"] = "wrong-warned" if warned_misses > misses / 2 else "WRONG-SILENT"
        else:
            res["cls"] = "ok"
        out[name] = res
    if crashed:
        out["bias"] = crashed
    elif len(logs) >= 20:
        a = np.array(logs)
        z = float(a.mean() / (a.std(ddof=1) / math.sqrt(a.size)))
        cls = "ok"
        if abs(z) > Z_BIAS and abs(a.mean()) > 0.05:
            # (conditional on a fit inside the search range a bias is expected where some are
            # at a bound: informational there)
            cls = "biased" if bounded == 0 else "biased-cond"
        out["bias"] = {"cls": cls, "z": round(z, 2), "mean_log": round(float(a.mean()), 4)}
    else:
        out["bias"] = {"cls": "skip"}
    if crashed:
        out["bound"] = crashed
    elif bound_reps:
        # a printed bound is a 95% claim: false in more than 5% (of the replicates with a fit at
        # an edge) is a finding
        p = float(sps.binom.sf(false_bounds - 1, bound_reps, 0.05)) if false_bounds else 1.0
        cls = "WRONG-BOUND" if p < P_COVER else "ok"
        out["bound"] = {"cls": cls, "false": false_bounds, "n": bound_reps, "example": example}
    else:
        out["bound"] = {"cls": "skip"}
    return out


def check_sweep(cfg, truth, rows, seed):
    """``run_sweep`` with an in-process training function that reports the rows, then
    ``read_study_runs`` and ``noisescale fit sqlite:///... --json``: the same numbers as the
    runs given directly (whole steps only: the reporter takes integers)."""
    from noisescale.sweep import read_study_runs, run_sweep

    if not cfg["int_steps"] or cfg["duplicate"] or seed % 3:
        return {"cls": "skip"}
    direct, bad = _fits(runs_of(rows), truth.goals, 0.0)
    by = {}
    for row in rows:
        by.setdefault((row["batch_size"], row["learning_rate"]), []).append(row)

    def train(batch_size, learning_rate, reporter):
        for row in sorted(by[(batch_size, learning_rate)], key=lambda r: r["step"]):
            extra = {"examples": row["examples"]} if "examples" in row else {}
            reporter.report(int(row["step"]), row["loss"], **extra)

    sizes = sorted({b for b, _ in by})
    lrs = sorted({lr for _, lr in by})
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/sweep.db"
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                run_sweep(train, sizes, lrs, storage=url, study_name="fz", progress=False)
            stored, bad2 = _fits(read_study_runs(url, "fz"), truth.goals, 0.0)
        except Exception as err:
            return {"cls": "crash", "exc": f"{type(err).__name__}: {err}"[:300]}
        if (bad is None) != (bad2 is None):
            return {"cls": "WRONG-SILENT", "why": f"direct {bad} stored {bad2}"}
        if bad is not None:
            return {"cls": "refused", "exc": bad2["exc"]}
        argv = ["fit", url, "--study", "fz", "--ema", "0", "--json"]
        argv += ["--goal", ",".join(repr(g) for g in truth.goals)]
        out, result = _cli_json(argv)
    if result is not None:
        return result
    worst, why = 0.0, ""
    for a, b, c in zip(direct, stored, out["goals"], strict=True):
        for name, x, y in (
            ("b_crit", b.fit.b_crit, a.fit.b_crit),
            ("s_min", b.fit.s_min, a.fit.s_min),
            ("cli b_crit", c["b_crit"], a.fit.b_crit),
            ("cli e_min", c["e_min"], a.fit.e_min),
        ):
            e = _rel(x, y)
            if e > worst:
                worst, why = e, f"{name}: {x} against the runs given directly {y}"
    if worst > CLI_TOL:
        return {"cls": "WRONG-SILENT", "re": worst, "why": why}
    return {"cls": "ok", "re": worst}


# --- noisescale branch: efficiencies, local critical batch size, warm-up --------------------------


def draw_branch_config(seed):
    """A branch point (or several) whose critical batch size is known by construction."""
    r = random.Random(f"branch-{seed}")
    cfg = {
        "b_ref": r.choice([1, 2, 4, 8]),
        "n_batch": r.choice([2, 3, 4, 5, 6]),
        "ratio": r.choice([2, 2, 4]),
        "place": r.choice(["span", "span", "span", "above", "below"]),
        "mult": r.choice([8, 32, 64]),  # the budget in multiples of the largest batch size
        "every": r.choice(["step", "32pts"]),
        "seeds": r.choice([1, 3, 3, 5]),
        "lrs": r.choice([1, 1, 2, 3]),
        "tolerance": r.choice([0.2, 0.5, 1.0]),
        "reference": r.choice(["smallest", "smallest", "best"]),
        "decay": r.choice([0.0, 0.0, 0.5, 0.9]),
        "noise": r.choice([0.05, 0.1, 0.15]),
        "checkpoints": r.choice([1, 2, 3]),
        "growth": r.choice([1.0, 2.0, 4.0]),  # B_crit at each later checkpoint × this
        "base": r.choice([1, 2, 4]),  # B₀ of the main run in multiples of b_ref
    }
    sizes = [cfg["b_ref"] * cfg["ratio"] ** i for i in range(cfg["n_batch"])]
    cfg["batch_sizes"] = sizes
    if cfg["place"] == "span":
        bn = math.exp(r.uniform(math.log(sizes[0]), math.log(sizes[-1])))
    elif cfg["place"] == "above":
        bn = sizes[-1] * r.choice([3.0, 10.0])
    else:
        bn = sizes[0] / r.choice([3.0, 10.0])
    cfg["b_noise"] = [bn * cfg["growth"] ** i for i in range(cfg["checkpoints"])]
    cfg["budget"] = float(sizes[-1] * cfg["mult"])
    return cfg


def make_branches(cfg, noise, rng, point=None):
    """Branches from each checkpoint: loss linear in the branch's progress u = e/((B + B_n)·f),
    so every efficiency is (B_ref + B_n)/(B + B_n) (times the clocks' ratio with noise) and
    interpolation between records is exact."""
    from noisescale.branch.compare import BranchRun

    out = []
    points = range(cfg["checkpoints"]) if point is None else [point]
    for c in points:
        bn = cfg["b_noise"][c]
        checkpoint = 1000.0 * (c + 1)
        for b in cfg["batch_sizes"]:
            for j in range(cfg["lrs"]):
                lr_slow = 1.0 if j == 0 else 1.5 + j
                for seed in range(cfg["seeds"]):
                    f = lr_slow * (math.exp(noise * rng.standard_normal()) if noise else 1.0)
                    steps = round(cfg["budget"] / b)
                    every = 1 if cfg["every"] == "step" else max(1, steps // 32)
                    k = [t for t in range(steps + 1) if t % every == 0 or t == steps]
                    e = np.array(k, dtype=float) * b
                    loss = 10.0 - e / ((b + bn) * f) * (5.0 / cfg["budget"]) * bn
                    run = Run.from_arrays(
                        f"c{c}_b{b}_lr{j}_s{seed}", b, 0.1 * (j + 1), k, loss, examples=e
                    )
                    out.append(BranchRun(checkpoint, seed, cfg["budget"], run))
    return out


def _branch_truth(cfg, c):
    """(B_crit, local CBS, whether the CBS is a bound) at checkpoint ``c``."""
    bn, tau, sizes = cfg["b_noise"][c], cfg["tolerance"], cfg["batch_sizes"]
    cbs = tau * bn + (1 + tau) * sizes[0]
    return bn, min(cbs, sizes[-1]), cbs >= sizes[-1]


def check_branch(seed, reps=60):
    """``branch_exact``, ``branch_cover``, ``warmup`` (see :func:`check_seed`)."""
    from noisescale.branch.compare import local_critical_batch_sizes
    from noisescale.branch.warmup import fit_warmup, stage_batch_size, warmup_steps

    cfg = draw_branch_config(seed)
    out = {}
    kw = {"tolerance": cfg["tolerance"], "reference": cfg["reference"], "decay": cfg["decay"]}
    try:
        results = local_critical_batch_sizes(make_branches(cfg, 0.0, None), **kw)
    except NoiseScaleError as err:
        res = {"cls": "FALSE-REFUSAL", "exc": str(err)[:300]}
        skip = {"cls": "skip"}
        return cfg, {"branch_exact": res, "branch_cover": skip, "warmup": res, "branch_cli": skip}
    except Exception as err:
        res = {"cls": "crash", "exc": f"{type(err).__name__}: {err}"[:300]}
        skip = {"cls": "skip"}
        return cfg, {"branch_exact": res, "branch_cover": skip, "warmup": res, "branch_cli": skip}
    worst, why = 0.0, ""
    lo, hi = cfg["batch_sizes"][0] / 1e3, cfg["batch_sizes"][-1] * 1e3
    for c, res in enumerate(results):
        bn, cbs, cbs_capped = _branch_truth(cfg, c)
        checks = []
        for be in res.batches:
            want = (cfg["batch_sizes"][0] + bn) / (be.batch_size + bn)
            checks.append((f"c{c} η(B={be.batch_size:g})", be.efficiency, want))
        if res.b_crit_bound is None and lo < bn < hi and cfg["n_batch"] > 1:
            checks.append((f"c{c} b_crit", res.b_crit, bn))
        elif math.isnan(res.b_crit_high) or math.isnan(res.b_crit_low):
            pass  # (one seed: no interval)
        elif not res.b_crit_low * (1 - 1e-9) <= bn <= res.b_crit_high * (1 + 1e-9):
            worst = math.inf
            why = f"c{c}: bound {res.b_crit_bound} [{res.b_crit_low:g}, {res.b_crit_high:g}] "
            why += f"excludes B_crit {bn:g}"
        if cbs_capped:
            if res.cbs_bound != "upper":
                worst, why = math.inf, f"c{c}: cbs {res.cbs:.6g} not a bound (truth ≥ {cbs:g})"
        else:
            checks.append((f"c{c} cbs", res.cbs, cbs))
        for name, got, want in checks:
            e = _rel(got, want)
            if e > worst:
                worst, why = e, f"{name} {got:.9g} truth {want:.9g}"
    # (the warnings that bear on these numbers: the EMA's, curves that cross)
    warned = any("--ema" in w or "cross" in w for r in results for w in r.warnings)
    if worst > 1e-6:
        cls = "wrong-warned" if warned else "WRONG-SILENT"
        out["branch_exact"] = {"cls": cls, "re": worst, "why": why}
    else:
        out["branch_exact"] = {"cls": "ok", "re": worst}
    out["warmup"] = check_warmup(cfg, results, fit_warmup, stage_batch_size, warmup_steps)
    out["branch_cover"] = check_branch_cover(cfg, kw, reps, seed)
    out["branch_cli"] = check_branch_cli(seed, cfg, kw)
    return cfg, out


_BRANCH_TRAIN = """
import numpy as np
CFG = {cfg!r}
def train(batch_size, learning_rate, reporter, *, checkpoint, budget, seed):
    c = round(checkpoint / 1000.0) - 1
    bn = CFG["b_noise"][c]
    j = round(learning_rate / 0.1) - 1
    f = 1.0 if j == 0 else 1.5 + j
    steps = round(budget / batch_size)
    every = 1 if CFG["every"] == "step" else max(1, steps // 32)
    for t in range(steps + 1):
        if t % every == 0 or t == steps:
            e = float(t * batch_size)
            loss = 10.0 - e / ((batch_size + bn) * f) * (5.0 / CFG["budget"]) * bn
            reporter.report(t, loss, examples=e)
"""


def check_branch_cli(seed, cfg, kw):
    """``noisescale branch MODULE:FUNCTION --json`` on the noise-free branches (every third seed):
    its local CBS, B_crit, efficiencies and warm-up the API's on the same curves."""
    from noisescale.branch.compare import local_critical_batch_sizes
    from noisescale.branch.warmup import fit_warmup

    branches = cfg["n_batch"] * cfg["lrs"] * cfg["seeds"] * cfg["checkpoints"]
    if seed % 3 != 1 or cfg["every"] == "step" or branches > 45:
        return {"cls": "skip"}  # (a branch a SQLite trial: kept to a few seconds)
    try:
        api = local_critical_batch_sizes(make_branches(cfg, 0.0, None), **kw)
        total = 1000.0 * cfg["checkpoints"] + cfg["budget"]
        plan = fit_warmup(api, base_batch_size=cfg["batch_sizes"][0], total=total)
    except Exception as err:
        return {"cls": "skip", "exc": f"{type(err).__name__}: {err}"[:200]}
    with tempfile.TemporaryDirectory() as tmp:
        module = os.path.join(tmp, "branch_train.py")
        with open(module, "w") as f:
            f.write(_BRANCH_TRAIN.format(cfg=cfg))
        argv = ["branch", f"{module}:train", "--json", "--no-progress"]
        argv += ["--checkpoints", ",".join(str(1000 * (c + 1)) for c in range(cfg["checkpoints"]))]
        argv += ["--batch-sizes", ",".join(str(b) for b in cfg["batch_sizes"])]
        argv += ["--budget", repr(cfg["budget"]), "--lr", "0.1", "--lr-rule", "none"]
        argv += ["--lr-grid", ",".join(str(m) for m in range(1, cfg["lrs"] + 1))]
        argv += ["--repeats", str(cfg["seeds"]), "--tolerance", repr(kw["tolerance"])]
        argv += ["--reference", kw["reference"], "--ema", repr(kw["decay"])]
        argv += ["--storage", f"sqlite:///{tmp}/branch.db", "--study", "fz"]
        out, result = _cli_json(argv)
    if result is not None:
        return result
    worst, why = 0.0, ""
    for res, point in zip(api, out["points"], strict=True):
        got = point["branch"]
        want = res.as_dict()
        for key in ("cbs", "b_crit", "b_crit_low", "b_crit_high", "cbs_low", "cbs_high"):
            a, b = got[key], want[key]
            e = math.inf if (a is None) != (b is None) else (_rel(a, b) if a is not None else 0.0)
            if e > worst:
                worst, why = e, f"checkpoint {res.checkpoint:g} {key}: cli {a} api {b}"
        for p, q in zip(got["batches"], want["batches"], strict=True):
            e = _rel(p["efficiency"], q["efficiency"])
            if e > worst:
                worst, why = (
                    e,
                    f"η(B={q['batch_size']:g}): cli {p['efficiency']} api {q['efficiency']}",
                )
    warm = out["warmup"]
    if warm is not None:
        for key in ("steps_warmup", "steps_same_progress", "examples_same_progress"):
            a, b = warm.get(key), getattr(plan, key)
            if a is not None and _rel(a, b) > worst:
                worst, why = _rel(a, b), f"warmup {key}: cli {a} api {b}"
        if [list(k) for k in warm["knots"]] != [list(k) for k in plan.knots]:
            worst, why = math.inf, f"knots: cli {warm['knots']} api {plan.knots}"
    if worst > CLI_TOL:
        return {"cls": "WRONG-SILENT", "re": worst, "why": why}
    return {"cls": "ok", "re": worst}


def check_warmup(cfg, results, fit_warmup, stage_batch_size, warmup_steps):
    """The warm-up's knots from the measured CBS, its steps at equal examples by brute force,
    and (B_crit the same at every point) its steps at equal progress in closed form (eq. D.1)."""
    base = cfg["b_ref"] * cfg["base"]
    total = 1000.0 * (cfg["checkpoints"] + 2)
    try:
        plan = fit_warmup(results, base_batch_size=base, total=total)
    except NoiseScaleError as err:
        return {"cls": "FALSE-REFUSAL", "exc": str(err)[:300]}
    except Exception as err:
        return {"cls": "crash", "exc": f"{type(err).__name__}: {err}"[:300]}
    allowed = cfg["batch_sizes"]
    knots, batch = [(0.0, allowed[0])], allowed[0]
    for r in results:
        fit = [b for b in allowed if b <= r.cbs * (1 + 1e-9)]
        nb = max(fit[-1] if fit else allowed[0], batch)
        if nb != batch:
            knots.append((r.checkpoint, nb))
            batch = nb
    if [tuple(map(float, k)) for k in plan.knots] != [tuple(map(float, k)) for k in knots]:
        return {"cls": "WRONG-SILENT", "why": f"knots {plan.knots} expected {knots}"}
    # brute force: one example at a time is too slow; the stages' lengths by hand
    edges = [k[0] for k in knots] + [total]
    steps = sum((edges[i + 1] - edges[i]) / knots[i][1] for i in range(len(knots)))
    worst, why = _rel(plan.steps_warmup, steps), f"steps_warmup {plan.steps_warmup} truth {steps}"
    if len(set(cfg["b_noise"])) == 1 and all(r.b_crit_bound is None for r in results):
        bc = float(np.exp(np.mean([math.log(r.b_crit) for r in results])))
        s_end = total / (base + bc)
        # walk the stages: progress len/(b + bc) per stage, steps len/b
        progress, steps_p, examples = 0.0, 0.0, 0.0
        for i, (start, b) in enumerate(knots):
            end = edges[i + 1] if i + 1 < len(knots) else math.inf
            room = (end - start) / (b + bc)
            take = min(room, s_end - progress)
            progress += take
            steps_p += take * (b + bc) / b
            examples += take * (b + bc)
            if progress >= s_end * (1 - 1e-15):
                break
        for name, got, want in (
            ("steps_same_progress", plan.steps_same_progress, steps_p),
            ("examples_same_progress", plan.examples_same_progress, examples),
        ):
            e = _rel(got, want)
            if e > worst * 1e3 and e > 1e-3:
                worst, why = e, f"{name} {got:.8g} truth {want:.8g}"
    if worst > 1e-3:
        return {"cls": "WRONG-SILENT", "re": worst, "why": why}
    return {"cls": "ok", "re": worst}


def check_branch_cover(cfg, kw, reps, seed):
    """B_crit's interval over ``reps`` noisy experiments at the first branch point."""
    if cfg["seeds"] < 3 or cfg["n_batch"] < 2:
        return {"cls": "skip"}
    from noisescale.branch.compare import local_critical_batch_size

    rng = np.random.default_rng(7000 + seed)
    bn = cfg["b_noise"][0]
    hits = n = bounded = 0
    for _ in range(reps):
        try:
            res = local_critical_batch_size(make_branches(cfg, cfg["noise"], rng, point=0), **kw)
        except NoiseScaleError:
            continue
        except Exception as err:
            return {"cls": "crash", "exc": f"{type(err).__name__}: {err}"[:300]}
        if res.b_crit_bound is not None:
            bounded += 1
            # the interval is then one-sided: [low, inf) or [0, high]
        if not (math.isfinite(res.b_crit_low) or res.b_crit_low == 0.0):
            continue
        n += 1
        hits += res.b_crit_low <= bn <= res.b_crit_high
    if n < 20:
        return {"cls": "skip", "n": n}
    misses = n - hits
    p = float(sps.binom.sf(misses - 1, n, 0.05)) if misses else 1.0
    cls = "WRONG-SILENT" if p < P_COVER else "ok"
    return {
        "cls": cls,
        "hits": hits,
        "n": n,
        "rate": round(hits / n, 3),
        "p": p,
        "bounded": bounded,
    }


# The checks each part of check_seed gives; every part draws its randomness from the seed
# itself (the noisy replicates and the branches from `seed`, the grid from a generator of its
# own), so a part run alone gives what it gives in the whole run.
_NOISE_CHECKS = ("coverage", "smin_cover", "emin_cover", "bias", "bound")
_BRANCH_CHECKS = ("branch_exact", "branch_cover", "warmup", "branch_cli")


def check_seed(seed, override=None, reps=None, only=None):
    """The seed's checks; ``only`` (a check's name): the part that gives it, alone (the
    regression lists name the check of each finding)."""
    cfg = draw_config(seed)
    if override:
        cfg.update(override)
    truth = Truth(cfg)
    t0 = time.time()
    checks, branch_cfg = {}, None
    if only is None or only not in _NOISE_CHECKS + _BRANCH_CHECKS:
        rows, reach, meta = make_runs(cfg, truth, np.random.default_rng(seed))
        if only in (None, "exact", "cli"):
            checks["exact"], results = check_exact(cfg, truth, rows, reach, meta)
        if only in (None, "cli"):
            checks["cli"] = check_cli(cfg, truth, rows, results)
        if only in (None, "ema"):
            checks["ema"] = check_ema(cfg, truth, rows, reach)
        if only in (None, "sweep"):
            checks["sweep"] = check_sweep(cfg, truth, rows, seed)
        if only in (None, "start"):
            checks["start"] = check_start(cfg, truth, rows)
    if only is None or only in _NOISE_CHECKS:
        checks.update(check_noise(cfg, truth, reps or 100, seed))
    if only is None or only in _BRANCH_CHECKS:
        branch_cfg, branch = check_branch(seed, reps=max(20, (reps or 100) // 2))
        checks.update(branch)
    return {
        "seed": seed,
        "cfg": cfg,
        "branch_cfg": branch_cfg,
        "checks": checks,
        "time": round(time.time() - t0, 2),
    }


def findings(record):
    return [
        (name, res)
        for name, res in record["checks"].items()
        if res["cls"] in ("WRONG-SILENT", "crash", "FALSE-REFUSAL", "WRONG-BOUND", "WRONG-CAUSE")
    ]


def describe(record):
    cfg = record["cfg"]
    keys = ("batch_sizes", "place", "b_crit", "growth", "goals", "lrs", "records", "points")
    extra = ("examples", "shuffle", "bumps", "diverge", "stop", "unreached", "duplicate")
    extra += ("int_steps",)
    extra = [k for k in extra if cfg.get(k)]
    return (
        f"seed {record['seed']}: "
        + " ".join(
            f"{k}={cfg[k]:.4g}" if isinstance(cfg[k], float) else f"{k}={cfg[k]}" for k in keys
        )
        + (" +" + ",".join(extra) if extra else "")
        + f" σ={cfg['noise']} ema={cfg['ema']}"
    )


def main(argv=None):
    from fuzz_runner import _seeds, print_class_table, run_check_seeds

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0:100", help="A:B (a range), or seeds A,B,C")
    parser.add_argument("--jsonl", help="append each seed's full record to this file")
    parser.add_argument("--override", help="JSON dict replacing entries of each seed's config")
    parser.add_argument("--replicates", type=int, default=100, help="noisy replicates per seed")
    parser.add_argument("-v", "--verbose", action="store_true", help="each check's result")
    args = parser.parse_args(argv)
    override = json.loads(args.override) if args.override else None
    start = time.time()
    table, found, _ = run_check_seeds(
        _seeds(args.seeds),
        lambda seed: check_seed(seed, override, args.replicates),
        findings, args.jsonl, args.verbose,
        lambda record: f"{describe(record)} ({record['time']} s)", limit=None,
    )  # fmt: skip
    print_class_table(table, CHECKS, column_width=14)
    print(f"\n{len(found)} finding(s) in {time.time() - start:.0f} s")
    for record, name, res in found:
        print(f"  {describe(record)}\n    {name}: {res}")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
