"""An adaptive batch under data parallelism, on two CPU processes (gloo): the schedule's batch
is global.

Started by ``tests/test_integrations.py::test_adaptive_batch_is_global_under_ddp`` as
``python -m torch.distributed.run --nproc_per_node 2 tests/ddp_schedule_worker.py OUT``; each
process writes ``OUT/<rank>.json``:

* ``lightning``: Lightning's DDP strategy with ``NoiseScaleCallback(schedule)``, the schedule's
  micro-batch the global one (4 per process × 2): per optimizer step, the examples this process
  ran and the accumulation in effect; the schedule's and the tracker's totals.
* ``lightning_refused``: the same with the per-process micro-batch (4), which made the global
  batch twice the schedule's until 2026-12-05 (a helper found): the error message.
* ``transformers``: the Trainer (DDP over gloo under torchrun) with ``NoiseScaleCallback(ramp)``,
  the ramp's micro-batch the global one (8 per device × 2): each step's big batch and rate.
* ``plain``: a plain DDP loop (``no_sync`` for all but the last micro-batch), the same record.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from noisescale import GradientNoiseTracker
from noisescale.errors import NoiseScaleInputError
from noisescale.schedule import AdaptiveBatchSize, BatchSizeRamp

PER_PROCESS = 4
STEPS = 40


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 8, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 1).long()


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))


def _schedule(micro: int) -> AdaptiveBatchSize:
    return AdaptiveBatchSize(
        micro_batch_size=micro,
        max_batch_size=256,
        factor=1.0,
        interval=8,
        max_relative_width=math.inf,
        hysteresis=1.0,
    )


def _lightning(micro: int) -> dict:
    import lightning.pytorch as pl

    from noisescale.integrations.lightning import NoiseScaleCallback

    seen: list[int] = []
    rows: list[tuple[int, int]] = []

    class Lit(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _net()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, i):
            x, y = batch
            seen.append(len(x))
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    class Record(pl.Callback):
        def on_before_optimizer_step(self, trainer, module, optimizer):
            rows.append((sum(seen), trainer.accumulate_grad_batches))
            seen.clear()

    x, y = _data()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=PER_PROCESS, shuffle=False
    )
    schedule = _schedule(micro)
    callback = NoiseScaleCallback(schedule=schedule, log_every=0)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Record(), callback],
    )
    try:
        trainer.fit(Lit(), loader)
    except NoiseScaleInputError as exc:
        return {"error": str(exc)}
    assert callback.tracker is not None
    return {
        "world_size": trainer.world_size,
        "rows": rows,
        "schedule_examples": schedule.state.examples,
        "tracker_examples": callback.tracker.examples,
        "batch_size": schedule.batch_size,
        "history": [h for h in schedule.history if "target" in h],
    }


def _plain(micro: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    x, y = _data()
    x, y = x[rank::world], y[rank::world]  # this process's shard
    ddp = DistributedDataParallel(_net())
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    tracker = GradientNoiseTracker(ddp, sync_every=1)
    schedule = _schedule(micro)
    rows, tracked, at = [], [], 0
    for _ in range(STEPS):
        k = schedule.num_micro_batches
        before = tracker.examples
        for i in range(k):
            xb, yb = x[at : at + PER_PROCESS], y[at : at + PER_PROCESS]
            at = (at + PER_PROCESS) % (len(x) - PER_PROCESS)
            sync = contextlib.nullcontext() if i == k - 1 else ddp.no_sync()
            with sync:
                (F.cross_entropy(ddp(xb), yb) / schedule.loss_divisor).backward()
        tracker.step()
        opt.step()
        opt.zero_grad()
        rows.append((k * PER_PROCESS, schedule.batch_size))
        schedule.step(tracker)
        tracked.append(tracker.examples - before)
    return {
        "rows": rows,
        "tracked": tracked,
        "schedule_examples": schedule.state.examples,
        "tracker_examples": tracker.examples,
        "b_simple": tracker.estimate().b_simple,
        "batch_size": schedule.batch_size,
    }


def _transformers(out: Path) -> dict:
    import transformers

    sys.path.insert(0, str(Path(__file__).parent))
    from noisescale.integrations.transformers import NoiseScaleCallback
    from test_integrations import MICRO, _hf_args, _HFDataset, _HFModel

    world = int(os.environ["WORLD_SIZE"])  # torchrun's; the Trainer starts the process group
    # global examples: 16 per step until 32 are consumed, then 32 (linear rule, tuned at 16)
    ramp = BatchSizeRamp.stepwise(
        [(0, MICRO * world), (2 * MICRO * world, 2 * MICRO * world)],
        micro_batch_size=MICRO * world,
        lr_rule="linear",
        base_batch_size=MICRO * world,
    )
    callback = NoiseScaleCallback(ramp, sync_every=1, per_example_fraction=1.0)
    args = _hf_args(out / "hf", gradient_accumulation_steps=1, max_steps=-1, num_train_epochs=2)
    trainer = transformers.Trainer(
        model=_HFModel(), args=args, train_dataset=_HFDataset(), callbacks=[callback]
    )
    trainer.train()
    assert callback.tracker is not None
    return {
        "world_size": int(args.world_size),
        "steps": [(h["b_big"], h["lr"]) for h in callback.tracker.history if "b_big" in h],
        "ramp_examples": ramp.state.examples,
        "tracker_examples": callback.tracker.examples,
    }


def main(out: Path) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    results = {"transformers": _transformers(out)}
    results["lightning"] = _lightning(2 * PER_PROCESS)
    results["lightning_refused"] = _lightning(PER_PROCESS)
    results["plain"] = _plain(2 * PER_PROCESS)
    rank = torch.distributed.get_rank()
    (out / f"{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
