"""``noisescale branch``'s analysis options against curves whose efficiencies are known exactly.

tests/fuzz_branch.py checks the branch runner and the analysis at its default options on real
(tiny) training; this fuzzer checks the options it leaves at their defaults. Each seed draws
(:func:`draw_config`) a plan — 1–3 checkpoints, 2–5 batch sizes, 1–4 data orders, a budget Δ
that need not be a multiple of them — and for every branch a loss curve **linear in the
examples**, L = L₀ − k·e, the slope k of batch B with seed r following eq. 2.11 with a B_crit
drawn per seed, k ∝ 1/(B + B_crit,r), times a crossing factor for some larger batch sizes at
times (curves that cross: ``--reference best`` then matters). The branch records its loss
(``reporter.report(step, L, examples=step·B)``) at steps spaced ``even`` (n points, the same n
for every branch or drawn per branch), ``every`` k steps (the same k: spacing k·B in examples)
or ``geometric``, from step 0 to the first step at or past the budget. The analysis options are
drawn: ``--ema`` (0, or 0.3–0.95), ``--reference``, ``--tolerance``, ``--confidence``,
``--stable START:END`` (edges at times exactly on a window's ends) and ``--warmup-total``.

The oracle is closed form, from docs/branch.md and the paper, never from the functions checked:

* on a curve linear in the examples the bias-corrected EMA over records (paper App. A.3) is
  the curve at the weighted mean position of its records, so the docs' lag correction
  ("exact for curves linear over its span") makes η_B = E_ref(L_B(Δ))/Δ the ratio of slopes,
  k_B/k_ref, capped at 1 — at any decay and any spacing of the records;
* the reference: the smallest batch size, or (``best``) the one whose curve ended lowest —
  L₀ − k·Δ, the largest mean slope over the seeds;
* the loss at the budget: the EMA over records computed here (m_t = d·m_{t−1} + (1 − d)·x_t,
  divided by 1 − d^t), interpolated at Δ;
* from η: the threshold at τ interpolated in 1/η, eq. 2.11's B_crit by least squares in
  log 1/η, their log-t intervals at ``--confidence`` (scipy's t quantile), the bounds and
  open ends (tests/fuzz_branch.py's ``want_from_eta``, itself written from the docs);
* the warm-up over the branch points whose window [checkpoint, checkpoint + Δ] lies within
  ``--stable`` (edges included), counted over ``--warmup-total`` (else the last window's end)
  against the plan's B₀ (tests/fuzz_branch.py's ``warmup_by_hand``).

* ``--b-noise``: a window's points are those at positions in [checkpoint, checkpoint + Δ)
  (points drawn exactly on both ends at times); a BNoiseTracker's records (``ghg``,
  ``trace_h_sigma``; a GᵀHG ≤ 0 at times, and a running ``b_noise`` of 99 that must not be
  read) give the ratio of the means of tr(HΣ) and GᵀHG, inside its interval, "—" with a
  reason where a mean is ≤ 0; summary points (``b_noise`` with ``b_noise_low``/``high`` or
  without) their mean and the means of their ends.

Checks: ``lib`` (``local_critical_batch_sizes`` with the drawn options on the curves as
``BranchRun`` objects, ≈ 0.1-1 s); ``grid`` (the same with a learning-rate grid,
:func:`draw_grid`: 1–3 rates per batch size, each rate's slope eq. 2.11's times a factor, each
recorded at its own number of points; the rate chosen is the one whose curve ended lowest, the
largest mean slope, and η is read off the chosen rates' slopes); ``cli`` (the branches run by
``run_branches`` into a temporary SQLite storage, then ``noisescale branch --json`` with the
options and ``--b-noise``: every point's numbers, the points left out of the warm-up named in a
note, the warm-up's knots and steps); ``bad`` (three drawn bad values of ``--ema``,
``--tolerance``, ``--confidence``, ``--stable``, ``--warmup-total``, ``--tokens-per-example``,
``--reference``, ``--unit`` or ``--b-noise``: exit code 2, the option named, the study's trials
unchanged); ``keep`` (``noisescale branch fuzz_branch_options:train … --keep-going`` into
another study with one branch raising mid-way: exit code 1 naming the failed branch, then the
analysis of the partial study against the truth without that branch — a checkpoint without its
reference batch size left out, the seeds those at every batch size — and the branch listed as
failed); ``pg`` (with ``--postgres``: the same plan on a throw-away PostgreSQL server,
tests/postgres_server.py, by two worker processes at once, one killed mid-branch and its branch
rerun after the 2 s grace period: the same branches read as from SQLite, curve for curve, and
the same JSON analysis). A seed with ``cli``, ``bad`` and ``keep`` takes ≈ 2-10 s on an idle
machine (SQLite trials), ≈ 10-60 s at a load of 10 on 2 cores; ``pg`` adds ≈ 10-30 s.

Classes per check: ``ok``; ``refused-ok``; ``WRONG`` (a number off by more than float64
round-off, no warning); ``wrong-warned`` (off, with an ``--ema`` warning); ``CRASH``;
``FALSE-REFUSAL``; ``skip``.
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
import warnings

import numpy as np

from noisescale.errors import NoiseScaleInputError

# Float64 round-off: η is a few interpolations and divisions of the stored floats; the EMA of
# a linear curve is its value at a weighted mean position up to ~1e-15 relative.
RTOL = 1e-9
CHECKS = ("lib", "grid", "cli", "bad", "keep", "pg")
FINDINGS = ("WRONG", "CRASH", "FALSE-REFUSAL", "wrong-warned")
L0 = 3.0
LR = 0.1
# The configuration the module-level training function reads (run_branches calls it).
CURRENT: dict = {}
ENV = "NOISESCALE_FUZZ_BRANCH_OPTIONS"


def _logu(rng, lo, hi):
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def draw_config(seed):
    rng = random.Random(seed)
    sizes = sorted(rng.sample([1, 2, 3, 4, 6, 8, 12, 16, 24, 32], rng.choice([2, 3, 3, 4, 5])))
    budget = max(sizes) * rng.randint(3, 12)
    if rng.random() < 0.5:
        budget += rng.randint(1, max(sizes) - 1) if max(sizes) > 1 else 0
    n_ck = rng.choice([1, 1, 2, 3])
    checkpoints = sorted(rng.sample(range(0, 6), n_ck))
    checkpoints = [c * budget // 2 for c in checkpoints]  # windows overlap at times
    repeats = rng.choice([1, 2, 3, 3, 4])
    crit = {c: _logu(rng, min(sizes) / 4, max(sizes) * 4) for c in checkpoints}
    sigma = rng.choice([0.0, 0.1, 0.3])
    spacing = rng.choice(["even", "even", "every", "geometric"])
    same_n = rng.random() < 0.5
    n = rng.choice([4, 8, 16, 32])
    every = rng.choice([1, 2, 3])
    crossing = rng.random() < 0.3
    decay = rng.choice([0.0, 0.0, round(rng.uniform(0.3, 0.95), 3), 0.5, 0.9])
    stable = None
    if rng.random() < 0.5:
        ends = sorted({c for c in checkpoints} | {c + budget for c in checkpoints})
        lo = rng.choice(ends) if rng.random() < 0.6 else rng.uniform(0, max(ends))
        hi = rng.choice([e for e in ends if e > lo] or [lo + budget])
        if rng.random() < 0.3:
            hi += rng.uniform(0, budget / 3)
        stable = (float(lo), float(hi))
    return {
        "sizes": sizes,
        "budget": budget,
        "checkpoints": checkpoints,
        "repeats": repeats,
        "crit": {str(c): v for c, v in crit.items()},
        "sigma": sigma,
        "spacing": spacing,
        "same_n": same_n,
        "n": n,
        "every": every,
        "crossing": crossing,
        "cross_seed": rng.randrange(1 << 30),
        "curve_seed": rng.randrange(1 << 30),
        "b0": rng.choice(sizes),
        "decay": decay,
        "reference": rng.choice(["smallest", "smallest", "best"]),
        "tolerance": round(_logu(rng, 0.05, 2.0), 4),
        "confidence": rng.choice([0.95, 0.95, 0.9, 0.8, 0.99, 0.5]),
        "stable": stable,
        "warmup_total": None if rng.random() < 0.5 else float(rng.randint(1, 4) * budget),
        "bad": rng.randrange(1 << 30),
        "b_noise": rng.choice([None, "tracker", "summary"]),
        "b_noise_seed": rng.randrange(1 << 30),
        "raise_at": rng.randrange(1 << 30),
    }


# --- the curves ------------------------------------------------------------------------------


def slopes(cfg, checkpoint):
    """k[B][seed] at one checkpoint: eq. 2.11 with B_crit,r = B_crit·exp(σ z_r), so that
    η_B = k_B/k_ref = (B_ref + B_crit)/(B + B_crit); times a factor 0.9–1.4 for some B above
    the smallest when the curves cross."""
    rng = random.Random(cfg["curve_seed"] + int(checkpoint))
    c0 = cfg["crit"][str(checkpoint)]
    crits = [c0 * math.exp(cfg["sigma"] * rng.gauss(0, 1)) for _ in range(cfg["repeats"])]
    cross = random.Random(cfg["cross_seed"] + int(checkpoint))
    factor = {b: 1.0 for b in cfg["sizes"]}
    if cfg["crossing"]:
        for b in cfg["sizes"][1:]:
            if cross.random() < 0.5:
                factor[b] = cross.uniform(0.9, 1.4)
    scale = 2.0 / cfg["budget"]  # the loss falls by about 2 over the budget
    return {
        b: [scale * factor[b] * (1 + c) / (b + c) for c in crits] for b in cfg["sizes"]
    }  # fmt: skip


def record_steps(cfg, b, seed, checkpoint, lr=LR):
    """The steps a branch at batch b records: from 0 to the first step at or past the budget
    (on a learning-rate grid drawn per rate too)."""
    last = math.ceil(cfg["budget"] / b)
    rng = random.Random(cfg["curve_seed"] * 7 + b * 1000 + seed * 31 + int(checkpoint))
    if lr != LR:
        rng = random.Random(f"{cfg['curve_seed']}-{b}-{seed}-{checkpoint}-{lr}")
    n = cfg["n"] if cfg["same_n"] and lr == LR else rng.choice([4, 8, 16, 32, 64])
    if cfg["spacing"] == "even":
        steps = np.round(np.linspace(0, last, n + 1))
    elif cfg["spacing"] == "every":
        steps = np.arange(0, last + 1, cfg["every"], dtype=float)
    else:
        steps = np.concatenate([[0.0], np.round(np.geomspace(1, last, n))])
    steps = np.unique(np.append(steps, last))
    return steps


def curve(cfg, checkpoint, b, seed, lr=LR):
    steps = record_steps(cfg, b, seed, checkpoint, lr)
    examples = steps * b
    k = slopes(cfg, checkpoint)[b][seed] * rate_factor(cfg, checkpoint, b, lr)
    return steps, examples, L0 - k * examples


def draw_grid(cfg, seed):
    """The ``grid`` check's learning rates: per batch size 1–3 rates, the rate 0.1 with eq.
    2.11's slope and the others that slope times a factor 0.85–1.15 per (checkpoint, B, rate),
    each (B, rate, seed) recorded at its own number of points (``same_n`` off) — a rate
    recorded more sparsely trails the budget by a larger EMA lag."""
    rng = random.Random(f"grid-{seed}")
    lrs = {str(b): sorted({LR, *rng.sample([0.025, 0.05, 0.2, 0.4], rng.choice([0, 1, 2]))})
           for b in cfg["sizes"]}  # fmt: skip
    factor = {f"{c}:{b}:{lr}": rng.uniform(0.85, 1.15) for c in cfg["checkpoints"]
              for b in cfg["sizes"] for lr in lrs[str(b)] if lr != LR}  # fmt: skip
    return {"lrs": lrs, "factor": factor}


def rate_factor(cfg, checkpoint, b, lr):
    if lr == LR:
        return 1.0
    return cfg["grid"]["factor"][f"{int(checkpoint)}:{b}:{lr}"]


def rates(cfg, b):
    return cfg["grid"]["lrs"][str(b)] if cfg.get("grid") else [LR]


def train(batch_size, learning_rate, reporter, *, checkpoint, budget, seed):
    """The training function (module-level: forked workers and ``noisescale branch
    fuzz_branch_options:train`` reach it; the command's import reads the configuration from
    the environment)."""
    if os.environ.get(ENV):
        CURRENT.update(json.loads(os.environ[ENV]))
    cfg = CURRENT["cfg"]
    b = round(batch_size)
    at = [int(checkpoint), b, int(seed)]
    steps, examples, losses = curve(cfg, int(checkpoint), b, seed)
    for i, (s, e, v) in enumerate(zip(steps, examples, losses, strict=True)):
        if 2 * i >= len(steps) and at == CURRENT.get("raise"):
            raise RuntimeError("a branch that raises mid-way (the --keep-going case)")
        if 2 * i >= len(steps) and at == CURRENT.get("kill"):
            os._exit(3)  # a worker killed mid-branch
        reporter.report(int(s), float(v), examples=float(e))


def branch_runs(cfg):
    from noisescale.branch.compare import BranchRun
    from noisescale.sweep.runs import Run

    out = []
    for c in cfg["checkpoints"]:
        for b in cfg["sizes"]:
            for r in range(cfg["repeats"]):
                for lr in rates(cfg, b):
                    steps, examples, losses = curve(cfg, c, b, r, lr)
                    name = f"{c}-{b}-{r}-{lr}"
                    run = Run(name=name, batch_size=float(b), learning_rate=lr, step=steps,
                              metric=losses, examples=examples, b_simple=None)  # fmt: skip
                    out.append(BranchRun(checkpoint=float(c), seed=r,
                                         budget=float(cfg["budget"]), run=run))  # fmt: skip
    return out


# --- the oracle ------------------------------------------------------------------------------


def ema_by_hand(values, decay):
    """Paper App. A.3's bias-corrected EMA, written out: the weighted mean of the records so
    far with weights decay^(t−k)."""
    x = np.asarray(values, dtype=float)
    out = np.empty_like(x)
    for t in range(x.size):
        w = decay ** np.arange(t, -1, -1, dtype=float)
        out[t] = float(w @ x[: t + 1] / w.sum())
    return out


def truth(cfg, missing=()):
    """Per checkpoint the docs' numbers (``want_from_eta``'s dict) from the slopes; without the
    ``missing`` branches (checkpoint, B, seed): a batch size with none left is not compared,
    the seeds are those left at every batch size, and under ``smallest`` a checkpoint whose
    plan's smallest batch size has none left is left out (docs/branch.md, *A partial study*)."""
    from fuzz_branch import want_from_eta

    out = {}
    budget = float(cfg["budget"])
    for c in cfg["checkpoints"]:
        have = {
            b: [r for r in range(cfg["repeats"]) if (c, b, r) not in missing] for b in cfg["sizes"]
        }
        if cfg["reference"] == "smallest" and not have[cfg["sizes"][0]]:
            continue
        ints = [b for b in cfg["sizes"] if have[b]]
        sizes = [float(b) for b in ints]
        seeds = sorted(set.intersection(*[set(have[b]) for b in ints]))
        if len(ints) < 2 or not seeds:
            out[float(c)] = ("refuse", "too few")
            continue
        k0 = slopes(cfg, c)
        # the rate: the one whose curve ended lowest, the largest mean slope over its seeds
        # (docs/branch.md: chosen once, on all seeds)
        chosen = {}
        for b in ints:
            mean_rate = {
                lr: float(np.mean([k0[b][s] * rate_factor(cfg, c, b, lr) for s in have[b]]))
                for lr in rates(cfg, b)
            }
            chosen[float(b)] = max(mean_rate, key=mean_rate.get)
        k = {b: [v * rate_factor(cfg, c, b, chosen[float(b)]) for v in k0[b]] for b in ints}
        mean_k = {b: float(np.mean([k[b][s] for s in seeds])) for b in ints}
        ref = ints[0] if cfg["reference"] == "smallest" else max(ints, key=lambda b: mean_k[b])
        eta = np.ones((len(sizes), len(seeds)))
        for i, b in enumerate(ints):
            if b != ref:
                for j, s in enumerate(seeds):
                    eta[i, j] = min(1.0, k[b][s] / k[ref][s])
        mloss = {}
        for b in ints:
            vals = []
            for s in seeds:
                _, e, v = curve(cfg, c, b, s, chosen[float(b)])
                vals.append(float(np.interp(budget, e, ema_by_hand(v, cfg["decay"]))))
            mloss[float(b)] = float(np.mean(vals))
        # docs: a batch size above the reference that ended at least as low (its curve's end)
        crossing = any(b > ref and mean_k[b] >= mean_k[ref] for b in ints)
        out[float(c)] = want_from_eta(
            sizes, seeds, float(ref), chosen, mloss, eta, cfg["tolerance"], cfg["confidence"],
            crossing,
        )  # fmt: skip
    return out


def _crash(err):
    return {"cls": "CRASH", "exc": f"{type(err).__name__}: {str(err)[:300]}"}


def _class(bad, results):
    if not bad:
        return {"cls": "ok"}
    warned = any("--ema" in w for r in results for w in r.warnings)
    return {"cls": "wrong-warned" if warned else "WRONG", "bad": bad[:6]}


def check_lib(cfg):
    from fuzz_branch import compare_cbs
    from noisescale.branch import local_critical_batch_sizes

    want = truth(cfg)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results = local_critical_batch_sizes(
                branch_runs(cfg), tolerance=cfg["tolerance"], reference=cfg["reference"],
                decay=cfg["decay"], confidence=cfg["confidence"],
                reference_batch_size=float(cfg["sizes"][0])
                if cfg["reference"] == "smallest" else None,
            )  # fmt: skip
    except NoiseScaleInputError as err:
        return {"cls": "FALSE-REFUSAL", "exc": str(err)[:300]}, None, want
    except Exception as err:
        return _crash(err), None, want
    bad = compare_cbs(want, results)
    for r in results:
        if r.confidence != cfg["confidence"]:
            bad.append(f"ck {r.checkpoint:g}: confidence {r.confidence}")
    return _class(bad, results), results, want


def usable_by_hand(cfg, results):
    """docs: branch points whose window [checkpoint, checkpoint + Δ] leaves the stable phase
    are left out of the warm-up (a window exactly on its edges stays in)."""
    if cfg["stable"] is None:
        return list(results)
    lo, hi = cfg["stable"]
    return [r for r in results if lo <= r.checkpoint and r.checkpoint + r.budget <= hi]


def _cli(argv):
    from noisescale.cli import main as cli_main

    out, err = io.StringIO(), io.StringIO()
    with (
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        try:
            rc = cli_main(argv)
        except SystemExit as exc:
            rc = exc.code
    return rc, out.getvalue(), err.getvalue()


def options_argv(cfg):
    argv = ["--tolerance", repr(cfg["tolerance"]), "--reference", cfg["reference"],
            "--ema", repr(cfg["decay"]), "--confidence", repr(cfg["confidence"])]  # fmt: skip
    if cfg["stable"] is not None:
        argv += ["--stable", f"{cfg['stable'][0]!r}:{cfg['stable'][1]!r}"]
    if cfg["warmup_total"] is not None:
        argv += ["--warmup-total", repr(cfg["warmup_total"])]
    return argv


def plan_of(cfg):
    from noisescale.branch import BranchPlan

    return BranchPlan(
        checkpoints=tuple(float(c) for c in cfg["checkpoints"]),
        batch_sizes=tuple(cfg["sizes"]),
        base_batch_size=cfg["b0"],
        base_learning_rate=0.1,
        budget=float(cfg["budget"]),
        lr_rule="none",
        repeats=cfg["repeats"],
    )


def check_cli(cfg, url, want, lib_results, tmp):
    from fuzz_branch import _close, warmup_by_hand

    extra, records = [], None
    if cfg["b_noise"] is not None:
        records = b_noise_records(cfg)
        path = os.path.join(tmp, "b_noise.jsonl")
        with open(path, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in records)
        extra = ["--b-noise", path]
    try:
        rc, out, err = _cli(["branch", "--storage", url, "--study", "fz", "--json",
                             "--no-progress", *options_argv(cfg), *extra])  # fmt: skip
    except Exception as exc:
        return _crash(exc), None
    if rc != 0:
        return {"cls": "FALSE-REFUSAL", "rc": rc, "err": err[-300:]}, None
    data = json.loads(out)
    CURRENT["cli_extra"] = extra  # (the pg check analyses with the same B_noise file)
    bad = [] if records is None else check_b_noise(cfg, data, records)
    got = {p["branch"]["checkpoint"]: p["branch"] for p in data["points"]}
    for c, w in want.items():
        p = got.get(c)
        if p is None:
            bad.append(f"ck {c:g} missing")
            continue
        for key, val in (("cbs", w["cbs"][0]), ("cbs_low", w["cbs"][1]),
                         ("cbs_high", w["cbs"][2])):  # fmt: skip
            if not _close(p[key], val if math.isfinite(val) else None):
                bad.append(f"ck {c:g}: {key} {p[key]} for {val}")
        if p["reference_batch_size"] != w["ref"]:
            bad.append(f"ck {c:g}: reference {p['reference_batch_size']} for {w['ref']}")
        for i, be in enumerate(p["batches"]):
            for k, e in enumerate(be["efficiencies"]):
                if not _close(e, w["eta"][i, k]):
                    bad.append(
                        f"ck {c:g} B={be['batch_size']} seed {k}: η {e} for {w['eta'][i, k]}"
                    )
        if p["confidence"] != cfg["confidence"]:
            bad.append(f"ck {c:g}: confidence {p['confidence']} for {cfg['confidence']}")
    # the warm-up: the library's (checked against the truth by ``lib``) at the stable points
    if lib_results is not None:
        usable = usable_by_hand(cfg, lib_results)
        left = [r.checkpoint for r in lib_results if r not in usable]
        if left and not any("leave the stable phase" in n for n in data["notes"]):
            bad.append(f"points {left} left out of the warm-up without a note")
        total = cfg["warmup_total"] or max(c + cfg["budget"] for c in cfg["checkpoints"])
        w = data["warmup"]
        if not usable:
            if w is not None:
                bad.append(f"a warm-up from no stable point: {w['knots']}")
        elif w is None:
            bad.append("no warm-up")
        else:
            knots, _, steps, _, s_same = warmup_by_hand(usable, cfg["b0"], total)
            if [tuple(k) for k in w["knots"]] != [(float(a), int(b)) for a, b in knots]:
                bad.append(f"warm-up knots {w['knots']} for {knots}")
            if not _close(w["total"], total):
                bad.append(f"warm-up total {w['total']} for {total}")
            if not _close(w["steps_warmup"], steps):
                bad.append(f"warm-up steps {w['steps_warmup']} for {steps}")
            if not _close(w["steps_fixed"], total / cfg["b0"]):
                bad.append(f"steps_fixed {w['steps_fixed']} for {total / cfg['b0']}")
            if (w["steps_same_progress"] is None) != (not math.isfinite(s_same)):
                bad.append(f"steps at equal progress {w['steps_same_progress']} for {s_same}")
            elif math.isfinite(s_same) and not _close(w["steps_same_progress"], s_same, 2e-3):
                # (the library's 4,000 midpoint steps against 100,000 here: see fuzz_branch)
                bad.append(f"steps at equal progress {w['steps_same_progress']} for {s_same}")
    # docs: the text's last line, "re-analyse: …", gives the same analysis again as printed
    if random.Random(cfg["bad"] + 1).random() < 0.5:
        import shlex

        rc, text, err = _cli(["branch", "--storage", url, "--study", "fz", "--no-progress",
                              *options_argv(cfg), *extra])  # fmt: skip
        line = [x for x in text.splitlines() if x.startswith("re-analyse: ")]
        if rc != 0 or not line:
            bad.append(f"the text: exit {rc}, re-analyse line {line}")
        else:
            words = shlex.split(line[-1][len("re-analyse: ") :])
            rc, again, err = _cli([*words[1:], "--json", "--no-progress"])
            if rc != 0:
                bad.append(f"the re-analyse line refused: {err[-200:]!r}")
            else:
                again = json.loads(again)
                for key in ("points", "warmup", "notes"):
                    if again[key] != data[key]:
                        diff = _first_difference(again[key], data[key])
                        bad.append(f"the re-analyse line's {key} differ: {diff}")
    return _class(bad, lib_results or []), data


# Bad values of the options checked: (argv, the option the message must name).
BAD = (
    (["--ema", "1"], "--ema"), (["--ema", "-0.1"], "--ema"), (["--ema", "nan"], "--ema"),
    (["--ema", "x"], "--ema"), (["--tolerance", "0"], "--tolerance"),
    (["--tolerance", "-1"], "--tolerance"), (["--tolerance", "inf"], "--tolerance"),
    (["--tolerance", "nan"], "--tolerance"), (["--confidence", "0"], "--confidence"),
    (["--confidence", "1"], "--confidence"), (["--confidence", "1.5"], "--confidence"),
    (["--confidence", "nan"], "--confidence"), (["--stable", "5:3"], "--stable"),
    (["--stable", "a:b"], "--stable"), (["--stable", "3"], "--stable"),
    (["--stable", "-1:5"], "--stable"), (["--stable", "nan:5"], "--stable"),
    (["--stable", "0:inf"], "--stable"), (["--stable", "4:4"], "--stable"),
    (["--warmup-total", "0"], "--warmup-total"), (["--warmup-total", "-5"], "--warmup-total"),
    (["--warmup-total", "inf"], "--warmup-total"), (["--warmup-total", "nan"], "--warmup-total"),
    (["--tokens-per-example", "0"], "--tokens-per-example"),
    (["--tokens-per-example", "nan"], "--tokens-per-example"),
    (["--reference", "largest"], "--reference"), (["--unit", "bytes"], "--unit"),
    (["--b-noise", "/nonexistent/bn.jsonl"], "--b-noise"),
)  # fmt: skip


def _stored(url):
    import optuna

    study = optuna.load_study(study_name="fz", storage=url)
    return sorted(
        (t.number, t.state.name, json.dumps(t.params, sort_keys=True),
         json.dumps(t.user_attrs, sort_keys=True, default=str))
        for t in study.get_trials(deepcopy=False)
    )  # fmt: skip


def check_bad(cfg, url):
    rng = random.Random(cfg["bad"])
    picks = rng.sample(BAD, 3)
    before = _stored(url)
    bad = []
    for argv, option in picks:
        full = ["branch", "--storage", url, "--study", "fz", "--json", "--no-progress", *argv]
        try:
            rc, _, err = _cli(full)
        except Exception as exc:
            return _crash(exc)
        if rc != 2 or option not in err:
            bad.append(f"{' '.join(argv)}: exit {rc}, {err.strip()[-200:]!r}")
    if _stored(url) != before:
        bad.append("the study changed under refused calls")
    return {"cls": "WRONG", "bad": bad} if bad else {"cls": "refused-ok"}


def b_noise_records(cfg):
    """B_noise points along the main run: a BNoiseTracker's (``ghg``, ``trace_h_sigma``, at
    times a GᵀHG ≤ 0) or summary points (``b_noise``, with ``b_noise_low``/``high`` or
    without), at random positions around the windows and exactly on their ends at times."""
    rng = random.Random(cfg["b_noise_seed"])
    budget = cfg["budget"]
    out = []
    for c in cfg["checkpoints"]:
        at = [rng.uniform(c - budget / 2, c + 1.5 * budget) for _ in range(rng.randint(0, 4))]
        at += [x for x in (c, c + budget) if rng.random() < 0.5]
        for x in at:
            x = float(max(0, x))
            if cfg["b_noise"] == "tracker":
                ghg = rng.uniform(0.2, 2.0) * (-1 if rng.random() < 0.1 else 1)
                out.append({"examples": x, "ghg": ghg, "trace_h_sigma": rng.uniform(1, 50),
                            "b_noise": 99.0})  # fmt: skip
            else:
                b = rng.uniform(5, 100)
                rec = {"examples": x, "b_noise": b}
                if cfg.get("b_noise_interval", True) and rng.random() < 0.8:
                    rec |= {"b_noise_low": b * rng.uniform(0.5, 1), "b_noise_high": b * 1.5}
                out.append(rec)
    if not out:  # (an empty file is refused, naming it: one point at the first checkpoint)
        c = float(cfg["checkpoints"][0])
        tracker = {"ghg": 1.0, "trace_h_sigma": 10.0, "b_noise": 99.0}
        out.append(
            {"examples": c, **(tracker if cfg["b_noise"] == "tracker" else {"b_noise": 10.0})}
        )
    return sorted(out, key=lambda r: r["examples"])


def b_noise_by_hand(cfg, records, checkpoint):
    """docs: the window's points are those at positions in [checkpoint, checkpoint + Δ); a
    BNoiseTracker's give the ratio of the means of tr(HΣ) and GᵀHG (none where a mean ≤ 0),
    summary points their mean (and the means of their ends)."""
    inside = [r for r in records if checkpoint <= r["examples"] < checkpoint + cfg["budget"]]
    if not inside:
        return None, None, None
    if cfg["b_noise"] == "tracker":
        g = float(np.mean([r["ghg"] for r in inside]))
        t = float(np.mean([r["trace_h_sigma"] for r in inside]))
        return (t / g if g > 0 and t > 0 else None), None, None
    mean = float(np.mean([r["b_noise"] for r in inside]))
    if all("b_noise_low" in r for r in inside):
        low = float(np.mean([r["b_noise_low"] for r in inside]))
        high = float(np.mean([r["b_noise_high"] for r in inside]))
        return mean, low, high
    return mean, None, None


def check_b_noise(cfg, data, records):
    from fuzz_branch import _close

    bad = []
    for p in data["points"]:
        c = p["branch"]["checkpoint"]
        want, low, high = b_noise_by_hand(cfg, records, c)
        if not _close(p["b_noise"], want):
            bad.append(f"ck {c:g}: B_noise {p['b_noise']} for {want}")
        elif cfg["b_noise"] == "summary" and not (
            _close(p["b_noise_low"], low) and _close(p["b_noise_high"], high)
        ):
            bad.append(
                f"ck {c:g}: B_noise [{p['b_noise_low']}, {p['b_noise_high']}] for [{low}, {high}]"
            )
        elif cfg["b_noise"] == "tracker" and want is not None and p["b_noise_low"] is not None:
            hi = math.inf if p["b_noise_high"] is None else p["b_noise_high"]
            if not p["b_noise_low"] <= want <= hi:
                bad.append(f"ck {c:g}: B_noise {want} outside [{p['b_noise_low']}, {hi}]")
        if want is None and p["b_noise"] is None and cfg["b_noise"] == "tracker":
            inside = [r for r in records if c <= r["examples"] < c + cfg["budget"]]
            if inside and not p["b_noise_reason"]:
                bad.append(f"ck {c:g}: no B_noise and no reason")
    return bad


def check_keep_going(cfg, url):
    """A branch that raises mid-way under ``--keep-going``: the command goes on; the analysis
    leaves it out (docs/branch.md, *A partial study*) and lists it as failed."""
    rng = random.Random(cfg["raise_at"])
    at = [rng.choice(cfg["checkpoints"]), rng.choice(cfg["sizes"]), rng.randrange(cfg["repeats"])]
    CURRENT["raise"] = at
    os.environ[ENV] = json.dumps({"cfg": cfg, "raise": at})
    argv = ["branch", "fuzz_branch_options:train", "--storage", url, "--study", "kg",
            "--checkpoints", ",".join(str(c) for c in cfg["checkpoints"]),
            "--batch-sizes", ",".join(map(str, cfg["sizes"])), "--budget", str(cfg["budget"]),
            "--lr", "0.1", "--lr-rule", "none", "--repeats", str(cfg["repeats"]),
            "--base-batch-size", str(cfg["b0"]), "--keep-going", "--json", "--no-progress",
            *options_argv(cfg)]  # fmt: skip
    try:
        rc, out, err = _cli(argv)
        if rc == 0 or "1 branch(es) failed" not in err:
            return {"cls": "WRONG", "bad": [f"exit {rc} with a failed branch: {err[-200:]!r}"]}
        # docs: the partial study is analysed (without MODULE:FUNCTION) against its plan
        rc, out, err = _cli(["branch", "--storage", url, "--study", "kg", "--json",
                             "--no-progress", *options_argv(cfg)])  # fmt: skip
    except Exception as exc:
        return _crash(exc)
    finally:
        CURRENT.pop("raise", None)
        os.environ.pop(ENV, None)
    want = truth(cfg, missing={tuple(at)})
    if not want or any(isinstance(w, tuple) for w in want.values()):
        if rc == 2:
            return {"cls": "refused-ok", "err": err.strip()[-160:]}
        return {"cls": "WRONG", "bad": [f"exit {rc} where no branch point can be compared"]}
    if rc != 0:
        return {"cls": "FALSE-REFUSAL", "rc": rc, "err": err[-300:]}
    from fuzz_branch import _close

    data = json.loads(out)
    bad = []
    got = {p["branch"]["checkpoint"]: p["branch"] for p in data["points"]}
    if sorted(got) != sorted(want):
        bad.append(f"points {sorted(got)} for {sorted(want)}")
    for c, w in want.items():
        p = got.get(c)
        if p is None:
            continue
        for key, val in (("cbs", w["cbs"][0]), ("b_crit", w["crit"][0])):
            tol = RTOL if key == "cbs" else 1e-6
            if not _close(p[key], val if math.isfinite(val) else None, tol):
                bad.append(f"ck {c:g}: {key} {p[key]} for {val}")
        if p["seeds"] != w["seeds"]:
            bad.append(f"ck {c:g}: seeds {p['seeds']} for {w['seeds']}")
    failed = [
        [u["checkpoint"], u["batch_size"], u["seed"]]
        for u in data["unfinished_branches"]
        if u["state"] == "failed"
    ]
    if failed != [at]:
        bad.append(f"failed branches {failed} for {[at]}")
    return {"cls": "WRONG", "bad": bad[:6]} if bad else {"cls": "ok"}


# --- PostgreSQL beside SQLite ------------------------------------------------------------------

PG: dict = {}


def _worker(plan, url, kill):
    import logging

    import optuna

    from noisescale.branch import run_branches

    optuna.logging.set_verbosity(logging.ERROR)
    CURRENT["kill"] = kill
    try:
        run_branches(train, plan, storage=url, study_name="fz", progress=False,
                     heartbeat_interval=1, grace_period=2)  # fmt: skip
    except BaseException:
        os._exit(4)
    os._exit(0)


def _branches(url, study):
    from noisescale.branch import read_branches

    return sorted(
        (b.checkpoint, b.batch_size, b.seed, b.budget, tuple(b.run.examples), tuple(b.run.metric))
        for b in read_branches(url, study)
    )


def _first_difference(a, b, path=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{path}.{k}")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if x != y:
                return _first_difference(x, y, f"{path}[{i}]")
    return f"{path}: {str(a)[:80]} against {str(b)[:80]}"


def check_pg(cfg, sqlite_url, sqlite_json):
    """The same plan on PostgreSQL, by two worker processes at once, one of them killed
    mid-branch and its branch rerun after the grace period: the same branches stored and read,
    and the same analysis, number for number."""
    import multiprocessing

    import postgres_server
    from noisescale.branch import run_branches

    if "server" not in PG:
        PG["server"] = postgres_server.start()
    url = PG["server"].create_database()
    plan = plan_of(cfg)
    units = plan.units()
    pick = units[len(units) // 2].params
    kill = [int(pick["checkpoint"]), int(pick["batch_size"]), int(pick["seed"])]
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_worker, args=(plan, url, k)) for k in (kill, None)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    time.sleep(3.5)  # past the 2 s grace period: the killed worker's branch is handed on
    run_branches(train, plan, storage=url, study_name="fz", progress=False,
                 heartbeat_interval=1, grace_period=2)  # fmt: skip
    bad = []
    if _branches(url, "fz") != _branches(sqlite_url, "fz"):
        bad.append("the branches stored on PostgreSQL differ from SQLite's")
    rc, out, err = _cli(["branch", "--storage", url, "--study", "fz", "--json", "--no-progress",
                         *options_argv(cfg), *CURRENT.get("cli_extra", [])])  # fmt: skip
    if rc != 0:
        return {"cls": "FALSE-REFUSAL" if sqlite_json else "refused-ok", "err": err[-300:]}
    if "s3cret" in out + err:
        bad.append("the password shown")
    data = json.loads(out)
    if sqlite_json is not None:
        for key in ("points", "warmup", "notes", "unfinished_branches"):
            if data[key] != sqlite_json[key]:
                bad.append(
                    f"{key} differs from SQLite's: {_first_difference(data[key], sqlite_json[key])}"
                )
    exits = [p.exitcode for p in procs]
    return {"cls": "WRONG", "bad": bad} if bad else {"cls": "ok", "exits": exits}


def check_seed(seed, override=None, checks=CHECKS):
    import logging

    import optuna

    optuna.logging.set_verbosity(logging.ERROR)
    cfg = draw_config(seed)
    if override:
        cfg.update(override)
    t0 = time.time()
    out = {c: {"cls": "skip"} for c in CHECKS}
    out["lib"], results, want = check_lib(cfg)
    if "grid" in checks:
        out["grid"], _, _ = check_lib({**cfg, "grid": draw_grid(cfg, seed)})
    if set(checks) & {"cli", "bad", "keep", "pg"}:
        with tempfile.TemporaryDirectory() as tmp:
            url = f"sqlite:///{tmp}/b.db"
            from noisescale.branch import run_branches

            CURRENT.clear()
            CURRENT["cfg"] = cfg
            try:
                run_branches(train, plan_of(cfg), storage=url, study_name="fz", progress=False)
            except Exception as err:
                out["cli"] = _crash(err)
                return {"seed": seed, "cfg": cfg, "checks": out, "time": round(time.time() - t0, 2)}
            data = None
            if "cli" in checks:
                out["cli"], data = check_cli(cfg, url, want, results, tmp)
            if "bad" in checks:
                out["bad"] = check_bad(cfg, url)
            if "keep" in checks:
                out["keep"] = check_keep_going(cfg, url)
            if "pg" in checks:
                try:
                    out["pg"] = check_pg(cfg, url, data)
                except Exception as err:
                    out["pg"] = _crash(err)
    return {"seed": seed, "cfg": cfg, "checks": out, "time": round(time.time() - t0, 2)}


def findings(record):
    return [(name, res) for name, res in record["checks"].items() if res["cls"] in FINDINGS]


def describe(record):
    cfg = record["cfg"]
    keys = ("sizes", "budget", "checkpoints", "repeats", "sigma", "spacing", "same_n", "n")
    keys += ("crossing", "decay", "reference", "tolerance", "confidence", "stable", "b0")
    return f"seed {record['seed']}: " + " ".join(
        f"{k}={cfg[k]:.4g}" if isinstance(cfg[k], float) else f"{k}={cfg[k]}" for k in keys
    )


def main(argv=None):
    from fuzz_runner import check_parser, run_checks

    parser = check_parser(__doc__, "0:200")
    parser.add_argument("--postgres", action="store_true", help="the pg check too (slower)")
    args = parser.parse_args(argv)
    checks = CHECKS if args.postgres else tuple(c for c in CHECKS if c != "pg")
    try:
        return run_checks(
            args,
            lambda seed, override: check_seed(seed, override, checks),
            findings, describe, CHECKS, column_width=14,
        )  # fmt: skip
    finally:
        if "server" in PG:
            PG["server"].stop()


if __name__ == "__main__":
    os.environ.setdefault("NOISESCALE_NO_BROWSER", "1")
    raise SystemExit(main())
