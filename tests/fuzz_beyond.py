"""Adam-preconditioned and per-group noise scales over a run, against known truth.

tests/fuzz_tracker.py checks a step's preconditioned and grouped norms against brute force; this
one checks the statistics over a run and the rules around them. Its model is linear, as
tests/fuzz_stats.py's: children ``a`` and ``b`` (``nn.Linear(h, 1, bias=False)``) on two blocks
of the input, each example's loss the model's output, so example i's gradient is exactly the
vector g_i drawn (g_i = μ + A·z, z Gaussian or Student-t) whatever θ is — with a ``c`` that uses
``b``'s weight a second time (tied: the b-block split between the two uses) and a frozen ``f``
on inputs of its own, where drawn. G = μ and Σ = AAᵀ are known in closed form.

Each seed draws (:func:`draw_config`) the preconditioner — Adam, AdamW or RMSprop: eps, β₂ (α),
amsgrad, centered, weight decay (Adam's and RMSprop's L2 term enters their second moment),
foreach, fused, maximize, RMSprop's momentum, ``b`` used one step in three (Adam counts steps
per parameter), two
optimizer parameter groups with hyperparameters of their own, lr 0 (θ fixed) or a real lr —
``precondition_from``, ``groups=`` (True, ``"children"``, a mapping of module names, modules and
parameters, one that leaves ``"(other)"``, ``"param_groups"``), the source (the default
sub-batches, every example, a fraction, micro-batch norms over accumulation), ``loss_reduction``,
``measure_every``, ``beta``, ``confidence``, ``sync_every``, a ``GradScaler``, and an event after
preconditioning has started: the optimizer skips 1-3 steps, a new optimizer replaces it, or a
loss overflows under the GradScaler (which skips the optimizer's step); seeds from
``EVERY_WITH_EVENTS`` (1000) on also draw ``measure_every`` > 1 with a skip or a replaced
optimizer; seeds from ``WRINKLES_FROM`` (2000) on also draw, each on its own, optimizer steps
that leave the version counters of ``state["step"]`` where they were (a CUDA-graph replay), step
counts of shape (1,) (a loaded state_dict's), ``optimizer.step()`` before ``tracker.step()`` one
step in 2 or 3 (the warned-about order; not with a GradScaler), and the tracker saved with
``state_dict()`` after an unmeasured step (``measure_every`` > 1) and resumed into a new one with
``precondition=`` (its records those of both). R replicate runs on fresh draws.

The oracle (:class:`Second`) re-implements the optimizer's second moment and bias correction
from torch's update rules on the step's exact mean gradient (from the draws, plus the L2 term on
θ read from the model): P = 1/(√v̂ + ε) (Adam/AdamW, v̂ = v/(1 − β₂ᵗ), amsgrad's running max of
v), 1/(√(v − ḡ²) + ε) (RMSprop, centered), read as the tracker reads it — the state left by the
previous optimizer step. Per step the truth is |P⊙μ|² and tr(PΣP) = Σ_j P_j² Σ_jj, per group the
same on its coordinates. Checks:

* ``g2``, ``trace``, ``group_g2``, ``group_trace``: the unbiasedness of each preconditioned
  record's |G|² and tr Σ (total, and every group's): the mean over the replicates of each
  one's mean of (record − truth)/(|P⊙μ|² + tr(PΣP)) — a function of P alone, so still 0 where
  unbiased — |z| > Z_BIAS against its standard error over the replicates a finding;
* ``big``: each preconditioned record's big-batch ``sqnorm_big`` (total and every group's) the
  oracle's |P⊙ḡ|² on the step's own draws ḡ — exact, to float64 round-off: P itself;
* ``sum``: per record the groups' g2 and tr Σ add up to the total's (float64 round-off);
* ``coverage``, ``group_cover``: ``estimate()``'s and ``estimate_groups()``'s final intervals
  hold the true ratio of the EMA-weighted truths (the weights of the records used) at the
  nominal rate, where the docs claim it (Gaussian draws): a binomial tail below P_COVER a finding;
* ``ema``: the final estimates' |G|² and tr Σ (total and groups) the bias-corrected EMAs by hand
  of the preconditioned records, and each record's group ``g2_ema``, ``trace_sigma_ema``;
* ``flags``: the records' steps and ``"preconditioned"`` flags the oracle's (plain before the
  optimizer has taken ``precondition_from`` steps), and the rule of the docs for an optimizer that
  stops stepping once preconditioning has started (README "Beyond B_simple"): after one skipped
  optimizer step the next step is measured, after two in a row (three with ``scaler=``) the
  steps are left out until it steps again — a replaced optimizer never steps again;
* ``not_yet``: a run that never reaches ``precondition_from``: ``estimate()`` and every
  ``estimate_groups()`` value nan, the interval [0, ∞) and a reason naming precondition_from;
* ``report``: ``noisescale report --json``'s ``"groups"`` section on the first replicate's
  history: each group's B_simple the ratio of its EMAs by hand over the records read (the
  preconditioned ones), its interval ``estimate_groups()``'s, its shares of tr Σ and |G|² the
  EMAs' by hand.

Classes per check: ``ok``; ``refused`` (a NoiseScaleError where a number was due: a false
refusal); ``crash`` (any other exception); ``WRONG-SILENT`` (a bias, an interval that covers too
little, a number or a rule off, no warning); ``wrong-warned`` (the same, said); ``withheld-all``
(no record had a number); ``skip`` (the check does not apply).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import tempfile
import time
import traceback
import warnings

import numpy as np
import torch
from scipy import stats as sps

import noisescale
from noisescale.errors import NoiseScaleInputError as NoiseScaleError

Z_BIAS = 4.5  # |z| of a mean's bias that is a finding (many configurations × several checks)
P_COVER = 1e-3  # a binomial tail this improbable for the misses is a finding
# float64 throughout: records and sums agree to round-off of sums of a few hundred terms
RTOL = 1e-9
EVERY_WITH_EVENTS = 1000  # seeds from here on also draw measure_every > 1 with an event
WRINKLES_FROM = 2000  # seeds from here on also draw the situations of draw_config's end
CHECKS = (
    "g2",
    "trace",
    "group_g2",
    "group_trace",
    "big",
    "sum",
    "coverage",
    "group_cover",
    "ema",
    "flags",
    "not_yet",
    "report",
)
FINDINGS = ("WRONG-SILENT", "wrong-warned", "crash", "refused")


# --- the configuration ---------------------------------------------------------------------------


def draw_config(seed):
    """The run's options for ``seed``."""
    r = random.Random(f"beyond-{seed}")
    cfg = {
        "opt": r.choice(["adam", "adamw", "rmsprop"]),
        "eps": r.choice([1e-8, 1e-3, 0.1]),
        "beta2": r.choice([0.9, 0.99, 0.999]),  # RMSprop's alpha
        "amsgrad": r.random() < 0.3,
        "centered": r.random() < 0.3,
        "wd": r.choice([0.0, 0.0, 0.1]),
        "lr": r.choice([0.0, 0.0, 0.05]),
        "two_param_groups": r.random() < 0.3,
        "precondition_from": r.choice([1, 2, 5, 10]),
        "groups": r.choice([True, "children", "mapping", "mapping_other", "param_groups"]),
        "tied": r.random() < 0.3,
        "frozen": r.random() < 0.3,
        "ha": r.choice([1, 2, 3]),
        "hb": r.choice([1, 2, 3]),
        "dist": r.choice(["gauss", "gauss", "gauss", "t5"]),
        "b_simple": r.choice([2.0, 8.0, 30.0]),
        "n": r.choice([4, 8, 16]),
        "accum": r.choice([1, 1, 2, 3]),
        "source": r.choice(["default", "default", "exact", "fraction", "microbatch"]),
        "subbatches": r.choice([2, 4, 8]),
        "fraction": r.choice([0.5, 0.75]),
        "reduction": r.choice(["mean", "mean", "sum"]),
        "measure_every": r.choice([1, 1, 1, 2, 3]),
        "beta": r.choice([1.0, 1.0, 0.99, 0.9]),
        "confidence": r.choice([0.95, 0.9, 0.8]),
        "sync_every": r.choice([1, 4, 32, 1000]),
        "steps": r.choice([20, 30, 40]),
        "scaler": r.random() < 0.25,
        "event": r.choice([None, None, "skip1", "skip2", "skip3", "replace"]),
        "never": r.random() < 0.1,
    }
    if cfg["opt"] == "rmsprop":
        cfg["amsgrad"] = False
    else:
        cfg["centered"] = False
    if cfg["source"] == "microbatch" and cfg["accum"] == 1:
        cfg["accum"] = 2
    # the event: at an iteration after preconditioning has started (its first preconditioned
    # step measured), with room for the rule to show
    cfg["event_at"] = None
    if cfg["never"]:
        cfg.update(event=None, precondition_from=cfg["steps"] + 5)
    if cfg["event"]:
        cfg["measure_every"] = 1  # (the rule counts tracker steps; every one measured)
        cfg["event_at"] = cfg["precondition_from"] + 2 + r.randint(0, 6)
    # torch's other implementations and options of the same update (drawn last: the earlier
    # draws of a seed stay as they were)
    cfg["variant"] = r.choice([None, None, "foreach", "maximize", "fused_or_momentum"])
    # b (and its tied use) in one step of ``b_every`` only: the optimizer steps it only then
    # (Adam counts steps per parameter), and the other steps' gradients are 0 on its block
    cfg["b_every"] = r.choice([1, 1, 1, 1, 3])
    # a loss that overflows under the GradScaler (inf in one micro-batch): the scaler skips the
    # optimizer's step, the step's record is skipped (non-finite), the next one measured
    if r.random() < 0.5 and cfg["scaler"] and cfg["event"] is None and not cfg["never"]:
        cfg["event"] = "overflow"
        cfg["measure_every"] = 1
        cfg["event_at"] = cfg["precondition_from"] + 2 + r.randint(0, 6)
    # seeds from EVERY_WITH_EVENTS on: measure_every > 1 around a skip or a replaced optimizer
    # (the seeds below keep their configurations, those of the seed lists): the rule counts
    # tracker steps, measured or not — until 2026-12-07 the optimizer was watched at measured
    # steps only (a review)
    every = r.choice([1, 1, 2, 3, 4])
    if seed >= EVERY_WITH_EVENTS and cfg["event"] in ("skip2", "skip3", "replace") and every > 1:
        cfg["measure_every"] = every
    # seeds from WRINKLES_FROM on (the seeds below keep their configurations): the situations of
    # tests/test_preconditioned.py's regression tests of 2026-12-07, each drawn on its own —
    # ``hidden``: the optimizer's steps leave the version counters of its ``state["step"]`` as
    # they were (an optimizer step replayed from a CUDA graph); ``shape_one``: its step counts of
    # shape (1,) (as a loaded state_dict may hold); ``opt_first``: ``optimizer.step()`` before
    # ``tracker.step()`` one step in ``opt_first`` (warned about; the norms use the state read
    # during backward: the oracle's truths stand; not with a GradScaler, whose step unscales
    # the .grad the tracker reads); ``resume_at``: the tracker saved with state_dict() after an
    # unmeasured step (measure_every > 1) and resumed into a new one with precondition=
    hidden, shape_one = r.random() < 0.35, r.random() < 0.35
    opt_first = r.choice([None, None, 2, 3])
    resume = r.random() < 0.6
    cfg.update(hidden=False, shape_one=False, opt_first=None, resume_at=None)
    if seed >= WRINKLES_FROM:
        if resume and cfg["measure_every"] == 1 and cfg["event"] in (None, "skip1"):
            cfg["measure_every"] = every if every > 1 else 2  # (room for a step not measured)
        cfg.update(hidden=hidden, shape_one=shape_one)
        if not cfg["scaler"]:
            cfg["opt_first"] = opt_first
        if resume and cfg["measure_every"] > 1:
            # after a tracker step that is not measured, the next one not measured either where
            # measure_every > 2: the counts noted between measured steps are the state saved
            m = cfg["measure_every"]
            cfg["resume_at"] = m * r.randint(0, cfg["steps"] // m - 2) + r.randint(2, m)
    return cfg


def replicates(cfg):
    """Replicates for about 2400 micro-batch passes, at least 30 (coverage needs many)."""
    if cfg["never"]:
        return 3
    return max(30, min(80, 2400 // (cfg["steps"] * cfg["accum"])))


def skipped_iterations(cfg):
    """Iterations (1-based, = the tracker step just taken) after which the tracker's optimizer
    does not step."""
    e, kind = cfg["event_at"], cfg["event"]
    if kind is None:
        return set()
    if kind == "replace":
        return set(range(e, cfg["steps"] + 1))
    if kind == "overflow":
        return {e}
    return set(range(e, e + int(kind[-1])))


# --- the model -----------------------------------------------------------------------------------


class Net(torch.nn.Module):
    """⟨θ_a, x_a⟩ + ⟨θ_b, x_b⟩ (+ ⟨θ_b, x_c⟩ through a tied ``c``) (+ a frozen ``f``)."""

    def __init__(self, cfg):
        super().__init__()
        ha, hb = cfg["ha"], cfg["hb"]
        self.cfg = cfg
        self.use_b = True
        self.a = torch.nn.Linear(ha, 1, bias=False).double()
        self.b = torch.nn.Linear(hb, 1, bias=False).double()
        if cfg["tied"]:
            self.c = torch.nn.Linear(hb, 1, bias=False).double()
            self.c.weight = self.b.weight
        if cfg["frozen"]:
            self.f = torch.nn.Linear(2, 1, bias=False).double()
            self.f.weight.requires_grad_(False)

    def forward(self, x):
        ha, hb = self.cfg["ha"], self.cfg["hb"]
        d = ha + hb
        out = self.a(x[:, :ha])
        if self.use_b:
            out = out + self.b(x[:, ha:d])
        if self.cfg["tied"] and self.use_b:
            out = out + self.c(x[:, d : d + hb])
        if self.cfg["frozen"]:
            out = out + self.f(x[:, -2:])
        return out


def inputs(cfg, g, rng):
    """Rows whose gradient with respect to (θ_a, θ_b) is g: the b-block split between b's two
    uses where tied, and the frozen child's inputs of their own."""
    ha, hb = cfg["ha"], cfg["hb"]
    cols = [g[:, :ha]]
    if cfg["tied"]:
        u = rng.normal(size=(g.shape[0], hb))
        cols += [u, g[:, ha:] - u]
    else:
        cols.append(g[:, ha:])
    if cfg["frozen"]:
        cols.append(rng.normal(size=(g.shape[0], 2)))
    return torch.tensor(np.concatenate(cols, axis=1))


def make_optimizer(cfg, model):
    """The drawn optimizer on (θ_a, θ_b); two parameter groups with their own eps and β₂."""
    a, b = model.a.weight, model.b.weight
    if cfg["two_param_groups"]:
        params = [
            {"params": [a], "name": "first"},
            {"params": [b], **_hyper(cfg, cfg["eps"] * 10, 1 - (1 - cfg["beta2"]) / 2)},
        ]
    else:
        params = [a, b]
    kind = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "rmsprop": torch.optim.RMSprop}
    return kind[cfg["opt"]](params, lr=cfg["lr"], **_hyper(cfg, cfg["eps"], cfg["beta2"]))


def _hyper(cfg, eps, beta2):
    h = {"eps": eps, "weight_decay": cfg["wd"]}
    if cfg["opt"] == "rmsprop":
        h.update(alpha=beta2, centered=cfg["centered"])
    else:
        h.update(betas=(0.9, beta2), amsgrad=cfg["amsgrad"])
    variant = cfg.get("variant")
    if variant in ("foreach", "maximize"):
        h[variant] = True
    elif variant == "fused_or_momentum":
        h.update(momentum=0.9) if cfg["opt"] == "rmsprop" else h.update(fused=True)
    return h


def coordinate_hyper(cfg):
    """Each coordinate of θ = (θ_a, θ_b): its eps and β₂ (α)."""
    d = cfg["ha"] + cfg["hb"]
    eps, beta2 = np.full(d, cfg["eps"]), np.full(d, cfg["beta2"])
    if cfg["two_param_groups"]:
        eps[cfg["ha"] :] = cfg["eps"] * 10
        beta2[cfg["ha"] :] = 1 - (1 - cfg["beta2"]) / 2
    return eps, beta2


def group_option(cfg, model):
    """``groups=`` and each group's coordinates of θ, in the tracker's order."""
    ha, d = cfg["ha"], cfg["ha"] + cfg["hb"]
    first, second = list(range(ha)), list(range(ha, d))
    kind = cfg["groups"]
    if kind is True or kind == "children":
        return kind, {"a": first, "b": second}
    if kind == "mapping":
        spec = {"first": ["a", *(["f"] if cfg["frozen"] else [])], "second": [model.b]}
        if cfg["tied"]:
            spec["second"].append("c")  # (the tied weight again, in its own group: allowed)
        return spec, {"first": first, "second": second}
    if kind == "mapping_other":
        return {"mine": [model.a.weight]}, {"mine": first, "(other)": second}
    if cfg["two_param_groups"]:
        return "param_groups", {"first": first, "param_group_1": second}
    return "param_groups", {"param_group_0": first + second}


# --- the oracle ----------------------------------------------------------------------------------


class Second:
    """The optimizer's second moment, re-implemented from torch's update rules (float64)."""

    def __init__(self, cfg):
        d = cfg["ha"] + cfg["hb"]
        self.cfg = cfg
        self.eps, self.beta2 = coordinate_hyper(cfg)
        self.v = np.zeros(d)
        self.v_max = np.zeros(d)
        self.mean = np.zeros(d)  # RMSprop's grad_avg (centered)
        self.t = np.zeros(d)  # per coordinate: torch counts steps per parameter

    def update(self, grad, theta, active):
        """One optimizer step on the mean gradient ``grad`` at ``theta``, of the coordinates
        ``active`` (the parameters with a gradient: torch skips the others)."""
        cfg = self.cfg
        if cfg.get("variant") == "maximize":
            grad = -grad  # (before the L2 term: its sign matters in v)
        if cfg["opt"] in ("adam", "rmsprop") and cfg["wd"]:
            grad = grad + cfg["wd"] * theta  # (L2: AdamW's decay is decoupled, not in v)
        b = self.beta2
        self.v = np.where(active, b * self.v + (1 - b) * grad * grad, self.v)
        self.mean = np.where(active, b * self.mean + (1 - b) * grad, self.mean)
        self.v_max = np.maximum(self.v_max, self.v)
        self.t = self.t + active

    def steps(self):
        """The optimizer's steps, counted by its most-stepped parameter."""
        return int(self.t.max())

    def p(self):
        """P, or None before the first step (0 where a coordinate has no state yet)."""
        if self.steps() == 0:
            return None
        if self.cfg["opt"] == "rmsprop":
            v = self.v - self.mean**2 if self.cfg["centered"] else self.v
            p = 1.0 / (np.sqrt(np.maximum(v, 0.0)) + self.eps)
        else:
            v = self.v_max if self.cfg["amsgrad"] else self.v
            with np.errstate(divide="ignore", invalid="ignore"):
                p = 1.0 / (np.sqrt(v / (1 - self.beta2**self.t)) + self.eps)
        return np.where(self.t > 0, p, 0.0)


class Draws:
    """μ, A and the draws of one replicate."""

    def __init__(self, cfg, rng):
        d = cfg["ha"] + cfg["hb"]
        self.cfg, self.rng = cfg, rng
        a = rng.normal(size=(d, d))
        a *= math.sqrt(cfg["b_simple"] / np.sum(a * a))  # tr AAᵀ = B_simple (|μ|² = 1)
        mu = rng.normal(size=d)
        self.mu = mu / np.linalg.norm(mu)
        self.a = a
        self.var = np.sum(a * a, axis=1)  # Σ_jj

    def draw(self, m):
        d = self.cfg["ha"] + self.cfg["hb"]
        if self.cfg["dist"] == "gauss":
            z = self.rng.normal(size=(m, d))
        else:
            z = self.rng.standard_t(5.0, size=(m, d)) * math.sqrt(3.0 / 5.0)
        return self.mu + z @ self.a.T


def truth_of(p, draws, coords, mean, active):
    """|P⊙μ|², tr(PΣP) and the step's |P⊙ḡ|² (ḡ the mean of its draws) on ``coords``, the
    coordinates not ``active`` in the step contributing nothing (their gradients are 0)."""
    p = p * active
    p, mu, var, mean = p[coords], draws.mu[coords], draws.var[coords], mean[coords]
    return float(np.sum((p * mu) ** 2)), float(np.sum(p * p * var)), float(np.sum((p * mean) ** 2))


# --- one replicate -------------------------------------------------------------------------------


def tracker_options(cfg):
    opts = {
        "beta": cfg["beta"],
        "confidence": cfg["confidence"],
        "measure_every": cfg["measure_every"],
        "sync_every": cfg["sync_every"],
        "precondition_from": cfg["precondition_from"],
    }
    if cfg["source"] == "default":
        opts["subbatches"] = cfg["subbatches"]
    elif cfg["source"] == "exact":
        opts["per_example_fraction"] = 1.0
    elif cfg["source"] == "fraction":
        opts["per_example_fraction"] = cfg["fraction"]
    else:
        opts["per_example"] = False
    return opts


def run_replicate(cfg, rep, seed, history_path=None):
    """One run: its records, each step's truth, the final estimates and warnings."""
    rng = np.random.default_rng([seed, rep])
    draws = Draws(cfg, rng)
    torch.manual_seed(seed * 1000 + rep)
    model = Net(cfg)
    opt = make_optimizer(cfg, model)
    groups, coords = group_option(cfg, model)
    oracle = Second(cfg)
    skips = skipped_iterations(cfg)
    scaler = torch.amp.GradScaler("cpu") if cfg["scaler"] else None
    k = cfg["accum"]
    truths, counts = {}, {}
    earlier = []  # the records of the trackers resumed from

    def new_tracker():
        return noisescale.GradientNoiseTracker(
            model,
            cfg["reduction"],
            precondition=opt,
            groups=groups,
            scaler=scaler,
            history_path=history_path,
            **tracker_options(cfg),
        )

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = new_tracker()
        trainer = opt
        for it in range(1, cfg["steps"] + 1):
            model.use_b = (it - 1) % cfg.get("b_every", 1) == 0
            active = np.ones(cfg["ha"] + cfg["hb"], dtype=bool)
            active[cfg["ha"] :] = model.use_b
            g = draws.draw(cfg["n"] * k) * active
            for j, chunk in enumerate(np.split(g, k)):
                out = model(inputs(cfg, chunk, rng))[:, 0]
                loss = out.mean() / k if cfg["reduction"] == "mean" else out.sum()
                if cfg["event"] == "overflow" and it == cfg["event_at"] and j == 0:
                    loss = loss * math.inf
                (loss if scaler is None else scaler.scale(loss)).backward()
            # the exact .grad of (θ_a, θ_b): the loss's weights on the drawn g_i
            grad = g.mean(0) if cfg["reduction"] == "mean" else g.sum(0)
            theta = np.concatenate(
                [model.a.weight.detach().numpy()[0], model.b.weight.detach().numpy()[0]]
            )
            p = oracle.p()
            counts[it] = oracle.steps()
            if p is not None:
                mean = g.mean(0)
                truths[it] = {"(total)": truth_of(p, draws, slice(None), mean, active)} | {
                    name: truth_of(p, draws, c, mean, active) for name, c in coords.items()
                }
            first = bool(cfg.get("opt_first")) and it % cfg["opt_first"] == 0
            if not first:
                tracker.step(loss=loss.detach())
            if cfg["event"] == "replace" and it == cfg["event_at"]:
                trainer = make_optimizer(cfg, model)  # a fresh optimizer trains from here on
            if it in skips and trainer is opt and cfg["event"] != "overflow":
                if first:
                    tracker.step(loss=loss.detach())
                opt.zero_grad()
                continue  # (the loop's own guard: no step, and no scaler.update)
            if trainer is opt and it not in skips:  # (an overflow: the scaler skips it)
                oracle.update(grad, theta, active)
            counters = [st["step"] for st in opt.state.values() if "step" in st]
            versions = [c._version for c in counters]
            if scaler is None:
                trainer.step()
            else:
                scaler.step(trainer)
                scaler.update()
            if cfg.get("hidden") and counters:  # (a CUDA-graph replay: the counters held)
                torch._C._autograd._unsafe_set_version_counter(tuple(counters), tuple(versions))
            if cfg.get("shape_one"):
                for st in opt.state.values():
                    if "step" in st and st["step"].shape != (1,):
                        st["step"] = st["step"].reshape(1)
            if first:
                tracker.step(loss=loss.detach())
            trainer.zero_grad()
            opt.zero_grad()
            if it == cfg.get("resume_at"):
                saved = tracker.state_dict()
                earlier += tracker.history
                tracker.remove()
                tracker = new_tracker()
                tracker.load_state_dict(saved)
        estimate = tracker.estimate()
        estimate_groups = tracker.estimate_groups()
        tracker.remove()
    return {
        "records": earlier + tracker.history,
        "truths": truths,
        "counts": counts,
        "estimate": estimate,
        "groups": estimate_groups,
        "names": list(coords),
        "warned": sorted({str(w.message)[:600] for w in caught}),
    }


# --- the checks ----------------------------------------------------------------------------------


def _used(run):
    """The records folded into the preconditioned estimate, in order."""
    return [r for r in run["records"] if r.get("preconditioned") and not r["skipped"]]


def _values(record, name):
    return record if name == "(total)" else record.get("groups", {}).get(name, {})


def _z(diffs):
    x = np.asarray(diffs, dtype=float)
    if x.size < 3:
        return math.nan, math.nan
    se = x.std(ddof=1) / math.sqrt(x.size)
    return float(x.mean()), float(x.mean() / se) if se > 0 else math.inf * np.sign(x.mean())


def check_bias(runs, name, key):
    """Each preconditioned record's ``key`` of ``name`` against its step's truth, the error of
    each step divided by that step's |P⊙μ|² + tr(PΣP): a function of P alone, fixed before the
    step's draws, so the ratio's mean is still 0 where the record is unbiased — and a replicate
    whose early v̂ gave some coordinate a P near 1/ε (the docs' reason for precondition_from)
    no longer swamps the others (its |z| stayed near 1 whatever the bias)."""
    index = 0 if key == "g2" else 1
    diffs, scale = [], []
    for run in runs:
        rows = [
            (_values(r, name)[key], run["truths"][r["step"]][name])
            for r in _used(run)
            if r["step"] in run["truths"]
        ]
        rows = [(got, t[index], t[0] + t[1]) for got, t in rows if t[0] + t[1] > 0]
        if not rows:
            continue
        got, want, norm = np.array(rows).T
        diffs.append(float(np.mean((got - want) / norm)))
        scale.append(float(np.mean(np.abs(want) / norm)))
    if not diffs:
        return {"cls": "withheld-all"}
    bias, z = _z(diffs)
    rel = bias / max(float(np.mean(scale)), 1e-300)
    cls = "ok" if not abs(z) > Z_BIAS else "WRONG-SILENT"
    return {"cls": cls, "re": round(rel, 4), "z": round(z, 2), "reps": len(diffs)}


def check_group_bias(runs, key):
    """:func:`check_bias` for every group: the worst |z|."""
    worst = {"cls": "skip"}
    for name in runs[0]["names"]:
        res = check_bias(runs, name, key) | {"group": name}
        if worst["cls"] in ("skip", "withheld-all") or (
            res["cls"] != "withheld-all" and not abs(res["z"]) <= abs(worst["z"])
        ):
            worst = res
    return worst


def check_big(runs):
    """Each preconditioned record's big-batch |P⊙ḡ|² (total and groups) against the oracle's P
    on the step's own draws: exact, to float64 round-off."""
    worst, where = 0.0, None
    for run in runs:
        for r in _used(run):
            truth = run["truths"].get(r["step"])
            if truth is None:
                return {"cls": "WRONG-SILENT", "why": f"step {r['step']} preconditioned, no P"}
            for name in ["(total)", *run["names"]]:
                got = _values(r, name).get("sqnorm_big")
                e = _rel(got, truth[name][2])
                if e > worst:
                    worst, where = e, (r["step"], name, got, truth[name][2])
    if where is None:
        return {"cls": "skip"}
    return {"cls": "ok" if worst < RTOL else "WRONG-SILENT", "re": worst, "worst": where}


def check_sum(runs):
    """Per record, the groups' g2 and tr Σ add up to the total's."""
    worst = 0.0
    for run in runs:
        for r in _used(run):
            groups = r.get("groups") or {}
            if sorted(groups) != sorted(run["names"]):
                return {"cls": "WRONG-SILENT", "why": f"groups {sorted(groups)}", "step": r["step"]}
            for key in ("g2", "trace_sigma"):
                parts = [groups[n][key] for n in run["names"]]
                scale = math.fsum(abs(x) for x in parts) + abs(r[key]) + 1e-300
                worst = max(worst, abs(math.fsum(parts) - r[key]) / scale)
    return {"cls": "ok" if worst < RTOL else "WRONG-SILENT", "re": worst}


def _ema_truth(cfg, run, name):
    """The ratio of the EMA-weighted truths of the records used (the estimate's target)."""
    used = [r for r in _used(run) if r["step"] in run["truths"]]
    if not used:
        return math.nan
    w = cfg["beta"] ** np.arange(len(used) - 1, -1, -1, dtype=float)
    g2 = w @ [run["truths"][r["step"]][name][0] for r in used]
    tr = w @ [run["truths"][r["step"]][name][1] for r in used]
    return float(tr / g2)


def check_coverage(cfg, runs, names):
    """The final intervals hold the truth at their nominal rate (Gaussian draws: the docs'
    claim; a binomial tail)."""
    if cfg["dist"] != "gauss":
        return {"cls": "skip"}
    worst = {"cls": "skip"}
    for name in names:
        hits = counted = lows = 0
        for run in runs:
            e = run["estimate"] if name == "(total)" else run["groups"][name]
            if not (math.isfinite(e.low) and e.high == e.high):
                continue
            counted += 1
            b = _ema_truth(cfg, run, name)
            if e.low <= b <= e.high:
                hits += 1
            elif b > e.high:
                lows += 1
        if counted < 20:
            continue
        misses = counted - hits
        p = float(sps.binom.sf(misses - 1, counted, 1.0 - cfg["confidence"]))
        res = {
            "cls": "ok" if p >= P_COVER else "WRONG-SILENT",
            "group": name,
            "cover": round(hits / counted, 3),
            "n": counted,
            "read_low": lows,
            "p": float(f"{p:.3g}"),
        }
        if worst["cls"] == "skip" or p < worst["p"]:
            worst = res
    return worst


def check_ema(cfg, runs):
    """The final estimates' |G|² and tr Σ, and each record's group EMAs, by hand."""
    worst = 0.0
    for run in runs:
        used = _used(run)
        if not used:
            continue
        for name in ["(total)", *run["names"]]:
            g2s = np.array([_values(r, name)["g2"] for r in used])
            trs = np.array([_values(r, name)["trace_sigma"] for r in used])
            for t in range(len(used)):
                w = cfg["beta"] ** np.arange(t, -1, -1, dtype=float)
                g2, tr = w @ g2s[: t + 1] / w.sum(), w @ trs[: t + 1] / w.sum()
                if name != "(total)":
                    rec = _values(used[t], name)
                    worst = max(
                        worst, _rel(rec["g2_ema"], g2, tr), _rel(rec["trace_sigma_ema"], tr)
                    )
            e = run["estimate"] if name == "(total)" else run["groups"][name]
            worst = max(worst, _rel(e.g2, g2, tr), _rel(e.trace_sigma, tr))
    return {"cls": "ok" if worst < RTOL else "WRONG-SILENT", "re": worst}


def _rel(got, want, scale=None):
    scale = abs(want) if scale is None else abs(want) + abs(scale)
    if got is None:
        return math.inf
    return abs(got - want) / (scale + 1e-300)


def expected_records(cfg, run):
    """The oracle's records: ``{step: preconditioned}`` for the steps measured and not left out
    (README: plain before ``precondition_from`` optimizer steps; once preconditioning has started,
    after one skipped optimizer step the next step is measured, after two in a row — three with
    ``scaler=`` — the steps are left out until it steps again)."""
    skips = skipped_iterations(cfg)
    limit = 3 if cfg["scaler"] else 2
    # the optimizer's steps each tracker.step() sees: those of the iterations before, and the
    # iteration's own where optimizer.step() ran first (``opt_first``: seen at once, the stall
    # counted from there — tests/test_preconditioned.py pins [0, 3] at step 3; P and the
    # "preconditioned" flag are the backward's, the oracle's ``counts``)
    first = cfg.get("opt_first")
    seen, moved = [0], [0]
    for s in range(1, cfg["steps"] + 1):
        own = bool(first) and s % first == 0 and s not in skips
        seen.append(sum(1 for i in range(1, s) if i not in skips) + own)
        moved.append(s if seen[s] != seen[s - 1] else moved[s - 1])
    want, started = {}, False
    for s in range(1, cfg["steps"] + 1):
        if (s - 1) % cfg["measure_every"]:
            continue
        stalled = s - moved[s] if first else 0
        while not first and s - 1 - stalled in skips:
            stalled += 1
        if started and stalled >= limit:
            continue
        pre = run["counts"][s] >= cfg["precondition_from"]
        want[s] = pre
        started = started or pre
    return want


def check_flags(cfg, runs):
    """The records' steps and ``"preconditioned"`` flags against :func:`expected_records`."""
    for rep, run in enumerate(runs):
        want = expected_records(cfg, run)
        got = {r["step"]: r.get("preconditioned") for r in run["records"]}
        if got != want:
            extra = sorted(set(got) - set(want))
            missing = sorted(set(want) - set(got))
            flags = sorted(s for s in set(got) & set(want) if got[s] != want[s])
            said = any("has not stepped" in w for w in run["warned"])
            return {
                "cls": "wrong-warned" if extra and said else "WRONG-SILENT",
                "rep": rep,
                "recorded_not_due": extra,
                "missing": missing,
                "flags_off": flags,
            }
    return {"cls": "ok"}


def check_not_yet(cfg, runs):
    """A run that never reached ``precondition_from``: no estimate, and why."""
    if not cfg["never"]:
        return {"cls": "skip"}
    for run in runs:
        for name, e in [("(total)", run["estimate"]), *run["groups"].items()]:
            bad = (
                not math.isnan(e.b_simple)
                or e.low != 0.0
                or e.high != math.inf
                or "precondition_from" not in (e.reason or "")
            )
            if bad:
                return {"cls": "WRONG-SILENT", "group": name, "got": str(e)[:300]}
    return {"cls": "ok"}


def _cli(argv):
    from noisescale.cli import main as cli_main

    buf, err_buf = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(err_buf):
            rc = cli_main(argv)
    except SystemExit as err:
        rc = err.code
    except NoiseScaleError as err:
        return None, None, {"cls": "refused", "exc": str(err)[:200]}
    except Exception as err:
        return None, None, {"cls": "crash", "exc": f"{type(err).__name__}: {err}"[:300]}
    if rc not in (0, None):
        return rc, err_buf.getvalue(), None
    return rc, buf.getvalue(), None


def check_report(cfg, run, history_path):
    """``report --json``'s groups against the estimator applied by hand to the records."""
    used = _used(run)
    if not used:
        return {"cls": "skip"}
    rc, text, raised = _cli(["report", history_path, "-o", history_path + ".html", "--json"])
    if raised is not None:
        return raised
    if rc not in (0, None):
        # the report needs two records with a B_simple (README): a run whose averaged |G|² is
        # not yet positive at most steps has none to show, and is refused so
        finite = [
            r for r in used if r.get("b_simple") is not None and r["b_simple"] == r["b_simple"]
        ]
        if len(finite) < 2 and "needs at least two" in text:
            return {"cls": "refused-ok", "finite": len(finite)}
        return {"cls": "refused", "exc": f"rc {rc}: {text.strip()[-300:]}"}
    out = json.loads(text[text.index("{") :])
    rows = {g["name"]: g for g in out.get("groups", [])}
    if sorted(rows) != sorted(run["names"]):
        return {"cls": "WRONG-SILENT", "why": f"groups {sorted(rows)} for {run['names']}"}
    w = cfg["beta"] ** np.arange(len(used) - 1, -1, -1, dtype=float)
    ema = {
        n: (
            float(w @ [_values(r, n)["g2"] for r in used] / w.sum()),
            float(w @ [_values(r, n)["trace_sigma"] for r in used] / w.sum()),
        )
        for n in run["names"]
    }
    sum_g2 = math.fsum(g for g, _ in ema.values())
    sum_tr = math.fsum(t for _, t in ema.values())
    worst, why = 0.0, ""
    for n, (g2, tr) in ema.items():
        row, e = rows[n], run["groups"][n]
        b = tr / g2 if g2 > 0 and tr > 0 else None
        got = row["b_simple"]
        if (b is None) != (got is None):
            return {"cls": "WRONG-SILENT", "group": n, "b_simple": got, "by_hand": b}
        if b is not None:
            worst = max(worst, _rel(got, b))
        low, high = row["b_simple_interval"]
        for x, y in ((low, e.low), (high, e.high)):
            x = math.inf if x is None and y == math.inf else x
            if x is None or not (x == y or _rel(x, y) < 1e-9):
                why = f"{n}: interval {row['b_simple_interval']} for [{e.low}, {e.high}]"
                worst = math.inf
        if sum_tr > 0 and row["trace_sigma_share"] is not None:
            worst = max(worst, _rel(row["trace_sigma_share"], tr / sum_tr, 1.0))
        if sum_g2 > 0 and row["g2_share"] is not None:
            worst = max(worst, _rel(row["g2_share"], g2 / sum_g2, 1.0))
    cls = "ok" if worst < 1e-9 else "WRONG-SILENT"
    return {"cls": cls, "re": worst, **({"why": why} if why else {})}


def _guard(fn):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn()
    except NoiseScaleError as err:
        return {"cls": "refused", "exc": f"{type(err).__name__}: {err}"[:400]}
    except Exception as err:
        tb = traceback.extract_tb(err.__traceback__)[-1]
        where = f"{os.path.basename(tb.filename)}:{tb.lineno}"
        return {"cls": "crash", "exc": f"{type(err).__name__}: {err} ({where})"[:400]}


# --- one seed ------------------------------------------------------------------------------------


def check_seed(seed, override=None, checks=CHECKS, reps=None):
    cfg = draw_config(seed)
    if override:
        cfg.update(override)
    record = {"seed": seed, "cfg": cfg, "checks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "history.jsonl")
        first = {}

        def run_all():
            runs = []
            for rep in range(reps or replicates(cfg)):
                runs.append(run_replicate(cfg, rep, seed, path if rep == 0 else None))
            first["run"] = runs[0]
            return runs

        runs = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                runs = run_all()
        except NoiseScaleError as err:
            bad = {"cls": "refused", "exc": f"{type(err).__name__}: {err}"[:400]}
        except Exception as err:
            tb = traceback.extract_tb(err.__traceback__)[-1]
            where = f"{os.path.basename(tb.filename)}:{tb.lineno}"
            bad = {"cls": "crash", "exc": f"{type(err).__name__}: {err} ({where})"[:400]}
        if runs is None:
            for name in checks:
                record["checks"][name] = bad
            return record
        names = ["(total)", *runs[0]["names"]]
        run = {
            "g2": lambda: check_bias(runs, "(total)", "g2"),
            "trace": lambda: check_bias(runs, "(total)", "trace_sigma"),
            "group_g2": lambda: check_group_bias(runs, "g2"),
            "group_trace": lambda: check_group_bias(runs, "trace_sigma"),
            "big": lambda: check_big(runs),
            "sum": lambda: check_sum(runs),
            "coverage": lambda: check_coverage(cfg, runs, names[:1]),
            "group_cover": lambda: check_coverage(cfg, runs, names[1:]),
            "ema": lambda: check_ema(cfg, runs),
            "flags": lambda: check_flags(cfg, runs),
            "not_yet": lambda: check_not_yet(cfg, runs),
            "report": lambda: check_report(cfg, runs[0], path),
        }
        for name in checks:
            record["checks"][name] = _guard(run[name])
    return record


def findings(record):
    return [(n, r) for n, r in record["checks"].items() if r["cls"] in FINDINGS]


def describe(record):
    cfg = record["cfg"]
    keys = (
        "opt",
        "eps",
        "beta2",
        "amsgrad",
        "centered",
        "wd",
        "lr",
        "precondition_from",
        "groups",
        "tied",
        "frozen",
        "source",
        "reduction",
        "accum",
        "measure_every",
        "sync_every",
        "scaler",
        "event",
        "event_at",
        "variant",
        "b_every",
        "hidden",
        "shape_one",
        "opt_first",
        "resume_at",
    )
    return f"seed {record['seed']}: " + " ".join(f"{k}={cfg[k]}" for k in keys)


def main(argv=None):
    from fuzz_runner import (
        _seeds,
        check_parser,
        print_class_table,
        print_findings,
        run_check_seeds,
    )

    parser = check_parser(__doc__, "0:100")
    parser.add_argument("--checks", default=",".join(CHECKS), help="comma-separated checks")
    parser.add_argument("--reps", type=int, help="replicates per seed (default: by the config)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    checks = tuple(args.checks.split(","))
    override = json.loads(args.override) if args.override else None
    start = time.time()
    table, found, _ = run_check_seeds(
        _seeds(args.seeds),
        lambda seed: check_seed(seed, override, checks, args.reps),
        findings, args.jsonl, args.verbose, describe, width=11,
    )  # fmt: skip
    print_class_table(table, [c for c in CHECKS if c in table], column_width=12)
    print(f"\n{len(_seeds(args.seeds))} seeds in {time.time() - start:.0f} s")
    return print_findings(found, describe)


if __name__ == "__main__":
    raise SystemExit(main())
