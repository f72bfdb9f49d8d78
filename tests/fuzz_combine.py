"""Combining the small-batch sources of one step: state.update's minimum-variance weights
against their truth.

Each seed draws K = 2–3 synthetic small-batch sources of known truth (:func:`draw_config`): a big
batch B and distinct small-batch sizes b_i; a true |G|² and tr Σ per step whose level drifts
(constant; |G|² decaying as in training; one step's level 10³× — a spike —; a 10⁴× jump that
stays; Adam's first steps under ``precondition=``, where P ≈ 1/ε makes the level 10⁸, 10⁵, 10²
times the later one); and a known noise covariance Σ₀ of the big batch's and the sources' squared
norms — correlated (a shared factor), heteroscedastic ∝ the step's level L_t = |G|² + tr Σ/B,
one source at times 10× worse. Each step's norms are S_B = |G|² + tr Σ/B + L_t·ε₀ and
S_i = |G|² + tr Σ/b_i + L_t·ε_i, ε ~ N(0, Σ₀), and go through the tracker's own path
(``noisescale.state.update``, one :class:`~noisescale.state.SmallBatches` per source), R
replicates of T steps. Checked against an oracle written here from eq. A.2 and the definition of
minimum-variance weights, never from noisescale's functions:

* ``bias_g2``, ``bias_tr``: the combined per-step |G|² and tr Σ (the history record's ``g2``,
  ``trace_sigma``) minus the truth, over the level (e_t = (x̂_t − x_t)/L_t), averaged over a
  replicate's steps, then a z-test over the replicates: |mean|/se ≤ 4.5 (the weights must come
  from earlier steps only, so the combination stays unbiased; 4.5 σ: a false alarm in 3·10⁵);
* ``var_g2``, ``var_tr``: E[e_t²] over the steps from t = 20 (the weights learnt: the library
  keeps equal weights for its first 8 folded steps, and a drift's first steps are not folded)
  against the oracle's closed forms: the normalised errors are linear in ε, e = A ε with A from
  eq. A.2, so C₀ = A Σ₀ Aᵀ, the optimal weights w* = C₀⁻¹1/(1ᵀC₀⁻¹1) have variance
  1/(1ᵀC₀⁻¹1) and equal weights 1ᵀC₀1/K². ``WEAK`` where the library's variance exceeds 1.5×
  equal weights' — weights learnt from n steps of a K-variate cost ≈ (K−1)/(n−K) over the
  optimum (≤ 10% at n ≥ 20, K ≤ 3), which is ≤ equal weights', and the sample variance of
  R·(T−20) ≥ 1,800 errors is within ≈ 3·√(2/1800) = 10% of its mean, so 1.5 leaves room for
  both — or 1 + 3·mean_t (K−1)/(n_t−K) + 0.15 × the optimum's (n_t the EMA's effective steps;
  ``oracle?`` below 0.8× the optimum: the oracle, not the library, would be wrong);
* ``coverage``: the final B_simple's interval holds the truth B = Σ a_t tr_t / Σ a_t |G|²_t
  (a_t = β^(T−1−t), the EMA's weights) in how many replicates: ``WRONG`` where a binomial
  tail at the nominal level puts the count below its 10⁻³ quantile;
* ``width``: the final interval's median width over B against that of the same steps combined
  with equal weights (averaged by the library's ``update_state``, which is not under test here):
  ``WEAK`` beyond 1.5× (an unbounded interval counts as infinitely wide);
* ``tracker``: a real run — a tiny float64 model under ``GradientNoiseTracker`` with two
  sources (per-example and 2 micro-batches a step) and ``precondition=`` Adam, whose first steps
  have P ≈ 1/ε — each source's own |G|² and tr Σ recomputed from the records by eq. A.2:
  ``WEAK`` where the final interval is unbounded while that of the same steps with equal
  weights is bounded, or where the library's per-step combination from step 20 on scatters
  (its variance over the steps of (x̂_t − x̄)/S_B) over 2× as much as equal weights' on the same
  steps (paired, from ≥ 40 steps: the ratio's sampling error is well under 2×); the weights
  read back (w = (x̂ − x₂)/(x₁ − x₂)) are reported.

Seeds from 3000 (``SPIKES_FROM``): the level spikes 6–15× (under LEVEL_JUMP, so folded) for one
step in every 15 or 30 — open (a review, 2026-12-08): the sources' change then holds the truth's
change, common to them and large beside their noise, whose product with the step's noise bends
the learnt covariance off the common direction (seed 3002: tr Σ's weights −15.4 and 16.4 after a
spike, 1.03 and −0.03 before, its variance 1.3·10⁴× the optimum's, 340× equal weights').

Seeds from 2000 (``BEYOND_FROM``; seeds 0–1999 draw as before) each draw one scenario
(:func:`_beyond`) the seeds below do not: Student-t noise, noise whose size relative to the
level moves 10× along the run, one source's noise growing 10–30× (the synthetic checks above,
the oracle per step: C_t = A Σ_t Aᵀ, the variances averaged over the steps; ``growing``
against equal weights only), and

* ``first``: one source's noise variance 2,000× the others', 600 replicates of 30 steps: each
  step's variance from the first learnt one (step 9) to step 20 against the optimum's and
  equal weights' (:func:`check_first`);
* ``resume``: a real run (per-example norms at a fraction, micro-batches, ``measure_every``,
  ``sync_every``) resumed mid-run from ``state_dict()`` through JSON against the same run
  uninterrupted (every record and the estimate to 1e-9), and the combiner's rule redone by
  hand from the records (:func:`rule_weights`: weights from earlier steps only);
* ``local``: 2 CPU processes over gloo averaging a fixed linear model's gradients by hand,
  uneven local batches, per-example and local sources, 200 steps against the data set's |G|²
  and tr Σ by brute force (bias z-test over the steps) and the weights against the optimum of
  the sources' covariance by Monte Carlo over 40,000 steps drawn here (:func:`check_local`).

Classes: ``ok``; ``WRONG`` (a silent wrong number: a bias, an interval that under-covers);
``WEAK`` (unbiased but much less precise than equal weights — the combination's purpose
defeated); ``crash``; ``skip``.
"""

from __future__ import annotations

import math
import random
import time
import warnings

import numpy as np
from scipy import stats as sps

from noisescale import state as state_mod

CHECKS = (
    "bias_g2", "bias_tr", "var_g2", "var_tr", "coverage", "width", "tracker",
    "first", "resume", "local",
)  # fmt: skip
FINDINGS = ("WRONG", "WEAK", "crash")
Z_BIAS = 4.5  # the bias z-test's bound (two-sided 7e-6)
VAR_FACTOR = 1.5  # the library's variance against equal weights'
WIDTH_FACTOR = 1.5  # the final interval's width against equal weights'
WARM = 20  # the variance from this step (the weights learnt from 8 folded steps, a few skipped)
DRIFTS = ("constant", "decay", "spike", "jump", "adam_start")
BEYOND_FROM = 2000  # seeds from here on draw one of SCENARIOS (seeds 0-199 unchanged)
SCENARIOS = ("student_t", "rel_drift", "growing", "first_steps", "resume", "local")
#: seeds from here on: the level spikes 6-15× (under the combiner's LEVEL_JUMP 16: folded) for one
#: step in every 15 or 30, from step 7 (a review, 2026-12-08)
SPIKES_FROM = 3000


def draw_config(seed):
    rng = random.Random(seed)
    cfg = _draw_config(seed, rng)
    if seed >= SPIKES_FROM:  # (drawn after the rest; seeds below unchanged)
        return cfg | {"drift": "spikes", "spike": rng.choice((6.0, 10.0, 15.0)),
                      "every": rng.choice((15, 30))}  # fmt: skip
    return cfg | _beyond(seed, rng) if seed >= BEYOND_FROM else cfg


def _draw_config(seed, rng):
    k = rng.choice((2, 2, 3))
    big = rng.choice((32, 64, 128))
    sizes = sorted(rng.sample([s for s in (1, 2, 4, 8, 16) if s < big], k))
    return {
        "k": k,
        "b_big": big,
        "b_small": sizes,
        "drift": DRIFTS[seed % len(DRIFTS)] if seed < 50 else rng.choice(DRIFTS),
        "g2": 10 ** rng.uniform(-2, 1),
        "b_simple": 10 ** rng.uniform(0.5, 3),  # tr Σ = B_simple·|G|²
        "noise_big": rng.uniform(0.01, 0.2),  # ε₀'s standard deviation
        "noise_small": [rng.uniform(0.05, 0.6) for _ in range(k)],
        "bad": rng.random() < 0.4,  # one source 10× worse
        "rho": rng.uniform(-0.3, 0.95),  # the shared factor's correlation
        "beta": rng.choice((0.99, 0.99, 1.0, 0.95)),
        "steps": rng.choice((80, 120)),
        "replicates": 120,
        "tracker": seed % 5 == 0,
    } | _noisy_big(seed, rng)


def _noisy_big(seed, rng):
    """From seed 100, half the seeds draw a noisy big batch (ε₀'s sd 0.3–0.5, as a small model's
    S_B, moving over 2× between steps in 5–10% of them at a constant level; drawn after the
    rest, so seeds 0–99 are unchanged): until 2026-12-07 (LEVEL_JUMP 2) those steps were not
    learnt from, a truncation on the big batch's noise, and tr Σ's variance was 6.4× the
    optimum's (seed 0 redrawn so) where the raw estimates had 1.05×; a review."""
    if seed >= 100 and rng.random() < 0.5:
        return {"noise_big": rng.uniform(0.3, 0.5)}
    return {}


def _beyond(seed, rng):
    """Seeds from BEYOND_FROM: one scenario each, drawn after the rest (seeds below unchanged).

    * ``student_t``: ε's components Student-t (ν 4.5–10, scaled to unit variance, then mixed by
      Σ₀'s Cholesky factor: the covariance is Σ₀'s, the tails heavy; ν > 4 so the variance
      check's sample variance has a finite variance);
    * ``rel_drift``: the noise relative to the level moves along the run, ε_t·s_t with s_t from
      1 to 0.1 or 10 geometrically (common to the sources: the optimal weights stay put);
    * ``growing``: one small-batch source's noise grows 10–30× along the run (the optimal
      weights move: the learnt ones lag, bounded against equal weights' per-step variance);
    * ``first_steps``: one source's noise variance 2,000× the others', 600 replicates of 30
      steps at a constant or decaying level: the variance at each step from the first learnt
      one (``first``);
    * ``resume``: a real run under ``GradientNoiseTracker`` (per-example norms at a fraction,
      micro-batches, ``measure_every``, ``sync_every``) resumed from ``state_dict()`` mid-run,
      against the same run uninterrupted and the combiner's rule redone by hand (``resume``);
    * ``local``: 2 CPU processes over gloo averaging a fixed linear model's gradients by hand
      (``process_group=``), uneven local batches, per-example and local sources, against the
      data set's |G|² and tr Σ by brute force (``local``)."""
    scenario = SCENARIOS[(seed - BEYOND_FROM) % len(SCENARIOS)]
    out = {"scenario": scenario, "tracker": False}
    if scenario == "student_t":
        out["nu"] = rng.choice((4.5, 6.0, 10.0))
    elif scenario == "rel_drift":
        out["rel_end"] = rng.choice((0.1, 10.0))
    elif scenario == "growing":
        out["grow"] = rng.choice((10.0, 30.0))
        out["grower"] = rng.randrange(3)  # which source (mod K)
    elif scenario == "first_steps":
        out |= {"replicates": 600, "steps": 30, "drift": rng.choice(("constant", "decay")),
                "bad": False, "noisy": rng.randrange(3)}  # fmt: skip
    elif scenario == "resume":
        out["run"] = {
            "fraction": rng.choice((0.5, 1.0)),
            "micro": rng.choice((2, 3)),
            "measure_every": rng.choice((1, 2, 3)),
            "sync_every": rng.choice((1, 4, 7)),
            "steps": 60,
            "resume_at": rng.randrange(12, 45),
            "beta": rng.choice((0.95, 0.99, 1.0)),
        }
    elif scenario == "local":
        out["run"] = {
            "sizes": rng.choice(([4, 12], [6, 10], [3, 16], [8, 8])),
            "steps": 200,
            "n_data": rng.choice((48, 96)),
            "beta": rng.choice((0.99, 1.0)),
            "noise": rng.uniform(0.1, 2.0),
            "t_noise": rng.random() < 0.5,  # Student-t (ν 3) residuals: heavy-tailed gradients
        }
    return out


def noise_draw(cfg, rng):
    """ε (replicates, steps, K + 1) of the seed's scenario and each step's covariance Σ_t."""
    k, n_steps, reps = cfg["k"], cfg["steps"], cfg["replicates"]
    sigma = noise_cov(cfg)
    scenario = cfg.get("scenario")
    if scenario is None:  # (seeds below BEYOND_FROM: the stream as it was)
        eps = rng.multivariate_normal(np.zeros(k + 1), sigma, size=(reps, n_steps))
        return eps, np.broadcast_to(sigma, (n_steps, k + 1, k + 1))
    chol = np.linalg.cholesky(sigma)
    if scenario == "student_t":
        nu = cfg["nu"]
        z = rng.standard_t(nu, size=(reps, n_steps, k + 1)) * math.sqrt((nu - 2) / nu)
    else:
        z = rng.standard_normal((reps, n_steps, k + 1))
    eps = z @ chol.T
    scale = np.ones((n_steps, k + 1))
    if scenario == "rel_drift":
        scale *= np.geomspace(1.0, cfg["rel_end"], n_steps)[:, None]
    elif scenario == "growing":
        scale[:, 1 + cfg["grower"] % k] = np.geomspace(1.0, cfg["grow"], n_steps)
    eps = eps * scale[None]
    cov_t = scale[:, :, None] * sigma[None] * scale[:, None, :]
    return eps, cov_t


def levels(cfg):
    """The true |G|² and tr Σ per step."""
    t = np.arange(cfg["steps"], dtype=float)
    g2 = np.full_like(t, cfg["g2"])
    d = np.ones_like(t)
    drift = cfg["drift"]
    if drift == "decay":  # |G|² falls 20×, tr Σ stays
        g2 = g2 * np.exp(-3.0 * t / t[-1])
    elif drift == "spike":
        d[len(t) // 3] = 1e3
    elif drift == "jump":
        d[len(t) // 2 :] = 1e4
    elif drift == "adam_start":
        d[:4] = [1e8, 1e5, 1e2, 10.0]
    elif drift == "spikes":
        d[7 :: cfg["every"]] = cfg["spike"]
    return g2 * d, cfg["g2"] * cfg["b_simple"] * d


def noise_cov(cfg):
    """Σ₀ of (ε₀, ε_1..ε_K): a shared factor of correlation rho, the scales drawn."""
    k = cfg["k"]
    scale = np.array([cfg["noise_big"], *cfg["noise_small"]])
    if cfg["bad"]:
        scale[1 + int(np.argmax(cfg["b_small"]))] *= 10.0
    if cfg.get("scenario") == "first_steps":  # one source's variance 2,000× the others'
        scale[1:] = cfg["noise_small"][0]
        scale[1 + cfg["noisy"] % cfg["k"]] *= math.sqrt(2000.0)
    rho = cfg["rho"]
    corr = np.full((k + 1, k + 1), rho)
    np.fill_diagonal(corr, 1.0)
    if rho < -1.0 / k:  # keep it positive definite
        corr = 0.5 * corr + 0.5 * np.eye(k + 1)
    return corr * np.outer(scale, scale)


def maps(cfg):
    """A_g and A_t: the sources' normalised errors of |G|² and tr Σ as linear maps of ε
    (eq. A.2 with one small batch: g2_i = (B·S_B − b_i·S_i)/(B − b_i),
    tr_i = (S_B − S_i)/(1/B − 1/b_i))."""
    big, k = cfg["b_big"], cfg["k"]
    a_g, a_t = np.zeros((k, k + 1)), np.zeros((k, k + 1))
    for i, b in enumerate(cfg["b_small"]):
        a_g[i, 0], a_g[i, 1 + i] = big / (big - b), -b / (big - b)
        a_t[i, 0], a_t[i, 1 + i] = 1 / (1 / big - 1 / b), -1 / (1 / big - 1 / b)
    return a_g, a_t


def oracle(cfg, sigma=None):
    """The optimal weights and variances, and equal weights' variance, per quantity (under the
    noise covariance ``sigma``, default Σ₀)."""
    sigma = noise_cov(cfg) if sigma is None else sigma
    out = {}
    for name, a in zip(("g2", "tr"), maps(cfg), strict=True):
        c = a @ sigma @ a.T
        ones = np.ones(cfg["k"])
        inv1 = np.linalg.solve(c, ones)
        out[name] = {
            "w_opt": (inv1 / inv1.sum()).tolist(),
            "var_opt": float(1.0 / inv1.sum()),
            "var_equal": float(ones @ c @ ones / cfg["k"] ** 2),
        }
    return out


def simulate(cfg, seed):
    """R replicates through state.update: the per-step combined g2, tr, the sources' own, and
    the final intervals (the library's and equal weights')."""
    from noisescale import estimators as est

    rng = np.random.default_rng(seed)
    g2, tr = levels(cfg)
    big, sizes, k = cfg["b_big"], cfg["b_small"], cfg["k"]
    level = g2 + tr / big
    n_steps, reps = cfg["steps"], cfg["replicates"]
    eps, _ = noise_draw(cfg, rng)
    s_big = (g2 + tr / big)[None, :] + level[None, :] * eps[..., 0]
    s_small = np.stack(
        [(g2 + tr / b)[None, :] + level[None, :] * eps[..., 1 + i] for i, b in enumerate(sizes)],
        axis=-1,
    )
    names = [f"s{i}" for i in range(k)]  # sorted as state.update sorts them
    got_g = np.full((reps, n_steps), np.nan)
    got_t = np.full((reps, n_steps), np.nan)
    finals, equal_finals = [], []
    for r in range(reps):
        st = state_mod.init(cfg["beta"])
        eq = est.init_state(cfg["beta"])
        for t in range(n_steps):
            sources = {
                names[i]: state_mod.SmallBatches(1.0, 1.0 / sizes[i], float(s_small[r, t, i]))
                for i in range(k)
            }
            stats = state_mod.StepStats(t, float(big), float(s_big[r, t]), sources, big)
            st, rec = state_mod.update(st, stats, confidence=0.95)
            got_g[r, t], got_t[r, t] = rec["g2"], rec["trace_sigma"]
            # the same step combined with equal weights (eq. A.2 by hand)
            own_g = [(big * s_big[r, t] - b * s_small[r, t, i]) / (big - b) for i, b in
                     enumerate(sizes)]  # fmt: skip
            own_t = [(s_big[r, t] - s_small[r, t, i]) / (1 / big - 1 / b) for i, b in
                     enumerate(sizes)]  # fmt: skip
            eq = est.update_state(eq, float(np.mean(own_g)), float(np.mean(own_t)))
        finals.append((rec["b_simple"], rec["b_simple_low"], rec["b_simple_high"]))
        e = est.b_simple_interval(eq, 0.95)
        equal_finals.append((e.b_simple, e.low, e.high))
    return got_g, got_t, np.array(finals), np.array(equal_finals)


def truth_b_simple(cfg):
    g2, tr = levels(cfg)
    a = cfg["beta"] ** np.arange(cfg["steps"] - 1, -1, -1, dtype=float)
    return float((a * tr).sum() / (a * g2).sum())


def check_bias(err):
    means = np.nanmean(err, axis=1)
    m, se = float(np.mean(means)), float(np.std(means, ddof=1) / math.sqrt(len(means)))
    z = m / se if se > 0 else (0.0 if m == 0 else math.inf)
    cls = "ok" if abs(z) <= Z_BIAS else "WRONG"
    return {"cls": cls, "mean": m, "se": se, "z": round(z, 2)}


def _n_eff(beta, s2):
    """The effective steps of an EMA over steps of covariance ∝ s2 (weights β^age)."""
    a = beta ** np.arange(len(s2) - 1, -1, -1, dtype=float) * s2
    return float(a.sum() ** 2 / (a**2).sum())


def oracle_steps(cfg, cov_t, first=WARM):
    """:func:`oracle` per step from ``first`` under Σ_t: the variances averaged over the steps
    (the errors' mean square over steps and replicates estimates that average), the optimal
    weights at the last step."""
    per = [oracle(cfg, cov_t[t]) for t in range(first, cfg["steps"])]
    return {
        q: {
            "w_opt": per[-1][q]["w_opt"],
            "var_opt": float(np.mean([o[q]["var_opt"] for o in per])),
            "var_equal": float(np.mean([o[q]["var_equal"] for o in per])),
        }
        for q in ("g2", "tr")
    }


def check_first(err, cfg, cov_t):
    """The variance at each step from step 9 to WARM, against the optimum's and equal weights'
    (the library keeps equal weights until 8 steps are folded; since 2026-12-08 the first two
    steps are never folded — the changes' scale is of the levels before a pair of steps —, so
    step 10 is the first learnt at a steady level; step 9 was until then).

    Bound: weights learnt from n steps of a K-variate normal cost ≈ (K − 1)/(n − K) over the
    optimum (checked against a direct simulation of the rule: 1.25× at n = 8, K = 2); ×3 for
    the EMA's effective n and the level's noise, plus 4 standard errors of a variance from R
    replicates, 4·√(2/R) (normal errors). ``WEAK`` where a step exceeds both that bound over
    the optimum and equal weights' variance (a step where equal weights would do better is
    the defect the check looks for)."""
    k, reps, b = cfg["k"], cfg["replicates"], cfg["beta"]
    rows, worst = [], 0.0
    cls = "ok"
    for t in range(9, min(WARM, cfg["steps"])):
        orc = oracle(cfg, cov_t[t])
        n = t - 1 if b == 1 else ((1 - b ** (t - 1)) / (1 - b)) ** 2 / (
            (1 - b ** (2 * (t - 1))) / (1 - b**2))  # fmt: skip
        se = 4 * math.sqrt(2 / reps)
        for q, e in (("g2", err[0][:, t]), ("tr", err[1][:, t])):
            v = float(np.mean(e**2))
            r_opt, r_eq = v / orc[q]["var_opt"], v / orc[q]["var_equal"]
            bound = 1 + 3 * (k - 1) / max(n - k, 1) + se
            if r_opt > bound and r_eq > 1 + se:
                cls = "WEAK"
            worst = max(worst, r_opt)
            rows.append((t, q, round(r_opt, 2), round(r_eq, 4)))
    return {"cls": cls, "worst_vs_opt": round(worst, 2), "steps": rows[:6] + rows[-2:]}


def check_variance(err, orc, cfg, opt_bound=True, scale=None):
    later = err[:, WARM:]
    var_lib = float(np.nanmean(later**2))
    k, b = cfg["k"], cfg["beta"]
    t = np.arange(WARM, cfg["steps"], dtype=float)  # steps the weights were learnt from
    # the EMA's effective steps (Σa)²/Σa², a_j = β^(t−1−j)
    n = t if b == 1 else ((1 - b**t) / (1 - b)) ** 2 / ((1 - b ** (2 * t)) / (1 - b**2))
    if scale is not None:
        # a common scale s_j of the noise (rel_drift): the EMA's covariance is Σ a_j s_j² C, of
        # effective steps (Σ a_j s_j²)²/Σ a_j² s_j⁴; the later steps' variance weighs ∝ s_t²
        s2 = np.asarray(scale, dtype=float) ** 2
        n = np.array([_n_eff(b, s2[: int(tt)]) for tt in t])
        cost = float(np.sum(s2[WARM:] * (k - 1) / np.maximum(n - k, 1)) / np.sum(s2[WARM:]))
    else:
        cost = float(np.mean((k - 1) / np.maximum(n - k, 1)))
    bound_opt = 1 + 3 * cost + 0.15
    r_eq, r_opt = var_lib / orc["var_equal"], var_lib / orc["var_opt"]
    cls = "ok" if r_eq <= VAR_FACTOR and (r_opt <= bound_opt or not opt_bound) else "WEAK"
    if r_opt < 0.8:  # better than the optimum: the oracle is wrong, not the library
        cls = "oracle?"
    return {
        "cls": cls,
        "vs_equal": round(r_eq, 3),
        "vs_opt": round(r_opt, 3),
        "bound_opt": round(bound_opt, 3),
        "w_opt": [round(w, 3) for w in orc["w_opt"]],
    }


def check_coverage(finals, truth):
    held = int(np.sum((finals[:, 1] <= truth) & (truth <= finals[:, 2])))
    n = len(finals)
    p = float(sps.binom.cdf(held, n, 0.95))
    return {"cls": "WRONG" if p < 1e-3 else "ok", "held": held, "of": n, "p": p}


def _width(f, truth):
    w = (f[:, 2] - f[:, 1]) / truth
    return np.where(np.isfinite(w), w, np.inf)


def check_width(finals, equal_finals, truth):
    lib = float(np.median(_width(finals, truth)))
    eq = float(np.median(_width(equal_finals, truth)))
    ratio = lib / eq if eq > 0 else math.nan
    cls = "WEAK" if not (lib <= WIDTH_FACTOR * eq) and math.isfinite(eq) else "ok"
    return {"cls": cls, "lib": lib, "equal": eq, "ratio": ratio}


def run_tracker(seed, steps=70):
    """A tiny float64 MLP under precondition= Adam, sub-batches and 2 micro-batches a step."""
    import torch
    from torch import nn

    import noisescale

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, eps=1e-8)
    x_all = torch.randn(512, 6, generator=g, dtype=torch.float64)
    y_all = x_all[:, :1] * 0.7 + 0.5 * torch.randn(512, 1, generator=g, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tracker = noisescale.GradientNoiseTracker(
            model, precondition=opt, microbatch=True, sync_every=1, beta=0.99
        )
        history = []
        for _ in range(steps):
            idx = torch.randint(0, 512, (32,), generator=g)
            opt.zero_grad()
            for half in idx.chunk(2):
                loss = ((model(x_all[half]) - y_all[half]) ** 2).mean() / 2
                loss.backward()
            tracker.step()
            opt.step()
        history = tracker.history
    return history


def check_tracker(seed):
    from noisescale import estimators as est

    recs = [r for r in run_tracker(seed) if not r.get("skipped")]
    if len(recs) < 10:
        return {"cls": "skip", "why": f"{len(recs)} steps measured"}
    weights, eq = [], est.init_state(0.99)
    lib_rel, eq_rel = [], []
    for i, r in enumerate(recs):
        big, sb = r["b_big"], r["sqnorm_big"]
        names = sorted(r["sources"])
        if len(names) != 2:
            return {"cls": "skip", "why": f"sources {names}"}
        own, own_t = [], []
        for name in names:
            s = r["sources"][name]
            b = s["b_small"]
            own.append((big * sb - b * s["sqnorm_small"]) / (big - b))
            own_t.append((sb - s["sqnorm_small"]) / (1 / big - 1 / b))
        eq = est.update_state(eq, float(np.mean(own)), float(np.mean(own_t)))
        if abs(own[0] - own[1]) > 1e-9 * (abs(own[0]) + abs(own[1])):
            weights.append((r["g2"] - own[1]) / (own[0] - own[1]))
        if i >= 20:
            lib_rel.append((r["g2"] / sb, r["trace_sigma"] / sb))
            eq_rel.append((np.mean(own) / sb, np.mean(own_t) / sb))
    e = est.b_simple_interval(eq, 0.95)
    last = recs[-1]
    ratio = (np.var(lib_rel, axis=0) / np.var(eq_rel, axis=0)).tolist() if lib_rel else []
    unbounded = not math.isfinite(last["b_simple_high"]) and math.isfinite(e.high)
    cls = "WEAK" if unbounded or any(x > 2.0 for x in ratio) else "ok"
    return {
        "cls": cls,
        "weights": [round(min(weights), 3), round(max(weights), 3)] if weights else None,
        "scatter_vs_equal": [round(x, 3) for x in ratio],
        "interval": [last["b_simple_low"], last["b_simple_high"]],
        "equal_interval": [e.low, e.high],
    }


def _guard(fn, *args):
    try:
        return fn(*args)
    except Exception as err:
        return {"cls": "crash", "error": f"{type(err).__name__}: {str(err)[:200]}"}


def check_seed(seed, override=None, checks=CHECKS):
    """The seed's checks (``checks``: which; the synthetic ones run together)."""
    record = _check_seed(seed, override, checks)
    record["checks"] = {k: v for k, v in record["checks"].items() if k in checks}
    return record


def _check_seed(seed, override, only):
    cfg = draw_config(seed)
    if override:
        cfg.update(override)
    t0 = time.time()
    checks = {}
    if set(only) <= {"tracker"}:  # a real run alone: no synthetic replicates
        run = cfg["tracker"] and "tracker" in only
        checks["tracker"] = _guard(check_tracker, seed) if run else {"cls": "skip"}
        return {"seed": seed, "cfg": cfg, "checks": checks, "time": round(time.time() - t0, 2)}
    scenario = cfg.get("scenario")
    if scenario in ("resume", "local"):
        fn = check_resume if scenario == "resume" else check_local
        checks[scenario] = _guard(fn, seed, cfg["run"]) if scenario in only else {"cls": "skip"}
        return {"seed": seed, "cfg": cfg, "checks": checks, "time": round(time.time() - t0, 2)}
    try:
        got_g, got_t, finals, equal_finals = simulate(cfg, seed)
    except Exception as err:
        crash = {"cls": "crash", "error": f"{type(err).__name__}: {str(err)[:200]}"}
        return {"seed": seed, "cfg": cfg, "checks": dict.fromkeys(CHECKS, crash), "time": 0}
    g2, tr = levels(cfg)
    level = g2 + tr / cfg["b_big"]
    _, cov_t = noise_draw(cfg, np.random.default_rng(0))  # (its covariances only)
    orc = oracle_steps(cfg, cov_t) if scenario else oracle(cfg)
    err_g, err_t = (got_g - g2) / level, (got_t - tr) / level
    checks["bias_g2"] = check_bias(err_g)
    checks["bias_tr"] = check_bias(err_t)
    if cfg["steps"] > WARM:
        # (growing: the optimum moves each step; the learnt weights lag — bounded against
        # equal weights' per-step variance only, the optimum's reported)
        opt_bound = scenario != "growing"
        scale = np.sqrt(cov_t[:, 0, 0] / cov_t[0, 0, 0]) if scenario == "rel_drift" else None
        checks["var_g2"] = check_variance(err_g, orc["g2"], cfg, opt_bound, scale)
        checks["var_tr"] = check_variance(err_t, orc["tr"], cfg, opt_bound, scale)
    if scenario == "first_steps":
        checks["first"] = check_first((err_g, err_t), cfg, cov_t)
    truth = truth_b_simple(cfg)
    checks["coverage"] = check_coverage(finals, truth)
    checks["width"] = check_width(finals, equal_finals, truth)
    run = cfg["tracker"] and "tracker" in only
    checks["tracker"] = _guard(check_tracker, seed) if run else {"cls": "skip"}
    return {"seed": seed, "cfg": cfg, "checks": checks, "time": round(time.time() - t0, 2)}


def findings(record):
    return [(name, res) for name, res in record["checks"].items() if res["cls"] in FINDINGS]


def describe(record):
    cfg = record["cfg"]
    keys = ("k", "b_big", "b_small", "drift", "b_simple", "rho", "bad", "beta", "steps")
    keys += tuple(x for x in ("scenario", "nu", "rel_end", "grow", "run") if x in cfg)
    return f"seed {record['seed']}: " + " ".join(
        f"{k}={cfg[k]:.4g}" if isinstance(cfg[k], float) else f"{k}={cfg[k]}" for k in keys
    )


def main(argv=None):
    from fuzz_runner import check_parser, run_checks

    args = check_parser(__doc__, "0:100").parse_args(argv)
    return run_checks(args, check_seed, findings, describe, CHECKS, column_width=10)


# --- seeds from BEYOND_FROM: a resumed real run, data-parallel local sources ------------------


def _own(rec):
    """Each source's own (g2, tr Σ) by eq. A.2 with its harmonic size (sorted by name)."""
    big, sb = rec["b_big"], rec["sqnorm_big"]
    out = []
    for name in sorted(rec["sources"]):
        s = rec["sources"][name]
        b = s["b_small"]
        if not (s["count"] > 0 and b < big):
            continue
        out.append(((big * sb - b * s["sqnorm_small"]) / (big - b),
                    (sb - s["sqnorm_small"]) / (1 / big - 1 / b)))  # fmt: skip
    return np.array(out)


def rule_weights(records, beta, jump=16.0, decay=0.5, min_steps=8):
    """The combiner's rule as estimators.update_combiner's docstring states it, redone here:
    each folded step's sources' estimates as their change from the step before over a scale ℓ,
    the EMA (decay `decay`, restarted at a level over `jump`× from it) of the S_B of the steps
    before those two; a step not folded where its S_B moved over `jump`× from the step before's,
    or the step before's from ℓ, and the first two; the EMA (weights β^age) of the changes'
    mean and outer products; equal weights until `min_steps` folded; then w = C⁻¹1/(1ᵀC⁻¹1)
    for g2 and for tr Σ. Returns, per record, the weights applied there (None where a record
    is skipped)."""

    def near(x, ref):
        return ref > 0 and ref / jump <= x <= jump * ref

    out, folded, prev, scale = [], [], None, None
    for rec in records:
        if rec.get("skipped"):
            out.append(None)
            continue
        own = _own(rec)
        k = len(own)
        if len(folded) < min_steps:
            w = (np.ones(k) / k, np.ones(k) / k)
        else:
            a = beta ** np.arange(len(folded) - 1, -1, -1, dtype=float)
            a = a / a.sum()
            w = []
            for q in (0, 1):
                x = np.array([f[:, q] for f in folded])
                m = a @ x
                c = (x * a[:, None]).T @ x - np.outer(m, m)
                inv1 = np.linalg.solve(c, np.ones(k))
                w.append(inv1 / inv1.sum())
            w = tuple(w)
        out.append(w)
        level = rec["sqnorm_big"]
        if prev is not None and scale is not None and near(level, prev[0]) and near(prev[0], scale):
            folded.append((own - prev[1]) / scale)
        if prev is not None and prev[0] > 0:
            scale = (
                decay * scale + (1 - decay) * prev[0] if scale and near(prev[0], scale) else prev[0]
            )
        prev = (level, own)
    return out


def _read_back(rec, w):
    """The record's combined g2 and tr Σ as the rule's weights give them."""
    own = _own(rec)
    return float(w[0] @ own[:, 0]), float(w[1] @ own[:, 1])


def _resume_run(seed, run, resume_at):
    """The real run's history: per-example norms at a fraction and micro-batches (two sources),
    a float64 MLP under SGD; resumed at step `resume_at` (None: uninterrupted) by a new tracker
    loading the old one's state_dict() through JSON."""
    import json

    import torch
    from torch import nn

    import noisescale

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x_all = torch.randn(512, 6, generator=g, dtype=torch.float64)
    y_all = x_all[:, :1] * 0.7 + 0.5 * torch.randn(512, 1, generator=g, dtype=torch.float64)

    def tracker():
        return noisescale.GradientNoiseTracker(
            model, per_example_fraction=run["fraction"], microbatch=True, beta=run["beta"],
            sync_every=run["sync_every"], measure_every=run["measure_every"],
        )  # fmt: skip

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr, history = tracker(), []
        for step in range(run["steps"]):
            if step == resume_at:
                saved = json.loads(json.dumps(tr.state_dict()))
                history += tr.history
                tr.remove()
                tr = tracker()
                tr.load_state_dict(saved)
            idx = torch.randint(0, 512, (12 * run["micro"],), generator=g)
            opt.zero_grad()
            for part in idx.chunk(run["micro"]):
                loss = ((model(x_all[part]) - y_all[part]) ** 2).mean() / 2 / run["micro"]
                loss.backward()
            tr.step()
            opt.step()
        history += tr.history
        e = tr.estimate()
        tr.remove()
    return history, (e.b_simple, e.low, e.high)


def _same(x, y):
    if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
        return True
    return x == y or abs(x - y) <= 1e-9 * max(abs(x), abs(y))


def check_resume(seed, run):
    """``resume``: the resumed run's records and estimate equal the uninterrupted run's (1e-9
    relative: the same float64 arithmetic on the same statistics, only the JSON round trip of
    the state between), and both runs' combined g2 and tr Σ equal the rule's weights redone by
    hand (:func:`rule_weights`) applied to the records' own sources (1e-7 of S_B: float64
    round-off through the EMA's sums and a 2×2 solve, relative to the sources' own estimates).
    ``WRONG`` where either differs."""
    import torch

    torch.set_num_threads(1)
    base, e_base = _resume_run(seed, run, None)
    res, e_res = _resume_run(seed, run, run["resume_at"])
    keys = ("step", "g2", "trace_sigma", "b_simple", "b_simple_low", "b_simple_high")
    if len(base) != len(res):
        return {"cls": "WRONG", "why": f"{len(res)} records resumed, {len(base)} not"}
    diffs = []
    for a, b in zip(base, res, strict=True):
        for key in keys:
            x, y = a[key], b[key]
            if not _same(x, y):
                diffs.append((a["step"], key, x, y))
    for x, y in zip(e_base, e_res, strict=True):
        if not _same(x, y):
            diffs.append(("estimate", x, y))
    off = []
    recs = [r for r in res if not r.get("skipped")]
    two = [r for r in recs if len(_own(r)) == 2 and len(r["sources"]) == 2]
    if len(two) != len(recs):
        return {"cls": "skip", "why": "a step without both sources", "diffs": diffs[:3]}
    weights = rule_weights(res, run["beta"])
    for rec, w in zip(res, weights, strict=True):
        if w is None:
            continue
        g, t = _read_back(rec, w)
        scale = np.abs(_own(rec)).max(axis=0)  # (float64 round-off of the sources' own)
        if abs(g - rec["g2"]) > 1e-7 * scale[0] or abs(t - rec["trace_sigma"]) > 1e-7 * scale[1]:
            off.append((rec["step"], rec["g2"], g, rec["trace_sigma"], t))
    cls = "WRONG" if diffs or off else "ok"
    return {
        "cls": cls,
        "records": len(res),
        "resumed_differs": diffs[:4],
        "rule_differs": off[:4],
        "estimate": e_res,
    }


def _local_data(seed, run):
    """The data set (x with a 1 appended, y) and the fixed linear model's weights."""
    rng = np.random.default_rng(seed)
    n = run["n_data"]
    x = np.concatenate([rng.standard_normal((n, 4)), np.ones((n, 1))], axis=1)
    resid = rng.standard_t(3, n) if run["t_noise"] else rng.standard_normal(n)
    y = x @ np.array([0.5, -1.0, 0.3, 0.0, 0.2]) + run["noise"] * resid
    w = np.array([0.3, -0.6, 0.1, 0.2, 0.0])  # not the least-squares fit: |G|² > 0
    return x, y, w


def _local_worker(rank, world, port, jobs, out_dir):
    """Rank ``rank``'s runs of ``jobs`` ((seed, run) pairs, one after the other in one process
    group: a process start — torch's import, ≈ 5 s of a seed's ≈ 12 s — paid once for them)."""
    import json
    from datetime import timedelta
    from pathlib import Path

    import torch

    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=timedelta(seconds=60),
    )  # fmt: skip
    for seed, run in jobs:
        history = _local_run(rank, world, seed, run)
        Path(out_dir, f"{seed}-{rank}.json").write_text(json.dumps(history, default=str))
    torch.distributed.destroy_process_group()


def _local_run(rank, world, seed, run):
    import torch

    import noisescale

    x, y, w = _local_data(seed, run)
    xt, yt = torch.tensor(x[:, :4]), torch.tensor(y)
    model = torch.nn.Linear(4, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor(w[:4])[None])
        model.bias.fill_(float(w[4]))
    g = torch.Generator().manual_seed(seed * 7919 + rank)
    b = run["sizes"][rank]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tracker = noisescale.GradientNoiseTracker(
            model, per_example_fraction=1.0, microbatch=False, beta=run["beta"],
            process_group=torch.distributed.group.WORLD, sync_every=10,
        )  # fmt: skip
        for _ in range(run["steps"]):
            idx = torch.randint(0, len(y), (b,), generator=g)
            model.zero_grad()
            loss = ((model(xt[idx])[:, 0] - yt[idx]) ** 2).mean() / 2
            loss.backward()
            for p in model.parameters():  # averaged by hand: the processes' mean gradient
                torch.distributed.all_reduce(p.grad)
                p.grad /= world
            tracker.step()  # (the parameters stay: the truth is the data set's, every step)
        history = tracker.history
        tracker.remove()
    return history


#: histories run ahead by :func:`prelaunch_local` (seed → its run and one history per process),
#: taken by check_local where the run is the same
_PRELAUNCHED = {}
_LAUNCHED = set()  # (once each: a seed taken is not run ahead again)


def prelaunch_local(seeds):
    """Run the ``local`` seeds among ``seeds`` in one launch of their processes (the test
    suite's found seeds: one process start for all) for :func:`check_local` to take."""
    jobs = [(s, draw_config(s)["run"]) for s in seeds if draw_config(s).get("scenario") == "local"]
    jobs = [(s, r) for s, r in jobs if s not in _LAUNCHED]
    if len({len(r["sizes"]) for _, r in jobs}) == 1:  # (one world size: one process group)
        out = _launch_local(jobs, timeout_s=120 * len(jobs))
        _PRELAUNCHED.update({s: (r, out[s]) for s, r in jobs})
        _LAUNCHED.update(s for s, _ in jobs)


def _launch_local(jobs, timeout_s=120):
    """The processes' histories of each (seed, run) in ``jobs``: {seed: [rank 0's, …]}."""
    import json
    import multiprocessing
    import socket
    import tempfile
    from pathlib import Path

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    world = len(jobs[0][1]["sizes"])
    with tempfile.TemporaryDirectory() as tmp:
        ctx = multiprocessing.get_context("spawn")
        procs = [
            ctx.Process(target=_local_worker, args=(r, world, port, jobs, tmp))
            for r in range(world)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout_s)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        out = {}
        for seed, _ in jobs:
            out[seed] = []
            for r in range(world):
                path = Path(tmp, f"{seed}-{r}.json")
                if not path.exists():
                    raise RuntimeError(f"seed {seed}: process {r} left no history (hung or died)")
                out[seed].append(json.loads(path.read_text()))
    return out


def local_oracle(seed, run, draws=40_000):
    """The truth by brute force: the data set's |G|² and tr Σ (examples drawn with replacement:
    G the mean of the per-example gradients g_i = (w·x_i − y_i)·x_i, Σ their population
    covariance), and by Monte Carlo over ``draws`` steps drawn here as the processes draw them,
    the sources' (per-example, local) estimates' covariance C by eq. A.2 from sums (W small
    batches of sizes b_r, H = Σ 1/b_r: g2 = (B·H·S_B − ΣS_r)/(B·H − W), tr = B·W·(ΣS_r/W −
    S_B)/(B·H − W)), the big batch the processes' mean gradient (example i of process r weighs
    c_i = 1/(W·b_r): B = (Σc)²/Σc²). Returns the truth, B, and per quantity C, the optimal
    weights, their variance and equal weights' (sources in name order: local, per_example)."""
    x, y, w = _local_data(seed, run)
    grads = (x @ w - y)[:, None] * x
    gbar = grads.mean(axis=0)
    g2_true = float(gbar @ gbar)
    tr_true = float(np.mean(np.sum((grads - gbar) ** 2, axis=1)))
    sizes = run["sizes"]
    world = len(sizes)
    b_big = world**2 / sum(1 / b for b in sizes)
    rng = np.random.default_rng(seed + 1)
    local_means = [grads[rng.integers(0, len(y), (draws, b))] for b in sizes]
    per_ex_sq = sum(np.sum(m**2, axis=(1, 2)) for m in local_means)  # Σ|g_i|²
    means = [m.mean(axis=1) for m in local_means]
    big = sum(means) / world
    s_big = np.sum(big**2, axis=1)

    def a2(count, h, sq_sum):
        g = (b_big * h * s_big - sq_sum) / (b_big * h - count)
        t = b_big * count * (sq_sum / count - s_big) / (b_big * h - count)
        return g, t

    n_ex = sum(sizes)
    local = a2(world, sum(1 / b for b in sizes), sum(np.sum(m**2, axis=1) for m in means))
    per_ex = a2(n_ex, float(n_ex), per_ex_sq)
    out = {"g2": g2_true, "tr": tr_true, "b_big": b_big}
    for q, name in ((0, "g2_c"), (1, "tr_c")):
        est_ = np.stack([local[q], per_ex[q]], axis=1)
        c = np.cov(est_.T)
        inv1 = np.linalg.solve(c, np.ones(2))
        out[name] = {
            "c": c,
            "mean": est_.mean(axis=0),
            "w_opt": inv1 / inv1.sum(),
            "var_opt": float(1 / inv1.sum()),
            "var_equal": float(c.sum() / 4),
        }
    return out


def check_local(seed, run):
    """``local``: the two processes' histories equal; B the oracle's; the combined g2 and tr Σ
    unbiased (the steps' errors over the level, a z-test over the steps: the weights come from
    earlier steps, so each step's error has mean 0 given the past; |z| ≤ 4.5); the weights of
    the last steps, read back from the records (w = (x̂ − x₂)/(x₁ − x₂)), have a variance
    wᵀCw within 1 + 3(K−1)/(n−K) + 0.15 of the optimum's (n the EMA's effective steps; the
    Monte Carlo C's own error at 40,000 draws is ≈ √(2/40000) < 1%) and ≤ 1.5× equal
    weights'. The oracle's C is checked too: the Monte Carlo means of the sources' estimates
    equal the truth within 5 standard errors (else ``oracle?``)."""
    ahead = _PRELAUNCHED.pop(seed, None)
    histories = ahead[1] if ahead and ahead[0] == run else _launch_local([(seed, run)])[seed]
    if any(len(h) != len(histories[0]) for h in histories):
        return {"cls": "WRONG", "why": "the processes' histories differ in length"}
    for a, b in zip(*histories[:2], strict=True):
        if not (_same(a["g2"], b["g2"]) and _same(a["b_simple"], b["b_simple"])):
            return {"cls": "WRONG", "why": f"processes differ at step {a.get('step')}"}
    orc = local_oracle(seed, run)
    for q, name in (("g2", "g2_c"), ("tr", "tr_c")):
        se = np.sqrt(np.diag(orc[name]["c"]) / 40_000)
        if np.any(np.abs(orc[name]["mean"] - orc[q]) > 5 * se):
            return {"cls": "oracle?", "q": q, "mean": orc[name]["mean"].tolist(), "truth": orc[q]}
    recs = [r for r in histories[0] if not r.get("skipped")]
    level = orc["g2"] + orc["tr"] / orc["b_big"]
    res = {"cls": "ok", "steps": len(recs), "b_big": recs[0]["b_big"]}
    if abs(recs[0]["b_big"] - orc["b_big"]) > 1e-9 * orc["b_big"]:
        res |= {"cls": "WRONG", "why": f"b_big {recs[0]['b_big']} vs {orc['b_big']}"}
    for q, key in (("g2", "g2"), ("tr", "trace_sigma")):
        e = np.array([r[key] for r in recs]) - orc[q]
        e = e / level
        z = float(e.mean() / (e.std(ddof=1) / math.sqrt(len(e))))
        res[f"z_{q}"] = round(z, 2)
        if abs(z) > Z_BIAS:
            res["cls"] = "WRONG"
    n_src = {len(r["sources"]) for r in recs}
    if n_src != {2}:
        return res | {"cls": "skip", "why": f"sources per step {sorted(n_src)}"}
    b = run["beta"]
    t = len(recs) - 1
    n = t if b == 1 else ((1 - b**t) / (1 - b)) ** 2 / ((1 - b ** (2 * t)) / (1 - b**2))
    bound = 1 + 3 * 1 / max(n - 2, 1) + 0.15
    for q, name, key in (("g2", "g2_c", "g2"), ("tr", "tr_c", "trace_sigma")):
        ws = []
        for r in recs[-10:]:
            own = _own(r)[:, 0 if q == "g2" else 1]
            if abs(own[0] - own[1]) > 1e-9 * np.abs(own).max():
                ws.append((r[key] - own[1]) / (own[0] - own[1]))
        w = np.array([np.median(ws), 1 - np.median(ws)])
        c = orc[name]["c"]
        v = float(w @ c @ w)
        r_opt, r_eq = v / orc[name]["var_opt"], v / orc[name]["var_equal"]
        res[f"w_{q}"] = [round(float(w[0]), 3), round(float(orc[name]["w_opt"][0]), 3)]
        res[f"vs_opt_{q}"], res[f"vs_equal_{q}"] = round(r_opt, 3), round(r_eq, 3)
        if (r_opt > bound or r_eq > VAR_FACTOR) and res["cls"] == "ok":
            res["cls"] = "WEAK"
    return res


if __name__ == "__main__":
    raise SystemExit(main())
