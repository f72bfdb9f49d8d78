"""Beyond B_simple on a real model: B_noise (eq. 2.8), its line-search check, Adam-preconditioned
and per-layer noise scales, on an MLP trained on the UCI digits (CPU, one to three minutes).

Batches are drawn *with replacement* from 1,000 training digits, so the training set is the
data distribution exactly: its full loss is L(θ), its per-example gradients give the exact |G|²,
tr Σ, GᵀHG and tr(HΣ) (torch.func, full-data Hessian-vector products), and the line searches
evaluate the exact loss. Every estimator is then checked against exact values on a real network.

Two runs of the same model from the same initialisation:
  * SGD: GradientNoiseTracker (per-layer groups), BNoiseTracker (HVPs every 20 steps), exact
    values and the paper's line-search fit (eq. 2.7) at checkpoints;
  * Adam: B_simple of the raw and of the preconditioned gradient (exact values at checkpoints,
    with P from the optimizer's state), and B_noise.
Then the cost of one B_noise measurement against a training step, for the MLP and a small CNN.

    .venv/bin/python experiments/beyond/run.py            # writes results.json and the figure
"""

from __future__ import annotations

import copy
import json
import time
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

import noisescale
from noisescale.hessian import BNoiseTracker, measure_b_noise, measure_delta_l_opt
from noisescale.tracker import preconditioner_weights

HERE = Path(__file__).resolve().parent
HIDDEN = 64
STEPS = 1500
BATCH = 32
EVERY = 10  # steps between B_noise measurements
PART = 128  # examples per gradient part and in the Hessian batch of a measurement
PROBES = 60  # measurements at a frozen θ per checkpoint
PROBE_BATCH = 256  # examples per frozen-θ measurement: late on B_simple ≈ 800 needs B ≫ 32
CHECKPOINTS = (0, 300, 1500)
LINE_SEARCH_SIZES = (8, 16, 32, 64, 128, 256, 512, 1024)


def load_digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return x[:1000], y[:1000], x[1000:], y[1000:]


def mlp(seed: int | None = 0) -> nn.Module:
    """64 → 64 → 64 → 10 with tanh: 9k parameters, small enough for an exact full-data Hessian."""
    if seed is not None:
        torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, HIDDEN),
        nn.Tanh(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.Tanh(),
        nn.Linear(HIDDEN, 10),
    )


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    dtype = next(model.parameters()).dtype
    return F.cross_entropy(model(batch[0].to(dtype)), batch[1])


class Sampler:
    """Batches of training digits drawn with replacement (i.i.d. from the data distribution)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, seed: int) -> None:
        self.x, self.y = x, y
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(self.y), (b,), generator=self.gen)
        return self.x[idx], self.y[idx]


def exact_noise_scales(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, float]:
    """|G|², tr Σ, GᵀHG, tr(HΣ) of the training set's distribution, exactly, in float64.

    With an Adam ``optimizer``, also the preconditioned B_simple = tr(PΣP)/|PG|² with P from its
    state (the P the tracker uses at this step).
    """
    x = x.double()
    params = {k: v.detach().double() for k, v in model.named_parameters()}
    names = list(params)
    sizes = [params[k].numel() for k in names]

    def unflatten(v: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: c.reshape(params[k].shape) for k, c in zip(names, v.split(sizes), strict=True)}

    def one(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    per_ex = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    flat = torch.cat([per_ex[k].reshape(len(y), -1) for k in names], 1)  # [n, P]
    g = flat.mean(0)
    full_grad = grad(lambda p: F.cross_entropy(functional_call(model, p, (x,)), y))

    def hvp(v: torch.Tensor) -> torch.Tensor:
        out = jvp(full_grad, (params,), (unflatten(v),))[1]
        return torch.cat([out[k].reshape(-1) for k in names])

    g2 = float(g @ g)
    out = {"g2": g2, "trace_sigma": float(flat.pow(2).sum(1).mean()) - g2}
    out["b_simple"] = out["trace_sigma"] / out["g2"]
    out["ghg"] = float(g @ hvp(g))
    quad = torch.cat([(c * vmap(hvp)(c)).sum(1) for c in flat.split(100)])
    out["trace_h_sigma"] = float(quad.mean()) - out["ghg"]
    out["b_noise"] = out["trace_h_sigma"] / out["ghg"]
    weights = None
    if isinstance(optimizer, torch.optim.Adam):
        weights = preconditioner_weights(optimizer, model.parameters())
    if weights is not None:
        w2 = torch.cat([weights[id(p)].reshape(-1).double() for p in model.parameters()])
        pg2 = float((w2 * g * g).sum())
        out["b_simple_preconditioned"] = (float((w2 * flat**2).sum(1).mean()) - pg2) / pg2
    return out


def line_search_check(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int) -> dict:
    """The paper's method (sec. 2.2): ΔL_opt(B) by line searches on the exact loss, eq. 2.7 fit.

    On a float64 copy: at B = 1 late in training the best step is ~10⁻⁴ and its gain ~10⁻⁷ of the
    loss, below float32 resolution.
    """
    copy = mlp(seed=None).double()
    copy.load_state_dict(model.state_dict())
    curve = measure_delta_l_opt(
        copy,
        loss_fn,
        Sampler(x, y, seed),
        (x, y),
        LINE_SEARCH_SIZES,
        repeats=8,
        min_examples=1024,
        eps_range=(1e-9, 1e2),
        grid=34,
        rtol=0.05,
    )
    return {
        "batch_sizes": curve.batch_sizes.tolist(),
        "delta_l_opt": curve.delta_l_opt.tolist(),
        "eps_opt": curve.eps_opt.tolist(),
        "b_noise": curve.b_noise,
        "delta_l_max": curve.delta_l_max,
        "b_noise_eps": curve.b_noise_eps,
        "eps_max": curve.eps_max,
    }


def hold_adam(opt: torch.optim.Adam) -> None:
    """An optimizer step that leaves Adam's preconditioner as it is: its step count moves and v is
    rescaled by (1 − β₂^(t+1))/(1 − β₂^t), so that v̂ = v/(1 − β₂^t), and with it
    P = 1/(√v̂ + ε), stays exact. A tracker with ``precondition=`` leaves out the steps of an
    optimizer that has stopped stepping (since 2026-12-07 also before its first sync, which the
    frozen-θ probes and the timings here met: their Adam never stepped)."""
    for group in opt.param_groups:
        beta2 = group["betas"][1]
        for p in group["params"]:
            state = opt.state.get(p)
            if not state:
                continue
            t = float(state["step"])
            state["exp_avg_sq"].mul_((1 - beta2 ** (t + 1)) / (1 - beta2**t))
            state["step"] += 1


def probe(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, seed: int
) -> dict[str, Any]:
    """The estimators at a frozen θ (and frozen P): averages of PROBES unbiased measurements.

    Unlike the training curves (EMAs over a moving θ, which lag), these estimate exactly the
    quantities :func:`exact_noise_scales` computes, so the two must agree within the intervals.
    """
    sample = Sampler(x, y, seed)
    out: dict[str, Any] = {}
    trackers = {"b_simple": noisescale.GradientNoiseTracker(model, beta=1.0, sync_every=PROBES)}
    held = None  # a copy of the training Adam, stepped by hold_adam: P frozen, the count moving
    if isinstance(opt, torch.optim.Adam) and preconditioner_weights(opt, model.parameters()):
        held = torch.optim.Adam(model.parameters(), **opt.defaults)
        held.load_state_dict(copy.deepcopy(opt.state_dict()))  # (it would share the tensors)
        trackers["b_simple_preconditioned"] = noisescale.GradientNoiseTracker(
            model, precondition=held, precondition_from=1, beta=1.0, sync_every=PROBES
        )
    for _ in range(PROBES):
        loss_fn(model, sample(PROBE_BATCH)).backward()
        for t in trackers.values():
            t.step()
        if held is not None:
            hold_adam(held)
        model.zero_grad()
    for name, t in trackers.items():
        e = t.estimate()
        out[name] = {"value": e.b_simple, "low": e.low, "high": e.high}
        t.remove()
    bn = BNoiseTracker(model, loss_fn, beta=1.0)
    for _ in range(PROBES):
        bn.update(measure_b_noise(model, loss_fn, sample(3 * PROBE_BATCH // 2), splits=2))
    e = bn.estimate()
    out["b_noise"] = {"value": e.b_noise, "low": e.low, "high": e.high}
    return out


@contextmanager
def paused(trackers: dict[str, noisescale.GradientNoiseTracker]) -> Iterator[None]:
    with ExitStack() as stack:
        for t in trackers.values():
            stack.enter_context(t.paused())
        yield


def train(optimizer_name: str, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    model = mlp()
    if optimizer_name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.2)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    tracker = noisescale.GradientNoiseTracker(model, optimizer=opt, groups=True, sync_every=50)
    trackers = {"plain": tracker}
    if optimizer_name == "adam":
        trackers["preconditioned"] = noisescale.GradientNoiseTracker(
            model, precondition=opt, sync_every=50
        )
    bn = BNoiseTracker(model, loss_fn, every=EVERY, splits=2, beta=0.9)
    sample = Sampler(x, y, seed=1)
    measure_batches = Sampler(x, y, seed=2)
    checkpoints: dict[int, dict[str, Any]] = {}
    losses = []
    for step in range(STEPS + 1):
        if step in CHECKPOINTS:
            start = time.perf_counter()
            cp: dict[str, Any] = {}
            with paused(trackers):  # these passes are not training
                cp["exact"] = exact = exact_noise_scales(model, x, y, optimizer=opt)
                cp["probe"] = probe(model, opt, x, y, seed=200 + step)
                if optimizer_name == "sgd":
                    cp["line_search"] = ls = line_search_check(model, x, y, seed=100 + step)
                    # eq. 2.7 with the exact GᵀHG, |G|², B_noise: the quadratic model's ΔL_opt(B)
                    delta_l_max = 0.5 * exact["g2"] ** 2 / exact["ghg"]
                    ls["delta_l_quadratic"] = [
                        delta_l_max / (1 + exact["b_noise"] / b) for b in ls["batch_sizes"]
                    ]
            cp["seconds"] = time.perf_counter() - start
            print(f"  step {step:5d}: checkpoint took {cp['seconds']:.0f} s")
            checkpoints[step] = cp
            print(f"  step {step:5d}: " + ", ".join(f"{k} {v:.4g}" for k, v in cp["exact"].items()))
            print(
                "    frozen-θ estimates: "
                + ", ".join(f"{k} {v['value']:.4g}" for k, v in cp["probe"].items())
            )
            if "line_search" in cp:
                print(f"    line search B_noise {cp['line_search']['b_noise']:.4g}")
        if step == STEPS:
            break
        with paused(trackers):
            bn.step(measure_batches(3 * PART))
        xb, yb = sample(BATCH)
        loss = loss_fn(model, (xb, yb))
        loss.backward()
        for t in trackers.values():
            t.step(loss=loss)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        full_loss = float(loss_fn(model, (x, y)))
    result = {
        "optimizer": optimizer_name,
        "final_train_loss": full_loss,
        "loss": losses,
        "b_noise": bn.history,
        "b_noise_seconds_per_measurement": bn.seconds / len(bn.history),
        "checkpoints": checkpoints,
    }
    for name, t in trackers.items():
        result[f"b_simple_{name}"] = [
            {
                k: r.get(k)
                for k in ("step", "b_simple", "b_simple_low", "b_simple_high", "preconditioned")
            }
            for r in t.history
        ]
    result["b_simple_groups"] = {
        name: [r["groups"][name]["b_simple"] for r in tracker.history]
        for name in tracker.estimate_groups()
    }
    return result


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 16, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


def cost(make_model, x: torch.Tensor, y: torch.Tensor, repeats: int = 25) -> dict[str, float]:
    """Median seconds of a training step on 2·PART examples, with and without the trackers, and of
    one B_noise measurement whose two gradient parts hold 2·PART examples (plus PART for the
    Hessian batch). The variants alternate, so that load on a shared machine hits all alike."""
    model = make_model()
    adam = torch.optim.Adam(model.parameters())
    loss_fn(model, (x[:64], y[:64])).backward()
    adam.step()  # Adam state for the preconditioner; the timed steps leave θ alone (lr = 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sample = Sampler(x, y, seed=3)
    trackers = {
        "tracker": noisescale.GradientNoiseTracker(model),
        "tracker_groups": noisescale.GradientNoiseTracker(model, groups=True),
        "tracker_preconditioned": noisescale.GradientNoiseTracker(
            model, precondition=adam, precondition_from=1
        ),
    }

    def train_step(active: str | None) -> None:
        with ExitStack() as stack:
            for name, t in trackers.items():
                if name != active:
                    stack.enter_context(t.paused())
            loss_fn(model, sample(2 * PART)).backward()
            if active is not None:
                trackers[active].step()
        opt.step()
        hold_adam(adam)  # (every variant: the same cost)
        opt.zero_grad()

    variants = {
        "train_step": lambda: train_step(None),
        **{name: (lambda name=name: train_step(name)) for name in trackers},
        # a tracker's measurement: BNoiseTracker checks the loss only on measurements 1, 2, 4, …
        "b_noise_measurement": lambda: measure_b_noise(
            model, loss_fn, sample(3 * PART), splits=2, check_loss=False
        ),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for rep in range(repeats + 3):  # the first three are warm-up
        for name, fn in variants.items():
            with paused(trackers) if name == "b_noise_measurement" else ExitStack():
                start = time.perf_counter()
                fn()
                if rep >= 3:
                    times[name].append(time.perf_counter() - start)
    for t in trackers.values():
        t.remove()
    median = {k: float(np.median(v)) for k, v in times.items()}
    base = median["train_step"]
    return {**{f"{k}_s": v for k, v in median.items()}, **{k: v / base for k, v in median.items()}}


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    sgd, adam = results["sgd"], results["adam"]

    def values(records, key):  # JSON null (not yet available, unbounded) → NaN: not drawn
        return np.array([np.nan if r[key] is None else r[key] for r in records], dtype=float)

    def curve(ax, records, key, label, color):
        steps = [r["step"] for r in records]
        ax.plot(steps, values(records, key), color=color, label=label)
        lo, hi = values(records, f"{key}_low"), values(records, f"{key}_high")
        hi[~np.isfinite(hi)] = np.nan
        ax.fill_between(steps, lo, hi, color=color, alpha=0.15, linewidth=0)

    def checkpoints(ax, run, key, color, label):
        """Exact values (open markers) and frozen-θ estimates with their 95% intervals (bars)."""
        cps = sorted(int(k) for k in run["checkpoints"])
        cp = [run["checkpoints"][str(c)] for c in cps]
        have = [j for j, c in enumerate(cp) if key in c["exact"]]
        xs = np.array([cps[j] for j in have], dtype=float)
        ax.plot(
            xs,
            [cp[j]["exact"][key] for j in have],
            "o",
            color=color,
            mfc="none",
            ms=9,
            label=f"exact {label}",
        )
        est = [cp[j]["probe"][key] for j in have]
        mid = np.array([e["value"] for e in est])
        lo = np.array([e["low"] for e in est])
        hi = np.array([e["high"] if e["high"] is not None else np.nan for e in est])
        ax.errorbar(
            xs + 25,
            mid,
            yerr=[mid - lo, hi - mid],
            fmt=".",
            color=color,
            capsize=3,
            label=f"{label} at frozen θ ({PROBES} batches of {PROBE_BATCH})",
        )

    ax = axes[0, 0]
    curve(ax, sgd["b_simple_plain"], "b_simple", "B_simple (tracker EMA)", "C0")
    curve(ax, sgd["b_noise"], "b_noise", f"B_noise (HVPs every {EVERY} steps, EMA)", "C3")
    checkpoints(ax, sgd, "b_simple", "C0", "B_simple")
    checkpoints(ax, sgd, "b_noise", "C3", "B_noise")
    cps = sorted(int(k) for k in sgd["checkpoints"])
    ls = [sgd["checkpoints"][str(c)]["line_search"] for c in cps]
    ax.plot(cps, [s["b_noise"] for s in ls], "^", color="k", label="line search, eq. 2.7 fit")
    ax.set(yscale="log", ylim=(10, 2e4), xlabel="step", ylabel="examples")
    ax.set_title("SGD: B_simple vs B_noise")
    ax.legend(fontsize=7)

    ax = axes[0, 1]
    curve(ax, adam["b_simple_plain"], "b_simple", "B_simple (raw gradient)", "C0")
    curve(ax, adam["b_simple_preconditioned"], "b_simple", "B_simple (Adam-preconditioned)", "C2")
    curve(ax, adam["b_noise"], "b_noise", "B_noise (HVPs)", "C3")
    checkpoints(ax, adam, "b_simple", "C0", "B_simple")
    checkpoints(ax, adam, "b_simple_preconditioned", "C2", "preconditioned")
    checkpoints(ax, adam, "b_noise", "C3", "B_noise")
    ax.set(yscale="log", ylim=(10, 2e4), xlabel="step", ylabel="examples")
    ax.set_title("Adam: raw vs preconditioned B_simple, and B_noise")
    ax.legend(fontsize=7)

    ax = axes[1, 0]
    steps = [r["step"] for r in sgd["b_simple_plain"]]
    for name, group_values in sgd["b_simple_groups"].items():
        ax.plot(steps, group_values, label=f"Linear layer {name} (groups=True)")
    ax.plot(steps, [r["b_simple"] for r in sgd["b_simple_plain"]], "k--", label="all parameters")
    ax.set(yscale="log", xlabel="step", ylabel="examples", title="SGD: per-layer B_simple")
    ax.legend(fontsize=8)

    ax = axes[1, 1]
    for c, s, color in zip(cps, ls, ["C0", "C1", "C2", "C3"], strict=False):
        b = np.array(s["batch_sizes"])
        ax.plot(
            b, s["delta_l_opt"], "o", color=color, label=f"step {c}: B_noise ≈ {s['b_noise']:.0f}"
        )
        fine = np.geomspace(b.min(), b.max(), 100)
        ax.plot(fine, s["delta_l_max"] / (1 + s["b_noise"] / fine), "-", color=color, lw=1)
        ax.plot(b, s["delta_l_quadratic"], ":", color=color, lw=1)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="batch size B",
        ylabel="ΔL_opt(B)",
        title="ΔL_opt(B): line searches, eq. 2.7 fits, exact quadratic model (dotted)",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    # one thread: tiny kernels on a shared 2-core machine are much slower with two
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="the optimizer has taken fewer than")
    x, y, _, _ = load_digits()
    start = time.perf_counter()
    results: dict[str, Any] = {}
    for name in ("sgd", "adam"):
        print(f"training with {name} ({STEPS} steps of {BATCH})")
        results[name] = train(name, x, y)
        print(f"  final training loss {results[name]['final_train_loss']:.4f}")
    results["cost"] = {"mlp": cost(mlp, x, y), "cnn": cost(small_cnn, x, y)}
    for k, v in results["cost"].items():
        print(
            f"  cost {k} (× a plain training step): "
            + ", ".join(
                f"{name} {v[name]:.2f}"
                for name in (
                    "tracker",
                    "tracker_groups",
                    "tracker_preconditioned",
                    "b_noise_measurement",
                )
            )
        )
    results["seconds"] = time.perf_counter() - start
    results = json.loads(json.dumps(results, default=float).replace("NaN", "null"))
    (HERE / "results.json").write_text(json.dumps(_summary(results), indent=1) + "\n")
    plot(results, HERE / "beyond_b_simple.png")
    print(f"done in {results['seconds']:.0f} s")


def _summary(results: dict[str, Any]) -> dict[str, Any]:
    """The committed numbers: every 50th step of the curves, checkpoints and costs."""
    out: dict[str, Any] = {"seconds": results["seconds"], "cost": results["cost"]}
    for name in ("sgd", "adam"):
        r = results[name]
        thin = {
            k: v[49::50]
            for k, v in r.items()
            if k.startswith("b_simple_") and k != "b_simple_groups"
        }
        out[name] = {
            "final_train_loss": r["final_train_loss"],
            "b_noise_seconds_per_measurement": r["b_noise_seconds_per_measurement"],
            "b_noise": r["b_noise"][::5],
            "checkpoints": r["checkpoints"],
            "b_simple_groups": {k: v[49::50] for k, v in r["b_simple_groups"].items()},
            **thin,
        }
    return out


if __name__ == "__main__":
    main()
