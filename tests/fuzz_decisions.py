"""What a batch size costs: the decisions of ``recommend`` and ``calc`` against the closed forms.

Each seed draws a decision problem (:func:`draw_config`): a noise scale (from 0.3 to 10⁵
examples, at times exactly one of the candidate batch sizes or beyond every one of them), a
measured throughput profile written to a file (timed batch sizes, step times on a line
t(b) = α + β·b with or without timing noise, the optimizer update timed apart or not — or
timed above α —, a memory search's limit, a batch that ran out of memory while timing, the
device type, the gradient bytes), device counts, batch sizes given or the default grid, a
largest micro-batch, an interconnect or a bandwidth, gradient bytes, a target (S_min, E_min or
none), a price and a currency; and a ``calc`` problem (a noise scale or Kaplan's loss, batch sizes
as a list or a range, a learning rate and its rule, α, a temperature change) and a trajectory of
a run (steps, batch sizes, B_simple along it). Checked against computations written here from
the paper and docs/hardware.md, never from noisescale's own functions:

* ``split``: ``accumulation_split`` against the documented rule (the smallest divisor k of B
  with ⌈B/m⌉ ≤ k < 2⌈B/m⌉, else ⌈B/m⌉ unequal passes) by brute force, and its sizes and weights;
* ``fit``: the profile's ``fit_step_time`` against ``scipy.stats.linregress`` (α, β, their
  standard errors, the largest relative residual);
* ``recommend``: ``recommend_batch_size`` on the profile read back from its file against the
  cost model by hand: the candidates (the N·2ⁱ grid or the given sizes on the counts that divide
  them), k·(α − u) + u + β·B/N + 2·(N−1)/N·bytes/bandwidth per step, S/S_min = 1 + B_noise/B,
  E/E_min = 1 + B/B_noise, time = S·t_step, GPU-hours = time·N/3600, money, the relative times and
  costs, the Pareto front as the non-dominated set, the three picks as documented, the devices
  without a candidate, the hours' unit; refusals where the inputs leave no candidate, a
  micro-batch at or above the batch that ran out of memory, or a pass of no time;
* ``rec_cli``: ``noisescale recommend --json`` on the same inputs: the same numbers (JSON vs
  the library), and ``rec_text``: the text's front rows and picks against the JSON;
* ``calc``: ``noisescale calc --json`` against eq. 2.6, 2.7, 2.11, A.3 (the learning-rate rules)
  and C.2 (the temperature) by hand, the batch sizes its range syntax expands to, Kaplan's
  B_crit(L) = 2·10⁸·L^−4.76; ``calc_text``: the text's numbers against the JSON's;
* ``theory``: ``run_integrals`` (eq. D.1 step by step) against a per-step loop,
  ``fixed_batch_cost``, ``adaptive_batch_cost``, ``adaptive_gamma``, ``natural_exchange_rate``,
  ``exchange_rate_for_examples``, ``pareto_steps_over_min`` and ``adaptive_batch_size`` against
  their definitions on those integrals (and on a trajectory B_noise(s) against a fine quadrature);
* ``refuse``: inf and NaN noise scales, targets and prices refused by the library and the CLI.

Classes per check: ``ok``; ``refused`` (a refusal the inputs call for, its message naming the
cause); ``WRONG-SILENT`` (a number off, no error); ``FALSE-REFUSAL`` (a refusal of inputs that
price fine); ``WRONG-CAUSE`` (a refusal of the wrong cause); ``crash`` (any other exception);
``skip``.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import os
import random
import re
import statistics
import tempfile
import time
import warnings

import numpy as np
from scipy import stats as sps

from noisescale import theory
from noisescale.errors import NoiseScaleInputError as NoiseScaleError

RTOL = 1e-9  # the library's numbers against the closed forms by hand
TEXT_TOL = 6e-3  # a number printed to 3-4 significant digits against the JSON's
CHECKS = (
    "split",
    "fit",
    "recommend",
    "rec_cli",
    "rec_text",
    "calc",
    "calc_text",
    "theory",
    "calc_hist",
    "report",
    "profile",
    "refuse",
    "refuse_theory",
)
BANDWIDTHS = {"pcie4": 20e9, "pcie5": 40e9, "nvlink3": 230e9, "nvlink4": 400e9}
FINDINGS = ("WRONG-SILENT", "crash", "FALSE-REFUSAL", "WRONG-CAUSE")


def _logu(rng, lo, hi):
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def draw_config(seed):
    """The seed's decision problem: a JSON-able dict (see the module docstring)."""
    rng = random.Random(seed)
    cfg = {}
    # the profile: timed batch sizes and a step-time line
    n_points = rng.choice([2, 3, 4, 6])
    start = rng.choice([1, 2, 3, 4, 8])
    ratio = rng.choice([2, 2, 3])
    cfg["timed"] = [start * ratio**i for i in range(n_points)]
    cfg["alpha"] = _logu(rng, 1e-4, 0.5)
    cfg["beta"] = rng.choice([0.0, _logu(rng, 1e-6, 1e-2), _logu(rng, 1e-6, 1e-2)])
    cfg["time_noise"] = rng.choice([0.0, 0.0, 0.01, 0.2])
    cfg["repeats"] = rng.choice([1, 3])
    cfg["update"] = rng.choice([None, 0.0, "part", "part", "over"])
    cfg["max_batch"] = rng.choice([None, cfg["timed"][-1], cfg["timed"][-1] * rng.choice([1, 4])])
    cfg["oom"] = rng.choice([None, None, cfg["timed"][-1] + rng.choice([1, 7, 40])])
    cfg["device_type"] = rng.choice(["cuda", "cuda", "cpu", "mps"])
    cfg["param_bytes"] = rng.choice([0, int(_logu(rng, 1e3, 1e10))])
    # the decision
    cfg["b_noise"] = _logu(rng, 0.3, 1e5) if rng.random() < 0.85 else _logu(rng, 1e-3, 1e9)
    cfg["devices"] = sorted(rng.sample([1, 2, 3, 4, 6, 8, 16], rng.choice([1, 1, 2, 3])))
    if rng.random() < 0.5:
        cfg["batch_sizes"] = sorted(
            {int(_logu(rng, 1, 1e5)) for _ in range(rng.randint(1, 6))}
            | {rng.choice(cfg["devices"]) * 2 ** rng.randint(0, 12)}
        )
    else:
        cfg["batch_sizes"] = None
    if rng.random() < 0.2:  # B_noise exactly at a candidate (or the grid's edge)
        grid = cfg["batch_sizes"] or [cfg["devices"][0] * 2**i for i in range(12)]
        cfg["b_noise"] = float(rng.choice([grid[0], grid[-1], rng.choice(grid)]))
    cfg["max_micro"] = rng.choice([None, None, rng.randint(1, 300)])
    cfg["link"] = rng.choice(["pcie4", "pcie5", "nvlink3", "nvlink4", None, "bw"])
    cfg["bandwidth_gb"] = _logu(rng, 0.5, 900) if cfg["link"] == "bw" else None
    cfg["grad_bytes"] = rng.choice([None, None, 0.0, _logu(rng, 1e3, 1e10)])
    cfg["target"] = rng.choice([None, "steps", "examples"])
    cfg["target_value"] = _logu(rng, 10, 1e6) * (
        cfg["b_noise"] if cfg["target"] == "examples" else 1
    )
    cfg["price"] = rng.choice([None, _logu(rng, 0.1, 50)])
    cfg["currency"] = rng.choice([None, "USD", "€"]) if cfg["price"] else None
    # calc
    cfg["calc_source"] = rng.choice(["noise", "noise", "kaplan"])
    cfg["calc_noise"] = _logu(rng, 1, 1e6)
    cfg["kaplan_loss"] = rng.uniform(0.8, 8.0)
    cfg["calc_sizes"] = rng.choice(["one", "list", "geom", "arith"])
    cfg["calc_start"] = rng.choice([1, 3, 16, 100, 1000, 1.5, 2.5e6])
    cfg["calc_factor"] = rng.choice([2, 3, 10, 1.5])
    cfg["calc_count"] = rng.randint(1, 9)
    cfg["calc_over"] = rng.choice([0, 0, 1])
    cfg["calc_list"] = [int(_logu(rng, 1, 1e7)) for _ in range(rng.randint(1, 5))]
    cfg["lr_rule"] = rng.choice([None, "noise", "linear", "sqrt", "none"])
    cfg["lr"] = _logu(rng, 1e-5, 1.0)
    cfg["lr_batch"] = rng.choice([None, int(_logu(rng, 1, 1e5))])
    cfg["calc_alpha"] = rng.choice([1.0, 0.5, 0.73])
    cfg["temperature"] = rng.choice([None, (_logu(rng, 1e-6, 1), _logu(rng, 1e-6, 1))])
    if rng.random() < 0.05:  # a ratio T0/T1 far beyond any noise scale, either way
        k = rng.choice([-1, 1]) * rng.randint(150, 300)
        cfg["temperature"] = (10.0**-k, 10.0**k)
    # a run's trajectory
    cfg["traj_records"] = rng.randint(2, 12)
    cfg["traj_gap"] = rng.choice([1, 1, 7, 50, 300])
    cfg["traj_batch"] = rng.choice(["const", "ramp", "jumps"])
    cfg["traj_noise"] = rng.choice(["const", "grow", "zigzag", "zero_start"])
    cfg["traj_seed"] = rng.randint(0, 2**31)
    return cfg


# --- the profile ---------------------------------------------------------------------------------


def make_profile(cfg, rng):
    """The profile (as the file holds it) and the truth it stands for: the line through its
    points' medians (timing noise drawn here)."""
    from noisescale.hardware import ThroughputPoint, ThroughputProfile

    points = []
    for b in cfg["timed"]:
        t0 = cfg["alpha"] + cfg["beta"] * b
        times = tuple(
            t0 * (1.0 + cfg["time_noise"] * rng.uniform(-1, 1)) for _ in range(cfg["repeats"])
        )
        points.append(ThroughputPoint(b, times))
    update = cfg["update"]
    if update == "part":
        update = cfg["alpha"] * rng.uniform(0.05, 0.9)
    elif update == "over":
        update = cfg["alpha"] * rng.uniform(1.1, 3.0)
    fields = {
        "device": {"type": cfg["device_type"], "name": "fuzz device"},
        "model": {"name": "fuzz", "parameters": 1, "param_bytes": cfg["param_bytes"]},
        "max_batch_size": cfg["max_batch"],
        "optimizer_update_s": update,
        "optimizer_update_times_s": () if update is None else (update,),
        "out_of_memory_batch_size": cfg["oom"],
        "settings": {"optimizer": "sgd"},
    }
    return ThroughputProfile.from_points(points, **fields)


def check_fit(profile):
    """The stored fit against scipy's linregress on the points' medians."""
    b = np.array([p.batch_size for p in profile.points], dtype=float)
    t = np.array([float(np.median(p.times_s)) for p in profile.points])
    fit = profile.fit
    res = sps.linregress(b, t)
    want = {"alpha_s": res.intercept, "beta_s": res.slope}
    if b.size > 2:
        want |= {"alpha_se_s": res.intercept_stderr, "beta_se_s": res.stderr}
    resid = np.max(np.abs(t - (res.intercept + res.slope * b)) / t)
    # α and β relative to the line's size over the timed range (β = 0 fits as ±1e-19)
    scale = max(abs(res.intercept), abs(res.slope) * b.max(), 1e-300)
    unit = {"alpha_s": 1.0, "beta_s": b.max(), "alpha_se_s": 1.0, "beta_se_s": b.max()}
    errs = {k: abs(getattr(fit, k) - v) * unit[k] for k, v in want.items()}
    # (the standard errors of a line exact to rounding are rounding noise, both ways)
    floor = {"alpha_s": 1e-9, "beta_s": 1e-9, "alpha_se_s": 1e-2, "beta_se_s": 1e-2}
    errs = {k: e / max(abs(want[k]) * unit[k], floor[k] * scale) for k, e in errs.items()}
    errs["max_rel_residual"] = abs(fit.max_rel_residual - resid) if resid > 1e-9 else 0.0
    if b.size == 2 and (fit.alpha_se_s is not None or fit.beta_se_s is not None):
        return {"cls": "WRONG-SILENT", "why": "standard errors of a two-point line"}
    errs = {k: e / (1e-4 if k.endswith("se_s") else 1e-6) for k, e in errs.items()}
    worst = max(errs, key=errs.get)
    if errs[worst] > 1:
        return {"cls": "WRONG-SILENT", "why": worst, "re": errs[worst]}
    return {"cls": "ok"}


# --- the recommendation by hand ------------------------------------------------------------------


def split_by_hand(batch, limit):
    """(k, micro) of the documented accumulation rule, by brute force over k."""
    k0 = -(-batch // limit)
    for k in range(k0, 2 * k0):
        if batch % k == 0:
            return k, batch // k
    return k0, -(-batch // k0)


def check_split(cfg, rng):
    from noisescale.hardware.accumulation import accumulation_split

    for _ in range(40):
        batch = int(_logu(rng, 1, 2e5))
        limit = int(_logu(rng, 1, 2e3))
        try:
            s = accumulation_split(batch, limit)
        except Exception as err:
            return {"cls": "crash", "exc": f"{type(err).__name__}: {err}"[:300]}
        k, micro = split_by_hand(batch, limit)
        sizes = s.sizes()
        if (
            (s.num_micro_batches, s.micro_batch_size) != (k, micro)
            or sum(sizes) != batch
            or max(sizes) > limit
            or max(sizes) - min(sizes) > 1
            or s.equal != (batch % k == 0)
            or abs(sum(s.loss_weights()) - 1.0) > 1e-9
        ):
            return {"cls": "WRONG-SILENT", "why": f"split({batch}, {limit}) = {s}, want {k}×"}
    return {"cls": "ok"}


def flat_alpha_by_hand(profile):
    """A fitted β < 0 (docs/hardware.md): the flat price, the mean of the medians, where it
    misses no median by more than 5% of it; else None (refused)."""
    med = [statistics.median(p.times_s) for p in profile.points]
    flat = sum(med) / len(med)
    return flat if all(abs(flat - m) <= 0.05 * m for m in med) else None


def fitting_limit(cfg):
    """The largest micro-batch known to fit, as docs/hardware.md reads a profile."""
    oom, mbs = cfg["oom"], cfg["max_batch"]
    if oom is None:
        return mbs
    if mbs is not None and mbs < oom:
        return mbs
    below = [b for b in cfg["timed"] if b < oom]
    return max(below) if below else max(oom - 1, 1)


def recommendation_by_hand(cfg, profile):
    """What the docs say the recommendation is: ``("refused", cause)`` or a dict."""
    bn = cfg["b_noise"]
    devs = sorted(set(cfg["devices"]))
    if cfg["batch_sizes"]:
        pairs = [(b, n) for b in sorted(set(cfg["batch_sizes"])) for n in devs if b % n == 0]
    else:
        pairs = []
        for n in devs:
            top = max(32 * bn, devs[-1], n, 1)
            b = n
            pairs.append((b, n))
            while b < top:
                b *= 2
                pairs.append((b, n))
        pairs.sort()
    without = [n for n in devs if not any(pn == n for _, pn in pairs)]
    flat = cfg["beta"] == 0 and cfg["time_noise"] == 0  # a fitted β < 0 is rounding there
    fit = profile.fit
    alpha, beta = fit.alpha_s, max(fit.beta_s, 0.0)
    causes = []
    if fit.beta_s < 0 and not flat:
        alpha = flat_alpha_by_hand(profile)
        if alpha is None:
            causes.append("falls")
    if cfg["max_micro"] is not None and cfg["oom"] is not None and cfg["max_micro"] >= cfg["oom"]:
        causes.append("out of memory")
    if not pairs:
        causes.append("no candidate")
    if causes:
        return ("refused", causes)
    limit = cfg["max_micro"] if cfg["max_micro"] is not None else fitting_limit(cfg)
    u = min(profile.optimizer_update_s or 0.0, max(alpha, 0.0))
    bw = cfg["bandwidth_gb"] * 1e9 if cfg["link"] == "bw" else BANDWIDTHS[cfg["link"] or "pcie4"]
    nbytes = cfg["param_bytes"] if cfg["grad_bytes"] is None else cfg["grad_bytes"]
    s_min = e_min = None
    if cfg["target"] == "steps":
        s_min = cfg["target_value"]
        e_min = s_min * bn
    elif cfg["target"] == "examples":
        e_min = cfg["target_value"]
        s_min = e_min / bn
    rows = []
    for b, n in pairs:
        per = b // n
        k, micro = (1, per) if not limit else split_by_hand(per, limit)
        if alpha + beta * (per // k) <= 0:
            return ("refused", ["non-positive step time"])
        ar = 2.0 * (n - 1) / n * nbytes / bw
        step = k * (alpha - u) + u + beta * per + ar
        s_ratio = 1 + bn / b
        e_ratio = 1 + b / bn
        row = {
            "batch_size": b,
            "devices": n,
            "per_device_batch_size": per,
            "micro_batch_size": micro,
            "num_micro_batches": k,
            "equal_micro_batches": per % k == 0,
            "extrapolated": not cfg["timed"][0] <= micro <= cfg["timed"][-1],
            "steps_over_min": s_ratio,
            "examples_over_min": e_ratio,
            "step_time_s": step,
            "allreduce_s": ar,
            "optimizer_update_s": u,
            "time_per_s_min_s": s_ratio * step,
            "_g": n * s_ratio * step,
        }
        if s_min is not None:
            row |= {
                "steps": s_min * s_ratio,
                "examples": e_min * e_ratio,
                "time_s": s_min * s_ratio * step,
                "gpu_hours": s_min * s_ratio * step * n / 3600,
                "cost": None
                if cfg["price"] is None
                else s_min * s_ratio * step * n / 3600 * cfg["price"],
            }
        rows.append(row)
    t_min = min(r["time_per_s_min_s"] for r in rows)
    g_min = min(r["_g"] for r in rows)
    for r in rows:
        r["time_rel"] = r["time_per_s_min_s"] / t_min
        r["cost_rel"] = r["_g"] / g_min
        t, g = r["time_per_s_min_s"], r["_g"]
        r["pareto"] = not any(
            (o["time_per_s_min_s"] <= t and o["_g"] <= g)
            and (o["time_per_s_min_s"] < t or o["_g"] < g)
            for o in rows
        )
    fastest = min(rows, key=lambda r: (r["time_per_s_min_s"], r["_g"], r["batch_size"]))
    cheapest = min(rows, key=lambda r: (r["_g"], r["time_per_s_min_s"], r["batch_size"]))
    balanced = min(
        rows, key=lambda r: (r["time_rel"] * r["cost_rel"], r["time_per_s_min_s"], r["batch_size"])
    )
    return {
        "rows": rows,
        "picks": {"fastest": fastest, "cheapest": cheapest, "balanced": balanced},
        "without": without,
        "s_min": s_min,
        "e_min": e_min,
        "unit": {"cuda": "GPU-h", "cpu": "CPU-h"}.get(cfg["device_type"], "device-h"),
    }


def _close(a, b, tol=RTOL):
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    return abs(a - b) <= tol * max(abs(a), abs(b), 1e-300)


def _near_tie(want):
    """Whether two candidates' times, costs or products are within rounding of each other (a
    pick or the front may then differ by the last bit: not a finding)."""
    rows = want["rows"]
    for key in ("time_per_s_min_s", "_g"):
        vals = sorted(r[key] for r in rows)
        if any(abs(a - b) <= 1e-9 * b for a, b in itertools.pairwise(vals)):
            return True
    prods = sorted(r["time_rel"] * r["cost_rel"] for r in rows)
    return any(abs(a - b) <= 1e-9 * b for a, b in itertools.pairwise(prods))


def compare_recommendation(got, want, tie):
    """``got``: the recommendation's dict (``to_dict`` or the CLI's JSON). A result dict."""
    fields = [k for k in want["rows"][0] if not k.startswith("_")]
    cands = {(c["batch_size"], c["devices"]): c for c in got["candidates"]}
    keys = [(r["batch_size"], r["devices"]) for r in want["rows"]]
    if list(cands) != keys:
        return {"cls": "WRONG-SILENT", "why": f"candidates {list(cands)[:8]}, want {keys[:8]}"}
    for r in want["rows"]:
        c = cands[(r["batch_size"], r["devices"])]
        for k in fields:
            if k == "pareto" and tie:
                continue
            if not _close(c.get(k), r[k]):
                return {
                    "cls": "WRONG-SILENT",
                    "why": f"B={r['batch_size']} N={r['devices']} {k}: {c.get(k)} want {r[k]}",
                }
        if c["per_device_batch_size"] * c["devices"] != c["batch_size"]:
            return {"cls": "WRONG-SILENT", "why": "devices × per-device ≠ B"}
    if not tie:
        for name, r in want["picks"].items():
            c = got["recommended"][name]
            if (c["batch_size"], c["devices"]) != (r["batch_size"], r["devices"]):
                return {
                    "cls": "WRONG-SILENT",
                    "why": f"{name}: B={c['batch_size']} N={c['devices']}, want "
                    f"B={r['batch_size']} N={r['devices']}",
                }
        front = [(c["batch_size"], c["devices"]) for c in got["pareto_front"]]
        want_front = sorted(
            (r for r in want["rows"] if r["pareto"]), key=lambda r: (r["time_per_s_min_s"], r["_g"])
        )
        if front != [(r["batch_size"], r["devices"]) for r in want_front]:
            return {"cls": "WRONG-SILENT", "why": f"front {front[:6]}"}
    if got["devices_without_candidates"] != want["without"]:
        return {"cls": "WRONG-SILENT", "why": f"without {got['devices_without_candidates']}"}
    if got["hours_unit"] != want["unit"]:
        return {"cls": "WRONG-SILENT", "why": f"unit {got['hours_unit']}"}
    if not (_close(got["s_min"], want["s_min"]) and _close(got["e_min"], want["e_min"])):
        return {"cls": "WRONG-SILENT", "why": f"s_min/e_min {got['s_min']} {got['e_min']}"}
    return {"cls": "ok"}


def _refusal(err, want):
    """A refusal's class: ``refused`` where the inputs call for one (its cause named), else
    ``FALSE-REFUSAL`` (or ``WRONG-CAUSE``)."""
    msg = str(err)
    if isinstance(want, tuple):
        words = {
            "out of memory": "ran out of memory",
            "no candidate": "no candidate",
            "non-positive step time": "non-positive step time",
            "falls": "falls with the batch size",
        }
        # a falling line refused where it predicts a step of no time names its cause too
        also = ["non-positive step time"] if "falls" in want[1] else []
        named = any(words[cause] in msg for cause in [*want[1], *also])
        return {"cls": "refused" if named else "WRONG-CAUSE", "exc": msg[:300]}
    # an overflow the hand computation does not see as one
    nums = [
        v
        for r in want["rows"]
        for k, v in r.items()
        if isinstance(v, float) and k in ("time_s", "gpu_hours", "cost", "examples", "steps")
    ]
    if ("out of range" in msg or "overflow" in msg) and any(
        not math.isfinite(v) or v > 1e300 for v in nums
    ):
        return {"cls": "refused", "exc": msg[:300]}
    return {"cls": "FALSE-REFUSAL", "exc": msg[:300]}


def rec_kwargs(cfg):
    from noisescale.hardware.profile import INTERCONNECTS, Interconnect

    link = INTERCONNECTS[cfg["link"]] if cfg["link"] not in (None, "bw") else None
    if cfg["link"] == "bw":
        link = Interconnect("custom", cfg["bandwidth_gb"] * 1e9, "given")
    return {
        "devices": cfg["devices"],
        "s_min": cfg["target_value"] if cfg["target"] == "steps" else None,
        "e_min": cfg["target_value"] if cfg["target"] == "examples" else None,
        "price_per_gpu_hour": cfg["price"],
        "batch_sizes": cfg["batch_sizes"],
        "max_micro_batch_size": cfg["max_micro"],
        "interconnect": link,
        "grad_bytes": cfg["grad_bytes"],
        "currency": cfg["currency"],
    }


def rec_argv(cfg, path):
    argv = ["recommend", "--noise-scale", repr(cfg["b_noise"]), "--profile", path]
    argv += ["--gpus", ",".join(map(str, cfg["devices"]))]
    if cfg["price"] is not None:
        argv += ["--price", repr(cfg["price"])]
    if cfg["currency"]:
        argv += ["--currency", cfg["currency"]]
    if cfg["target"] == "steps":
        argv += ["--target-steps", repr(cfg["target_value"])]
    elif cfg["target"] == "examples":
        argv += ["--target-examples", repr(cfg["target_value"])]
    if cfg["batch_sizes"]:
        argv += ["--batch-sizes", ",".join(map(str, cfg["batch_sizes"]))]
    if cfg["max_micro"] is not None:
        argv += ["--max-micro-batch", str(cfg["max_micro"])]
    if cfg["link"] == "bw":
        argv += ["--bandwidth", repr(cfg["bandwidth_gb"])]
    elif cfg["link"]:
        argv += ["--interconnect", cfg["link"]]
    if cfg["grad_bytes"] is not None:
        argv += ["--grad-bytes", repr(cfg["grad_bytes"])]
    return argv


def _cli(argv):
    """noisescale's CLI on ``argv``: ``(rc, stdout, stderr, exception or None)``."""
    from noisescale.cli import main as cli_main

    out, err = io.StringIO(), io.StringIO()
    exc = None
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli_main(argv)
    except SystemExit as e:
        rc = e.code
    except Exception as e:
        rc, exc = None, e
    return rc, out.getvalue(), err.getvalue(), exc


def _cli_refusal(rc, stderr, exc, want):
    if exc is not None:
        return {"cls": "crash", "exc": f"{type(exc).__name__}: {exc}"[:300]}
    if "Traceback" in stderr:
        return {"cls": "crash", "exc": stderr[-300:]}
    return _refusal(stderr, want) if isinstance(want, tuple) or rc == 2 else None


def check_recommend(cfg, profile, path):
    """``recommend``, ``rec_cli`` and ``rec_text`` results."""
    from noisescale.hardware.recommend import recommend_batch_size

    out = {}
    # the library on the profile in memory (from_points), the CLI on its file
    want = recommendation_by_hand(cfg, profile)
    tie = False if isinstance(want, tuple) else _near_tie(want)
    try:
        rec = recommend_batch_size(cfg["b_noise"], profile, **rec_kwargs(cfg))
    except NoiseScaleError as err:
        out["recommend"] = _refusal(err, want)
    except Exception as err:
        out["recommend"] = {"cls": "crash", "exc": f"{type(err).__name__}: {err}"[:300]}
    else:
        if isinstance(want, tuple):
            out["recommend"] = {"cls": "WRONG-SILENT", "why": f"priced; want {want[1]}"}
        else:
            out["recommend"] = compare_recommendation(rec.to_dict(), want, tie)
    argv = rec_argv(cfg, path)
    rc, stdout, stderr, exc = _cli([*argv, "--json"])
    if rc == 0 and exc is None:
        if isinstance(want, tuple):
            out["rec_cli"] = {"cls": "WRONG-SILENT", "why": f"priced; want {want[1]}"}
            return out | {"rec_text": {"cls": "skip"}}
        data = json.loads(stdout)
        out["rec_cli"] = compare_recommendation(data, want, tie)
        if want["without"] and "no candidate on" not in stderr:
            out["rec_cli"] = {"cls": "WRONG-SILENT", "why": "no warning of devices without"}
    else:
        out["rec_cli"] = _cli_refusal(rc, stderr, exc, want) or {
            "cls": "FALSE-REFUSAL",
            "exc": stderr[-300:],
        }
        return out | {"rec_text": {"cls": "skip"}}
    rc, text, stderr, exc = _cli(argv)
    if rc != 0 or exc is not None:
        out["rec_text"] = {"cls": "crash", "exc": f"{exc} {stderr[-300:]}"}
        return out
    out["rec_text"] = compare_text(text, data, tie)
    return out


def _parse_amount(s):
    """'×1.23' -> (1.23, 'rel'); '2.5 h' -> seconds; '30 min' -> seconds."""
    s = s.strip()
    if s.startswith("×"):
        return float(s[1:]), "rel"
    value, unit = s.split()[:2]
    return float(value) * (3600 if unit == "h" else 60), "s"


def compare_text(text, data, tie):
    """The text's front rows and picks against the JSON."""
    lines = text.splitlines()
    front = data["pareto_front"]
    header = next((i for i, ln in enumerate(lines) if ln.lstrip().startswith("B ")), None)
    if header is None:
        return {"cls": "WRONG-SILENT", "why": "no table"}
    rows = lines[header + 1 : header + 1 + len(front)]
    for ln, c in zip(rows, front, strict=True):
        cells = ln.split()
        if (int(cells[0]), int(cells[1])) != (c["batch_size"], c["devices"]):
            return {"cls": "WRONG-SILENT", "why": f"text row {ln!r}"}
        checks = [
            (float(cells[3]), c["steps_over_min"]),
            (float(cells[4]), c["examples_over_min"]),
            (float(cells[5]) / 1e3, c["step_time_s"]),
        ]
        if any(abs(a - b) > TEXT_TOL * abs(b) for a, b in checks):
            return {"cls": "WRONG-SILENT", "why": f"text row {ln!r} vs {checks}"}
    for name in ("fastest", "balanced", "cheapest"):
        c = data["recommended"][name]
        ln = next((x for x in lines if x.startswith(name + ":")), "")
        m = re.match(
            rf"{name}:\s+B = (\d+) on (\d+) device\(s\).*; time (.+?), cost (.+?)( \(|$)", ln
        )
        if not m:
            return {"cls": "WRONG-SILENT", "why": f"pick line {ln!r}"}
        if not tie and (int(m[1]), int(m[2])) != (c["batch_size"], c["devices"]):
            return {"cls": "WRONG-SILENT", "why": f"text {name} {ln!r}"}
        value, kind = _parse_amount(m[3])
        want_time = c["time_rel"] if kind == "rel" else c["time_s"]
        if abs(value - want_time) > TEXT_TOL * want_time:
            return {"cls": "WRONG-SILENT", "why": f"text {name} time {m[3]} vs {want_time}"}
        cost = m[4]
        if cost.startswith("×"):
            want_cost = c["cost_rel"]
            got_cost = float(cost[1:])
        elif c["cost"] is not None:
            got_cost = float(cost.split()[0])
            want_cost = c["cost"]
            hours = re.search(r"\(([\d.e+-]+) (\S+)\)", ln)
            if not hours or hours[2] != data["hours_unit"]:
                return {"cls": "WRONG-SILENT", "why": f"text {name} hours {ln!r}"}
        else:
            got_cost, unit = cost.split()[:2]
            got_cost, want_cost = float(got_cost), c["gpu_hours"]
            if unit != data["hours_unit"]:
                return {"cls": "WRONG-SILENT", "why": f"text {name} unit {ln!r}"}
        if abs(got_cost - want_cost) > TEXT_TOL * want_cost:
            return {"cls": "WRONG-SILENT", "why": f"text {name} cost {cost} vs {want_cost}"}
    return {"cls": "ok"}


# --- calc ----------------------------------------------------------------------------------------


def calc_inputs(cfg):
    """(argv, the batch sizes, the noise scale by hand, several)."""
    if cfg["calc_source"] == "kaplan":
        argv = ["calc", "--kaplan-loss", repr(cfg["kaplan_loss"])]
        bn = 2.0e8 * cfg["kaplan_loss"] ** -4.76
    else:
        argv = ["calc", "--noise-scale", repr(cfg["calc_noise"])]
        bn = cfg["calc_noise"]
    start, f, n = cfg["calc_start"], cfg["calc_factor"], cfg["calc_count"]
    kind = cfg["calc_sizes"]
    if kind == "one":
        sizes, text = [cfg["calc_list"][0]], str(cfg["calc_list"][0])
    elif kind == "list":
        sizes, text = cfg["calc_list"], ",".join(map(str, cfg["calc_list"]))
    elif kind == "geom":
        sizes = [start * f**i for i in range(n)]
        stop = sizes[-1] * (1.2 if cfg["calc_over"] else 1)
        text = f"{start}:{stop!r}:x{f}"
    else:
        step = start * (f - 1)
        sizes = [start + step * i for i in range(n)]
        stop = sizes[-1] + (step / 2 if cfg["calc_over"] else 0)
        text = f"{start}:{stop!r}:+{step!r}"
    argv += ["--batch-size", text]
    several = len(sizes) > 1 or kind in ("geom", "arith")
    if cfg["temperature"]:
        t0, t1 = cfg["temperature"]
        argv += ["--temperature-from", repr(t0), "--temperature-to", repr(t1)]
        bn = bn * t0 / t1
    if cfg["lr_rule"]:
        argv += ["--lr", repr(cfg["lr"]), "--lr-rule", cfg["lr_rule"]]
        argv += ["--alpha", repr(cfg["calc_alpha"])]
        if cfg["lr_batch"] is not None or not several:
            argv += ["--lr-batch-size", str(cfg["lr_batch"] or 64)]
    return argv, sizes, bn, several


def calc_row_by_hand(cfg, b, bn, sizes, several):
    row = {
        "batch_size": b,
        "b_over_b_noise": b / bn,
        "regime": "small" if 3 * b < bn else "large" if b > 3 * bn else "balanced",
        "lr_over_max": b / (b + bn),
        "loss_improvement_over_max": b / (b + bn),
        "steps_over_min": 1 + bn / b,
        "examples_over_min": 1 + b / bn,
        "noise_scale": bn,
    }
    if cfg["lr_rule"]:
        b0 = cfg["lr_batch"] or (64 if not several else sizes[0])
        if cfg["lr_batch"] is None and several:
            b0 = sizes[0]
        k = b / b0
        lr = cfg["lr"]
        row["lr"] = {
            "linear": lr * k,
            "sqrt": lr * math.sqrt(k),
            "none": lr,
            "noise": lr * ((1 + bn / b0) / (1 + bn / b)) ** cfg["calc_alpha"],
        }[cfg["lr_rule"]]
    return row


def check_calc(cfg):
    argv, sizes, bn, several = calc_inputs(cfg)
    big = max(sizes) > 1e15 or bn > 1e15 or bn < 1e-300
    rc, stdout, stderr, exc = _cli([*argv, "--json"])
    if exc is not None or "Traceback" in stderr:
        return {"cls": "crash", "exc": f"{exc} {stderr[-300:]}"}, {"cls": "skip"}
    if rc != 0:
        cls = "refused" if big else "FALSE-REFUSAL"
        return {"cls": cls, "exc": stderr[-300:]}, {"cls": "skip"}
    got = json.loads(stdout)
    rows = got if several else [got]
    if not isinstance(rows, list) or len(rows) != len(sizes):
        return {"cls": "WRONG-SILENT", "why": f"{len(rows)} rows for {len(sizes)}"}, {"cls": "skip"}
    for r, b in zip(rows, sizes, strict=True):
        want = calc_row_by_hand(cfg, b, bn, sizes, several)
        for k, v in want.items():
            if k == "regime":
                ok = r[k] == v or abs(r["b_over_b_noise"] * 3 - 1) < 1e-12
                ok = ok or abs(r["b_over_b_noise"] / 3 - 1) < 1e-12
            else:
                ok = _close(float(r[k]), float(v), 1e-9)
            if not ok:
                why = f"B={b} {k}: {r[k]} want {v}"
                return {"cls": "WRONG-SILENT", "why": why}, {"cls": "skip"}
    rc, text, stderr, exc = _cli(argv)
    if rc != 0 or exc is not None:
        return {"cls": "ok"}, {"cls": "crash", "exc": f"{exc} {stderr[-300:]}"}
    return {"cls": "ok"}, compare_calc_text(text, rows, several)


def _num(s):
    return float(s.replace(",", ""))


def compare_calc_text(text, rows, several):
    lines = text.splitlines()
    if not several:
        r = rows[0]
        found = {}
        for ln in lines:
            m = re.search(r"= (\S+)\s+\(eq", ln)
            if m:
                for k, label in (
                    ("lr_over_max", "ε_opt/ε_max"),
                    ("loss_improvement_over_max", "ΔL_opt"),
                    ("steps_over_min", "S/S_min"),
                    ("examples_over_min", "E/E_min"),
                ):
                    if label in ln:
                        found[k] = _num(m[1])
            m = re.search(r"learning rate at B = \S+: (\S+)", ln)
            if m:
                found["lr"] = _num(m[1])
        for k, v in found.items():
            if abs(v - r[k]) > TEXT_TOL * abs(r[k]):
                return {"cls": "WRONG-SILENT", "why": f"text {k} {v} vs {r[k]}"}
        if len(found) < 4:
            return {"cls": "WRONG-SILENT", "why": f"text lacks numbers: {sorted(found)}"}
        return {"cls": "ok"}
    header = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("batch size"))
    for ln, r in zip(lines[header + 1 :], rows, strict=True):
        cells = ln.split()
        got = [_num(cells[i]) for i in (0, 1, 3, 4, 5)]
        want = [r["batch_size"], r["b_over_b_noise"], r["lr_over_max"]]
        want += [r["steps_over_min"], r["examples_over_min"]]
        if "lr" in r:
            got.append(_num(cells[6]))
            want.append(r["lr"])
        if cells[2] != r["regime"]:
            return {"cls": "WRONG-SILENT", "why": f"text regime {ln!r}"}
        for a, b in zip(got, want, strict=True):
            if abs(a - b) > TEXT_TOL * abs(b):
                return {"cls": "WRONG-SILENT", "why": f"text {ln!r} vs {want}"}
    return {"cls": "ok"}


# --- the trajectory functions --------------------------------------------------------------------


def make_trajectory(cfg):
    rng = np.random.default_rng(cfg["traj_seed"])
    n = cfg["traj_records"]
    steps = np.cumsum(
        np.concatenate([[rng.integers(0, 50)], rng.integers(1, cfg["traj_gap"] + 1, n - 1)])
    )
    t = np.linspace(0, 1, n)
    batch = {
        "const": np.full(n, 64.0),
        "ramp": np.round(8 * 2 ** (5 * t)),
        "jumps": rng.choice([16.0, 128.0, 1024.0], n),
    }[cfg["traj_batch"]]
    noise = {
        "const": np.full(n, 300.0),
        "grow": 20 * (1 + 40 * t) ** 2,
        "zigzag": np.where(np.arange(n) % 2, 10.0, 900.0),
        "zero_start": np.concatenate([[0.0], 50 + 500 * t[1:]]),
    }[cfg["traj_noise"]]
    return steps.astype(float), batch, noise


def integrals_by_hand(steps, batch, noise):
    """S_min, E_min, ∫√B_noise ds of eq. D.1, evaluated at every whole step (trapezoid)."""
    grid = np.arange(steps[0], steps[-1] + 1)
    b = np.interp(grid, steps, batch)
    bn = np.interp(grid, steps, noise)
    ds = b / (b + bn)
    out = []
    for f in (ds, bn * ds, np.sqrt(bn) * ds):
        out.append(sum((f[i] + f[i + 1]) / 2 for i in range(len(f) - 1)))
    return out


def check_theory(cfg):
    steps, batch, noise = make_trajectory(cfg)
    try:
        ints = theory.run_integrals(steps, batch, noise)
        s_min, e_min, root = integrals_by_hand(steps, batch, noise)
        for got, want, name in zip(
            ints, (s_min, e_min, root), ("S_min", "E_min", "root"), strict=True
        ):
            if not _close(got, want, 1e-9):
                return {"cls": "WRONG-SILENT", "why": f"run_integrals {name} {got} want {want}"}
        b = float(batch[0])
        if np.all(batch == b):  # a fixed batch predicts the steps the run took
            pred = float(theory.fixed_batch_cost(ints, None, b).steps)
            if not _close(pred, steps[-1] - steps[0], 1e-9):
                return {"cls": "WRONG-SILENT", "why": f"fixed B predicts {pred} steps"}
        if e_min <= 0:
            return {"cls": "ok"}
        gamma = root**2 / (s_min * e_min)
        checks = [("gamma", theory.adaptive_gamma(ints), gamma)]
        checks.append(("r_natural", theory.natural_exchange_rate(ints), e_min / s_min))
        for bb in (1.0, 37.0, 4096.0):
            st, ex = theory.fixed_batch_cost(ints, None, bb)
            checks += [
                ("fixed S", st, s_min + e_min / bb),
                ("fixed E", ex, bb * (s_min + e_min / bb)),
            ]
            # eq. 2.11 along the trajectory with B_crit = E_min/S_min
            checks.append(("2.11", (st / s_min - 1) * (ex / e_min - 1), 1.0))
        for r in (0.5, e_min / s_min, 1e4):
            st, ex = theory.adaptive_batch_cost(ints, None, r)
            checks += [("adaptive S", st, s_min + root / math.sqrt(r))]
            checks += [("adaptive E", ex, e_min + math.sqrt(r) * root)]
            checks.append(("D.4", theory.pareto_steps_over_min(ex / e_min, gamma), st / s_min))
            checks.append(("r for E", theory.exchange_rate_for_examples(ints, None, ex), r))
        checks.append(("B(r)", theory.adaptive_batch_size(400.0, 9.0), 60.0))
        for name, got, want in checks:
            if not _close(float(got), float(want), 1e-8):
                return {"cls": "WRONG-SILENT", "why": f"{name} {got} want {want}"}
        # eq. D.7: B_noise ∝ √s gives γ = 24/25 (a fine trajectory in s)
        s = np.linspace(0, 1, 200001)
        g = theory.adaptive_gamma(s, 5 * np.sqrt(s))
        if abs(g - 24 / 25) > 1e-4:
            return {"cls": "WRONG-SILENT", "why": f"γ(√s) {g}"}
        # the temperature rule and Kaplan's law
        if not _close(float(theory.b_noise_at_temperature(100.0, 0.01, 0.001)), 1000.0):
            return {"cls": "WRONG-SILENT", "why": "eq. C.2"}
        if not _close(float(theory.b_crit_kaplan(2.0)), 2e8 * 2.0**-4.76):
            return {"cls": "WRONG-SILENT", "why": "Kaplan"}
    except NoiseScaleError as err:
        return {"cls": "FALSE-REFUSAL", "exc": str(err)[:300]}
    except Exception as err:
        return {"cls": "crash", "exc": f"{type(err).__name__}: {err}"[:300]}
    return {"cls": "ok"}


def write_history(cfg, path):
    """The trajectory as a tracker history (the records' B_simple, a ±25% interval or one open
    above, the running count of examples); returns (steps, batch, noise, examples, low, high)."""
    steps, batch, noise = make_trajectory(cfg)
    noise = np.maximum(noise, 1.0)  # (a B_simple of 0 is no estimate)
    examples = np.concatenate([[batch[0]], batch[1:] * np.diff(steps)]).cumsum()
    open_above = cfg["traj_seed"] % 4 == 0
    low_zero = cfg["traj_seed"] % 3 == 0  # |G|² not told from zero: the interval reaches 0
    header = {"kind": "noisescale.history", "version": 1, "beta": 0.9, "confidence": 0.95}
    lines = [json.dumps(header)]
    for t, b, bn, ex in zip(steps, batch, noise, examples, strict=True):
        record = {"step": int(t), "b_big": float(b), "examples": float(ex)}
        record |= {"b_simple": float(bn), "b_simple_low": 0.0 if low_zero else 0.8 * float(bn)}
        record["b_simple_high"] = None if open_above else 1.25 * float(bn)
        lines.append(json.dumps(record))
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    high = math.inf if open_above else 1.25 * noise[-1]
    return steps, batch, noise, examples, 0.0 if low_zero else 0.8 * noise[-1], high


def _regime(b, bn):
    return "small" if 3 * b < bn else "large" if b > 3 * bn else "balanced"


def check_history(cfg, tmp, report):
    """``calc --history`` and ``report --json`` on the trajectory's history, by hand."""
    path = os.path.join(tmp, "history.jsonl")
    steps, batch, noise, examples, low, high = write_history(cfg, path)
    sizes = sorted({float(cfg["calc_list"][0]), 1.0, float(batch[-1]), float(3.0 * noise[-1])})
    text = ",".join(repr(b) for b in sizes)
    out = {}
    calc_argv = ["calc", "--history", path, "--batch-size", text, "--json"]
    scale = 1.0
    if cfg["temperature"]:  # eq. C.2 on the history's noise scale and its interval
        t0, t1 = cfg["temperature"]
        calc_argv += ["--temperature-from", repr(t0), "--temperature-to", repr(t1)]
        scale = t0 / t1
    rc, stdout, stderr, exc = _cli(calc_argv)
    extreme = not 1e-300 < noise[-1] * scale < 1e300
    if exc is not None or rc != 0:
        cls = "crash" if exc else "refused" if extreme else "FALSE-REFUSAL"
        out["calc_hist"] = {"cls": cls, "exc": f"{exc} {stderr}"[-300:]}
    else:
        out["calc_hist"] = {"cls": "ok"}
        low_t, high_t = low * scale, high * scale
        for r, b in zip(json.loads(stdout), sizes, strict=True):
            bn, low, high = noise[-1] * scale, low_t, high_t
            order = ["small", "balanced", "large"]
            first = _regime(b, high) if math.isfinite(high) else "small"
            over = order[order.index(first) : order.index(_regime(b, low)) + 1]
            want_high = None if not math.isfinite(high) else high
            bad = (
                not _close(r["noise_scale"], bn)
                or not _close(r["steps_over_min"], 1 + bn / b)
                or not _close(r["examples_over_min"], 1 + b / bn)
                or r["regimes_over_interval"] != over
                or not _close(r["noise_scale_interval"][0], low)
                or not _close(r["noise_scale_interval"][1], want_high)
            )
            if bad:
                out["calc_hist"] = {"cls": "WRONG-SILENT", "why": f"B={b}: {r}"[:400]}
                break
    if not report:
        return out | {"report": {"cls": "skip"}}
    page = os.path.join(tmp, "report.html")
    argv = ["report", path, "-o", page, "--json", "--force"]
    default_grid = cfg["traj_seed"] % 2 == 0
    if not default_grid:
        argv += ["--batch-sizes", text]
    rc, stdout, stderr, exc = _cli(argv)
    if exc is not None or rc != 0:
        cls = "crash" if exc else "FALSE-REFUSAL"
        return out | {"report": {"cls": cls, "exc": f"{exc} {stderr}"[-300:]}}
    got = json.loads(stdout[stdout.index("{") :])
    if default_grid:  # powers of two spanning B_simple and the batch sizes, ×/÷ 2 (≤ 12)
        values = np.concatenate([noise, batch])
        lo = max(0, math.floor(math.log2(values.min())) - 1)
        hi = math.ceil(math.log2(values.max())) + 1
        sizes = [row["batch_size"] for row in got["fixed_batch_costs"]]
        ok = (
            len(sizes) <= 12
            and sizes[0] == 2.0**lo
            and sizes[-1] >= 2.0**hi
            and all(math.log2(b).is_integer() for b in sizes)
            and len({math.log2(b) - math.log2(a) for a, b in itertools.pairwise(sizes)}) <= 1
        )
        if not ok:
            return out | {"report": {"cls": "WRONG-SILENT", "why": f"default sizes {sizes}"}}
    s_min, e_min, root = integrals_by_hand(steps, batch, noise)
    gamma = root**2 / (s_min * e_min)
    ran = examples[-1] - examples[0]
    # the examples in the integrals' rule: the count sums steps t0+1…tN, the trapezoid over the
    # steps t0…tN halves both ends, (B_last − B_first)/2 fewer (until 2026-12-07 this oracle
    # took the count, as the report did: 1.4e-8 steps for 45.8, a review of fuzz_pages)
    used = ran - (batch[-1] - batch[0]) / 2
    # beyond 1e-3 of E − E_min (∫B ds, interpolated) the count's unrecorded examples are refused
    grid = np.arange(steps[0], steps[-1] + 1)
    b_int = np.interp(grid, steps, batch)
    f = b_int * b_int / (b_int + np.interp(grid, steps, noise))
    above = float(np.sum((f[1:] + f[:-1]) / 2))
    unrecorded = used - e_min - above
    if abs(unrecorded) > 2e-3 * above:
        used = None
    elif abs(unrecorded) > 0.5e-3 * above:
        used = "either"
    const = bool(np.all(batch == batch[0]))
    priced = isinstance(used, float) and used > e_min
    want = {
        "run.s_min": s_min,
        "run.e_min": e_min,
        "run.b_crit": e_min / s_min,
        "run.steps": steps[-1] - steps[0],
        "run.examples": ran,
        "run.predicted_steps": s_min + e_min / batch[0] if const else None,
        "gamma": gamma,
        "adaptive.r_natural": e_min / s_min,
        "adaptive.natural_steps": s_min + root / math.sqrt(e_min / s_min),
        "adaptive.natural_examples": e_min + math.sqrt(e_min / s_min) * root,
        "adaptive.r_same_examples": ((used - e_min) / root) ** 2 if priced else None,
        "adaptive.same_examples_steps": s_min + root**2 / (used - e_min) if priced else None,
        "b_simple_last": noise[-1],
    }
    for b, row in zip(sizes, got["fixed_batch_costs"], strict=True):
        fixed = s_min + e_min / b
        e = b * fixed
        want |= {
            f"B={b:g}.steps": (row["steps"], fixed),
            f"B={b:g}.examples": (row["examples"], e),
            f"B={b:g}.steps_over_min": (row["steps_over_min"], fixed / s_min),
            f"B={b:g}.examples_over_min": (row["examples_over_min"], e / e_min),
            f"B={b:g}.adaptive_steps": (
                row["adaptive_steps_same_examples"],
                s_min + root**2 / (e - e_min) if e > e_min else None,
            ),
            f"B={b:g}.adaptive_examples": (
                row["adaptive_examples_same_steps"],
                e_min + gamma * b * s_min,
            ),
        }
    if used == "either":  # at the report's threshold: priced or refused
        want = {k: v for k, v in want.items() if not k.startswith("adaptive.r_same")}
        want = {k: v for k, v in want.items() if k != "adaptive.same_examples_steps"}
    for key, w in want.items():
        if isinstance(w, tuple):
            g, w = w
        else:
            g = got
            for part in key.split("."):
                g = g[part]
        if not _close(g, w, 1e-7):
            return out | {"report": {"cls": "WRONG-SILENT", "why": f"{key}: {g} want {w}"}}
    return out | {"report": {"cls": "ok"}}


def check_profile_cli(cfg, tmp):
    """``noisescale profile`` on examples/profile_model.py (an MLP 784 → w → 10): the file it
    writes holds each point's median and throughput, a fit that is linregress's on them, the
    model's parameter bytes by hand, the update's median; then ``recommend`` on it by hand."""
    from noisescale.hardware import ThroughputProfile

    here = os.path.dirname(os.path.abspath(__file__))
    spec = os.path.join(here, "..", "examples", "profile_model.py") + ":build"
    width = 8 + cfg["traj_seed"] % 40
    sizes = cfg["timed"][:4]
    path = os.path.join(tmp, "measured.json")
    argv = ["profile", spec, "--model-option", f"width={width}", "--device", "cpu"]
    argv += ["--batch-sizes", ",".join(map(str, sizes)), "--repeats", "3", "--warmup", "1"]
    argv += ["--no-memory-search", "--threads", "1", "-o", path]
    rc, _, stderr, exc = _cli(argv)
    if exc is not None or rc != 0:
        cls = "crash" if exc is not None or "Traceback" in stderr else "FALSE-REFUSAL"
        return {"cls": cls, "exc": f"{exc} {stderr}"[-300:]}
    try:
        prof = ThroughputProfile.load(path)
    except NoiseScaleError as err:
        if "falls with the batch size" in str(err):
            return {"cls": "refused", "exc": str(err)[:300]}  # timings noisier than β
        return {"cls": "FALSE-REFUSAL", "exc": str(err)[:300]}
    params = 784 * width + width + width * 10 + 10
    if prof.model.get("parameters") != params or prof.model.get("param_bytes") != 4 * params:
        return {"cls": "WRONG-SILENT", "why": f"model {prof.model} want {params} parameters"}
    for p in prof.points:
        med = float(np.median(p.times_s))
        if not (_close(p.step_time_s, med) and _close(p.samples_per_s, p.batch_size / med)):
            return {"cls": "WRONG-SILENT", "why": f"point {p}"}
    if [p.batch_size for p in prof.points] != sorted(set(sizes)):
        return {"cls": "WRONG-SILENT", "why": f"timed {[p.batch_size for p in prof.points]}"}
    u, times = prof.optimizer_update_s, prof.optimizer_update_times_s
    if u is None or not times or not _close(u, float(np.median(times))):
        return {"cls": "WRONG-SILENT", "why": f"update {u} of {times}"}
    fit = check_fit(prof)
    if fit["cls"] != "ok":
        return fit
    mine = dict(cfg, timed=sorted(set(sizes)), beta=prof.fit.beta_s, time_noise=1.0)
    mine |= {"max_batch": None, "oom": None, "param_bytes": 4 * params, "device_type": "cpu"}
    res = check_recommend(mine, prof, path)
    return res["rec_cli"] if res["recommend"]["cls"] == "ok" else res["recommend"]


def check_refuse(cfg, profile, path):
    """inf/NaN inputs refused by the library and the CLI."""
    from noisescale.hardware.recommend import recommend_batch_size

    bad = {"b_noise": [math.nan, math.inf, -1.0, 0.0]}
    for v in bad["b_noise"]:
        try:
            recommend_batch_size(v, profile)
        except NoiseScaleError:
            pass
        except Exception as err:
            return {"cls": "crash", "exc": f"{type(err).__name__}: {err}"[:300]}
        else:
            return {"cls": "WRONG-SILENT", "why": f"recommend priced B_noise {v}"}
        for kw in ("s_min", "e_min", "price_per_gpu_hour"):
            try:
                recommend_batch_size(100.0, profile, **{kw: v})
            except NoiseScaleError:
                pass
            except Exception as err:
                return {"cls": "crash", "exc": f"{type(err).__name__}: {err}"[:300]}
            else:
                return {"cls": "WRONG-SILENT", "why": f"recommend priced {kw}={v}"}
    for text in ("nan", "inf", "-inf", "1e400", "-5"):
        for argv in (
            ["recommend", "--noise-scale", text, "--profile", path],
            ["recommend", "--noise-scale", "10", "--profile", path, "--target-steps", text],
            ["recommend", "--noise-scale", "10", "--profile", path, "--price", text],
            ["calc", "--noise-scale", text, "--batch-size", "64"],
            ["calc", "--noise-scale", "10", "--batch-size", text],
            ["calc", "--kaplan-loss", text, "--batch-size", "64"],
            [
                "calc",
                "--noise-scale",
                "10",
                "--batch-size",
                "64",
                "--lr",
                text,
                "--lr-batch-size",
                "8",
            ],
        ):
            rc, _, stderr, exc = _cli(argv)
            if exc is not None or "Traceback" in stderr:
                return {"cls": "crash", "exc": f"{argv}: {exc} {stderr[-200:]}"}
            if rc == 0:
                return {"cls": "WRONG-SILENT", "why": f"{argv} exit 0"}
    return {"cls": "ok"}


def check_refuse_theory(cfg):
    """theory's trajectory functions on an invalid batch size, exchange rate or example count
    (≤ 0 or NaN): refused, as the single-point functions refuse them, not priced."""
    steps, batch, noise = make_trajectory(cfg)
    ints = theory.run_integrals(steps, batch, np.maximum(noise, 1.0))
    rng = random.Random(cfg["traj_seed"])
    bad = rng.choice([-float(batch[0]), 0.0, math.nan, -1e-3])
    calls = {
        "fixed_batch_cost": lambda: theory.fixed_batch_cost(ints, None, bad),
        "adaptive_batch_cost": lambda: theory.adaptive_batch_cost(ints, None, bad),
        "exchange_rate_for_examples": lambda: theory.exchange_rate_for_examples(ints, None, bad),
        "steps_over_min": lambda: theory.steps_over_min(bad, 100.0),
        "b_crit_kaplan": lambda: theory.b_crit_kaplan(bad),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, call in calls.items():
            try:
                got = call()
            except NoiseScaleError:
                continue
            except Exception as err:
                return {"cls": "crash", "exc": f"{name}({bad}): {type(err).__name__}: {err}"}
            return {"cls": "WRONG-SILENT", "why": f"{name}({bad}) = {got}"}
    return {"cls": "ok"}


def check_seed(seed, override=None):
    cfg = draw_config(seed)
    if override:
        cfg.update(override)
    t0 = time.time()
    rng = random.Random(seed + 1)
    checks = {}
    checks["split"] = check_split(cfg, rng)
    try:
        profile = make_profile(cfg, rng)
    except NoiseScaleError as err:
        return {"seed": seed, "cfg": cfg, "gen_error": str(err)[:200]}
    checks["fit"] = check_fit(profile)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "profile.json")
        try:
            profile.save(path)
        except Exception as err:
            return {"seed": seed, "cfg": cfg, "gen_error": str(err)[:200]}
        checks |= check_recommend(cfg, profile, path)
        checks["calc"], checks["calc_text"] = check_calc(cfg)
        checks["theory"] = check_theory(cfg)
        checks |= check_history(cfg, tmp, report=seed % 4 == 0)
        checks["profile"] = check_profile_cli(cfg, tmp) if seed % 10 == 3 else {"cls": "skip"}
        checks["refuse_theory"] = check_refuse_theory(cfg) if seed % 5 == 1 else {"cls": "skip"}
        checks["refuse"] = check_refuse(cfg, profile, path) if seed % 5 == 0 else {"cls": "skip"}
    return {"seed": seed, "cfg": cfg, "checks": checks, "time": round(time.time() - t0, 2)}


def findings(record):
    return [(name, res) for name, res in record["checks"].items() if res["cls"] in FINDINGS]


def describe(record):
    cfg = record["cfg"]
    keys = ("b_noise", "devices", "batch_sizes", "timed", "alpha", "beta", "update", "max_batch")
    keys += ("oom", "max_micro", "target", "calc_source", "calc_sizes", "lr_rule", "traj_noise")
    return f"seed {record['seed']}: " + " ".join(
        f"{k}={cfg[k]:.4g}" if isinstance(cfg[k], float) else f"{k}={cfg[k]}" for k in keys
    )


def main(argv=None):
    from fuzz_runner import check_parser, run_checks

    args = check_parser(__doc__, "0:200").parse_args(argv)
    return run_checks(args, check_seed, findings, describe, CHECKS, column_width=14)


if __name__ == "__main__":
    raise SystemExit(main())
