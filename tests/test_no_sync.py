"""No host synchronisation per step, proved on the CPU by counting.

On a GPU, reading a device value on the host (``.item()``, ``float(t)``, ``.tolist()``,
``.cpu()``, ``bool(t)``, ``torch.nonzero``…) makes the host wait for the device. The tracker
promises none per step: its statistics stay on the device until ``sync()``. A torch-function mode
counts every such call made while tracked steps run (the GPU-marked ``tests/test_gpu.py`` checks
the same with ``torch.cuda.set_sync_debug_mode("error")`` on a device).
"""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import noisescale

SYNCING = {
    "item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__",
    "nonzero", "unique", "masked_select", "equal", "allclose",
}  # fmt: skip


# Host-side by design: the subset's pass position comes from a CPU generator, whatever the
# device; gradients held in host memory are compared by value at every step (on an accelerator
# only on the audited steps, which read back anyway: GradWatch._mark_grads).
HOST_ONLY = {"_draw_subset_position", "_differs_on_host"}


class CountSyncs(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCING and sys._getframe(1).f_code.co_name not in HOST_ONLY:
            self.calls.append(f"{name} in {sys._getframe(1).f_code.co_name}")
        return func(*args, **(kwargs or {}))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.conv = nn.Conv1d(16, 16, 3, padding=1)
        self.norm = nn.LayerNorm(16)
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 5)
        self.scale = nn.Parameter(torch.ones(16))  # a parameter used directly: shared tensors

    def forward(self, ids):
        h = self.conv(self.emb(ids).transpose(1, 2)).transpose(1, 2) * self.scale
        return self.down(F.gelu(self.up(self.norm(h))))


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"per_example_fraction": 1 / 8},
        {"per_example_fraction": 1.0},
        {"per_example": False},
    ],
    ids=["sub-batches", "subset", "exact", "micro-batches"],
)
@pytest.mark.parametrize("accumulate", [1, 2])
def test_tracked_steps_read_nothing_back(kwargs, accumulate):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = noisescale.GradientNoiseTracker(model, optimizer=opt, sync_every=100, **kwargs)
    g = torch.Generator().manual_seed(1)

    def step():
        for _ in range(accumulate):
            ids = torch.randint(0, 50, (12, 10), generator=g)
            y = torch.randint(0, 5, (12, 10), generator=g)
            loss = F.cross_entropy(model(ids).flatten(0, 1), y.flatten()) / accumulate
            loss.backward()
        tracker.step(loss=loss)
        opt.step()
        opt.zero_grad(set_to_none=True)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(4):  # steps 1, 2 and 4 are audited (the audit may read back)
            step()
        with CountSyncs() as counter:
            for _ in range(3):  # steps 5–7: not audited
                step()
    assert counter.calls == [], counter.calls
    assert len(tracker.history) == 7
    if kwargs.get("per_example", True) or accumulate > 1:  # micro-batches need accumulation
        assert tracker.estimate().steps >= 6
