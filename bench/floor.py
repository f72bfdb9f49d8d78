"""The floor under the default's cost: the default's own arithmetic with none of its checks.

The default source splits each step's examples at random into 8 sub-batches and measures the
squared norm of each sub-batch's gradient: a Linear's (or a patchify convolution's) weight
gradient as 8 sub-batch products in place of autograd's one, the rows of its input and output
gradient first gathered into sub-batch order; LayerNorm's and the embeddings' per-example
factors summed by sub-batch; the batch gradient's norm. Around that arithmetic the engine runs
the checks that keep its numbers exact or refused (rows, layouts, uses of each parameter, the
audit's schedule). How much of the default's cost does the arithmetic itself take?

This script measures, on the bench's `transformers` ViT (the workload where the default costs
most), in one process and alternating blocks of steps as ``steady.py`` does (median process CPU
time of a step, the default's audited steps left out), a plain step against:

- ``floor``: that arithmetic in a few dozen lines of hooks and one ``autograd.Function``,
  written for this model only — the least any hook-based implementation of the default does;
- ``floor, no gather``: the same on sub-batches of consecutive rows (no gathering; not what the
  default may do: a batch in a non-random order would put alike examples together);
- ``floor, k=1``: one product per layer, no gathering, no sub-batches: the hooks and the
  custom backward alone;
- ``floor, k=1, Linears only``: the same without the LayerNorm and table hooks: the custom
  backward of the product layers alone;
- ``default``: ``GradientNoiseTracker(model)``.

``--check`` first compares the floor's sub-batch norms with brute force (one backward per
sub-batch, float64) on a small batch, so that the floor is known to compute what the default
computes.

    python bench/floor.py                 # the ViT at the bench's CPU size, 140 steps
    python bench/floor.py --check --steps 60 --width 256
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead as ob
from steady import BLOCK, STEADY_FROM, audited

import noisescale

K = 8  # the default's sub-batches


class Floor:
    """The sub-batch norms of one step: the rows' order (``perm``), how many sub-batches, and
    the squared norms each layer adds ([k] each)."""

    def __init__(self, k: int = K, gather: bool = True) -> None:
        self.k, self.gather = k, gather
        self.perm: Tensor | None = None
        self.sq: list[Tensor] = []

    def rows(self, t: Tensor) -> Tensor:
        """``t`` ([N, …]) in sub-batch order, as [k, N/k·…, last]."""
        if self.gather:
            t = t.index_select(0, self.perm)
        return t.reshape(self.k, -1, t.shape[-1])


class LinearBySubbatch(torch.autograd.Function):
    """``F.linear`` whose backward computes the weight gradient as k sub-batch products (their
    sum is the gradient; their squared norms, with the bias's, go to ``floor.sq``)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, b: Tensor | None, floor: Floor) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.floor, ctx.has_bias = floor, b is not None
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx: Any, d: Tensor) -> tuple[Tensor, Tensor, Tensor | None, None]:
        x, w = ctx.saved_tensors
        floor = ctx.floor
        a3, d3 = floor.rows(x), floor.rows(d)  # [k, n·P, I], [k, n·P, O]
        g = torch.bmm(d3.transpose(1, 2), a3)  # [k, O, I]
        sq = torch.linalg.vector_norm(g.flatten(1), dim=1).square()
        bias = None
        if ctx.has_bias:
            per_bias = d3.sum(1)
            sq = sq + per_bias.square().sum(1)
            bias = per_bias.sum(0)
        floor.sq.append(sq)
        return d @ w, g.sum(0), bias, None


def install(model: nn.Module, floor: Floor, products_only: bool = False) -> None:
    """The floor's hooks on the ViT: every Linear, the patchify convolution, every LayerNorm,
    the class token and position table (``products_only``: the first two)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.forward = lambda x, m=m: LinearBySubbatch.apply(x, m.weight, m.bias, floor)
        elif isinstance(m, nn.Conv2d):
            if m.stride != m.kernel_size or m.padding != (0, 0) or m.groups != 1:
                raise ValueError("the floor takes a patchify convolution only")

            def patchify(x: Tensor, m: nn.Conv2d = m) -> Tensor:
                (kh, kw), (n, c, h, w) = m.kernel_size, x.shape
                p = x.reshape(n, c, h // kh, kh, w // kw, kw).permute(0, 2, 4, 1, 3, 5)
                p = p.reshape(n, (h // kh) * (w // kw), c * kh * kw)
                weight = m.weight.reshape(m.out_channels, -1)
                y = LinearBySubbatch.apply(p, weight, m.bias, floor)
                return y.transpose(1, 2).reshape(n, m.out_channels, h // kh, w // kw)

            m.forward = patchify
        elif products_only:
            continue
        elif isinstance(m, nn.LayerNorm):

            def norm_hook(mod: nn.LayerNorm, args: tuple, out: Tensor) -> None:
                x = args[0].detach()

                def grad_hook(d: Tensor) -> None:
                    xh = F.layer_norm(x, mod.normalized_shape, None, None, mod.eps)
                    dims = tuple(range(1, d.dim() - 1))
                    per = torch.cat([(d * xh).sum(dims), d.sum(dims)], -1)  # [N, 2·D]
                    floor.sq.append(floor.rows(per).sum(1).square().sum(1))

                out.register_hook(grad_hook)

            m.register_forward_hook(norm_hook)
        elif hasattr(m, "cls_token") and hasattr(m, "position_embeddings"):
            # ViTEmbeddings: cat(class token, patches) + position table; both gradients are
            # the output gradient's (the class token's at position 0)
            def table_hook(mod: nn.Module, args: tuple, out: Tensor) -> None:
                def grad_hook(d: Tensor) -> None:
                    per = floor.rows(d.flatten(1)).sum(1)  # [k, T·D]
                    first = per[:, : d.shape[-1]]
                    floor.sq.append(per.square().sum(1) + first.square().sum(1))

                out.register_hook(grad_hook)

            m.register_forward_hook(table_hook)


MODES = ("plain", "floor", "floor, no gather", "floor, k=1", "floor, k=1, Linears only", "default")


def make(wl: ob.Workload, mode: str, seed: int = 0) -> tuple[Any, nn.Module, Floor | None]:
    torch.manual_seed(seed)
    model = wl.model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    tracker = noisescale.GradientNoiseTracker(model) if mode == "default" else None
    floor = None
    if mode.startswith("floor"):
        floor = Floor(1 if mode.startswith("floor, k=1") else K, gather=mode == "floor")
        install(model, floor, products_only=mode.endswith("Linears only"))
    params = list(model.parameters())
    generator = torch.Generator().manual_seed(seed)
    kept: list[tuple[Tensor, Tensor]] = []

    def step(x: Tensor, y: Tensor) -> None:
        opt.zero_grad()
        if floor is not None:
            floor.perm, floor.sq = torch.randperm(x.shape[0], generator=generator), []
        loss = wl.per_example_loss(model(x), y).mean()
        loss.backward()
        if tracker is not None:
            tracker.step()
        if floor is not None:
            big = torch.stack(torch._foreach_norm([p.grad for p in params])).square().sum()
            kept[:] = [(torch.stack(floor.sq).sum(0), big)]  # what an estimator would take
        opt.step()

    return step, model, floor


def check(wl: ob.Workload) -> float:
    """Largest relative error of the floor's sub-batch norms against brute force (float64)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(1)
        model = wl.model().double()
        floor = Floor()
        install(model, floor)
        x, y = wl.batches[0]
        x = x[:16].double()
        y = y[:16]
        floor.perm = torch.randperm(16)
        wl.per_example_loss(model(x), y).mean().backward()
        got = torch.stack(floor.sq).sum(0)
        params = [p for p in model.parameters()]
        want = []
        for j in range(K):
            rows = floor.perm.view(K, -1)[j]
            losses = wl.per_example_loss(model(x), y)
            grads = torch.autograd.grad(losses[rows].sum() / 16, params)
            want.append(sum(g.pow(2).sum() for g in grads))
        want_t = torch.stack(want)
        return float(((got - want_t).abs() / want_t).max())
    finally:
        torch.set_default_dtype(old)


def run(steps: int, width: int | None) -> dict[str, Any]:
    wl = ob.make_workload("hf-vit", True, 32, torch.device("cpu"), width)
    built = {mode: make(wl, mode)[0] for mode in MODES}
    times: dict[str, list[tuple[int, float]]] = {mode: [] for mode in MODES}
    order = list(MODES)
    for b, start in enumerate(range(0, steps, BLOCK)):
        for mode in order if b % 2 == 0 else order[::-1]:
            for i in range(start, min(start + BLOCK, steps)):
                x, y = wl.batches[i % len(wl.batches)]
                c0 = time.process_time()
                built[mode](x, y)
                times[mode].append((i + 1, time.process_time() - c0))
        print(f"   step {min(start + BLOCK, steps)}/{steps}", flush=True)

    def median(mode: str) -> float:
        return statistics.median(
            t for s, t in times[mode] if s >= STEADY_FROM and not (mode == "default" and audited(s))
        )

    base = median("plain")
    return {
        "description": wl.description,
        "modes": {m: {"ms": 1e3 * median(m), "ratio": median(m) / base} for m in MODES},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=140)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--check", action="store_true", help="check the floor against brute force")
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = parser.parse_args()
    if args.steps <= STEADY_FROM:
        parser.error(f"--steps must be above {STEADY_FROM} (the steady window starts there)")
    torch.set_num_threads(1)
    if args.check:
        wl = ob.make_workload("hf-vit", True, 32, torch.device("cpu"), args.width)
        err = check(wl)
        print(f"floor vs brute force: largest relative error {err:.1e}")
        if err > 1e-9:
            sys.exit("the floor does not compute the sub-batch norms: not timed")
    result = run(args.steps, args.width)
    print(f"\n{result['description']}, steps {STEADY_FROM}–{args.steps}, CPU time per step")
    for mode, r in result["modes"].items():
        print(f"  {mode:26s} {r['ms']:8.2f} ms  {r['ratio']:.3f}×")
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
