"""On a CUDA device: the same numbers as brute force, and no host synchronisation per step.

Skipped without a GPU (``conftest.py``); ``bench/gpu.sh`` runs them on a lent machine. The CPU
suite covers the same code paths; what only a GPU can show is asserted here: device tensors
everywhere, bf16 autocast on the real kernels, and that a tracked step never makes the host wait
for the device (``torch.cuda.set_sync_debug_mode("error")`` raises on any synchronising call).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import noisescale
from noisescale.per_example import PerExampleNorms

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.conv = nn.Conv1d(32, 32, 3, padding=1)
        self.norm = nn.LayerNorm(32)
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 5)

    def forward(self, ids):
        h = self.conv(self.emb(ids).transpose(1, 2)).transpose(1, 2)
        return self.down(F.gelu(self.up(self.norm(h))))


def steps_without_host_sync(step, warm: int = 4, checked: int = 3) -> None:
    """``warm`` steps (the audited ones among them), then ``checked`` steps during which any
    call that synchronises the host with the device raises."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(warm):
            step()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(checked):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")


def _loss(out, y):
    return F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(1)


@pytest.mark.parametrize("subbatches", [0, 4], ids=["per-example", "sub-batches"])
def test_norms_match_brute_force_on_the_device(subbatches):
    torch.manual_seed(0)
    model = Net().double().to(CUDA)
    ids = torch.randint(0, 50, (8, 12), device=CUDA)
    y = torch.randint(0, 5, (8, 12), device=CUDA)
    engine = PerExampleNorms(model, subbatches=subbatches)
    _loss(model(ids), y).mean().backward()
    (p,) = engine.collect()
    params = list(model.parameters())
    with engine.paused():
        grads = [torch.autograd.grad(_loss(model(ids[i : i + 1]), y[i : i + 1]).sum(), params)
                 for i in range(8)]  # fmt: skip
    if subbatches:
        index = p.subbatches.index.view(p.subbatches.k, p.subbatches.n).tolist()
        groups = [index[j][:size] for j, size in enumerate(p.subbatches.sizes)]
    else:
        groups = [[i] for i in range(8)]
    want = torch.stack(
        [sum(sum(grads[i][t] for i in g).pow(2).sum() for t in range(len(params))) for g in groups]
    )
    assert p.raw_sqnorms.device.type == "cuda"
    assert torch.allclose(p.raw_sqnorms * 64, want, rtol=1e-9)


@pytest.mark.parametrize(
    "kwargs", [{}, {"per_example_fraction": 1 / 8}, {"per_example_fraction": 1.0}],
    ids=["sub-batches", "subset", "exact"],
)  # fmt: skip
def test_a_tracked_step_never_waits_for_the_device(kwargs):
    """Steps 5–7 (not audited: the audit runs on steps 1, 2, 4, 8, …) under the CUDA sync
    debugger in error mode: any call that makes the host wait for the device raises."""
    torch.manual_seed(0)
    model = Net().to(CUDA)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = noisescale.GradientNoiseTracker(model, optimizer=opt, sync_every=100, **kwargs)

    def step():
        ids = torch.randint(0, 50, (16, 12), device=CUDA)
        y = torch.randint(0, 5, (16, 12), device=CUDA)
        loss = _loss(model(ids), y).mean()
        loss.backward()
        tracker.step(loss=loss)
        opt.step()
        opt.zero_grad(set_to_none=True)

    steps_without_host_sync(step)
    assert len(tracker.history) == 7


def test_bf16_autocast_gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        vocab_size=64, n_positions=32, n_embd=64, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).to(CUDA)
    ids = torch.randint(0, 64, (4, 16), device=CUDA)
    with noisescale.per_example_sqnorms(model) as pe:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    model.zero_grad()
    params = list(model.parameters())
    want = []
    for i in range(4):
        loss_i = model(input_ids=ids[i : i + 1], labels=ids[i : i + 1]).loss
        want.append(sum(g.double().pow(2).sum() for g in torch.autograd.grad(loss_i, params)))
    rel = ((pe.sqnorms.double() - torch.stack(want)).abs() / torch.stack(want)).max()
    assert rel < 0.02, float(rel)


@pytest.mark.parametrize("mode", ["subbatch", "per_example"])
def test_a_model_moved_to_the_gpu_after_the_tracker_is_measured_as_if_moved_before(mode):
    """``GradientNoiseTracker(model)`` then ``model.cuda()``: the parameters' gradient
    accumulators are new ones (tests/test_engine_edge_cases.py covers a cast on the CPU); the
    history equals that of a tracker built after the move."""
    options = {"per_example_fraction": 1.0} if mode == "per_example" else {}
    histories = []
    for moved_first in (True, False):
        torch.manual_seed(0)
        model = Net()
        if moved_first:
            model.to(CUDA)
        tracker = noisescale.GradientNoiseTracker(model, sync_every=1, **options)
        if not moved_first:
            model.to(CUDA)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        gen = torch.Generator(device=CUDA).manual_seed(1)
        for _ in range(5):
            ids = torch.randint(0, 50, (32, 12), generator=gen, device=CUDA)
            y = torch.randint(0, 5, (32, 12), generator=gen, device=CUDA)
            opt.zero_grad()
            _loss(model(ids), y).mean().backward()
            tracker.step()
            opt.step()
        histories.append(tracker.history)
        tracker.remove()
    before, after = histories
    assert len(after) == 5 and not any(r["skipped"] for r in after)
    for a, b in zip(after, before, strict=True):
        assert a["sqnorm_big"] == pytest.approx(b["sqnorm_big"], rel=1e-5)
        for name, source in b["sources"].items():
            assert a["sources"][name]["sqnorm_small"] == pytest.approx(
                source["sqnorm_small"], rel=1e-5
            )


def test_index_pairs_are_compared_on_the_device_and_refused_when_read():
    """``h[b, t]`` (b, t from a mask's nonzero()): the indices are compared with arange(N) on
    the device, without a host synchronisation; a step whose rows are not the examples is
    refused when the tracker reads it, the steps before it kept (the CPU suite forces this
    path: tests/test_never_silently_wrong.py)."""
    torch.manual_seed(0)

    class Picked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.head = nn.Linear(5, 5), nn.Linear(5, 3)

        def forward(self, x, b, t):
            return self.head(torch.tanh(self.body(x))[b, t]).pow(2).sum(-1)

    def pair(counts: list[int]) -> list[torch.Tensor]:
        keep = torch.zeros(4, 3, dtype=torch.bool)
        for i, c in enumerate(counts):
            keep[i, :c] = True
        return [t.to(CUDA) for t in keep.nonzero(as_tuple=True)]  # (nonzero on the host)

    model = Picked().to(CUDA)
    x = torch.randn(4, 3, 5, device=CUDA)
    tracker = noisescale.GradientNoiseTracker(model, sync_every=64)
    good, bad = pair([1, 1, 1, 1]), pair([2, 1, 1, 0])

    def step(b, t) -> None:
        model.zero_grad()
        model(x, b, t).sum().backward()
        tracker.step()

    steps_without_host_sync(lambda: step(*good), warm=5, checked=2)  # steps 1-7
    step(*good)  # step 8 (audited)
    step(*bad)  # step 9
    with pytest.raises(noisescale.UnsupportedModuleError, match="step 9: the input rows of 'head'"):
        tracker.sync()
    assert [r["step"] for r in tracker.history] == list(range(1, 9))
    tracker.remove()


def test_the_example_check_re_runs_draw_the_same_dropout_masks_on_the_device():
    """(A review, 2026-12-06.) The re-runs that tell whether a layer's input carries the
    examples run the model twice in its training mode, both from one random state: only the
    CPU's was kept, and a dropout on the device drew other masks the second time — every layer
    after it seemed to follow the examples. The device's generators are kept too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.5), nn.Linear(16, 3)).to(CUDA).train()
    engine = PerExampleNorms(model)
    try:
        x = torch.randn(8, 6, device=CUDA)
        first, second = engine._run_twice(((x,), {}), ((x,), {}))
        assert torch.equal(first, second)
    finally:
        engine.remove()
