"""Adaptive batch size B = √(r·B_simple) (paper eq. D.6) against fixed batch sizes, on real data.

A CPU-scale version of the paper's App. D.2 SVHN case study, on the UCI handwritten digits
(1,797 real 8×8 images, ``sklearn.datasets.load_digits``), a 64-64-10 tanh MLP, plain SGD,
the same initial weights for every run:

1. Fixed batch sizes 4 … 256. The learning rate of each is tuned on two seeds (the fewest mean
   steps to the goal, a training-set cross-entropy); the tuned setting is then run again on
   four fresh seeds, so that the front is not flattered by picking the luckiest of many noisy
   runs. The fresh-seed means form the Pareto front of steps S and examples E, fitted with eq.
   2.11 (S_min, E_min, B_crit = E_min/S_min).
2. The tuned learning rates fitted with ε(B) = ε*/(1 + B*/B) (eq. A.3, α = 1): the paper used
   one such relation for its fixed and adaptive runs alike (App. D.2, footnote 20).
3. One run at the batch size nearest B_crit with the tracker on: its B_simple trajectory gives
   γ (eq. D.5) and the theory's adaptive front S/S_min − 1 = γ/(E/E_min − 1) (eq. D.4).
4. Adaptive runs on the same four fresh seeds: ``AdaptiveBatchSize`` for several exchange
   rates r, starting at 4 examples, the batch realised by a ``ResizableBatchSampler`` and the
   learning rate by the ``"paper"`` rule with the fitted B*.

Writes ``results.json`` (settings, fits, γ, every comparison), ``runs.csv`` (one row per run)
and ``adaptive.png`` next to this file. About three minutes on two CPU cores::

    .venv/bin/python experiments/adaptive/run.py
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from noisescale import GradientNoiseTracker, theory
from noisescale.schedule import AdaptiveBatchSize, ResizableBatchSampler
from noisescale.sweep.pareto import ParetoFit, b_simple_average, fit_pareto

HERE = Path(__file__).resolve().parent
GOALS = (0.1, 0.03)  # training-set cross-entropy (nats); the last is the main goal
GOAL = GOALS[-1]
FIXED_BATCHES = (4, 8, 16, 32, 64, 128, 256)
LRS = (0.2, 0.28, 0.4, 0.57, 0.8, 1.13)  # √2 steps; 1.6 diverges at every batch size
TUNE_SEEDS = (0, 1)
EVAL_SEEDS = (10, 11, 12, 13)
EXCHANGE_RATES = (1.0, 4.0, 16.0, 64.0)
MICRO = 4  # the adaptive batch is a multiple of this, and starts there
MAX_BATCH = 512
# The controller: a decision every 10 steps, a change only beyond a factor 1.25, and only when
# the 95% interval of B_simple is at most twice as wide as B_simple — B ∝ √B_simple halves the
# relative error, so B itself is then known to about ±50%. (At B = 4 the interval rarely gets
# narrower than B_simple, and a stricter gate keeps the batch at 4 for most of the run.) The
# tracker's EMA (β = 0.98, about 100 steps) is short because a whole run takes hundreds of steps.
INTERVAL, HYSTERESIS, MAX_REL_WIDTH, BETA = 10, 1.25, 2.0, 0.98
STEP_CAP = 20_000

torch.set_num_threads(1)
_digits = load_digits()
X = torch.tensor(_digits.data / 16.0, dtype=torch.float32)
Y = torch.tensor(_digits.target)
N = len(X)


def make_model() -> nn.Module:
    torch.manual_seed(0)  # every run starts from the same weights
    return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))


def full_loss(model: nn.Module) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(X), Y))


def train(
    batch_size: int,
    lr: float,
    seed: int,
    *,
    cap: int = STEP_CAP,
    exchange_rate: float | None = None,
    b_star: float | None = None,
    track: bool = False,
) -> dict[str, Any]:
    """Train until the main goal (or ``cap`` steps, or divergence): steps and examples per goal.

    Batches come from a :class:`ResizableBatchSampler` over a seeded random order (an epoch sees
    every example once; its short last batch is dropped). With ``exchange_rate`` an
    :class:`AdaptiveBatchSize` resizes the sampler and writes the learning rate, starting at
    ``batch_size`` where ``lr`` is ε(B) of the fitted rule. The training-set loss is evaluated
    every 8 steps, and every step once within 2× of a goal not yet reached, so crossings are
    exact.
    """
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    tracker = GradientNoiseTracker(model, beta=BETA, sync_every=64) if track else None
    order = torch.utils.data.RandomSampler(range(N), generator=torch.Generator().manual_seed(seed))
    sampler = ResizableBatchSampler(order, batch_size, drop_last=True)
    schedule = None
    if exchange_rate is not None:
        schedule = AdaptiveBatchSize(
            micro_batch_size=MICRO,
            max_batch_size=MAX_BATCH,
            batch_size=batch_size,
            exchange_rate=exchange_rate,
            interval=INTERVAL,
            hysteresis=HYSTERESIS,
            max_relative_width=MAX_REL_WIDTH,
            lr_rule="paper",
            b_star=b_star,
            optimizer=opt,
            batch_sampler=sampler,
        )
    hits: dict[float, tuple[int, int]] = {}
    batches: list[int] = []
    step = examples = 0
    loss_now = math.inf
    diverged = False
    while GOAL not in hits and step < cap and not diverged:
        for idx in sampler:  # one epoch; the batch size may change inside it
            step += 1
            examples += len(idx)
            batches.append(len(idx))
            loss = F.cross_entropy(model(X[idx]), Y[idx])
            loss.backward()
            if tracker is not None:
                tracker.step(loss=loss)
            opt.step()
            opt.zero_grad()
            if schedule is not None:
                schedule.step(tracker, examples=len(idx))
            if step % 8 == 0 or loss_now < 2 * min(g for g in GOALS if g not in hits):
                loss_now = full_loss(model)
                diverged = not math.isfinite(loss_now) or loss_now > 10
                for goal in GOALS:
                    if loss_now <= goal and goal not in hits:
                        hits[goal] = (step, examples)
            if GOAL in hits or step >= cap or diverged:
                break
    out: dict[str, Any] = {"hits": hits, "batches": batches, "diverged": diverged}
    if tracker is not None:
        tracker.sync()
        out["b_simple"] = [h["b_simple"] for h in tracker.history]
        tracker.remove()
    return out


def mean_hits(results: list[dict[str, Any]]) -> dict[float, dict[str, float]] | None:
    """Mean steps and examples to each goal with standard errors; ``None`` if a run missed."""
    if any(GOAL not in r["hits"] for r in results):
        return None
    out = {}
    for goal in GOALS:
        s = np.array([r["hits"][goal][0] for r in results], dtype=float)
        e = np.array([r["hits"][goal][1] for r in results], dtype=float)
        se = math.sqrt(len(s))
        out[goal] = {
            "steps": float(s.mean()),
            "steps_stderr": float(s.std(ddof=1) / se),
            "examples": float(e.mean()),
            "examples_stderr": float(e.std(ddof=1) / se),
        }
    return out


def row(kind: str, b: int, lr: float, seed: int, r: float | None, res: dict) -> dict:
    out: dict[str, Any] = {
        "kind": kind,
        "batch_size": b,
        "lr": lr,
        "seed": seed,
        "exchange_rate": r,
        "diverged": res["diverged"],
    }
    for goal in GOALS:
        s, e = res["hits"].get(goal, (None, None))
        out[f"steps_to_{goal}"] = s
        out[f"examples_to_{goal}"] = e
    return out


def tune_fixed(rows: list[dict]) -> dict[int, float]:
    """Per batch size, the learning rate with the fewest mean steps to the goal (tuning seeds)."""
    best: dict[int, tuple[float, float]] = {}
    for b in FIXED_BATCHES:
        for lr in LRS:
            # a learning rate that needs 1.5× the best mean so far cannot beat it
            cap = STEP_CAP if b not in best else int(1.5 * best[b][1]) + 8
            runs = [train(b, lr, seed, cap=cap) for seed in TUNE_SEEDS]
            rows.extend(
                row("tune", b, lr, seed, None, r) for seed, r in zip(TUNE_SEEDS, runs, strict=True)
            )
            m = mean_hits(runs)
            if m is not None and (b not in best or m[GOAL]["steps"] < best[b][1]):
                best[b] = (lr, m[GOAL]["steps"])
    return {b: lr for b, (lr, _) in best.items()}


def fit_lr_rule(tuned: dict[int, float]) -> tuple[float, float]:
    """Least squares in log space for ε(B) = ε*/(1 + B*/B) (eq. A.3, α = 1)."""
    b = np.array(sorted(tuned), dtype=float)
    log_lr = np.log([tuned[int(x)] for x in b])
    grid = np.exp(np.linspace(math.log(0.1), math.log(1e4), 2001))
    log_star = [log_lr + np.log1p(g / b) for g in grid]  # log ε* implied by each point
    sse = [float(np.sum((v - v.mean()) ** 2)) for v in log_star]
    k = int(np.argmin(sse))
    return float(math.exp(log_star[k].mean())), float(grid[k])


def gamma_from_run(batch_size: int, b_simple: list[float], steps: int) -> dict[str, float]:
    """γ (eq. D.5) from B_simple measured along a fixed-batch run up to its goal step."""
    t = np.arange(1, steps + 1, dtype=float)
    noise = np.array(b_simple[:steps], dtype=float)
    keep = np.isfinite(noise) & (noise > 0)
    t, noise = t[keep], noise[keep]
    # eq. D.1 step by step (the trapezoid rule in s biases γ where B_simple changes between steps;
    # on results.json's trajectory the two agree to 2e-5)
    integrals = theory.run_integrals(t, np.full_like(t, batch_size), noise)
    return {
        "gamma": theory.adaptive_gamma(integrals),
        # B_simple averaged over full-batch steps as B_crit averages B_noise (App. D.1)
        "b_simple_average": b_simple_average(t, noise, batch_size),
        "b_simple_start": float(np.median(noise[: max(1, len(noise) // 10)])),
        "b_simple_end": float(np.median(noise[-max(1, len(noise) // 10) :])),
        "steps_measured": len(noise),
    }


def measured_front_steps(examples: float, front: dict[int, dict], goal: str) -> float | None:
    """Steps of the measured fixed-batch front at ``examples``: log-log interpolation between its
    non-dominated points; ``None`` outside their range of examples."""
    pts = sorted((v[goal]["examples"], v[goal]["steps"]) for v in front.values())
    keep = [p for p in pts if not any(q[0] <= p[0] and q[1] < p[1] for q in pts)]
    for (e0, s0), (e1, s1) in itertools.pairwise(keep):
        if e0 <= examples <= e1:
            t = math.log(examples / e0) / math.log(e1 / e0)
            return math.exp(math.log(s0) + t * math.log(s1 / s0))
    return None


def compare(
    point: dict[str, float], fit: ParetoFit, front: dict[int, dict], goal: str, gamma: float
) -> dict[str, float | None]:
    """An adaptive (S, E) against a fixed-batch front at the same E: the measured points, the
    eq. 2.11 fit, and the fit's γ front (eq. D.4), the theory's prediction."""
    e_over = point["examples"] / fit.e_min
    s_fit = fit.s_min * float(theory.pareto_steps_over_min(e_over, 1.0))
    s_theory = fit.s_min * float(theory.pareto_steps_over_min(e_over, gamma))
    s_measured = measured_front_steps(point["examples"], front, goal)
    return {
        "measured_front_steps": s_measured,
        "steps_saved_vs_measured": None if s_measured is None else 1 - point["steps"] / s_measured,
        "fit_front_steps": s_fit,
        "steps_saved_vs_fit": 1.0 - point["steps"] / s_fit,
        "steps_saved_stderr": point["steps_stderr"] / s_fit,
        "theory_steps_saved_vs_fit": 1.0 - s_theory / s_fit,
    }


def fixed_front(lrs: dict[int, float], rows: list[dict], kind: str) -> dict[int, dict]:
    """Each batch size at its learning rate on the evaluation seeds: mean S and E per goal."""
    front: dict[int, dict] = {}
    for b, lr in lrs.items():
        runs = [train(b, lr, seed) for seed in EVAL_SEEDS]
        rows.extend(
            row(kind, b, lr, seed, None, r) for seed, r in zip(EVAL_SEEDS, runs, strict=True)
        )
        m = mean_hits(runs)
        if m is not None:
            front[b] = {"lr": lr, **{str(g): v for g, v in m.items()}}
            print(
                f"  B={b:4d} lr {lr:5.3f}: "
                f"S {m[GOAL]['steps']:6.0f} ± {m[GOAL]['steps_stderr']:.0f}"
            )
    return front


def fit_front(front: dict[int, dict]) -> dict[float, ParetoFit]:
    fits = {}
    for goal in GOALS:
        bs = sorted(front)
        fits[goal] = f = fit_pareto(
            [front[b][str(goal)]["steps"] for b in bs],
            [front[b][str(goal)]["examples"] for b in bs],
        )
        print(
            f"  goal {goal}: S_min {f.s_min:.0f}, E_min {f.e_min:.0f}, "
            f"B_crit {f.b_crit:.1f} ± {f.b_crit_stderr:.1f}"
        )
    return fits


def main() -> None:
    t0 = time.time()
    rows: list[dict] = []
    print("1. fixed batch sizes: tune the learning rate, then evaluate on fresh seeds")
    tuned = tune_fixed(rows)
    fronts = {"tuned_lr": fixed_front(tuned, rows, "fixed_tuned")}
    fits = {"tuned_lr": fit_front(fronts["tuned_lr"])}
    lr_star, b_star = fit_lr_rule(tuned)
    print(f"2. ε(B) = {lr_star:.3f}/(1 + {b_star:.2f}/B); fixed batch sizes at ε(B)")
    rule_lrs = {b: float(theory.lr_central(b, lr_star, b_star)) for b in FIXED_BATCHES}
    fronts["rule_lr"] = fixed_front(rule_lrs, rows, "fixed_rule")
    fits["rule_lr"] = fit_front(fronts["rule_lr"])

    fit = fits["tuned_lr"][GOAL]
    b_ref = min(fronts["tuned_lr"], key=lambda b: abs(math.log(b / fit.b_crit)))
    ref = train(b_ref, tuned[b_ref], EVAL_SEEDS[0], track=True)
    gammas = {
        str(goal): gamma_from_run(b_ref, ref["b_simple"], ref["hits"][goal][0]) for goal in GOALS
    }
    g = gammas[str(GOAL)]
    print(
        f"3. B_simple at B={b_ref}: {g['b_simple_start']:.0f} → {g['b_simple_end']:.0f}, "
        f"D.1 average {g['b_simple_average']:.0f}; γ = {g['gamma']:.3f} (goal {GOAL}), "
        f"{gammas[str(GOALS[0])]['gamma']:.3f} (goal {GOALS[0]})"
    )

    print("4. adaptive batch size B = √(r·B_simple), lr by the ε(B) rule, fresh seeds")
    adaptive = []
    start_lr = float(theory.lr_central(MICRO, lr_star, b_star))
    for r in EXCHANGE_RATES:
        runs = [
            train(MICRO, start_lr, seed, exchange_rate=r, b_star=b_star, track=True)
            for seed in EVAL_SEEDS
        ]
        rows.extend(
            row("adaptive", MICRO, start_lr, seed, r, x)
            for seed, x in zip(EVAL_SEEDS, runs, strict=True)
        )
        m = mean_hits(runs)
        if m is None:
            print(f"  r={r:g}: a seed did not reach the goal")
            continue
        trace = runs[0]["batches"][: runs[0]["hits"][GOAL][0]]
        entry: dict[str, Any] = {"exchange_rate": r, "batch_trace_first_seed": trace}
        for goal in GOALS:
            gm = gammas[str(goal)]["gamma"]
            entry[str(goal)] = {
                **m[goal],
                "vs": {
                    name: compare(m[goal], fits[name][goal], fronts[name], str(goal), gm)
                    for name in fronts
                },
            }
        adaptive.append(entry)
        c = entry[str(GOAL)]
        parts = []
        for name in fronts:
            v = c["vs"][name]
            measured = v["steps_saved_vs_measured"]
            parts.append(
                f"{name}: measured {'—' if measured is None else f'{100 * measured:+.0f}%'}, "
                f"fit {100 * v['steps_saved_vs_fit']:+.0f}% (theory "
                f"{100 * v['theory_steps_saved_vs_fit']:+.0f}%)"
            )
        print(
            f"  r={r:5g}: S {c['steps']:5.0f} ± {c['steps_stderr']:3.0f}, E {c['examples']:6.0f}, "
            f"batch {trace[0]}→{trace[-1]}; steps saved vs {'; '.join(parts)}"
        )

    results = {
        "dataset": "UCI digits (sklearn load_digits): 1797 images, 64 features, 10 classes",
        "model": "Linear(64,64)-Tanh-Linear(64,10), plain SGD, identical initial weights",
        "goals": list(GOALS),
        "main_goal": GOAL,
        "tune_seeds": list(TUNE_SEEDS),
        "eval_seeds": list(EVAL_SEEDS),
        "lrs": list(LRS),
        "controller": {
            "micro_batch_size": MICRO,
            "max_batch_size": MAX_BATCH,
            "interval": INTERVAL,
            "hysteresis": HYSTERESIS,
            "max_relative_width": MAX_REL_WIDTH,
            "tracker_beta": BETA,
            "lr_rule": "paper",
        },
        "fixed": {name: {str(b): v for b, v in sorted(f.items())} for name, f in fronts.items()},
        "pareto_fits": {
            name: {
                str(goal): {
                    "s_min": f.s_min,
                    "e_min": f.e_min,
                    "b_crit": f.b_crit,
                    "b_crit_stderr": f.b_crit_stderr,
                    "residual_std": f.residual_std,
                }
                for goal, f in per_goal.items()
            }
            for name, per_goal in fits.items()
        },
        "lr_fit": {"lr_star": lr_star, "b_star": b_star, "alpha": 1.0},
        "reference_run": {"batch_size": b_ref, "lr": tuned[b_ref], "gamma": gammas},
        "b_simple_trajectory": ref["b_simple"][: ref["hits"][GOAL][0]],
        "adaptive": adaptive,
        "seconds": round(time.time() - t0, 1),
    }
    (HERE / "results.json").write_text(json.dumps(_finite(results), indent=1) + "\n")
    with (HERE / "runs.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(results, fits["tuned_lr"][GOAL], g["gamma"])
    print(f"done in {time.time() - t0:.0f} s")


def plot(results: dict[str, Any], fit: ParetoFit, gamma: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    goal = str(results["main_goal"])
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    styles = {
        "tuned_lr": ("o", "k", "fixed B, lr tuned per B"),
        "rule_lr": ("s", "0.55", "fixed B, lr = ε(B) rule"),
    }
    for name, front in results["fixed"].items():
        marker, color, label = styles[name]
        e = [v[goal]["examples"] for v in front.values()]
        s = [v[goal]["steps"] for v in front.values()]
        ax.errorbar(
            e,
            s,
            yerr=[v[goal]["steps_stderr"] for v in front.values()],
            fmt=marker,
            color=color,
            ms=5,
            zorder=3,
            label=f"{label} (4 seeds)",
        )
        if name == "tuned_lr":
            for b, si, ei in zip(front, s, e, strict=True):
                ax.annotate(
                    f"B={b}", (ei, si), textcoords="offset points", xytext=(4, 4), fontsize=7
                )
    e_max = max(v[goal]["examples"] for f in results["fixed"].values() for v in f.values())
    ee = np.geomspace(fit.e_min * 1.03, e_max * 1.5, 200)
    for g, style, label in (
        (1.0, "-", "eq. 2.11 fit to tuned front (γ = 1)"),
        (gamma, "--", f"eq. D.4 prediction, γ = {gamma:.2f}"),
    ):
        ax.plot(
            ee,
            fit.s_min * theory.pareto_steps_over_min(ee / fit.e_min, g),
            style,
            color="C0",
            lw=1,
            label=label,
        )
    a = results["adaptive"]
    ax.errorbar(
        [x[goal]["examples"] for x in a],
        [x[goal]["steps"] for x in a],
        yerr=[x[goal]["steps_stderr"] for x in a],
        fmt="D",
        color="C3",
        zorder=4,
        label="adaptive B = √(r·B_simple), lr = ε(B) rule",
    )
    for x in a:
        ax.annotate(
            f"r={x['exchange_rate']:g}",
            (x[goal]["examples"], x[goal]["steps"]),
            textcoords="offset points",
            xytext=(4, -11),
            fontsize=7,
            color="C3",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("examples to goal E")
    ax.set_ylabel("optimizer steps to goal S")
    ax.set_title(f"UCI digits MLP, SGD: training loss ≤ {goal}")
    ax.legend(fontsize=7)
    ref = results["reference_run"]
    ax2.plot(
        results["b_simple_trajectory"],
        color="k",
        lw=0.8,
        label=f"B_simple measured at fixed B={ref['batch_size']}",
    )
    for x in a:
        ax2.plot(
            x["batch_trace_first_seed"], lw=1.2, label=f"adaptive batch, r={x['exchange_rate']:g}"
        )
    ax2.set_yscale("log")
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel("examples")
    ax2.set_title("B_simple and the adaptive batch sizes (first seed)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(HERE / "adaptive.png", dpi=110)
    plt.close(fig)


def _finite(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


if __name__ == "__main__":
    main()
