"""Data-parallel training with the noise scale measured for free (paper App. A.1).

Run on CPU with two processes::

    torchrun --nproc_per_node 2 examples/ddp_train.py
    torchrun --nproc_per_node 2 examples/ddp_train.py --accumulate 2   # no_sync() micro-batches
    torchrun --nproc_per_node 2 examples/ddp_train.py --fsdp           # FSDP2 instead of DDP

An MLP learns the 1,797 UCI handwritten digits (8×8, scikit-learn's copy: nothing is downloaded).
Each process trains on its shard of every epoch (``DistributedSampler``); the tracker pairs each
process's local gradient (B_small = its local batch) with the averaged one (B_big = the global
batch) and with exact per-example norms, and prints B_simple with its 95% interval. Every process
computes the same estimate; rank 0 prints it and writes the history.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import noisescale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--local-batch", type=int, default=32, help="examples per process")
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per step")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (fully_shard)")
    parser.add_argument("--history", default="ddp_history.jsonl", help="rank 0 writes it here")
    args = parser.parse_args()

    # a crashed peer makes the others fail at their next collective, at the latest after this
    dist.init_process_group("gloo", timeout=timedelta(minutes=5))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    data = TensorDataset(x, y)
    sampler = DistributedSampler(data, shuffle=True, seed=0)
    micro = args.local_batch // args.accumulate
    loader = DataLoader(data, batch_size=micro, sampler=sampler, drop_last=False)

    torch.manual_seed(0)
    model: nn.Module = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in (model[0], model[2]):
            fully_shard(layer)
        fully_shard(model)
    else:
        model = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    # after wrapping: the tracker finds DDP / FSDP2 and all-reduces one small vector per step
    tracker = noisescale.GradientNoiseTracker(model, optimizer=optimizer, beta=0.95)

    step = 0
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        batches = list(loader)
        # a step is `accumulate` micro-batches; every process runs the same number of them
        for start in range(0, len(batches) - args.accumulate + 1, args.accumulate):
            group = batches[start : start + args.accumulate]
            for j, (xb, yb) in enumerate(group):
                last = j == len(group) - 1
                ctx = contextlib.nullcontext()
                if args.fsdp:
                    model.set_requires_gradient_sync(last)
                elif not last:
                    ctx = model.no_sync()
                with ctx:
                    loss = F.cross_entropy(model(xb), yb) / len(group)
                    loss.backward()
            tracker.step(loss=loss * len(group))  # before clipping and the optimizer step
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step % 20 == 0:
                e = tracker.estimate()  # no collective: safe on one rank only
                if rank == 0:
                    print(
                        f"epoch {epoch} step {step:4d}  B_simple {e.b_simple:7.1f} "
                        f"[{e.low:7.1f}, {e.high:7.1f}]  global batch {world * args.local_batch}"
                    )
    if rank == 0:
        last = tracker.history[-1]
        print(f"sources of the last step: {sorted(last['sources'])}; b_big {last['b_big']:.1f}")
        print(f"history: {tracker.write_history(args.history)}")
    tracker.remove()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
