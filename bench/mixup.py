"""Rows mixed in pairs (timm's Mixup): what the tracker reads with and without ``paired_rows``.

timm's ``Mixup`` mixes row i of a batch with row N − 1 − i. The two rows share both images, so
their gradients are not independent, and eq. A.2 pairs them as if they were. This script takes
``precision.py``'s digits MLP (trained, then frozen), mixes batches of 64 as timm does (one
Beta(0.8, 0.8) λ per row, ``mode="elem"``; or one per batch, timm's default ``mode="batch"``),
and compares the tracker's B_simple after 1,500 steps with the truth computed from every row's
gradient by ``torch.func`` on 20,000 independent mixed pairs: the loop's noise scale in rows,
tr Σ of a pair's summed gradient over 2, divided by |G|² (its Monte Carlo estimate of |G|² is
high by about tr Σ/20,000, ≈ 2%). Also measured: the same rows drawn in independent pairs (no
sharing), and four accumulation micro-batches each mixed within itself with ``per_example=False``.

    python bench/mixup.py            # ≈ 2 minutes on one CPU thread

Its run of 2026-12-04 (2-vCPU AMD EPYC): truth 414 (≈ 422 corrected); ``paired_rows="flip"``
502 [420, 624], 450 [382, 545] (seeds 2–7: 429, 435, 464, 403, 362, 409, every interval
holding the truth); the default 144 [135, 155], 138 [130, 148]; every example the same; one λ
per batch 108 [97, 123], 105 [94, 118]; four micro-batches mixed each within itself with
``per_example=False`` 438 [370, 536], 435 [365, 534]; independent pairs (no sharing) 332, 294.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

sys.path.insert(0, str(Path(__file__).resolve().parent))
from precision import digits_case  # the digits MLP, trained and frozen

import noisescale

ALPHA, BATCH, STEPS = 0.8, 64, 1500


def soft_ce(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return -(t * F.log_softmax(out, -1)).sum(-1)


def main() -> None:
    torch.set_num_threads(1)
    case = digits_case()
    model = case.model
    x_all, y_all = case.data
    n_pool = x_all.shape[0]
    beta = torch.distributions.Beta(ALPHA, ALPHA)

    def mix(i, j, lam):
        x = lam[:, None] * x_all[i] + (1 - lam[:, None]) * x_all[j]
        t = lam[:, None] * F.one_hot(y_all[i], 10) + (1 - lam[:, None]) * F.one_hot(y_all[j], 10)
        return x, t

    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, x, t):
        return soft_ce(functional_call(model, p, (x.unsqueeze(0),)), t.unsqueeze(0)).sum()

    per_row = vmap(grad(one), in_dims=(None, 0, 0))
    torch.manual_seed(7)
    g = torch.Generator().manual_seed(7)
    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in params.items()}
    sq, pairs = 0.0, 20000
    for _ in range(0, pairs, 500):
        a = torch.randint(0, n_pool, (500,), generator=g)
        b = torch.randint(0, n_pool, (500,), generator=g)
        ga = per_row(params, *mix(a, b, beta.sample((500,))))
        gb = per_row(params, *mix(b, a, beta.sample((500,))))
        for k in ga:
            s = (ga[k] + gb[k]).double()
            total[k] += s.sum(0)
            sq += float(s.pow(2).sum())
    g2_pair = sum(float((v / pairs).pow(2).sum()) for v in total.values())
    trace = (sq / pairs - g2_pair) / 2
    truth = trace / (g2_pair / 4)
    print(f"truth (the loop's noise scale in rows, flip pairs): {truth:.0f}  (tr Σ {trace:.3g})")

    def batch(gen, n, how, lam_mode):
        i = torch.randint(0, n_pool, (n,), generator=gen)
        j = torch.randint(0, n_pool, (n,), generator=gen) if how == "independent" else i.flip(0)
        lam = beta.sample((n,)) if lam_mode == "elem" else beta.sample(()).expand(n)
        return mix(i, j, lam)

    def run(kw, how, seed, micro=1, lam_mode="elem"):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(100 + seed)
        model.zero_grad(set_to_none=True)
        tracker = noisescale.GradientNoiseTracker(model, beta=1.0, sync_every=STEPS + 1, **kw)
        for _ in range(STEPS):
            for _ in range(micro):
                x, t = batch(gen, BATCH // micro, how, lam_mode)
                (soft_ce(model(x), t).mean() / micro).backward()
            tracker.step()
            model.zero_grad(set_to_none=True)
        e = tracker.estimate()
        tracker.remove()
        return e

    for name, kw, how, micro, lam_mode in [
        ("paired_rows='flip', timm elem", {"paired_rows": "flip"}, "flip", 1, "elem"),
        ("default, timm elem", {}, "flip", 1, "elem"),
        ("every example, timm elem", {"per_example_fraction": 1.0}, "flip", 1, "elem"),
        ("default, timm batch (one λ)", {}, "flip", 1, "batch"),
        ("per_example=False, 4 micro-batches", {"per_example": False}, "flip", 4, "elem"),
        ("default, independent pairs", {}, "independent", 1, "elem"),
    ]:
        for seed in range(2):
            t0 = time.time()
            e = run(kw, how, seed, micro, lam_mode)
            print(
                f"{name:38s} seed {seed}: B_simple {e.b_simple:6.0f} [{e.low:.0f}, {e.high:.0f}]"
                f"  tr Σ {e.trace_sigma:.3g}  ({time.time() - t0:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
