"""torch.compile: the tracker inside the model's compiled graph.

For a plain MLP, a small CNN, the reference GPT and a tiny Hugging Face GPT-2 (random weights),
each compiled with ``torch.compile(model)`` and with ``model.compile()``, in the three modes —
sub-batches (default), every example (``per_example_fraction=1.0``) and micro-batches
(``per_example=False``, two per step):

* **no graph break caused by noisescale**: Dynamo's own counter of graph breaks is the same as for
  the same compiled model without a tracker (which may break on its own);
* **no recompilation**: the tracked model compiles into no more graphs than the plain one — a
  Python value a traced hook read that changed every step would make Dynamo recompile every step,
  and run the model eagerly once its recompile limit is reached: silently slow;
* **the same numbers as eager**: every step's squared norms (the big batch's and each small
  batch source's) and B_simple equal those of the same run without compile, on the audited steps
  (which run eagerly) and the compiled ones alike. Everything runs in float64; the tolerance
  is a few hundred rounding errors of it (measured differences: 0 for the per-example and
  sub-batch norms, which the engine computes eagerly from the same tensors in both runs, and
  ~1e-16 for micro-batch norms read from gradients the compiled backward computed).

Steps 1, 2 and 4 are audited and run eagerly; step 3 compiles the graph and step 5 reuses it.
``aot_eager`` runs AOT autograd — the functionalised forward and backward graphs, the ordered
effects that keep the hooks' operators in them — without inductor's code generation. The models
have no dropout: compiled code draws its random masks differently from eager.

Then what the traced hooks do not follow: the tracker says so once, runs its hooks outside the
graph (graph breaks) and keeps exact numbers; a structure change under compile withholds one
step and audits the next eagerly.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from noisescale import GradientNoiseTracker
from noisescale.reference_models import GPT, GPTConfig, PaperCNN

torch._dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.utils import counters  # noqa: E402

pytestmark = pytest.mark.usefixtures("float64_default")

N = 16  # with T = 8 and 8 sub-batches: Linear weights take the sub-batch product path
T = 8
STEPS = 5
BACKEND = "aot_eager"
EPS = torch.finfo(torch.float64).eps
RTOL = 256 * EPS
MODES: dict[str, dict[str, Any]] = {
    "subbatch": {},
    "per_example": {"per_example_fraction": 1.0},
    "microbatch": {"per_example": False},
}

Batch = Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def mlp() -> tuple[nn.Module, Callable, Batch]:
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 5))

    def batch(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(N, 10, generator=gen), torch.randint(0, 5, (N,), generator=gen)

    return model, F.cross_entropy, batch


def cnn() -> tuple[nn.Module, Callable, Batch]:
    model = PaperCNN(image_size=8, dropout=0.0)

    def batch(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(N, 1, 8, 8, generator=gen), torch.randint(0, 10, (N,), generator=gen)

    return model, F.cross_entropy, batch


def _tokens(vocab: int) -> Batch:
    def batch(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            torch.randint(0, vocab, (N, T), generator=gen),
            torch.randint(0, vocab, (N, T), generator=gen),
        )

    return batch


def gpt() -> tuple[nn.Module, Callable, Batch]:
    config = GPTConfig(n_layer=2, d_model=32, n_head=2, block_size=16, vocab_size=64, dropout=0.0)
    model = GPT(config)

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())

    return model, loss, _tokens(64)


def gpt2() -> tuple[nn.Module, Callable, Batch]:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config)  # its head is tied to the token embedding

    def loss(out: Any, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.logits.flatten(0, 1), y.flatten())

    return model, loss, _tokens(64)


MODELS = {"mlp": mlp, "cnn": cnn, "gpt": gpt, "gpt2": gpt2}


def _compiled(model: nn.Module, style: str | None, backend: str) -> Callable:
    if style == "torch.compile":
        return torch.compile(model, backend=backend)
    if style == "model.compile":
        model.compile(backend=backend)
    return model


def train(
    factory: Callable, mode: str | None, style: str | None, backend: str = BACKEND
) -> tuple[list[dict[str, Any]] | None, int, int, list[str]]:
    """STEPS training steps: (history, graph breaks, graphs compiled, noisescale's warnings)."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model, loss_fn, batch = factory()
    call = _compiled(model, style, backend)
    tracker = None if mode is None else GradientNoiseTracker(model, sync_every=1, **MODES[mode])
    accumulation = 2 if mode == "microbatch" else 1
    gen = torch.Generator().manual_seed(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(STEPS):
            for _ in range(accumulation):
                x, y = batch(gen)
                (loss_fn(call(x), y) / accumulation).backward()
            if tracker is not None:
                tracker.step()
            model.zero_grad()
    history = None
    if tracker is not None:
        history = [dict(r) for r in tracker.history]
        tracker.remove()
    breaks = sum(counters["graph_break"].values())
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    ours = [str(w.message) for w in caught if "noisescale" in str(w.message)]
    return history, breaks, graphs, ours


@functools.cache
def _eager(model: str, mode: str) -> list[dict[str, Any]]:
    history, *_ = train(MODELS[model], mode, None)
    assert history is not None
    return history


@functools.cache
def _plain(model: str, style: str) -> tuple[int, int]:
    _, breaks, graphs, _ = train(MODELS[model], None, style)
    return breaks, graphs


def assert_same_numbers(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    assert len(got) == len(want) == STEPS
    for g, w in zip(got, want, strict=True):
        step = g["step"]
        assert g["skipped"] == w["skipped"], step
        assert g["sqnorm_big"] == pytest.approx(w["sqnorm_big"], rel=RTOL), step
        assert set(g["sources"]) == set(w["sources"]), (step, g["sources"], w["sources"])
        for name, source in w["sources"].items():
            mine = g["sources"][name]
            assert mine["count"] == source["count"] and mine["b_small"] == source["b_small"]
            assert mine["sqnorm_small"] == pytest.approx(source["sqnorm_small"], rel=RTOL), (
                step,
                name,
            )
        for key in ("g2", "trace_sigma", "b_simple"):
            # differences of the norms above: their rounding, relative to the norms' scale
            scale = abs(w["trace_sigma"]) + abs(w["g2"]) * w["b_big"]
            if w[key] is None or g[key] is None:
                assert w[key] is g[key], (step, key)
            elif key == "b_simple":
                rel = RTOL * scale / abs(w["trace_sigma"])
                assert g[key] == pytest.approx(w[key], rel=rel, nan_ok=True), step
            else:
                assert g[key] == pytest.approx(w[key], rel=RTOL, abs=RTOL * scale), (step, key)


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("style", ["torch.compile", "model.compile"])
@pytest.mark.parametrize("model", list(MODELS))
def test_no_graph_break_and_the_same_numbers(model: str, style: str, mode: str) -> None:
    history, breaks, graphs, warned = train(MODELS[model], mode, style)
    plain_breaks, plain_graphs = _plain(model, style)
    assert breaks == plain_breaks, f"{breaks} graph breaks, {plain_breaks} without the tracker"
    assert graphs <= max(plain_graphs, 1), f"{graphs} graphs, {plain_graphs} without the tracker"
    assert not warned, warned
    assert history is not None
    assert_same_numbers(history, _eager(model, mode))
