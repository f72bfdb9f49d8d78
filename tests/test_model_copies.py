"""Copies of a measured model: weight averaging, EMA teachers, twins, ``torch.save(model)``.

``copy.deepcopy`` (and through it ``torch.optim.swa_utils.AveragedModel``, timm's and Lightning's
weight averaging) copies a model's hooks with it. Until 2026-12-04 a copy made after the tracker
failed in its first forward with gradients on (a ``KeyError`` from inside the engine), a Hugging
Face model with a tracker could not be copied at all ("cannot pickle 'AccumulateGrad' object"),
and ``torch.save(model)`` could not pickle the hooks. Now the copy's hooks do nothing, a Hugging
Face copy has its own ``loss_function`` back, and the tracker's records are those of the same
loop without the copy — to the bit.
"""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import noisescale
from noisescale.errors import NoiseScaleInputError

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

V, T = 32, 12


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 3))


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 6 * 6, 3),
    )  # fmt: skip


def _gpt2() -> nn.Module:
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=V, n_positions=16, n_embd=16, n_layer=1, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    ))  # fmt: skip


def _batch(kind: str, seed: int, n: int = 8):
    g = torch.Generator().manual_seed(seed)
    if kind == "gpt2":
        ids = torch.randint(0, V, (n, T), generator=g)
        labels = ids.clone()
        labels[:, : 2 + seed % 5] = -100  # sequences count different numbers of tokens
        return {"input_ids": ids, "labels": labels}
    x = torch.randn(n, 6, generator=g) if kind == "mlp" else torch.randn(n, 3, 6, 6, generator=g)
    return {"x": x, "y": torch.randint(0, 3, (n,), generator=g)}


def _loss(model: nn.Module, kind: str, batch: dict, items: int | None = None) -> torch.Tensor:
    if kind == "gpt2":
        # items: the step's tokens, so that every token weighs the same over the micro-batches
        # (each micro-batch's own mean weighs them by its count, and micro-batch norms alone
        # then measure nothing: StepNorms.weights_vary)
        return model(**batch, num_items_in_batch=items).loss
    return F.cross_entropy(model(batch["x"]), batch["y"])


BUILD = {"mlp": _mlp, "cnn": _cnn, "gpt2": _gpt2}


def _train(kind: str, kw: dict, copy_kind: str | None, use: str, steps: int = 6) -> list:
    """The tracker's records over ``steps`` steps; with a copy of the model made after the
    tracker (``deepcopy`` or ``AveragedModel``), run each step before ``tracker.step()`` —
    without gradients (``"eval"``), or with them and its own backward (``"backward"``)."""
    model = BUILD[kind]()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    micro = kw.pop("micro", 1)
    tracker = noisescale.GradientNoiseTracker(model, **kw)
    twin = None
    if copy_kind == "deepcopy":
        twin = copy.deepcopy(model)
    elif copy_kind == "averaged":
        twin = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    for step in range(steps):
        batches = [_batch(kind, 10 * step + m) for m in range(micro)]
        if kind == "gpt2" and micro > 1:
            items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
            for b in batches:
                _loss(model, kind, b, items).backward()
        else:
            for b in batches:
                (_loss(model, kind, b) / micro).backward()
        if twin is not None:
            other = _batch(kind, 1000 + step, n=5)
            if use == "eval":
                with torch.no_grad():
                    _loss(twin, kind, other)
            else:
                _loss(twin, kind, other).backward()
        tracker.step()
        opt.step()
        opt.zero_grad()
        if isinstance(twin, AveragedModel):
            twin.update_parameters(model)
    return [(r["g2"], r["trace_sigma"]) for r in tracker.history]


MODES = {
    "default": {},
    "exact": {"per_example_fraction": 1.0},
    "micro": {"per_example": False, "micro": 2},
}


@pytest.mark.parametrize("use", ["eval", "backward"])
@pytest.mark.parametrize("copy_kind", ["deepcopy", "averaged"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("kind", list(BUILD))
def test_a_copy_of_the_model_running_beside_it_changes_nothing(kind, mode, copy_kind, use):
    want = _train(kind, dict(MODES[mode]), None, use)
    got = _train(kind, dict(MODES[mode]), copy_kind, use)
    assert len(got) == 6
    assert got == want
    assert all(math.isfinite(g2) for g2, _ in got)


def test_a_copy_s_hooks_are_inert_and_a_hugging_face_copy_has_its_own_loss_back():
    from noisescale.module_hooks import Inert

    model = _gpt2()
    own = model.loss_function
    tracker = noisescale.GradientNoiseTracker(model)
    assert model.loss_function is not own  # wrapped while measured
    twin = copy.deepcopy(model)
    assert twin.loss_function is own
    hooks = [h for m in twin.modules() for d in (m._forward_hooks, m._forward_pre_hooks)
             for h in d.values()]  # fmt: skip
    assert hooks and all(isinstance(h, Inert) for h in hooks)
    tracker.remove()


@pytest.mark.parametrize("kind", list(BUILD))
def test_torch_save_of_a_measured_model_loads_and_trains_under_a_new_tracker(kind):
    """``torch.save(model)`` in the middle of a measured run: the tracker goes on, and the
    loaded model is the plain model — measured again by a tracker of its own, exactly as a
    model that was never measured."""
    model = BUILD[kind]()
    tracker = noisescale.GradientNoiseTracker(model, per_example_fraction=1.0)
    _loss(model, kind, _batch(kind, 0)).backward()
    tracker.step()
    model.zero_grad()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    _loss(model, kind, _batch(kind, 1)).backward()
    tracker.step()  # the run goes on after the save
    assert tracker.steps == 2

    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    fresh = BUILD[kind]()
    fresh.load_state_dict(loaded.state_dict())
    records = []
    for m in (loaded, fresh):
        t = noisescale.GradientNoiseTracker(m, per_example_fraction=1.0)
        for step in range(3):
            _loss(m, kind, _batch(kind, 5 + step)).backward()
            t.step()
            m.zero_grad()
        records.append([(r["g2"], r["trace_sigma"]) for r in t.history])
    assert records[0] == records[1] and len(records[0]) == 3


def test_training_a_copy_instead_of_the_model_says_so():
    model = _mlp()
    tracker = noisescale.GradientNoiseTracker(model)
    trained = copy.deepcopy(model)
    _loss(trained, "mlp", _batch("mlp", 0)).backward()
    with pytest.raises(NoiseScaleInputError, match=r"a copy of it .* is not measured"):
        tracker.step()


def test_lightning_weight_averaging_beside_the_callback():
    """Lightning's ``WeightAveraging`` callback keeps an ``AveragedModel`` of the module (a deep
    copy made at the start of fit, after the noise-scale callback's tracker): the records are
    those of the same fit without it."""
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.callbacks import WeightAveraging

    from noisescale.integrations.lightning import NoiseScaleCallback

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _mlp()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, i):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 6, generator=g),
                                          torch.randint(0, 3, (64,), generator=g))  # fmt: skip

    def fit(average: bool) -> list:
        torch.manual_seed(1)
        callback = NoiseScaleCallback(per_example_fraction=1.0)
        callbacks = [callback] + ([WeightAveraging()] if average else [])
        trainer = pl.Trainer(
            max_epochs=1, callbacks=callbacks, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
        )  # fmt: skip
        loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(Module(), loader)
        return [(r["g2"], r["trace_sigma"]) for r in callback.tracker.history]

    want = fit(False)
    got = fit(True)
    assert len(want) == 8
    assert got == want


@pytest.mark.parametrize("kind", ["mlp", "gpt2"])
def test_a_shallow_copy_is_the_measured_model(kind):
    """``copy.copy(model)`` shares its parameters, submodules and hooks: trained through, it is
    the model, and the records are the model's (a review found a first version that took its
    root for a copy and refused the step)."""

    def run(shallow: bool) -> list:
        model = BUILD[kind]()
        tracker = noisescale.GradientNoiseTracker(model, per_example_fraction=1.0)
        used = copy.copy(model) if shallow else model
        for step in range(3):
            _loss(used, kind, _batch(kind, step)).backward()
            tracker.step()
            model.zero_grad()
        return [(r["g2"], r["trace_sigma"]) for r in tracker.history]

    assert run(True) == run(False)
