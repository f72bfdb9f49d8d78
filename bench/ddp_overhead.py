"""Overhead of the tracker on a DDP training step: tracked vs untracked, same processes.

    python bench/ddp_overhead.py                  # spawns 2 CPU processes (gloo)
    torchrun --nproc_per_node 2 bench/ddp_overhead.py

Three DDP models of the same architecture and data, trained side by side, one step of each in
turn, so that whatever else the machine is doing hits all three alike:

* ``plain``  — forward, backward, optimizer step: the baseline;
* ``local``  — plus ``GradientNoiseTracker(model, per_example=False)``: only the paper's App. A.1
  pair (local gradient before averaging, global after), the "nearly free" measurement;
* ``full``   — plus the default tracker: exact per-example norms from layer hooks as well.

Every step is timed (``time.perf_counter``, after a barrier) from the forward pass to
``zero_grad()``; after ``--warmup`` steps of each, the ratio of median step times is reported,
with its range over ``--blocks`` consecutive blocks of the run as a measure of its stability.
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


def timed_step(model, optimizer, tracker, x: torch.Tensor, y: torch.Tensor) -> float:
    """Seconds of one training step, all processes starting together."""
    dist.barrier()
    start = time.perf_counter()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    if tracker is not None:
        tracker.step(loss=loss)
    optimizer.step()
    optimizer.zero_grad()
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    g = torch.Generator().manual_seed(rank)
    data = [
        (torch.randn(args.local_batch, 784, generator=g), torch.randint(0, 10, (args.local_batch,)))
        for _ in range(8)
    ]
    setups = {mode: build(args.width, mode) for mode in MODES}
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for i in range(args.warmup + args.steps):
        for mode in MODES:
            times[mode].append(timed_step(*setups[mode], *data[i % len(data)]))
    for _, _, tracker in setups.values():
        if tracker is not None:
            tracker.estimate()  # the pending all-reduces finished in time
            tracker.remove()
    if rank == 0:
        kept = {mode: t[args.warmup :] for mode, t in times.items()}
        size = len(kept["plain"]) // args.blocks
        print(
            f"DDP step overhead: {world} processes ({dist.get_backend()}), MLP 784-{args.width}-"
            f"{args.width}-10, local batch {args.local_batch}, {args.steps} steps of each after "
            f"{args.warmup} warm-up"
        )
        print(
            f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__}"
        )
        for mode in MODES:
            ratio = statistics.median(kept[mode]) / statistics.median(kept["plain"])
            blocks = [
                statistics.median(kept[mode][b * size : (b + 1) * size])
                / statistics.median(kept["plain"][b * size : (b + 1) * size])
                for b in range(args.blocks)
            ]
            print(
                f"  {mode:6s} median step {1e3 * statistics.median(kept[mode]):7.2f} ms   "
                f"ratio to plain {ratio:5.3f} (blocks {min(blocks):.3f}–{max(blocks):.3f})"
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
    parser.add_argument("--steps", type=int, default=300, help="timed steps of each model")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--blocks", type=int, default=5)
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
