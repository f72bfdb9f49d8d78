"""The adaptive batch size, the warm-up ramp and their learning rates against the documented rules.

``noisescale.schedule`` (docs/adaptive.md) decides every step's batch size and writes a
learning-rate factor into the optimizer and its schedulers. This fuzzer drives it with a random
configuration per seed (:func:`draw_config`) and checks every step against an independent
re-implementation of the documented rules (:func:`Oracle`, :func:`ramp_batch`), written from
docs/adaptive.md and not from the code:

* ``adaptive``: an :class:`AdaptiveBatchSize` (B = √(r·B_simple) or c·B_simple, min/max bounds,
  a micro-batch × a world size, hysteresis, interval, the confidence gate, ``allow_decrease``,
  ``base_batch_size``, an LR rule of the five) driven by a scripted sequence of estimates
  (unavailable ones, wide intervals, estimates in tokens with their tokens per example); an
  SGD or Adam optimizer of 1-3 parameter groups at different rates, 0-2 torch schedulers
  (StepLR, LambdaLR warm-up, MultiplicativeLR, OneCycleLR, CosineAnnealingLR with a floor,
  ExponentialLR, SequentialLR of two, MultiStepLR, LinearLR, ConstantLR, PolynomialLR,
  CosineAnnealingWarmRestarts, CyclicLR, ReduceLROnPlateau on a scripted metric,
  ChainedScheduler, a warm-up + cosine of the user's own), Adam's rates as float64 tensors now
  and then, stepped before or after the schedule; ``step(None)`` steps and ``examples=``
  counts; a checkpoint
  (optimizer, schedulers, schedule, through JSON) at a random step, restored either after the
  schedule is built (the test's order) or before it (optimizer and schedulers loaded first); a
  parameter group added mid-run (no scheduler); on resume, now and then another interval,
  hysteresis, gate, rate and bounds (which the docs allow). Every step: ``batch_size`` (the oracle's
  decision, a multiple of the micro-batch within the bounds), ``num_micro_batches``,
  ``loss_divisor``, ``lr_factor``, ``state.examples`` and every group's ``lr`` = the factor ×
  the rate a twin optimizer with the same schedulers and no schedule has (never compounding).
* ``ramp``: a :class:`BatchSizeRamp`, linear or stepwise, in examples or tokens (``examples=``
  the real count, jittered), with the same optimizers, schedulers and resume.
* ``sampler``: either schedule given a :class:`ResizableBatchSampler` (world size 1-4, the world
  patched in), drawn from for 2-3 epochs: every batch of the size the schedule sets
  (``batch_size / tokens_per_example / world``), each index exactly once per epoch, and after
  a resume the sampler's size restored.
* ``tracker``: a real :class:`GradientNoiseTracker` on a linear model fed known examples while
  the schedule changes the accumulation: each record's ``b_big``, ``examples``, ``sqnorm_big``
  (|mean gradient over the step's examples|², brute force), the micro-batch source's and the
  per-example source's ``sqnorm_small``; driven by an adaptive schedule or a ramp whose knots go
  up and down (each stepped through a stand-in source that forwards ``expect_micro_batches``),
  realised
  by accumulation or by one backward over the whole batch. A step the tracker leaves out as "an
  epoch's short last window" (the schedule's own change, the tracker not told) is WRONG-CAUSE.
* ``lightning``: (every 10th seed) Lightning's callback driving a ramp, the tracker's
  ``measure_every`` 1-3: before every optimizer step the ramp's count of examples is the
  trainer's.

Classes per check: ``ok``; ``refused`` (a NoiseScaleError where the configuration is one the
docs refuse); ``FALSE-REFUSAL`` (a NoiseScaleError elsewhere); ``crash`` (any other exception);
``WRONG-SILENT`` (a number off, no warning); ``wrong-warned`` (the same with a warning);
``WRONG-CAUSE`` (a warning that names another cause than the schedule's).

Run: ``PYTHONPATH=src python tests/fuzz_schedule.py --seeds 0:200 [-v] [--jsonl out.jsonl]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
import warnings
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from fuzz_runner import _seeds, print_class_table, run_seeds
from noisescale import GradientNoiseTracker
from noisescale.errors import NoiseScaleInputError as NoiseScaleError
from noisescale.estimators import NoiseEstimate
from noisescale.schedule import AdaptiveBatchSize, BatchSizeRamp, ResizableBatchSampler

RTOL = 1e-9
MODES = ("adaptive", "ramp", "sampler", "tracker", "lightning")
LIGHTNING_EVERY = 10  # the Lightning mode (a few seconds a fit) on every 10th seed
FINDINGS = ("WRONG-SILENT", "wrong-warned", "crash", "FALSE-REFUSAL", "WRONG-CAUSE")
SCHEDULERS = (
    "step",
    "lambda",
    "mult",
    "onecycle",
    "cosine",
    "exp",
    "sequential",
    "multistep",
    "linear",
    "constant",
    "poly",
    "restarts",
    "cyclic",
    "plateau",
    "chained",
    "custom",
)


# --- the configuration ----------------------------------------------------------------------------


def draw_config(seed):
    """The schedule, optimizer, schedulers, estimates and resume for ``seed``."""
    r = random.Random(f"schedule-{seed}")
    micro = r.choice([1, 2, 3, 4, 8]) * r.choice([1, 1, 2, 4])  # per-process × world
    lo = micro * r.choice([1, 1, 2, 3])
    hi = lo + micro * r.choice([0, 1, 3, 10, 40, 200])
    start = lo + micro * r.randint(0, (hi - lo) // micro)
    rule = r.choice(["none", "linear", "sqrt", "paper", "adascale"])
    cfg = {
        "micro": micro,
        "world": r.choice([1, 1, 2, 4]),
        "min": lo,
        "max": hi,
        "start": start,
        "target": r.choice(["rate", "factor"]),
        "rate": r.choice([1.0, 10.0, 100.0, 4000.0]) * r.uniform(0.5, 2),
        "c": r.choice([0.1, 0.5, 1.0, 2.0]),
        "interval": r.choice([1, 1, 2, 3, 5, 10]),
        "hysteresis": r.choice([1.0, 1.1, 1.25, 2.0]),
        "gate": r.choice([0.3, 0.5, 1.0, 2.0, math.inf]),
        "decrease": r.random() < 0.7,
        "rule": rule,
        "base": r.choice([None, None, start, lo, hi, micro * r.randint(1, 50)]),
        "alpha": r.choice([1.0, 1.0, 0.5, 0.8]),
        "b_star": r.choice([None, 10.0, 300.0]) if rule == "paper" else None,
        "opt": r.choice(["sgd", "adam"]),
        "groups": [r.choice([1e-3, 0.01, 0.1, 0.5]) for _ in range(r.choice([1, 2, 3]))],
        "schedulers": r.sample(SCHEDULERS, r.choice([0, 1, 1, 2])),
        "tensor_lr": r.random() < 0.15,  # Adam's rates as tensors (foreach off)
        "no_source": r.choice([0.0, 0.0, 0.3]),  # steps counted with step(None)
        "examples_arg": r.random() < 0.2,  # step(examples=) a count other than the batch
        "resume_change": r.random() < 0.3,  # interval, hysteresis, gate, rate, bounds changed
        "order": r.choice(["sched-first", "schedule-first"]),  # scheduler.step() vs schedule.step()
        "steps": r.choice([20, 40, 80]),
        "resume": r.choice([None, "after", "before"]),
        "add_group": r.random() < 0.2,
        "b_scale": r.choice([1.0, 10.0, 1000.0, 1e5]),
        "drift": r.choice([0.0, 0.05, 0.3]),
        "unavailable": r.random() < 0.2,
        "tokens": r.choice([None, None, 1, 7]),  # estimates in tokens
        # the ramp
        "ramp": r.choice(["linear", "stepwise"]),
        "ramp_unit": r.choice(["examples", "tokens"]),
        "tpe": r.choice([1, 4, 16]),  # tokens per example (a ramp in tokens)
        "knots": r.choice([2, 3, 4]),
        "jitter": r.random() < 0.3,  # examples= the real count, a little off the batch
        "ramp_rule": r.choice(["none", "linear", "sqrt", "paper"]),
        # the sampler
        "n_data": r.choice([7, 50, 123, 500]),
        "drop_last": r.random() < 0.3,
        "shuffle": r.random() < 0.5,
    }
    cfg["resume_at"] = r.randint(1, cfg["steps"] - 1)
    cfg["add_at"] = r.randint(1, cfg["steps"] - 1)
    return cfg


def scripted_estimates(cfg, steps, seed):
    """Per step, the estimate a stub tracker reports (B_simple drifting, an interval of a drawn
    width, now and then unavailable; in tokens with ``tokens`` per example)."""
    r = random.Random(f"estimates-{seed}")
    b = cfg["b_scale"] * r.uniform(0.2, 5)
    out = []
    for _ in range(steps):
        b *= math.exp(r.gauss(cfg["drift"], 0.3 if cfg["drift"] else 0.0))
        b = min(max(b, 1e-3), 1e9)
        if cfg["unavailable"] and r.random() < 0.2:
            out.append(
                NoiseEstimate(
                    g2=-1.0,
                    trace_sigma=1.0,
                    b_simple=math.nan,
                    low=0.0,
                    high=math.inf,
                    reason="not yet",
                )
            )
            continue
        width = r.choice([0.1, 0.4, 0.9, 1.5, 3.0, math.inf])
        g2 = r.choice([1e-4, 1.0, 30.0])
        low = b * max(0.0, 1 - width / 2) if math.isfinite(width) else 0.0
        high = b * (1 + width / 2) if math.isfinite(width) else math.inf
        if math.isfinite(width) and low == 0.0:
            high = b * width
        t = cfg["tokens"]
        f = 1.0 if t is None else float(t)
        out.append(
            NoiseEstimate(
                g2=g2,
                trace_sigma=b * g2 * f,
                b_simple=b * f,
                low=low * f,
                high=high * f,
                unit="examples" if t is None else "tokens",
                tokens_per_example=math.nan if t is None else float(t),
            )
        )
    return out


# --- the oracle (docs/adaptive.md, written independently) -------------------------------------


def rule_factor(rule, b, b0, alpha=1.0, b_star=None, est=None):
    """ε(B)/ε(B₀) by the docs' table; ``None`` where a measured rule has no measurement."""
    k = b / b0
    if rule == "none":
        return 1.0
    if rule == "linear":
        return k
    if rule == "sqrt":
        return math.sqrt(k)
    if rule == "paper":
        bs = b_star if b_star is not None else (est.b_simple if est is not None else None)
        if bs is None:
            return None
        return ((1 + bs / b0) / (1 + bs / b)) ** alpha
    assert rule == "adascale"
    if est is None:
        return None
    sigma2, mu2 = max(est.trace_sigma, 0.0) / b0, max(est.g2, 0.0)
    if sigma2 == 0 and mu2 == 0:
        return 1.0
    return (sigma2 + mu2) / (sigma2 / k + mu2)


def in_examples(est):
    if est.unit == "examples":
        return est
    t = est.tokens_per_example
    return NoiseEstimate(
        g2=est.g2,
        trace_sigma=est.trace_sigma / t,
        b_simple=est.b_simple / t,
        low=est.low / t,
        high=est.high / t,
    )


class Oracle:
    """The adaptive controller's documented rules, step by step."""

    def __init__(self, cfg):
        self.c = cfg
        self.batch = cfg["start"]
        self.base = cfg["start"] if cfg["base"] is None else cfg["base"]
        f0 = rule_factor(cfg["rule"], self.batch, self.base, cfg["alpha"], cfg["b_star"])
        self.factor = 1.0 if f0 is None else f0
        self.step_, self.examples, self.last = 0, 0, 0
        self.decisions = 0  # decisions taken (waits included)

    def step(self, est, examples=None):
        c = self.c
        self.step_ += 1
        self.examples += self.batch if examples is None else examples
        if est is None or self.step_ - self.last < c["interval"]:
            return
        self.last = self.step_
        self.decisions += 1
        if not (math.isfinite(est.b_simple) and est.b_simple > 0):
            return
        est = in_examples(est)
        width = (
            (est.high - est.low) / est.b_simple
            if math.isfinite(est.low) and math.isfinite(est.high)
            else math.inf
        )
        if not width <= c["gate"]:
            return
        raw = (
            math.sqrt(c["rate"] * est.b_simple) if c["target"] == "rate" else c["c"] * est.b_simple
        )
        aim = min(max(raw, c["min"]), c["max"])
        m = c["micro"]
        rounded = min(max(max(1, math.floor(raw / m + 0.5)) * m, c["min"]), c["max"])
        off = max(aim / self.batch, self.batch / aim)
        closer = abs(math.log(rounded / aim)) < abs(math.log(self.batch / aim))
        if off > c["hysteresis"] and closer and (rounded > self.batch or c["decrease"]):
            self.batch = rounded
        f = rule_factor(c["rule"], self.batch, self.base, c["alpha"], c["b_star"], est)
        if f is not None:
            self.factor = f


def ramp_points(cfg):
    unit = cfg["tpe"] if cfg["ramp_unit"] == "tokens" else 1
    micro = cfg["micro"] * unit
    r = random.Random(json.dumps(cfg, sort_keys=True, default=str))
    sizes = sorted(micro * r.randint(1, 60) for _ in range(cfg["knots"]))
    xs = [0.0, *sorted(r.sample(range(micro, micro * 400), cfg["knots"] - 1))]
    return micro, [(float(x), b) for x, b in zip(xs, sizes, strict=True)]


def ramp_batch(done, pts, micro, interpolate):
    """The ramp's batch after ``done`` examples (tokens): held or linear between knots."""
    i = max(j for j, (x, _) in enumerate(pts) if done >= x)
    b = pts[i][1]
    if interpolate and i + 1 < len(pts):
        x0, b0 = pts[i]
        x1, b1 = pts[i + 1]
        b = b0 + (b1 - b0) * (done - x0) / (x1 - x0)
    return max(1, math.floor(b / micro + 0.5)) * micro


# --- the optimizer and its schedulers ------------------------------------------------------------


class WarmupCosine(torch.optim.lr_scheduler.LRScheduler):
    """A scheduler of the user's own computing from its base_lrs (the docs' accepted kind)."""

    def __init__(self, optimizer, warmup=5, total=60):
        self.warmup, self.total = warmup, total
        super().__init__(optimizer)

    def get_lr(self):
        e = self.last_epoch
        if e < self.warmup:
            f = (e + 1) / self.warmup
        else:
            f = 0.5 * (1 + math.cos(math.pi * min(1.0, (e - self.warmup) / self.total)))
        return [b * f for b in self.base_lrs]


def build_optimizer(cfg, seed, extra=False):
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(3)) for _ in cfg["groups"]]
    tensor = cfg.get("tensor_lr") and cfg["opt"] == "adam"
    groups = [
        {"params": [p], "lr": torch.tensor(lr, dtype=torch.float64) if tensor else lr}
        for p, lr in zip(params, cfg["groups"], strict=True)
    ]
    if cfg["opt"] == "sgd":
        return torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    return torch.optim.Adam(groups, lr=0.1, foreach=False)


def build_schedulers(cfg, opt):
    out, s = [], torch.optim.lr_scheduler
    steps = cfg["steps"] + 5
    for name in cfg["schedulers"]:
        if name == "step":
            out.append(s.StepLR(opt, step_size=7, gamma=0.5))
        elif name == "lambda":
            out.append(s.LambdaLR(opt, lambda e: min(1.0, (e + 1) / 10)))
        elif name == "mult":
            out.append(s.MultiplicativeLR(opt, lambda e: 0.97))
        elif name == "onecycle":
            out.append(s.OneCycleLR(opt, max_lr=[2 * g for g in cfg["groups"]], total_steps=steps))
        elif name == "cosine":
            out.append(s.CosineAnnealingLR(opt, T_max=15, eta_min=1e-4))
        elif name == "exp":
            out.append(s.ExponentialLR(opt, gamma=0.95))
        elif name == "sequential":
            warm = s.LambdaLR(opt, lambda e: (e + 1) / 5)
            cos = s.CosineAnnealingLR(opt, T_max=20, eta_min=1e-3)
            out.append(s.SequentialLR(opt, [warm, cos], milestones=[5]))
        elif name == "multistep":
            out.append(s.MultiStepLR(opt, milestones=[4, 9, 30], gamma=0.3))
        elif name == "linear":
            out.append(s.LinearLR(opt, start_factor=0.2, total_iters=12))
        elif name == "constant":
            out.append(s.ConstantLR(opt, factor=0.5, total_iters=6))
        elif name == "poly":
            out.append(s.PolynomialLR(opt, total_iters=steps, power=2.0))
        elif name == "restarts":
            out.append(s.CosineAnnealingWarmRestarts(opt, T_0=7, T_mult=2, eta_min=1e-4))
        elif name == "cyclic":
            out.append(
                s.CyclicLR(
                    opt,
                    base_lr=[g / 4 for g in cfg["groups"]],
                    max_lr=list(cfg["groups"]),
                    step_size_up=6,
                    cycle_momentum=cfg["opt"] == "sgd",
                )
            )
        elif name == "plateau":
            out.append(s.ReduceLROnPlateau(opt, patience=1, factor=0.5, min_lr=1e-3))
        elif name == "chained":
            out.append(
                s.ChainedScheduler(
                    [s.ExponentialLR(opt, gamma=0.9), s.MultiStepLR(opt, milestones=[8], gamma=0.5)]
                )
            )
        elif name == "custom":
            out.append(WarmupCosine(opt))
    return out


def step_scheduler(s, t):
    """One scheduler step (ReduceLROnPlateau given a scripted metric that stalls)."""
    if isinstance(s, torch.optim.lr_scheduler.ReduceLROnPlateau):
        s.step(1.0 / (1 + min(t, 5)))
    else:
        s.step()


def _train(opt):
    for g in opt.param_groups:
        for p in g["params"]:
            p.grad = torch.ones_like(p) * 0.01
    opt.step()
    opt.zero_grad()


# --- the runs -----------------------------------------------------------------------------------


def _close(got, want):
    return math.isclose(got, want, rel_tol=RTOL, abs_tol=1e-300)


class Mismatch(Exception):
    pass


class WrongCause(Exception):
    """A warning or refusal that names another cause than the schedule's."""


def _expect(what, got, want):
    if isinstance(want, float) or isinstance(got, float):
        ok = _close(float(got), float(want))
    else:
        ok = got == want
    if not ok:
        raise Mismatch(f"{what}: got {got!r}, want {want!r}")


def _classify(fn, refused_ok=False):
    """Run ``fn`` and turn its outcome into a result dict."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fn()
        except WrongCause as err:
            return {"cls": "WRONG-CAUSE", "exc": str(err)[:400]}
        except Mismatch as err:
            warned = [str(w.message)[:120] for w in caught if "noisescale" in str(w.message)]
            return {
                "cls": "wrong-warned" if warned else "WRONG-SILENT",
                "exc": str(err)[:400],
                "warned": warned[:2],
            }
        except NoiseScaleError as err:
            cls = "refused" if refused_ok else "FALSE-REFUSAL"
            return {"cls": cls, "exc": f"{type(err).__name__}: {str(err)[:300]}"}
        except Exception as err:
            return {"cls": "crash", "exc": f"{type(err).__name__}: {str(err)[:300]}"}
    return {"cls": "ok"}


def _world(world):
    dist = torch.distributed
    return contextlib.ExitStack() if world == 1 else _patched_world(dist, world)


@contextlib.contextmanager
def _patched_world(dist, world):
    with (
        mock.patch.object(dist, "is_initialized", return_value=True),
        mock.patch.object(dist, "get_world_size", return_value=world),
    ):
        yield


def _draw(bs, state, epochs, cfg, share, where):
    """The sampler's next batch; a new epoch where the last one ended (``[]`` where the new
    epoch has no batch: drop_last with a batch above the data)."""
    if state["it"] is None:
        state["it"] = iter(bs)
    got = next(state["it"], None)
    if got is None:
        epochs.append(state["seen"])
        state["seen"], state["it"] = [], iter(bs)
        got = next(state["it"], None)
        if got is None:
            state["it"] = None
            if not (cfg["drop_last"] and share > cfg["n_data"]):
                raise Mismatch(f"{where}: an epoch of no batch at share {share}")
            return []
    return got


def _checkpoint(opt, schedulers, schedule):
    return json.loads(
        json.dumps(
            {
                "schedule": schedule.state_dict(),
            }
        )
    ), {
        "opt": opt.state_dict(),
        "schedulers": [s.state_dict() for s in schedulers],
    }


def run_lr_mode(cfg, seed, kind, sampler=False):
    """Drive ``kind`` ("adaptive" or "ramp") for the configured steps with a twin optimizer (same
    schedulers, no schedule) as the reference for the rates; resume per ``cfg["resume"]``."""
    steps = cfg["steps"]
    estimates = scripted_estimates(cfg, steps, seed)
    add = cfg["add_group"] and not cfg["schedulers"]
    micro, pts = ramp_points(cfg)
    interpolate = cfg["ramp"] == "linear"
    tpe = cfg["tpe"] if cfg["ramp_unit"] == "tokens" else None
    world = cfg["world"] if sampler else 1
    if sampler and kind == "adaptive" and cfg["micro"] % world:
        world = 1
    if sampler and kind == "ramp" and (micro // (tpe or 1)) % world:
        world = 1
    data = None

    def make(opt, schedulers, batch_sampler):
        if kind == "adaptive":
            kw = {"exchange_rate": cfg["rate"]} if cfg["target"] == "rate" else {"factor": cfg["c"]}
            return AdaptiveBatchSize(
                micro_batch_size=cfg["micro"],
                min_batch_size=cfg["min"],
                max_batch_size=cfg["max"],
                batch_size=cfg["start"],
                interval=cfg["interval"],
                hysteresis=cfg["hysteresis"],
                max_relative_width=cfg["gate"],
                allow_decrease=cfg["decrease"],
                lr_rule=cfg["rule"],
                base_batch_size=cfg["base"],
                alpha=cfg["alpha"],
                b_star=cfg["b_star"],
                optimizer=opt,
                lr_schedulers=schedulers,
                batch_sampler=batch_sampler,
                **kw,
            )
        rule = cfg["ramp_rule"]
        return BatchSizeRamp(
            pts,
            micro_batch_size=micro,
            interpolate=interpolate,
            lr_rule=rule,
            b_star=300.0 if rule == "paper" else None,
            alpha=cfg["alpha"],
            base_batch_size=cfg["base"],
            optimizer=opt,
            lr_schedulers=schedulers,
            batch_sampler=batch_sampler,
            tokens_per_example=tpe if batch_sampler is not None else None,
        )

    def body():
        nonlocal data, cfg
        opt = build_optimizer(cfg, seed)
        scheds = build_schedulers(cfg, opt)
        twin = build_optimizer(cfg, seed)
        twin_scheds = build_schedulers(cfg, twin)
        bs = None
        if sampler:
            g = torch.Generator().manual_seed(seed)
            base_sampler = (
                torch.utils.data.RandomSampler(range(cfg["n_data"]), generator=g)
                if cfg["shuffle"]
                else cfg["n_data"]
            )
            bs = ResizableBatchSampler(base_sampler, 1, drop_last=cfg["drop_last"])
        sched = make(opt, scheds, bs)
        if kind == "adaptive":
            oracle = Oracle(cfg)
        else:
            base = pts[-1][1] if cfg["base"] is None else cfg["base"]
            rule = cfg["ramp_rule"]
            ramp_b = ramp_batch(0.0, pts, micro, interpolate)
            ramp_done = ramp_steps = 0
            ramp_f = rule_factor(rule, ramp_b, base, cfg["alpha"], 300.0)
        pick = random.Random(f"steps-{seed}")
        added = None  # the added group's own rate and whether it carries the factor yet
        decisions_at_add = None
        state_it, epochs = {"it": None, "seen": []}, []
        for t in range(steps):
            if kind == "adaptive":
                o_batch, o_factor = oracle.batch, oracle.factor
            else:
                o_batch, o_factor = ramp_b, ramp_f
            where = f"step {t}"
            _expect(f"{where} batch_size", sched.batch_size, o_batch)
            unit = micro if kind == "ramp" else cfg["micro"]
            _expect(f"{where} num_micro_batches", sched.num_micro_batches, o_batch // unit)
            _expect(
                f"{where} loss_divisor",
                sched.loss_divisor,
                1 if bs is not None else o_batch // unit,
            )
            _expect(f"{where} lr_factor", float(sched.lr_factor), float(o_factor))
            twin_lrs = [float(g["lr"]) for g in twin.param_groups]
            for i, g in enumerate(opt.param_groups[: len(twin_lrs)]):
                _expect(f"{where} lr of group {i}", float(g["lr"]), o_factor * twin_lrs[i])
            if added is not None:
                lr0, since = added
                # the factor comes at the next decision (a ramp: its next step)
                carries = (oracle.decisions if kind == "adaptive" else ramp_steps) > since
                want = lr0 * (o_factor if carries else 1.0)
                _expect(f"{where} lr of the added group", opt.param_groups[-1]["lr"], want)
            if bs is not None:
                share = o_batch // (tpe or 1) // world if kind == "ramp" else o_batch // world
                _expect(f"{where} sampler batch_size", bs.batch_size, share)
                got = _draw(bs, state_it, epochs, cfg, share, where)
                if got:
                    left = cfg["n_data"] - len(state_it["seen"])
                    if len(got) != share and not (
                        len(got) == left < share and not cfg["drop_last"]
                    ):
                        raise Mismatch(
                            f"{where}: a batch of {len(got)}, the schedule's share "
                            f"{share} ({left} left in the epoch)"
                        )
                    state_it["seen"].extend(got)
            # the training step
            _train(opt)
            _train(twin)
            done = o_batch
            if kind == "ramp" and cfg["jitter"]:
                done = o_batch + random.Random(seed * 1000 + t).randint(-micro // 2, micro // 2)
            est = estimates[t]

            both = [*scheds, *twin_scheds]
            if cfg["order"] == "sched-first":
                for s in both:
                    step_scheduler(s, t)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                if kind == "adaptive":
                    src = None if pick.random() < cfg["no_source"] else est
                    count = None
                    if cfg["examples_arg"]:
                        count = max(0, o_batch + pick.randint(-o_batch // 2, o_batch))
                    sched.step(src, examples=count)
                    oracle.step(src, count)
                else:
                    sched.step(examples=done if cfg["jitter"] else None)
                    ramp_done += done
                    ramp_steps += 1
                    ramp_b = ramp_batch(ramp_done, pts, micro, interpolate)
                    ramp_f = rule_factor(rule, ramp_b, base, cfg["alpha"], 300.0)
            if cfg["order"] != "sched-first":
                for s in both:
                    step_scheduler(s, t)
            if kind == "adaptive":
                _expect(f"step {t + 1} examples", sched.state.examples, oracle.examples)
            else:
                _expect(f"step {t + 1} examples", sched.state.examples, ramp_done)
            if add and t + 1 == cfg["add_at"] and added is None:
                p = torch.nn.Parameter(torch.randn(2))
                opt.add_param_group({"params": [p], "lr": 0.02})
                added = (0.02, oracle.decisions if kind == "adaptive" else ramp_steps)
                decisions_at_add = added
            if cfg["resume"] and t + 1 == cfg["resume_at"]:
                saved, states = _checkpoint(opt, scheds, sched)
                fresh = build_optimizer(cfg, seed + 1)
                if added is not None:
                    fresh.add_param_group(
                        {"params": [torch.nn.Parameter(torch.randn(2))], "lr": 0.5}
                    )
                fresh_scheds = build_schedulers(cfg, fresh)
                if cfg["resume"] == "before":
                    fresh.load_state_dict(states["opt"])
                    for s, st in zip(fresh_scheds, states["schedulers"], strict=True):
                        s.load_state_dict(st)
                if cfg["resume_change"] and kind == "adaptive":
                    # what may change on resume: bounds (holding the batch), rate, interval,
                    # hysteresis, the gate
                    ch = random.Random(f"change-{seed}")
                    b, m = oracle.batch, cfg["micro"]
                    cfg = {
                        **cfg,
                        "interval": ch.choice([1, 2, 7]),
                        "hysteresis": ch.choice([1.0, 1.5]),
                        "gate": ch.choice([0.5, math.inf]),
                        "rate": cfg["rate"] * ch.choice([0.25, 4.0]),
                        "c": cfg["c"] * 2,
                        "min": m * ch.randint(1, min(b, cfg["start"]) // m),
                        "max": max(b, cfg["start"]) + m * ch.randint(0, 20),
                    }
                    oracle.c = cfg
                sched = make(fresh, fresh_scheds, bs)
                if bs is not None:
                    bs.batch_size = 1  # a fresh sampler's size, restored by load_state_dict
                if cfg["resume"] == "after":
                    fresh.load_state_dict(states["opt"])
                    for s, st in zip(fresh_scheds, states["schedulers"], strict=True):
                        s.load_state_dict(st)
                sched.load_state_dict(saved["schedule"])
                opt, scheds = fresh, fresh_scheds
        del decisions_at_add
        if bs is not None:
            epochs.append(state_it["seen"])
            for e, seen in enumerate(epochs):
                complete = e < len(epochs) - 1
                if len(set(seen)) != len(seen):
                    raise Mismatch(f"epoch {e}: an index drawn twice")
                if complete and not cfg["drop_last"] and sorted(seen) != list(range(cfg["n_data"])):
                    raise Mismatch(f"epoch {e}: {len(seen)} of {cfg['n_data']} indices drawn")

    with _world(world):
        return _classify(body)


class ScriptedSource:
    """A tracker's stand-in for the schedule: a scripted estimate, and the real tracker told of
    the accumulation (as :meth:`AdaptiveBatchSize.step` tells a tracker)."""

    def __init__(self, tracker, estimate):
        self.tracker, self._estimate = tracker, estimate

    def estimate(self):
        return self._estimate

    def expect_micro_batches(self, k):
        self.tracker.expect_micro_batches(k)


def run_tracker_mode(cfg, seed):
    """A real tracker on a linear model while a schedule changes the batch between steps: an
    adaptive schedule (scripted estimates) or a ramp whose knots go up and down, each stepped
    with a stand-in source that forwards ``expect_micro_batches`` to the tracker (a ramp tells
    it of each new accumulation, as ``ramp.step(tracker)`` does), realised by accumulation or by
    one backward over the whole batch (a ``ResizableBatchSampler``'s loop). Each record that is
    not skipped: ``b_big``, ``examples``, ``sqnorm_big`` (|mean gradient over the step's
    examples|², brute force), the micro-batch source's and (all examples kept) the per-example
    source's ``sqnorm_small``."""
    r = random.Random(f"tracker-cfg-{seed}")
    m = r.choice([1, 2, 3, 4])
    hi = m * r.choice([2, 3, 6])
    driver = r.choice(["adaptive", "adaptive", "ramp"])
    whole = r.random() < 0.3  # one backward over the whole batch (a batch sampler's loop)
    fraction = r.choice([None, 1.0, 0.5])

    def body():
        torch.manual_seed(seed)
        model = torch.nn.Linear(3, 1).double()
        kw = {} if fraction is None else {"per_example_fraction": fraction}
        tracker = GradientNoiseTracker(model, sync_every=1, **kw)
        bs = ResizableBatchSampler(10_000, m) if whole else None
        if driver == "adaptive":
            sched = AdaptiveBatchSize(
                micro_batch_size=m,
                max_batch_size=hi,
                factor=1.0,
                interval=1,
                hysteresis=1.0,
                max_relative_width=math.inf,
                batch_sampler=bs,
            )
        else:
            knots = [(0.0, m * r.randint(1, hi // m))]
            for _ in range(r.randint(1, 4)):
                knots.append((knots[-1][0] + m * r.randint(1, 20), m * r.randint(1, hi // m)))
            sched = BatchSizeRamp(knots, micro_batch_size=m, interpolate=False, batch_sampler=bs)
        script = random.Random(f"tracker-{seed}")
        examples, skipped = 0, 0
        for t in range(12):
            k, b_step = sched.num_micro_batches, sched.batch_size
            xs = torch.randn(b_step, 3, dtype=torch.float64)
            ys = torch.randn(b_step, 1, dtype=torch.float64)
            if whole:
                F.mse_loss(model(xs), ys).backward()
            else:
                for j in range(k):
                    sl = slice(j * m, (j + 1) * m)
                    (F.mse_loss(model(xs[sl]), ys[sl]) / sched.loss_divisor).backward()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                tracker.step()
            short = [w for w in caught if "short last window" in str(w.message)]
            if short:
                # the schedule changed the accumulation and the tracker, not told, takes the
                # step for an epoch's short window: left out, its fix (watch_loss) not the cause
                raise WrongCause(
                    f"step {t}: a {driver} schedule's step of {k} micro-batches after more left "
                    f"out as an epoch's short window: {str(short[0].message)[:100]}"
                )
            model.zero_grad()
            rec = tracker.history[-1]
            examples += b_step
            w = [p.detach().clone().requires_grad_(True) for p in model.parameters()]

            def grad(x, y, w=w):
                loss = F.mse_loss(x @ w[0].T + w[1], y)
                return torch.cat([g.flatten() for g in torch.autograd.grad(loss, w)])

            big = grad(xs, ys)
            _expect(f"step {t} examples", rec["examples"], examples)
            if rec.get("skipped"):
                skipped += 1
            else:
                _expect(f"step {t} b_big", float(rec["b_big"]), float(b_step))
                if not math.isclose(rec["sqnorm_big"], float(big @ big), rel_tol=1e-7):
                    raise Mismatch(f"step {t} sqnorm_big {rec['sqnorm_big']} != {float(big @ big)}")
                sources = rec.get("sources", {})
                micro_src = sources.get("microbatch")
                if micro_src is not None and not whole:
                    _expect(f"step {t} microbatch count", float(micro_src["count"]), float(k))
                    smalls = [
                        grad(xs[j * m : (j + 1) * m], ys[j * m : (j + 1) * m]) for j in range(k)
                    ]
                    want = sum(float(s @ s) for s in smalls) / k
                    if not math.isclose(micro_src["sqnorm_small"], want, rel_tol=1e-7):
                        raise Mismatch(
                            f"step {t} microbatch sqnorm_small "
                            f"{micro_src['sqnorm_small']} != {want}"
                        )
                pe = sources.get("per_example")
                if pe is not None and int(pe["count"]) == b_step:
                    want = (
                        sum(
                            float(grad(xs[i : i + 1], ys[i : i + 1]).square().sum())
                            for i in range(b_step)
                        )
                        / b_step
                    )
                    if not math.isclose(pe["sqnorm_small"], want, rel_tol=1e-7):
                        raise Mismatch(
                            f"step {t} per-example sqnorm_small {pe['sqnorm_small']} != {want}"
                        )
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.01 * torch.randn_like(p)
            b = m * script.randint(1, hi // m)
            est = NoiseEstimate(g2=1.0, trace_sigma=b, b_simple=float(b), low=b * 0.9, high=b * 1.1)
            sched.step(ScriptedSource(tracker, est))

    return _classify(body)


def run_lightning_mode(cfg, seed):
    """Lightning's callback realising a stepwise or linear :class:`BatchSizeRamp` in examples
    (micro-batch 2-4, the tracker's ``measure_every`` 1-3): before every optimizer step the ramp's
    count of examples is the examples the trainer put through the model, and the step's
    accumulation is the ramp's batch (at the latest k − 1 steps later, where Lightning's epoch
    position allows a change)."""
    import lightning.pytorch as pl

    from noisescale.integrations.lightning import NoiseScaleCallback

    r = random.Random(f"lightning-{seed}")
    m = r.choice([2, 4])
    knots = [(0.0, m)]
    for _ in range(r.randint(1, 3)):
        knots.append((knots[-1][0] + m * r.randint(2, 12), m * r.randint(1, 4)))
    interpolate = r.random() < 0.5
    every = r.choice([1, 1, 2, 3])
    n = m * r.choice([12, 17, 24])

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(3, 1)
            self.seen, self.micro, self.rows = 0, 0, []

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, i):
            x, y = batch
            self.seen += len(x)
            self.micro += 1
            return F.mse_loss(self(x), y)

        def on_before_optimizer_step(self, optimizer):
            done = self.seen - self.micro * m
            self.rows.append((ramp.state.examples, done, self.micro))
            self.micro = 0

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    def body():
        torch.manual_seed(seed)
        data = torch.utils.data.TensorDataset(torch.randn(n, 3), torch.randn(n, 1))
        loader = torch.utils.data.DataLoader(data, batch_size=m)
        module = Module()
        kw = {} if every == 1 else {"measure_every": every}
        trainer = pl.Trainer(
            max_epochs=2,
            callbacks=[NoiseScaleCallback(ramp, **kw)],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="lightning")
            warnings.filterwarnings("ignore", category=UserWarning)
            trainer.fit(module, loader)
        for t, (counted, done, _) in enumerate(module.rows):
            _expect(f"step {t} (measure_every={every}) the ramp's examples", counted, done)

    ramp = BatchSizeRamp(knots, micro_batch_size=m, interpolate=interpolate)
    with contextlib.redirect_stdout(None), contextlib.redirect_stderr(None):
        return _classify(body)


def check_seed(seed, modes=MODES, override=None):
    cfg = draw_config(seed)
    if override:
        cfg.update(override)
    record = {"seed": seed, "spec": cfg, "modes": {}}
    for mode in modes:
        if mode == "adaptive":
            res = run_lr_mode(cfg, seed, "adaptive")
        elif mode == "ramp":
            res = run_lr_mode(cfg, seed, "ramp")
        elif mode == "sampler":
            res = run_lr_mode(cfg, seed, "adaptive" if seed % 2 else "ramp", sampler=True)
        elif mode == "tracker":
            res = run_tracker_mode(cfg, seed)
        else:
            if seed % LIGHTNING_EVERY:
                continue
            res = run_lightning_mode(cfg, seed)
        record["modes"][mode] = res
    return record


def findings(record):
    return [
        (mode, res["cls"], res.get("exc"))
        for mode, res in record["modes"].items()
        if res["cls"] in FINDINGS
    ]


def describe(record):
    c = record["spec"]
    keys = (
        "micro",
        "min",
        "max",
        "start",
        "rule",
        "base",
        "schedulers",
        "resume",
        "order",
        "ramp",
        "ramp_unit",
        "ramp_rule",
        "world",
        "add_group",
    )
    return f"seed {record['seed']}: " + ", ".join(f"{k}={c.get(k)}" for k in keys)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0:200", help="A:B (a range), or seeds A,B,C")
    parser.add_argument("--jsonl", help="append each seed's full record to this file")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--override", help="JSON dict replacing entries of each seed's config")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    modes = tuple(args.modes.split(","))
    override = json.loads(args.override) if args.override else None
    start = time.time()
    table, found, _ = run_seeds(
        _seeds(args.seeds), lambda seed: check_seed(seed, modes, override), args.jsonl,
        args.verbose, line=describe, find=findings,
    )  # fmt: skip
    print_class_table(table, [m for m in MODES if m in table])
    print(f"\n{len(_seeds(args.seeds))} seeds in {time.time() - start:.0f} s")
    if not found:
        print("no finding")
        return 0
    print(f"\n{len(found)} findings:")
    for record, mode, cls, exc in found:
        print(f"  {cls} in {mode}: {exc}\n    {describe(record)}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
