"""Sub-batch norms of a linear layer two ways, to set the engine's choice between them.

With k sub-batches of ``rows`` rows each, the sub-batch gradient norms of an [O, I] weight come
either from k sub-batch products (they replace autograd's one weight-gradient product: the extra
is the k partial gradients written, added and squared) or, from the saved inputs and output
gradients, in Gram form (k·rows²·(I + O) multiply-adds on top of autograd's product). This
prints, per shape, autograd's product and the extra time of each way, and which one the engine
picks (``noisescale.per_example.subbatch.uses_products``)::

    python bench/gram_vs_products.py                 # one thread, CPU
    python bench/gram_vs_products.py --device cuda   # bench/gpu.sh: to set the rule there
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn

from noisescale.per_example.subbatch import uses_products


def ms(fn: Callable[[], object], device: torch.device) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    start = time.perf_counter()
    fn()
    sync()
    once = time.perf_counter() - start
    n = max(3, min(50, int(0.3 / max(once, 1e-5))))
    start = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - start) / n * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=8, help="sub-batches")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    k, device = args.k, torch.device(args.device)
    print(f"k = {k}, {device}; ms per layer and step")
    print("  rows      I      O | autograd products+ Gram+ | faster   engine")
    for i, o in [(128, 128), (384, 384), (768, 768), (1024, 1024), (256, 1024), (768, 3072)]:
        for rows in (16, 32, 64, 128, 256, 512):
            a = torch.randn(k * rows, i, device=device)
            d = torch.randn(k * rows, o, device=device)
            a3, d3 = a.view(k, rows, i), d.view(k, rows, o)
            out = torch.empty(k, o, i, device=device)
            plain = ms(lambda a=a, d=d: d.t() @ a, device)

            def products(a3=a3, d3=d3, out=out) -> None:
                g = torch.bmm(d3.transpose(1, 2), a3, out=out)
                g.sum(0)
                torch.linalg.vector_norm(g.flatten(1), dim=1)

            def gram(a3=a3, d3=d3) -> None:
                aa, dd = a3 @ a3.transpose(1, 2), d3 @ d3.transpose(1, 2)
                torch.linalg.vecdot(aa.flatten(1), dd.flatten(1))

            extra, g = ms(products, device) - plain, ms(gram, device)
            # the engine's choice for an nn.Linear called on [k·rows] examples of one position
            engine = uses_products(nn.Linear(i, o), a, k * rows, rows)
            print(
                f"{rows:6d} {i:6d} {o:6d} | {plain:8.2f} {extra:9.2f} {g:6.2f} | "
                f"{'products' if extra < g else 'Gram':8s} {'products' if engine else 'Gram'}"
            )


if __name__ == "__main__":
    main()
