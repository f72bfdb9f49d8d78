"""The tracker's statistics against known truth: unbiasedness, coverage and the decisions.

The other fuzzers check each step's norms against brute force; this one checks what the tracker
makes of them over a run. Its model is ``nn.Linear(d, 1, bias=False)`` on inputs ``x`` drawn so
that each example's loss is ⟨θ, g_i⟩ (summed over ``positions`` rows that add up to g_i), so
that example i's gradient is exactly the vector g_i drawn — whatever θ is: the steps of the run
are independent draws, and |G|² = |μ|², tr Σ = tr(AAᵀ) and B_simple = tr Σ/|G|² are known in
closed form. The g_i are μ + A·z with z Gaussian or Student-t (unit variance per coordinate,
``dist``), μ fixed or drifting linearly over the run (``drift``: then each step's truth is its
own |μ_t|²), or drawn without replacement from a finite data set of N of them (``dataset``,
the tracker given ``dataset_size=N``: the truth is that data set's mean and N-normalised
covariance).

Each seed draws a configuration (:func:`draw_config`) — the source (the default sub-batches,
``per_example_fraction=1.0``, a fraction, or ``per_example=False`` with accumulation), the
number of sub-batches, accumulation over 1-3 micro-batches (unequal ones under ``"sum"``),
``loss_reduction``, ``measure_every``, ``beta``, ``confidence``, the steps, a batch size that
ramps over the run — and runs R independent replicates (trackers on fresh draws). Checked:

* ``g2``, ``trace``: the unbiasedness of each record's per-step |G|² and tr Σ: the mean of
  (estimate − truth) over the replicates' measured steps, against its standard error from the
  replicates' own means (each replicate an independent unit), |z| > Z_BIAS a finding;
* ``coverage``: the final ``estimate()``'s interval holds the true B_simple in a fraction of
  the replicates no lower than the binomial tail allows (p < P_COVER a finding) — only where the
  run claims it should: Gaussian draws, no drift;
* ``decision``: ``noisescale calc --history`` on the first replicate's history gives the regime,
  S/S_min and E/E_min of eq. 2.11 at the run's batch size from the history's last B_simple
  and its interval (theory's functions on the tracker's own numbers);
* ``report``: ``noisescale report --json`` on that history: its last B_simple and interval the
  tracker's, S_min and E_min eq. D.1 over the records (``theory.run_integrals``), B_crit =
  E_min/S_min and each fixed batch size's steps and examples (eq. D.1, 2.11);
* ``adaptive``: an ``AdaptiveBatchSize`` driven by the tracker (``adaptive``): each decision
  read the tracker's B_simple of that step and aimed at √(r·B_simple) (eq. D.6);
* ``ema``: the final estimate's |G|² and tr Σ against the per-step records (the EMA by hand);
* ``bn_ghg``, ``bn_trace``, ``bn_cover``: with the squared error, a ``BNoiseTracker`` (paused
  tracker, Hessian batches of their own) whose H = E xxᵀ = I, so GᵀHG = |G|² and tr(HΣ) = tr Σ
  are known: the same bias and coverage checks for B_noise (eq. 2.8).

Classes per check: ``ok``; ``refused`` (a NoiseScaleError naming a cause); ``crash`` (any other
exception); ``WRONG-SILENT`` (a bias, an interval that covers too little, a decision off — no
warning); ``wrong-warned`` (the same with a warning); ``withheld-all`` (no record had a
number); ``skip`` (the check does not apply to the configuration).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import random
import tempfile
import time
import warnings

import numpy as np
import torch
from scipy import stats as sps

import noisescale
from noisescale import theory
from noisescale.errors import NoiseScaleInputError as NoiseScaleError
from noisescale.hessian import BNoiseTracker

Z_BIAS = 4.5  # |z| of a mean's bias that is a finding (many configurations × two checks)
P_COVER = 1e-3  # a binomial tail this improbable for the misses is a finding
CHECKS = (
    "g2",
    "trace",
    "coverage",
    "ema",
    "decision",
    "report",
    "adaptive",
    "bn_ghg",
    "bn_trace",
    "bn_cover",
    "group_a_g2",
    "group_a_trace",
    "group_b_g2",
    "group_b_trace",
)


# --- the configuration ---------------------------------------------------------------------------


def draw_config(seed):
    """The run's options for ``seed``."""
    r = random.Random(f"stats-{seed}")
    cfg = {
        "d": r.choice([2, 4, 8]),
        "dist": r.choice(["gauss", "gauss", "gauss", "t5"]),
        "b_simple": r.choice([2.0, 8.0, 30.0, 100.0]),
        "n": r.choice([4, 8, 16, 32]),
        "accum": r.choice([1, 1, 2, 3]),
        "uneven": r.random() < 0.3,
        "reduction": r.choice(["mean", "mean", "sum"]),
        "source": r.choice(["default", "default", "exact", "fraction", "microbatch"]),
        "subbatches": r.choice([2, 4, 8]),
        "fraction": r.choice([0.25, 0.5, 0.75]),
        "positions": r.choice([1, 1, 3]),
        "beta": r.choice([1.0, 1.0, 0.99, 0.9]),
        "measure_every": r.choice([1, 1, 1, 2, 3]),
        "confidence": r.choice([0.95, 0.95, 0.9, 0.8]),
        "steps": r.choice([10, 30, 60]),
        "ramp": r.random() < 0.2,
        "drift": r.random() < 0.15,
        "dataset": r.choice([None, None, None, 2, 4]),  # N as a multiple of the step's examples
    }
    # the batch chosen by an AdaptiveBatchSize from the tracker (B = √(r·B_simple), eq. D.6)
    cfg["adaptive"] = r.random() < 0.2
    if cfg["adaptive"]:
        cfg.update(accum=1, ramp=False, uneven=False, dataset=None)
        if cfg["source"] == "microbatch":
            cfg["source"] = "default"
    # a loss over fixed-length sequences' tokens (token_mean, count_tokens): the records per
    # token, |G|²/T², tr Σ/T and B_simple·T of the examples' summed token gradients
    cfg["tokens"] = r.random() < 0.25 and cfg["positions"] > 1
    if cfg["tokens"]:
        cfg["reduction"] = "token_mean"
        cfg["adaptive"] = False  # (its decisions convert to examples)
        # (unequal micro-batches, each its own token mean, are refused in the micro-batch
        # source and measured within each micro-batch otherwise: not drawn)
        cfg["uneven"] = False
    # micro-batches of 1-3 examples
    if r.random() < 0.12:
        cfg["n"] = r.choice([1, 2, 3])
        cfg["accum"] = max(cfg["accum"], 2 if cfg["n"] == 1 else 1)
    # a squared error ½(θ·x − y)² at a fixed θ (no update): g_i = (θ·x_i − y_i)·x_i, each
    # example's output gradient θ·x_i − y_i its own (the subset's importance weights at work),
    # |G|² and tr Σ in closed form
    cfg["square"] = r.random() < 0.25
    if cfg["square"]:
        cfg.update(positions=1, tokens=False, dataset=None, drift=False)
        if cfg["reduction"] == "token_mean":
            cfg["reduction"] = "mean"
    # per-group estimates (groups="children"): two Linear children on the halves of x, each
    # group's truth the halves' |μ|² and the diagonal blocks' traces
    cfg["groups"] = r.random() < 0.25
    if cfg["groups"] and (cfg["square"] or cfg["tokens"] or cfg["positions"] > 1 or cfg["d"] < 4):
        cfg["groups"] = False
    if cfg["groups"]:
        cfg.update(dataset=None, drift=False)
    if cfg["source"] == "microbatch" and cfg["accum"] == 1:
        cfg["accum"] = 2
    if cfg["reduction"] == "mean" or cfg["accum"] == 1:
        cfg["uneven"] = False  # (a mean over unequal micro-batches is warned about: not drawn)
    if cfg["dataset"] and (cfg["ramp"] or cfg["drift"]):
        cfg["dataset"] = None
    return cfg


def micro_sizes(cfg, step):
    """The micro-batch sizes of step ``step`` (0-based)."""
    n = cfg["n"]
    if cfg["ramp"]:
        n = max(2, round(n * (0.5 + 1.5 * step / max(cfg["steps"] - 1, 1))))
    sizes = [n] * cfg["accum"]
    if cfg["uneven"]:
        sizes = [max(2, n - 2 * j) if j % 2 else n + j for j in range(cfg["accum"])]
    return sizes


def replicates(cfg):
    """Replicates for about 3000 micro-batch passes, at least 40 (coverage needs many)."""
    passes = cfg["steps"] * cfg["accum"]
    return max(40, min(150, 3000 // passes))


# --- the truth ------------------------------------------------------------------------------------


class Truth:
    """μ (per step), A and the draws of one replicate."""

    def __init__(self, cfg, rng):
        d = cfg["d"]
        self.cfg, self.rng = cfg, rng
        a = rng.normal(size=(d, d))
        a *= math.sqrt(cfg["b_simple"] / np.sum(a * a))  # tr AAᵀ = B_simple (|μ|² = 1)
        mu = rng.normal(size=d)
        self.mu0 = mu / np.linalg.norm(mu)
        self.a = a
        self.velocity = rng.normal(size=d) * (1.0 / cfg["steps"]) if cfg["drift"] else None
        self.data = None
        if cfg.get("square"):
            # θ* a unit away from θ = μ; the label noise sets B_simple's order
            t = rng.normal(size=d)
            self.target = self.mu0 - t / np.linalg.norm(t)
            self.noise = math.sqrt(cfg["b_simple"] / d)
        if cfg["dataset"]:
            big = sum(micro_sizes(cfg, 0))
            self.data = self._draw(cfg["dataset"] * big, self.mu0)

    def mu(self, step):
        if self.velocity is None:
            return self.mu0
        return self.mu0 + self.velocity * step

    def _draw(self, m, mu):
        d = self.cfg["d"]
        if self.cfg["dist"] == "gauss":
            z = self.rng.normal(size=(m, d))
        else:
            nu = float(self.cfg["dist"][1:])
            z = self.rng.standard_t(nu, size=(m, d)) * math.sqrt((nu - 2.0) / nu)
        return mu + z @ self.a.T

    def square(self, m, rng):
        """x and y of ``m`` examples of the squared error, and their gradients at θ = μ."""
        d = self.cfg["d"]
        x = rng.normal(size=(m, d))
        y = x @ self.target + rng.normal(size=m) * self.noise
        return x, y, (x @ self.mu0 - y)[:, None] * x

    def square_truth(self):
        """|G|² and tr Σ of the squared error's gradients: for x ~ N(0, I), e = θ − θ* and
        y = θ*·x + σε, g = (e·x − σε)·x has mean e and E|g|² = |e|²(d + 2) + σ²d."""
        e = self.mu0 - self.target
        ee, d = float(e @ e), self.cfg["d"]
        return ee, ee * (d + 1) + self.noise**2 * d

    def batch(self, step, sizes):
        """The step's micro-batches of per-example gradients."""
        total = sum(sizes)
        if self.data is not None:
            idx = self.rng.choice(len(self.data), size=total, replace=False)
            g = self.data[idx]
        else:
            g = self._draw(total, self.mu(step))
        return np.split(g, np.cumsum(sizes)[:-1])

    def g2(self, step):
        if self.data is not None:
            m = self.data.mean(0)
            return float(m @ m)
        m = self.mu(step)
        return float(m @ m)

    def trace(self):
        if self.data is not None:
            c = self.data - self.data.mean(0)
            return float(np.sum(c * c) / len(self.data))  # the N-normalised covariance
        return float(np.sum(self.a * self.a))


def inputs(g, positions, rng):
    """Rows whose sum over ``positions`` is each example's g_i."""
    if positions == 1:
        return torch.tensor(g)
    e = rng.normal(size=(g.shape[0], positions, g.shape[1]))
    e -= e.mean(1, keepdims=True)
    return torch.tensor(g[:, None, :] / positions + e)


# --- one replicate -------------------------------------------------------------------------------


def tracker_options(cfg):
    opts = {
        "beta": cfg["beta"],
        "confidence": cfg["confidence"],
        "measure_every": cfg["measure_every"],
        "sync_every": 1000,
    }
    if cfg["source"] == "default":
        opts["subbatches"] = cfg["subbatches"]
    elif cfg["source"] == "exact":
        opts["per_example_fraction"] = 1.0
    elif cfg["source"] == "fraction":
        opts["per_example_fraction"] = cfg["fraction"]
    else:
        opts["per_example"] = False
    if cfg["dataset"]:
        opts["dataset_size"] = cfg["dataset"] * sum(micro_sizes(cfg, 0))
    return opts


def run_replicate(cfg, rep, seed, history_path=None):
    """One run: its records, truths, final estimate and warnings."""
    rng = np.random.default_rng([seed, rep])
    truth = Truth(cfg, rng)
    if cfg.get("square"):
        square_g2, square_trace = truth.square_truth()
    torch.manual_seed(seed * 1000 + rep)
    d = cfg["d"]
    model = Halves(d) if cfg.get("groups") else torch.nn.Linear(d, 1, bias=False).double()
    if cfg.get("square"):
        with torch.no_grad():
            model.weight.copy_(torch.tensor(truth.mu0)[None])
    opt = torch.optim.SGD(model.parameters(), lr=0.0 if cfg.get("square") else 0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        groups = {"groups": "children"} if cfg.get("groups") else {}
        tracker = noisescale.GradientNoiseTracker(
            model, cfg["reduction"], history_path=history_path, **tracker_options(cfg), **groups
        )
        schedule = adaptive_schedule(cfg) if cfg.get("adaptive") else None
        bn, bn_records = None, []
        if cfg.get("square"):
            # B_noise (eq. 2.8) on batches of its own: H = E xxᵀ = I, so GᵀHG = |G|² and
            # tr(HΣ) = tr Σ
            bn = BNoiseTracker(
                model, _square_loss, beta=cfg["beta"], confidence=cfg["confidence"], tracker=tracker
            )
        for step in range(cfg["steps"]):
            sizes = micro_sizes(cfg, step)
            if schedule is not None:
                sizes = [cfg["n"]] * schedule.num_micro_batches
            for g in truth.batch(step, sizes):
                if cfg.get("square"):
                    x, y, _ = truth.square(g.shape[0], rng)
                    out = model(torch.tensor(x))
                    per_example = 0.5 * (out[:, 0] - torch.tensor(y)).square()
                else:
                    out = model(inputs(g, cfg["positions"], rng))
                    per_example = out.reshape(g.shape[0], -1).sum(1)
                if cfg["reduction"] == "mean":
                    loss = per_example.mean() / len(sizes)
                elif cfg["reduction"] == "token_mean":
                    loss = out.mean() / len(sizes)
                    tracker.count_tokens(torch.ones(g.shape[0], cfg["positions"]))
                else:
                    loss = per_example.sum()
                loss.backward()
            tracker.step(loss=loss)
            opt.step()
            opt.zero_grad()
            if schedule is not None:
                schedule.step(tracker)
            if bn is not None:
                m = max(6, cfg["n"])
                x, y, _ = truth.square(m, rng)
                xh, yh, _ = truth.square(m, rng)
                got = bn.step(
                    (torch.tensor(x), torch.tensor(y)), (torch.tensor(xh), torch.tensor(yh))
                )
                bn_records.append(
                    {"skipped": False, "g2": got.ghg, "trace_sigma": got.trace_h_sigma}
                )
        estimate = tracker.estimate()
        tracker.remove()
    history = tracker.history
    steps = [r["step"] for r in history]
    t = cfg["positions"] if cfg.get("tokens") else 1  # per token: the loss's mean over T
    g2_true = [truth.g2(s - 1) / t**2 for s in steps]
    trace_true = truth.trace() / t
    b_true = truth.trace() / truth.g2(cfg["steps"] - 1) * t
    if cfg.get("square"):
        g2_true, trace_true = [square_g2] * len(steps), square_trace
        b_true = square_trace / square_g2
    return {
        "records": history,
        "g2_true": g2_true,
        "trace_true": trace_true,
        "b_true": b_true,
        "estimate": estimate,
        "warned": sorted({str(w.message)[:600] for w in caught}),
        "decisions": list(schedule.history) if schedule is not None else None,
        "mus": [truth.mu(s - 1) for s in steps],
        "a": truth.a,
        "b_noise": None
        if bn is None
        else {
            "records": bn_records,
            "g2_true": [square_g2] * len(bn_records),
            "trace_true": square_trace,
            "b_true": square_trace / square_g2,
            "estimate": bn.estimate(),
        },
    }


class Halves(torch.nn.Module):
    """⟨θ, x⟩ as two children, each on one half of x: the groups "a" and "b"."""

    def __init__(self, d):
        super().__init__()
        self.half = d // 2
        self.a = torch.nn.Linear(self.half, 1, bias=False).double()
        self.b = torch.nn.Linear(d - self.half, 1, bias=False).double()

    def forward(self, x):
        return self.a(x[..., : self.half]) + self.b(x[..., self.half :])


def group_runs(cfg, runs):
    """Each group's records and truth, as :func:`check_bias` takes a run's."""
    h = cfg["d"] // 2
    out = {}
    for name, part in (("a", slice(0, h)), ("b", slice(h, cfg["d"]))):
        out[name] = [
            {
                "records": [
                    {"skipped": r["skipped"], **r.get("groups", {}).get(name, {})}
                    for r in run["records"]
                ],
                "g2_true": [float(m[part] @ m[part]) for m in run["mus"]],
                "trace_true": float(np.sum(run["a"][part] ** 2)),
            }
            for run in runs
        ]
    return out


def _square_loss(model, batch):
    x, y = batch
    return 0.5 * (model(x)[:, 0] - y).square().mean()


def adaptive_schedule(cfg):
    """B = √(r·B_simple) between one and four micro-batches, r aiming at two."""
    n = cfg["n"]
    return noisescale.AdaptiveBatchSize(
        micro_batch_size=n,
        max_batch_size=4 * n,
        exchange_rate=(2 * n) ** 2 / cfg["b_simple"],
        interval=5,
        max_relative_width=math.inf,
        lr_rule="none",
    )


# --- the checks ----------------------------------------------------------------------------------


def _z(diffs):
    """z of the mean of per-replicate mean differences."""
    x = np.asarray(diffs, dtype=float)
    if x.size < 3:
        return math.nan, math.nan
    se = x.std(ddof=1) / math.sqrt(x.size)
    return float(x.mean()), float(x.mean() / se) if se > 0 else math.inf * np.sign(x.mean())


def check_bias(runs, key):
    """Per-step estimates of ``key`` ("g2" or "trace_sigma") against their truth."""
    diffs, scale = [], []
    for run in runs:
        used = [r for r in run["records"] if not r["skipped"]]
        if not used:
            continue
        if key == "g2":
            truth = [
                t for r, t in zip(run["records"], run["g2_true"], strict=True) if not r["skipped"]
            ]
        else:
            truth = [run["trace_true"]] * len(used)
        diffs.append(np.mean([r[key] for r in used]) - np.mean(truth))
        scale.append(np.mean(truth))
    if not diffs:
        return {"cls": "withheld-all"}
    bias, z = _z(diffs)
    rel = bias / float(np.mean(scale))
    cls = "ok" if abs(z) <= Z_BIAS else "WRONG-SILENT"
    return {"cls": cls, "re": round(rel, 4), "z": round(z, 2), "reps": len(diffs)}


def coverage_applies(cfg):
    return cfg["dist"] == "gauss" and not cfg["drift"]


def check_coverage(cfg, runs):
    """The final interval holds the true B_simple at its nominal rate."""
    if not coverage_applies(cfg):
        return {"cls": "skip"}
    hits = lows = highs = counted = 0
    for run in runs:
        e = run["estimate"]
        if not (math.isfinite(e.low) and e.high == e.high):
            continue
        counted += 1
        b = run["b_true"]
        if b < e.low:
            highs += 1  # read high
        elif b > e.high:
            lows += 1  # read low
        else:
            hits += 1
    if counted < 20:
        return {"cls": "skip", "counted": counted}
    misses = counted - hits
    p = float(sps.binom.sf(misses - 1, counted, 1.0 - cfg["confidence"]))
    cls = "ok" if p >= P_COVER else "WRONG-SILENT"
    return {
        "cls": cls,
        "cover": round(hits / counted, 3),
        "n": counted,
        "hits": hits,
        "read_low": lows,
        "read_high": highs,
        "p": float(f"{p:.3g}"),
    }


def check_ema(cfg, runs):
    """The final estimate's |G|² and tr Σ are the bias-corrected EMAs of the records'."""
    worst = 0.0
    for run in runs:
        used = [r for r in run["records"] if not r["skipped"]]
        e = run["estimate"]
        if not used:
            continue
        w = cfg["beta"] ** np.arange(len(used) - 1, -1, -1, dtype=float)
        g2 = w @ [r["g2"] for r in used] / w.sum()
        tr = w @ [r["trace_sigma"] for r in used] / w.sum()
        worst = max(worst, abs(e.g2 - g2) / (abs(g2) + 1e-12), abs(e.trace_sigma - tr) / tr)
        rec = run["records"][-1]
        worst = max(worst, abs(rec["b_simple"] - e.b_simple) / abs(e.b_simple))
    return {"cls": "ok" if worst < 1e-8 else "WRONG-SILENT", "re": worst}


def _cli(argv):
    """noisescale's CLI on ``argv``: ``(exit code, its output, None)``, or ``(None, None,
    result)`` where it raised (the check's result: a refusal or a crash)."""
    from noisescale.cli import main as cli_main

    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
            rc = cli_main(argv)
    except SystemExit as err:
        rc = err.code
    except NoiseScaleError as err:
        return None, None, {"cls": "refused", "exc": str(err)[:200]}
    except Exception as err:
        return None, None, {"cls": "crash", "exc": f"{type(err).__name__}: {err}"[:300]}
    return rc, buf.getvalue(), None


def check_decision(cfg, history_path, estimate, warned):
    """``noisescale calc --history`` against eq. 2.11 from the tracker's own B_simple."""
    batch = sum(micro_sizes(cfg, cfg["steps"] - 1))
    if cfg.get("tokens"):
        batch *= cfg["positions"]  # (calc --history takes batch sizes in the run's unit)
    rc, text, raised = _cli(
        ["calc", "--history", history_path, "--batch-size", str(batch), "--json"]
    )
    if raised is not None:
        return raised
    if rc not in (0, None):
        if math.isnan(estimate.b_simple):
            return {"cls": "refused", "exc": f"rc {rc}"}
        return {"cls": "refused", "exc": f"rc {rc} with B_simple {estimate.b_simple:g}"}
    try:
        rows = json.loads(text)
    except json.JSONDecodeError:
        return {"cls": "crash", "exc": f"not JSON: {text[:200]}"}
    row = rows[0] if isinstance(rows, list) else rows
    if isinstance(row, dict) and "rows" in row:
        row = row["rows"][0]
    b = estimate.b_simple
    if not math.isfinite(b):
        return {"cls": "skip", "row": row}
    got_b = _find(row, "noise_scale")
    interval = _find(row, "noise_scale_interval") or [math.nan, math.nan]
    ends = [math.inf if x is None else x for x in interval]
    worst = abs(got_b - b) / b if got_b is not None else math.inf
    for got, want in zip(ends, (estimate.low, estimate.high), strict=True):
        if not (got == want or abs(got - want) <= 1e-9 * abs(want)):
            worst = math.inf
    want = {
        "steps_over_min": theory.steps_over_min(batch, b),
        "examples_over_min": theory.examples_over_min(batch, b),
    }
    for key, value in want.items():
        got = _find(row, key)
        if got is None:
            return {"cls": "crash", "exc": f"no {key} in {row}"}
        worst = max(worst, abs(got - value) / value)
    regime = _find(row, "regime")
    ends = {theory.regime(batch, x) for x in (estimate.low, b, estimate.high) if x > 0}
    ok_regime = regime in ends or (isinstance(regime, str) and "–" in regime)
    cls = "ok" if worst < 1e-6 and ok_regime else "WRONG-SILENT"
    return {"cls": cls, "re": worst, "regime": regime}


def check_report(cfg, history_path, estimate):
    """``noisescale report --json``: its last B_simple and interval the tracker's, S_min and
    E_min eq. D.1 over the records (theory.run_integrals), B_crit = E_min/S_min, and each fixed
    batch size's cost S_min + E_min/B (eq. D.1), E = B·S, S/S_min and E/E_min (eq. 2.11)."""
    if not math.isfinite(estimate.b_simple):
        return {"cls": "skip"}
    page = history_path + ".html"
    rc, text, raised = _cli(["report", history_path, "-o", page, "--json", "--force"])
    if raised is not None:
        return raised
    if rc not in (0, None):
        return {"cls": "refused", "exc": f"rc {rc}"}
    out = json.loads(text[text.index("{") :])
    worst = abs(out["b_simple_last"] - estimate.b_simple) / estimate.b_simple
    low, high = out["b_simple_last_interval"]
    high = math.inf if high is None else high
    if not (
        math.isclose(low, estimate.low, rel_tol=1e-9, abs_tol=1e-12)
        and (high == estimate.high or math.isclose(high, estimate.high, rel_tol=1e-9))
    ):
        worst = math.inf
    with open(history_path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    records = [r for r in records if "b_simple" in r and r["b_simple"] is not None]
    records = [r for r in records if math.isfinite(r["b_simple"])]
    run = out["run"]
    if len(records) >= 2:
        steps = [r["step"] for r in records]
        want = theory.run_integrals(
            steps, [r["b_big"] for r in records], [r["b_simple"] for r in records]
        )
        worst = max(worst, abs(run["s_min"] - want.s_min) / want.s_min)
        worst = max(worst, abs(run["e_min"] - want.e_min) / want.e_min)
    worst = max(worst, abs(run["b_crit"] - run["e_min"] / run["s_min"]) / run["b_crit"])
    for row in out["fixed_batch_costs"]:
        b, s_ = row["batch_size"], run["s_min"] + run["e_min"] / row["batch_size"]
        worst = max(worst, abs(row["steps"] - s_) / s_, abs(row["examples"] - b * s_) / (b * s_))
        worst = max(worst, abs(row["steps_over_min"] - s_ / run["s_min"]) / (s_ / run["s_min"]))
        e_ = b * s_ / run["e_min"]
        worst = max(worst, abs(row["examples_over_min"] - e_) / e_)
    if run.get("predicted_steps") is not None:
        worst = max(worst, abs(run["predicted_steps"] - run["steps"]) / max(run["steps"], 1))
    cls = "ok" if worst < 1e-6 else "WRONG-SILENT"
    return {"cls": cls, "re": worst, "b_crit": run["b_crit"]}


def check_adaptive(cfg, runs):
    """Each decision's B_simple is the tracker's at that step, its target √(r·B_simple) and
    the batch the next steps ran the quantised target (eq. D.6)."""
    if not cfg.get("adaptive"):
        return {"cls": "skip"}
    r, n, worst, decided = (2 * cfg["n"]) ** 2 / cfg["b_simple"], cfg["n"], 0.0, 0
    for run in runs:
        records = run["records"]
        for entry in run["decisions"]:
            before = [x for x in records if x["step"] <= entry["step"]]
            if not before:
                continue
            b = before[-1]["b_simple"]
            got = entry["b_simple"]
            if not (got == b or (b != b and got != got)):
                worst = max(worst, abs(got - b) / abs(b) if b == b else math.inf)
            if "target" in entry:
                decided += 1
                worst = max(worst, abs(entry["target"] - math.sqrt(r * b)) / math.sqrt(r * b))
                aim = min(max(math.sqrt(r * b), n), 4 * n)
                if entry["action"] == "change":
                    worst = max(worst, abs(entry["batch_size"] - aim) / aim - 0.5 * n / aim)
    cls = "ok" if worst <= 1e-9 else "WRONG-SILENT"
    return {"cls": cls, "re": worst, "decisions": decided}


def _find(row, key):
    if isinstance(row, dict):
        if key in row:
            return row[key]
        for v in row.values():
            got = _find(v, key)
            if got is not None:
                return got
    return None


# --- one seed ------------------------------------------------------------------------------------


def _exception(err):
    return f"{type(err).__name__}: {err}"[:300]


def check_seed(seed, override=None, reps=None):
    """All checks of ``seed``'s configuration over its replicates (``reps`` of them where
    given: a quick sample, whose coverage check needs at least 20)."""
    cfg = draw_config(seed)
    if override:
        cfg.update(override)
    record = {"seed": seed, "cfg": cfg, "checks": {}}
    runs, reps = [], reps or replicates(cfg)
    warned: set[str] = set()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "history.jsonl")
        try:
            for rep in range(reps):
                run = run_replicate(cfg, rep, seed, path if rep == 0 else None)
                runs.append(run)
                warned.update(run["warned"])
        except NoiseScaleError as err:
            record["checks"] = {c: {"cls": "refused", "exc": _exception(err)} for c in CHECKS}
            return record
        except Exception as err:
            record["checks"] = {c: {"cls": "crash", "exc": _exception(err)} for c in CHECKS}
            return record
        checks = {
            "g2": check_bias(runs, "g2"),
            "trace": check_bias(runs, "trace_sigma"),
            "coverage": check_coverage(cfg, runs),
            "ema": check_ema(cfg, runs),
            "decision": check_decision(cfg, path, runs[0]["estimate"], warned),
            "adaptive": check_adaptive(cfg, runs),
            "report": check_report(cfg, path, runs[0]["estimate"]),
        }
        for name, part_runs in (group_runs(cfg, runs) if cfg.get("groups") else {}).items():
            checks[f"group_{name}_g2"] = check_bias(part_runs, "g2")
            checks[f"group_{name}_trace"] = check_bias(part_runs, "trace_sigma")
        if cfg.get("square"):
            bn_runs = [run["b_noise"] for run in runs]
            checks["bn_ghg"] = check_bias(bn_runs, "g2")
            checks["bn_trace"] = check_bias(bn_runs, "trace_sigma")
            checks["bn_cover"] = check_coverage(cfg, bn_runs)
        else:
            checks.update({k: {"cls": "skip"} for k in ("bn_ghg", "bn_trace", "bn_cover")})
    for res in checks.values():
        if res["cls"] == "WRONG-SILENT" and warned:
            res["cls"] = "wrong-warned"
    record["checks"] = checks
    record["warned"] = sorted(warned)[:5]
    record["replicates"] = reps
    return record


def findings(record):
    return [
        (name, res)
        for name, res in record["checks"].items()
        if res["cls"] in ("WRONG-SILENT", "crash", "wrong-warned")
    ]


def describe(record):
    cfg = record["cfg"]
    keys = ("source", "reduction", "n", "accum", "beta", "measure_every", "steps", "dist")
    extra = ("uneven", "ramp", "drift", "dataset", "adaptive", "tokens", "square", "groups")
    extra = [k for k in extra if cfg.get(k)]
    return (
        f"seed {record['seed']}: "
        + " ".join(f"{k}={cfg[k]}" for k in keys)
        + (" +" + ",".join(extra) if extra else "")
        + f" positions={cfg['positions']} B={cfg['b_simple']:g}"
    )


def main(argv=None):
    from fuzz_runner import _seeds, count_classes, print_class_table

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0:40", help="A:B (a range), or seeds A,B,C")
    parser.add_argument("--jsonl", help="append each seed's full record to this file")
    parser.add_argument("--override", help="JSON dict replacing entries of each seed's config")
    parser.add_argument("--replicates", type=int, help="replicates per seed (default: by size)")
    parser.add_argument("-v", "--verbose", action="store_true", help="each check's result")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    override = json.loads(args.override) if args.override else None
    out = open(args.jsonl, "a") if args.jsonl else None  # noqa: SIM115
    table: dict[str, dict[str, int]] = {}
    found, start, cover = [], time.time(), [0, 0]
    try:
        for seed in _seeds(args.seeds):
            record = check_seed(seed, override, args.replicates)
            if out:
                out.write(json.dumps(record, default=str) + "\n")
                out.flush()
            count_classes(table, record["checks"])
            cov = record["checks"]["coverage"]
            if "hits" in cov:
                cover[0] += cov["hits"]
                cover[1] += cov["n"]
            found += [(record, name, res) for name, res in findings(record)]
            if args.verbose:
                print(describe(record), flush=True)
                for name, res in record["checks"].items():
                    rest = {k: v for k, v in res.items() if k != "cls"}
                    print(f"  {name:10s} {res['cls']:14s} {rest}")
    finally:
        if out:
            out.close()
    print_class_table(table, [c for c in CHECKS if c in table])
    print(f"\n{len(_seeds(args.seeds))} seeds in {time.time() - start:.0f} s")
    if cover[1]:
        print(f"pooled coverage {cover[0]}/{cover[1]} = {cover[0] / cover[1]:.3f}")
    if not found:
        print("no finding")
        return 0
    print(f"\n{len(found)} findings:")
    for record, name, res in found:
        print(f"  {res['cls']} in {name}: {res}\n    {describe(record)}")
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
