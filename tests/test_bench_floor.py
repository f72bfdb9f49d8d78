"""bench/floor.py times the default's arithmetic without its checks; its hooks must compute
what the default computes — each random sub-batch's gradient norm — or its timing says
nothing. Checked against one backward pass per sub-batch (float64)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch


def _floor_module():
    path = Path(__file__).resolve().parents[1] / "bench" / "floor.py"
    spec = importlib.util.spec_from_file_location("bench_floor", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_floor_computes_the_default_s_sub_batch_norms():
    floor = _floor_module()
    wl = floor.ob.make_workload("hf-vit", True, 1, torch.device("cpu"), 32)
    assert floor.check(wl) < 1e-9


def test_the_floor_s_modes_leave_the_step_s_gradient_as_autograd_computes_it():
    floor = _floor_module()
    wl = floor.ob.make_workload("hf-vit", True, 1, torch.device("cpu"), 32)
    x, y = wl.batches[0]
    grads = {}
    for mode in floor.MODES[:-1]:  # (all but the default)
        step, model, _ = floor.make(wl, mode, seed=3)
        step(x, y)  # (SGD leaves .grad as the step's gradient)
        grads[mode] = torch.cat([p.grad.flatten() for p in model.parameters()])
    for mode, g in grads.items():
        torch.testing.assert_close(g, grads["plain"], rtol=1e-4, atol=1e-6, msg=mode)
