"""The Lightning and Hugging Face callbacks measure what a plain loop measures, before clipping.

Each framework run is compared step by step with a plain loop over the same batches from the same
initial weights, with gradient clipping on in both: the callback's per-step |G_big|², |G|², tr Σ
and B_simple must equal the plain loop's, where the tracker reads before clipping. The clip
threshold is far below the gradient norm, so a reading after clipping could not agree.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from noisescale import GradientNoiseTracker
from noisescale.errors import NoiseScaleInputError
from noisescale.schedule import AdaptiveBatchSize, BatchSizeRamp
from test_distributed import free_port

pytestmark = pytest.mark.usefixtures("gc_frozen")  # (tests/conftest.py)

N, D, C = 96, 10, 3


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread is as fast, and a second one spinning while another
    process holds the other core slowed the bf16 runs tenfold on this 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


MICRO = 8
CLIP = 1e-3  # |G_big| here is ~0.5: any reading after clipping would be at most CLIP


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, D, generator=g), torch.randint(0, C, (N,), generator=g)


def _net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, C))


class _Wrapped(nn.Module):
    """The plain-loop twin of the framework models: forward(x) calls the same net."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _plain_history(
    init: dict[str, torch.Tensor],
    ks: list[int],
    lrs: list[float] | None = None,
    clip: float | None = CLIP,
    watch: bool = False,
    **tracker_kwargs,
) -> list[dict]:
    """A plain loop: ks[t] micro-batches in step t, tracker before clipping, SGD at lrs[t];
    ``watch``: each micro-batch's loss passed to ``tracker.watch_loss`` (its division measured)."""
    x_all, y_all = _data()
    model = _Wrapped(_net())
    model.load_state_dict(init)
    kwargs = {"sync_every": 1, "per_example_fraction": 1.0, **tracker_kwargs}
    tracker = GradientNoiseTracker(model, **kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = list(zip(x_all.split(MICRO), y_all.split(MICRO), strict=True))
    pos = 0
    for t, k in enumerate(ks):
        if lrs is not None:
            opt.param_groups[0]["lr"] = lrs[t]
        total = torch.zeros(())
        for _ in range(k):
            x, y = batches[pos % len(batches)]
            pos += 1
            raw = F.cross_entropy(model(x), y)
            if watch:
                tracker.watch_loss(raw)
            loss = raw / k
            loss.backward()
            total += loss.detach()
        tracker.step(loss=total)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
    tracker.sync()
    return tracker.history


def _assert_same_history(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g["b_big"] == w["b_big"]
        for key in ("sqnorm_big", "g2", "trace_sigma", "b_simple", "loss"):
            if w[key] is None or math.isnan(w[key]):
                assert g[key] is None or math.isnan(g[key]), key
            else:
                assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-9), key


# -- Lightning ---------------------------------------------------------------------------------


try:
    import lightning.pytorch as pl

    from noisescale.integrations.lightning import NoiseScaleCallback as LightningCallback
except ImportError:
    pl = None

needs_lightning = pytest.mark.skipif(pl is None, reason="lightning is not installed")


def _lit_model() -> nn.Module:
    class LitModel(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _net()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return LitModel()


def _lit_trainer(callback, *others, **kwargs):
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return pl.Trainer(callbacks=[callback, *others], **{**defaults, **kwargs})


def _loader() -> torch.utils.data.DataLoader:
    x, y = _data()
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=MICRO, shuffle=False
    )


@needs_lightning
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lightning_matches_plain_loop_before_clipping():
    model = _lit_model()
    init = copy.deepcopy(model.state_dict())
    callback = LightningCallback(sync_every=1, log_every=0, per_example_fraction=1.0)
    trainer = _lit_trainer(callback, max_steps=6, accumulate_grad_batches=2, gradient_clip_val=CLIP)
    trainer.fit(model, _loader())
    got = callback.tracker.history
    _assert_same_history(got, _plain_history(init, [2] * 6))
    # the callback saw unclipped gradients: |G_big| far above the clip threshold
    assert all(h["sqnorm_big"] > 1e4 * CLIP**2 for h in got)
    # and clipping does not change what is measured: the first step equals an unclipped loop's
    assert got[0]["sqnorm_big"] == pytest.approx(
        _plain_history(init, [2], clip=None)[0]["sqnorm_big"]
    )


@needs_lightning
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("second_forward", [False, True], ids=["one forward", "a forward each"])
def test_lightning_two_optimizers_stepped_in_one_batch_are_refused(second_forward):
    """A GAN's pattern under manual optimisation: a generator step, then a discriminator step on
    another objective, in one training_step. With a forward before each, both were measured as
    steps and averaged into one estimate until 2026-12-05 (a helper's hunt); now refused, as
    two steps after one forward always were."""
    import lightning.pytorch as pl_

    class Two(pl_.LightningModule):
        def __init__(self):
            super().__init__()
            self.gen = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
            self.disc = nn.Linear(6, 1)
            self.automatic_optimization = False

        def forward(self, x, which="gen"):
            return self.gen(x) if which == "gen" else self.disc(x)

        def training_step(self, batch, i):
            x, y = batch
            o_g, o_d = self.optimizers()
            self.manual_backward(F.cross_entropy(self(x), y))
            o_g.step()
            o_g.zero_grad()
            if second_forward:
                self.manual_backward((self(x, "disc").squeeze(1) - y.float()).pow(2).mean())
            o_d.step()
            o_d.zero_grad()

        def configure_optimizers(self):
            return [
                torch.optim.SGD(self.gen.parameters(), 0.1),
                torch.optim.SGD(self.disc.parameters(), 0.1),
            ]

    g = torch.Generator().manual_seed(11)
    data = torch.utils.data.TensorDataset(
        torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
    )
    callback = LightningCallback(sync_every=1, log_every=0)
    trainer = _lit_trainer(callback, max_epochs=1, limit_train_batches=2)
    two = Two()
    with pytest.raises(NoiseScaleInputError, match="a second optimizer step in one training batch"):
        trainer.fit(two, torch.utils.data.DataLoader(data, batch_size=4))
    # released, though Lightning calls no teardown after an error: the model's hooks and the
    # engine's watch of every torch call stayed, and its walk of each later backward made
    # another model's under selective checkpointing fail (test order, until 2026-12-07)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in two.modules())
    assert not torch._C._len_torch_function_stack()


@needs_lightning
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lightning_short_last_window_is_measured():
    """12 batches with accumulate_grad_batches=5: windows of 5, 5 and 2. Lightning divides
    every loss by 5, the short window's too; the callback measures that division (it used to
    assume the window's own count, 2, and read |G|² and tr Σ (2/5)² = 0.16× the truth). The
    records equal a plain loop's that divides each step by its own count. A training_step
    that returns None (its batch skipped) in a step of its own is left out, not a crash."""
    model = _lit_model()
    init = copy.deepcopy(model.state_dict())
    callback = LightningCallback(sync_every=1, log_every=0, per_example_fraction=1.0)
    _lit_trainer(callback, max_epochs=1, accumulate_grad_batches=5).fit(model, _loader())
    got = callback.tracker.history
    want = _plain_history(init, [5, 5, 2], clip=None, watch=True)
    assert [h["b_big"] for h in got] == [40, 40, 16]
    for g, w in zip(got, want, strict=True):
        for key in ("sqnorm_big", "g2", "trace_sigma"):
            assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-9), key

    class SkipsOne(type(_lit_model())):
        def training_step(self, batch, batch_idx):
            return None if batch_idx == 1 else super().training_step(batch, batch_idx)

    model = SkipsOne()
    callback = LightningCallback(sync_every=1, log_every=0, per_example_fraction=1.0)
    _lit_trainer(callback, max_steps=4).fit(model, _loader())
    assert callback.tracker.steps == 3 and len(callback.tracker.history) == 3


def _manual_model(form: str, clip: bool = False, k: int = 2, mean: str = "mean") -> nn.Module:
    """Manual optimisation over ``k`` micro-batches a step, each one's mean loss handed to
    manual_backward in ``form`` ('divided': loss / k, Lightning's documented form; 'times':
    loss * (1 / k); 'undivided', at 1/k the learning rate: the same updates; 'within': the
    mean's count times k, one division, sum / (len(x) · k)); ``clip``:
    self.clip_gradients before opt.step(); ``mean``: the mean written as F.cross_entropy's
    ('mean'), as a sum divided by len(x) ('sum/len') or by a count of labels ('sum/count')."""

    class Manual(type(_lit_model())):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            x, y = batch
            if mean == "mean":
                loss = F.cross_entropy(self(x), y)
            else:
                count = len(x) if mean == "sum/len" else (y >= 0).sum()
                loss = F.cross_entropy(self(x), y, reduction="sum")
                loss = loss / (count * k if form == "within" else count)
            if form == "divided":
                loss = loss / k
            elif form == "times":
                loss = loss * (1 / k)
            self.manual_backward(loss)
            if batch_idx % k == k - 1:
                if clip:
                    self.clip_gradients(opt, gradient_clip_val=CLIP)
                opt.step()
                opt.zero_grad()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1 / k if form == "undivided" else 0.1)

    return Manual()


def _assert_records_equal(got, want, nan_ok=True):
    """Each record's |G_big|², g2, tr Σ and B_simple equal the plain loop's (rel 1e-5)."""
    for g, w in zip(got, want, strict=True):
        for key in ("sqnorm_big", "g2", "trace_sigma", "b_simple"):
            assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-9, nan_ok=nan_ok), key


@needs_lightning
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("form", ["divided", "times", "undivided"])
def test_lightning_manual_optimization_measures_the_losses_division(form):
    """Manual optimisation, 2 micro-batches a step: each loss handed to manual_backward is
    watched, the constant it was divided by last measured (as a plain loop's watch_loss before
    the division) — divided by 2, times 0.5 or undivided, the records equal the plain loop's.
    Until 2026-12-06 the division by 2 was assumed: a loss not divided read |G|², tr Σ and
    |G_big|² 4× too large (B_simple right), without a word (a hunt)."""
    model = _manual_model(form)
    init = copy.deepcopy(model.state_dict())
    callback = LightningCallback(sync_every=1, log_every=0, per_example_fraction=1.0)
    _lit_trainer(callback, max_steps=3).fit(model, _loader())
    got = callback.tracker.history
    want = _plain_history(init, [2] * 3, clip=None, watch=True)
    assert [h["b_big"] for h in got] == [16] * 3
    _assert_records_equal(got, want, nan_ok=False)


@needs_lightning
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("mean", ["sum/len", "sum/count"])
@pytest.mark.parametrize("k", [1, 2])
def test_lightning_manual_optimization_does_not_read_a_means_count_as_the_division(k, mean):
    """A mean written by hand, a sum divided by len(x) or by a 0-d count of the labels, then
    divided by the k micro-batches (k = 1: not at all): the mean's own count is not the
    accumulation's division — the records equal the plain loop's. Until 2026-12-06 the count
    divided by last was read as the accumulation divisor: |G|², tr Σ and |G_big|² 64× too large
    at k = 1, without a word (a review). A count divided by last with k > 1 and no division by k
    cannot be told from a division: the plain loop's assumption (here right), warned about."""
    model = _manual_model("divided", k=k, mean=mean)
    init = copy.deepcopy(model.state_dict())
    callback = LightningCallback(sync_every=1, log_every=0, per_example_fraction=1.0)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _lit_trainer(callback, max_steps=3).fit(model, _loader())
    assert not [w for w in seen if "assumed divided" in str(w.message)]
    got = callback.tracker.history
    want = _plain_history(init, [k] * 3, clip=None, watch=True)
    assert [h["b_big"] for h in got] == [MICRO * k] * 3
    _assert_records_equal(got, want)
    if k == 1 or mean != "sum/len":
        return
    callback = LightningCallback(sync_every=1, log_every=0, per_example_fraction=1.0)
    with pytest.warns(RuntimeWarning, match=r"assumed divided by 2.*tracker\.watch_loss\(loss\)"):
        _lit_trainer(callback, max_steps=3).fit(_manual_model("within", k=k, mean=mean), _loader())
    for g, w in zip(callback.tracker.history, want, strict=True):
        assert g["sqnorm_big"] == pytest.approx(w["sqnorm_big"], rel=1e-5), "assumed k"


@needs_lightning
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lightning_manual_accumulation_across_an_epochs_end_is_measured():
    """(The integrations fuzzer, Lightning seed 25, 2026-12-07.) Lightning's documented manual
    accumulation, loss / 5 and opt.step() at batch_idx % 5 == 4, over 12 batches an epoch:
    batch_idx restarts, so the third step backpropagates 7 losses (2 of the first epoch, 5 of
    the next), each divided by 5. The 5 read exactly from the first steps is that step's
    divisor: its record equals the plain loop's, which measures its own division. Until then
    each was assumed divided by 7 — |G_big|², g2 and tr Σ (7/5)² = 1.96× too large — with a
    warning blaming a mean written by hand and asking for the form used."""
    model = _manual_model("divided", k=5)
    init = copy.deepcopy(model.state_dict())
    callback = LightningCallback(sync_every=1, log_every=0, per_example_fraction=1.0)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _lit_trainer(callback, max_steps=3).fit(model, _loader())
    assert not [w for w in seen if "assumed divided" in str(w.message)]
    got = callback.tracker.history
    want = _plain_history(init, [5, 5, 7], clip=None, watch=True)
    assert [h["b_big"] for h in got] == pytest.approx([MICRO * 5] * 2 + [MICRO * 7], rel=1e-12)
    _assert_records_equal(got, want)
    assert callback.state_dict()["manual_accumulation"] == 5.0  # (kept over a resume)


@needs_lightning
def test_lightning_manual_optimization_reads_the_last_division():
    """What the loss handed to manual_backward was divided by last: the constant numbers at the
    end of its graph, as running products from the last (under 16-mixed, behind the scaler's
    multiplication, which the tracker divides out itself); not a tensor divisor computed with
    gradients."""
    from noisescale.integrations.lightning import _trailing_divisors

    w = torch.ones(3, requires_grad=True)
    loss = (w * 2.0).sum()
    assert _trailing_divisors(loss) == []
    assert _trailing_divisors(loss / 4) == [4.0]
    assert _trailing_divisors(loss * 0.25) == [4.0]
    assert _trailing_divisors(0.5 * (loss / 3)) == [2.0, 6.0]
    assert _trailing_divisors(loss / torch.tensor(4.0)) == [4.0]
    assert _trailing_divisors((loss / 4) * torch.tensor(65536.0), scaled=True) == [4.0]
    assert _trailing_divisors(loss * torch.tensor(65536.0), scaled=True) == []
    assert _trailing_divisors(loss / w.sum()) == []


@needs_lightning
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lightning_manual_optimization_clip_is_refused_naming_the_callbacks_fix():
    """self.clip_gradients before opt.step() under manual optimisation, Lightning's documented
    way: the callback measures in on_before_optimizer_step, inside opt.step(), after the clip —
    refused with a message for a callback user (until 2026-12-06 the tracker's own, which said
    to call tracker.step(), which a callback user never calls)."""
    callback = LightningCallback(sync_every=1, log_every=0, per_example_fraction=1.0)
    with pytest.raises(NoiseScaleInputError) as err:
        _lit_trainer(callback, max_steps=3).fit(_manual_model("divided", clip=True), _loader())
    said = str(err.value)
    assert "manual optimization" in said and "gradient_clip_val" in said, said
    assert "call tracker.step()" not in said, said
    assert callback.tracker.steps == 0


@needs_lightning
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lightning_applies_schedule_at_legal_step_boundaries():
    # 8 examples per step until 24 are consumed, then 16. After 3 steps the epoch has seen 3
    # batches; an accumulation of 2 can start only at an even batch index, so the change
    # lands one step later, with its learning rate (linear rule, tuned at 8) at the same step.
    schedule = BatchSizeRamp.stepwise(
        [(0, 8), (24, 16)], micro_batch_size=MICRO, lr_rule="linear", base_batch_size=8
    )
    callback = LightningCallback(schedule, sync_every=1, log_every=2)
    trainer = _lit_trainer(callback, max_steps=10)
    trainer.fit(_lit_model(), _loader())
    got = [(h["b_big"], h["lr"]) for h in callback.tracker.history]
    assert got == [(8.0, 0.1)] * 4 + [(16.0, 0.2)] * 6
    # the epoch (12 micro-batches) ended on a step boundary: 4×1 + 4×2, then 2 steps of 2
    assert trainer.accumulate_grad_batches == 2


@needs_lightning
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("measure_every", [1, 3])
@pytest.mark.parametrize("data", ["full", "short last batch", "varying batches"])
def test_lightning_ramp_counts_the_trained_examples_under_measure_every(measure_every, data):
    """Before every optimizer step the ramp has counted the examples trained in the steps
    before it, whatever the tracker's measure_every and the batches' sizes: fed
    tracker.examples, which lags on the unmeasured steps, it counted 160 for 192 and moved two
    steps late; then counted as micro-batches × micro_batch_size, every smaller batch (an
    epoch's short last one, a collate_fn that filters) was counted whole (two hunts)."""
    x, y = _data()
    n = N - 3 if data == "short last batch" else N  # 93 = 11 × 8 + 5
    collate = None
    if data == "varying batches":

        def collate(rows):  # drops the examples of class 0: batches of 1 to 8
            kept = [r for r in rows if r[1] != 0] or rows[:1]
            return torch.stack([r[0] for r in kept]), torch.stack([r[1] for r in kept])

    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x[:n], y[:n]), batch_size=MICRO, collate_fn=collate
    )
    ramp = BatchSizeRamp.stepwise([(0, 8), (16, 16), (48, 32)], micro_batch_size=MICRO)
    model, rows = _lit_model(), []
    seen = {"examples": 0, "step": 0}

    def on_train_batch_start(batch, batch_idx):
        seen["examples"] += len(batch[0])

    def on_before_optimizer_step(optimizer):
        rows.append((ramp.state.examples, seen["step"]))
        seen["step"] = seen["examples"]

    model.on_train_batch_start = on_train_batch_start
    model.on_before_optimizer_step = on_before_optimizer_step
    callback = LightningCallback(ramp, log_every=0, measure_every=measure_every)
    _lit_trainer(callback, max_epochs=2).fit(model, loader)
    assert [counted for counted, _ in rows] == [done for _, done in rows]
    assert ramp.state.examples == seen["examples"]
    if data == "varying batches":
        assert seen["examples"] < 2 * n
    else:
        assert seen["examples"] == 2 * n


@needs_lightning
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lightning_refuses_a_schedule_it_cannot_realise_or_scale():
    """Refused when training starts, before a step: a micro-batch other than the dataloader's
    batch × processes (the schedule counts global examples), and, under a learning-rate rule, a
    scheduler whose rates scale_lr cannot scale (the factor would be lost at its next step)."""
    ramp = BatchSizeRamp.stepwise([(0, 16), (32, 32)], micro_batch_size=16)
    with pytest.raises(NoiseScaleInputError, match=r"micro_batch_size is 16 .* 8 examples"):
        _lit_trainer(LightningCallback(ramp, log_every=0), max_steps=2).fit(_lit_model(), _loader())

    class Own(torch.optim.lr_scheduler.LRScheduler):
        def get_lr(self):
            return [0.1 / (1 + self.last_epoch) for _ in self.optimizer.param_groups]

    def with_scheduler(make):
        model = _lit_model()

        def configure_optimizers():
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": make(opt), "interval": "step"}}

        model.configure_optimizers = configure_optimizers
        return model

    sqrt = BatchSizeRamp.stepwise([(0, 8), (24, 16)], micro_batch_size=MICRO, lr_rule="sqrt")
    trainer = _lit_trainer(LightningCallback(sqrt, log_every=0), max_steps=2)
    with pytest.raises(NoiseScaleInputError, match="cannot scale the learning rate of a Own"):
        trainer.fit(with_scheduler(Own), _loader())
    assert sqrt.state.step == 0
    # a supported one runs, with the factor through the scheduler: √2 from step 5 on
    sqrt = BatchSizeRamp.stepwise([(0, 8), (24, 16)], micro_batch_size=MICRO, lr_rule="sqrt",
                                  base_batch_size=8)  # fmt: skip
    callback = LightningCallback(sqrt, sync_every=1, log_every=0)
    trainer = _lit_trainer(callback, max_steps=8)
    trainer.fit(with_scheduler(lambda o: torch.optim.lr_scheduler.StepLR(o, 2, 0.5)), _loader())
    lrs = [h["lr"] for h in callback.tracker.history]
    want = [0.1 * 0.5 ** (i // 2) * (math.sqrt(2) if i >= 4 else 1.0) for i in range(8)]
    assert lrs == pytest.approx(want)


@needs_lightning
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("fraction", [1.0, 1 / 16])
def test_lightning_adaptive_resume_continues_batch_and_lr(tmp_path, fraction):
    def make_callback() -> LightningCallback:
        schedule = AdaptiveBatchSize(
            micro_batch_size=MICRO,
            max_batch_size=32,
            factor=0.25,
            interval=2,
            hysteresis=1.01,
            max_relative_width=math.inf,
            lr_rule="sqrt",
        )
        return LightningCallback(schedule, sync_every=1, log_every=0, per_example_fraction=fraction)

    def run(epochs: int, callback, ckpt: str | None = None):
        trainer = _lit_trainer(callback, max_epochs=epochs)
        trainer.fit(_lit_model(), _loader(), ckpt_path=ckpt)
        return trainer

    whole = make_callback()
    run(3, whole)
    first = make_callback()
    trainer = run(1, first)
    path = str(tmp_path / "epoch1.ckpt")
    trainer.save_checkpoint(path)
    second = make_callback()
    run(3, second, path)
    want = [(h["b_big"], h["lr"]) for h in whole.tracker.history]
    got = [(h["b_big"], h["lr"]) for h in first.tracker.history + second.tracker.history]
    assert got == want  # the subset's draws resume exactly too
    # and the estimates continue as if uninterrupted
    _assert_same_history(
        second.tracker.history, whole.tracker.history[len(first.tracker.history) :]
    )
    assert second.tracker.estimate() == whole.tracker.estimate()
    if fraction == 1.0:  # (the labels are random: a 1-row subset leaves |G|² unresolved)
        assert len({b for b, _ in want}) > 1  # the schedule did change the batch


@needs_lightning
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lightning_values_reach_csv_and_tensorboard(tmp_path):
    """Every logger of the trainer gets the values: its CSV file and TensorBoard events."""
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    callback = LightningCallback(sync_every=1, log_every=1, per_example_fraction=1.0)
    loggers = [CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")]
    trainer = _lit_trainer(
        callback, max_steps=6, accumulate_grad_batches=2, logger=loggers, log_every_n_steps=1
    )
    trainer.fit(_lit_model(), _loader())
    history = callback.tracker.history
    # Lightning writes a step's values under its count of optimizer steps before it
    want = {h["step"] - 1: h["b_simple"] for h in history if math.isfinite(h["b_simple"])}
    assert len(want) >= 4
    (csv_path,) = tmp_path.joinpath("csv").rglob("metrics.csv")
    with csv_path.open() as f:
        rows = [r for r in csv.DictReader(f) if r["noisescale/b_simple"] not in ("", "nan")]
    got = {int(r["step"]): float(r["noisescale/b_simple"]) for r in rows}
    # both store float32: a relative rounding of at most 2⁻²⁴
    assert got == pytest.approx(want, rel=1e-7)
    (events,) = {p.parent for p in tmp_path.joinpath("tb").rglob("events.out.tfevents.*")}
    board = EventAccumulator(str(events))
    board.Reload()
    scalars = board.Scalars("noisescale/b_simple")
    got = {e.step: e.value for e in scalars if math.isfinite(e.value)}
    assert got == pytest.approx(want, rel=1e-7)


@needs_lightning
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lightning_callback_follows_the_model_across_fits():
    """A callback reused for a second fit measures the new model and lets go of the old one."""
    callback = LightningCallback(sync_every=1, log_every=0, per_example_fraction=1.0)
    models = [_lit_model(), _lit_model()]  # the same initial weights
    want = _plain_history(copy.deepcopy(models[0].state_dict()), [2] * 6)
    histories = []
    for model in models:
        trainer = _lit_trainer(
            callback, max_steps=6, accumulate_grad_batches=2, gradient_clip_val=CLIP
        )
        trainer.fit(model, _loader())
        histories.append(callback.tracker.history)
    assert histories[0] is not histories[1]
    for got in histories:
        _assert_same_history(got, want)
    for old in models:
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in old.modules())
        assert not any(p._backward_hooks for p in old.parameters())


@needs_lightning
def test_lightning_callback_refuses_a_schedule_with_an_optimizer():
    opt = torch.optim.SGD(_net().parameters(), lr=0.1)
    schedule = AdaptiveBatchSize(micro_batch_size=8, max_batch_size=64, factor=1.0, optimizer=opt)
    with pytest.raises(NoiseScaleInputError, match="no optimizer"):
        LightningCallback(schedule)


def test_callbacks_refuse_a_schedule_with_a_batch_sampler():
    """The callbacks realise the batch through accumulation: a schedule that also resizes a
    ResizableBatchSampler made every step k × its batch (Lightning: 24 → 72 examples, a hunt)."""
    from noisescale.schedule import ResizableBatchSampler

    sampler = ResizableBatchSampler(100, 8)
    schedule = AdaptiveBatchSize(micro_batch_size=8, max_batch_size=64, factor=1.0,
                                 batch_sampler=sampler)  # fmt: skip
    ramp = BatchSizeRamp.stepwise([(0, 8)], micro_batch_size=8, batch_sampler=sampler)
    pytest.importorskip("transformers")
    from noisescale.integrations.transformers import NoiseScaleCallback

    callbacks = [(NoiseScaleCallback, "TrainingArguments.gradient_accumulation_steps")]
    if pl is not None:
        callbacks.append((LightningCallback, "Trainer.accumulate_grad_batches"))
    for callback, setting in callbacks:
        for s in (schedule, ramp):
            with pytest.raises(NoiseScaleInputError, match="no batch_sampler") as got:
                callback(s)
            assert setting in str(got.value) and "without batch_sampler=" in str(got.value)


def _ramp() -> BatchSizeRamp:
    return BatchSizeRamp.stepwise(
        [(0, 8), (24, 16)], micro_batch_size=MICRO, lr_rule="linear", base_batch_size=8
    )


@needs_lightning
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lightning_group_added_later_takes_the_schedule_s_factor():
    """Progressive unfreezing under the callback: a group added after the ramp's change (its
    rate 0.3, tuned at B₀ = 8) takes the factor 2 at the next step boundary, as the first
    group did; scaling by the ratio new/old alone left it at 0.3 (a hunt's finding in the
    schedule, the same code here)."""

    class Unfreezing(type(_lit_model())):
        def __init__(self) -> None:
            super().__init__()
            self.extra = nn.Parameter(torch.zeros(1), requires_grad=False)  # (its rate only)

        def configure_optimizers(self):
            return torch.optim.SGD(self.net.parameters(), lr=0.1)

    class Unfreeze(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            opt = trainer.optimizers[0]
            if trainer.global_step == 6 and len(opt.param_groups) == 1:
                opt.add_param_group({"params": [module.extra], "lr": 0.3})

    ramp = _ramp()
    callback = LightningCallback(ramp, sync_every=1, log_every=0)
    trainer = _lit_trainer(callback, Unfreeze(), max_steps=10)
    trainer.fit(Unfreezing(), _loader())
    assert ramp.lr_factor == 2.0
    assert [g["lr"] for g in trainer.optimizers[0].param_groups] == pytest.approx([0.2, 0.6])


@needs_lightning
def test_lightning_scales_each_optimizer_s_own_schedulers_once():
    """A GAN: two optimizers, each with its LambdaLR. Every scheduler was scaled along with
    every optimizer, its base rates by the factor squared (1.6 for 0.4 at factor 4), and the
    next step() set 1.6 (a hunt). Each scheduler keeps its optimizer's rate × 4 through a step."""
    from types import SimpleNamespace

    ramp = BatchSizeRamp.stepwise([(0, 8), (16, 32)], micro_batch_size=8, lr_rule="linear",
                                  base_batch_size=8)  # fmt: skip
    callback = LightningCallback(ramp, log_every=0)
    opts = [torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr) for lr in (0.1, 0.2)]
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1.0) for o in opts]
    configs = [SimpleNamespace(scheduler=s) for s in scheds]
    trainer = SimpleNamespace(
        accumulate_grad_batches=1, optimizers=opts, lr_scheduler_configs=configs
    )
    callback._apply(trainer)
    for _ in range(3):
        ramp.step()
    callback._apply(trainer)
    assert ramp.lr_factor == 4.0
    assert [s.base_lrs for s in scheds] == [pytest.approx([0.4]), pytest.approx([0.8])]
    for o, s in zip(opts, scheds, strict=True):
        o.step()
        s.step()
    assert [o.param_groups[0]["lr"] for o in opts] == pytest.approx([0.4, 0.8])


def test_transformers_group_added_later_takes_the_schedule_s_factor():
    """The Hugging Face callback scaled every group by the ratio new/old: a group added at 0.3
    (tuned at B₀ = 8) after the factor 2 ended at 0.6 once the factor was 4, where the rule
    gives 1.2 (a hunt). It takes the factor in effect at the next step boundary, and the
    callback's checkpoint records which groups carry it, so a group added after a resume takes
    it too."""
    pytest.importorskip("transformers")
    from types import SimpleNamespace

    from noisescale.integrations.transformers import NoiseScaleCallback

    def ramp() -> BatchSizeRamp:
        return BatchSizeRamp.stepwise([(0, 8), (16, 16), (200, 32)], micro_batch_size=8,
                                      lr_rule="linear", base_batch_size=8)  # fmt: skip

    def group(lr: float) -> dict:
        return {"params": [nn.Parameter(torch.zeros(1))], "lr": lr}

    args = SimpleNamespace(gradient_accumulation_steps=1)
    callback, opt = NoiseScaleCallback(ramp()), torch.optim.SGD(**group(0.1))
    callback._optimizer = opt
    callback._apply(args)
    for _ in range(3):
        callback.schedule.step()
    callback._apply(args)  # factor 2
    opt.add_param_group(group(0.3))
    callback._apply(args)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.2, 0.6])
    callback.tracker = GradientNoiseTracker(nn.Linear(2, 1))
    saved = callback._snapshot()
    resumed = NoiseScaleCallback(ramp())
    resumed.tracker = GradientNoiseTracker(nn.Linear(2, 1))
    resumed._load(saved)
    resumed._optimizer = opt
    opt.add_param_group(group(0.5))  # after the resume
    for _ in range(20):
        resumed.schedule.step()
    resumed._apply(args)
    assert resumed.schedule.lr_factor == 4.0
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.4, 1.2, 2.0])


@pytest.mark.parametrize("framework", ["transformers", "lightning"])
def test_callback_checkpoint_before_examples_seen_loads(framework):
    """A callback checkpoint written before the callbacks kept ``examples_seen`` (2026-12-07)
    loads: the count is the loaded tracker's ``examples_trained`` (5 steps of 3 to 7 examples
    under measure_every=3, two of them unmeasured), so the next step counts its own examples
    only. Until then a KeyError (a review)."""
    if framework == "lightning":
        if pl is None:
            pytest.skip("lightning is not installed")
        cls = LightningCallback
    else:
        pytest.importorskip("transformers")
        from noisescale.integrations.transformers import NoiseScaleCallback as cls
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    callback = cls()
    callback.tracker = GradientNoiseTracker(model, measure_every=3)
    for b in (3, 4, 5, 6, 7):
        model.zero_grad()
        F.mse_loss(model(torch.randn(b, 4)), torch.randn(b, 1)).backward()
        callback.tracker.step()
    if framework == "lightning":
        saved = callback.state_dict()
    else:
        saved = {**callback._snapshot(), "epoch": 0, "position": 5}
    del saved["examples_seen"]
    resumed = cls()
    resumed.tracker = GradientNoiseTracker(model, measure_every=3)
    resumed._load(saved)
    assert resumed._examples_seen == 25 == resumed.tracker.examples_trained


@needs_lightning
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lightning_refuses_a_schedule_under_manual_optimization():
    """Lightning ignores accumulate_grad_batches under manual optimisation: the schedule's
    batch would never run while its learning rate did (batch 8 at twice the rate, until
    2026-12-05, a hunt found). Refused before the first step."""
    callback = LightningCallback(_ramp(), sync_every=1, log_every=0)
    with pytest.raises(NoiseScaleInputError, match=r"manual optimisation.*accumulate_grad_batches"):
        _lit_trainer(callback, max_steps=10).fit(_manual_model("undivided", k=1), _loader())
    assert callback.tracker.steps == 0
    # measuring only is still fine under manual optimisation
    callback = LightningCallback(sync_every=1, log_every=0)
    _lit_trainer(callback, max_steps=3).fit(_manual_model("undivided", k=1), _loader())
    assert callback.tracker.steps == 3


@needs_lightning
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lightning_refuses_a_schedule_with_gradient_accumulation_scheduler():
    """Two controllers of accumulate_grad_batches: until 2026-12-05 Lightning's scheduler set
    k = 3 after the callback, and steps of 24 ran at the learning rate chosen for 16."""
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    callback = LightningCallback(_ramp(), sync_every=1, log_every=0)
    trainer = _lit_trainer(callback, GradientAccumulationScheduler({0: 1, 1: 3}), max_epochs=2)
    with pytest.raises(NoiseScaleInputError, match="GradientAccumulationScheduler"):
        trainer.fit(_lit_model(), _loader())
    assert callback.tracker.steps == 0


@needs_lightning
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_callbacks_warn_about_draws_without_replacement_from_a_small_data_set(tmp_path):
    """A shuffled loader draws each epoch's batches without replacement from the N = 96
    examples: eq. A.2's |G|² then reads tr Σ/N low, and here B_simple (≈ 1.5–2·N corrected)
    read nan where the README said such draws bias nothing. Both callbacks, which can see the
    default sampler and the data set's length, warn and name dataset_size=96; with it given they
    do not; an unshuffled loader is not judged so (it has its own warning)."""
    from noisescale.integrations.transformers import NoiseScaleCallback

    x, y = _data()
    shuffled = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=MICRO, shuffle=True
    )

    def messages(fit) -> list[str]:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            fit()
        return [str(w.message) for w in seen if "without replacement" in str(w.message)]

    for kwargs, loader in (({}, shuffled), ({"dataset_size": N}, shuffled), ({}, _loader())):
        callback = LightningCallback(sync_every=1, log_every=0, **kwargs)
        seen = messages(
            lambda: _lit_trainer(callback, max_steps=24).fit(_lit_model(), loader)  # noqa: B023
        )
        if kwargs or loader is not shuffled:
            assert not seen
        else:
            assert len(seen) == 1 and "pass dataset_size=96" in seen[0]
    pytest.importorskip("transformers")
    for kwargs in ({}, {"dataset_size": N}):
        callback = NoiseScaleCallback(sync_every=1, **kwargs)
        _, trainer = _hf_train(tmp_path, callback, max_steps=12, train_sampling_strategy="random")
        seen = messages(trainer.train)
        assert len(seen) == (0 if kwargs else 1)
        assert callback.tracker._drawn_from == N


@needs_lightning
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lightning_unshuffled_loader_warned_and_overfit_batches_refused():
    """A step's examples must be random draws: an unshuffled loader is right only on data
    stored shuffled (11× low on sorted data, a hunt found), so it is warned about once; a
    shuffled loader, a batch sampler of the user's own and a CombinedLoader are not."""
    from lightning.pytorch.utilities import CombinedLoader

    def fit(loader, **kwargs):
        callback = LightningCallback(sync_every=1, log_every=0)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            _lit_trainer(callback, max_steps=2, **kwargs).fit(_lit_model(), loader)
        return [str(w.message) for w in seen if issubclass(w.category, RuntimeWarning)]

    x, y = _data()
    data = torch.utils.data.TensorDataset(x, y)
    unshuffled = [m for m in fit(_loader()) if "not shuffled" in m]
    assert len(unshuffled) == 1 and "SequentialSampler" in unshuffled[0]
    shuffled = torch.utils.data.DataLoader(data, batch_size=MICRO, shuffle=True)
    assert not [m for m in fit(shuffled) if "not shuffled" in m]
    own = torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(data), MICRO, False)

    class Own(torch.utils.data.Sampler):  # a batch sampler of the user's own: not judged
        def __iter__(self):
            return iter(own)

        def __len__(self):
            return len(own)

    mine = torch.utils.data.DataLoader(data, batch_sampler=Own())
    assert not [m for m in fit(mine) if "not shuffled" in m]
    combined = CombinedLoader({"a": shuffled, "b": _loader()}, "max_size_cycle")

    class Two(type(_lit_model())):
        def training_step(self, batch, batch_idx):
            x, y = batch["a"]
            return F.cross_entropy(self(x), y)

    callback = LightningCallback(sync_every=1, log_every=0)
    with pytest.warns(RuntimeWarning, match="not shuffled"):
        _lit_trainer(callback, max_steps=2).fit(Two(), combined)
    assert callback.tracker.steps == 2
    callback = LightningCallback(sync_every=1, log_every=0)
    with pytest.raises(NoiseScaleInputError, match=r"overfit_batches=2\) replays"):
        _lit_trainer(callback, max_steps=2, overfit_batches=2).fit(_lit_model(), shuffled)


@needs_lightning
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lightning_precondition_true_is_the_modules_optimizer():
    """precondition=True (the Hugging Face callback's spelling) preconditions with the
    optimizer configure_optimizers returns; until 2026-12-05 it was refused ('got bool')."""
    model = _lit_model()
    model.configure_optimizers = lambda: torch.optim.Adam(model.parameters(), lr=1e-3)
    callback = LightningCallback(sync_every=1, log_every=0, precondition=True, precondition_from=2)
    _lit_trainer(callback, max_steps=4).fit(model, _loader())
    tracker = callback.tracker
    assert tracker.precondition is model.trainer.optimizers[0]
    assert [h["preconditioned"] for h in tracker.history] == [False, False, True, True]
    # the same run with the optimizer passed by hand measures the same
    model = _lit_model()
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.configure_optimizers = lambda: adam
    by_hand = LightningCallback(sync_every=1, log_every=0, precondition=adam, precondition_from=2)
    _lit_trainer(by_hand, max_steps=4).fit(model, _loader())
    _assert_same_history(tracker.history, by_hand.tracker.history)
    # an optimizer the trainer does not step would never start preconditioning
    model = _lit_model()
    other = LightningCallback(log_every=0, precondition=torch.optim.Adam(model.parameters()))
    with pytest.raises(NoiseScaleInputError, match="got Adam, which is not an optimizer the"):
        _lit_trainer(other, max_steps=1).fit(model, _loader())
    # several optimizers: which one is ambiguous
    model = _lit_model()
    model.automatic_optimization = False
    model.configure_optimizers = lambda: [
        torch.optim.Adam(model.net[0].parameters()),
        torch.optim.Adam(model.net[2].parameters()),
    ]
    callback = LightningCallback(log_every=0, precondition=True)
    with pytest.raises(NoiseScaleInputError, match="returned 2; pass the one"):
        _lit_trainer(callback, max_steps=1).fit(model, _loader())


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_compiled_submodule_is_refused_at_construction_with_the_fix(tmp_path):
    """A torch.compile'd submodule inside the measured model (self.net = torch.compile(...), a
    common Lightning pattern) crashed at the first compiled step inside Dynamo until
    2026-12-05. Refused when the tracker is made, in a plain loop and through both callbacks;
    the whole model compiled, a submodule compiled in place, and per_example=False run (the
    in-place one exact against eager)."""
    x, y = _data()

    def run(model, **kwargs) -> list[dict]:
        tracker = GradientNoiseTracker(model, sync_every=1, **kwargs)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for s in range(4):
            for k in range(2):
                rows = slice(16 * s + 8 * k, 16 * s + 8 * k + 8)
                F.cross_entropy(model(x[rows]), y[rows]).backward()
            tracker.step()
            opt.step()
            opt.zero_grad()
        tracker.remove()
        return tracker.history

    def wrapped(compiled: str) -> nn.Module:
        model = _Wrapped(_net())
        if compiled == "wrapper":
            model.net = torch.compile(model.net, backend="eager")
        elif compiled == "in place":
            model.net.compile(backend="eager")
        return model

    with pytest.raises(NoiseScaleInputError, match=r"\['net'\] .*compile the whole model"):
        GradientNoiseTracker(wrapped("wrapper"))
    exact = {"per_example_fraction": 1.0, "microbatch": False}
    _assert_same_history(run(wrapped("in place"), **exact), run(wrapped("none"), **exact))
    assert len(run(wrapped("wrapper"), per_example=False)) == 4
    # the root compiled is not refused
    GradientNoiseTracker(torch.compile(wrapped("none"), backend="eager")).remove()

    # nor a frozen compiled part (a teacher): it has no gradient to measure, and is exact
    class WithTeacher(nn.Module):
        def __init__(self, compiled: bool) -> None:
            super().__init__()
            self.net = _net()
            teacher = _net().requires_grad_(False)
            self.teacher = torch.compile(teacher, backend="eager") if compiled else teacher

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x) + 0.5 * self.teacher(x)

    torch.manual_seed(0)
    with_compiled = WithTeacher(True)
    torch.manual_seed(0)
    with_eager = WithTeacher(False)
    _assert_same_history(run(with_compiled, **exact), run(with_eager, **exact))
    if pl is not None:
        model = _lit_model()
        model.net = torch.compile(model.net, backend="eager")
        with pytest.raises(NoiseScaleInputError, match="compile the whole model"):
            _lit_trainer(LightningCallback(log_every=0), max_steps=2).fit(model, _loader())
    pytest.importorskip("transformers")
    from noisescale.integrations.transformers import NoiseScaleCallback

    model, trainer = _hf_train(tmp_path, NoiseScaleCallback())
    model.net = torch.compile(model.net, backend="eager")
    with pytest.raises(NoiseScaleInputError, match="compile the whole model"):
        trainer.train()


# -- Hugging Face transformers -------------------------------------------------------------------


class _HFDataset(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.x, self.y = _data()

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


class _HFModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _net()
        self.losses: list[float] = []  # every loss returned with gradients on

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.net(x)
        loss = F.cross_entropy(logits, labels)
        if torch.is_grad_enabled():
            self.losses.append(float(loss.detach()))
        return {"loss": loss, "logits": logits}


def _hf_args(tmp_path, **kwargs):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    settings = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=2,
        max_steps=6,
        learning_rate=0.1,
        lr_scheduler_type="constant",
        optim="sgd",
        weight_decay=0.0,
        max_grad_norm=CLIP,
        report_to=[],
        save_strategy="no",
        logging_steps=2,
        use_cpu=True,
        train_sampling_strategy="sequential",
        disable_tqdm=True,
    )
    return transformers.TrainingArguments(**{**settings, **kwargs})


def _hf_train(tmp_path, callback, **kwargs) -> tuple[_HFModel, object]:
    import transformers

    args = _hf_args(tmp_path, **kwargs)
    model = _HFModel()
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=_HFDataset(), callbacks=[callback]
    )
    return model, trainer


def _hf_init(model: _HFModel) -> dict[str, torch.Tensor]:
    return {f"net.{k}": v.clone() for k, v in model.net.state_dict().items()}


def _hf_callbacks(trainer) -> list:
    from noisescale.integrations.transformers import NoiseScaleCallback

    return [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, NoiseScaleCallback)]


def test_transformers_matches_plain_loop_before_clipping(tmp_path):
    pytest.importorskip("transformers")
    from noisescale.integrations.transformers import NoiseScaleCallback

    callback = NoiseScaleCallback(sync_every=1, per_example_fraction=1.0)
    model, trainer = _hf_train(tmp_path, callback)
    init = _hf_init(model)
    trainer.train()
    got = callback.tracker.history
    _assert_same_history(got, _plain_history(init, [2] * 6))
    assert all(h["sqnorm_big"] > 1e4 * CLIP**2 for h in got)
    assert [h["lr"] for h in got] == [0.1] * 6
    # the estimate reached the Trainer's training logs (every second step), and only those
    logged = [h for h in trainer.state.log_history if "noisescale/trace_sigma" in h]
    assert [h["step"] for h in logged] == [2, 4, 6]
    for h in logged:
        assert h["noisescale/trace_sigma"] == pytest.approx(got[h["step"] - 1]["trace_sigma_ema"])


def test_transformers_values_reach_tensorboard(tmp_path):
    """The reporting callbacks run before user callbacks; the values must reach them anyway."""
    pytest.importorskip("transformers")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers.integrations import TensorBoardCallback

    from noisescale.integrations.transformers import NoiseScaleCallback

    callback = NoiseScaleCallback(sync_every=1, per_example_fraction=1.0)
    _, trainer = _hf_train(tmp_path, callback, report_to=["tensorboard"], logging_steps=1)
    kinds = [type(cb) for cb in trainer.callback_handler.callbacks]
    assert kinds.index(TensorBoardCallback) < kinds.index(NoiseScaleCallback)  # as built
    trainer.train()
    (events,) = {p.parent for p in tmp_path.rglob("events.out.tfevents.*")}
    board = EventAccumulator(str(events))
    board.Reload()
    history = callback.tracker.history
    for key, field in (("b_simple", "b_simple"), ("trace_sigma", "trace_sigma_ema")):
        # values not yet available (NaN) are left out of the logs
        want = {h["step"]: h[field] for h in history if math.isfinite(h[field])}
        assert len(want) >= 4
        got = {e.step: e.value for e in board.Scalars(f"train/noisescale/{key}")}
        # TensorBoard stores float32: a relative rounding of at most 2⁻²⁴
        assert got == pytest.approx(want, rel=1e-7)


def test_transformers_logged_loss_is_the_models_loss(tmp_path):
    """With 4 accumulation passes the history's loss is the mean of the model's 4 losses."""
    pytest.importorskip("transformers")
    from noisescale.integrations.transformers import NoiseScaleCallback

    callback = NoiseScaleCallback(sync_every=1)
    model, trainer = _hf_train(
        tmp_path, callback, gradient_accumulation_steps=4, max_steps=3, logging_steps=1
    )
    trainer.train()
    assert len(model.losses) == 12
    want = [sum(model.losses[4 * t : 4 * t + 4]) / 4 for t in range(3)]
    # float32 sums of four float32 losses: a few ulps
    assert [h["loss"] for h in callback.tracker.history] == pytest.approx(want, rel=1e-6)
    logged = [h["loss"] for h in trainer.state.log_history if "noisescale/b_simple" in h]
    assert logged == pytest.approx(want, rel=1e-6)


def test_transformers_callback_follows_the_model_across_train_calls(tmp_path):
    """model_init (hyperparameter_search's path): each train() gets a new model to measure."""
    transformers = pytest.importorskip("transformers")
    from noisescale.integrations.transformers import NoiseScaleCallback

    models: list[_HFModel] = []

    def model_init() -> _HFModel:
        models.append(_HFModel())
        return models[-1]

    callback = NoiseScaleCallback(sync_every=1, per_example_fraction=1.0)
    trainer = transformers.Trainer(
        model_init=model_init,
        args=_hf_args(tmp_path),
        train_dataset=_HFDataset(),
        callbacks=[callback],
    )
    want = _plain_history(_hf_init(_HFModel()), [2] * 6)  # every model_init gives these weights
    trainer.train()
    first = callback.tracker
    trainer.train()
    assert callback.tracker is not first and first.steps == 6
    _assert_same_history(first.history, want)
    _assert_same_history(callback.tracker.history, want)
    assert len(models) == 3  # one for Trainer.__init__, one per train()
    # the models of finished runs carry no hooks of ours (nor of the tracker's)
    for old in models[:2]:
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in old.modules())
        assert not any(p._post_accumulate_grad_hooks for p in old.parameters())
        assert not any(p._backward_hooks for p in old.parameters())


@pytest.mark.parametrize("then", ["own loop", "new Trainer", "training_step"])
def test_transformers_run_that_raises_leaves_no_tracker_on_what_follows(tmp_path, then):
    """TrainerCallback has no hook for an exception: a run that raised (here a callback of the
    user's, at step 2) left the tracker attached until 2026-12-07, and what the user ran on the
    same model afterwards was recorded into the failed run's history — every backward a step
    (2 → 5 over three steps of their own loop, 2 → 8 under a new Trainer). The first forward
    with gradients outside the failed run's ``train()`` call — their own loop, another
    Trainer's (same code, another call: a review), ``trainer.training_step`` called by hand —
    now says so, its backward releases the hooks, nothing more is recorded; a new train() with
    the callback measures a new run exactly as before."""
    transformers = pytest.importorskip("transformers")
    from noisescale.integrations.transformers import NoiseScaleCallback

    class Boom(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise RuntimeError("the user's callback failed")

    callback = NoiseScaleCallback(sync_every=1, per_example_fraction=1.0)
    model, trainer = _hf_train(tmp_path, callback)
    trainer.add_callback(Boom())
    with pytest.raises(RuntimeError, match="user's callback"):
        trainer.train()
    failed = callback.tracker
    assert failed.steps == 2
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(RuntimeWarning, match="ended without on_train_end"):
        if then == "new Trainer":
            transformers.Trainer(
                model=model, args=_hf_args(tmp_path), train_dataset=_HFDataset()
            ).train()
        for _ in range(3 if then != "new Trainer" else 0):
            batch = {"x": x[:MICRO], "labels": y[:MICRO]}
            if then == "training_step":
                trainer.training_step(model, batch)
            else:
                model(**batch)["loss"].backward()
            opt.step()
            opt.zero_grad()
    assert failed.steps == 2 and len(failed.history) == 2
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not any(p._post_accumulate_grad_hooks for p in model.parameters())
    # a new run on a fresh model, the same callback: measured as if nothing had happened
    model, trainer = _hf_train(tmp_path, callback)
    want = _plain_history(_hf_init(model), [2] * 6)
    trainer.train()
    assert callback.tracker is not failed
    _assert_same_history(callback.tracker.history, want)


def test_transformers_subclass_beginning_the_run_in_one_method_training_in_another(tmp_path):
    """A Trainer subclass whose ``fit`` calls ``begin`` (which runs on_train_begin and
    returns) and then trains step by step: every step is the run's (the frame held is the
    outermost of the Trainer's methods, ``fit``, not ``begin``) — no false "ended"."""
    transformers = pytest.importorskip("transformers")
    from noisescale.integrations.transformers import NoiseScaleCallback

    class Stepwise(transformers.Trainer):
        def begin(self):
            self.create_optimizer_and_scheduler(num_training_steps=3)
            self.current_gradient_accumulation_steps = 1
            self.control = self.callback_handler.on_train_begin(self.args, self.state, self.control)

        def fit(self):
            self.begin()
            x, y = _data()
            for s in range(3):
                batch = {
                    "x": x[MICRO * s : MICRO * (s + 1)],
                    "labels": y[MICRO * s : MICRO * (s + 1)],
                }
                self.training_step(self.model, batch)
                self.optimizer.step()
                self.optimizer.zero_grad()
            self.callback_handler.on_train_end(self.args, self.state, self.control)

    callback = NoiseScaleCallback(sync_every=1, per_example_fraction=1.0)
    args = _hf_args(tmp_path, gradient_accumulation_steps=1)
    trainer = Stepwise(
        model=_HFModel(), args=args, train_dataset=_HFDataset(), callbacks=[callback]
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*ended without on_train_end")
        trainer.fit()
    assert len(callback.tracker.history) == 3


@pytest.mark.parametrize("rebuild", [False, True])
def test_transformers_resume_continues_as_if_uninterrupted(tmp_path, rebuild):
    """A run resumed from its step-3 checkpoint gives the uninterrupted run's steps 4–6.

    The default sub-batch source draws its sub-batches at random: the draws resume too.
    ``rebuild``: the Trainer replaces the callback by one built from its saved arguments.
    """
    pytest.importorskip("transformers")
    from noisescale.integrations.transformers import NoiseScaleCallback

    whole = NoiseScaleCallback(sync_every=1)
    _, trainer = _hf_train(tmp_path, whole, save_strategy="steps", save_steps=3)
    trainer.train()
    resumed = NoiseScaleCallback(sync_every=1)
    _, trainer = _hf_train(tmp_path, resumed, restore_callback_states_from_checkpoint=rebuild)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    (current,) = _hf_callbacks(trainer)
    assert (current is resumed) is not rebuild
    assert current.tracker.steps == 6
    _assert_same_history(current.tracker.history, whole.tracker.history[3:])
    assert current.tracker.estimate() == whole.tracker.estimate()


def _ramp() -> BatchSizeRamp:
    # 8 examples per step until 24 are consumed, then 16 (linear rule, tuned at 8)
    return BatchSizeRamp.stepwise(
        [(0, 8), (24, 16)], micro_batch_size=MICRO, lr_rule="linear", base_batch_size=8
    )


def test_transformers_applies_schedule_at_legal_step_boundaries(tmp_path):
    """The Trainer reads gradient_accumulation_steps afresh each step: a ramp through it.

    After 3 steps the epoch has seen 3 micro-batches; an accumulation of 2 can start only at an
    even count, so the change lands one step later, with its learning rate. The epoch (12
    micro-batches) is then 4×1 + 4×2, the second one 6×2: 14 steps in two epochs, each equal to
    a plain loop over the same micro-batches.
    """
    pytest.importorskip("transformers")
    from noisescale.integrations.transformers import NoiseScaleCallback

    callback = NoiseScaleCallback(_ramp(), sync_every=1, per_example_fraction=1.0)
    model, trainer = _hf_train(
        tmp_path,
        callback,
        gradient_accumulation_steps=1,
        max_steps=-1,
        num_train_epochs=2,
        save_strategy="steps",
        save_steps=3,
    )
    init = _hf_init(model)
    trainer.train()
    ks, lrs = [1] * 4 + [2] * 10, [0.1] * 4 + [0.2] * 10
    got = callback.tracker.history
    assert [(h["b_big"], h["lr"]) for h in got] == [
        (8.0 * k, lr) for k, lr in zip(ks, lrs, strict=True)
    ]
    _assert_same_history(got, _plain_history(init, ks, lrs))
    logged = {
        h["step"]: h["noisescale/batch_size"] for h in trainer.state.log_history if "loss" in h
    }
    assert logged == {2: 8.0, 4: 16.0, 6: 16.0, 8: 16.0, 10: 16.0, 12: 16.0, 14: 16.0}

    # a checkpoint before the change resumes exactly; one after it cannot be (data skip)
    resumed = NoiseScaleCallback(_ramp(), sync_every=1, per_example_fraction=1.0)
    _, trainer = _hf_train(
        tmp_path, resumed, gradient_accumulation_steps=1, max_steps=-1, num_train_epochs=2
    )
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    _assert_same_history(resumed.tracker.history, got[3:])
    late = NoiseScaleCallback(_ramp(), sync_every=1, per_example_fraction=1.0)
    _, trainer = _hf_train(
        tmp_path, late, gradient_accumulation_steps=1, max_steps=-1, num_train_epochs=2
    )
    with pytest.raises(NoiseScaleInputError, match=r"micro-batch 8 of epoch 0.*micro-batch 6"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))
    # a Trainer that rebuilds callbacks from their JSON arguments cannot rebuild the schedule
    _, trainer = _hf_train(
        tmp_path,
        NoiseScaleCallback(_ramp()),
        gradient_accumulation_steps=1,
        restore_callback_states_from_checkpoint=True,
    )
    with pytest.raises(NoiseScaleInputError, match=r"without its arguments \['schedule'\]"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))


def test_transformers_schedule_refusals(tmp_path):
    pytest.importorskip("transformers")
    from noisescale.integrations.transformers import NoiseScaleCallback

    _, trainer = _hf_train(tmp_path, NoiseScaleCallback(_ramp()))  # gradient_accumulation_steps=2
    with pytest.raises(NoiseScaleInputError, match="gradient_accumulation_steps=1"):
        trainer.train()
    wrong = BatchSizeRamp.stepwise([(0, 16)], micro_batch_size=16)
    _, trainer = _hf_train(tmp_path, NoiseScaleCallback(wrong), gradient_accumulation_steps=1)
    with pytest.raises(NoiseScaleInputError, match="micro-batch is 8 examples"):
        trainer.train()
    opt = torch.optim.SGD(_net().parameters(), lr=0.1)
    with pytest.raises(NoiseScaleInputError, match="no optimizer"):
        NoiseScaleCallback(BatchSizeRamp.stepwise([(0, 8)], micro_batch_size=8, optimizer=opt))


def test_transformers_preconditions_with_the_trainer_s_own_optimizer(tmp_path):
    """precondition=True is the Trainer's optimizer (accelerate's wrapper taken off); another
    optimizer is refused at train begin (until 2026-12-05 it was taken, never stepped, and the
    whole run was measured plain with estimate() giving the plain B_simple); the Trainer's
    own, passed as itself, is accepted."""
    pytest.importorskip("transformers")
    from noisescale.integrations.transformers import NoiseScaleCallback

    callback = NoiseScaleCallback(
        precondition=True, precondition_from=2, sync_every=1, per_example_fraction=1.0
    )
    _, trainer = _hf_train(tmp_path, callback, optim="adamw_torch")
    trainer.train()
    assert callback.tracker.precondition is trainer.optimizer.optimizer
    assert isinstance(callback.tracker.precondition, torch.optim.AdamW)
    history = callback.tracker.history
    assert [r["preconditioned"] for r in history] == [False] * 2 + [True] * 4
    estimate = callback.tracker.estimate()
    assert estimate.steps == 4 and "preconditioning has not started" not in estimate.reason

    other = torch.optim.Adam(_net().parameters())
    _, trainer = _hf_train(tmp_path, NoiseScaleCallback(precondition=other), optim="adamw_torch")
    with pytest.raises(NoiseScaleInputError, match=r"not the optimizer the Trainer steps.*=True"):
        trainer.train()

    import transformers

    model = _HFModel()
    mine = torch.optim.Adam(model.parameters(), lr=0.01)
    callback = NoiseScaleCallback(precondition=mine, precondition_from=2)
    transformers.Trainer(
        model=model,
        args=_hf_args(tmp_path),
        train_dataset=_HFDataset(),
        callbacks=[callback],
        optimizers=(mine, None),
    ).train()
    assert callback.tracker.precondition is mine
    assert [r["preconditioned"] for r in callback.tracker.history] == [False] * 2 + [True] * 4


# -- bf16 on a tiny GPT-2 -----------------------------------------------------------------------

BF16_U = 2.0**-8  # bfloat16's unit roundoff (8 significant bits)


def _gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(2)
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    return transformers.GPT2LMHeadModel(config)


def _tokens() -> torch.Tensor:
    return torch.randint(0, 64, (64, 16), generator=torch.Generator().manual_seed(2))


class _TokenDataset(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.tokens = _tokens()

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def _assert_bf16_close(bf16: list[dict], fp32: list[dict]) -> None:
    """The same run in bf16 autocast and in fp32, step by step.

    bf16 rounds every matmul input to u = 2⁻⁸ relative, so each gradient component is off by
    about u and a squared norm by at most ~2u: |G_big|² and tr Σ (a difference whose small
    batches are far noisier than the big one, so barely amplified) within 2u. B_simple divides by
    |G|² = |G_big|² − tr Σ/B_big, whose absolute error ~2u·|G_big|² is relative to |G|² a factor
    |G_big|²/|G|² = 1 + B_simple/B_big larger: within 2u·(1 + B_simple/B_big). All finite.
    """
    assert len(bf16) == len(fp32) >= 4
    for b, f in zip(bf16, fp32, strict=True):
        for key in ("sqnorm_big", "trace_sigma"):
            assert b[key] == pytest.approx(f[key], rel=2 * BF16_U), key
        assert math.isfinite(b["b_simple"]) and math.isfinite(f["b_simple"])
        bound = 2 * BF16_U * (1 + f["b_simple"] / f["b_big"])
        assert b["b_simple"] == pytest.approx(f["b_simple"], rel=bound)


def test_transformers_bf16_gpt2_close_to_fp32(tmp_path):
    """The Trainer with bf16=True (accelerate's CPU autocast) on GPT-2, against fp32.

    GPT-2 takes ``num_items_in_batch``: each micro-batch's loss is its summed token loss over the
    step's token count, so the step's loss, as the Trainer logs it, is the sum of the four.
    """
    transformers = pytest.importorskip("transformers")
    from noisescale.integrations.transformers import NoiseScaleCallback

    histories = {}
    for bf16 in (False, True):
        model = _gpt2()
        returned: list[float] = []

        def keep(module, args, output, returned=returned):
            if torch.is_grad_enabled():
                returned.append(float(output.loss.detach()))

        model.register_forward_hook(keep)
        callback = NoiseScaleCallback(sync_every=1)
        args = _hf_args(
            tmp_path,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=4,
            max_steps=4,
            logging_steps=1,
            learning_rate=1e-3,
            optim="adamw_torch",
            max_grad_norm=1.0,
            bf16=bf16,
        )
        trainer = transformers.Trainer(
            model=model, args=args, train_dataset=_TokenDataset(), callbacks=[callback]
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # GPT-2's config warns about loss_type=None
            trainer.train()
        history = callback.tracker.history
        want = [sum(returned[4 * t : 4 * t + 4]) for t in range(4)]
        assert [h["loss"] for h in history] == pytest.approx(want, rel=1e-6)
        logged = [h["loss"] for h in trainer.state.log_history if "noisescale/g2" in h]
        assert logged == pytest.approx(want, rel=1e-6)
        histories[bf16] = history
    _assert_bf16_close(histories[True], histories[False])


@needs_lightning
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lightning_bf16_gpt2_close_to_fp32():
    """Lightning's ``precision="bf16-mixed"`` on GPT-2, against ``"32-true"``."""

    class LitGPT(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = _gpt2()

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids=tokens, labels=tokens).loss

        def training_step(self, tokens: torch.Tensor, batch_idx: int) -> torch.Tensor:
            return self(tokens)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    histories = {}
    for precision in ("32-true", "bf16-mixed"):
        callback = LightningCallback(sync_every=1, log_every=0)
        trainer = _lit_trainer(
            callback, max_steps=4, accumulate_grad_batches=4, precision=precision
        )
        trainer.fit(LitGPT(), torch.utils.data.DataLoader(_tokens(), batch_size=4))
        histories[precision] = callback.tracker.history
    _assert_bf16_close(histories["bf16-mixed"], histories["32-true"])


# per-process gradient accumulation of each Trainer scenario of tests/ddp_callbacks_worker.py
DDP_SCENARIOS = {"one_pass": 1, "no_sync": 2}
DDP_TIMEOUT_S = 240


def _two_processes(launcher: list[str], worker: str, tmp_path) -> list[dict]:
    """Run ``tests/<worker>`` in 2 CPU processes under ``launcher`` (its module and arguments;
    ``{port}`` in them is a free port), one thread each, and return what each rank wrote to
    ``tmp_path/<rank>.json``."""
    import subprocess
    import sys
    from pathlib import Path

    port = str(free_port())
    command = [
        sys.executable, "-m", *(a.replace("{port}", port) for a in launcher),
        str(Path(__file__).with_name(worker)), str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=DDP_TIMEOUT_S, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]


def _assert_same_ddp_step(got: dict, want: dict, accumulation: int) -> None:
    """A data-parallel step against one process accumulating the same micro-batches."""
    assert got["b_big"] == want["b_big"] == 16 * accumulation
    assert got["sqnorm_big"] == pytest.approx(want["sqnorm_big"], rel=1e-12)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-12)
    for source in ("per_example", "microbatch"):
        mine = "local" if source == "microbatch" and accumulation == 1 else source
        small, ref = got["sources"][mine], want["sources"][source]
        assert (small["count"], small["b_small"]) == (ref["count"], ref["b_small"])
        assert small["sqnorm_small"] == pytest.approx(ref["sqnorm_small"], rel=1e-12)
    if accumulation == 1:
        for key in ("g2", "trace_sigma", "b_simple", "b_simple_low"):
            assert got[key] == pytest.approx(want[key], rel=1e-9, nan_ok=True), key
    else:
        assert set(got["sources"]) == {"per_example", "microbatch", "local"}


@pytest.mark.slow
def test_callbacks_ddp_under_accelerate_launch(tmp_path, float64_default):
    """``accelerate launch``, 2 CPU processes: the single-process estimates, step by step.

    ``accelerate launch --cpu`` starts one process unless MPI is installed, so the test uses the
    torchrun launcher (``--multi_gpu``) with ``TrainingArguments(use_cpu=True)``: accelerate then
    runs MULTI_CPU over gloo and the Trainer wraps the model in DDP; Lightning's DDP strategy runs
    in the same processes. accelerate deals the sequential micro-batches out in turn, so with
    accumulation a each step's 2a micro-batches are those a single process accumulating 2a of
    them takes; Lightning shards shuffled examples with a DistributedSampler, and the reference
    takes the processes' local batches in turn as its micro-batches. The sources are then the
    same statistics: per-example norms over all examples, and the single process's
    micro-batches = the processes' local batches (a = 1) or their micro-batches under
    ``no_sync`` (a = 2, where DDP adds the local batches as a third source, so only the shared
    sources and the big batch are compared).
    Float64 throughout: the only differences are float64 summation orders (~1e-15), amplified by
    eq. A.2's cancellation (B_simple/B_big ≲ 10³ here); a reading of ``.grad`` before DDP had
    averaged it would be off by O(1).
    """
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    pytest.importorskip("lightning")
    from noisescale.integrations.transformers import NoiseScaleCallback

    launcher = [
        "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", "{port}",
    ]  # fmt: skip
    ranks = _two_processes(launcher, "ddp_callbacks_worker.py", tmp_path)
    assert ranks[0] == ranks[1]  # every process computes the same estimates
    for name in (*DDP_SCENARIOS, "lightning"):
        # one history file, written by the first process only
        lines = (tmp_path / name / "history.jsonl").read_text().splitlines()
        assert [json.loads(line).get("step") for line in lines] == [None, 1, 2, 3, 4, 5, 6]

    for name, accumulation in DDP_SCENARIOS.items():
        run = ranks[0][name]
        assert (run["world_size"], run["backend"]) == (2, "gloo")
        assert run["model"] == "DistributedDataParallel"
        callback = NoiseScaleCallback(sync_every=1, per_example_fraction=1.0)
        args = _hf_args(tmp_path / f"ref_{name}", gradient_accumulation_steps=2 * accumulation)
        trainer = transformers.Trainer(
            model=_HFModel(), args=args, train_dataset=_HFDataset(), callbacks=[callback]
        )
        trainer.train()
        want = callback.tracker.history
        assert len(run["history"]) == len(want) == 6
        for got_step, want_step in zip(run["history"], want, strict=True):
            _assert_same_ddp_step(got_step, want_step, accumulation)

    # the compute_loss override over tokens (num_items_in_batch over both processes' tokens,
    # times 2) against the model's own loss in the same processes: the same record (until
    # 2026-12-05 each process's tokens were weighed by its own count, up to 91% off)
    override, own = ranks[0]["override"], ranks[0]["own_loss"]
    assert len(override) == len(own) == 2
    for got_step, want_step in zip(override, own, strict=True):
        _assert_same_record(got_step, want_step, rel=1e-6)

    # Lightning gives each process a DistributedSampler, shuffling (seed 0) for training
    x, y = _data()
    data = torch.utils.data.TensorDataset(x, y)
    shards = [list(torch.utils.data.DistributedSampler(data, 2, r, seed=0)) for r in range(2)]
    order = [i for t in range(6) for shard in shards for i in shard[MICRO * t : MICRO * (t + 1)]]
    loader = torch.utils.data.DataLoader(data, batch_size=MICRO, sampler=order)
    callback = LightningCallback(sync_every=1, log_every=0, per_example_fraction=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _lit_trainer(callback, max_steps=6, accumulate_grad_batches=2).fit(_lit_model(), loader)
    want = callback.tracker.history
    assert len(ranks[0]["lightning"]["history"]) == len(want) == 6
    for got_step, want_step in zip(ranks[0]["lightning"]["history"], want, strict=True):
        _assert_same_ddp_step(got_step, want_step, 1)


def test_transformers_refuses_fp16(tmp_path):
    pytest.importorskip("transformers")
    from noisescale.integrations.transformers import NoiseScaleCallback

    callback = NoiseScaleCallback()
    with pytest.raises(NoiseScaleInputError, match="fp16"):
        callback.on_train_begin(type("Args", (), {"fp16": True})(), None, None, model=_HFModel())


def test_trainer_with_a_model_that_computes_its_loss_itself(tmp_path):
    """BertForMaskedLM computes its token-mean loss inline from labels=; under the Trainer
    nothing can call count_tokens() between the forward and the backward. Declared on the
    callback, the tokens are counted from labels= (those not -100), with accumulation too;
    undeclared, it is refused with that fix."""
    transformers = pytest.importorskip("transformers")
    from noisescale.integrations.transformers import NoiseScaleCallback

    transformers.logging.set_verbosity_error()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50, (32, 6), generator=g)
    labels = torch.where(torch.rand(32, 6, generator=g) < 0.5, ids, -100)
    labels[:, 0] = ids[:, 0]

    class Masked(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 32

        def __getitem__(self, i: int) -> dict:
            return {"input_ids": ids[i], "labels": labels[i]}

    def train(**kw):
        torch.manual_seed(0)
        model = transformers.BertForMaskedLM(transformers.BertConfig(
            vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=16,
        ))  # fmt: skip
        args = _hf_args(tmp_path, per_device_train_batch_size=4, max_steps=3, max_grad_norm=0.0)
        callback = NoiseScaleCallback(**kw)
        transformers.Trainer(
            model=model, args=args, train_dataset=Masked(), callbacks=[callback]
        ).train()
        return callback.tracker.history

    with pytest.raises(NoiseScaleInputError, match="NoiseScaleCallback\\(loss_reduction="):
        train()
    history = train(loss_reduction="token_mean")
    assert len(history) == 3
    counted = [float((labels[8 * s : 8 * s + 8] != -100).sum()) for s in range(3)]
    assert [r["tokens"] for r in history] == counted
    assert all(not r["skipped"] and r["sources"] for r in history)


def test_transformers_callback_measures_every_mth_step(tmp_path):
    """measure_every through the callback: steps 1, 3, 5 of 6 measured, every step's examples
    counted, and the Trainer's logs carry the latest estimate."""
    pytest.importorskip("transformers")
    from noisescale.integrations.transformers import NoiseScaleCallback

    callback = NoiseScaleCallback(sync_every=1, measure_every=2)
    _, trainer = _hf_train(tmp_path, callback)
    trainer.train()
    got = callback.tracker.history
    assert [h["step"] for h in got] == [1, 3, 5]
    per_step = got[0]["examples"]
    assert [h["examples"] for h in got] == [per_step, 3 * per_step, 5 * per_step]
    assert callback.tracker.steps == 6
    logged = [h for h in trainer.state.log_history if "noisescale/trace_sigma" in h]
    assert logged and logged[-1]["noisescale/trace_sigma"] == pytest.approx(
        got[-1]["trace_sigma_ema"]
    )


@pytest.mark.parametrize("measure_every", [1, 3])
@pytest.mark.parametrize("n", [N, N - 3])
def test_transformers_ramp_counts_the_trained_examples_under_measure_every(
    tmp_path, measure_every, n
):
    """The Trainer's callback feeds a ramp the examples of each step, whatever the tracker's
    measure_every: fed tracker.examples, which lags on the unmeasured steps, it counted fewer
    than the Trainer trained and moved late; then counted as micro-batches ×
    micro_batch_size, an epoch's short last batch (93 = 11 × 8 + 5) was counted whole, 8 for
    5 (two hunts)."""
    pytest.importorskip("transformers")
    from noisescale.integrations.transformers import NoiseScaleCallback

    class Data(_HFDataset):
        def __len__(self) -> int:
            return n

    ramp = BatchSizeRamp.stepwise([(0, 8), (16, 16), (48, 32)], micro_batch_size=MICRO)
    callback = NoiseScaleCallback(ramp, measure_every=measure_every)
    model, trainer = _hf_train(
        tmp_path, callback, gradient_accumulation_steps=1, max_steps=-1, num_train_epochs=2
    )
    trainer.train_dataset = Data()
    seen = {"examples": 0}

    def count(module, args):
        seen["examples"] += len(args[0])

    model.net.register_forward_pre_hook(count)
    trainer.train()
    assert ramp.state.examples == seen["examples"] == 2 * n
    assert ramp.state.step == trainer.state.global_step


@needs_lightning
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lightning_callback_measures_every_mth_step():
    """measure_every through Lightning's callback: steps 1, 3, 5 of 6 measured, equal to the
    plain loop's records at those steps, every step's examples counted."""
    model = _lit_model()
    init = copy.deepcopy(model.state_dict())
    callback = LightningCallback(
        sync_every=1, log_every=0, per_example_fraction=1.0, measure_every=2
    )
    trainer = _lit_trainer(callback, max_steps=6, accumulate_grad_batches=2)
    trainer.fit(model, _loader())
    got = callback.tracker.history
    assert [h["step"] for h in got] == [1, 3, 5] and callback.tracker.steps == 6
    want = _plain_history(init, [2] * 6, clip=None)
    for g, w in zip(got, [want[0], want[2], want[4]], strict=True):
        assert g["sqnorm_big"] == pytest.approx(w["sqnorm_big"], rel=1e-6)
        assert g["b_big"] == w["b_big"]
    per_step = want[0]["examples"]
    assert [h["examples"] for h in got] == [per_step, 3 * per_step, 5 * per_step]


# -- what the Trainer backpropagates: its accumulation divisor, label smoothing ----------------

_SEQ = 8  # examples of the one measured step


def _bert_classifier():
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=3,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config).double()


def _classified():
    g = torch.Generator().manual_seed(0)
    return torch.randint(1, 60, (_SEQ, 10), generator=g), torch.randint(0, 3, (_SEQ,), generator=g)


class _Classified(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.ids, self.labels = _classified()

    def __len__(self) -> int:
        return _SEQ

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def _one_step(tmp_path, model, dataset, accumulation: int, trainer_cls=None, **kw) -> dict:
    """One Trainer step over the same 8 examples (lr = 0), as 1 × 8 or k × 8/k micro-batches:
    its record."""
    import transformers

    from noisescale.integrations.transformers import NoiseScaleCallback

    tracker_kw = {k: v for k, v in kw.items() if k == "loss_reduction"}
    trainer_kw = {k: v for k, v in kw.items() if k != "loss_reduction" and k != "args"}
    args = _hf_args(
        tmp_path,
        per_device_train_batch_size=_SEQ // accumulation,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        learning_rate=0.0,
        max_grad_norm=0.0,
        **kw.get("args", {}),
    )
    callback = NoiseScaleCallback(
        per_example_fraction=1.0, microbatch=False, beta=1.0, **tracker_kw
    )
    (trainer_cls or transformers.Trainer)(
        model=model, args=args, train_dataset=dataset, callbacks=[callback], **trainer_kw
    ).train()
    (record,) = callback.tracker.history
    return record


def _assert_same_record(got: dict, want: dict, rel: float = 1e-9) -> None:
    for key in ("b_big", "sqnorm_big", "g2", "trace_sigma", "examples", "tokens"):
        if want.get(key) is None:
            assert got.get(key) is None, key
        else:
            assert got[key] == pytest.approx(want[key], rel=rel), key
    small = (
        got["sources"]["per_example"]["sqnorm_small"],
        want["sources"]["per_example"]["sqnorm_small"],
    )
    assert small[0] == pytest.approx(small[1], rel=rel)


def test_trainer_that_does_not_divide_by_the_accumulation_is_measured(tmp_path):
    """A model that accepts loss kwargs but computes its loss itself (BERT's classifier): the
    Trainer leaves each micro-batch's mean undivided by the accumulation (its
    loss_is_scaled_for_ga), so the step's gradient is k times the mean's. The multiplier that
    reached the model's loss is measured: 2 × 4 examples give the 1 × 8 record. (Until
    2026-12-03 |G|², tr Σ and every norm read k² = 4× too large, B_simple unchanged.)"""
    pytest.importorskip("transformers")
    want = _one_step(tmp_path, _bert_classifier(), _Classified(), 1)
    got = _one_step(tmp_path, _bert_classifier(), _Classified(), 2)
    _assert_same_record(got, want)
    # and a compute_loss override returning each micro-batch's mean, from the logits
    import transformers

    class OwnLoss(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            loss = F.cross_entropy(outputs.logits, labels)
            return (loss, outputs) if return_outputs else loss

    for k in (1, 2):
        got = _one_step(tmp_path, _bert_classifier(), _Classified(), k, trainer_cls=OwnLoss)
        _assert_same_record(got, want)


def test_the_trainers_multiplication_by_the_processes_is_measured(tmp_path, monkeypatch):
    """Under DDP with average_tokens_across_devices (the default) the Trainer multiplies the
    loss by the number of processes, in place, after the model (or compute_loss_func)
    returned it; that factor is part of what each example weighs. Simulated in one process
    (the Accelerator says 2 processes: the loss is doubled, nothing averaged), the record is
    the same as with one: the factor is measured, for a model's own loss and a
    compute_loss_func alike (a first version watched the loss after the multiplication and
    read 4×)."""
    pytest.importorskip("transformers")
    import accelerate

    def mean_loss(outputs, labels, num_items_in_batch=None):
        return F.cross_entropy(outputs.logits, labels)

    for kw in ({}, {"compute_loss_func": mean_loss, "loss_reduction": "mean"}):
        want = _one_step(tmp_path, _bert_classifier(), _Classified(), 1, **kw)
        with monkeypatch.context() as m:
            m.setattr(accelerate.Accelerator, "num_processes", property(lambda self: 2))
            got = _one_step(tmp_path, _bert_classifier(), _Classified(), 1, **kw)
        _assert_same_record(got, want)


class _KwargsModel(nn.Module):
    """A model of one's own whose forward takes **kwargs: the Trainer then passes it
    num_items_in_batch and does not divide its loss by the accumulation."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _net().double()

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, **kwargs) -> dict:
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


class _Doubles(torch.utils.data.Dataset):
    def __init__(self) -> None:
        x, y = _data()
        self.x, self.y = x[:_SEQ].double(), y[:_SEQ]

    def __len__(self) -> int:
        return _SEQ

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "labels": self.y[i]}


def test_a_model_of_ones_own_under_the_trainer_is_measured(tmp_path):
    """Not a Hugging Face model, but its forward takes **kwargs: the Trainer leaves its
    micro-batch means undivided, and the loss the model returns is watched: 2 × 4 examples give
    the 1 × 8 record (the assumed 1/k read 4×)."""
    pytest.importorskip("transformers")
    want = _one_step(tmp_path, _KwargsModel(), _Doubles(), 1)
    got = _one_step(tmp_path, _KwargsModel(), _Doubles(), 2)
    _assert_same_record(got, want)


class _ItemsModel(_KwargsModel):
    """The Trainer's form in a model of one's own: its summed loss over the num_items_in_batch
    the Trainer passes its forward (it then divides nothing by the accumulation); 'mixed': half
    of that and half each micro-batch's mean."""

    def __init__(self, form: str = "items") -> None:
        super().__init__()
        self.form = form

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, **kwargs) -> dict:
        logits = self.net(x)
        loss = F.cross_entropy(logits, labels, reduction="sum") / kwargs["num_items_in_batch"]
        if self.form == "mixed":
            loss = (loss + F.cross_entropy(logits, labels)) / 2
        return {"loss": loss, "logits": logits}


class _Rows(_Doubles):
    """The first n of the data, as doubles."""

    def __init__(self, n: int) -> None:
        x, y = _data()
        self.x, self.y = x[:n].double(), y[:n]

    def __len__(self) -> int:
        return len(self.y)


def _brute_force_step(x: torch.Tensor, y: torch.Tensor) -> dict:
    """|G_big|², the mean per-example |x_i|², g2 and tr Σ (eq. A.2) of _ItemsModel's loss over
    these examples, from each example's own gradient."""
    model = _ItemsModel()
    grads = []
    for i in range(len(y)):
        model.zero_grad()
        F.cross_entropy(model.net(x[i : i + 1]), y[i : i + 1]).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    g, n = torch.stack(grads), len(y)
    big, small = float(g.mean(0) @ g.mean(0)), float((g * g).sum(1).mean())
    return {
        "sqnorm_big": big,
        "per_example": small,
        "g2": (n * big - small) / (n - 1),
        "trace_sigma": (small - big) / (1 - 1 / n),
    }


def _assert_brute_force(record: dict, want: dict, examples: int) -> None:
    assert record["b_big"] == examples
    assert record["sources"]["per_example"]["sqnorm_small"] == pytest.approx(
        want["per_example"], rel=1e-9
    )
    for key in ("sqnorm_big", "g2", "trace_sigma"):
        assert record[key] == pytest.approx(want[key], rel=1e-9), key


@pytest.mark.parametrize("declared", [None, "num_items_in_batch"])
def test_a_model_of_ones_own_in_the_trainers_form_is_measured(tmp_path, declared):
    """A model of one's own in the Trainer's form (its forward takes **kwargs and returns its
    summed loss over num_items_in_batch): 1 × 8, 2 × 4 and 8 × 1 micro-batches equal brute
    force, undeclared and declared 'num_items_in_batch'. Until 2026-12-07 8 × 1 read |G_big|²,
    g2, tr Σ and every per-example norm 1/64 of the truth without a word (each micro-batch
    read as an undivided mean over its one example), 2 × 4 was refused as a loss averaged over
    what it counts, and 'num_items_in_batch' was refused asking for count_tokens(labels)."""
    pytest.importorskip("transformers")
    data = _Doubles()
    want = _brute_force_step(data.x, data.y)
    kw = {} if declared is None else {"loss_reduction": declared}
    for k in (1, 2, 8):
        _assert_brute_force(_one_step(tmp_path, _ItemsModel(), data, k, **kw), want, _SEQ)


def test_a_model_of_ones_own_in_the_trainers_form_is_measured_after_a_ramp(tmp_path):
    """The same model, 2 examples a micro-batch, a BatchSizeRamp raising the accumulation from
    1 to 3 after the audited steps: every step equals brute force over its examples (until
    2026-12-07 the 6-example step read |G_big|² 1/9 of the truth, 0.0477 for 0.430)."""
    pytest.importorskip("transformers")
    import transformers

    from noisescale.integrations.transformers import NoiseScaleCallback

    data = _Rows(20)
    ramp = BatchSizeRamp.stepwise([(0, 2), (8, 6)], micro_batch_size=2, lr_rule="none")
    callback = NoiseScaleCallback(ramp, per_example_fraction=1.0, microbatch=False, beta=1.0)
    args = _hf_args(
        tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=1, max_steps=-1,
        num_train_epochs=1, learning_rate=0.0, max_grad_norm=0.0,
    )  # fmt: skip
    transformers.Trainer(
        model=_ItemsModel(), args=args, train_dataset=data, callbacks=[callback]
    ).train()
    at, sizes = 0, []
    for record in callback.tracker.history:
        n = int(record["b_big"])
        _assert_brute_force(record, _brute_force_step(data.x[at : at + n], data.y[at : at + n]), n)
        at, sizes = at + n, [*sizes, n]
    assert 6 in sizes and at == 20


class _NormedItemsModel(_ItemsModel):
    """_ItemsModel with BatchNorm and dropout before its head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.net = nn.Sequential(
            nn.Linear(D, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.Tanh(), nn.Linear(16, C)
        ).double()


def test_the_probe_of_a_models_own_loss_leaves_the_run_as_it_was(tmp_path):
    """The forward the callback runs again on the first step (twice num_items_in_batch) draws
    what the forward drew (dropout: its loss exactly halves, measured, not refused) and leaves
    the model's buffers (BatchNorm's statistics, written through .data: the backward still
    runs) and torch's generator as they were: the trained model and the next draw equal a run
    without the callback (per_example=False: BatchNorm couples the examples)."""
    pytest.importorskip("transformers")
    import transformers

    from noisescale.integrations.transformers import NoiseScaleCallback

    def train(callbacks):
        model = _NormedItemsModel()
        args = _hf_args(tmp_path, per_device_train_batch_size=4, max_steps=2, seed=3)
        transformers.Trainer(
            model=model, args=args, train_dataset=_Doubles(), callbacks=callbacks
        ).train()
        return model.state_dict(), torch.rand(())

    want, want_draw = train([])
    callback = NoiseScaleCallback(per_example=False, beta=1.0)
    got, got_draw = train([callback])
    assert callback.tracker.steps == 2
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert got_draw == want_draw


class _SideEffectsModel(_ItemsModel):
    """_ItemsModel whose forward reassigns an EMA buffer its loss reads and drops a layer by
    Python's ``random`` (a review of 2026-12-07: the probe kept the buffer's second update and
    drew anew from ``random`` — its loss moved, and the step was refused)."""

    def __init__(self, form: str = "items") -> None:
        super().__init__(form)
        self.register_buffer("ema", torch.zeros(C, dtype=torch.float64))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, **kwargs) -> dict:
        logits = self.net(x)
        if random.random() < 0.5:  # (a layer drop)
            logits = torch.tanh(logits)
        self.ema = 0.9 * self.ema + 0.1 * logits.detach().mean(0)
        logits = logits + self.ema
        if self.form == "mean":
            return {"loss": F.cross_entropy(logits, labels), "logits": logits}
        loss = F.cross_entropy(logits, labels, reduction="sum") / kwargs["num_items_in_batch"]
        return {"loss": loss, "logits": logits}


@pytest.mark.parametrize("form", ["items", "mean"])
def test_the_probe_repeats_python_draws_and_puts_reassigned_buffers_back(tmp_path, form):
    """Measured (not refused), and the trained model, its buffer and Python's next draw equal
    a run without the callback."""
    pytest.importorskip("transformers")
    import transformers

    from noisescale.integrations.transformers import NoiseScaleCallback

    def train(callbacks):
        random.seed(5)
        model = _SideEffectsModel(form)
        args = _hf_args(tmp_path, per_device_train_batch_size=4, max_steps=2, seed=3)
        transformers.Trainer(
            model=model, args=args, train_dataset=_Doubles(), callbacks=callbacks
        ).train()
        return model.state_dict(), random.random()

    want, want_draw = train([])
    callback = NoiseScaleCallback(beta=1.0)
    got, got_draw = train([callback])
    assert callback.tracker.steps == 2
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert got_draw == want_draw


class _Unlabelled(_Rows):
    """The first six examples, the first three labelled -100 (a prompt-only micro-batch)."""

    def __init__(self) -> None:
        super().__init__(6)
        self.y = self.y.clone()
        self.y[:3] = -100


def test_a_first_micro_batch_with_no_label_does_not_stop_the_probe(tmp_path):
    """A model of one's own in the Trainer's form whose first micro-batch holds no label: its
    loss is exactly 0 and tells the probe nothing; the pass is counted in the Trainer's form
    (no unit) and the next micro-batch is probed. Until a review of 2026-12-07 the step was
    refused as the model's own loss backpropagated in some micro-batches and not others. The
    step's |G_big|² and b_big are the three labelled examples' (lr 0)."""
    pytest.importorskip("transformers")
    import transformers

    from noisescale.integrations.transformers import NoiseScaleCallback

    data = _Unlabelled()
    callback = NoiseScaleCallback(per_example_fraction=1.0, microbatch=False, beta=1.0)
    args = _hf_args(
        tmp_path, per_device_train_batch_size=3, gradient_accumulation_steps=2, max_steps=1,
        learning_rate=0.0, max_grad_norm=0.0,
    )  # fmt: skip
    transformers.Trainer(
        model=_ItemsModel(), args=args, train_dataset=data, callbacks=[callback]
    ).train()
    (record,) = callback.tracker.history
    want = _brute_force_step(data.x[3:], data.y[3:])
    assert record["b_big"] == 3
    assert record["sqnorm_big"] == pytest.approx(want["sqnorm_big"], rel=1e-9)


class _TokenItemsModel(nn.Module):
    """A token model of one's own in the Trainer's form: its summed token loss over the
    num_items_in_batch the Trainer passes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.emb, self.head = nn.Embedding(11, 6).double(), nn.Linear(6, 11).double()

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, **kwargs) -> dict:
        logits = self.head(torch.tanh(self.emb(input_ids)))
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
        return {"loss": loss / kwargs["num_items_in_batch"], "logits": logits}


class _Sequences(torch.utils.data.Dataset):
    """8 sequences of 2 to 6 tokens (one a micro-batch: no padding)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        lengths = torch.randint(2, 7, (_SEQ,), generator=g).tolist()
        self.ids = [torch.randint(1, 11, (t,), generator=g) for t in lengths]
        self.labels = [torch.randint(0, 11, (t,), generator=g) for t in lengths]

    def __len__(self) -> int:
        return _SEQ

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def test_a_token_model_of_ones_own_in_the_trainers_form_is_measured(tmp_path):
    """Over tokens, one sequence a micro-batch, k = 2 and 4: the step's |G_big|² is |∇L|², L
    the step's summed token loss over its tokens, b_big and tokens the step's tokens (until
    2026-12-07 |G_big|² read 1/k² of it, in examples)."""
    pytest.importorskip("transformers")
    import transformers

    from noisescale.integrations.transformers import NoiseScaleCallback

    data = _Sequences()
    for k in (2, 4):
        model = _TokenItemsModel()
        tokens = sum(len(data.labels[i]) for i in range(k))
        loss = sum(
            F.cross_entropy(model.head(torch.tanh(model.emb(data.ids[i]))), data.labels[i],
                            reduction="sum")
            for i in range(k)
        ) / tokens  # fmt: skip
        grads = torch.autograd.grad(loss, list(model.parameters()))
        callback = NoiseScaleCallback(per_example_fraction=1.0, microbatch=False, beta=1.0)
        args = _hf_args(
            tmp_path, per_device_train_batch_size=1, gradient_accumulation_steps=k, max_steps=1,
            learning_rate=0.0, max_grad_norm=0.0,
        )  # fmt: skip
        transformers.Trainer(
            model=_TokenItemsModel(), args=args, train_dataset=data, callbacks=[callback]
        ).train()
        (record,) = callback.tracker.history
        assert record["tokens"] == record["b_big"] == tokens
        assert record["sqnorm_big"] == pytest.approx(sum(float(g.pow(2).sum()) for g in grads))


def test_a_model_of_ones_own_that_contradicts_its_declaration_is_refused(tmp_path):
    """The model's own loss is probed on the first step as a compute_loss_func is (doubling
    num_items_in_batch): the Trainer's form declared 'sum' or 'token_mean' (until 2026-12-07
    'sum' read |G|² and tr Σ 1/num_items_in_batch² off without a word), a mean that ignores it
    declared 'num_items_in_batch', and half of each form under any declaration are refused,
    naming the form."""
    pytest.importorskip("transformers")
    for declared in ("sum", "token_mean"):
        with pytest.raises(NoiseScaleInputError, match="the model divides its loss by the num"):
            _one_step(tmp_path, _ItemsModel(), _Doubles(), 2, loss_reduction=declared)
    with pytest.raises(NoiseScaleInputError, match="does not change with it"):
        _one_step(tmp_path, _KwargsModel(), _Doubles(), 2, loss_reduction="num_items_in_batch")
    for kw in ({}, {"loss_reduction": "num_items_in_batch"}):
        with pytest.raises(NoiseScaleInputError, match="but not as its divisor"):
            _one_step(tmp_path, _ItemsModel("mixed"), _Doubles(), 2, **kw)


def test_a_compute_loss_func_needs_its_reduction_said(tmp_path):
    """The Trainer expects a compute_loss_func to normalise over the step by
    num_items_in_batch; noisescale cannot see how: refused unless loss_reduction says. Said
    ('mean': each micro-batch's mean), the Trainer's scaling is measured: 2 × 4 = 1 × 8."""
    pytest.importorskip("transformers")

    def mean_loss(outputs, labels, num_items_in_batch=None):
        return F.cross_entropy(outputs.logits, labels)

    with pytest.raises(NoiseScaleInputError, match="compute_loss_func, whose loss noisescale"):
        _one_step(tmp_path, _bert_classifier(), _Classified(), 2, compute_loss_func=mean_loss)
    want = _one_step(tmp_path, _bert_classifier(), _Classified(), 1)
    for k in (1, 2):
        got = _one_step(
            tmp_path, _bert_classifier(), _Classified(), k, compute_loss_func=mean_loss,
            loss_reduction="mean",
        )  # fmt: skip
        _assert_same_record(got, want)


def test_a_compute_loss_func_in_the_trainers_form_is_measured(tmp_path):
    """The Trainer's own form, the sum of the examples' losses divided by num_items_in_batch,
    declared 'num_items_in_batch', equals brute force (each example's gradient alone, eq. A.2
    over the step's 8) for k = 1, 2, 4. Until 2026-12-05 no declaration measured it: 'mean'
    read |G|² and tr Σ k² too small, 'sum' 1/64; those are now refused, as is
    'num_items_in_batch' for a loss that does not divide by it, and any declaration for one
    that depends on num_items_in_batch otherwise (half of each form)."""
    pytest.importorskip("transformers")

    def items_loss(outputs, labels, num_items_in_batch=None):
        return F.cross_entropy(outputs.logits, labels, reduction="sum") / num_items_in_batch

    def mean_loss(outputs, labels, num_items_in_batch=None):
        return F.cross_entropy(outputs.logits, labels)

    model, (ids, labels) = _bert_classifier(), _classified()
    grads = []
    for i in range(_SEQ):
        model.zero_grad()
        F.cross_entropy(model(input_ids=ids[i : i + 1]).logits, labels[i : i + 1]).backward()
        grads.append(
            torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        )
    g = torch.stack(grads)
    big, small = float(g.mean(0) @ g.mean(0)), float((g * g).sum(1).mean())
    want = {
        "sqnorm_big": big,
        "g2": (_SEQ * big - small) / (_SEQ - 1),
        "trace_sigma": (small - big) / (1 - 1 / _SEQ),
    }
    for k in (1, 2, 4):
        got = _one_step(
            tmp_path, _bert_classifier(), _Classified(), k, compute_loss_func=items_loss,
            loss_reduction="num_items_in_batch",
        )  # fmt: skip
        assert got["b_big"] == _SEQ
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-6), (k, key)
    for declared in ("mean", "sum"):
        with pytest.raises(NoiseScaleInputError, match="divides its loss by num_items_in_batch"):
            _one_step(
                tmp_path, _bert_classifier(), _Classified(), 2, compute_loss_func=items_loss,
                loss_reduction=declared,
            )  # fmt: skip
    with pytest.raises(NoiseScaleInputError, match="does not change with it"):
        _one_step(
            tmp_path, _bert_classifier(), _Classified(), 2, compute_loss_func=mean_loss,
            loss_reduction="num_items_in_batch",
        )  # fmt: skip

    def mixed_loss(outputs, labels, num_items_in_batch=None):  # half of each form
        return (items_loss(outputs, labels, num_items_in_batch) + mean_loss(outputs, labels)) / 2

    for declared in ("mean", "sum", "num_items_in_batch"):  # (measured without a word before)
        with pytest.raises(NoiseScaleInputError, match="but not as its divisor"):
            _one_step(
                tmp_path, _bert_classifier(), _Classified(), 2, compute_loss_func=mixed_loss,
                loss_reduction=declared,
            )  # fmt: skip


class _PartlyLabelled(_Classified):
    """_Classified with three of its 8 labels -100 (examples left out of the loss)."""

    def __init__(self) -> None:
        super().__init__()
        self.labels = self.labels.clone()
        self.labels[torch.tensor([1, 4, 5])] = -100


@pytest.mark.parametrize("smoothing", [0.1, 0.0], ids=["label smoothing", "items loss"])
def test_unlabelled_examples_under_label_smoothing_or_an_items_loss_are_measured(
    tmp_path, smoothing
):
    """Labels of -100 under the Trainer's label smoother (label_smoothing_factor) or a
    compute_loss_func in its own form (a sum over the labelled examples divided by
    num_items_in_batch, declared): the loss is the mean over the labelled examples, measured
    per labelled example as a declared token mean over labels of one token each — b_big the 5
    labelled, |G_big|² the labelled examples' mean gradient's, g2 and tr Σ the per-token
    definition (language_models.md) from brute force, for k = 1, 2, given in examples (no
    'tokens'). Until 2026-12-06 the -100 examples were counted as examples of zero gradient:
    b_big 8, |G_big|² (5/8)² of it, B_simple +108% on a hunt's batch, without a word."""
    pytest.importorskip("transformers")

    def items_loss(outputs, labels, num_items_in_batch=None):
        return F.cross_entropy(outputs.logits, labels, reduction="sum") / num_items_in_batch

    data = _PartlyLabelled()
    kept = data.labels != -100
    n = int(kept.sum())
    model = _bert_classifier()
    x = torch.zeros(_SEQ, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    for i in torch.nonzero(kept).flatten().tolist():
        model.zero_grad()
        logits = model(input_ids=data.ids[i : i + 1]).logits
        F.cross_entropy(logits, data.labels[i : i + 1], label_smoothing=smoothing).backward()
        x[i] = torch.cat(
            [
                p.grad.flatten() if p.grad is not None else torch.zeros(p.numel())
                for p in model.parameters()
            ]
        )
    # eq. A.2 over the 8 sequences' summed gradients x_i (0 where unlabelled), in tokens
    t = n / _SEQ
    big, small = float(x.mean(0) @ x.mean(0)), float((x * x).sum(1).mean())
    want = {
        "b_big": float(n),
        "sqnorm_big": float(x[kept].mean(0) @ x[kept].mean(0)),
        "g2": (_SEQ * big - small) / (_SEQ - 1) / t**2,
        "trace_sigma": (small - big) / (1 - 1 / _SEQ) / t,
    }
    if smoothing:
        kw = {"args": {"label_smoothing_factor": smoothing}}
    else:
        kw = {"compute_loss_func": items_loss, "loss_reduction": "num_items_in_batch"}
    for k in (1, 2):
        got = _one_step(tmp_path, _bert_classifier(), _PartlyLabelled(), k, **kw)
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-6), (smoothing, k, key)
        assert "tokens" not in got and "tokens_per_example" not in got


def test_a_classifiers_unit_stays_examples_under_label_smoothing(tmp_path, capsys):
    """A fully labelled classifier under the Trainer's label_smoothing_factor: the history,
    the estimate and `noisescale calc --history` are in examples, as without smoothing (the
    labelled examples: all 4 of each step). For a few hours on 2026-12-06 the smoother's
    labelled examples were given as "tokens" — the history's unit, B_simple "57.16 tokens …
    (1 tokens per example)" in calc — so a classifier's unit depended on a hyperparameter (a
    review)."""
    pytest.importorskip("transformers")
    import transformers

    from noisescale.cli import main
    from noisescale.integrations.transformers import NoiseScaleCallback
    from noisescale.report.data import load_history

    history = tmp_path / "h.jsonl"
    units = []
    for smoothing in (0.1, 0.0):
        history.unlink(missing_ok=True)
        args = _hf_args(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                        learning_rate=1e-3, label_smoothing_factor=smoothing)  # fmt: skip
        callback = NoiseScaleCallback(
            per_example_fraction=1.0, microbatch=False, beta=1.0, history_path=str(history)
        )
        transformers.Trainer(
            model=_bert_classifier(), args=args, train_dataset=_Classified(), callbacks=[callback]
        ).train()
        records = callback.tracker.history
        assert [r["b_big"] for r in records] == [4.0] * 6
        assert not [r for r in records if "tokens" in r or "tokens_per_example" in r]
        capsys.readouterr()
        assert main(["calc", "--history", str(history), "--batch-size", "4"]) == 0
        said = capsys.readouterr().out
        units.append((load_history(str(history)).unit, callback.tracker.estimate().unit))
        assert "tokens" not in said and "Batch size B = 4 examples" in said, said
    assert units == [("examples", "examples")] * 2


class _FiveClassified(_Classified):
    """The first 5 of _Classified's examples: micro-batches of 3 and 2 at 3 a micro-batch."""

    def __len__(self) -> int:
        return 5


class _NoKwargsClassifier(nn.Module):
    """_bert_classifier's pooled logits behind a forward without **kwargs: the Trainer passes
    it no num_items_in_batch and divides each micro-batch's loss by the accumulation."""

    def __init__(self) -> None:
        super().__init__()
        self.bert = _bert_classifier()
        self.config = self.bert.config

    def forward(self, input_ids, labels=None):
        logits = self.bert(input_ids=input_ids).logits
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


@pytest.mark.parametrize("unlabelled", [None, 4], ids=["all labelled", "one -100"])
def test_label_smoothing_over_micro_batches_of_different_sizes_keeps_the_step(tmp_path, unlabelled):
    """(The integrations fuzzer, seeds 374 and 535, 2026-12-07.) A classifier without
    **kwargs under label_smoothing_factor, 5 examples in micro-batches of 3 and 2: each
    micro-batch's loss is the mean over its labelled examples, which — every label counted —
    is a mean over examples whose weights the loop fixes by the sizes, as without smoothing:
    the step's own gradient is the big batch, b_big (Σc)²/Σc² = 2²/(3/9 + 2/4) = 4.8 and
    |G_big|² the brute force's. Until then the smoother's counts (3 and 2) were taken for token
    counts that differ: a warning naming token means, and the step measured within its
    micro-batches (b_big 2.5) for the rest of the run. A -100 in the second micro-batch (counts
    3 and 1 of sizes 3 and 2) weighs by the data: still measured within (b_big 2), with the
    warning."""
    pytest.importorskip("transformers")
    import transformers

    from noisescale.integrations.transformers import NoiseScaleCallback

    data = _FiveClassified()
    if unlabelled is not None:
        data.labels = data.labels.clone()
        data.labels[unlabelled] = -100
    model = _NoKwargsClassifier()
    grads = []
    for i in range(5):
        model.zero_grad()
        logits = model(data.ids[i : i + 1])["logits"]
        F.cross_entropy(logits, data.labels[i : i + 1], label_smoothing=0.1).backward()
        grads.append(
            torch.cat(
                [
                    p.grad.flatten() if p.grad is not None else torch.zeros(p.numel())
                    for p in model.parameters()
                ]
            )
        )
    c = torch.tensor([1 / 3] * 3 + [1 / 2] * 2, dtype=torch.float64)  # each micro-batch's mean
    big = (c[:, None] * torch.stack(grads)).sum(0) / c.sum()
    args = _hf_args(tmp_path, per_device_train_batch_size=3, gradient_accumulation_steps=2,
                    max_steps=1, learning_rate=0.0, max_grad_norm=0.0,
                    label_smoothing_factor=0.1)  # fmt: skip
    callback = NoiseScaleCallback(per_example_fraction=1.0, microbatch=False, beta=1.0)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        transformers.Trainer(
            model=_NoKwargsClassifier(), args=args, train_dataset=data, callbacks=[callback]
        ).train()
    (record,) = callback.tracker.history
    within = [str(w.message) for w in seen if "divide their sum by their own count" in str(w)]
    if unlabelled is None:
        assert not within, within
        assert record["b_big"] == pytest.approx(4.8, rel=1e-12)
        assert record["sqnorm_big"] == pytest.approx(float(big @ big), rel=1e-9)
    else:
        assert within and record["b_big"] == pytest.approx(2.0, rel=1e-12)


def test_a_compute_loss_func_that_draws_is_probed_with_its_own_draws(tmp_path):
    """The probe repeats the compute_loss_func's call with the generators as that call found
    them: a loss that draws label noise (Gaussian, σ 0.3 on one-hot targets) is not refused,
    in either form (until a review on 2026-12-05 the repeat drew anew, and the ratio moved by
    the noise's own amount: refused in 10 of 10 seeds, a plain mean too)."""
    pytest.importorskip("transformers")

    def noisy(logits, labels):
        return F.one_hot(labels, 3).to(logits) + 0.3 * torch.randn(logits.shape, dtype=logits.dtype)

    def items_loss(outputs, labels, num_items_in_batch=None):
        return (outputs.logits - noisy(outputs.logits, labels)).pow(2).sum() / num_items_in_batch

    def mean_loss(outputs, labels, num_items_in_batch=None):
        return (outputs.logits - noisy(outputs.logits, labels)).pow(2).sum(1).mean()

    for seed in range(3):
        for func, declared in ((items_loss, "num_items_in_batch"), (mean_loss, "mean")):
            torch.manual_seed(seed)
            got = _one_step(
                tmp_path, _bert_classifier(), _Classified(), 2, compute_loss_func=func,
                loss_reduction=declared,
            )  # fmt: skip
            assert math.isfinite(got["sqnorm_big"])


def _gpt2_lm():
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=60, n_embd=16, n_layer=1, n_head=2, n_positions=16, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, loss_type="ForCausalLM",
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).double()


class _Padded(torch.utils.data.Dataset):
    """8 sequences of 3–12 counted tokens, -100 on the padding."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(3)
        self.ids = torch.randint(1, 60, (_SEQ, 12), generator=g)
        lengths = torch.randint(3, 13, (_SEQ,), generator=g)
        self.mask = (torch.arange(12)[None] < lengths[:, None]).long()
        self.labels = torch.where(self.mask.bool(), self.ids, -100)

    def __len__(self) -> int:
        return _SEQ

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def test_label_smoothing_is_measured_per_token(tmp_path):
    """label_smoothing_factor: the Trainer takes the labels out and its LabelSmoother computes
    the loss over the counted tokens outside the model. It is measured as the model's own loss
    is: with a factor of 1e-12 (the same objective as none, to 1e-12) the record is the one of
    the model's own loss, per token, with accumulation 1 and 2; with 0.1 too it is per token,
    counting the same tokens. (Until 2026-12-03 it was read as a mean over sequences, 15–97%
    off, without a word.)"""
    pytest.importorskip("transformers")
    want = _one_step(tmp_path, _gpt2_lm(), _Padded(), 1)
    assert want["tokens"] == float((_Padded().labels[:, 1:] != -100).sum())
    for k in (1, 2):
        got = _one_step(tmp_path, _gpt2_lm(), _Padded(), k, args={"label_smoothing_factor": 1e-12})
        # (the model's own causal-LM loss computes in float32: its weights round at 1e-7)
        _assert_same_record(got, want, rel=1e-6)
        smoothed = _one_step(
            tmp_path, _gpt2_lm(), _Padded(), k, args={"label_smoothing_factor": 0.1}
        )
        assert smoothed["tokens"] == want["tokens"] and smoothed["b_big"] == want["b_big"]
        assert smoothed["sqnorm_big"] != pytest.approx(want["sqnorm_big"], rel=1e-3)


def _token_loss_trainer():
    """The Trainer with the documented compute_loss override over tokens
    (docs/integrations.md): the summed shifted-token loss divided by the num_items_in_batch
    the Trainer passes (times the processes when it counts all of theirs, as
    Trainer.compute_loss does), the shifted labels counted."""
    import transformers

    from noisescale.integrations.transformers import NoiseScaleCallback

    class TokenLoss(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            shifted = labels[:, 1:]
            (callback,) = [
                c for c in self.callback_handler.callbacks if isinstance(c, NoiseScaleCallback)
            ]
            callback.tracker.count_tokens(shifted)
            logits = outputs.logits[:, :-1].flatten(0, 1)
            loss = F.cross_entropy(logits, shifted.flatten(), reduction="sum")
            loss = loss / num_items_in_batch
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                loss = loss * self.accelerator.num_processes
            return (loss, outputs) if return_outputs else loss

    return TokenLoss


def test_a_compute_loss_override_over_tokens_is_weighed_by_the_trainer_s_divisor(tmp_path):
    """The documented recipe for a loss of one's own over tokens under the Trainer: a
    compute_loss override that divides the summed (shifted) token loss by the
    num_items_in_batch the Trainer passes and counts the shifted labels, declared
    loss_reduction='num_items_in_batch'. For GPT-2 the Trainer counts num_items_in_batch over
    the unshifted labels (one token more per sequence than the loss counts), so the divisor is
    not the tokens counted: the callback takes the one the Trainer passed, and the record is
    the model's own loss's, with accumulation 1 and 2. (Until 2026-12-05 the tracker took the
    counted tokens for the divisor: |G|² and tr Σ read (counted / num_items_in_batch)² off,
    0.48–0.73 here, without a word.)"""
    pytest.importorskip("transformers")
    TokenLoss = _token_loss_trainer()
    data = _Padded()
    # the Trainer's count for GPT-2 is not the loss's (the case that was misread)
    assert int((data.labels != -100).sum()) != int((data.labels[:, 1:] != -100).sum())
    want = _one_step(tmp_path, _gpt2_lm(), data, 1)
    for k in (1, 2):
        got = _one_step(
            tmp_path, _gpt2_lm(), _Padded(), k, trainer_cls=TokenLoss,
            loss_reduction="num_items_in_batch",
        )  # fmt: skip
        # (the model's own causal-LM loss computes in float32: its weights round at 1e-7)
        _assert_same_record(got, want, rel=1e-6)


@pytest.mark.slow
def test_adaptive_batch_is_global_under_ddp(tmp_path):
    """2 CPU processes (torchrun, gloo): a schedule counts global examples, like B_simple and the
    tracker's example count, under Lightning's DDP strategy, the Hugging Face Trainer and in a
    plain DDP loop.

    With the per-process micro-batch (4) as the Lightning docstring asked, the global batch was
    twice the schedule's (56 against a target of 29, the hunt's repro): such a schedule is now
    refused when training starts. With the global one (4 × 2 = 8) every step runs the
    schedule's batch over both processes, and the schedule's example count is the tracker's.
    """
    pytest.importorskip("lightning")
    from noisescale.schedule import quantized_batch_size

    launcher = ["torch.distributed.run", "--nproc_per_node", "2", "--master_port", "{port}"]
    ranks = _two_processes(launcher, "ddp_schedule_worker.py", tmp_path)
    micro, world, per_process = 8, 2, 4

    for rank in ranks:
        lit = rank["lightning"]
        assert lit["world_size"] == world
        for local, k in lit["rows"]:
            assert local == k * per_process and world * local == k * micro  # the global batch
        assert sum(world * local for local, _ in lit["rows"]) == lit["schedule_examples"]
        assert lit["schedule_examples"] == lit["tracker_examples"]
        last = lit["history"][-1]
        assert lit["batch_size"] == quantized_batch_size(last["target"], micro, micro, 256) > micro
        assert world * lit["rows"][-1][0] == lit["batch_size"]  # the target, not twice it

        refused = rank["lightning_refused"]["error"]
        assert "micro_batch_size is 4" in refused and "micro-batch is 8 examples" in refused

        # the Trainer, global micro-batch 8 × 2: a ramp 16 → 32 after 32 examples, applied at
        # the epoch's 2nd step boundary (6 micro-batches per process: 1 + 1 + 2 + 2, then 2 × 3)
        hf = rank["transformers"]
        assert hf["world_size"] == world
        assert hf["steps"] == [[16.0, 0.1]] * 2 + [[32.0, 0.2]] * 5
        assert hf["ramp_examples"] == hf["tracker_examples"] == 2 * 96  # two epochs

        plain = rank["plain"]
        for (local, batch), tracked in zip(plain["rows"], plain["tracked"], strict=True):
            assert world * local == batch == tracked
        assert plain["schedule_examples"] == plain["tracker_examples"] == sum(plain["tracked"])
        assert plain["batch_size"] == quantized_batch_size(plain["b_simple"], micro, micro, 256)
        assert len({b for _, b in plain["rows"]}) > 1  # the batch changed
    assert ranks[0]["lightning"]["rows"] == ranks[1]["lightning"]["rows"]
    assert ranks[0]["plain"]["rows"] == ranks[1]["plain"]["rows"]


def test_transformers_refuses_samplers_whose_steps_or_micro_batches_are_not_random(tmp_path):
    """``group_by_length`` (a step of similar lengths: B_simple 22% low with every example
    measured) is refused; ``batch_rebalance`` (a random step sorted by length into micro-batches:
    3.5× too high by default) is refused under accumulation — also with every example measured,
    accepted until 2026-12-05: its micro-batches of 6 and 10 examples here, sized by the lengths
    drawn, weigh their examples by weights that depend on the data; ``sequential`` is warned
    about (right only for a dataset stored shuffled)."""
    pytest.importorskip("transformers")
    from noisescale.integrations.transformers import NoiseScaleCallback

    def args(strategy: str, accumulation: int = 2) -> object:
        return _hf_args(
            tmp_path, train_sampling_strategy=strategy, gradient_accumulation_steps=accumulation
        )

    with pytest.raises(NoiseScaleInputError, match=r"group_by_length.*not independent draws"):
        NoiseScaleCallback().on_train_begin(args("group_by_length"), None, None, model=_HFModel())
    with pytest.raises(NoiseScaleInputError, match=r"batch_rebalance.*not a random part"):
        NoiseScaleCallback().on_train_begin(args("batch_rebalance"), None, None, model=_HFModel())
    for kwargs in (
        {"per_example_fraction": 1.0},
        {"per_example_fraction": 1.0, "microbatch": False},
    ):
        with pytest.raises(NoiseScaleInputError, match=r"batch_rebalance.*1/\(its size\)"):
            NoiseScaleCallback(**kwargs).on_train_begin(
                args("batch_rebalance"), None, None, model=_HFModel()
            )

    # Accepted where the estimate does not rest on the micro-batches being random parts.
    import transformers

    class Lengths(_HFDataset):  # (the length samplers read each example's "input_ids")
        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {**super().__getitem__(i), "input_ids": torch.zeros(1 + i % 5)}

    class Model(_HFModel):
        def forward(self, x, labels=None, input_ids=None):
            return super().forward(x, labels)

    for strategy, accumulation, kwargs in [
        ("batch_rebalance", 1, {}),
        ("random", 2, {}),
    ]:
        callback = NoiseScaleCallback(sync_every=1, **kwargs)
        trainer = transformers.Trainer(
            model=Model(),
            args=args(strategy, accumulation),
            train_dataset=Lengths(),
            data_collator=lambda rows: {
                k: torch.stack([r[k] for r in rows]) for k in ("x", "labels")
            },
            callbacks=[callback],
        )
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            trainer.train()
        assert len(callback.tracker.history) == 6, strategy

    callback = NoiseScaleCallback(sync_every=1)
    trainer = transformers.Trainer(
        model=_HFModel(), args=args("sequential"), train_dataset=_HFDataset(), callbacks=[callback]
    )
    with pytest.warns(RuntimeWarning, match="'sequential' keeps the dataset's order"):
        trainer.train()

    # A stream has no sampler: the Trainer ignores the setting, and so does the callback.
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            data = _HFDataset()
            return (data[i] for i in range(len(data)))

    callback = NoiseScaleCallback(sync_every=1)
    trainer = transformers.Trainer(
        model=_HFModel(), args=args("group_by_length"), train_dataset=Stream(), callbacks=[callback]
    )
    trainer.train()
    assert len(callback.tracker.history) == 6


def test_the_compute_loss_func_check_leaves_torch_s_generator_alone():
    """The callback calls a compute_loss_func once more on its first step to see whether it
    divides by num_items_in_batch; a loss that draws random numbers (label noise) must leave the
    run's later draws what they would be without the callback."""
    pytest.importorskip("transformers")
    from noisescale.integrations.transformers import NoiseScaleCallback

    def loss_func(outputs, labels, num_items_in_batch=None):
        noise = 1e-3 * torch.rand(())  # (draws from torch's generator)
        return F.cross_entropy(outputs, labels, reduction="sum") / num_items_in_batch + noise

    callback = NoiseScaleCallback(loss_reduction="num_items_in_batch")
    logits, labels = torch.randn(8, 3, requires_grad=True), torch.randint(0, 3, (8,))
    out = loss_func(logits, labels, num_items_in_batch=8)
    torch.manual_seed(5)
    kwargs = {"num_items_in_batch": 8}
    callback._check_loss_func(loss_func, (logits, labels), kwargs, out, labels, 8)
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(3))


@pytest.mark.slow
def test_trainer_with_torch_compile_measures_what_eager_measures(tmp_path):
    """TrainingArguments(torch_compile=True): the Trainer compiles the model (accelerate's
    ``torch.compile``; ``trainer.model_wrapped`` is the ``OptimizedModule``) and the callback
    tracks ``trainer.model``: a GPT-2 with its own token-mean loss, every example measured,
    gives eager's norms at every step and no warning."""
    transformers = pytest.importorskip("transformers")
    from noisescale.integrations.transformers import NoiseScaleCallback

    transformers.logging.set_verbosity_error()
    ids = torch.randint(1, 50, (32, 8), generator=torch.Generator().manual_seed(0))

    class Tokens(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 32

        def __getitem__(self, i: int) -> dict:
            return {"input_ids": ids[i], "labels": ids[i]}

    def train(compiled: bool) -> tuple[list[dict], str]:
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16,
        ))  # fmt: skip
        extra = {"torch_compile": True, "torch_compile_backend": "aot_eager"} if compiled else {}
        args = _hf_args(
            tmp_path, per_device_train_batch_size=8, gradient_accumulation_steps=1,
            max_steps=4, max_grad_norm=0.0, **extra,
        )  # fmt: skip
        callback = NoiseScaleCallback(
            loss_reduction="token_mean", sync_every=1, per_example_fraction=1.0
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer = transformers.Trainer(
                model=model, args=args, train_dataset=Tokens(), callbacks=[callback]
            )
            trainer.train()
        ours = [str(w.message) for w in caught if "noisescale" in str(w.message)]
        assert not ours, ours
        wrapped = type(trainer.model_wrapped).__name__
        callback.tracker.remove()
        return [dict(r) for r in callback.tracker.history], wrapped

    eager, _ = train(False)
    compiled, wrapped = train(True)
    assert wrapped == "OptimizedModule"
    assert len(compiled) == len(eager) == 4
    for got, want in zip(compiled, eager, strict=True):
        assert got["tokens"] == want["tokens"]
        assert got["sqnorm_big"] == pytest.approx(want["sqnorm_big"], rel=1e-5)
        for name, source in want["sources"].items():
            mine = got["sources"][name]["sqnorm_small"]
            assert mine == pytest.approx(source["sqnorm_small"], rel=1e-5)
