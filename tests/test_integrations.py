"""The Lightning and Hugging Face callbacks measure what a plain loop measures, before clipping.

Each framework run is compared step by step with a plain loop over the same batches from the same
initial weights, with gradient clipping on in both: the callback's per-step |G_big|², |G|², tr Σ
and B_simple must equal the plain loop's, where the tracker reads before clipping. The clip
threshold is far below the gradient norm, so a reading after clipping could not agree.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from noisescale import GradientNoiseTracker
from noisescale.errors import NoiseScaleInputError
from noisescale.schedule import AdaptiveBatchSize, BatchSizeRamp

N, D, C = 96, 10, 3
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
    init: dict[str, torch.Tensor], steps: int, k: int, clip: float | None = CLIP
) -> list[dict]:
    """A plain loop: k micro-batches per step, tracker before clipping, SGD lr 0.1."""
    x_all, y_all = _data()
    model = _Wrapped(_net())
    model.load_state_dict(init)
    tracker = GradientNoiseTracker(model, sync_every=1, per_example_fraction=1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = list(zip(x_all.split(MICRO), y_all.split(MICRO), strict=True))
    pos = 0
    for _ in range(steps):
        total = torch.zeros(())
        for _ in range(k):
            x, y = batches[pos % len(batches)]
            pos += 1
            loss = F.cross_entropy(model(x), y) / k
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


def _lit_trainer(callback, **kwargs):
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return pl.Trainer(callbacks=[callback], **{**defaults, **kwargs})


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
    _assert_same_history(got, _plain_history(init, 6, 2))
    # the callback saw unclipped gradients: |G_big| far above the clip threshold
    assert all(h["sqnorm_big"] > 1e4 * CLIP**2 for h in got)
    # and clipping does not change what is measured: the first step equals an unclipped loop's
    assert got[0]["sqnorm_big"] == pytest.approx(_plain_history(init, 1, 2, None)[0]["sqnorm_big"])


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
    if fraction == 1.0:  # (the labels are random: a 1-row subset leaves |G|² unresolved)
        assert len({b for b, _ in want}) > 1  # the schedule did change the batch


@needs_lightning
def test_lightning_callback_refuses_a_schedule_with_an_optimizer():
    opt = torch.optim.SGD(_net().parameters(), lr=0.1)
    schedule = AdaptiveBatchSize(micro_batch_size=8, max_batch_size=64, factor=1.0, optimizer=opt)
    with pytest.raises(NoiseScaleInputError, match="no optimizer"):
        LightningCallback(schedule)


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

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def _hf_train(tmp_path, callback, **kwargs) -> object:
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
    args = transformers.TrainingArguments(**{**settings, **kwargs})
    model = _HFModel()
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=_HFDataset(), callbacks=[callback]
    )
    return model, trainer


def test_transformers_matches_plain_loop_before_clipping(tmp_path):
    pytest.importorskip("transformers")
    from noisescale.integrations.transformers import NoiseScaleCallback

    callback = NoiseScaleCallback(sync_every=1, per_example_fraction=1.0)
    model, trainer = _hf_train(tmp_path, callback)
    init = {f"net.{k}": v.clone() for k, v in model.net.state_dict().items()}
    trainer.train()
    got = callback.tracker.history
    _assert_same_history(got, _plain_history(init, 6, 2))
    assert all(h["sqnorm_big"] > 1e4 * CLIP**2 for h in got)
    assert [h["lr"] for h in got] == [0.1] * 6
    # the estimate reached the Trainer's logs
    logged = [h for h in trainer.state.log_history if "noisescale/trace_sigma" in h]
    assert logged and logged[-1]["noisescale/trace_sigma"] == pytest.approx(
        callback.tracker.estimate().trace_sigma
    )


def test_transformers_refuses_fp16(tmp_path):
    pytest.importorskip("transformers")
    from noisescale.integrations.transformers import NoiseScaleCallback

    callback = NoiseScaleCallback()
    with pytest.raises(NoiseScaleInputError, match="fp16"):
        callback.on_train_begin(type("Args", (), {"fp16": True})(), None, None, model=_HFModel())
