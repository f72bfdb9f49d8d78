"""Overhead of the tracker on a DDP training step: tracked vs untracked, same processes.

    python bench/ddp_overhead.py                  # spawns 2 CPU processes (gloo)
    torchrun --nproc_per_node 2 bench/ddp_overhead.py

Three DDP models of the same architecture and data, trained side by side in interleaved blocks
of steps so that drift of the machine hits all alike:

* ``plain``  — forward, backward, optimizer step: the baseline;
* ``local``  — plus ``GradientNoiseTracker(model, per_example=False)``: only the paper's App. A.1
  pair (local gradient before averaging, global after), the "nearly free" measurement;
* ``full``   — plus the default tracker: exact per-example norms from layer hooks as well.

Each block times every step (``time.perf_counter``, after a barrier), drops ``--warmup`` steps,
and keeps the median; the ratio of medians per block is reported as the median over blocks.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import noisescale

MODES = ("plain", "local", "full")


def build(width: int, mode: str) -> tuple[nn.Module, torch.optim.Optimizer, object | None]:
    torch.manual_seed(0)
    model = DistributedDataParallel(
        nn.Sequential(
            nn.Linear(784, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, 10),
        )
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    tracker = None
    if mode != "plain":
        tracker = noisescale.GradientNoiseTracker(model, per_example=mode == "full")
    return model, optimizer, tracker


def block(model, optimizer, tracker, data, steps: int, warmup: int) -> float:
    """Median seconds per step over ``steps`` after ``warmup`` steps."""
    times = []
    for i in range(warmup + steps):
        x, y = data[i % len(data)]
        dist.barrier()
        start = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if tracker is not None:
            tracker.step(loss=loss)
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return statistics.median(times[warmup:])


def run(args: argparse.Namespace) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    g = torch.Generator().manual_seed(rank)
    data = [
        (torch.randn(args.local_batch, 784, generator=g), torch.randint(0, 10, (args.local_batch,)))
        for _ in range(8)
    ]
    setups = {mode: build(args.width, mode) for mode in MODES}
    medians: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(args.repeats):
        for mode in MODES:
            medians[mode].append(block(*setups[mode], data, args.steps, args.warmup))
    for _, _, tracker in setups.values():
        if tracker is not None:
            tracker.estimate()  # the pending all-reduces finished in time
            tracker.remove()
    if rank == 0:
        plain = medians["plain"]
        print(
            f"DDP step overhead: {world} processes ({dist.get_backend()}), MLP 784-{args.width}-"
            f"{args.width}-10, local batch {args.local_batch}, {args.repeats} blocks of "
            f"{args.steps} steps after {args.warmup} warm-up"
        )
        print(
            f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__}"
        )
        for mode in MODES:
            ratios = [m / p for m, p in zip(medians[mode], plain, strict=True)]
            print(
                f"  {mode:6s} median step {1e3 * statistics.median(medians[mode]):7.2f} ms   "
                f"ratio to plain {statistics.median(ratios):5.3f} "
                f"(blocks {min(ratios):.3f}–{max(ratios):.3f})"
            )


def worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(minutes=2),
    )
    run(args)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, default=2, help="processes to spawn (no torchrun)")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--local-batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if "RANK" in os.environ:  # under torchrun
        dist.init_process_group("gloo", timeout=timedelta(minutes=2))
        run(args)
        dist.destroy_process_group()
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(worker, args=(args.nproc, port, args), nprocs=args.nproc)


if __name__ == "__main__":
    main()
