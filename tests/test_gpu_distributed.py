"""On a CUDA device under NCCL: a data-parallel tracked step never makes the host wait.

The CPU suite counts syncing calls inside two gloo processes (``tests/test_distributed.py``);
what only a GPU shows is the device path itself: the step's buffer on the CUDA device, its
host-side numbers through pinned memory, device numbers added on the device, the all-reduce on
NCCL's stream. One process in a group of one (NCCL needs a GPU per process; one is enough to
run every call the step makes), DDP and FSDP2, steps 5–7 (not audited) under
``torch.cuda.set_sync_debug_mode("error")``, which raises on any synchronising call.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import noisescale
from test_gpu import CUDA, Net, _loss, steps_without_host_sync

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def nccl_group():
    assert not dist.is_initialized()
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("setup", ["ddp", "fsdp"])
@pytest.mark.parametrize(
    "kwargs", [{}, {"per_example_fraction": 1 / 8}, {"per_example": False}],
    ids=["sub-batches", "subset", "micro-batches"],
)  # fmt: skip
def test_a_data_parallel_step_never_waits_for_the_device(nccl_group, setup, kwargs):
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = Net().to(CUDA)
    if setup == "ddp":
        model = DistributedDataParallel(model, device_ids=[0])
    else:
        for layer in (model.emb, model.conv, model.up, model.down):
            fully_shard(layer)
        fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = noisescale.GradientNoiseTracker(model, optimizer=opt, sync_every=100, **kwargs)

    def step():
        for j in range(2):  # accumulation: micro-batches, and the local accumulated norm
            last = j == 1
            if setup == "fsdp":
                model.set_requires_gradient_sync(last)
            ids = torch.randint(0, 50, (16, 12), device=CUDA)
            y = torch.randint(0, 5, (16, 12), device=CUDA)
            if setup == "ddp" and not last:
                with model.no_sync():
                    (_loss(model(ids), y).mean() / 2).backward()
            else:
                loss = _loss(model(ids), y).mean() / 2
                loss.backward()
        tracker.step(loss=loss)
        opt.step()
        opt.zero_grad(set_to_none=True)

    steps_without_host_sync(step)
    assert len(tracker.history) == 7
    assert "local" in tracker.history[-1]["sources"]
    tracker.remove()
