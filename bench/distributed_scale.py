"""The data-parallel tracker's step time at 2, 1,024 and 16,384 processes, in one process.

The time half of ``tests/test_distributed_scale.py``, which asserts only what does not depend on
the machine's load (one fixed all-reduce, the Python lines and torch operators of a step, memory,
record sizes). Here ``tracker.step()`` — hooks, packing, ``dist.all_reduce``, the wait,
``resolve()``, the state update, the record — is timed on torch's fake process group
(``backend="fake"``: a real process group of any size whose collectives return at once, this
process being rank 0), for DDP with the no-op communication hook and for a hand-averaged model,
the six trackers stepping in turn on the same batches so that the machine's load hits them
alike. The statistics are meaningless (the "sum" over W ranks is one rank's buffer); only the
cost is measured.

    python bench/distributed_scale.py [--steps 200]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import noisescale

WORLDS = (2, 1024, 16384)
SETUPS = ("ddp", "manual")
WARMUP = 40  # past the audits on steps 1, 2, 4, 8, 16, 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="timed steps per tracker")
    args = parser.parse_args()

    from torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks import noop_hook
    from torch.nn.parallel import DistributedDataParallel
    from torch.testing._internal.distributed.fake_pg import FakeStore

    torch.set_num_threads(1)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=max(WORLDS))
    groups = {w: dist.new_group(list(range(w))) for w in WORLDS if w != max(WORLDS)}
    groups[max(WORLDS)] = dist.group.WORLD
    runs = {}
    for setup in SETUPS:
        for w in WORLDS:
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
            if setup == "ddp":
                model = DistributedDataParallel(model, process_group=groups[w])
                model.register_comm_hook(None, noop_hook)
            tracker = noisescale.GradientNoiseTracker(
                model, sync_every=1, process_group=groups[w] if setup == "manual" else None
            )
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            runs[setup, w] = (model, tracker, opt)
    g = torch.Generator().manual_seed(1)
    times: dict = {key: [] for key in runs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fake statistics are not meaningful
        for i in range(WARMUP + args.steps):
            for key, (model, tracker, opt) in runs.items():
                x, y = torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                start = time.perf_counter()
                tracker.step(loss=loss)
                if i >= WARMUP:
                    times[key].append(time.perf_counter() - start)
                opt.step()
                opt.zero_grad()
    dist.destroy_process_group()

    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}, {args.steps} steps after {WARMUP}; MLP 16-32-4, batch 8"
    )
    print(
        "\n| W | "
        + " | ".join(f"median `tracker.step()`, {s}" for s in SETUPS)
        + " | ratio to W = 2 |"
    )
    print("|---|" + "---|" * (len(SETUPS) + 1))
    for w in WORLDS:
        med = [statistics.median(times[s, w]) for s in SETUPS]
        ratio = [m / statistics.median(times[s, 2]) for m, s in zip(med, SETUPS, strict=True)]
        print(
            f"| {w:,} | "
            + " | ".join(f"{m * 1e3:.2f} ms" for m in med)
            + " | "
            + " / ".join(f"{r:.2f}" for r in ratio)
            + " |"
        )


if __name__ == "__main__":
    main()
