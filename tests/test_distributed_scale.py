"""The data-parallel tracker at 2, 1,024 and 16,384 processes, simulated in one process.

torch's fake process group (``backend="fake"`` with ``FakeStore``, from
``torch.testing._internal.distributed.fake_pg``) is a real ``ProcessGroup`` of any size whose
collectives complete at once without communicating: this process is rank 0 of W. The tracker's
per-step path runs on it unchanged — its hooks, packing the buffer, ``dist.all_reduce(...,
async_op=True)``, the wait, :func:`noisescale.sources.distributed.resolve`, the state update and
the history record — so anything in that path that grew with W (a row per rank, a loop over
ranks, per-rank lists in the history) shows here as work or memory growing with W. Work is
counted, not timed: the Python lines executed and the torch operators run by one
``tracker.step()`` are the same on any machine under any load, and a loop over 16,384 ranks
adds at least 16,384 of one or the other (a wall-clock bound here failed once on a loaded CI
host with nothing changed: the step times are ``bench/distributed_scale.py``'s). The
statistics themselves mean nothing (the "sum" over W ranks is this rank's buffer alone); only
their cost is measured.

DDP runs over the fake group with the no-op communication hook: its reducer expects each
all-reduce future to hold the bucket, which the fake group's do not, and keeping each rank's
local gradient is all a fake group can stand for anyway. The hand-averaged path
(``process_group=`` with a plain model) runs beside it. All six trackers (two set-ups × three
W) step in turn on the same batches.
"""

from __future__ import annotations

import gc
import json
import sys
import tracemalloc
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import noisescale
from noisescale.sources import distributed as dsrc

WORLDS = (2, 1024, 16384)
SETUPS = ("ddp", "manual")
WARMUP, COUNTED, TRACED = 8, 30, 10  # steps: the audits run on steps 1, 2, 4, 8, 16, 32, …
# Python lines executed and torch operators run by tracker.step() at W, over W = 2's on the same
# step (a few thousand lines, a few dozen operators): W >= 1,024 adds only the note that the
# meaningless estimate is unavailable, while anything done per rank adds >= 16,384
WORK_FACTOR = 1.25
# Python heap per step at W over W = 2. At W >= 1,024 the fake sums make every estimate
# unavailable, so each record carries a note of ~150 characters that W = 2's does not (~3 KiB
# kept per step in all); anything kept per rank would add >= 8 bytes x 16,384 = 128 KiB.
MEMORY_FACTOR = 1.25
RECORD_BYTES = 1024  # a history record, as JSON


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))


@pytest.fixture(scope="module")
def measured():
    """Per (set-up, W): the Python lines tracker.step() executed, its torch operators and
    allocations, the Python heap kept and used per step, the history records and the tensors
    the tracker all-reduced."""
    from torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks import noop_hook
    from torch.nn.parallel import DistributedDataParallel
    from torch.profiler import ProfilerActivity, profile
    from torch.testing._internal.distributed.fake_pg import FakeStore

    assert not dist.is_initialized()
    threads = torch.get_num_threads()
    # one thread: with two on a busy two-core machine, a preempted OpenMP thread can stall a
    # tiny backward pass for tens of milliseconds
    torch.set_num_threads(1)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=max(WORLDS))
    try:
        groups = {w: dist.new_group(list(range(w))) for w in WORLDS if w != max(WORLDS)}
        groups[max(WORLDS)] = dist.group.WORLD
        runs = {}
        for setup in SETUPS:
            for w in WORLDS:
                model = _model()
                if setup == "ddp":
                    model = DistributedDataParallel(model, process_group=groups[w])
                    model.register_comm_hook(None, noop_hook)
                tracker = noisescale.GradientNoiseTracker(
                    model,
                    sync_every=1,  # every step waits for its all-reduce and resolves it
                    process_group=groups[w] if setup == "manual" else None,
                )
                opt = torch.optim.SGD(model.parameters(), lr=0.1)
                runs[setup, w] = {"model": model, "tracker": tracker, "opt": opt}
        assert all(dist.get_world_size(groups[w]) == w for w in WORLDS)

        reduced: list[tuple[int, torch.dtype]] = []
        all_reduce = dist.all_reduce

        def spy(tensor, *args, **kwargs):
            reduced.append((tensor.numel(), tensor.dtype))
            return all_reduce(tensor, *args, **kwargs)

        g = torch.Generator().manual_seed(1)

        def backward(run: dict) -> torch.Tensor:
            x, y = torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
            loss = F.cross_entropy(run["model"](x), y)
            loss.backward()
            return loss

        def optimizer_step(run: dict) -> None:
            run["opt"].step()
            run["opt"].zero_grad()

        lines = [0]

        def tracer(frame, event, arg):
            lines[0] += event == "line"
            return tracer

        out = {key: {"lines": [], "reduced": []} for key in runs}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the fake statistics are not meaningful
            for _ in range(WARMUP):
                for run in runs.values():
                    run["tracker"].step(loss=backward(run))
                    optimizer_step(run)
            for _ in range(COUNTED):
                for key, run in runs.items():
                    loss = backward(run)
                    dist.all_reduce = spy
                    lines[0] = 0
                    sys.settrace(tracer)
                    try:
                        run["tracker"].step(loss=loss)
                    finally:
                        sys.settrace(None)
                        dist.all_reduce = all_reduce
                    out[key]["lines"].append(lines[0])
                    optimizer_step(run)
                    out[key]["reduced"].extend(reduced)
                    reduced.clear()
            for key, run in runs.items():
                loss = backward(run)
                with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                    run["tracker"].step(loss=loss)
                optimizer_step(run)
                out[key]["torch_bytes"] = sum(
                    e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0
                )
                out[key]["torch_ops"] = len(prof.events())
            for key, run in runs.items():
                gc.collect()  # garbage left by earlier steps would be counted as kept
                tracemalloc.start()
                try:
                    before, peak = tracemalloc.get_traced_memory()[0], 0
                    for _ in range(TRACED):
                        loss = backward(run)
                        current = tracemalloc.get_traced_memory()[0]
                        tracemalloc.reset_peak()
                        run["tracker"].step(loss=loss)
                        peak = max(peak, tracemalloc.get_traced_memory()[1] - current)
                        optimizer_step(run)
                    gc.collect()
                    kept = tracemalloc.get_traced_memory()[0] - before
                finally:
                    tracemalloc.stop()
                out[key]["kept_per_step"] = kept / TRACED
                out[key]["peak_per_step"] = peak
        for key, run in runs.items():
            out[key]["history"] = run["tracker"].history
            run["tracker"].remove()
        yield out
    finally:
        dist.destroy_process_group()
        torch.set_num_threads(threads)


@pytest.mark.parametrize("setup", SETUPS)
def test_one_fixed_size_all_reduce_per_step(measured, setup):
    """Whatever W, each tracked step all-reduces one float64 buffer of WIDTH numbers."""
    for w in WORLDS:
        assert measured[setup, w]["reduced"] == [(dsrc.WIDTH, torch.float64)] * COUNTED, w


@pytest.mark.parametrize("setup", SETUPS)
def test_work_per_step_does_not_grow_with_the_number_of_processes(measured, setup):
    """The Python lines tracker.step() executes — pack, all-reduce, wait, resolve, update,
    record — at 1,024 and 16,384 processes are within WORK_FACTOR of W = 2's on the same step,
    and so are the torch operators it runs."""
    base = measured[setup, 2]
    assert min(base["lines"]) > 100 and base["torch_ops"] > 10  # the counters see the step
    for w in WORLDS[1:]:
        got = measured[setup, w]
        for step, (n, n2) in enumerate(zip(got["lines"], base["lines"], strict=True)):
            assert n <= WORK_FACTOR * n2, f"W = {w}, step {step}: {n} lines against {n2} at W = 2"
        assert got["torch_ops"] <= WORK_FACTOR * base["torch_ops"], (w, got["torch_ops"])


@pytest.mark.parametrize("setup", SETUPS)
def test_memory_per_step_does_not_grow_with_the_number_of_processes(measured, setup):
    """Torch's allocations in one tracker.step() (the profiler's memory events) are the same at
    every W; the Python heap it keeps (history, state) and uses at its peak, per step, is
    within MEMORY_FACTOR of W = 2's."""
    base = measured[setup, 2]
    assert base["torch_bytes"] > 0 and base["kept_per_step"] > 0
    for w in WORLDS[1:]:
        got = measured[setup, w]
        assert got["torch_bytes"] == base["torch_bytes"], w
        for key in ("kept_per_step", "peak_per_step"):
            assert got[key] <= MEMORY_FACTOR * base[key], (w, key, got[key], base[key])


@pytest.mark.parametrize("setup", SETUPS)
def test_history_records_do_not_grow_with_the_number_of_processes(measured, setup):
    """The same fields at every W (counts, not per-rank lists), each record under 1 KiB."""

    def shape(value):
        if isinstance(value, dict):
            return {k: shape(v) for k, v in value.items() if k != "unavailable"}
        return type(value).__name__ if not isinstance(value, list) else ["list"]

    steps = WARMUP + COUNTED + 1 + TRACED
    want = shape(measured[setup, 2]["history"][-1])
    for w in WORLDS:
        history = measured[setup, w]["history"]
        assert len(history) == steps
        for record in history:
            assert len(json.dumps(record)) < RECORD_BYTES
        assert shape(history[-1]) == want, w
        assert history[-1]["sources"]["local"]["lacking"] == w - 1  # one rank's buffer, summed
