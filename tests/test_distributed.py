"""Data-parallel tracking (paper App. A.1) against one process on the same global batch.

Two CPU processes (gloo) run DDP, FSDP2 and a hand-averaged model on fixed data; the single-process
reference accumulates the same examples as micro-batches, one per process's local batch, with the
same example weights, so its ``.grad`` is the averaged gradient. What must then match per step:

* b_big and |G_big|² (the global big batch, from the example weights of all processes);
* the ``"per_example"`` source (mean per-example norm over all processes' examples);
* the data-parallel ``"local"`` source = the reference's ``"microbatch"`` source when each process
  runs one backward pass (the W local batches are its micro-batches); with accumulation the local
  gradients are checked against autograd directly;
* the ``"microbatch"`` source under ``no_sync()`` = the reference's over all micro-batches;
* hence, with the same sources, the combined g2, tr Σ and B_simple.

The models are float64, so the only rounding is the tracker's float32 read of its device
statistics; tolerances are derived from it (:func:`a2_tolerance`).
"""

from __future__ import annotations

import functools
import json
import math
import multiprocessing
import os
import socket
import sys
import time
import traceback
import warnings
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import noisescale
from noisescale import estimators as est
from noisescale.errors import NoiseScaleInputError, UnsupportedModuleError
from noisescale.sources import distributed as dsrc

WORLD = 2
D_IN, D_HID, D_OUT = 6, 5, 3
LR = 0.5
CRASH_TIMEOUT_S = 20  # init_process_group(timeout=): the longest a collective may wait
F32 = float(np.finfo(np.float32).eps)

# scenario -> (set-up, per step: each process's micro-batch sizes)
EVEN = [[[6], [6]], [[6], [6]], [[6], [6]]]
UNEVEN = [[[6], [6]], [[7], [3]], [[5], [1]]]
ACCUM = [[[4, 3], [4, 4]], [[3, 3], [3, 2]], [[2, 5], [4, 1]]]
ONE_ACCUMULATES = [[[4, 3], [6]], [[4, 3], [6]]]  # process 1 has no micro-batch source
SCENARIOS: dict[str, tuple[str, list[list[list[int]]]]] = {
    "ddp_even": ("ddp", EVEN),
    "ddp_uneven": ("ddp", UNEVEN),
    "ddp_no_sync": ("ddp", ACCUM),
    "ddp_bucket_view_no_sync": ("ddp_bucket_view", ACCUM),
    "ddp_amp": ("ddp_amp", EVEN),
    "ddp_sync_every_pass": ("ddp_sync_all", ACCUM),
    "ddp_one_accumulates": ("ddp", ONE_ACCUMULATES),
    "manual": ("manual", EVEN),
    "fsdp2": ("fsdp", UNEVEN),
    "fsdp2_accumulate": ("fsdp", ACCUM),
    # a parameter the root uses directly (x * self.scale): the engine hands that forward an
    # alias of it, and the hooks must still sit on FSDP2's unsharded parameter
    "fsdp2_direct_accumulate": ("fsdp_direct", ACCUM),
    # HSDP on a 2×1 mesh: two replicas of one shard, every gradient element held twice
    "hsdp": ("hsdp", UNEVEN),
    # measure_every=2: steps 1 and 3 measured, step 2's examples counted over the processes
    "ddp_every2": ("ddp_every2", UNEVEN),
    # ... resumed after step 2 from process 0's checkpoint, loaded by every process
    "ddp_every2_resumed": ("ddp_resumed_every2", UNEVEN),
    # DDP(static_graph=True): its first iteration learns which parameters it all-reduces
    "ddp_static": ("ddp_static", UNEVEN),
    # torch.compile(DDP(model)): the wrapper hides DDP from the tracker
    "ddp_compiled": ("ddp_compiled", UNEVEN),
    "fsdp2_every2": ("fsdp_every2", UNEVEN),
    # nn.MultiheadAttention sharded as a block: it reads out_proj.weight without calling
    # out_proj, whose gradient the hooks must still see (refused as a swapped weight until
    # 2026-12-07, the data-parallel fuzzer's seed 26)
    "fsdp2_attention": ("fsdp_attention", UNEVEN),
    # a block that reads its Linear's weight outside the Linear too, sharded by itself: its
    # direct use is followed from the block's forward, where FSDP2 has unsharded it (the
    # model's pre-hook met the sharded DTensor until 2026-12-07, the fuzzer's seed 502)
    "fsdp2_reuse": ("fsdp_reuse", UNEVEN),
    # a block that reads a grandchild's weight without calling it (its holder in a ModuleDict):
    # hooked from any ancestor's pre-hook (a review of 2026-12-07: only children's were, and
    # tr Σ read 10% low without a word)
    "fsdp2_grandchild": ("fsdp_grandchild", UNEVEN),
}


class Scaled(nn.Sequential):
    """The MLP with a parameter used directly on its input, outside any layer."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__(*layers)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, D_IN, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x * self.scale)


class Attention(nn.Module):
    """Self-attention over two tokens made from each example's hidden vector."""

    def __init__(self) -> None:
        super().__init__()
        self.m = nn.MultiheadAttention(D_HID, 1, batch_first=True)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        tokens = torch.stack([h, h.tanh()], 1)
        return self.m(tokens, tokens, tokens, need_weights=False)[0].mean(1)


class Reuse(nn.Module):
    """A Linear, and its weight used once more outside it."""

    def __init__(self) -> None:
        super().__init__()
        self.m = nn.Linear(D_HID, D_HID)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.m(h) + torch.tanh(h @ self.m.weight.T)


class Deep(nn.Module):
    """A layer that reads its grandchild's weight directly (never calling its holder)."""

    def __init__(self) -> None:
        super().__init__()
        self.deep = nn.ModuleDict({"inner": nn.Linear(D_HID, D_HID, bias=False)})

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + 0.5 * torch.tanh(h @ self.deep["inner"].weight.T)


def make_model(setup: str = "") -> nn.Module:
    torch.manual_seed(0)
    # 5 output rows of the first layer and 3 of the second: uneven shards over 2 processes
    layers = (nn.Linear(D_IN, D_HID), nn.Tanh(), nn.Linear(D_HID, D_OUT))
    if setup.endswith("_attention"):  # (model[2], sharded by itself: the attention)
        layers = (nn.Linear(D_IN, D_HID), nn.Tanh(), Attention(), nn.Linear(D_HID, D_OUT))
    if setup.endswith("_grandchild"):  # (model[2], sharded by itself)
        layers = (nn.Linear(D_IN, D_HID), nn.Tanh(), Deep(), nn.Linear(D_HID, D_OUT))
    if setup.endswith("_reuse"):
        layers = (nn.Linear(D_IN, D_HID), nn.Tanh(), Reuse(), nn.Linear(D_HID, D_OUT))
    return (Scaled if setup.endswith("_direct") else nn.Sequential)(*layers).double()


def micro_batch(steps: list, t: int, r: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro-batch j of process r at step t: the same tensors in the workers and the reference."""
    n = steps[t][r][j]
    g = torch.Generator().manual_seed(1000 * t + 100 * r + j + 7 * len(steps[t][r]))
    x = torch.randn(n, D_IN, generator=g, dtype=torch.float64)
    y = torch.randint(0, D_OUT, (n,), generator=g)
    return x, y


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- worker side (runs in the spawned processes) -------------------------------------------------


def _init(rank: int, port: int, timeout_s: float) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=timeout_s),
    )


def _average_by_hand(model: nn.Module) -> None:
    """What a loop with process_group= does after its last backward: the mean over WORLD."""
    for p in model.parameters():
        torch.distributed.all_reduce(p.grad)
        p.grad /= WORLD


def _optimizer_step(opt: torch.optim.Optimizer, scaler) -> None:
    if scaler is None:
        opt.step()
    else:
        scaler.step(opt)
        scaler.update()
    opt.zero_grad()


def _run_scenario(rank: int, setup: str, steps: list) -> dict:
    import warnings

    from torch.nn.parallel import DistributedDataParallel

    model = make_model(setup)
    group = None
    if setup.startswith("ddp"):
        # .grad as views into DDP's buckets: the hooks must still see the local sums
        model = DistributedDataParallel(
            model,
            gradient_as_bucket_view=setup == "ddp_bucket_view",
            static_graph=setup == "ddp_static",
        )
        if setup == "ddp_compiled":
            torch._dynamo.reset()
            model = torch.compile(model, backend="aot_eager")
    elif setup.startswith(("fsdp", "hsdp")):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # HSDP: (replicate, shard) = (2, 1), so each process holds whole, replicated shards
        mesh = (
            init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("replicate", "shard"))
            if setup == "hsdp"
            else None
        )
        fully_shard(model[0], mesh=mesh)
        fully_shard(model[2], mesh=mesh)
        fully_shard(model, mesh=mesh)
    else:
        group = torch.distributed.group.WORLD
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    # a power of two: the loss scale divides out exactly
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0) if setup == "ddp_amp" else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kwargs = dict(
            beta=1.0,
            sync_every=2,
            optimizer=opt,
            process_group=group,
            scaler=scaler,
            per_example_fraction=1.0,  # exact per-step comparison: every example
            measure_every=2 if setup.endswith("_every2") else 1,
        )
        tracker = noisescale.GradientNoiseTracker(model, **kwargs)
        for t, sizes in enumerate(steps):
            k = len(sizes[rank])
            for j in range(k):
                x, y = micro_batch(steps, t, rank, j)
                last = j == k - 1
                if setup in ("ddp", "ddp_bucket_view") and not last:
                    with model.no_sync():
                        (F.cross_entropy(model(x), y) / k).backward()
                else:
                    if setup.startswith(("fsdp", "hsdp")):
                        model.set_requires_gradient_sync(last)
                    loss = F.cross_entropy(model(x), y) / k
                    (loss if scaler is None else scaler.scale(loss)).backward()
            if setup == "manual":
                _average_by_hand(model)
            tracker.step(loss=loss)
            _optimizer_step(opt, scaler)
            if "_resumed" in setup and t == 1:
                tracker = _resumed_from_rank_0(tracker, model, **kwargs)
        e = tracker.estimate()
        history = tracker.history
    return {
        "history": history,
        "estimate": [e.g2, e.trace_sigma, e.b_simple, e.low, e.high],
        "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
    }


def _resumed_from_rank_0(
    tracker: noisescale.GradientNoiseTracker, model: nn.Module, **kwargs
) -> noisescale.GradientNoiseTracker:
    """The usual checkpoint: process 0 saves the tracker's state, every process loads it into
    a new tracker."""
    saved = [tracker.state_dict() if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(saved, src=0)
    tracker.remove()
    resumed = noisescale.GradientNoiseTracker(model, **kwargs)
    resumed.load_state_dict(saved[0])
    return resumed


# -- a language model whose loss weighs tokens (noisescale.tokens) --------------------------------

LM_STEPS, LM_SEQ = 3, 4  # steps; sequences per process per step


def _lm_model() -> nn.Module:
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=12, bos_token_id=0,
        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg).double()


def _lm_batch(t: int, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Process r's padded sequences at step t: ids, attention mask, labels (-100 on padding)."""
    g = torch.Generator().manual_seed(100 * t + r)
    ids = torch.randint(0, 32, (LM_SEQ, 12), generator=g)
    lengths = torch.randint(3, 13, (LM_SEQ,), generator=g)
    mask = torch.arange(12)[None] < lengths[:, None]
    return ids, mask.long(), torch.where(mask, ids, -100)


def _lm_run(rank: int | None, measure_every: int = 1, resumed: bool = False) -> list[dict]:
    """DDP over the processes (rank given), or one process accumulating every process's batch
    as a micro-batch with the same weights (the model's mean loss over its tokens, / WORLD);
    ``resumed``: from process 0's checkpoint after step 2."""
    from torch.nn.parallel import DistributedDataParallel

    model = _lm_model()
    if rank is not None:
        model = DistributedDataParallel(model)
    kwargs = dict(beta=1.0, per_example_fraction=1.0, measure_every=measure_every)
    tracker = noisescale.GradientNoiseTracker(model, **kwargs)
    for t in range(LM_STEPS):
        for r in [rank] if rank is not None else range(WORLD):
            ids, mask, labels = _lm_batch(t, r)
            loss = model(ids, attention_mask=mask, labels=labels).loss
            (loss if rank is not None else loss / WORLD).backward()
        tracker.step()
        model.zero_grad()
        if resumed and t == 1:
            tracker = _resumed_from_rank_0(tracker, model, **kwargs)
    history = tracker.history
    tracker.remove()
    return history


def _uneven_lm_batch(t: int, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As :func:`_lm_batch`, process 1's sequences longer (8–12 tokens) than process 0's (2–12):
    the processes' token counts differ, so how a loss weighs them across processes shows."""
    g = torch.Generator().manual_seed(100 * t + r)
    ids = torch.randint(0, 32, (LM_SEQ, 12), generator=g)
    lengths = torch.randint(2 if r == 0 else 8, 13, (LM_SEQ,), generator=g)
    mask = torch.arange(12)[None] < lengths[:, None]
    return ids, mask.long(), torch.where(mask, ids, -100)


def _lm_declared_run(rank: int | None, divisor: str) -> list[dict] | str:
    """A causal-LM loss by hand, declared loss_reduction='num_items_in_batch': each process's
    summed token loss divided by the step's tokens over all processes, times WORLD (as the
    Trainer does with average_tokens_across_devices), so every token weighs the same in the
    averaged .grad. ``divisor``: how the tracker learns that — ``"given"``:
    count_tokens(num_items_in_batch=count / WORLD); ``"watched"``: num_items_in_batch=count
    and watch_loss before the multiplication by WORLD; ``"none"``: count_tokens(labels)
    alone (refused under DDP: returns the message). ``rank`` None: one process accumulating
    every process's batch (the loss divided by the step's count, nothing given)."""
    from torch.nn.parallel import DistributedDataParallel

    model = _lm_model()
    if rank is not None:
        model = DistributedDataParallel(model)
    tracker = noisescale.GradientNoiseTracker(
        model, beta=1.0, per_example_fraction=1.0, loss_reduction="num_items_in_batch"
    )
    try:
        for t in range(LM_STEPS):
            batches = [_uneven_lm_batch(t, r) for r in range(WORLD)]
            total = sum(int((b[2][:, 1:] != -100).sum()) for b in batches)
            for r in [rank] if rank is not None else range(WORLD):
                ids, mask, labels = batches[r]
                logits = model(ids, attention_mask=mask).logits
                shifted = labels[:, 1:]
                summed = F.cross_entropy(
                    logits[:, :-1].flatten(0, 1), shifted.flatten(), reduction="sum"
                )
                loss = summed / total
                if rank is None or divisor == "none":
                    tracker.count_tokens(shifted)
                elif divisor == "given":
                    tracker.count_tokens(shifted, num_items_in_batch=torch.tensor(total / WORLD))
                else:
                    tracker.count_tokens(shifted, num_items_in_batch=total)
                    tracker.watch_loss(loss)
                (loss * WORLD if rank is not None else loss).backward()
            tracker.step()
            model.zero_grad()
        return tracker.history
    except noisescale.NoiseScaleInputError as exc:
        return str(exc)
    except Exception as exc:  # (kept from the other scenarios' processes)
        return f"{type(exc).__name__}: {exc}"
    finally:
        tracker.remove()


def _worker(rank: int, port: int, out: str) -> None:
    """All scenarios, then a crash (one process start-up is most of the cost)."""
    _init(rank, port, timeout_s=CRASH_TIMEOUT_S)
    results = {name: _run_scenario(rank, *SCENARIOS[name]) for name in SCENARIOS}
    results["tokens"] = {"history": _lm_run(rank)}
    results["tokens_every2"] = {"history": _lm_run(rank, measure_every=2)}
    results["tokens_every2_resumed"] = {"history": _lm_run(rank, measure_every=2, resumed=True)}
    results["short_window"] = _short_window(rank)
    results["tokens_declared"] = {
        d: _lm_declared_run(rank, d) for d in ("given", "watched", "none")
    }
    results["misuse"] = _misuse()
    results["hand_averaging"] = _manual_averaging(rank)
    results["comm_hooks"] = _comm_hooks(rank)
    results["syncs"] = _count_syncs(rank)
    results["parallelism"] = _parallelism(rank)
    Path(out, f"{rank}.json").write_text(json.dumps(results))
    _crash(rank, out)


class _PickedPair(nn.Module):
    """A head on rows picked by index pairs, h[b, t] with b, t from a mask's nonzero()."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, t = keep.nonzero(as_tuple=True)
        return self.head(torch.tanh(self.body(x))[b, t]).pow(2).sum(-1)


def _misuse() -> dict[str, str]:
    """What a user is told when the set-up cannot give the data-parallel estimate."""
    import warnings

    from torch.nn.parallel import DistributedDataParallel

    out = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        noisescale.GradientNoiseTracker(make_model())  # e.g. created before wrapping in DDP
    out["plain_model"] = " ".join(str(w.message) for w in caught)
    for mode, kw in (("", {}), ("_micro", {"per_example": False})):
        try:  # DDP(torch.compile(model)): Dynamo failed on the per-example hooks in DDP's forward
            noisescale.GradientNoiseTracker(
                DistributedDataParallel(torch.compile(make_model(), backend="aot_eager")), **kw
            ).remove()
            out[f"ddp_of_compiled{mode}"] = "accepted"
        except NoiseScaleInputError as err:
            out[f"ddp_of_compiled{mode}"] = str(err)
    # a static-graph DDP resumed: its new first iteration runs with the hooks idle as well
    x0, y0 = micro_batch(EVEN, 0, 0, 0)
    first = noisescale.GradientNoiseTracker(DistributedDataParallel(make_model()))
    F.cross_entropy(first.model(x0), y0).backward()
    first.step()
    state = first.state_dict()
    first.remove()
    ddp = DistributedDataParallel(make_model(), static_graph=True)
    resumed = noisescale.GradientNoiseTracker(ddp)
    resumed.load_state_dict(state)
    xs, ys = micro_batch(UNEVEN, 1, torch.distributed.get_rank(), 0)
    F.cross_entropy(ddp(xs), ys).backward()
    grads = torch.cat([p.grad.flatten() for p in ddp.parameters()])
    both = [torch.zeros_like(grads) for _ in range(WORLD)]
    torch.distributed.all_gather(both, grads)
    resumed.step()
    resumed.remove()
    out["static_resumed_averaged"] = bool(torch.equal(both[0], both[1]))
    # DDP.join() (here with equal inputs: uneven ones abort the processes, the collectives
    # paired wrongly): warned at the first step, on every process
    ddp = DistributedDataParallel(make_model())
    joined = noisescale.GradientNoiseTracker(ddp)
    with ddp.join(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        F.cross_entropy(ddp(xs), ys).backward()
        joined.step()
    joined.remove()
    out["join"] = " ".join(str(w.message) for w in caught)
    # the tracker on the plain model, which a DistributedDataParallel then runs: created after
    # the tracker, or its .module given to the tracker, or around a module holding the tracked
    # one; refused at the first forward, on every process alike (no collective is left waiting)
    x, y = micro_batch(EVEN, 0, 0, 0)

    def tracked(model: nn.Module) -> noisescale.GradientNoiseTracker:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (the plain model's warning, tested above)
            return noisescale.GradientNoiseTracker(model)

    def after() -> tuple[noisescale.GradientNoiseTracker, nn.Module]:
        model = make_model()
        tracker = tracked(model)
        return tracker, DistributedDataParallel(model)

    def inner() -> tuple[noisescale.GradientNoiseTracker, nn.Module]:
        ddp = DistributedDataParallel(make_model())
        return tracked(ddp.module), ddp

    def part() -> tuple[noisescale.GradientNoiseTracker, nn.Module]:
        ddp = DistributedDataParallel(make_model())
        return tracked(ddp.module[0]), ddp

    def later() -> tuple[noisescale.GradientNoiseTracker, nn.Module]:
        # four steps of the plain model first: the wrap falls on step 5, which no audit does
        model = make_model()
        tracker = tracked(model)
        for _ in range(4):
            F.cross_entropy(model(x), y).backward()
            tracker.step()
            model.zero_grad()
        return tracker, DistributedDataParallel(model)

    for name, build in (
        ("ddp_after", after),
        ("ddp_inner", inner),
        ("ddp_part", part),
        ("ddp_later", later),
    ):
        tracker, ddp = build()
        try:
            F.cross_entropy(ddp(x), y).backward()
            tracker.step()
            out[name] = "accepted"
        except NoiseScaleInputError as e:
            out[name] = str(e)
        tracker.remove()
    # rows picked by index pairs, compared on the device as on an accelerator: the second
    # process's step 6 picks [2, 1, 1, 0] rows (as many as examples, not the examples); the
    # processes that found one are counted in the all-reduce, so both refuse step 6 when they
    # read it, keeping steps 1-5
    import noisescale.per_example.graph as graph_mod

    reads = graph_mod._host_reads_indices
    graph_mod._host_reads_indices = lambda index: False
    try:
        model = DistributedDataParallel(_PickedPair())
        tracker = noisescale.GradientNoiseTracker(model, "sum", sync_every=8)
        h = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(7))
        for step in range(6):
            keep = torch.zeros(4, 3, dtype=torch.bool)
            bad = step == 5 and torch.distributed.get_rank() == 1
            counts = [2, 1, 1, 0] if bad else [1, 1, 1, 1]
            for i, c in enumerate(counts):
                keep[i, :c] = True
            model(h, keep).sum().backward()
            tracker.step()
            model.zero_grad()
        try:
            tracker.sync()
            out["picked_rows"] = "accepted"
        except UnsupportedModuleError as e:
            out["picked_rows"] = f"{[r['step'] for r in tracker.history]} {e}"
        tracker.remove()
    finally:
        graph_mod._host_reads_indices = reads
    # FSDP2's fully_shard after the tracker replaces the parameters: refused at the step
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    tracker = tracked(model)
    fully_shard(model)
    try:
        F.cross_entropy(model(x), y).backward()
        tracker.step()
        out["fsdp_after"] = "accepted"
    except NoiseScaleInputError as e:
        out["fsdp_after"] = str(e)
    tracker.remove()
    model = DistributedDataParallel(make_model())
    tracker = noisescale.GradientNoiseTracker(model)
    with model.no_sync():
        F.cross_entropy(model(x), y).backward()
    try:
        tracker.step()
        out["step_after_no_sync"] = "accepted"
    except NoiseScaleInputError as e:
        out["step_after_no_sync"] = str(e)
    tracker.remove()
    # clipped before tracker.step(): DDP wrote the averaged .grad before the engine noted its
    # version at the end of the backward, so only the clipping counts. FSDP2: an in-place change
    # of a sharded DTensor gradient bumps no version counter; the first step is audited, and
    # there |.grad|² is compared by value
    from torch.distributed.fsdp import fully_shard

    def fsdp2() -> nn.Module:
        model = make_model()
        fully_shard(model[0])
        fully_shard(model[2])
        fully_shard(model)
        return model

    for name, wrapped in (("", lambda: DistributedDataParallel(make_model())), ("fsdp_", fsdp2)):
        for clip in (False, True):
            model = wrapped()
            tracker = noisescale.GradientNoiseTracker(model)
            F.cross_entropy(model(x), y).backward()
            if clip:
                nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
            try:
                tracker.step()
                out[f"{name}clipped_{clip}"] = "accepted"
            except NoiseScaleInputError as e:
                out[f"{name}clipped_{clip}"] = str(e)
            tracker.remove()
    try:  # the compiled wrapper hides the FSDP2 root
        noisescale.GradientNoiseTracker(torch.compile(fsdp2(), backend="aot_eager"))
        out["fsdp_compiled"] = "accepted"
    except NoiseScaleInputError as e:
        out["fsdp_compiled"] = str(e)
    # a GRU whose output is its fully_shard block's output: its output's gradient arrives before
    # FSDP2 gathers the block's weights again (reshard_after_forward=True), and the GRU's
    # per-example gradients recompute the recurrence from them (a raw DTensor RuntimeError
    # until 2026-12-07, the fuzzer's seed 336); with the weights kept unsharded, measured
    for reshard in (False, True):
        model = nn.Sequential(
            nn.Linear(D_IN, D_HID), _Recurrent(), nn.Flatten(), nn.Linear(2 * D_HID, D_OUT)
        ).double()
        fully_shard(model[1], reshard_after_forward=reshard)
        fully_shard(model)
        tracker = noisescale.GradientNoiseTracker(model, per_example_fraction=1.0)
        try:
            F.cross_entropy(model(x), y).backward()
            tracker.step()
            out[f"fsdp_gru_block_{reshard}"] = str(sorted(tracker.history[0]["sources"]))
        except UnsupportedModuleError as e:
            out[f"fsdp_gru_block_{reshard}"] = str(e)
        tracker.remove()
    # a tensor of the parameters alone that meets the batch in the loss: its per-example
    # gradients go back to the parameters by a second backward through the model's graph,
    # whose unsharded parameters FSDP2 freed after the forward (reshard_after_forward=True)
    # and gathers again only when the model's outputs get their gradient (a raw "storage of
    # size 0" RuntimeError until 2026-12-07, the fuzzer's seeds 7 and 300)
    model = _SharedOutput()
    fully_shard(model, reshard_after_forward=True)
    tracker = noisescale.GradientNoiseTracker(model)
    try:
        out_x, shared = model(x)
        F.cross_entropy(out_x + shared.expand(len(x), -1), y).backward()
        tracker.step()
        out["fsdp_freed"] = "accepted"
    except UnsupportedModuleError as e:
        out["fsdp_freed"] = str(e)
    tracker.remove()
    # a Linear on the examples' rows flattened [N·T, D]: their attribution is checked by a
    # replay of the backward, which FSDP2 rules out; refused at once naming that (until
    # 2026-12-07 learned as shared, then refused as an output whose rows were not followed —
    # the wrong cause; the data-parallel fuzzer's seed 238)
    model = _FlatRows()
    fully_shard(model, reshard_after_forward=False)
    tracker = noisescale.GradientNoiseTracker(model)
    try:
        for _ in range(2):
            F.cross_entropy(model(x), y).backward()
            tracker.step()
        out["fsdp_flat_rows"] = "accepted"
    except UnsupportedModuleError as e:
        out["fsdp_flat_rows"] = f"step {len(tracker.history) + 1}: {e}"
    tracker.remove()
    return out


class _FlatRows(nn.Module):
    """Two tokens per example, a Linear on their rows flattened, the logits from both."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(D_IN, 2 * D_HID).double()
        self.m = nn.Linear(D_HID, D_HID).double()
        self.head = nn.Linear(2 * D_HID, D_OUT).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x).view(len(x), 2, D_HID)
        return self.head(torch.tanh(self.m(h.reshape(-1, D_HID))).view(len(x), -1))


class _SharedOutput(nn.Module):
    """The logits, and a bias computed from parameters alone, returned apart."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D_IN, D_OUT).double()
        self.code = nn.Parameter(torch.ones(1, D_HID, dtype=torch.float64))
        self.bias = nn.Linear(D_HID, D_OUT).double()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lin(x), self.bias(self.code)


class _Recurrent(nn.Module):
    """A GRU over two steps made from each example's hidden vector, its output the block's."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(D_HID, D_HID, batch_first=True)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.gru(torch.stack([h, h.tanh()], 1))[0]


def _manual_averaging(rank: int) -> dict[str, dict]:
    """``process_group=`` on a plain model: the user averages ``.grad`` by hand. Each way of
    doing it, for 5 steps (audited: 1, 2 and 4) of 2 micro-batches: the records kept and what
    the step that was refused said (``None``: none was)."""
    world = torch.distributed.group.WORLD
    size = torch.distributed.get_world_size()
    # the projections in chunks of 7 elements: every weight and bias over several chunks
    dsrc._PROJECTION_CHUNK = 7

    def mean(model: nn.Module, step: int) -> None:
        _average_by_hand(model)

    def summed(model: nn.Module, step: int) -> None:
        for p in model.parameters():
            torch.distributed.all_reduce(p.grad)

    def clipped(model: nn.Module, step: int) -> None:
        mean(model, step)
        nn.utils.clip_grad_norm_(model.parameters(), 1e-3)

    def half(model: nn.Module, step: int) -> None:  # one layer left out of the averaging
        for p in model[0].parameters():
            torch.distributed.all_reduce(p.grad)
            p.grad /= size

    def summed_from_3(model: nn.Module, step: int) -> None:
        (summed if step >= 3 else mean)(model, step)

    # the averaging overlapped with the last backward: an asynchronous all-reduce started by
    # each parameter's post-accumulate-grad hook, waited for after the backward
    pending: list = []
    last = [False]

    def overlapped(model: nn.Module, step: int) -> None:
        for work, p in pending:
            work.wait()
            p.grad /= size
        pending.clear()

    def start(p: torch.Tensor) -> None:
        if last[0]:
            pending.append((torch.distributed.all_reduce(p.grad, async_op=True), p))

    ways = {
        "mean_overlapped": overlapped,
        "mean": mean,
        "sum": summed,
        "none": lambda model, step: None,
        "clipped": clipped,
        "half": half,
        "sum_from_step_3": summed_from_3,
        "mean_unscaled": mean,
    }
    out = {}
    for name, average in ways.items():
        model = make_model()
        scaler = None
        if name == "mean_unscaled":  # a GradScaler's unscale_ before tracker.step(), told
            scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        tracker = noisescale.GradientNoiseTracker(
            model, process_group=world, optimizer=opt, scaler=scaler, sync_every=1
        )
        if name == "mean_overlapped":
            for p in model.parameters():
                p.register_post_accumulate_grad_hook(start)
        refused, projected = None, []
        for t in range(5):
            for j in range(2):
                last[0] = j == 1
                x, y = micro_batch(ACCUM, t % 3, rank, j)
                loss = F.cross_entropy(model(x), y) / 2
                (loss if scaler is None else scaler.scale(loss)).backward()
            average(model, t + 1)
            # parameters projected in this step's backward: only on the audits' steps (1, 2, 4)
            projected.append(len(tracker._dist._projected))
            if scaler is not None:
                scaler.unscale_(opt)
            try:
                tracker.step(loss=loss)
            except NoiseScaleInputError as e:
                refused = f"step {t + 1}: {e}"
                break
            _optimizer_step(opt, scaler)
        out[name] = {"records": len(tracker.history), "refused": refused}
        if name == "mean":
            out["projected_per_step"] = projected
        tracker.remove()
    dsrc._PROJECTION_CHUNK = 1 << 22
    return out


def _comm_hooks(rank: int) -> dict[str, dict[str, list[float]]]:
    """DDP with fp16 and PowerSGD communication hooks: the tracker's local norms and |G_big|²
    against the exact local gradients and their exact average (autograd on a hook-free copy)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
    from torch.nn.parallel import DistributedDataParallel

    out = {}
    for name in ("fp16", "powersgd"):
        torch.manual_seed(0)
        inner = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 10))
        copy = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 10))
        model = DistributedDataParallel(inner)
        if name == "fp16":
            model.register_comm_hook(None, default_hooks.fp16_compress_hook)
        else:
            state = powerSGD_hook.PowerSGDState(
                None, matrix_approximation_rank=1, start_powerSGD_iter=2, min_compression_rate=0.5
            )
            model.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
        tracker = noisescale.GradientNoiseTracker(model, sync_every=1, per_example_fraction=1.0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(rank)
        big, local = [], []
        for _ in range(8):
            x, y = torch.randn(16, 20, generator=g), torch.randint(0, 10, (16,), generator=g)
            copy.load_state_dict(inner.state_dict())
            exact = torch.autograd.grad(F.cross_entropy(copy(x), y), list(copy.parameters()))
            flat = torch.cat([e.reshape(-1) for e in exact])
            # the local source keeps the mean over processes of their local |G|²
            local_exact = flat.pow(2).sum().reshape(1)
            torch.distributed.all_reduce(local_exact)
            local_exact = float(local_exact) / WORLD
            torch.distributed.all_reduce(flat)
            F.cross_entropy(model(x), y).backward()
            tracker.step()
            record = tracker.history[-1]
            big.append(record["sqnorm_big"] / float((flat / WORLD).pow(2).sum()))
            local.append(record["sources"]["local"]["sqnorm_small"] / local_exact)
            opt.step()
            opt.zero_grad()
        out[name] = {"big_ratio": big, "local_ratio": local}
    return out


SYNC_MODES = {
    "sub-batches": {},
    "subset": {"per_example_fraction": 1 / 8},
    "exact": {"per_example_fraction": 1.0},
    "micro-batches": {"per_example": False},
}


def _count_syncs(rank: int) -> dict[str, list[str]]:
    """Syncing calls made during tracked steps 5–7 (not audited) under DDP and FSDP2.

    The counting of ``tests/test_no_sync.py``, on its model (an embedding, a convolution, a
    LayerNorm and a parameter used directly), plus tensors made from host data
    (``torch.tensor``, ``torch.as_tensor``): on a GPU those are pageable host-to-device copies
    that wait for the device. The one place allowed to make them is the data-parallel
    source's ``_host_to_device``, which goes through pinned memory on CUDA.
    """
    import warnings

    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel
    from torch.overrides import TorchFunctionMode

    from test_no_sync import HOST_ONLY, SYNCING, Net

    counted = SYNCING | {"tensor", "as_tensor"}
    allowed = HOST_ONLY | {"_host_to_device"}

    class CountSyncs(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[str] = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            name, caller = getattr(func, "__name__", ""), sys._getframe(1).f_code.co_name
            if name in counted and caller not in allowed:
                self.calls.append(f"{name} in {caller}")
            return func(*args, **(kwargs or {}))

    def run(setup: str, kwargs: dict, accumulate: int) -> list[str]:
        torch.manual_seed(0)
        model = Net()
        if setup == "ddp":
            model = DistributedDataParallel(model)
        else:
            for layer in (model.emb, model.conv, model.up, model.down):
                fully_shard(layer)
            fully_shard(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        tracker = noisescale.GradientNoiseTracker(model, optimizer=opt, sync_every=100, **kwargs)
        g = torch.Generator().manual_seed(rank)

        def step() -> None:
            for j in range(accumulate):
                ids = torch.randint(0, 50, (12, 10), generator=g)
                y = torch.randint(0, 5, (12, 10), generator=g)
                last = j == accumulate - 1
                if setup == "fsdp":
                    model.set_requires_gradient_sync(last)
                with model.no_sync() if setup == "ddp" and not last else nullcontext():
                    loss = F.cross_entropy(model(ids).flatten(0, 1), y.flatten())
                    (loss / accumulate).backward()
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
        assert len(tracker.history) == 7
        tracker.remove()
        return counter.calls

    return {
        f"{setup}/{mode}/{accumulate}": run(setup, kwargs, accumulate)
        for setup in ("ddp", "fsdp")
        for mode, kwargs in SYNC_MODES.items()
        for accumulate in (1, 2)
    }


def _parallelism(rank: int) -> dict[str, str]:
    """What the tracker says under tensor and pipeline parallelism (both refused)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )
    from torch.nn.parallel import DistributedDataParallel

    def outcome(build) -> str:
        try:
            build()
        except NoiseScaleInputError as e:
            return str(e)
        return "accepted"

    def tp_plan():
        return {"0": ColwiseParallel(), "2": RowwiseParallel()}

    def tensor_parallel() -> None:
        mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("tp",))
        noisescale.GradientNoiseTracker(parallelize_module(make_model(), mesh, tp_plan()))

    def fsdp_tp(shape: tuple[int, int]) -> None:
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=("dp", "tp"))
        model = parallelize_module(make_model(), mesh["tp"], tp_plan())
        fully_shard(model[0], mesh=mesh["dp"])
        fully_shard(model[2], mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
        noisescale.GradientNoiseTracker(model)

    def pipeline_stage_first() -> None:
        # stage `rank` of a two-stage pipeline: refused at construction, on both processes
        stage_module = make_model()[:2] if rank == 0 else make_model()[2:]
        stage = PipelineStage(stage_module, rank, WORLD, torch.device("cpu"))
        noisescale.GradientNoiseTracker(stage_module)
        del stage

    solo = [torch.distributed.new_group([r]) for r in range(WORLD)][rank]

    def pipeline_tracker_first() -> None:
        # the tracker before the stage: refused at the schedule's first forward (one stage per
        # process on its own group, so the refusal leaves no peer waiting for activations)
        model = DistributedDataParallel(make_model(), process_group=solo)
        # (kept: a tracker no longer referenced has its hooks removed)
        _tracker = noisescale.GradientNoiseTracker(model)
        stage = PipelineStage(model, 0, 1, torch.device("cpu"), group=solo)
        schedule = ScheduleGPipe(stage, n_microbatches=2, loss_fn=F.cross_entropy)
        x, y = micro_batch(EVEN, 0, rank, 0)
        schedule.step(x, target=y)

    return {
        "tp": outcome(tensor_parallel),
        "fsdp_tp_1x2": outcome(lambda: fsdp_tp((1, WORLD))),
        "fsdp_tp_2x1": outcome(lambda: fsdp_tp((WORLD, 1))),
        "pp_stage_first": outcome(pipeline_stage_first),
        "pp_tracker_first": outcome(pipeline_tracker_first),
    }


def _accumulate_under_no_sync(model: nn.Module, steps: list, t: int, rank: int) -> None:
    """Step ``t`` of ``steps`` on this process: its micro-batches' mean losses, each divided by
    their count, backpropagated under DDP's no_sync() but the last."""
    k = len(steps[t][rank])
    for j in range(k):
        x, y = micro_batch(steps, t, rank, j)
        with model.no_sync() if j < k - 1 else nullcontext():
            (F.cross_entropy(model(x), y) / k).backward()


# process 1 drops from 2 micro-batches to 1 at step 2, process 0 keeps 2 (DDP accepts it)
SHORT_WINDOW = [[[3, 3], [2, 2]], [[3, 3], [4]], [[2, 2], [2, 2]]]


def _short_window(rank: int) -> dict:
    """SHORT_WINDOW under DDP with no_sync(), each process dividing by its own count: the
    parameters trained without a tracker and with one, the tracker's history and warnings."""
    import warnings

    from torch.nn.parallel import DistributedDataParallel

    out: dict = {}
    for tracked in (False, True):
        model = DistributedDataParallel(make_model())
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        tracker = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if tracked:
                tracker = noisescale.GradientNoiseTracker(
                    model, beta=1.0, sync_every=1, optimizer=opt, per_example_fraction=1.0
                )
            for t in range(len(SHORT_WINDOW)):
                _accumulate_under_no_sync(model, SHORT_WINDOW, t, rank)
                if tracker is not None:
                    tracker.step()
                opt.step()
                opt.zero_grad()
        params = float(sum(p.detach().abs().sum() for p in model.parameters()))
        if tracker is None:
            out["plain_params"] = params
        else:
            out.update(params=params, history=tracker.history)
            out["warnings"] = [str(w.message) for w in caught]
            tracker.remove()
    return out


def _unequal_windows_resumed(rank: int) -> dict:
    """DDP with no_sync(), process 0 accumulating 2 micro-batches a step and process 1 one, each
    dividing by its own count (constant windows, supported); process 0's checkpoint of the
    tracker loaded on both after step 2: its history and warnings, and (process 0) the
    checkpoint and the parameters it was saved with."""
    import warnings

    from torch.nn.parallel import DistributedDataParallel

    steps = [[[3, 3], [3]]] * 4
    model = DistributedDataParallel(make_model())
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    kwargs = dict(beta=1.0, sync_every=1, optimizer=opt, per_example_fraction=1.0)
    tracker = noisescale.GradientNoiseTracker(model, **kwargs)
    saved: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(len(steps)):
            _accumulate_under_no_sync(model, steps, t, rank)
            tracker.step()
            opt.step()
            opt.zero_grad()
            if t == 1:
                if rank == 0:
                    saved["checkpoint"] = tracker.state_dict()
                    saved["params"] = [p.detach().tolist() for p in model.module.parameters()]
                tracker = _resumed_from_rank_0(tracker, model, **kwargs)
        history = tracker.history
    tracker.remove()
    return {"history": history, "warnings": [str(w.message) for w in caught], **saved}


def _overflow_on_one_process(rank: int) -> dict:
    """DDP in float32 under a GradScaler grown to 2^62: at step 2 process 1's loss is 100 times
    larger, so its per-example squared norms of the scaled gradients overflow float32 (its
    .grad, and the other process's norms, stay finite). The parameters trained without a
    tracker and with one, the tracker's history and warnings."""
    import warnings

    from torch.nn.parallel import DistributedDataParallel

    out: dict = {}
    for tracked in (False, True):
        model = DistributedDataParallel(make_model().float())
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**62)
        tracker = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if tracked:
                tracker = noisescale.GradientNoiseTracker(
                    model, beta=1.0, sync_every=1, scaler=scaler, per_example_fraction=1.0
                )
            for t in range(3):
                x, y = micro_batch(EVEN, t, rank, 0)
                loss = F.cross_entropy(model(x.float()), y)
                scaler.scale(loss * (100.0 if t == 1 and rank == 1 else 1.0)).backward()
                if tracker is not None:
                    tracker.step()
                scaler.step(opt)
                scaler.update()
                opt.zero_grad()
        params = [p.detach().double().sum().item() for p in model.parameters()]
        if tracker is None:
            out["plain_params"] = params
        else:
            out.update(params=params, history=tracker.history)
            out["warnings"] = [str(w.message) for w in caught]
            tracker.remove()
    return out


def _no_token_lm() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(13, 4), nn.Linear(4, 13)).double()


def _no_token_run(ranks: tuple[int, ...], per_example: bool, group=None) -> dict:
    """A token mean over 2 micro-batches of 2 sequences per process, each process's own mean;
    at step 2 process 1's labels are all -100 (it counts no token). With ``ranks`` (0, 1) on one
    process: the processes' micro-batches accumulated in one step, the loss halved — the
    reference. The history, or the refusal, and the warnings."""
    import warnings

    model = _no_token_lm()
    gens = {r: torch.Generator().manual_seed(r) for r in ranks}
    kw = {"per_example_fraction": 1.0} if per_example else {"per_example": False}
    tracker = noisescale.GradientNoiseTracker(
        model, beta=1.0, loss_reduction="token_mean", process_group=group, **kw
    )
    out: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            for t in range(3):
                for _ in range(2):
                    for r in ranks:
                        ids = torch.randint(0, 13, (2, 6), generator=gens[r])
                        target = (torch.full_like(ids, -100) if t == 1 and r == 1 else ids)[:, 1:]
                        flat = model(ids)[:, :-1].reshape(-1, 13)
                        loss = F.cross_entropy(flat, target.reshape(-1))
                        (loss / (2 * len(ranks))).backward()
                        tracker.count_tokens(target)
                if group is not None:
                    for p in model.parameters():
                        torch.distributed.all_reduce(p.grad)
                        p.grad /= WORLD
                tracker.step()
                model.zero_grad()
            out["history"] = tracker.history
        except NoiseScaleInputError as e:
            out["refused"] = str(e)
    out["warnings"] = [str(w.message) for w in caught]
    tracker.remove()
    return out


def _no_token_on_one_process(rank: int) -> dict:
    """_no_token_run under DDP (gloo), with and without per-example norms."""
    group = torch.distributed.group.WORLD
    return {str(pe): _no_token_run((rank,), pe, group) for pe in (True, False)}


def _per_process_worker(rank: int, port: int, out: str) -> None:
    """Per-process decisions that must not desync the processes' collectives (each case's
    results written as soon as it ends: a desynchronised one aborts the rest)."""
    _init(rank, port, timeout_s=CRASH_TIMEOUT_S)
    results: dict = {}
    for name, case in (
        ("resumed", _unequal_windows_resumed),
        ("overflow", _overflow_on_one_process),
        ("no_token", _no_token_on_one_process),
    ):
        try:
            results[name] = case(rank)
        except Exception:
            results[name] = {"error": traceback.format_exc()}
        Path(out, f"{rank}.json").write_text(json.dumps(results))
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _crash(rank: int, out: str) -> None:
    """Rank 1 dies after its backward pass; rank 0 waits for the tracker's all-reduce."""
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(make_model())
    tracker = noisescale.GradientNoiseTracker(model)
    x, y = micro_batch(EVEN, 0, rank, 0)
    F.cross_entropy(model(x), y).backward()
    if rank == 1:
        os._exit(1)  # a crash: no clean shutdown of the process group
    start = time.monotonic()
    try:
        tracker.step()
        tracker.estimate()
        outcome = "returned"
    except Exception:
        outcome = traceback.format_exc()
    Path(out, "survivor.json").write_text(
        json.dumps({"outcome": outcome, "seconds": time.monotonic() - start})
    )
    os._exit(0)  # the peer is gone: no orderly destroy_process_group()


def _spawn(target, args: tuple, timeout_s: float) -> list[int | None]:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=target, args=(r, *args)) for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return codes


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ddp")
    start = time.monotonic()
    codes = _spawn(_worker, (free_port(), str(out)), timeout_s=150)
    elapsed = time.monotonic() - start
    # rank 1 crashes on purpose at the end; rank 0 must get out by itself
    assert codes == [0, 1], f"workers exited with {codes} after {elapsed:.0f} s"
    results = {r: json.loads(Path(out, f"{r}.json").read_text()) for r in range(WORLD)}
    results["survivor"] = json.loads(Path(out, "survivor.json").read_text())
    return results


@pytest.fixture(scope="module")
def per_process(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ddp_per_process")
    _spawn(_per_process_worker, (free_port(), str(out)), timeout_s=90)
    return {
        r: json.loads(Path(out, f"{r}.json").read_text())
        for r in range(WORLD)
        if Path(out, f"{r}.json").exists()
    }


# -- the single-process reference ----------------------------------------------------------------


def reference(name: str) -> tuple[list[dict], list[list[tuple[float, float]]]]:
    """The tracker on one process, the processes' micro-batches accumulated in one step.

    Also returns, per step, each process's local gradient as (b_small, |G_local|²) by autograd.
    """
    setup, steps = SCENARIOS[name]
    return _reference(json.dumps(steps), setup)


@functools.cache
def _reference(steps_json: str, setup: str) -> tuple[list[dict], list[list[tuple[float, float]]]]:
    steps = json.loads(steps_json)
    model = make_model(setup)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    tracker = noisescale.GradientNoiseTracker(
        model, beta=1.0, sync_every=2, optimizer=opt, per_example_fraction=1.0
    )
    local: list[list[tuple[float, float]]] = []
    for t, sizes in enumerate(steps):
        k = len(sizes[0])
        assert all(len(s) == k for s in sizes), "DDP's weights need equal passes per process"
        copy = make_model(setup)  # without the tracker's hooks
        copy.load_state_dict(model.state_dict())
        per_rank = []
        for r in range(WORLD):
            loss_r = sum(F.cross_entropy(copy(x), y) / k for x, y in _micro(steps, t, r))
            grads = torch.autograd.grad(loss_r, list(copy.parameters()))
            # the local .grad is Σ_j mean_j/k: example weights 1/(k·n_j), summing to 1
            b_local = k * k / sum(1.0 / n for n in sizes[r])
            per_rank.append((b_local, float(sum(g.pow(2).sum() for g in grads))))
        local.append(per_rank)
        for r in range(WORLD):
            for x, y in _micro(steps, t, r):
                (F.cross_entropy(model(x), y) / (WORLD * k)).backward()
        tracker.step()
        opt.step()
        opt.zero_grad()
    return tracker.history, local


def _micro(steps: list, t: int, r: int):
    return [micro_batch(steps, t, r, j) for j in range(len(steps[t][r]))]


def _sums(raw: dict) -> tuple[float, float, float]:
    """(count, Σ 1/size, Σ S) of a history record's source (count, harmonic mean, mean)."""
    count = float(raw["count"])
    return count, count / float(raw["b_small"]), count * float(raw["sqnorm_small"])


def a2_tolerance(raw: dict, b_big: float, s_big: float) -> tuple[float, float]:
    """Bounds on eq. A.2's change when its inputs are rounded to float32 (×8 for safety)."""
    count, inv, total = _sums(raw)
    bh = b_big * inv
    g2 = F32 * (bh * abs(s_big) + abs(total)) / abs(bh - count)
    tr = F32 * b_big * (abs(total) + count * abs(s_big)) / abs(bh - count)
    return 8 * g2, 8 * tr


def a2(raw: dict, b_big: float, s_big: float) -> tuple[float, float]:
    g2, tr = est.g2_trace_from_sums(b_big, s_big, *_sums(raw))
    return float(g2), float(tr)


def assert_same_source(got: dict, want: dict, b_big: float, s_big: float) -> None:
    """Two sources give the same eq. A.2 values (up to float32 reads of their inputs)."""
    assert got["count"] == want["count"]
    assert got["b_small"] == pytest.approx(want["b_small"], rel=1e-12)
    tol_g2, tol_tr = a2_tolerance(want, b_big, s_big)
    g_got, t_got = a2(got, b_big, s_big)
    g_want, t_want = a2(want, b_big, s_big)
    assert g_got == pytest.approx(g_want, abs=tol_g2)
    assert t_got == pytest.approx(t_want, abs=tol_tr)


def assert_big_batch_matches(got: dict, want: dict) -> None:
    assert got["b_big"] == pytest.approx(want["b_big"], rel=1e-12)
    assert got["sqnorm_big"] == pytest.approx(want["sqnorm_big"], rel=4 * F32)
    assert got["examples"] == want["examples"]


# -- tests ---------------------------------------------------------------------------------------


def test_every_process_computes_the_same_history(runs):
    for name in SCENARIOS:
        for key in ("history", "estimate"):
            assert json.dumps(runs[0][name][key]) == json.dumps(runs[1][name][key]), name


def test_a_compiled_ddp_is_measured_as_ddp(runs):
    """torch.compile(DistributedDataParallel(model)): the compiled wrapper hid DDP, and the
    averaged .grad was read against this process's batch alone — g2 and tr Σ up to 7.2× off,
    under a warning to create the tracker from the wrapped model, which the user had done (a
    helper's hunt, 2026-12-05). Every record now equals eager DDP's."""
    for got, want in zip(
        runs[0]["ddp_compiled"]["history"], runs[0]["ddp_uneven"]["history"], strict=True
    ):
        assert_big_batch_matches(got, want)
        for key in ("g2", "trace_sigma"):
            assert got[key] == pytest.approx(want[key], rel=1e-9), key
    assert runs[0]["ddp_compiled"]["warnings"] == []
    assert "compile the wrapped model instead" in runs[0]["misuse"]["ddp_of_compiled"]
    assert runs[0]["misuse"]["ddp_of_compiled_micro"] == "accepted"  # (as before: exact)
    assert "torch.compile() of an FSDP2 root" in runs[0]["misuse"]["fsdp_compiled"]


def test_a_static_graph_ddp_keeps_averaging_and_is_measured_from_its_second_step(runs):
    """DDP(static_graph=True) learns on its first iteration which parameters to all-reduce;
    with the per-example hooks in that backward it took every one for unused, and the processes
    trained apart while the tracker read each one's own gradient as the average (|G_big|²
    +135–299%, a helper's hunt, 2026-12-05). The first step now runs with the hooks idle,
    counted and not measured; the later steps equal plain DDP's, which equal one process's."""
    assert runs[0]["misuse"]["static_resumed_averaged"]  # (load_state_dict undid it at first)
    static, plain = runs[0]["ddp_static"]["history"], runs[0]["ddp_uneven"]["history"]
    assert [r["step"] for r in static] == [2, 3]
    assert static[0]["unmeasured_steps"] == 1
    for got, want in zip(static, plain[1:], strict=True):
        assert_big_batch_matches(got, want)
        for key in ("g2", "trace_sigma"):
            assert got[key] == pytest.approx(want[key], rel=1e-9), key


@pytest.mark.parametrize(
    "name", ["ddp_even", "ddp_uneven", "ddp_amp", "manual", "fsdp2", "hsdp", "fsdp2_attention"]
)
def test_one_pass_per_process_equals_single_process(runs, name):
    """The local source is the reference's micro-batch source; the combination matches too."""
    want_hist, _ = reference(name)
    got_hist = runs[0][name]["history"]
    assert len(got_hist) == len(want_hist)
    for got, want in zip(got_hist, want_hist, strict=True):
        assert_big_batch_matches(got, want)
        assert set(got["sources"]) == {"per_example", "local"}
        assert set(want["sources"]) == {"per_example", "microbatch"}
        assert got["loss_scale"] == (1024.0 if name == "ddp_amp" else 1.0)
        b_big, s_big = want["b_big"], want["sqnorm_big"]
        assert_same_source(
            got["sources"]["per_example"], want["sources"]["per_example"], b_big, s_big
        )
        assert_same_source(got["sources"]["local"], want["sources"]["microbatch"], b_big, s_big)
        # the combination weighs the two sources' eq. A.2 values: the sum of their tolerances
        tols = [a2_tolerance(s, b_big, s_big) for s in want["sources"].values()]
        assert got["g2"] == pytest.approx(want["g2"], abs=sum(t[0] for t in tols))
        assert got["trace_sigma"] == pytest.approx(want["trace_sigma"], abs=sum(t[1] for t in tols))
    assert got_hist[-1]["b_simple"] == pytest.approx(want_hist[-1]["b_simple"], rel=1e-4)


@pytest.mark.parametrize("name", ["fsdp2_reuse", "fsdp2_grandchild"])
def test_a_direct_use_in_a_sharded_block_equals_single_process(runs, name):
    """The weight a block reads outside its Linear (its own, or a grandchild's whose holder it
    never calls): learned at step 1 (its per-example norms withheld there, as on one process),
    then followed inside the block's forward, where FSDP2 has unsharded it."""
    want_hist, _ = reference(name)
    got_hist = runs[0][name]["history"]
    assert len(got_hist) == len(want_hist) == 3
    assert "per_example" not in got_hist[0]["sources"]
    assert "per_example" not in want_hist[0]["sources"]
    for got, want in zip(got_hist, want_hist, strict=True):
        assert_big_batch_matches(got, want)
    for got, want in zip(got_hist[1:], want_hist[1:], strict=True):
        b_big, s_big = want["b_big"], want["sqnorm_big"]
        assert_same_source(
            got["sources"]["per_example"], want["sources"]["per_example"], b_big, s_big
        )


def test_a_loss_over_tokens_equals_single_process(runs):
    """Hugging Face GPT-2 under DDP, each process's loss its own mean over counted tokens: the
    measured token weights, the tokens and the per-example source equal one process
    accumulating both batches with the same weights. The processes' token counts differ, so
    their weights depend on the data: the big batch is taken within each process's pass, as
    within each micro-batch in one process (b_big = LM_SEQ examples), and the 'local' source,
    whose small batches are those passes, is left out (until 2026-12-05 the averaged gradient
    was the big batch, eq. A.2 then biased: tests/test_tokens.py)."""
    want_hist = _lm_run(None)
    got_hist = runs[0]["tokens"]["history"]
    assert json.dumps(got_hist) == json.dumps(runs[1]["tokens"]["history"])
    for got, want in zip(got_hist, want_hist, strict=True):
        assert set(got["sources"]) == set(want["sources"]) == {"per_example"}
        assert got["b_big"] / got["tokens_per_example"] == pytest.approx(LM_SEQ)
        assert got["tokens"] == want["tokens"]
        assert got["tokens_per_example"] == pytest.approx(want["tokens_per_example"])
        for key in ("b_big", "sqnorm_big"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), key
        g, w = got["sources"]["per_example"], want["sources"]["per_example"]
        assert g["count"] == w["count"]
        assert g["sqnorm_small"] == pytest.approx(w["sqnorm_small"], rel=1e-5)


def test_a_declared_loss_over_the_step_s_tokens_equals_single_process(runs):
    """loss_reduction='num_items_in_batch' under DDP, each process's summed token loss divided
    by the step's tokens over all processes (times the processes, as the Trainer does): with
    the divisor given to count_tokens (or given undivided and the multiplication measured by
    watch_loss) the record equals one process accumulating both batches. Without it the
    tracker cannot tell that loss from one divided by each process's own count, and refuses
    it (until 2026-12-05 it took the latter: b_big, |G_big|² and tr Σ up to 33% off here,
    91% in a hunt's Trainer run, without a word)."""
    want_hist = _lm_declared_run(None, "none")
    assert isinstance(want_hist, list)
    declared = runs[0]["tokens_declared"]
    assert isinstance(declared["none"], str), "not refused"
    assert declared["none"].startswith(
        "loss_reduction='num_items_in_batch' under data parallelism needs the number the loss "
        "divided its sum over tokens by"
    ), declared["none"]
    assert "count_tokens(labels, num_items_in_batch=n)" in declared["none"]
    assert "loss_reduction='token_mean'" in declared["none"]
    for divisor in ("given", "watched"):
        got_hist = declared[divisor]
        assert isinstance(got_hist, list), got_hist
        assert json.dumps(got_hist) == json.dumps(runs[1]["tokens_declared"][divisor])
        for got, want in zip(got_hist, want_hist, strict=True):
            assert got["tokens"] == want["tokens"]
            for key in ("b_big", "sqnorm_big"):
                assert got[key] == pytest.approx(want[key], rel=1e-5), (divisor, key)
            g, w = got["sources"]["per_example"], want["sources"]["per_example"]
            assert g["sqnorm_small"] == pytest.approx(w["sqnorm_small"], rel=1e-5)


def test_uneven_local_batches_weight_the_big_batch(runs):
    """Local batches 7 and 3: .grad weights examples 1/(2·7) and 1/(2·3), so b_big = (Σc)²/Σc²
    = 4/(1/7 + 1/3) = 8.4, not 10."""
    history = runs[0]["ddp_uneven"]["history"]
    got = [r["b_big"] for r in history]
    assert got == pytest.approx([12.0, 4 / (1 / 7 + 1 / 3), 4 / (1 / 5 + 1)], rel=1e-12)
    assert [r["examples"] for r in history] == [12, 22, 28]
    # batches 5 and 1: b_big = 10/3; eq. A.2 from sums pairs both local batches with it
    # (unbiased whatever their sizes): two small batches of harmonic mean size 2/(1/5 + 1)
    local = history[2]["sources"]["local"]
    assert local["count"] == 2 and local["b_small"] == pytest.approx(2 / (1 / 5 + 1))


@pytest.mark.parametrize(
    "name",
    ["ddp_no_sync", "ddp_bucket_view_no_sync", "fsdp2_accumulate", "fsdp2_direct_accumulate"],
)
def test_accumulation_equals_single_process(runs, name):
    """no_sync() / set_requires_gradient_sync(False): micro-batch, per-example and local."""
    want_hist, local = reference(name)
    got_hist = runs[0][name]["history"]
    for got, want, per_rank in zip(got_hist, want_hist, local, strict=True):
        assert_big_batch_matches(got, want)
        assert set(got["sources"]) == {"per_example", "local", "microbatch"}
        b_big, s_big = want["b_big"], want["sqnorm_big"]
        for source in ("per_example", "microbatch"):
            assert_same_source(got["sources"][source], want["sources"][source], b_big, s_big)
        brute = {
            "count": len(per_rank),
            "b_small": len(per_rank) / sum(1 / b for b, _ in per_rank),
            "sqnorm_small": sum(s for _, s in per_rank) / len(per_rank),
        }
        assert_same_source(got["sources"]["local"], brute, b_big, s_big)
        assert got["sources"]["local"]["sqnorm_small"] == pytest.approx(
            brute["sqnorm_small"], rel=4 * F32
        )


def test_a_source_some_processes_lack_is_kept_and_counted(runs):
    """Process 0 accumulates two micro-batches (4 and 3 examples), process 1 runs one of 6: the
    micro-batch source keeps process 0's two small batches and records that one process lacked
    it; the big batch weighs process 0's examples 1/8 and 1/6, process 1's 1/6, so b_big =
    (Σc)²/Σc² = 4/(4/64 + 3/36 + 6/36) = 12.8."""
    for record in runs[0]["ddp_one_accumulates"]["history"]:
        micro = record["sources"]["microbatch"]
        assert micro["count"] == 2 and micro["lacking"] == 1
        assert micro["b_small"] == pytest.approx(2 / (1 / 4 + 1 / 3))
        assert "lacking" not in record["sources"]["local"]  # written only when some lacked it
        assert record["sources"]["local"]["count"] == 2
        assert record["sources"]["per_example"]["count"] == 13
        assert record["b_big"] == pytest.approx(4 / (4 / 64 + 3 / 36 + 6 / 36), rel=1e-12)


def test_communication_hooks(runs):
    """Local norms are read before the hook (exact), |G_big|² after it (the decompressed mean):
    fp16 compression leaves it within fp16 rounding, PowerSGD changes it by tens of percent."""
    hooks = runs[0]["comm_hooks"]
    for name in ("fp16", "powersgd"):
        assert hooks[name]["local_ratio"] == pytest.approx([1.0] * 8, rel=1e-5)
    assert hooks["fp16"]["big_ratio"] == pytest.approx([1.0] * 8, abs=1e-3)
    assert hooks["powersgd"]["big_ratio"][:2] == pytest.approx([1.0] * 2, rel=1e-5)  # warm-up
    assert max(abs(r - 1.0) for r in hooks["powersgd"]["big_ratio"][2:]) > 0.1


def test_misuse_is_reported(runs):
    misuse = runs[0]["misuse"]
    assert "neither DistributedDataParallel nor FSDP2" in misuse["plain_model"]
    for name in ("ddp_after", "ddp_inner", "ddp_later"):
        assert misuse[name].startswith(
            "this forward pass is run by a DistributedDataParallel around the model given to "
            "the tracker, created after the tracker (or the tracker was given ddp.module)"
        ), misuse[name]
    assert misuse["ddp_part"].startswith(
        "this forward pass is run by a DistributedDataParallel around a module holding it"
    )
    assert "FSDP2's fully_shard()" in misuse["fsdp_after"]
    assert "inside model.no_sync()" in misuse["step_after_no_sync"]
    for rank in range(WORLD):  # (uneven inputs under join() abort: no message can follow)
        assert "DistributedDataParallel.join() is active" in runs[rank]["misuse"]["join"]
        assert "same number of batches" in runs[rank]["misuse"]["join"]
    assert misuse["clipped_False"] == "accepted"
    assert misuse["clipped_True"].startswith("call tracker.step() right after the last backward")
    assert misuse["fsdp_clipped_False"] == "accepted"
    assert misuse["fsdp_clipped_True"].startswith("call tracker.step() right after the last")
    assert misuse["fsdp_freed"].startswith(
        "noisescale carries the per-example gradients of a tensor computed from parameters alone"
    ), misuse["fsdp_freed"]
    assert "FSDP2 has already freed" in misuse["fsdp_freed"]
    assert "Use per_example=False" in misuse["fsdp_freed"]
    assert misuse["fsdp_flat_rows"].startswith(
        "step 1: layer(s) 'm' are called on the examples' rows flattened together"
    ), misuse["fsdp_flat_rows"]
    assert "under FSDP2 it replays none" in misuse["fsdp_flat_rows"]
    assert misuse["fsdp_gru_block_False"] == "['local', 'per_example']"
    assert misuse["fsdp_gru_block_True"].startswith(
        "GRU's parameter 'weight_ih_l0' is still sharded by FSDP2 (a DTensor) when the gradient "
        "of the layer's output arrives"
    ), misuse["fsdp_gru_block_True"]
    assert (
        "Pass reshard_after_forward=False to that fully_shard call"
        in (misuse["fsdp_gru_block_True"])
    )
    for rank in (0, 1):  # both refuse step 6, keeping 1-5
        picked = runs[rank]["misuse"]["picked_rows"]
        assert picked.startswith(
            "[1, 2, 3, 4, 5] step 6 (on 1 of the processes): the input rows of 'module.head'"
        ), picked


def test_hand_averaging_is_checked(runs):
    """``process_group=``: a mean by hand is accepted (also unscaled by a told GradScaler); a
    sum, no all-reduce, a clip after the averaging or a layer left out are refused at the first
    step the audits fall on, on every process alike, with nothing of that step recorded; a sum
    from step 3 on is refused at step 4 (the next audited step), the 3 steps before kept."""
    for rank in range(WORLD):
        got = runs[rank]["hand_averaging"]
        assert got["mean"] == {"records": 5, "refused": None}
        assert got["projected_per_step"] == [4, 4, 0, 4, 0]  # 4 parameters, steps 1, 2, 4
        assert got["mean_overlapped"] == {"records": 5, "refused": None}
        assert got["mean_unscaled"] == {"records": 5, "refused": None}
        for name in ("sum", "none", "clipped", "half"):
            assert got[name]["records"] == 0, (name, got[name])
            assert got[name]["refused"].startswith("step 1: process_group= says the gradients")
            assert "Nothing of this step was recorded" in got[name]["refused"]
        assert "the sum of the 2 processes' gradients, not their mean" in got["sum"]["refused"]
        assert "the processes hold different gradients" in got["none"]["refused"]
        assert "clipped, rescaled or changed after the averaging" in got["clipped"]["refused"]
        assert got["sum_from_step_3"]["records"] == 3
        assert got["sum_from_step_3"]["refused"].startswith("step 4: process_group= says")
    assert runs[0]["hand_averaging"] == runs[1]["hand_averaging"]


def test_accumulation_without_no_sync_drops_only_the_local_source(runs):
    """Every pass all-reduces: no process holds its local gradient; the rest still matches."""
    result = runs[0]["ddp_sync_every_pass"]
    want_hist, _ = reference("ddp_no_sync")
    for got, want in zip(result["history"], want_hist, strict=True):
        assert_big_batch_matches(got, want)
        assert set(got["sources"]) == {"per_example", "microbatch"}
        assert got["g2"] == pytest.approx(want["g2"], rel=1e-5)
    assert any("model.no_sync()" in w for w in result["warnings"])


@pytest.mark.parametrize("setup", ["ddp", "fsdp"])
def test_tracked_steps_read_nothing_back(runs, setup):
    """No call that waits for the device during non-audited steps, on either process, in any
    mode, with and without accumulation (see :func:`_count_syncs`)."""
    for rank in range(WORLD):
        calls = {k: v for k, v in runs[rank]["syncs"].items() if k.startswith(setup)}
        assert len(calls) == 2 * len(SYNC_MODES)
        assert all(v == [] for v in calls.values()), calls


def test_tensor_parallelism_is_refused(runs):
    """Tensor parallelism alone and under FSDP2 on a 2-D mesh (either way round) is refused at
    construction, naming the parameter, its layout, the cause and what to do instead."""
    for case in ("tp", "fsdp_tp_1x2", "fsdp_tp_2x1"):
        message = runs[0]["parallelism"][case]
        assert message.startswith("tensor parallelism is not supported: parameter '0.weight'")
        assert "without tensor parallelism, in a run of the same model" in message
    assert "[tp (2): S(0)]" in runs[0]["parallelism"]["tp"]
    assert "[dp (2): S(0), tp (1): S(0)]" in runs[0]["parallelism"]["fsdp_tp_2x1"]


def test_pipeline_parallelism_is_refused(runs):
    """A pipelining stage's module is refused at construction when the stage exists, else at
    the schedule's first forward (DDP-wrapped stage)."""
    for rank in range(WORLD):
        got = runs[rank]["parallelism"]
        assert got["pp_stage_first"].startswith(
            f"pipeline parallelism is not supported: the model given to the tracker is stage "
            f"{rank} of 2"
        )
        assert got["pp_tracker_first"].startswith(
            "pipeline parallelism is not supported: the model given to the tracker is stage 0 of 1"
        )
        assert "without pipeline parallelism, in a run of" in got["pp_stage_first"]


def test_a_crashed_process_does_not_hang_the_survivor(runs):
    """Rank 1 dies before tracker.step(); rank 0's wait for the tracker's all-reduce raises,
    bounded by the process group's timeout — in practice at once, when gloo sees the socket
    close ("Connection closed by peer"). The fixture checks that rank 0 then exits by itself."""
    survivor = runs["survivor"]
    assert survivor["outcome"] != "returned"
    assert survivor["seconds"] < CRASH_TIMEOUT_S + 5


# -- host-side resolution, no processes ----------------------------------------------------------


def _buffer(**fields) -> np.ndarray:
    """One all-reduced buffer: global columns and per-source (count, Σ 1/size, Σ S, had)."""
    values = np.zeros(dsrc.WIDTH)
    for name, value in fields.items():
        if name in dsrc.SOURCES:
            for f, v in enumerate(value):
                values[dsrc._column(name, f)] = v
        else:
            values[getattr(dsrc, name.upper())] = value
    return values


def test_resolve_takes_the_big_batch_within_the_passes_when_their_weights_vary():
    """Each process's own token mean (weights 1/(2·30) and 1/(2·20): the counts differ) over
    local batches of 4: the averaged gradient is no big batch for eq. A.2, so the big batch is
    taken within each process (Σ b_m·|X̄_m|² / Σ b_m over 4 examples a pass) and the 'local'
    source, whose small batches are those passes, is left out; equal weights keep the
    averaged gradient. Once varied, a tracker keeps measuring within (DataParallelSource)."""
    c = [1 / 60, 1 / 40]
    common = dict(examples=8, sum_c=4 * sum(c), sum_c2=4 * sum(x * x for x in c), big=0.5,
                  per_example=(8, 8.0, 80.0, 2), local=(2, 0.5, 12.0, 2),
                  pass_count=2, pass_weighed=2, pass_big=4 * 3.0 + 4 * 5.0,
                  pass_examples=8)  # fmt: skip
    values = _buffer(pass_c=sum(c), pass_c2=sum(x * x for x in c), **common)
    assert dsrc.weights_vary(values)
    b_big, big, _, _, sources, _ = dsrc.resolve(values, 2, within=True)
    assert b_big == 4.0 and big == pytest.approx(4.0)
    assert set(sources) == {"per_example"}
    same = _buffer(pass_c=2 / 50, pass_c2=2 / 50**2, **common)
    assert not dsrc.weights_vary(same)
    b_big, big, _, _, sources, _ = dsrc.resolve(same, 2)
    assert set(sources) == {"per_example", "local"}
    missing = _buffer(pass_c=sum(c), pass_c2=sum(x * x for x in c), pass_missing=1, **common)
    assert math.isnan(dsrc.resolve(missing, 2, within=True)[1])


def test_a_process_of_no_token_does_not_make_the_weights_vary():
    """(Reviews, 2026-12-07.) Each process's own token mean where a process counts no token
    weighs its pass 1/0 = inf (its gradient 0): only the finite weights are summed and counted
    (PASS_WEIGHED), so it adds no weight. Processes of 8, 0 and 8 tokens, one pass each, do not
    vary — as one process's micro-batches of 8, 0 and 8 do not (StepNorms) —; 8, 0 and 4 do;
    none counting a token leaves nothing to compare. Until then the inf made the spread nan,
    read as weights that vary where any process counted a token: the rest of the run measured
    within its passes (b_big a third), or refused with per_example=False."""
    alike = dict(pass_count=3, pass_weighed=2, pass_c=2 / 8, pass_c2=2 / 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no bare numpy "invalid value")
        assert not dsrc.weights_vary(_buffer(has_tokens=3, tokens=16.0, **alike))
        differ = dict(pass_count=3, pass_weighed=2, pass_c=1 / 8 + 1 / 4, pass_c2=1 / 64 + 1 / 16)
        assert dsrc.weights_vary(_buffer(has_tokens=3, tokens=12.0, **differ))
        none = dict(pass_count=2, pass_weighed=0, pass_c=0.0, pass_c2=0.0)
        assert not dsrc.weights_vary(_buffer(has_tokens=2, tokens=0.0, **none))


def test_resolve_closed_form():
    # mean losses, local batches 4 and 2 (weights 1/4 and 1/2 locally, halved in .grad)
    values = _buffer(
        examples=6,
        sum_c=2.0,
        sum_c2=4 * (1 / 4) ** 2 + 2 * (1 / 2) ** 2,
        big=0.8,
        per_example=(6, 6.0, 60.0, 2),
        local=(2, 1 / 4 + 1 / 2, 8.0, 2),
    )
    b_big, big, examples, loss, sources, _ = dsrc.resolve(values, 2)
    assert b_big == pytest.approx(4 / (1 / 4 + 1 / 2))
    assert big == pytest.approx(0.8)  # Σc/W = 1: .grad is already a weighted mean
    assert examples == 6 and loss is None
    assert sources["per_example"].size == 1.0 and sources["per_example"].sqnorm_sum == 60.0
    assert sources["local"].size == pytest.approx(2 / (1 / 4 + 1 / 2))
    assert "microbatch" not in sources and sources["local"].lacking == 0


def test_resolve_counts_processes_that_lacked_a_source():
    """One process of four had no per-example pass: the others' examples still pair with the
    global big batch (unbiased), and the record says how many lacked it."""
    values = _buffer(
        examples=16, sum_c=4.0, sum_c2=4 * 4 / 16, big=1.0, per_example=(12, 12, 30, 3)
    )
    *_, sources, _ = dsrc.resolve(values, 4)
    assert sources["per_example"].count == 12 and sources["per_example"].lacking == 1


def test_buffer_and_work_do_not_grow_with_the_number_of_processes():
    """The reduction is one fixed-size buffer of sums, resolved in O(1), at any world size."""
    for world in (2, 1024, 16384):
        values = _buffer(examples=8 * world, sum_c=world, sum_c2=world / 8, big=1.0,
                         local=(world, 8.0 * world, 2.0 * world, world))  # fmt: skip
        assert values.size == dsrc.WIDTH == 39
        b_big, _, examples, _, sources, _ = dsrc.resolve(values, world)
        assert b_big == pytest.approx(8 * world) and examples == 8 * world
        assert sources["local"].size == pytest.approx(1 / 8)


@pytest.mark.parametrize("name, whole", [("ddp_every2", "ddp_uneven"), ("fsdp2_every2", "fsdp2")])
def test_measure_every_counts_every_process_and_step(runs, name, whole):
    """measure_every=2 under DDP and FSDP2: steps 1 and 3 are those of the run that measured
    every step (training is the same), and step 2's examples (and, for a language model under
    DDP, its tokens), summed over the processes, are counted at step 3."""
    every = runs[0][name]["history"]
    assert json.dumps(every) == json.dumps(runs[1][name]["history"])
    whole = runs[0][whole]["history"]
    assert [r["step"] for r in every] == [1, 3]
    assert [r["examples"] for r in every] == [12, 28]
    assert [r.get("unmeasured_steps") for r in every] == [None, 1]
    for got, want in zip(every, [whole[0], whole[2]], strict=True):
        for key in ("b_big", "sqnorm_big", "g2", "trace_sigma"):
            assert got[key] == pytest.approx(want[key], rel=1e-12), key
        assert json.dumps(got["sources"]) == json.dumps(want["sources"])
    tokens, all_steps = runs[0]["tokens_every2"]["history"], runs[0]["tokens"]["history"]
    assert [r["step"] for r in tokens] == [1, 3]
    assert tokens[-1]["tokens_seen"] == all_steps[-1]["tokens_seen"]
    assert tokens[-1]["tokens_per_example"] == pytest.approx(all_steps[-1]["tokens_per_example"])


def test_processes_that_reduce_different_steps_are_refused():
    """Trackers counting steps differently (another measure_every on one process) would pair
    one process's step 3 with another's step 4: the step numbers in the buffer say so."""
    values = np.zeros(dsrc.WIDTH)
    values[dsrc.PROCESSES] = 2
    values[dsrc.STEP] = 3 + 4
    with pytest.raises(NoiseScaleInputError, match="same measure_every to every process"):
        dsrc.step_kind(values, 3)
    values[dsrc.STEP] = 3 + 3
    assert dsrc.step_kind(values, 3) == "measured"
    values[dsrc.UNMEASURED] = 1  # one process measured step 3, the other did not
    with pytest.raises(NoiseScaleInputError, match="1 of them left it unmeasured"):
        dsrc.step_kind(values, 3)
    values[dsrc.UNMEASURED] = 2
    values[dsrc.EXAMPLES] = 10
    assert dsrc.step_kind(values, 3) == "unmeasured"
    assert dsrc.resolve_unmeasured(values, 2) == (10, None)  # tokens counted by neither
    values[dsrc.UNMEASURED] = 0
    values[dsrc.LEFT_OUT] = 1  # a short window on one process
    assert dsrc.step_kind(values, 3) == "left out"


def test_a_short_window_on_one_process_is_left_out_on_every_process(runs):
    """Process 1 drops to one micro-batch at step 2 while process 0 keeps two: its divisor is
    unknown, so the step is left out. Until 2026-12-06 process 1 alone skipped the step's
    all-reduce, and every later collective was paired with the wrong one — DDP's gradient
    all-reduce with the tracker's buffer (training changed without a word), or gloo aborted
    (a hunt). Now training is plain DDP's, step 2 is left out on both processes with a
    warning, and steps 1 and 3 are one process's on the same global batches (which leaves
    step 2 out too: 3 micro-batches after 4)."""
    for rank in range(WORLD):
        got = runs[rank]["short_window"]
        assert got["params"] == got["plain_params"]  # training untouched
        assert [r["step"] for r in got["history"]] == [1, 3]
        # step 2's examples were trained on: counted with step 3 (until 2026-12-07 lost, 18)
        assert [r["examples"] for r in got["history"]] == [10, 28]
        assert any(
            "on 1 of the 2 processes, step 2 had fewer accumulation micro-batches" in w
            and "left out" in w
            for w in got["warnings"]
        ), got["warnings"]
    history = runs[0]["short_window"]["history"]
    assert json.dumps(history) == json.dumps(runs[1]["short_window"]["history"])
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    tracker = noisescale.GradientNoiseTracker(
        model, beta=1.0, sync_every=1, optimizer=opt, per_example_fraction=1.0
    )
    with pytest.warns(RuntimeWarning, match="short last window"):
        for t, sizes in enumerate(SHORT_WINDOW):
            for r in range(WORLD):
                for x, y in _micro(SHORT_WINDOW, t, r):
                    (F.cross_entropy(model(x), y) / (WORLD * len(sizes[r]))).backward()
            tracker.step()
            opt.step()
            opt.zero_grad()
    want_hist = tracker.history
    assert [r["step"] for r in want_hist] == [1, 3]
    for got, want in zip(history, want_hist, strict=True):
        assert_big_batch_matches(got, want)
        b_big, s_big = want["b_big"], want["sqnorm_big"]
        for source in ("per_example", "microbatch"):
            assert_same_source(got["sources"][source], want["sources"][source], b_big, s_big)


def test_a_rank_0_checkpoint_does_not_judge_another_processs_window(per_process):
    """Constant but unequal windows (process 0: 2 micro-batches a step, process 1: 1), process
    0's checkpoint loaded on both after step 2: no step is short on its own process, so both
    steps after the resume are recorded. Until 2026-12-06 process 0's micro-batch count was
    carried to process 1, whose step 3 (1 after "2") was left out everywhere with a false
    short-window warning (a review)."""
    for rank in range(WORLD):
        got = per_process[rank]["resumed"]
        assert "error" not in got, got["error"]
        assert [r["step"] for r in got["history"]] == [3, 4]
        assert not [w for w in got["warnings"] if "accumulation micro-batches" in w]
    assert per_process[0]["resumed"]["history"] == per_process[1]["resumed"]["history"]
    assert per_process[0]["resumed"]["warnings"] == per_process[1]["resumed"]["warnings"]


def test_a_data_parallel_checkpoint_resumes_on_one_plain_process(per_process):
    """Process 0's checkpoint (2 micro-batches a step) resumed on one plain process that runs a
    batch of 6 in one pass: steps 3 and 4 are recorded, each |G|² that of the gradient by
    autograd. Until 2026-12-07 the checkpoint held process 0's micro-batch count, and the plain
    process (no process group: it kept it) left step 3 out as an epoch's short last window
    with a false warning (a hunt; the data-parallel fuzzer's seed 314)."""
    import warnings

    saved = per_process[0]["resumed"]
    assert "error" not in saved, saved["error"]
    model = make_model()
    with torch.no_grad():
        for p, v in zip(model.parameters(), saved["params"], strict=True):
            p.copy_(torch.tensor(v, dtype=p.dtype))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    tracker = noisescale.GradientNoiseTracker(
        model, beta=1.0, sync_every=1, optimizer=opt, per_example_fraction=1.0
    )
    tracker.load_state_dict(saved["checkpoint"])
    sqnorms = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in (2, 3):
            x, y = micro_batch([[[6]]] * 4, t, 0, 0)
            F.cross_entropy(model(x), y).backward()
            sqnorms.append(sum(float(p.grad.pow(2).sum()) for p in model.parameters()))
            tracker.step()
            opt.step()
            opt.zero_grad()
    history = tracker.history
    tracker.remove()
    assert not [str(w.message) for w in caught if "accumulation micro-batches" in str(w.message)]
    assert [r["step"] for r in history] == [3, 4]
    for record, want in zip(history, sqnorms, strict=True):
        assert record["b_big"] == 6
        assert record["sqnorm_big"] == pytest.approx(want, rel=4 * F32)


def test_a_loss_scale_overflow_on_one_process_is_left_out_on_every_process(per_process):
    """Squared norms overflowing float32 under a loss scale of 2^62 on process 1 alone (step
    2): the step is left out on both processes, with a warning naming where and the scale, and
    training is plain DDP's. Until 2026-12-06 process 1 returned before its all-reduce alone:
    the next collectives were paired wrongly (DDP's gradient all-reduce with the tracker's
    buffer) and gloo aborted (a review)."""
    assert sorted(per_process) == list(range(WORLD))
    for rank in range(WORLD):
        got = per_process[rank]["overflow"]
        assert "error" not in got, got["error"]
        assert got["params"] == got["plain_params"]  # training untouched
        assert [r["step"] for r in got["history"]] == [1, 3]
        assert [r["examples"] for r in got["history"]] == [12, 36]  # step 2's too
        assert any(
            "on 1 of the 2 processes at step 2" in w and "loss scale has grown to 4.61169e+18" in w
            for w in got["warnings"]
        ), got["warnings"]


def test_a_process_of_no_token_leaves_the_run_measured_as_one_process(per_process):
    """Each process's own token mean, process 1's labels all -100 at step 2 (its weights 1/0,
    its gradient 0), every other step's counts equal: the weights never vary, so the steps
    equal one process accumulating both processes' micro-batches (b_big 40 tokens at step 1;
    at step 3 8 examples at the run's 100/24 tokens an example), with per_example=False too, and
    no bare numpy warning; step 2 too, process 1's examples at the other's weight, their
    gradients 0 (8 examples at the run's 30/8 tokens an example: b_big 30). Until 2026-12-07
    the inf made the reduced spread nan, read as weights that vary: the rest of the run
    measured within its passes (b_big 8.33 for 16.67 at step 3), or refused under
    per_example=False; and step 2's b_big was inf/inf, skipped without a word (a review)."""
    assert sorted(per_process) == list(range(WORLD))
    for per_example in (True, False):
        want = _no_token_run((0, 1), per_example)
        assert "refused" not in want, want["refused"]
        for rank in range(WORLD):
            got = per_process[rank]["no_token"][str(per_example)]
            assert "error" not in per_process[rank]["no_token"]
            assert "refused" not in got, got["refused"]
            assert not [w for w in got["warnings"] if "invalid value" in w], got["warnings"]
            assert not [w for w in got["warnings"] if "counts differ" in w], got["warnings"]
            for record, ref in zip(got["history"], want["history"], strict=True):
                assert not record["skipped"] and not ref["skipped"]
                for key in ("b_big", "sqnorm_big", "tokens"):
                    assert record[key] == pytest.approx(ref[key], rel=1e-9), key
                if per_example:  # (the other sources differ: processes here, passes there)
                    g, w = record["sources"]["per_example"], ref["sources"]["per_example"]
                    assert g["count"] == w["count"]
                    assert g["sqnorm_small"] == pytest.approx(w["sqnorm_small"], rel=1e-9)
            b_big = [r["b_big"] for r in got["history"]]
            assert b_big == pytest.approx([40.0, 8 * 30 / 8, 8 * 100 / 24], rel=1e-12)


def test_a_checkpoint_saved_on_process_0_resumes_the_unmeasured_steps_of_all(runs):
    """measure_every=2, saved after the unmeasured step 2 by process 0 and loaded by every
    process: step 3 counts step 2's examples and tokens of both processes, as the run that
    went on does. Until 2026-12-06 the checkpoint held process 0's own, not yet reduced, and
    every process added them again (examples 32 for 28; a hunt)."""
    for rank in range(WORLD):
        resumed = runs[rank]["ddp_every2_resumed"]["history"]
        assert json.dumps(resumed) == json.dumps(runs[rank]["ddp_every2"]["history"][1:])
        assert resumed[0]["examples"] == 28 and resumed[0]["unmeasured_steps"] == 1
        tokens = runs[rank]["tokens_every2_resumed"]["history"]
        assert json.dumps(tokens) == json.dumps(runs[rank]["tokens_every2"]["history"][1:])


def test_process_group_without_distributed_is_refused():
    with pytest.raises(NoiseScaleInputError, match="init_process_group"):
        noisescale.GradientNoiseTracker(make_model(), process_group=object())
